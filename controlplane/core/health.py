"""Health: a backend gets traffic only once it passes its service's check, and, where the
check is active, only while it keeps passing.

"Running" is not "ready": a container starts before its server listens, and a server that
listened may start failing. So the controller checks each backend's address itself and holds
it out of nginx and DNS while it does not pass. This module is the policy, pure: time and the
jitter's random draw come in as numbers, probe results come in as data, decisions come out as
data; the probing is an edge (controlplane.gatekeeper, controlplane.prober).

- A backend is tracked by container, start time, network, address and port, so a restart,
  an unpause (a paused backend is not tracked) or a reconnect makes it new again. Every
  service is tracked but those whose check is `none`.
- A newcomer is PENDING: probed at once, then every `interval` (jittered by +-`jitter`),
  until its first passing probe makes it READY (as Docker's HEALTHCHECK counts one success in
  its start period), or until its service's start period has passed since it appeared: then
  it GAVE_UP and stays out until its container restarts, or, where the check is active, it
  is DOWN.
- With an active check (core.model.HealthCheck) a READY backend is probed every check
  interval from its last due time, so the gap between two probes never exceeds it: `fails`
  failures in a row make it DOWN (out), and a DOWN one is probed on until `passes` successes
  in a row make it READY again. A probe that gets no answer on a network the controller
  cannot reach is no failure: nothing is known.
- What the controller's first pass finds is INCUMBENT: an nginx may already send it traffic,
  so it stays served while it is probed, and a controller restart causes no outage. A pass
  makes it READY; a refusal before any pass makes it PENDING (out: its port is closed); any
  other failing answer makes it DOWN (the last controller may have had it out: it stays out
  until it passes `passes` times); if no probe gets an answer for its start period, it is
  READY (nothing said it was not).
- A network is reachable once a probe on it was answered (anything but silence). It is
  unreachable after "network unreachable", or while no probe on it was ever answered and the
  ones sent for `silence` seconds got none (timeouts, "host unreachable"): a remote engine, or
  a controller not attached to it. There the gate is open: its backends are READY once probed
  (Docker's own health check still applies), and a warning says why; an answer later makes
  the network reachable again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from controlplane.core.model import (
    Backend,
    BackendState,
    HealthCheck,
    HealthMode,
    Service,
    Topology,
)


class Address(NamedTuple):
    """One backend to probe; a new start, network, address or port is a new key."""

    container_id: str
    started_at: str
    network: str
    host: str
    port: int


class Outcome(StrEnum):
    """What one probe said."""

    CONNECTED = "connected"
    """The port accepted a connection (a tcp check's pass)."""
    STATUS = "answered"
    """An HTTP status line came back: it passes if the status is in the check's range."""
    REFUSED = "refused"
    NO_REPLY = "no reply"
    """Connected, but no status line came back within the timeout."""
    BAD_REPLY = "not HTTP"
    """Connected, and what came back was no HTTP status line (or the connection closed)."""
    TIMEOUT = "no answer"
    """The connect itself timed out."""
    HOST_UNREACHABLE = "host unreachable"
    NETWORK_UNREACHABLE = "network unreachable"
    FAILED = "failed"
    """Any other error of the connect: counted as no answer."""


ANSWERS = frozenset(
    {Outcome.CONNECTED, Outcome.STATUS, Outcome.REFUSED, Outcome.NO_REPLY, Outcome.BAD_REPLY}
)
"""Outcomes that prove the controller reaches the network."""


class Result(NamedTuple):
    """One probe's result, as the prober measured it."""

    outcome: Outcome
    status: int | None = None
    """The HTTP status, for STATUS."""
    latency: float = 0.0
    """Seconds from the connect to the result."""


def passed(check: HealthCheck, result: Result) -> bool:
    if check.mode is HealthMode.HTTP:
        low, high = check.status
        return result.outcome is Outcome.STATUS and low <= (result.status or 0) <= high
    return result.outcome is Outcome.CONNECTED


def said(result: Result) -> str:
    """A result in an operator's words."""
    if result.outcome is Outcome.STATUS:
        return f"status {result.status}"
    return result.outcome.value


class Phase(StrEnum):
    PENDING = "pending"
    """Out; probed until it passes or its start period is over."""
    INCUMBENT = "incumbent"
    """Found by the first pass: served while it is probed."""
    READY = "ready"
    DOWN = "down"
    """Out: failed its active check `fails` times in a row; probed until it passes `passes`
    times in a row."""
    GAVE_UP = "gave up"
    """Out until its container restarts (no active check)."""


STARTING = frozenset({Phase.PENDING, Phase.INCUMBENT})
SERVED = frozenset({Phase.INCUMBENT, Phase.READY})
CHECKED = frozenset({Phase.READY, Phase.DOWN})
"""Phases probed only where the check is active."""


@dataclass(frozen=True)
class ReadinessPolicy:
    """How newcomers are probed (an active check's own interval takes over once they pass)."""

    interval: float = 0.05
    """Seconds between two probes of a backend that did not pass yet."""
    jitter: float = 0.2
    """Each interval is drawn from interval x (1 +- jitter), so that backends started
    together are not probed in lockstep; an active check's first interval is shortened by
    up to this share, for the same reason."""
    silence: float = 2.0
    """Seconds of unanswered probes after which a network never answered counts as
    unreachable."""
    concurrency: int = 256
    """Probes in flight at most."""


class Track(NamedTuple):
    """One tracked backend. A tuple, not a frozen dataclass: a thousand backends checked
    every second make a thousand new ones a second, and a tuple's `_replace` is several
    times cheaper."""

    phase: Phase
    appeared: float
    """When it was first seen: its start period counts from here."""
    since: float
    """When its phase began."""
    check: HealthCheck
    next_at: float = -math.inf
    """When its next probe is due (math.inf: none is)."""
    probing: bool = False
    """A probe of it is in flight."""
    probes: int = 0
    last: Result | None = None
    last_at: float | None = None
    fails: int = 0
    """Failures in a row."""
    passes: int = 0
    """Passes in a row."""
    why: str = ""
    """What took it out, for a DOWN one."""


@dataclass(frozen=True)
class Reach:
    """What the probes said about one network."""

    answered: bool = False
    silent_since: float | None = None
    """When the first probe was sent that got no answer, while none was ever answered."""
    unreachable: str | None = None
    """Why the controller counts it as unreachable (None: it does not)."""


@dataclass(frozen=True)
class Readiness:
    """Every tracked backend and what is known of each network; each change returns a new
    value."""

    tracks: Mapping[Address, Track] = field(default_factory=dict)
    networks: Mapping[str, Reach] = field(default_factory=dict)

    def reach(self, network: str) -> Reach:
        return self.networks.get(network, Reach())

    def served(self, address: Address) -> bool:
        """Whether the gate lets this backend have traffic."""
        track = self.tracks.get(address)
        return track is None or _served(track, self.reach(address.network))


_NO_REACH = Reach()
_ANSWERED = Reach(answered=True)


class Candidate(NamedTuple):
    address: Address
    check: HealthCheck


def address(backend: Backend) -> Address:
    return Address(
        backend.container_id,
        backend.started_at,
        backend.network,
        backend.ip or backend.ipv6,
        backend.port,
    )


def service_candidates(service: Service) -> tuple[Candidate, ...]:
    """The backends the gate tracks in one service: unless its check is `none`, every one
    that would be served but for the gate (so not paused, draining or stopping: one is new
    again, probed at once, when it comes back; and not while Docker's own health check says
    starting: its start period counts from when that passes)."""
    if service.health.mode is HealthMode.NONE:
        return ()
    return tuple(
        Candidate(address(b), service.health)
        for b in service.backends
        if b.state is BackendState.UP
    )


class CandidateMemo:
    """Each service's candidates from the last pass, found by the Service's identity: the
    builder hands over the very same Service for an unchanged one, so a pass over thousands of
    backends where nothing changed costs one lookup per service. Owned by its user (the
    gatekeeper); it keeps only the last pass's services."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Service, tuple[Candidate, ...]]] = {}

    def candidates(self, topology: Topology) -> tuple[list[Candidate], bool]:
        """Every candidate, and whether they are the last pass's (every service unchanged)."""
        entries = {}
        same = len(topology.services) == len(self._entries)
        for service in topology.services:
            entry = self._entries.get(id(service))
            if entry is None:
                entry, same = (service, service_candidates(service)), False
            entries[id(service)] = entry
        self._entries = entries
        return [c for _, found in entries.values() for c in found], same


def observe(readiness: Readiness, found: Iterable[Candidate], now: float, first: bool) -> Readiness:
    """Track what a pass found: newcomers are PENDING (INCUMBENT in the controller's first
    pass), due for a probe at once; what it did not find is forgotten; a changed check
    applies at once (one no longer active lets its DOWN backends back in). A backend in two
    services takes the first one's check."""
    tracks: dict[Address, Track] = {}
    for key, check in found:
        if key in tracks:
            continue
        track = readiness.tracks.get(key)
        if track is None:
            phase = Phase.INCUMBENT if first else Phase.PENDING
            track = Track(phase, now, now, check, next_at=now)
        elif track.check != check:
            track = _rechecked(track, check, now)
        tracks[key] = track
    # what is known of a network is kept while a backend on it is tracked, no longer: a
    # network made again under its name, or left by the controller, is judged afresh
    watched = {key.network for key in tracks}
    networks = {name: reach for name, reach in readiness.networks.items() if name in watched}
    return replace(readiness, tracks=tracks, networks=networks)


def _rechecked(track: Track, check: HealthCheck, now: float) -> Track:
    """A probe in flight ran the old check: its answer will be dropped (record_many), so the
    new check is probed at once rather than after it."""
    track = track._replace(check=check, fails=0, passes=0)
    if track.probing:
        track = track._replace(probing=False, next_at=now)
    if track.phase in STARTING:
        return track
    if not check.active:
        phase = Phase.READY if track.phase is Phase.DOWN else track.phase
        return track._replace(phase=phase, since=now, next_at=math.inf, why="")
    if track.phase is Phase.GAVE_UP:  # an active check goes on checking it: it may come back
        why = "checked again: a new active check"
        return track._replace(phase=Phase.DOWN, since=now, next_at=now, why=why)
    return track._replace(next_at=now)


def due(
    readiness: Readiness, now: float, policy: ReadinessPolicy
) -> tuple[Readiness, list[tuple[Address, HealthCheck]]]:
    """The probes to send now (marked in flight), oldest due first, within the concurrency,
    each with the check to run."""
    in_flight = 0
    waiting = []
    for key, t in readiness.tracks.items():
        if t.probing:
            in_flight += 1
        elif t.next_at <= now and (t.phase in STARTING or (t.check.active and t.phase in CHECKED)):
            waiting.append((t.next_at, key))
    room = policy.concurrency - in_flight
    if not waiting or room <= 0:
        return readiness, []
    chosen = [key for _, key in sorted(waiting)[:room]]
    tracks = dict(readiness.tracks)
    for key in chosen:
        tracks[key] = tracks[key]._replace(probing=True)
    return replace(readiness, tracks=tracks), [(key, tracks[key].check) for key in chosen]


def record(
    readiness: Readiness,
    key: Address,
    check: HealthCheck,
    result: Result,
    sent: float,
    now: float,
    draw: float,
    policy: ReadinessPolicy,
) -> tuple[Readiness, bool]:
    """A probe of `check` sent at `sent` said `result` at `now`; `draw` (uniform in [0, 1))
    places the next probe within the jitter. Also True when the gate's answer changed: a pass
    is due."""
    return record_many(readiness, [(key, result, sent, draw, check)], now, policy)


Answer = tuple[Address, Result, float, float, HealthCheck]
"""A probe's key, its result, when it was sent, the jitter's draw for the next, and the check
it ran: an answer to a check that changed since (the API, the labels) neither passes nor
fails, as it may not be judged by the new one (a tcp connect is no passing GET /health)."""


def record_many(
    readiness: Readiness, answers: Iterable[Answer], now: float, policy: ReadinessPolicy
) -> tuple[Readiness, bool]:
    """`record` for many answers at once, at the cost of one: a thousand backends checked
    every second answer a few at a time between two rounds of the gatekeeper."""
    tracks = dict(readiness.tracks)
    networks = dict(readiness.networks)
    changed = False
    for key, result, sent, draw, check in answers:
        was = networks.get(key.network, _NO_REACH)
        reach = _reach(was, result.outcome, sent, now, policy)
        if reach is not was:
            networks[key.network] = reach
        if reach.unreachable != was.unreachable:
            changed = True
            if was.unreachable is None:
                tracks = _opened(tracks, key.network, now)
        track = tracks.get(key)
        if track is None or not judged(track, check):
            continue
        blind = reach.unreachable is not None and result.outcome not in ANSWERS
        after = _probed(track, result, now, draw, policy, blind)
        tracks[key] = after
        if after.phase is not track.phase:
            changed = changed or _served(track, was) != _served(after, reach)
    return Readiness(tracks, networks), changed


def judged(track: Track, check: HealthCheck) -> bool:
    """Whether an answer to a probe of `check` counts for `track`: its check is the same."""
    return track.check is check or track.check == check


def _served(track: Track, reach: Reach) -> bool:
    """Readiness.served, for one track and its network's reach."""
    return track.phase in SERVED or (
        track.phase is not Phase.GAVE_UP and reach.unreachable is not None
    )


def _reach(was: Reach, outcome: Outcome, sent: float, now: float, policy: ReadinessPolicy) -> Reach:
    if outcome in ANSWERS:
        return _ANSWERED
    if outcome is Outcome.NETWORK_UNREACHABLE:
        return Reach(was.answered, was.silent_since, "the controller has no route to it")
    if was.answered or was.unreachable is not None:
        return was
    silent_since = sent if was.silent_since is None else was.silent_since
    if now - silent_since >= policy.silence:
        return Reach(
            False, silent_since, f"no probe on it got an answer for {now - silent_since:.1f} s"
        )
    return Reach(False, silent_since)


def _opened(tracks: dict[Address, Track], network: str, now: float) -> dict[Address, Track]:
    """The network turned unreachable: its backends held out are let in (GAVE_UP ones
    excepted: their start period is over)."""
    return {
        key: _ready(t, now) if key.network == network and t.phase in (*STARTING, Phase.DOWN) else t
        for key, t in tracks.items()
    }


def _ready(track: Track, now: float, draw: float = 1.0, jitter: float = 0.0) -> Track:
    """In: probed on every check interval if the check is active, the first one shortened by
    up to `jitter` of it (by `draw`) so backends let in together spread out."""
    interval = track.check.interval_ms / 1000
    next_at = now + interval * (1 - jitter * draw) if track.check.active else math.inf
    return track._replace(phase=Phase.READY, since=now, next_at=next_at, fails=0, why="")


def _probed(
    track: Track, result: Result, now: float, draw: float, policy: ReadinessPolicy, blind: bool
) -> Track:
    """`blind`: the probe got no answer on a network the controller cannot reach."""
    ok = passed(track.check, result)
    fails = 0 if ok or blind else track.fails + 1
    passes = track.passes + 1 if ok else 0
    steady = track.phase in CHECKED and track.check.active
    probed = track._replace(
        probing=False,
        probes=track.probes + 1,
        last=result,
        last_at=now,
        fails=fails,
        passes=passes,
        # an active check's next probe: one interval after this one was due (or now)
        next_at=max(track.next_at + track.check.interval_ms / 1000, now)
        if steady
        else track.next_at,
    )
    if steady:
        return _counted(probed, result, now)
    if track.phase not in STARTING:  # not probed (no active check): only recorded
        return probed
    if ok or blind:
        return _ready(probed, now, draw, policy.jitter)
    spread = policy.interval * policy.jitter * (2 * draw - 1)
    probed = probed._replace(next_at=now + policy.interval + spread)
    if track.phase is Phase.INCUMBENT and result.outcome is Outcome.REFUSED:
        return probed._replace(phase=Phase.PENDING, since=now, fails=0)
    if track.phase is Phase.INCUMBENT and result.outcome in ANSWERS:
        # what the last controller made of it is not known: out until it passes again
        why = f"failed its first check since the controller started (last: {said(result)})"
        interval = track.check.interval_ms / 1000
        return probed._replace(phase=Phase.DOWN, since=now, next_at=now + interval, why=why)
    return probed


def _counted(track: Track, result: Result, now: float) -> Track:
    """An active check's probe of a READY or DOWN backend, its next probe already due one
    interval after this one was (no later than now, when the probe took longer than that):
    the thresholds move it."""
    check = track.check
    if track.phase is Phase.READY and track.fails >= check.fails:
        why = f"failed {track.fails} checks in a row (last: {said(result)})"
        return track._replace(phase=Phase.DOWN, since=now, passes=0, why=why)
    if track.phase is Phase.DOWN and track.passes >= check.passes:
        return track._replace(phase=Phase.READY, since=now, fails=0, why="")
    return track


def advance(readiness: Readiness, now: float) -> tuple[Readiness, bool]:
    """Ends the start periods that are over: a PENDING backend gives up (is DOWN, where the
    check is active), an INCUMBENT one that never got an answer is READY. True when what the
    gate shows changed (a pass is due)."""
    ended = {
        key: t
        for key, t in readiness.tracks.items()
        if t.phase in STARTING and now >= t.appeared + t.check.start_period
    }
    if not ended:
        return readiness, False
    tracks = dict(readiness.tracks)
    for key, t in ended.items():
        if t.phase is Phase.INCUMBENT:
            tracks[key] = _ready(t, now)
        elif t.check.active:
            why = _never(key, t)
            interval = t.check.interval_ms / 1000
            tracks[key] = t._replace(phase=Phase.DOWN, since=now, next_at=now + interval, why=why)
        else:
            tracks[key] = t._replace(phase=Phase.GAVE_UP, since=now, next_at=math.inf)
    after = replace(readiness, tracks=tracks)
    return after, any(
        t.phase is Phase.PENDING or readiness.served(key) != after.served(key)
        for key, t in ended.items()
    )


def _never(key: Address, track: Track) -> str:
    what = (
        f"passed no check of GET {track.check.path}"
        if track.check.mode is HealthMode.HTTP
        else "never accepted a connection"
    )
    return f"{what} on port {track.check.port or key.port} within the start period"


def next_wake(readiness: Readiness) -> float:
    """When something is due next: a probe, or the end of a start period (math.inf: none)."""
    wake = math.inf
    for t in readiness.tracks.values():
        if t.phase in STARTING:
            if not t.probing and t.next_at < wake:
                wake = t.next_at
            if t.appeared + t.check.start_period < wake:
                wake = t.appeared + t.check.start_period
        elif not t.probing and t.next_at < wake and t.check.active and t.phase in CHECKED:
            wake = t.next_at
    return wake


class Step(NamedTuple):
    readiness: Readiness
    chosen: list[tuple[Address, HealthCheck]]
    ended: bool
    """A start period ended and what the gate shows changed (a pass is due)."""
    wake: float
    starting: bool = False
    """A newcomer is held by the gate: its answers should be read soon, for it to join."""


def step(readiness: Readiness, now: float, policy: ReadinessPolicy) -> Step:
    """`advance`, `due` and `next_wake` in one scan of the tracks: the probe thread's round,
    a hundred times a second over a thousand backends."""
    in_flight = 0
    waiting = []
    wake = math.inf
    starting = False
    for key, t in readiness.tracks.items():
        if t.phase in STARTING:
            end = t.appeared + t.check.start_period
            if now >= end:  # rare: the plain functions, one scan each
                ended, changed = advance(readiness, now)
                after, chosen = due(ended, now, policy)
                held = any(t.phase in STARTING for t in after.tracks.values())
                return Step(after, chosen, changed, next_wake(after), held)
            wake = min(wake, end)
            starting = True
        elif not (t.check.active and t.phase in CHECKED):
            continue
        if t.probing:
            in_flight += 1
        elif t.next_at <= now:
            waiting.append((t.next_at, key))
        elif t.next_at < wake:
            wake = t.next_at
    room = policy.concurrency - in_flight
    if not waiting:
        return Step(readiness, [], False, wake, starting)
    waiting.sort()
    keys = [key for _, key in waiting[: max(0, room)]]
    if len(keys) < len(waiting):  # the rest wait for room: due now
        wake = min(wake, now)
    if not keys:
        return Step(readiness, [], False, wake, starting)
    tracks = dict(readiness.tracks)
    for key in keys:
        tracks[key] = tracks[key]._replace(probing=True)
    chosen = [(key, tracks[key].check) for key in keys]
    return Step(replace(readiness, tracks=tracks), chosen, False, wake, starting)


def gate(topology: Topology, readiness: Readiness) -> Topology:
    """The topology with the backends the gate holds out: STARTING while they are checked
    the first time, UNHEALTHY once they gave up or are down; and a warning for each network
    the controller cannot reach. An unchanged service stays the very same object (the render
    cache finds it by identity)."""
    out = {
        key.container_id
        for key, track in readiness.tracks.items()
        if track.phase is not Phase.READY and not readiness.served(key)
    }
    services = []
    changed = False
    for service in topology.services:
        held = _held(service, readiness, out) if out else service
        changed = changed or held is not service
        services.append(held)
    warnings = [
        f"network {name}: the controller cannot reach its backends ({reach.unreachable}), so "
        "their health is not checked: they get traffic without waiting for a check (Docker's "
        "health check still applies); attach the controller to this network to check them"
        for name, reach in sorted(readiness.networks.items())
        if reach.unreachable is not None and any(n.name == name for n in topology.networks)
    ]
    if not changed and not warnings:
        return topology
    return replace(
        topology,
        services=tuple(services),
        warnings=tuple(dict.fromkeys((*topology.warnings, *warnings))),
    )


def _held(service: Service, readiness: Readiness, out: frozenset[str] | set[str]) -> Service:
    """`out`: the containers some backend of which the gate holds out."""
    if service.health.mode is HealthMode.NONE or not any(
        b.container_id in out for b in service.backends
    ):
        return service
    backends = []
    for backend in service.backends:
        key = address(backend)
        if backend.state in (BackendState.UP, BackendState.STARTING) and not readiness.served(key):
            track = readiness.tracks[key]
            state = BackendState.STARTING if track.phase in STARTING else BackendState.UNHEALTHY
            backend = backend._replace(state=state)
        backends.append(backend)
    if all(a is b for a, b in zip(backends, service.backends, strict=True)):
        return service
    return replace(service, backends=tuple(backends))


@dataclass(frozen=True)
class Health:
    """One tracked backend's health for the API; times on the caller's clock."""

    state: str
    """starting, up, down or gave up (unchecked: its network can't be reached)."""
    served: bool
    reason: str | None
    since: float
    checked: bool
    """The check is active (it goes on while the backend runs)."""
    last: str | None = None
    last_latency: float | None = None
    last_at: float | None = None
    fails: int = 0
    passes: int = 0


def report(readiness: Readiness, now: float) -> dict[tuple[str, str], Health]:
    """By (container id, network): each tracked backend's health, with the reason an
    operator reads for one held out."""
    return {
        (key.container_id, key.network): health_of(readiness, key, track, now)
        for key, track in readiness.tracks.items()
    }


STATES: Mapping[Phase, str] = MappingProxyType(
    {
        Phase.PENDING: "starting",
        Phase.INCUMBENT: "up",
        Phase.READY: "up",
        Phase.DOWN: "down",
        Phase.GAVE_UP: "gave up",
    }
)


def health_of(readiness: Readiness, key: Address, track: Track, now: float) -> Health:
    served = readiness.served(key)
    return Health(
        state="unchecked" if served and track.phase not in SERVED else STATES[track.phase],
        served=served,
        reason=None if served else _reason(key, track, now),
        since=track.since,
        checked=track.check.active,
        last=said(track.last) if track.last is not None else None,
        last_latency=track.last.latency if track.last is not None else None,
        last_at=track.last_at,
        fails=track.fails,
        passes=track.passes,
    )


def moved(before: Readiness, after: Readiness) -> list[Address]:
    """The backends whose phase changed from `before` to `after` (both tracked)."""
    if before is after:
        return []
    return [
        key
        for key, track in after.tracks.items()
        if (was := before.tracks.get(key)) is not None and was.phase is not track.phase
    ]


def _reason(key: Address, track: Track, now: float) -> str:
    check = track.check
    port = check.port or key.port
    last = f"; last: {said(track.last)}" if track.last is not None else ""
    if track.phase is Phase.GAVE_UP:
        return f"{_never(key, track)} ({check.start_period}s); it stays out until it restarts"
    if track.phase is Phase.DOWN:
        return f"{track.why}; back in after {check.passes} passing in a row ({track.passes} so far)"
    what = (
        f"GET {check.path} on port {port} to answer {check.status[0]}-{check.status[1]}"
        if check.mode is HealthMode.HTTP
        else f"port {port} to accept a connection"
    )
    return f"waiting for {what} (since {now - track.appeared:.1f} s{last})"
