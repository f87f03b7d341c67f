"""Traffic figures per service and per backend over the last minute, from what nginx reports
(issue 17): requests by status class, connect errors, bytes, and the upstream response time's
percentiles. Pure: time comes in as a number, and memory is bounded whatever the traffic.

Each key (a service, or a service's backend address) keeps a ring of one-second counts for a
minute, and a ring of response-time histograms in ten-second slots: a figure never holds a
sample, so a million requests cost what ten do. A histogram bucket spans a factor of sqrt(2),
so a percentile is given as its bucket's geometric middle: within 19% of the true value.

Reports come in two forms, one per data plane: one try or request at a time (the reload
data plane's access log lines), or counts that only grow, per nginx (the Lua balancer's
counters, sent every second): `Cumulative` turns those into what was added since the last.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

WINDOW = 60
"""Seconds of counts kept."""
SLOT = 10
"""Seconds per histogram slot."""
SLOTS = WINDOW // SLOT
BASE = 0.0005
"""Seconds: the top of bucket 0 (anything faster lands there)."""
BUCKETS = 33
"""Bucket i holds times in (BASE x 2^((i-1)/2), BASE x 2^(i/2)]; the last, everything over
BASE x 2^16 (about 33 s)."""

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
CONNECT_ERRORS, BYTES_SENT, BYTES_RECEIVED = 5, 6, 7
COUNTS = 8
"""A count vector: requests per status class (1xx-5xx), connect errors, bytes sent to
clients, bytes received from them; then, in a report, BUCKETS response-time buckets."""
VECTOR = COUNTS + BUCKETS


def bucket(seconds: float) -> int:
    """The histogram bucket of a response time (the Lua balancer computes the same)."""
    if seconds <= BASE:
        return 0
    return min(BUCKETS - 1, math.ceil(2 * math.log2(seconds / BASE) - 1e-9))


def middle(index: int) -> float:
    """A bucket's geometric middle, in seconds: what a percentile in it is reported as."""
    if index == 0:
        return BASE
    return BASE * 2 ** ((index - 0.5) / 2)


class Key(NamedTuple):
    service: str
    backend: str
    """The backend's address as nginx names it (IP:port, [IPv6]:port); "" for the whole
    service (each request counted once, however many tries it took)."""


def status_class(status: int) -> int | None:
    """The index of a status's class in a count vector, None for no status."""
    return status // 100 - 1 if 100 <= status <= 599 else None


@dataclass
class _Ring:
    """One key's last minute."""

    seconds: list[int]
    """The second each count slot holds (-1: empty)."""
    counts: list[list[int]]
    slots: list[int]
    """The ten-second slot each histogram holds (-1: empty)."""
    histograms: list[list[int]]
    last: int
    """The last second a report touched it."""

    @classmethod
    def empty(cls) -> _Ring:
        return cls(
            [-1] * WINDOW,
            [[0] * COUNTS for _ in range(WINDOW)],
            [-1] * SLOTS,
            [[0] * BUCKETS for _ in range(SLOTS)],
            -1,
        )

    def at(self, second: int) -> tuple[list[int], list[int]]:
        """The count and histogram slots for `second`, emptied if they held an older one."""
        i = second % WINDOW
        if self.seconds[i] != second:
            self.seconds[i] = second
            self.counts[i] = [0] * COUNTS
        slot = second // SLOT
        j = slot % SLOTS
        if self.slots[j] != slot:
            self.slots[j] = slot
            self.histograms[j] = [0] * BUCKETS
        self.last = max(self.last, second)
        return self.counts[i], self.histograms[j]


class Summary(NamedTuple):
    """One key's figures, in the API's terms."""

    rps_10s: float
    rps_1m: float
    requests: Mapping[str, int]
    connect_errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    bytes_sent: int
    bytes_received: int
    per_second: tuple[int, ...]
    """Requests in each of the last 60 seconds, oldest first."""


MAX_KEYS = 4096
"""Keys a book holds at most (about 16 KB each when every second of the minute has counts): a
report for one more is refused, and counted."""
REFUSALS = ("unknown", "full")
"""Why a report was refused: its key is of no service or backend the model has (or had in
the last minute), or the book holds MAX_KEYS already."""


