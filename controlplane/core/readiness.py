"""Readiness: a new backend gets traffic only once its port accepts a TCP connection.

"Running" is not "ready": a container starts before its server listens, and the requests
nginx sends it meanwhile fail. So the controller probes each new backend's address itself and
holds it out of nginx and DNS until a connect succeeds. This module is the policy, pure: time
and the jitter's random draw come in as numbers, decisions come out as data; the probing is an
edge (controlplane.gatekeeper, controlplane.prober).

- A backend is tracked by container, start time, network, address and port, so a restart,
  an unpause (a paused backend is not tracked) or a reconnect makes it new again. Only services
  whose check is `tcp` (the default) are tracked; `controlplane.health=none` turns it off.
- A newcomer is PENDING: probed at once, then every `interval` (jittered by +-`jitter`),
  until a connect makes it READY, or until its service's start period has passed since it
  appeared: then it GAVE_UP and stays out until its container restarts.
- What the controller's first pass finds is INCUMBENT: an nginx may already send it traffic,
  so it stays served while it is probed, and a controller restart causes no outage. A connect
  makes it READY; a refusal before any connect makes it PENDING (out: its port is closed);
  if no probe gets an answer for its start period, it is READY (nothing said it was not).
- A network is reachable once a probe on it was answered (a connect or a refusal). It is
  unreachable after "network unreachable", or while no probe on it was ever answered and the
  ones sent for `silence` seconds got none (timeouts, "host unreachable"): a remote engine, or
  a controller not attached to it. There the gate is open: its backends are READY once probed,
  and a warning says why; an answer later makes the network reachable again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple

from controlplane.core.model import Backend, BackendState, HealthMode, Service, Topology


class Address(NamedTuple):
    """One backend to probe; a new start, network, address or port is a new key."""

    container_id: str
    started_at: str
    network: str
    host: str
    port: int


class Outcome(StrEnum):
    """What one TCP connect attempt said."""

    CONNECTED = "connected"
    REFUSED = "refused"
    TIMEOUT = "no answer"
    HOST_UNREACHABLE = "host unreachable"
    NETWORK_UNREACHABLE = "network unreachable"
    FAILED = "failed"
    """Any other error of the connect: counted as no answer."""


ANSWERS = frozenset({Outcome.CONNECTED, Outcome.REFUSED})
"""Outcomes that prove the controller reaches the network."""


class Phase(StrEnum):
    PENDING = "pending"
    """Out; probed until it connects or its start period is over."""
    INCUMBENT = "incumbent"
    """Found by the first pass: served while it is probed."""
    READY = "ready"
    GAVE_UP = "gave up"
    """Out until its container restarts."""


PROBED = frozenset({Phase.PENDING, Phase.INCUMBENT})
SERVED = frozenset({Phase.INCUMBENT, Phase.READY})


@dataclass(frozen=True)
class ReadinessPolicy:
    interval: float = 0.05
    """Seconds between two probes of a backend that did not connect yet."""
    jitter: float = 0.2
    """Each interval is drawn from interval x (1 +- jitter), so that backends started
    together are not probed in lockstep."""
    timeout: float = 1.0
    """Seconds one connect attempt may take."""
    silence: float = 2.0
    """Seconds of unanswered probes after which a network never answered counts as
    unreachable."""
    concurrency: int = 256
    """Probes in flight at most."""


@dataclass(frozen=True)
class Track:
    """One tracked backend."""

    phase: Phase
    appeared: float
    """When it was first seen: its start period counts from here."""
    since: float
    """When its phase began."""
    start_period: float
    next_at: float = -math.inf
    """When its next probe is due (probed phases only)."""
    probing: bool = False
    """A probe of it is in flight."""
    probes: int = 0
    last: Outcome | None = None


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
        if track is None or track.phase in SERVED:
            return True
        return track.phase is Phase.PENDING and self.reach(address.network).unreachable is not None


class Candidate(NamedTuple):
    address: Address
    start_period: float


def address(backend: Backend) -> Address:
    return Address(
        backend.container_id,
        backend.started_at,
        backend.network,
        backend.ip or backend.ipv6,
        backend.port,
    )


def service_candidates(service: Service) -> tuple[Candidate, ...]:
    """The backends the gate tracks in one service: if its check is `tcp`, every one that
    would be served but for the gate (so not paused, draining or stopping: one is new again,
    probed at once, when it comes back; and not while Docker's own health check says
    starting: its start period counts from when that passes)."""
    if service.health.mode is not HealthMode.TCP:
        return ()
    start_period = float(service.health.start_period)
    return tuple(
        Candidate(address(b), start_period) for b in service.backends if b.state is BackendState.UP
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
    pass), due for a probe at once; what it did not find is forgotten. A backend in two
    services takes the first one's start period."""
    tracks: dict[Address, Track] = {}
    for key, start_period in found:
        if key in tracks:
            continue
        track = readiness.tracks.get(key)
        if track is None:
            phase = Phase.INCUMBENT if first else Phase.PENDING
            track = Track(phase, now, now, start_period, next_at=now)
        elif track.start_period != start_period:
            track = replace(track, start_period=start_period)
        tracks[key] = track
    # what is known of a network is kept while a backend on it is tracked, no longer: a
    # network made again under its name, or left by the controller, is judged afresh
    watched = {key.network for key in tracks}
    networks = {name: reach for name, reach in readiness.networks.items() if name in watched}
    return replace(readiness, tracks=tracks, networks=networks)


