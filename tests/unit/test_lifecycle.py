"""Stop marks from `kill` events: which signals mean a container is on its way out."""

from __future__ import annotations

import signal

import pytest

from controlplane.core.lifecycle import (
    ContainerEvent,
    StopMark,
    apply_event,
    is_stopping,
    prune,
    signal_number,
)

CID = "c" * 64
RTMIN = int(signal.SIGRTMIN)
RTMAX = int(signal.SIGRTMAX)


def mark(*sent: int, at: float = 1.0) -> StopMark:
    return StopMark(frozenset(sent), at)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("15", 15),
        ("SIGTERM", 15),
        ("TERM", 15),
        ("sigterm", 15),
        (" 9 ", 9),
        ("SIGWINCH", int(signal.SIGWINCH)),
        ("", None),
        (None, None),
        ("SIGNOPE", None),
        ("SIGRTMIN+3", RTMIN + 3),
        ("RTMIN+3", RTMIN + 3),
        ("sigrtmin+3", RTMIN + 3),
        ("SIGRTMIN", RTMIN),
        ("SIGRTMAX", RTMAX),
        ("RTMAX-1", RTMAX - 1),
        ("SIGRTMIN+", None),
        ("SIGRTMIN*3", None),
    ],
    ids=[
        "number",
        "name",
        "short-name",
        "lower",
        "padded",
        "winch",
        "empty",
        "none",
        "unknown",
        "rtmin-plus",
        "rtmin-plus-short-name",
        "rtmin-lower",
        "rtmin-bare",
        "rtmax-bare",
        "rtmax-minus-short-name",
        "rtmin-dangling-plus",
        "rtmin-bad-operator",
    ],
)
def test_signal_number(value: str | None, expected: int | None) -> None:
    assert signal_number(value) == expected


@pytest.mark.parametrize(
    ("sig", "stop_signal", "stopping"),
    [
        ("15", None, True),
        ("SIGTERM", None, True),
        ("9", None, True),
        ("3", None, True),
        ("2", None, True),
        ("SIGKILL", "SIGWINCH", True),
        ("1", None, False),
        ("1", "SIGTERM", False),
        ("SIGHUP", "SIGHUP", True),
        ("1", "1", True),
        (str(signal.SIGWINCH.value), "SIGWINCH", True),
        ("SIGWINCH", "WINCH", True),
        ("SIGWINCH", None, False),
        ("SIGUSR1", "SIGUSR2", False),
        (str(RTMIN + 3), "SIGRTMIN+3", True),
        ("SIGRTMIN+3", "RTMIN+3", True),
        (str(RTMAX - 1), "SIGRTMAX-1", True),
        (str(RTMIN + 3), None, False),
        (str(RTMIN + 3), "SIGRTMIN+4", False),
    ],
    ids=[
        "term-number",
        "term-name",
        "kill",
        "quit",
        "int",
        "kill-beats-custom-stop-signal",
        "hup-is-a-reload",
        "hup-with-default-stop-signal",
        "hup-as-stop-signal",
        "hup-as-numeric-stop-signal",
        "winch-number-as-stop-signal",
        "winch-short-name",
        "winch-without-stop-signal",
        "usr1-vs-usr2",
        "rtmin-plus-3-stop-signal-of-systemd-images",
        "rtmin-name-and-short-name",
        "rtmax-minus-1-stop-signal",
        "realtime-without-stop-signal",
        "realtime-other-than-stop-signal",
    ],
)
def test_kill_marks_stopping(sig: str, stop_signal: str | None, stopping: bool) -> None:
    marks = apply_event({}, ContainerEvent(CID, "kill", sig), now=100.0)
    # Every kill is remembered, even a reload; whether it means "stopping" is decided later.
    assert marks == {CID: mark(signal_number(sig) or -1, at=100.0)}
    assert is_stopping(marks[CID], stop_signal) is stopping


@pytest.mark.parametrize(
    "event",
    [ContainerEvent(CID, "kill", None), ContainerEvent(CID, "kill", "SIGNOPE")],
    ids=["no-signal", "unknown-signal"],
)
def test_kill_without_a_known_signal_is_not_recorded(event: ContainerEvent) -> None:
    assert apply_event({}, event, now=1.0) == {}


