"""Health probes (core.health): many at once on one event loop (uvloop) in its own thread,
each within its own timeout, so a silent address never holds up the others.

A tcp probe is a connect, closed at once. An http probe is one `GET` with `Connection:
close`; only its status line is read (at most 4 KiB, so a huge or endless reply costs
nothing), redirects are not followed (a 3xx is a status like any other), and the timeout
covers the connect and the reply together. It is written here on the raw socket rather than
with an HTTP client library: a check needs the status line and nothing else, and a client
library's per-request cost is several times the whole probe, which would break the budget
for checking a thousand backends every second.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

import uvloop

from controlplane.core.health import Address, Outcome, Result
from controlplane.core.model import HealthCheck, HealthMode

log = logging.getLogger(__name__)

Done = Callable[[Address, Result], None]

READ_AT_MOST = 4096
REQUESTS_KEPT = 4096
SWEEP = 0.01
"""Seconds between looks at the probes under way for those past their timeout."""
STATUS_LINE_RE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r]")
USER_AGENT = "controlplane-health"


class Prober(Protocol):
    """What the gatekeeper needs (Prober, or a fake in tests)."""

    def probe(self, address: Address, check: HealthCheck, done: Done) -> None:
        """Starts one probe of `address` as `check` says and returns; `done` is called once
        with its result, on any thread (possibly before this returns)."""
        ...

    def close(self) -> None: ...


def outcome_of(error: OSError) -> Outcome:
    if isinstance(error, ConnectionRefusedError):
        return Outcome.REFUSED
    if error.errno == errno.EHOSTUNREACH:
        return Outcome.HOST_UNREACHABLE
    if error.errno == errno.ENETUNREACH:
        return Outcome.NETWORK_UNREACHABLE
    return Outcome.FAILED


def request(address: Address, check: HealthCheck) -> bytes:
    """The whole GET. Path and Host passed core.labels' grammar (printable, no space), so
    nothing can be smuggled into the request."""
    port = check.port or address.port
    if check.host is not None:
        host = check.host
    else:
        name = f"[{address.host}]" if ":" in address.host else address.host
        host = name if port == 80 else f"{name}:{port}"
    return (
        f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def status_of(head: bytes) -> int | None:
    """The status of a reply's first line, None if it is not an HTTP/1.x status line."""
    match = STATUS_LINE_RE.match(head)
    return int(match.group(1)) if match else None


class SocketProber:
    """Starts its loop's thread at the first probe; `close` stops it. Probes asked for while
    the loop has not yet taken the last ones go with them: one wake-up of the loop for a
    round's probes, not one each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flight: _InFlight | None = None
        self._thread: threading.Thread | None = None
        self._asked: list[tuple[Address, HealthCheck, Done]] = []

    def probe(self, address: Address, check: HealthCheck, done: Done) -> None:
        running = self._running()
        if running is None:
            return
        loop, flight = running
        with self._lock:
            self._asked.append((address, check, done))
            if len(self._asked) > 1:
                return  # the loop is told already
        loop.call_soon_threadsafe(self._start, loop, flight)

    def _start(self, loop: asyncio.AbstractEventLoop, flight: _InFlight) -> None:
        with self._lock:
            asked, self._asked = self._asked, []
        for address, check, done in asked:
            _Probe.start(loop, flight, address, check, done)

    def _running(self) -> tuple[asyncio.AbstractEventLoop, _InFlight] | None:
        with self._lock:
            if self._loop is None and self._thread is None:
                loop = uvloop.new_event_loop()
                self._flight = _InFlight(loop)
                self._thread = threading.Thread(
                    target=loop.run_forever, name="health-probes", daemon=True
                )
                self._thread.start()
                self._loop = loop
            if self._loop is None or self._flight is None:
                return None
            return self._loop, self._flight

    def close(self) -> None:
        """Stops the loop; probes under way are dropped. No probe starts after this."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


