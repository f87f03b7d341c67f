"""What the event stream tells that a listing can't: a container is on its way out.

`docker stop` sends the stop signal, waits, then kills; during that wait the container still
lists as running. Remembering the `kill` event lets nginx stop routing to it while it finishes
its in-flight requests, instead of after it has gone.
"""

from __future__ import annotations

import re
import signal as signals
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TERMINATING = frozenset({signals.SIGINT, signals.SIGQUIT, signals.SIGKILL, signals.SIGTERM})
RETURN_ACTIONS = frozenset({"start", "restart", "unpause"})


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    action: str
    signal: str | None = None


@dataclass(frozen=True)
class StopMark:
    """Every signal sent since the container (re)started, so a later SIGHUP can't hide an
    earlier SIGTERM; `at` is the latest one."""

    signals: frozenset[int]
    at: float


REALTIME_RE = re.compile(r"RTM(IN|AX)([+-][0-9]{1,2})?")


def signal_number(value: str | None) -> int | None:
    """Docker reports signals as numbers ("15") or names ("SIGTERM", "TERM", "SIGRTMIN+3")."""
    if not value:
        return None
    text = value.strip().upper()
    if text.isdigit():
        return int(text)
    name = text.removeprefix("SIG")
    realtime = REALTIME_RE.fullmatch(name)
    if realtime:
        base = signals.SIGRTMIN if realtime.group(1) == "IN" else signals.SIGRTMAX
        return int(base) + int(realtime.group(2) or 0)
    try:
        return int(signals.Signals["SIG" + name])
    except KeyError:
        return None


def apply_event(
    marks: Mapping[str, StopMark], event: ContainerEvent, now: float
) -> dict[str, StopMark]:
    result = dict(marks)
    number = signal_number(event.signal)
    if event.action == "kill" and number is not None:
        previous = result.get(event.container_id)
        sent = previous.signals if previous else frozenset()
        result[event.container_id] = StopMark(sent | {number}, now)
    elif event.action in RETURN_ACTIONS:
        result.pop(event.container_id, None)
    return result


def is_stopping(mark: StopMark | None, stop_signal: str | None) -> bool:
    """A signal counts when it ends processes by default or is the container's STOPSIGNAL."""
    if mark is None:
        return False
    return bool(mark.signals & TERMINATING) or signal_number(stop_signal) in mark.signals


def prune(
    marks: Mapping[str, StopMark], running: Iterable[str], now: float, grace: float
) -> dict[str, StopMark]:
    """Forget marks of containers that are gone, and of ones still running after `grace`
    seconds: those survived the signal and are serving again."""
    alive = set(running)
    return {cid: m for cid, m in marks.items() if cid in alive and now - m.at <= grace}
