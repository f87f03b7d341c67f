"""The controller's one UDP listener for nginx's traffic reports (issue 17), in its own
thread, feeding the traffic book the API reads (the last minute) and running totals beside it
that the metrics read (counters that only grow).

The thread does not wait on the socket: it sleeps, then reads everything that came (POLL_IDLE,
or POLL_BUSY while much comes). Woken for each datagram, the wake-up and the GIL's hand-over
cost it more than reading the datagram, and each send cost nginx the wake-up too; the figures
are read every half second at most, so a few milliseconds in the socket cost nothing.

Each datagram is taken only from the address of a managed nginx (`allowed`) and only with the
controller's tag in it; what it holds is parsed strictly, by its first bytes: a syslog line
of the reload data plane's access log (core.access_log), or counts that only grow from a Lua
worker of the dynamic one (a decoder given by its prefix, whose vectors go through
core.traffic.Cumulative per nginx address and worker pid). Work per datagram is bounded by
its size, and every datagram is counted by what became of it. Losing one costs a figure,
never routing: nginx sends and forgets.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from controlplane.addresses import SocketAddress
from controlplane.core import access_log
from controlplane.core.traffic import (
    BUCKETS,
    CONNECT_ERRORS,
    COUNTS,
    VECTOR,
    Cumulative,
    Key,
    Summary,
    TrafficBook,
)
from controlplane.errors import ControlPlaneError

log = logging.getLogger(__name__)

Decoded = tuple[str, int, Sequence[tuple[Key, Sequence[int]]]]
Decoder = Callable[[bytes, str], Decoded | None]
"""(datagram, tag) -> (worker pid, seq, [(key, cumulative vector)]), None for anything not
ours."""

RESULTS = ("accepted", "size", "source", "kind", "tag", "invalid", "error")
"""What became of a datagram: fed into the book, or dropped for being too long, from an
address that is no managed nginx's, of no known kind, without the tag, refused by its
parser, or its parser failed (a bug, logged)."""
ACCEPTED, SIZE, SOURCE, KIND, TAG, INVALID, ERROR = range(len(RESULTS))
MAX_DATAGRAM = access_log.MAX_DATAGRAM
RECEIVE_BUFFER = 4 << 20
"""Bytes asked of the kernel (it grants at most twice net.core.rmem_max): room for what comes
between two reads (the Debian default grants 416 KiB, ~500 small datagrams)."""
POLL_IDLE = 0.02
"""Seconds between reads while few datagrams come."""
POLL_BUSY = 0.002
"""Seconds between reads after one that found at least BUSY datagrams."""
BUSY = 32
DRAIN_MAX = 4096
"""Datagrams read at most in one go, so housekeeping and close are never held off."""
MISS_REFRESH = 0.1
"""Seconds: a datagram from an unknown address asks `allowed` again at most this often, so a
new nginx is heard from its first report."""
HOUSEKEEPING = 10.0
"""Seconds between prunes of the book and of the workers no longer heard from."""
SOURCE_TTL = 30.0
"""Seconds after which a worker that sent nothing is forgotten (a reload replaces them all)."""
ERROR_LOG_EVERY = 60.0
TOTALS_TTL = 600.0
"""Seconds a key's running totals are kept after its last report: a backend or service gone
that long is forgotten (its counters leave the metrics), so memory follows what is live."""


class Totals(NamedTuple):
    """One key's counts since it was first reported (or last forgotten): what Prometheus's
    counters need, where the book only holds the last minute."""

    requests: tuple[int, ...]
    """By the upstream's status class, 1xx to 5xx (core.traffic.CLASSES)."""
    connect_errors: int
    buckets: tuple[int, ...]
    """Response times in core.traffic's buckets; a service's only (a backend's: empty)."""