@pytest.mark.parametrize("action", ["start", "unpause", "restart"])
def test_return_actions_clear_the_mark(action: str) -> None:
    other = "d" * 64
    marks = {CID: mark(15), other: mark(15)}
    assert apply_event(marks, ContainerEvent(CID, action), now=2.0) == {other: mark(15)}


@pytest.mark.parametrize("action", ["die", "stop", "pause", "health_status: healthy", "create"])
def test_other_actions_keep_the_mark(action: str) -> None:
    marks = {CID: mark(15)}
    assert apply_event(marks, ContainerEvent(CID, action, "15"), now=2.0) == marks


def test_apply_event_does_not_mutate_its_input() -> None:
    marks: dict[str, StopMark] = {}
    apply_event(marks, ContainerEvent(CID, "kill", "15"), now=1.0)
    assert marks == {}


def test_is_stopping_without_a_mark() -> None:
    assert is_stopping(None, "SIGTERM") is False


@pytest.mark.parametrize(
    ("events", "stop_signal", "signals", "stopping"),
    [
        ([("kill", "15"), ("kill", "1")], None, {15, 1}, True),
        ([("kill", "1"), ("kill", "15")], None, {1, 15}, True),
        ([("kill", "1"), ("kill", "1")], None, {1}, False),
        ([("kill", "1"), ("kill", "SIGWINCH")], "SIGWINCH", {1, int(signal.SIGWINCH)}, True),
        ([("kill", str(RTMIN + 3)), ("kill", "1")], "SIGRTMIN+3", {RTMIN + 3, 1}, True),
        ([("kill", "15"), ("die", None), ("kill", "1")], None, {15, 1}, True),
        ([("kill", "15"), ("start", None), ("kill", "1")], None, {1}, False),
        ([("kill", "15"), ("restart", None), ("kill", "1")], None, {1}, False),
        ([("kill", "15"), ("kill", "SIGNOPE")], None, {15}, True),
    ],
    ids=[
        "reload-after-term-keeps-stopping",
        "term-after-reload",
        "two-reloads",
        "stop-signal-after-reload",
        "realtime-stop-signal-then-reload",
        "die-keeps-the-signals",
        "start-forgets-earlier-signals",
        "restart-forgets-earlier-signals",
        "unknown-signal-adds-nothing",
    ],
)
def test_stop_mark_keeps_every_signal_since_start(
    events: list[tuple[str, str | None]], stop_signal: str | None, signals: set[int], stopping: bool
) -> None:
    """A later kill (e.g. `docker kill -s HUP` during the stop timeout) can't hide an earlier
    stop signal; only a (re)start forgets what was sent."""
    marks: dict[str, StopMark] = {}
    for now, (action, sig) in enumerate(events, start=1):
        marks = apply_event(marks, ContainerEvent(CID, action, sig), now=float(now))
    assert marks[CID].signals == signals
    assert is_stopping(marks[CID], stop_signal) is stopping


def test_stop_mark_time_is_the_latest_signal() -> None:
    marks = apply_event({}, ContainerEvent(CID, "kill", "15"), now=1.0)
    marks = apply_event(marks, ContainerEvent(CID, "kill", "1"), now=7.0)
    marks = apply_event(marks, ContainerEvent(CID, "die"), now=9.0)
    assert marks == {CID: mark(15, 1, at=7.0)}


@pytest.mark.parametrize(
    ("running", "now", "expected"),
    [
        ({"a", "b"}, 10.0, {"a", "b"}),
        ({"a"}, 10.0, {"a"}),
        (set(), 10.0, set()),
        ({"a", "b"}, 35.0, {"a", "b"}),
        ({"a", "b"}, 35.5, {"b"}),
        ({"a", "b"}, 100.0, set()),
    ],
    ids=[
        "all-fresh",
        "gone-dropped",
        "nothing-running",
        "exactly-grace-kept",
        "older-than-grace-dropped",
        "all-expired",
    ],
)
def test_prune(running: set[str], now: float, expected: set[str]) -> None:
    marks = {"a": mark(15, at=5.0), "b": mark(15, at=30.0)}
    assert set(prune(marks, running, now=now, grace=30.0)) == expected