class _Probe:
    """One probe as callbacks on the loop's file descriptors: no task, no coroutine, since at a
    thousand probes a second their cost is most of the probe's. A connect to a backend on
    this host has mostly finished when connect() returns (the kernel runs the handshake on
    the spot), so the request goes out at once and the probe waits for writability only when
    it could not; its timeout is read by its loop's sweep (_InFlight), not a timer of its own."""

    __slots__ = (
        "address",
        "check",
        "deadline",
        "done",
        "flight",
        "head",
        "loop",
        "phase",
        "sock",
        "started",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        flight: _InFlight,
        address: Address,
        check: HealthCheck,
        done: Done,
    ) -> None:
        self.loop, self.flight, self.address, self.check, self.done = (
            loop,
            flight,
            address,
            check,
            done,
        )
        self.started = time.monotonic()
        self.deadline = self.started + check.timeout_ms / 1000
        self.head = b""
        self.phase = "connect"
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)

    @classmethod
    def start(
        cls,
        loop: asyncio.AbstractEventLoop,
        flight: _InFlight,
        address: Address,
        check: HealthCheck,
        done: Done,
    ) -> None:
        try:
            probe = cls(loop, flight, address, check, done)
        except OSError as failed:  # no socket to be had (out of file descriptors)
            done(address, Result(outcome_of(failed)))
            return
        code = probe.sock.connect_ex((address.host, check.port or address.port))
        if code not in (0, errno.EINPROGRESS):
            probe._end(outcome_of(OSError(code, os.strerror(code))))
            return
        flight.watch(probe)
        if check.mode is HealthMode.HTTP:
            try:
                probe._send()  # connected already, as a backend on this host mostly is
            except BlockingIOError:
                loop.add_writer(probe.sock, probe._connected)
            except OSError as failed:  # refused on the spot: send took the socket's error
                probe._end(outcome_of(failed))
        elif code == 0:
            probe._end(Outcome.CONNECTED)
        else:
            loop.add_writer(probe.sock, probe._connected)

    def _send(self) -> None:
        """Sends the request and waits for the reply; raises what send raised."""
        data = self.flight.request(self.address, self.check)
        if self.sock.send(data) != len(data):  # a fresh socket's buffer takes it all
            raise BlockingIOError
        self.phase = "reply"
        self.loop.add_reader(self.sock, self._readable)

    def _connected(self) -> None:
        self.loop.remove_writer(self.sock)
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._end(outcome_of(OSError(error, os.strerror(error))))
        elif self.check.mode is not HealthMode.HTTP:
            self._end(Outcome.CONNECTED)
        else:
            try:
                self._send()
            except OSError:
                self._end(Outcome.BAD_REPLY)

    def _readable(self) -> None:
        try:
            chunk = self.sock.recv(READ_AT_MOST - len(self.head))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.head += chunk
        if chunk and b"\n" not in self.head and len(self.head) < READ_AT_MOST:
            return
        status = status_of(self.head)
        self._end(Outcome.BAD_REPLY if status is None else Outcome.STATUS, status)

    def timed_out(self) -> None:
        self._end(Outcome.TIMEOUT if self.phase == "connect" else Outcome.NO_REPLY)

    def _end(self, outcome: Outcome, status: int | None = None) -> None:
        if self.phase == "over":
            return
        if self.phase == "connect":
            self.loop.remove_writer(self.sock)
        else:
            self.loop.remove_reader(self.sock)
        self.phase = "over"
        self.sock.close()
        try:
            self.done(self.address, Result(outcome, status, time.monotonic() - self.started))
        except Exception:
            log.exception(
                "recording the probe of %s port %d failed; please report", *self.address[3:]
            )


class _InFlight:
    """The probes under way on one loop, and every SWEEP seconds those past their deadline
    told so: one timer for all of them, where a timer each cost more than the rest of a
    probe's Python. It also keeps the requests made, as a backend gets the same one each
    interval."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._probes: list[_Probe] = []
        self._armed = False
        self.request = functools.lru_cache(maxsize=REQUESTS_KEPT)(request)

    def watch(self, probe: _Probe) -> None:
        self._probes.append(probe)
        if not self._armed:
            self._armed = True
            self._loop.call_later(SWEEP, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        live = []
        for probe in self._probes:
            if probe.phase == "over":
                continue
            if probe.deadline <= now:
                probe.timed_out()
            else:
                live.append(probe)
        self._probes = live
        self._armed = bool(live)
        if live:
            self._loop.call_later(SWEEP, self._sweep)
