"""The stats listener on a loopback UDP socket: what a managed nginx sends is fed into the
book, anything else is dropped and counted by why; cumulative reports per worker become
deltas; bounded and never raising. Its flags are refused at the start when wrong."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from controlplane.addresses import SocketAddress
from controlplane.core.traffic import COUNTS, VECTOR, WINDOW, Key
from controlplane.errors import ControlPlaneError, InvalidValue
from controlplane.settings import Settings
from controlplane.stats_listener import HOUSEKEEPING, SOURCE_TTL, Decoded, StatsListener

TAG = "abcdefghijklmnop1234"
B1 = "172.20.0.3:80"
LINE = f"<190>Dec  1 00:17:00 {TAG}: cps2|1|web|{B1}|200|0.004|0.001|200|150|67".encode()
LOCAL = "127.0.0.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counts(two_xx: int, connect_errors: int = 0) -> list[int]:
    vector = [0] * VECTOR
    vector[1], vector[5] = two_xx, connect_errors
    vector[COUNTS] = two_xx
    return vector


def lua(data: bytes, tag: str) -> Decoded | None:
    """A stand-in for core.lua_stats.read: `cp-stats TAG PID SEQ N` is N 2xx at web's B1."""
    parts = data.split(b" ")
    if len(parts) != 5 or parts[1].decode() != tag:
        return None
    return parts[2].decode(), int(parts[3]), [(Key("web", B1), counts(int(parts[4])))]


def listener(
    allowed: Callable[[], Sequence[str]] = lambda: [LOCAL],
    clock: Callable[[], float] = time.monotonic,
) -> StatsListener:
    return StatsListener(SocketAddress(LOCAL, 0), TAG, allowed, {b"cp-stats ": lua}, clock)


@pytest.fixture
def running() -> Iterator[StatsListener]:
    stats = listener()
    stats.start()
    yield stats
    stats.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_datagrams_on_the_socket_reach_the_book(running: StatsListener) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(50):
            sender.sendto(LINE, (LOCAL, running.port))
        sender.sendto(b"cp-stats " + TAG.encode() + b" 7 1 5", (LOCAL, running.port))
    wait_for(lambda: running.datagrams()["accepted"] == 51)
    backend = running.summary(Key("web", B1))
    service = running.summary(Key("web", ""))
    assert backend is not None and backend.requests["2xx"] == 55
    assert service is not None and service.requests["2xx"] == 50
    assert running.summaries([Key("web", B1), Key("api", "")]) == {Key("web", B1): backend}


def test_a_stranger_on_the_socket_is_dropped_and_counted() -> None:
    stats = listener(lambda: ["10.0.0.5"])
    stats.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(10):
                sender.sendto(LINE, (LOCAL, stats.port))
        wait_for(lambda: stats.datagrams()["source"] == 10)
        assert stats.datagrams()["accepted"] == 0 and stats.summary(Key("web", "")) is None
    finally:
        stats.close()


def test_what_is_not_ours_is_dropped_and_counted() -> None:
    clock = Clock()
    stats = listener(lambda: ["10.0.0.5"], clock)
    try:
        stats.received(LINE, "10.0.0.6")
        stats.received(LINE + b" " * 4096, "10.0.0.5")
        stats.received(b"GET / HTTP/1.1\r\n", "10.0.0.5")
        stats.received(LINE.replace(TAG.encode(), b"x" * len(TAG)), "10.0.0.5")
        stats.received(LINE.replace(b"|200|150", b"|2000|150"), "10.0.0.5")
        stats.received(b"cp-stats nope", "10.0.0.5")
        stats.received(LINE, "::ffff:10.0.0.5")
        assert stats.datagrams() == {
            "accepted": 1,
            "size": 1,
            "source": 1,
            "kind": 1,
            "tag": 2,
            "invalid": 1,
            "error": 0,
        }
        assert stats.summary(Key("web", "")) is not None
    finally:
        stats.close()


def test_a_new_nginx_is_heard_at_once_yet_allowed_is_not_asked_for_every_stranger() -> None:
    clock, asked, nginx = Clock(), [], ["10.0.0.5"]

    def allowed() -> list[str]:
        asked.append(clock.now)
        return list(nginx)

    stats = listener(allowed, clock)
    try:
        for _ in range(100):
            stats.received(LINE, "10.0.0.99")
        assert len(asked) == 1 and stats.datagrams()["source"] == 100
        nginx.append("10.0.0.7")
        clock.now += 0.2
        stats.received(LINE, "10.0.0.7")
        assert stats.datagrams()["accepted"] == 1 and len(asked) == 2
    finally:
        stats.close()