class StatsListener:
    """Bound at construction (the port goes into the config before the first pass); `start`
    starts its thread, `close` stops it. `allowed` returns the managed nginx's addresses; it is
    called from the listener's thread, on a miss at most every MISS_REFRESH seconds and at
    each housekeeping."""

    def __init__(
        self,
        bind: SocketAddress,
        tag: str,
        allowed: Callable[[], Collection[str]],
        decoders: Mapping[bytes, Decoder] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tag = tag
        """What nginx proves its reports with (kept for the next run by wiring)."""
        self._tag_bytes = tag.encode()
        self._allowed_of = allowed
        self._decoders = dict(decoders or {})
        self._clock = clock
        self._lock = threading.Lock()
        self._book = _Book()
        self._cumulative = Cumulative()
        self._heard: dict[str, float] = {}
        self._allowed: Collection[str] = frozenset()
        self._allowed_at = -float("inf")
        self._counts = [0] * len(RESULTS)
        self._error_logged_at = -float("inf")
        self._pending: dict[Key, list[int]] = {}
        """Reload requests read but not yet in the book (the listener's thread's alone)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self._sock.bind((bind.host, bind.port))
        except OSError as error:
            self._sock.close()
            raise ControlPlaneError(
                f"the stats listener could not bind UDP {bind}: {error}; pick a free address "
                "with --stats-bind (port 0: any free port), or turn traffic figures off with "
                "--no-stats"
            ) from error
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]

    def start(self) -> None:
        """Starts the listener's thread; datagrams that came since the bind are read first."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stats-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        housekeeping = self._clock() + HOUSEKEEPING
        while not self._stop.is_set():
            read = self.drain()
            if self._clock() >= housekeeping:
                housekeeping = self._clock() + HOUSEKEEPING
                try:
                    self.housekeep()
                except Exception:
                    log.exception("stats housekeeping failed; please report")
            self._stop.wait(POLL_BUSY if read >= BUSY else POLL_IDLE)

    def drain(self) -> int:
        """Reads what the socket holds (DRAIN_MAX at most) into the book, each key's requests
        added at once; how many datagrams were read."""
        receive, take = self._sock.recvfrom, self._take
        read = 0
        try:
            while read < DRAIN_MAX:
                data, address = receive(MAX_DATAGRAM + 1)  # one more: a longer one is refused
                read += 1
                take(data, str(address[0]))
        except BlockingIOError:
            pass
        except OSError as error:
            if not self._stop.is_set():
                log.warning("the stats listener could not read its socket: %s", error)
        finally:
            self._flush()
        return read

    def received(self, data: bytes, source: str) -> None:
        """One datagram from `source` (an IP), into the book at once. Never raises: a bug
        costs that datagram."""
        self._take(data, source)
        self._flush()

    def _flush(self) -> None:
        """Adds what `_take` tallied, each key's vector once."""
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        with self._lock:
            now = self._clock()
            for key, vector in pending.items():
                self._book.add_vector(key, vector, now)

    def _take(self, data: bytes, source: str) -> None:
        counts = self._counts
        if len(data) > MAX_DATAGRAM:
            counts[SIZE] += 1
            return
        host = _unmapped(source)
        if host not in self._allowed and not self._refresh_for(host):
            counts[SOURCE] += 1
            return
        decoder = None
        if not data.startswith(access_log.PREFIX):
            decoder = next((d for p, d in self._decoders.items() if data.startswith(p)), None)
            if decoder is None:
                counts[KIND] += 1
                return
        if self._tag_bytes not in data:
            counts[TAG] += 1
            return
        try:
            fed = self._feed(data, host, decoder)
        except Exception:
            counts[ERROR] += 1
            now = self._clock()
            if now - self._error_logged_at >= ERROR_LOG_EVERY:
                self._error_logged_at = now
                log.exception("a stats datagram from %s could not be read; please report", host)
            return
        counts[ACCEPTED if fed else INVALID] += 1

    def _feed(self, data: bytes, host: str, decoder: Decoder | None) -> bool:
        if decoder is None:
            request = access_log.parse(data, self.tag)
            if request is None:
                return False
            access_log.tally(self._pending, request)
            return True
        decoded = decoder(data, self.tag)
        if decoded is None:
            return False
        pid, seq, entries = decoded
        if not all(_counts(vector) for _, vector in entries):
            return False
        source = f"{host}/{pid}"
        with self._lock:
            now = self._clock()
            self._heard[source] = now
            for key, added in self._cumulative.report(source, seq, entries, now):
                self._book.add_vector(key, added, now)
        return True

    def _refresh_for(self, host: str) -> bool:
        """Asks `allowed` again if it was not asked just now; whether `host` is in it."""
        if self._clock() - self._allowed_at < MISS_REFRESH:
            return False
        self._refresh()
        return host in self._allowed

    def _refresh(self) -> None:
        self._allowed_at = self._clock()
        try:
            self._allowed = frozenset(map(_unmapped, self._allowed_of()))
        except Exception:
            log.exception("could not tell which nginx may send stats; keeping the last answer")

    def housekeep(self) -> None:
        """Asks `allowed` again, forgets the workers not heard from in SOURCE_TTL, the keys
        with nothing in the last minute and the totals of those with nothing in TOTALS_TTL:
        memory stays bounded as nginx reload and services go. Every HOUSEKEEPING seconds on
        the listener's thread."""
        self._refresh()
        with self._lock:
            now = self._clock()
            self._book.prune(now)
            self._book.prune_totals(now - TOTALS_TTL)
            self._heard = {s: t for s, t in self._heard.items() if t > now - SOURCE_TTL}
            self._cumulative.forget(self._heard)

    def retain(self, known: Iterable[Key]) -> None:
        """Takes only these keys from now on (the current model's: each backend's address as
        nginx names it, each service's ""), and for a minute those that left it."""
        with self._lock:
            self._book.retain(known, self._clock())

    def refused(self) -> dict[str, int]:
        """Key reports the book refused since the start (core.traffic.REFUSALS)."""
        with self._lock:
            return self._book.refused()

    def summary(self, key: Key, now: float | None = None) -> Summary | None:
        """The key's last minute (None: nothing reported in it); `now` on the listener's clock."""
        with self._lock:
            return self._book.summary(key, self._clock() if now is None else now)

    def summaries(self, keys: Iterable[Key], now: float | None = None) -> dict[Key, Summary]:
        """Several keys at once, under one lock; keys with nothing in the last minute are
        left out."""
        with self._lock:
            at = self._clock() if now is None else now
            found = {key: self._book.summary(key, at) for key in keys}
        return {key: summary for key, summary in found.items() if summary is not None}

    def totals(self) -> dict[Key, Totals]:
        """Every key's running totals, under one lock (read at each scrape of the metrics)."""
        with self._lock:
            return self._book.totals()

    def datagrams(self) -> dict[str, int]:
        """Datagrams since the start, by what became of them (RESULTS)."""
        return dict(zip(RESULTS, self._counts, strict=True))

    def close(self) -> None:
        """Stops the thread and closes the socket; idempotent."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=5)
        self._sock.close()


@dataclass(slots=True)
class _Total:
    counts: list[int]
    """Requests by status class, then connect errors."""
    buckets: list[int] | None
    """A service's response times; None for a backend."""
    last: float


class _Book(TrafficBook):
    """The traffic book, with a running total per key beside its last minute: fed by the same
    calls (access_log.tally, the Lua counts), so the metrics count what the API shows."""

    def __init__(self) -> None:
        super().__init__()
        self._totals: dict[Key, _Total] = {}

    def _total(self, key: Key, now: float) -> _Total:
        total = self._totals.get(key)
        if total is None:
            buckets = [0] * BUCKETS if key.backend == "" else None
            total = self._totals[key] = _Total([0] * (CONNECT_ERRORS + 1), buckets, now)
        total.last = now
        return total

    def add_vector(self, key: Key, vector: Sequence[int], now: float) -> None:
        taken = self.admits(key)
        super().add_vector(key, vector, now)
        if not taken:
            return
        total = self._total(key, now)
        counts = total.counts
        for i in range(CONNECT_ERRORS + 1):
            counts[i] += vector[i]
        if total.buckets is not None:
            buckets = total.buckets
            for i in range(BUCKETS):
                buckets[i] += vector[COUNTS + i]

    def prune_totals(self, before: float) -> None:
        """Forgets the totals of the keys nothing was reported for since `before`."""
        self._totals = {k: t for k, t in self._totals.items() if t.last > before}

    def totals(self) -> dict[Key, Totals]:
        return {
            key: Totals(
                tuple(t.counts[:CONNECT_ERRORS]),
                t.counts[CONNECT_ERRORS],
                tuple(t.buckets) if t.buckets is not None else (),
            )
            for key, t in self._totals.items()
        }


def _unmapped(address: str) -> str:
    """An IPv4 address as itself, also when a dual-stack socket gives it as ::ffff:a.b.c.d."""
    if address.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(address).ipv4_mapped
        except ValueError:
            return address
        return str(mapped) if mapped is not None else address
    return address


def _counts(vector: Sequence[int]) -> bool:
    return len(vector) == VECTOR and all(isinstance(n, int) and n >= 0 for n in vector)