class TrafficBook:
    """Every key's last minute. Owned by one thread at a time (the stats listener adds, the
    API reads under the caller's lock).

    Any string in a report (a service, an address) would make a key, so the book takes only
    the keys of the current model once it is given them (`retain`, at each new snapshot), and
    never more than `max_keys`; what it refuses is counted (`refused`). A key that left the
    model stays a minute, taking reports the while (an old worker's last counts), so its last
    figures stay visible; then it goes."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._rings: dict[Key, _Ring] = {}
        self._max_keys = max_keys
        self._known: frozenset[Key] | None = None
        """The model's keys; None: none given yet, every key is taken (within the cap)."""
        self._left: dict[Key, float] = {}
        """Keys no longer in the model, and when they left it."""
        self._refused = dict.fromkeys(REFUSALS, 0)

    def __len__(self) -> int:
        return len(self._rings)

    def retain(self, known: Iterable[Key], now: float) -> None:
        """From now on, only these keys (the model's), and for a minute those that left."""
        keep = frozenset(known)
        before = self._known if self._known is not None else frozenset(self._rings)
        for key in before | self._rings.keys():
            if key not in keep:
                self._left.setdefault(key, now)
        self._left = {k: at for k, at in self._left.items() if k not in keep}
        self._known = keep

    def admits(self, key: Key) -> bool:
        """Whether a report for `key` would be taken (nothing counted)."""
        return self._why_not(key) is None

    def refused(self) -> dict[str, int]:
        """Reports refused since the start, by REFUSALS."""
        return dict(self._refused)

    def _why_not(self, key: Key) -> str | None:
        if self._known is not None and key not in self._known and key not in self._left:
            return "unknown"
        if key not in self._rings and len(self._rings) >= self._max_keys:
            return "full"
        return None

    def _ring(self, key: Key) -> _Ring | None:
        """The key's ring, made if new; None (counted) when the book refuses the key."""
        ring = self._rings.get(key)
        if ring is not None and (self._known is None or key in self._known):
            return ring
        why = self._why_not(key)
        if why is not None:
            self._refused[why] += 1
            return None
        if ring is None:
            ring = self._rings[key] = _Ring.empty()
        return ring

    def add(
        self,
        key: Key,
        status: int | None,
        seconds: float | None,
        now: float,
        connect_error: bool = False,
        sent: int = 0,
        received: int = 0,
    ) -> None:
        """One try at a backend, or one request to a service (unless refused: counted)."""
        ring = self._ring(key)
        if ring is None:
            return
        counts, histogram = ring.at(int(now))
        kind = None if status is None else status_class(status)
        if kind is not None:
            counts[kind] += 1
        if connect_error:
            counts[CONNECT_ERRORS] += 1
        counts[BYTES_SENT] += sent
        counts[BYTES_RECEIVED] += received
        if seconds is not None and kind is not None:
            histogram[bucket(seconds)] += 1

    def add_vector(self, key: Key, vector: Sequence[int], now: float) -> None:
        """Counts added since the last report (a VECTOR: counts, then buckets), unless
        refused (counted)."""
        ring = self._ring(key)
        if ring is None:
            return
        counts, histogram = ring.at(int(now))
        for i in range(COUNTS):
            counts[i] += vector[i]
        for i in range(BUCKETS):
            histogram[i] += vector[COUNTS + i]

    def summary(self, key: Key, now: float) -> Summary | None:
        """The key's last minute (None: nothing reported in it)."""
        ring = self._rings.get(key)
        second = int(now)
        if ring is None or ring.last <= second - WINDOW:
            return None
        per_second = []
        totals = [0] * COUNTS
        recent = 0
        for s in range(second - WINDOW + 1, second + 1):
            i = s % WINDOW
            if ring.seconds[i] != s:
                per_second.append(0)
                continue
            counts = ring.counts[i]
            requests = sum(counts[:CONNECT_ERRORS])
            per_second.append(requests)
            if s > second - 10:
                recent += requests
            for k in range(COUNTS):
                totals[k] += counts[k]
        slot = second // SLOT
        histogram = [0] * BUCKETS
        for j, held in enumerate(ring.slots):
            if slot - SLOTS < held <= slot:
                for k, n in enumerate(ring.histograms[j]):
                    histogram[k] += n
        p50, p95, p99 = percentiles(histogram, (0.5, 0.95, 0.99))
        return Summary(
            rps_10s=recent / 10,
            rps_1m=sum(per_second) / WINDOW,
            requests=dict(zip(CLASSES, totals[:CONNECT_ERRORS], strict=True)),
            connect_errors=totals[CONNECT_ERRORS],
            p50_ms=None if p50 is None else p50 * 1000,
            p95_ms=None if p95 is None else p95 * 1000,
            p99_ms=None if p99 is None else p99 * 1000,
            bytes_sent=totals[BYTES_SENT],
            bytes_received=totals[BYTES_RECEIVED],
            per_second=tuple(per_second),
        )

    def prune(self, now: float) -> None:
        """Forgets the keys nothing was reported for in the last minute, and those that left
        the model a minute ago or more."""
        oldest = int(now) - WINDOW
        self._left = {k: at for k, at in self._left.items() if at > now - WINDOW}
        known, left = self._known, self._left
        self._rings = {
            k: r
            for k, r in self._rings.items()
            if r.last > oldest and (known is None or k in known or k in left)
        }


