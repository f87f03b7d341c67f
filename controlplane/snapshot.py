"""What a pass publishes, for everyone who reads it: the snapshot (swapped whole, read without
locks by the API, DNS and metrics), each pass's report, and the ticket an operator waits on.
Apart from the reconciler, so its readers need nothing of its internals."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from controlplane.core.dns_records import Zone
from controlplane.core.model import Topology
from controlplane.core.served import Serves
from controlplane.docker_source import DockerEvent
from controlplane.nginx_deployer import DeployResult


@dataclass(frozen=True)
class Snapshot:
    """What the controller currently believes; swapped whole, read without locks."""

    version: int
    topology: Topology
    config: str
    checksum: str
    dns: Zone
    serves: Serves
    """What the config sends traffic to (core.served)."""
    state: tuple[str, ...] = ()
    """The dynamic data plane's service lines (core.dataplane), when some nginx may use it."""


@dataclass(frozen=True)
class ReconcileReport:
    """One pass: what triggered it, what it changed, where its time went (seconds)."""

    reason: str
    version: int
    changed: bool
    deployed: tuple[DeployResult, ...]
    timings: dict[str, float] = field(default_factory=dict, hash=False)
    trigger: DockerEvent | None = None
    started_ns: int = 0
    checksum: str = ""
    changes: tuple[str, ...] = ()
    """What changed in the model, in words (core.diff)."""
    held: tuple[str, ...] = ()
    """What this pass found but held back for a scale-out, in words; nothing was applied."""
    current: tuple[str, ...] = ()
    """The nginx that run this pass's snapshot after it: loaded by this pass, or already by an
    earlier one (a pass that started after a change was saved takes it before the pass asked
    for it)."""


class PassTicket:
    """A pass someone asked for (the API): `planned` is set once the pass settled on its
    snapshot, `done` once its deploys finished; `error` says why it could not run."""

    def __init__(self, reason: str, resync: bool = False) -> None:
        self.reason = reason
        self.resync = resync
        self.planned = threading.Event()
        self.done = threading.Event()
        self.snapshot: Snapshot | None = None
        self.report: ReconcileReport | None = None
        self.error: str | None = None

    def plan(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.planned.set()

    def finish(self, report: ReconcileReport) -> None:
        self.report = report
        self.planned.set()
        self.done.set()

    def fail(self, error: str) -> None:
        if self.done.is_set():
            return
        self.error = error
        self.planned.set()
        self.done.set()


class Published:
    """The snapshot of the last pass that finished, for a reader that waits for a newer one
    (the DNS zone's long poll) without polling. At most `waiters` wait at once, so long polls
    can't take every API thread; any more are answered at once."""

    def __init__(self, waiters: int = 4) -> None:
        self._changed = threading.Condition()
        self._snapshot: Snapshot | None = None
        self._room = threading.BoundedSemaphore(waiters)

    def publish(self, snapshot: Snapshot | None) -> None:
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def newer(self, version: int, timeout: float) -> Snapshot | None:
        """The first snapshot whose version is not `version` (a restarted controller counts
        from 1 again), waiting up to `timeout` for it; else the latest (None before the
        first pass)."""
        if not self._room.acquire(blocking=False):
            return self._snapshot
        try:
            with self._changed:
                self._changed.wait_for(
                    lambda: self._snapshot is not None and self._snapshot.version != version,
                    timeout,
                )
                return self._snapshot
        finally:
            self._room.release()
