"""When to hold a change back: new backends during a scale-out.

Every change costs each managed nginx a reload. A backend leaving, a service's first backend,
a changed method or label and a new nginx are correctness: they go at once. More backends for a
service that already serves are capacity (a newcomer, or one whose health check now passes): on
their own they also go at once, but while the engine keeps starting containers (dockerd here
starts about four a second) they are held and applied together, so a scale-out of 50 costs a
few reloads instead of 50.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from controlplane.core.model import Backend, BackendState, Service, Topology
from controlplane.core.render import upstream_backends

NEWCOMER_STATES = (BackendState.UP, BackendState.STARTING)


@dataclass(frozen=True)
class BatchPolicy:
    quiet: float = 2.0
    """Seconds without a new change that end a scale-out; also how long after backends were
    last added a new one counts as part of the same scale-out. dockerd pauses for a second now
    and then while it starts many containers; each pause longer than this costs a reload."""
    longest: float = 10.0
    """Seconds a held backend waits at most; 0 holds nothing."""


@dataclass(frozen=True)
class Held:
    """New backends waiting to be applied together."""

    since: float
    """When the first was held."""
    moved: float
    """When the wanted topology last changed."""
    topology: Topology
    """The wanted topology, as last built."""


def _key(backend: Backend) -> tuple[str, str]:
    return backend.container_id, backend.network


def _grew(was: Backend | None, now: Backend) -> bool:
    """A newcomer that serves or will once healthy, or one that became healthy."""
    if was is None:
        return now.state in NEWCOMER_STATES
    return (
        was.state is BackendState.STARTING
        and now.state is BackendState.UP
        and was._replace(state=BackendState.UP) == now
    )


def _adds_capacity(before: Service, after: Service, reachable: frozenset[str]) -> bool:
    if replace(before, backends=()) != replace(after, backends=()):
        return False
    if not any(b.state is BackendState.UP for b in upstream_backends(before, reachable)):
        return False  # nothing serves in nginx yet: the next one is its first
    old = {_key(b): b for b in before.backends}
    new = {_key(b): b for b in after.backends}
    return old.keys() <= new.keys() and all(
        old.get(key) == backend or _grew(old.get(key), backend) for key, backend in new.items()
    )


def only_adds_capacity(before: Topology, after: Topology) -> bool:
    """True when `after` differs from `before` only by backends that add capacity to services
    whose upstream already serves."""
    if replace(before, services=()) != replace(after, services=()):
        return False
    if [s.name for s in before.services] != [s.name for s in after.services]:
        return False
    reachable = frozenset(n for target in before.nginx for n in target.networks)
    pairs = list(zip(before.services, after.services, strict=True))
    return any(a != b for a, b in pairs) and all(
        a == b or _adds_capacity(a, b, reachable) for a, b in pairs
    )


def adds_backends(before: Topology, after: Topology) -> bool:
    """True when some service gained capacity that serves: a newcomer that is up, or a
    backend whose health check or readiness now passes. A newcomer still starting is not yet:
    counted, it would make its own first good check wait for a scale-out that never came."""
    old = {s.name: {_key(b): b for b in s.backends} for s in before.services}
    for service in after.services:
        was = old.get(service.name, {})
        if any(
            _grew(was.get(_key(b)), b)
            for b in service.backends
            if b.state is BackendState.UP and was.get(_key(b)) != b
        ):
            return True
    return False


def removes_backends(before: Topology, after: Topology) -> bool:
    """True when some service lost a backend that was up (it left, or is stopping, paused or
    failing its health check): a replacement, not a scale-out, so the next newcomer restores
    capacity and goes at once."""
    later = {s.name: {_key(b): b for b in s.backends} for s in after.services}
    for service in before.services:
        backends = later.get(service.name, {})
        for backend in service.backends:
            if backend.state is not BackendState.UP:
                continue
            kept = backends.get(_key(backend))
            if kept is None or kept.state is not BackendState.UP:
                return True
    return False


def hold(
    before: Topology,
    after: Topology,
    now: float,
    last_added: float,
    held: Held | None,
    policy: BatchPolicy,
) -> Held | None:
    """The batch to keep holding, or None to apply `after` now. `last_added`: when a change
    that added backends last went out (monotonic seconds, like `now`); a removal, or a
    container's exit after its stop, does not make the next new backend wait."""
    if policy.longest <= 0 or not only_adds_capacity(before, after):
        return None
    if held is None:
        if now - last_added >= policy.quiet:
            return None
        return Held(now, now, after)
    moved = now if after != held.topology else held.moved
    if now - held.since >= policy.longest or now - moved >= policy.quiet:
        return None
    return Held(held.since, moved, after)


def due(held: Held, policy: BatchPolicy) -> float:
    """When a held batch goes out if nothing else happens first."""
    return min(held.since + policy.longest, held.moved + policy.quiet)
