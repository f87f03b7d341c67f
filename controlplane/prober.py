"""TCP connect probes for the readiness gate (core.readiness): many at once on one asyncio
loop in its own thread, each with its own timeout, so a silent address never holds up the
others. Opening a connection is the whole check: nothing is sent, and it is closed at once."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from controlplane.core.readiness import Address, Outcome

log = logging.getLogger(__name__)

Done = Callable[[Address, Outcome], None]


class Prober(Protocol):
    """What the gatekeeper needs (TcpProber, or a fake in tests)."""

    def probe(self, address: Address, timeout: float, done: Done) -> None:
        """Starts one connect attempt and returns; `done` is called once with its outcome,
        on any thread (possibly before this returns)."""
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


class TcpProber:
    """Starts its loop's thread at the first probe; `close` stops it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def probe(self, address: Address, timeout: float, done: Done) -> None:
        loop = self._running()
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._connect(address, timeout, done), loop)

    def _running(self) -> asyncio.AbstractEventLoop | None:
        with self._lock:
            if self._loop is None and self._thread is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name="readiness-probes", daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop

    async def _connect(self, address: Address, timeout: float, done: Done) -> None:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                connecting = asyncio.get_running_loop().sock_connect(
                    sock, (address.host, address.port)
                )
                await asyncio.wait_for(connecting, timeout)
            outcome = Outcome.CONNECTED
        except TimeoutError:
            outcome = Outcome.TIMEOUT
        except OSError as error:
            outcome = outcome_of(error)
        try:
            done(address, outcome)
        except Exception:
            log.exception("recording the probe of %s port %d failed; please report", *address[3:])

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
