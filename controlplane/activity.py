"""What the controller did lately, and where each managed nginx stands, for the API.

Fed by the reconciler's reports, the loop's failures, the API's own changes and the health
checks' transitions; bounded, so a long-running controller keeps the recent past only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from controlplane.core.health import Address, Health, address
from controlplane.core.model import Backend, BackendState, ContainerFacts, Service
from controlplane.snapshot import ReconcileReport, Snapshot

log = logging.getLogger(__name__)

MAX_ENTRIES = 500
SHOWN = {BackendState.UP: "up", BackendState.UNHEALTHY: "down"}
"""A checked backend's health state as a snapshot shows it (the gate holds one out as
unhealthy once it is down); any other state: it is checked anew, starting."""


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Entry:
    time: str
    kind: str
    """reconcile, held, refused (an nginx did not take a config), failure, override or
    health (a backend's health state changed)."""
    summary: str
    details: dict[str, object] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class NginxStatus:
    container: str
    container_id: str
    checksum: str | None = None
    """Of the config this nginx last loaded from controlplane."""
    last_attempt: str | None = None
    last_result: str | None = None
    """ok or failed."""
    last_reload: str | None = None
    last_error: str | None = None
    reloads: int = 0
    failures: int = 0
    last_push: str | None = None
    """When the dynamic data plane's state last went in (no reload)."""
    pushes: int = 0


class Activity:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[Entry] = deque(maxlen=MAX_ENTRIES)
        self._nginx: dict[str, NginxStatus] = {}
        self._held: tuple[str, ...] = ()

    def entries(self, limit: int = MAX_ENTRIES) -> list[Entry]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._entries))[:limit]

    def nginx(self) -> dict[str, NginxStatus]:
        with self._lock:
            return dict(self._nginx)

    def record(self, kind: str, summary: str, at: float | None = None, **details: object) -> None:
        """`at`: when it happened (epoch seconds), if not now."""
        when = iso_time(time.time() if at is None else at)
        with self._lock:
            self._entries.append(Entry(when, kind, summary, details))

    def on_report(self, report: ReconcileReport) -> None:
        """Passes that changed nothing and deployed nothing (resyncs) are not recorded; a held
        scale-out is one entry, brought up to date as it grows."""
        if report.held:
            self._on_held(report)
            return
        self._held = ()
        if not (report.changed or report.deployed):
            return
        now = iso_time(time.time())
        with self._lock:
            for result in report.deployed:
                status = self._nginx.get(result.container_id) or NginxStatus(
                    result.container, result.container_id
                )
                if result.ok and result.pushed:
                    status = replace(
                        status,
                        last_attempt=now,
                        last_result="ok",
                        last_push=now,
                        last_error=None,
                        pushes=status.pushes + 1,
                    )
                elif result.ok:
                    status = replace(
                        status,
                        checksum=report.checksum,
                        last_attempt=now,
                        last_result="ok",
                        last_reload=now,
                        last_error=None,
                        reloads=status.reloads + 1,
                    )
                else:
                    status = replace(
                        status,
                        last_attempt=now,
                        last_result="failed",
                        last_error=result.error,
                        failures=status.failures + 1,
                    )
                self._nginx.pop(result.container_id, None)
                self._nginx[result.container_id] = status
            self._entries.extend(
                Entry(
                    now,
                    "refused",
                    f"nginx {d.container} did not take version {report.version}"
                    f"{' (nginx -t refused it)' if d.refused else ''}: {d.error}; it keeps "
                    "the config it had",
                    {"nginx": d.container, "version": report.version, "error": d.error},
                )
                for d in report.deployed
                if not d.ok
            )
            while len(self._nginx) > MAX_ENTRIES:  # containers long gone, least recent first
                del self._nginx[next(iter(self._nginx))]
            self._entries.append(
                Entry(
                    now,
                    "reconcile",
                    f"version {report.version} ({report.reason}): "
                    + "; ".join(
                        [
                            *report.changes[:3],
                            *(["..."] if len(report.changes) > 3 else []),
                            f"{sum(d.ok and not d.pushed for d in report.deployed)} nginx "
                            "reloaded, "
                            f"{sum(d.ok and d.pushed for d in report.deployed)} pushed to, "
                            f"{sum(not d.ok for d in report.deployed)} failed",
                        ]
                    ),
                    {
                        "reason": report.reason,
                        "changes": list(report.changes),
                        "version": report.version,
                        "changed": report.changed,
                        "checksum": report.checksum,
                        "nginx": [
                            {
                                "container": d.container,
                                "ok": d.ok,
                                "error": d.error,
                                "pushed": d.pushed,
                            }
                            for d in report.deployed
                        ],
                        "duration_ms": round(sum(report.timings.values()) * 1000, 1),
                    },
                )
            )

    def _on_held(self, report: ReconcileReport) -> None:
        if report.held == self._held:
            return
        entry = Entry(
            iso_time(time.time()),
            "held",
            f"holding {len(report.held)} change(s) for a scale-out ({report.reason}): "
            + "; ".join([*report.held[:3], *(["..."] if len(report.held) > 3 else [])]),
            {"reason": report.reason, "changes": list(report.held), "version": report.version},
        )
        with self._lock:
            if self._held and self._entries and self._entries[-1].kind == "held":
                self._entries.pop()
            self._entries.append(entry)
        self._held = report.held

    def on_failure(self, reason: str, error: str) -> None:
        self.record("failure", f"reconcile ({reason}) failed: {error}", reason=reason, error=error)


