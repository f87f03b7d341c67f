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
            loop.call_soon_threadsafe(self._start, address, check, done)

    def _start(self, address: Address, check: HealthCheck, done: Done) -> None:
        asyncio.get_running_loop().create_task(self._probe(address, check, done))

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

    async def _probe(self, address: Address, check: HealthCheck, done: Done) -> None:
        started = time.monotonic()
        result = await self._result(address, check, started + check.timeout_ms / 1000)
        try:
            done(address, result._replace(latency=time.monotonic() - started))
        except Exception:
            log.exception("recording the probe of %s port %d failed; please report", *address[3:])

    async def _result(self, address: Address, check: HealthCheck, deadline: float) -> Result:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await loop.sock_connect(sock, (address.host, check.port or address.port))
            except TimeoutError:
                return Result(Outcome.TIMEOUT)
            except OSError as error:
                return Result(outcome_of(error))
            if check.mode is not HealthMode.HTTP:
                return Result(Outcome.CONNECTED)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    return await self._exchange(loop, sock, request(address, check))
            except TimeoutError:
                return Result(Outcome.NO_REPLY)
            except OSError:
                return Result(Outcome.BAD_REPLY)

    @staticmethod
    async def _exchange(
        loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes
    ) -> Result:
        await loop.sock_sendall(sock, data)
        head = b""
        while b"\n" not in head and len(head) < READ_AT_MOST:
            chunk = await loop.sock_recv(sock, READ_AT_MOST - len(head))
            if not chunk:
                break
            head += chunk
        status = status_of(head)
        return Result(Outcome.BAD_REPLY) if status is None else Result(Outcome.STATUS, status)

    def close(self) -> None:
        """Stops the loop; probes under way are dropped. No probe starts after this."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()
