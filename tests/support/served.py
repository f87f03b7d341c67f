"""What a controller's snapshot serves, by container name: what tests and benches compare
with what clients see."""

from __future__ import annotations

from controlplane.snapshot import Snapshot


def served_names(snapshot: Snapshot | None, service: str) -> frozenset[str]:
    """The containers the snapshot's config sends `service`'s requests to."""
    if snapshot is None:
        return frozenset()
    ids = snapshot.serves.get(service, frozenset())
    return frozenset(
        b.container
        for s in snapshot.topology.services
        if s.name == service
        for b in s.backends
        if b.container_id in ids
    )