def test_cumulative_reports_are_deltas_per_worker_and_stale_workers_are_forgotten() -> None:
    clock = Clock()
    stats = listener(clock=clock)
    try:
        seqs: dict[int, int] = {}

        def report(pid: int, total: int, seq: int | None = None) -> None:
            seqs[pid] = seq if seq is not None else seqs.get(pid, 0) + 1
            stats.received(f"cp-stats {TAG} {pid} {seqs[pid]} {total}".encode(), LOCAL)

        report(10, 5)  # its first datagram: all of it is new
        report(11, 3, seq=40)  # heard from mid-life (the controller restarted): a baseline
        report(10, 5)
        report(10, 9)
        report(11, 6)
        summary = stats.summary(Key("web", B1))
        assert summary is not None and summary.requests["2xx"] == 5 + 4 + 3
        report(10, 2)  # the count went down (the worker forgot it): all of it is new
        report(10, 50, seq=1)  # a late datagram: nothing
        summary = stats.summary(Key("web", B1))
        assert summary is not None and summary.requests["2xx"] == 14

        clock.now += max(SOURCE_TTL, WINDOW) + 1
        stats.housekeep()
        assert stats.summary(Key("web", B1)) is None
        report(11, 8)  # forgotten: a baseline again
        report(11, 12)
        summary = stats.summary(Key("web", B1))
        assert summary is not None and summary.requests["2xx"] == 4
    finally:
        stats.close()


def test_only_the_models_keys_are_taken_and_the_rest_is_counted() -> None:
    clock = Clock()
    stats = listener(clock=clock)
    try:
        stats.retain([Key("web", "")])
        stats.received(LINE, LOCAL)
        stats.received(f"cp-stats {TAG} 7 1 5".encode(), LOCAL)  # web's B1: not in the model
        assert stats.refused() == {"unknown": 2, "full": 0}
        assert set(stats.totals()) == {Key("web", "")}
        assert stats.summary(Key("web", B1)) is None
    finally:
        stats.close()


def test_a_decoder_that_fails_costs_its_datagram_only() -> None:
    def broken(data: bytes, tag: str) -> Decoded | None:
        raise RuntimeError("bug")

    def negative(data: bytes, tag: str) -> Decoded | None:
        return "1", 1, [(Key("web", B1), [-1] * VECTOR)]

    stats = StatsListener(
        SocketAddress(LOCAL, 0), TAG, lambda: [LOCAL], {b"a ": broken, b"b ": negative}
    )
    try:
        stats.received(b"a " + TAG.encode(), LOCAL)
        stats.received(b"b " + TAG.encode(), LOCAL)
        stats.received(LINE, LOCAL)
        assert stats.datagrams()["error"] == 1 and stats.datagrams()["invalid"] == 1
        assert stats.datagrams()["accepted"] == 1
    finally:
        stats.close()


def test_a_failing_allowed_keeps_the_last_answer() -> None:
    clock, calls = Clock(), []

    def allowed() -> list[str]:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no snapshot")
        return [LOCAL]

    stats = listener(allowed, clock)
    try:
        stats.received(LINE, LOCAL)
        clock.now += HOUSEKEEPING
        stats.housekeep()
        stats.received(LINE, LOCAL)
        assert stats.datagrams()["accepted"] == 2
    finally:
        stats.close()


def test_a_taken_port_is_refused_with_what_to_do(running: StatsListener) -> None:
    with pytest.raises(ControlPlaneError, match="--stats-bind"):
        StatsListener(SocketAddress(LOCAL, running.port), TAG, lambda: [])


def test_closing_twice_or_unstarted_is_fine() -> None:
    stats = listener()
    stats.close()
    stats.close()


def test_a_stats_address_that_is_not_an_ip_is_refused_at_the_start() -> None:
    with pytest.raises(InvalidValue, match="--stats-address 'controller' is not an IP"):
        Settings(stats_address="controller")
    assert Settings(stats_address="fd00::1").stats_bind == "0.0.0.0:0"