def percentiles(histogram: Sequence[int], qs: Iterable[float]) -> list[float | None]:
    """Each quantile of the histogram, as its bucket's middle (None: it is empty)."""
    total = sum(histogram)
    found: list[float | None] = []
    for q in qs:
        if total == 0:
            found.append(None)
            continue
        rank, seen = q * total, 0
        for index, n in enumerate(histogram):
            seen += n
            if seen >= rank:
                found.append(middle(index))
                break
    return found


WARMUP = 12.0
"""Seconds after a source is first heard in which a key it reports for the first time may
hold counts from before: a Lua worker sends only the keys that changed, and every key each
tenth send (one a second), so a key idle when the controller started comes within this."""
REORDER = 64
"""Datagrams: a sequence number this far below the highest heard from a source is no late
datagram but a new worker that took the same pid (its sequence starts at 1 again)."""


@dataclass
class _Source:
    """What one source (a Lua worker: "<nginx ip>/<pid>") last reported."""

    whole: bool
    """Heard from its first datagram: every count it holds was made while we listened."""
    since: float
    """When it was first heard."""
    top: int
    """The highest sequence number heard from it."""
    keys: dict[Key, tuple[int, tuple[int, ...]]]
    """Each key's last sequence number and vector."""


class Cumulative:
    """Turns counts that only grow (each Lua worker's, cumulative since it started) into what
    was added since its last report, as Prometheus reads counters: a controller that starts
    does not know what a worker counted before, so its first report of each key is a
    baseline that adds nothing, unless the worker was heard from its first datagram (seq 1).
    A count that went down is a reset (the worker forgot a key idle for ten minutes and made
    it again from zero): a new baseline whose counts are all new. A report whose sequence
    number is not above the last one for that key (a duplicate, a late datagram) adds
    nothing: what it holds is in the newer one."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._max_keys = max_keys
        """Keys kept per source at most: one reporting any string it likes stays bounded."""
        self._sources: dict[str, _Source] = {}
        self._last: dict[tuple[str, Key], tuple[int, ...]] = {}

    def report(
        self,
        source: str,
        seq: int,
        entries: Iterable[tuple[Key, Sequence[int]]],
        now: float,
    ) -> list[tuple[Key, list[int]]]:
        """One datagram's keys (cumulative VECTORs): what each added, keys that added nothing
        (or whose vector is not VECTOR long) left out."""
        state = self._sources.get(source)
        if state is None or seq < state.top - REORDER:
            state = self._sources[source] = _Source(seq == 1, now, seq, {})
        state.top = max(state.top, seq)
        counted = state.whole or now - state.since >= WARMUP
        found: list[tuple[Key, list[int]]] = []
        for key, vector in entries:
            if len(vector) != VECTOR:
                continue
            values = tuple(vector)
            last = state.keys.get(key)
            if last is not None and seq <= last[0]:
                continue
            if last is None and len(state.keys) >= self._max_keys:
                continue
            state.keys[key] = (seq, values)
            if last is None:
                added = list(values) if counted else []
            elif any(n < b for n, b in zip(values, last[1], strict=True)):
                added = list(values)
            else:
                added = [n - b for n, b in zip(values, last[1], strict=True)]
            if any(added):
                found.append((key, added))
        return found

    def delta(self, source: str, key: Key, vector: Sequence[int]) -> list[int] | None:
        """The per-key form the stats listener takes today: what was added, None when
        nothing was (or the vector is not VECTOR long). It has no sequence numbers, nor the
        datagram a key came in, so a source's first report counts whole: `report` is the
        form that does not."""
        if len(vector) != VECTOR:
            return None
        now = tuple(vector)
        before = self._last.get((source, key))
        self._last[source, key] = now
        if before is None or any(n < b for n, b in zip(now, before, strict=True)):
            added = list(now)
        else:
            added = [n - b for n, b in zip(now, before, strict=True)]
        return added if any(added) else None

    def forget(self, sources: Iterable[str]) -> None:
        """Keeps only these sources (the workers still heard from)."""
        keep = set(sources)
        self._sources = {s: state for s, state in self._sources.items() if s in keep}
        self._last = {k: v for k, v in self._last.items() if k[0] in keep}