def due(
    readiness: Readiness, now: float, policy: ReadinessPolicy
) -> tuple[Readiness, list[Address]]:
    """The probes to send now (marked in flight), oldest due first, within the concurrency."""
    room = policy.concurrency - sum(1 for t in readiness.tracks.values() if t.probing)
    waiting = sorted(
        (t.next_at, key)
        for key, t in readiness.tracks.items()
        if t.phase in PROBED and not t.probing and t.next_at <= now
    )
    chosen = [key for _, key in waiting[: max(0, room)]]
    if not chosen:
        return readiness, []
    tracks = dict(readiness.tracks)
    for key in chosen:
        tracks[key] = replace(tracks[key], probing=True)
    return replace(readiness, tracks=tracks), chosen


def record(
    readiness: Readiness,
    key: Address,
    outcome: Outcome,
    sent: float,
    now: float,
    draw: float,
    policy: ReadinessPolicy,
) -> tuple[Readiness, bool]:
    """A probe sent at `sent` said `outcome` at `now`; `draw` (uniform in [0, 1)) places the
    next probe within the jitter. Also True when the gate's answer changed: a pass is due."""
    networks = dict(readiness.networks)
    was = readiness.reach(key.network)
    reach = _reach(was, outcome, sent, now, policy)
    networks[key.network] = reach
    tracks = dict(readiness.tracks)
    if reach.unreachable is not None and was.unreachable is None:
        tracks = _opened(tracks, key.network, now)
    track = tracks.get(key)
    if track is not None:
        tracks[key] = _probed(track, outcome, now, draw, policy, reach.unreachable is not None)
    after = Readiness(tracks, networks)
    flipped = was.unreachable != reach.unreachable
    return after, flipped or readiness.served(key) != after.served(key)


def _reach(was: Reach, outcome: Outcome, sent: float, now: float, policy: ReadinessPolicy) -> Reach:
    if outcome in ANSWERS:
        return Reach(answered=True)
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
    """The network turned unreachable: its backends waiting to be checked are let in."""
    return {
        key: replace(t, phase=Phase.READY, since=now, next_at=math.inf)
        if key.network == network and t.phase in PROBED
        else t
        for key, t in tracks.items()
    }


def _probed(
    track: Track,
    outcome: Outcome,
    now: float,
    draw: float,
    policy: ReadinessPolicy,
    unreachable: bool,
) -> Track:
    probed = replace(track, probing=False, probes=track.probes + 1, last=outcome)
    if track.phase not in PROBED:
        return probed
    if outcome is Outcome.CONNECTED or (unreachable and outcome not in ANSWERS):
        return replace(probed, phase=Phase.READY, since=now, next_at=math.inf)
    spread = policy.interval * policy.jitter * (2 * draw - 1)
    probed = replace(probed, next_at=now + policy.interval + spread)
    if track.phase is Phase.INCUMBENT and outcome is Outcome.REFUSED:
        return replace(probed, phase=Phase.PENDING, since=now)
    return probed


def advance(readiness: Readiness, now: float) -> tuple[Readiness, bool]:
    """Ends the start periods that are over: a PENDING backend gives up, an INCUMBENT one that
    never got an answer is READY. True when what the gate shows changed (a pass is due)."""
    ended = {
        key: t
        for key, t in readiness.tracks.items()
        if t.phase in PROBED and now >= t.appeared + t.start_period
    }
    if not ended:
        return readiness, False
    tracks = dict(readiness.tracks)
    for key, t in ended.items():
        phase = Phase.GAVE_UP if t.phase is Phase.PENDING else Phase.READY
        tracks[key] = replace(t, phase=phase, since=now, next_at=math.inf)
    after = replace(readiness, tracks=tracks)
    return after, any(
        t.phase is Phase.PENDING or readiness.served(key) != after.served(key)
        for key, t in ended.items()
    )


def next_wake(readiness: Readiness) -> float:
    """When something is due next: a probe, or the end of a start period (math.inf: none)."""
    times = [
        min(math.inf if t.probing else t.next_at, t.appeared + t.start_period)
        for t in readiness.tracks.values()
        if t.phase in PROBED
    ]
    return min(times, default=math.inf)


def gate(topology: Topology, readiness: Readiness) -> Topology:
    """The topology with the backends the gate holds out: STARTING while they are checked,
    UNHEALTHY once they gave up; and a warning for each network the controller cannot reach.
    An unchanged service stays the very same object (the render cache finds it by identity)."""
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
        "new backends on it get traffic without waiting for their port (Docker's health "
        "check still applies); attach the controller to this network to check them"
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
    if service.health.mode is not HealthMode.TCP or not any(
        b.container_id in out for b in service.backends
    ):
        return service
    backends = []
    for backend in service.backends:
        key = address(backend)
        if backend.state in (BackendState.UP, BackendState.STARTING) and not readiness.served(key):
            track = readiness.tracks[key]
            state = (
                BackendState.UNHEALTHY if track.phase is Phase.GAVE_UP else BackendState.STARTING
            )
            backend = backend._replace(state=state)
        backends.append(backend)
    if all(a is b for a, b in zip(backends, service.backends, strict=True)):
        return service
    return replace(service, backends=tuple(backends))


@dataclass(frozen=True)
class Hold:
    """Why the gate holds a backend out, for the API; `since` on the caller's clock."""

    reason: str
    since: float


def holds(readiness: Readiness, now: float) -> dict[tuple[str, str], Hold]:
    """By (container id, network): each backend held out, with the reason an operator reads."""
    found = {}
    for key, track in readiness.tracks.items():
        if readiness.served(key):
            continue
        if track.phase is Phase.GAVE_UP:
            reason = (
                f"never accepted a connection on port {key.port} within the start period "
                f"({track.start_period:g}s); it stays out until it restarts"
            )
        else:
            last = f"; {track.last}" if track.last is not None else ""
            reason = (
                f"waiting for port {key.port} to accept a connection "
                f"(since {now - track.appeared:.1f} s{last})"
            )
        found[key.container_id, key.network] = Hold(reason, track.since)
    return found
