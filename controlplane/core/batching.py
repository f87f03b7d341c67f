"""When to hold a change back: new backends during a scale-out.

Every change costs each managed nginx a reload. A backend leaving, a service's first backend,
a changed method or label and a new nginx are correctness: they go at once. More backends for a
service that already serves are capacity: on their own they also go at once, but while the
engine keeps starting containers (dockerd here starts about four a second) they are held and
applied together, so a scale-out of 50 costs a few reloads instead of 50.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from controlplane.core.model import BackendState, Service, Topology


@dataclass(frozen=True)
class BatchPolicy:
    quiet: float = 1.0
    """Seconds without a new change that end a scale-out; also how long after backends were
    last added a new one counts as part of the same scale-out."""
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


def _adds_capacity(before: Service, after: Service) -> bool:
    if replace(before, backends=()) != replace(after, backends=()):
        return False
    if not before.live_backends:
        return False
    old = set(before.backends)
    added = [b for b in after.backends if b not in old]
    return len(after.backends) - len(added) == len(old) and all(
        b.state is BackendState.UP for b in added
    )


def only_adds_capacity(before: Topology, after: Topology) -> bool:
    """True when `after` differs from `before` only by new live backends of services that
    already had one."""
    if replace(before, services=()) != replace(after, services=()):
        return False
    if [s.name for s in before.services] != [s.name for s in after.services]:
        return False
    pairs = list(zip(before.services, after.services, strict=True))
    return any(a != b for a, b in pairs) and all(a == b or _adds_capacity(a, b) for a, b in pairs)


def adds_backends(before: Topology, after: Topology) -> bool:
    """True when some service serves with a container it did not serve with before."""
    old = {s.name: {b.container_id for b in s.live_backends} for s in before.services}
    return any(
        b.container_id not in old.get(s.name, ()) for s in after.services for b in s.live_backends
    )


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
