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
    ],
    ids=["number", "name", "short-name", "lower", "padded", "winch", "empty", "none", "unknown"],
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
    ],
)
def test_kill_marks_stopping(sig: str, stop_signal: str | None, stopping: bool) -> None:
    marks = apply_event({}, ContainerEvent(CID, "kill", sig), now=100.0)
    # Every kill is remembered, even a reload; whether it means "stopping" is decided later.
    assert marks == {CID: StopMark(signal_number(sig) or -1, 100.0)}
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
    marks = {CID: StopMark(15, 1.0), other: StopMark(15, 1.0)}
    assert apply_event(marks, ContainerEvent(CID, action), now=2.0) == {other: StopMark(15, 1.0)}


@pytest.mark.parametrize("action", ["die", "stop", "pause", "health_status: healthy", "create"])
def test_other_actions_keep_the_mark(action: str) -> None:
    marks = {CID: StopMark(15, 1.0)}
    assert apply_event(marks, ContainerEvent(CID, action, "15"), now=2.0) == marks


def test_apply_event_does_not_mutate_its_input() -> None:
    marks: dict[str, StopMark] = {}
    apply_event(marks, ContainerEvent(CID, "kill", "15"), now=1.0)
    assert marks == {}


def test_is_stopping_without_a_mark() -> None:
    assert is_stopping(None, "SIGTERM") is False


@pytest.mark.xfail(
    reason="BUG: a later non-terminating kill (e.g. `docker kill -s HUP` during the stop "
    "timeout) overwrites the SIGTERM mark, so nginx routes to the dying container again",
    strict=True,
)
def test_reload_signal_after_term_keeps_stopping() -> None:
    marks = apply_event({}, ContainerEvent(CID, "kill", "15"), now=1.0)
    marks = apply_event(marks, ContainerEvent(CID, "kill", "1"), now=2.0)
    assert is_stopping(marks.get(CID), None)


@pytest.mark.xfail(
    reason="BUG: signal_number() can't parse real-time signal names such as 'SIGRTMIN+3' "
    "(the STOPSIGNAL of systemd images), so their docker stop is never seen as stopping",
    strict=True,
)
def test_realtime_stop_signal() -> None:
    mark = StopMark(int(signal.SIGRTMIN) + 3, 1.0)
    assert is_stopping(mark, "SIGRTMIN+3")


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
    marks = {"a": StopMark(15, 5.0), "b": StopMark(15, 30.0)}
    assert set(prune(marks, running, now=now, grace=30.0)) == expected