Found = tuple[tuple[str, ...], Backend]
"""A backend in a snapshot, and the services it serves on its network."""


class _Backends:
    """A snapshot's backends by (container id, network), brought up to date service by
    service: the builder hands over the very same Service for an unchanged one, so a pass
    over thousands of backends where one service changed costs a look at each service and
    the backends of that one (not at every backend)."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._services: dict[int, Service] = {}
        self._by: dict[tuple[str, str], dict[str, Backend]] = {}

    def find(self, key: Address, snapshot: Snapshot | None) -> Found | None:
        """The backend `key` is in `snapshot` (None: not there, or another start of it)."""
        if snapshot is not self._snapshot:
            self._update(snapshot)
        found = self._by.get((key.container_id, key.network))
        if not found:
            return None
        backend = next(iter(found.values()))
        return (tuple(sorted(found)), backend) if address(backend) == key else None

    def _update(self, snapshot: Snapshot | None) -> None:
        services = {id(s): s for s in snapshot.topology.services} if snapshot else {}
        for number, gone in self._services.items():
            if number not in services:
                for b in gone.backends:
                    entry = self._by[(b.container_id, b.network)]
                    entry.pop(gone.name, None)
                    if not entry:
                        del self._by[(b.container_id, b.network)]
        for number, new in services.items():
            if number not in self._services:
                for b in new.backends:
                    self._by.setdefault((b.container_id, b.network), {})[new.name] = b
        self._snapshot, self._services = snapshot, services


@dataclass(frozen=True)
class _Transition:
    key: Address
    health: Health
    before: str
    """The state it left."""
    at: float


class HealthEvents:
    """Each change of a backend's health state (the gatekeeper's `on_transition`) as a log
    line and a `health` event: `health: web/w2 on app: up -> down: failed 3 checks in a row
    (last: status 500) ...`.

    The gatekeeper says where a backend went; where it was is what the current snapshot
    shows of it (up, or down when held out as unhealthy; a newcomer, or one back from a
    pause or a drain, is starting; before the first pass, what nginx may serve is up), unless
    it moved since that snapshot was made. The container's name and services come from the
    snapshot too; a newcomer that passes in the pass that found it is not in one yet, so it
    is told once that pass reports (register `on_report` before the activity's, so the event
    comes before the pass's, as it happened)."""

    def __init__(
        self,
        activity: Activity,
        snapshot: Callable[[], Snapshot | None],
        known: Callable[[str], ContainerFacts | None],
    ) -> None:
        """`known`: a container's facts as Docker last said, for one no snapshot names."""
        self._activity = activity
        self._snapshot = snapshot
        self._known = known
        self._lock = threading.Lock()
        self._moved: dict[Address, tuple[str, int]] = {}
        """The state each backend went to since the snapshot (of that version) was made."""
        self._backends = _Backends()
        self._waiting: list[_Transition] = []

    def on_transition(self, key: Address, health: Health) -> None:
        snapshot = self._snapshot()
        version = snapshot.version if snapshot else 0
        found = self._find(key, snapshot)
        with self._lock:
            moved = self._moved.get(key)
            self._moved[key] = (health.state, version)
        if moved is not None and moved[1] >= version:
            before = moved[0]
        elif snapshot is None:
            before = "up"  # the first pass: served while it is probed
        else:
            before = SHOWN.get(found[1].state, "starting") if found else "starting"
        if before == health.state:  # e.g. what the first pass found passed its first probe
            return
        transition = _Transition(key, health, before, time.time())
        if found is None:
            with self._lock:
                self._waiting.append(transition)
                if len(self._waiting) <= MAX_ENTRIES:
                    return
                transition = self._waiting.pop(0)
        self._tell(transition, snapshot)

    def on_report(self, report: ReconcileReport) -> None:
        """Tells the transitions that waited for this pass's snapshot, and forgets those
        the snapshot shows."""
        snapshot = self._snapshot()
        version = snapshot.version if snapshot else 0
        with self._lock:
            waiting, self._waiting = self._waiting, []
            self._moved = {k: m for k, m in self._moved.items() if m[1] >= version}
        for transition in waiting:
            self._tell(transition, snapshot)

    def _tell(self, transition: _Transition, snapshot: Snapshot | None) -> None:
        key, health, before = transition.key, transition.health, transition.before
        found = self._find(key, snapshot)
        services = found[0] if found else ()
        if found is not None:
            name: str | None = found[1].container
        else:
            facts = self._known(key.container_id)
            name = facts.name if facts else None
        if name is None:
            who = f"container {key.container_id[:12]}"
        else:
            who = f"{','.join(services)}/{name}" if services else name
        summary = f"health: {who} on {key.network}: {before} -> {health.state}"
        if health.reason:
            summary += f": {health.reason}"
        elif health.last:
            summary += f" (last: {health.last})"
        log.info("%s", summary)
        latency = health.last_latency
        details: dict[str, object] = {
            "container": key.container_id,
            "name": name,
            "services": list(services),
            "network": key.network,
            "from": before,
            "to": health.state,
            "reason": health.reason,
            "last": health.last,
            "latency_ms": None if latency is None else round(latency * 1000, 3),
            "fails": health.fails,
            "passes": health.passes,
        }
        self._activity.record("health", summary, transition.at, **details)

    def _find(self, key: Address, snapshot: Snapshot | None) -> Found | None:
        with self._lock:
            return self._backends.find(key, snapshot)
