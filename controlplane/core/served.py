"""What each managed nginx runs, beside what the controller wants, and when to try an nginx
again after it refused a config. Pure: the reconciler passes the time in.

The API answers from the model; without this it would call a backend served while nginx
still runs an older config (one it kept after refusing the new one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.core.dataplane import ModeChoice
from controlplane.core.model import BackendState, Method, Topology
from controlplane.core.render import upstream_backends

Serves = Mapping[str, frozenset[str]]
"""Service name -> ids of the containers its upstream sends new requests to."""

REFUSED_RETRY = (60.0, 3600.0)
"""First wait and longest wait (seconds) before the same text goes again to an nginx whose
`nginx -t` refused it: the same file fails the same way, unless something it names changed."""
FAILED_RETRY = (5.0, 60.0)
"""The same for a deploy that failed on the way in (engine, shell): usually passing."""


def serving(topology: Topology) -> dict[str, frozenset[str]]:
    """By the rule the renderer uses, so it says what the config says."""
    reachable = frozenset(n for target in topology.nginx for n in target.networks)
    return {
        service.name: frozenset(
            b.container_id
            for b in upstream_backends(service, reachable)
            if b.state is BackendState.UP
        )
        for service in topology.services
    }


def served_by_reload(serves: Serves, topology: Topology) -> Serves:
    """What a reload-mode nginx serves of `serves`: it has no least_time, so its config
    answers 503 for such a service (render.least_time_refused)."""
    timed = {s.name for s in topology.services if s.algorithm.method is Method.LEAST_TIME}
    return {name: frozenset() if name in timed else ids for name, ids in serves.items()}


@dataclass(frozen=True)
class Failure:
    """The last deploy of `digest` to one nginx did not take; it keeps what it had."""

    digest: str
    version: int
    error: str
    refused: bool
    """nginx -t said no (else the way in failed)."""
    attempts: int
    retry_at: float


def failed(
    previous: Failure | None,
    digest: str,
    version: int,
    error: str,
    refused: bool,
    now: float,
) -> Failure:
    """Doubling waits for the same text; a new text starts again from the first wait."""
    attempts = previous.attempts + 1 if previous and previous.digest == digest else 1
    first, longest = REFUSED_RETRY if refused else FAILED_RETRY
    wait = min(longest, first * 2 ** min(attempts - 1, 16))
    return Failure(digest, version, error, refused, attempts, now + wait)


def deploy_due(digest: str, deployed: str | None, failure: Failure | None, now: float) -> bool:
    """Whether an nginx should get `digest` now."""
    if deployed == digest:
        return False
    return failure is None or failure.digest != digest or now >= failure.retry_at


@dataclass(frozen=True)
class NginxState:
    """One managed nginx as this controller knows it."""

    container: str
    container_id: str
    version: int | None = None
    """Of the config it runs from this controller; None until one deploy took."""
    serves: Serves | None = None
    failure: Failure | None = None
    mode: ModeChoice | None = None
    """Its data plane and why; None until the controller knows (it probes a new nginx)."""

    def in_sync(self, service: str, wanted: Serves) -> bool | None:
        """None: not known (nothing deployed to it yet by this controller)."""
        if self.serves is None:
            return None
        return self.serves.get(service, frozenset()) == wanted.get(service, frozenset())
