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
    """Starts its loop's thread at the first probe; `close` stops it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def probe(self, address: Address, check: HealthCheck, done: Done) -> None:
        loop = self._running()
        if loop is not None:
            loop.call_soon_threadsafe(_Probe.start, loop, address, check, done)

    def _running(self) -> asyncio.AbstractEventLoop | None:
        with self._lock:
            if self._loop is None and self._thread is None:
                loop = uvloop.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name="health-probes", daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop

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
    """One probe as callbacks on the loop's file descriptors and one timer: no task, no
    coroutine, since at a thousand probes a second their cost is most of the probe's."""

    __slots__ = ("address", "check", "done", "head", "loop", "phase", "sock", "started", "timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: Address, check: HealthCheck, done: Done
    ) -> None:
        self.loop, self.address, self.check, self.done = loop, address, check, done
        self.started = time.monotonic()
        self.head = b""
        self.phase = "connect"
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.timer = loop.call_later(check.timeout_ms / 1000, self._timeout)

    @classmethod
    def start(
        cls, loop: asyncio.AbstractEventLoop, address: Address, check: HealthCheck, done: Done
    ) -> None:
        try:
            probe = cls(loop, address, check, done)
        except OSError as failed:  # no socket to be had (out of file descriptors)
            done(address, Result(outcome_of(failed)))
            return
        code = probe.sock.connect_ex((address.host, probe.check.port or address.port))
        if code in (0, errno.EINPROGRESS):
            loop.add_writer(probe.sock, probe._connected)
        else:
            probe._end(Result(outcome_of(OSError(code, os.strerror(code)))))

    def _connected(self) -> None:
        self.loop.remove_writer(self.sock)
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._end(Result(outcome_of(OSError(error, os.strerror(error)))))
        elif self.check.mode is not HealthMode.HTTP:
            self._end(Result(Outcome.CONNECTED))
        else:
            self.phase = "reply"
            try:
                data = request(self.address, self.check)
                if self.sock.send(data) != len(data):  # a fresh socket's buffer takes it all
                    raise BlockingIOError
            except OSError:
                self._end(Result(Outcome.BAD_REPLY))
                return
            self.loop.add_reader(self.sock, self._readable)

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
        self._end(Result(Outcome.BAD_REPLY) if status is None else Result(Outcome.STATUS, status))

    def _timeout(self) -> None:
        self._end(Result(Outcome.TIMEOUT if self.phase == "connect" else Outcome.NO_REPLY))

    def _end(self, result: Result) -> None:
        if self.phase == "over":
            return
        if self.phase == "connect":
            self.loop.remove_writer(self.sock)
        else:
            self.loop.remove_reader(self.sock)
        self.phase = "over"
        self.timer.cancel()
        self.sock.close()
        try:
            self.done(self.address, result._replace(latency=time.monotonic() - self.started))
        except Exception:
            log.exception(
                "recording the probe of %s port %d failed; please report", *self.address[3:]
            )
