"""A bounded HTTP load through nginx that records every response, for zero-failure checks.

Bounded by both a request count and a time limit, and stops by itself. Each request uses a
new connection (like a client that retries an idempotent request when a reload closes its
kept-alive connection), so a failure here is a failure a user would have seen.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import httpx


@dataclass(frozen=True)
class Response:
    started: float
    finished: float
    status: int | None
    body: str


@dataclass
class Load:
    port: int
    host: str
    workers: int = 2
    max_seconds: float = 60.0
    max_requests: int = 50_000
    path: str = "/"
    address: str = "127.0.0.1"
    """nginx's address: a published loopback port, or its own address on a network."""
    responses: list[Response] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)
        ]

    def __enter__(self) -> Load:
        self._deadline = time.monotonic() + self.max_seconds
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _work(self) -> None:
        url = f"http://{self.address}:{self.port}{self.path}"
        with httpx.Client(
            timeout=10.0, headers={"Host": self.host, "Connection": "close"}
        ) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                with self._lock:
                    if len(self.responses) >= self.max_requests:
                        return
                started = time.monotonic()
                try:
                    reply = client.get(url)
                    response = Response(
                        started, time.monotonic(), reply.status_code, reply.text.strip()
                    )
                except httpx.HTTPError as error:
                    response = Response(started, time.monotonic(), None, type(error).__name__)
                with self._lock:
                    self.responses.append(response)

    @property
    def failures(self) -> list[Response]:
        return [r for r in self.responses if r.status != 200]

    def by_backend(self) -> Counter[str]:
        return Counter(r.body for r in self.responses if r.status == 200)

    def last_from(self, backend: str) -> float | None:
        """When the last request that `backend` answered was sent."""
        times = [r.started for r in self.responses if r.status == 200 and r.body == backend]
        return max(times) if times else None
