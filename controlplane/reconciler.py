"""One reconcile pass, and the loop that decides when to run one.

Level-triggered: an event only wakes the loop; every pass rebuilds the whole desired state
from a fresh listing, renders it, and deploys only to the nginx containers whose last good
config differs. An event after a quiet stream starts a pass at once; the events that follow
it are coalesced: their pass runs once the stream has been quiet for `quiet_window`, but never
later than `max_wait` after the first of them. New backends that only add capacity during a
scale-out are held back and applied together (core.batching).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

import jinja2

from controlplane.core.batching import (
    BatchPolicy,
    Held,
    adds_backends,
    due,
    hold,
    removes_backends,
)
from controlplane.core.build import build_topology
from controlplane.core.diff import describe_changes
from controlplane.core.dns_records import Zone, build_zone
from controlplane.core.lifecycle import ContainerEvent, StopMark, apply_event, prune
from controlplane.core.model import ContainerFacts, DockerState, NginxTarget, Overrides, Topology
from controlplane.core.render import RenderCache, render_config
from controlplane.core.served import Failure, NginxState, Serves, deploy_due, failed, serving
from controlplane.docker_source import DockerEvent
from controlplane.errors import ControlPlaneError, DockerUnavailable
from controlplane.nginx_deployer import DeployResult
from controlplane.settings import Settings

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the reconciler needs from Docker (DockerSource, or a fake in tests)."""

    def snapshot(self) -> DockerState: ...

    def invalidate(self, container_id: str | None = None) -> None: ...

    def invalidate_networks(self) -> None: ...

    def known(self, container_id: str) -> ContainerFacts | None:
        """What the last inspect said, without asking the engine."""
        ...

    def inspect(self, container_id: str) -> ContainerFacts | None:
        """Inspect now and keep the answer for the next snapshot; None: gone."""
        ...


class Deployer(Protocol):
    """What the reconciler needs from nginx (NginxDeployer, or a fake in tests)."""

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult: ...

    def retain(self, container_ids: set[str]) -> None: ...

    def close(self) -> None: ...


class EventStream(Protocol):
    def open_events(self) -> Iterator[DockerEvent]: ...

    def close_events(self) -> None: ...


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


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Reconciler:
    def __init__(
        self,
        source: Source,
        deployer: Deployer,
        template: jinja2.Template,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        overrides: Callable[[], Overrides] = Overrides,
    ) -> None:
        """`overrides` returns the operator's current choices (the store's value)."""
        self._source = source
        self._overrides = overrides
        self._deployer = deployer
        self._template = template
        self._settings = settings
        self._build = settings.build_options
        self._render = settings.render_options
        self._render_cache = RenderCache()
        self._clock = clock
        self._marks: dict[str, StopMark] = {}
        self._deployed: dict[tuple[str, str], str] = {}
        self._failed: dict[tuple[str, str], Failure] = {}
        self._running: dict[tuple[str, str], Snapshot] = {}
        """The snapshot whose config each nginx (id, start) last took from this controller."""
        self.snapshot: Snapshot | None = None
        self.nginx: Mapping[str, NginxState] = {}
        """By container id, swapped whole after each pass's deploys; read without locks."""
        self.on_report: list[Callable[[ReconcileReport], None]] = []

    def handle_event(self, event: DockerEvent) -> bool:
        """Whether the event can change what this controller serves: one for a container or
        network it does not watch (another controller's, or nobody's) costs no pass."""
        if event.kind == "network":
            self._source.invalidate_networks()
            if event.container_id:
                self._source.invalidate(event.container_id)
            return event.network is None or self._watches(event.network)
        if not event.container_id:
            return True
        before = self._source.known(event.container_id)
        self._source.invalidate(event.container_id)
        if event.kind == "container":
            self._marks = apply_event(
                self._marks,
                ContainerEvent(event.container_id, event.action, event.signal),
                self._clock(),
            )
        if before is not None and self._on_watched(before):
            return True
        try:
            # Inspected now, not in the pass: the source keeps it for the pass.
            after = self._source.inspect(event.container_id)
        except DockerUnavailable:
            return True  # the pass will say what is wrong
        return after is not None and self._on_watched(after)

    def _watches(self, network: str) -> bool:
        if self._settings.networks is not None:
            return network in self._settings.networks
        return network not in ("bridge", "host", "none")

    def _on_watched(self, facts: ContainerFacts) -> bool:
        return any(self._watches(e.network) for e in facts.endpoints)

    def close(self) -> None:
        """Ends the shells kept open in nginx containers."""
        self._deployer.close()

    def invalidate(self) -> None:
        """Re-inspect everything: for resyncs and reconnects. A config nginx refused is tried
        again only when its wait is over (core.served), not on every resync."""
        self._source.invalidate()

    def retry_refused(self) -> None:
        """Deploy again to nginx that refused the current config: an operator asked for a
        pass (the API), so the answer must say what nginx says now, not what it said before."""
        self._failed = {k: replace(f, retry_at=float("-inf")) for k, f in self._failed.items()}

    def reconcile(
        self,
        reason: str,
        trigger: DockerEvent | None = None,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        held: Callable[[Topology, Topology], bool] | None = None,
    ) -> ReconcileReport:
        """`trigger`: the first event of the burst this pass answers, if any. `on_snapshot`
        hears the snapshot this pass settled on before its deploys start. `held(current,
        wanted)` may hold a change back: the pass then changes and deploys nothing."""
        started_ns = time.time_ns()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        state = self._source.snapshot()
        timings["list"] = time.perf_counter() - start
        running = [c.id for c in state.containers]
        self._marks = prune(self._marks, running, self._clock(), self._settings.stop_grace)
        mark = time.perf_counter()
        topology = build_topology(state, self._build, self._marks, self._overrides())
        config = render_config(topology, self._template, self._render, self._render_cache)
        timings["render"] = time.perf_counter() - mark
        digest = checksum(config)
        previous = self.snapshot
        changed = previous is None or previous.checksum != digest or previous.topology != topology
        if (
            changed
            and previous is not None
            and held is not None
            and held(previous.topology, topology)
        ):
            return self._publish(
                ReconcileReport(
                    reason,
                    previous.version,
                    changed=False,
                    deployed=(),
                    timings=timings,
                    trigger=trigger,
                    started_ns=started_ns,
                    checksum=previous.checksum,
                    held=describe_changes(previous.topology, topology),
                )
            )
        snapshot = previous
        changes: tuple[str, ...] = ()
        if snapshot is None or changed:
            version = previous.version + 1 if previous else 1
            zone = build_zone(topology, self._settings.dns_domain, self._settings.dns_ttl, version)
            snapshot = Snapshot(version, topology, config, digest, zone, serving(topology))
            self.snapshot = snapshot
            before = previous.topology if previous else Topology()
            changes = describe_changes(before, topology)
            for change in changes:
                log.info("%s", change)
            _log_news(topology, before)
        if on_snapshot is not None:
            on_snapshot(snapshot)
        mark = time.perf_counter()
        deployed = self._deploy(snapshot)
        timings["deploy"] = time.perf_counter() - mark
        return self._publish(
            ReconcileReport(
                reason,
                snapshot.version,
                changed=changed,
                deployed=deployed,
                timings=timings,
                trigger=trigger,
                started_ns=started_ns,
                checksum=digest,
                changes=changes,
            )
        )

    def _publish(self, report: ReconcileReport) -> ReconcileReport:
        for callback in self.on_report:
            callback(report)
        return report

    def _deploy(self, snapshot: Snapshot) -> tuple[DeployResult, ...]:
        """Deploy to each nginx whose last good config differs, unless it failed with this
        very config and its wait (core.served) is not over."""
        digest, now = snapshot.checksum, self._clock()
        keys = {(t.container_id, t.started_at): t for t in snapshot.topology.nginx}
        self._deployed = {k: v for k, v in self._deployed.items() if k in keys}
        self._failed = {k: v for k, v in self._failed.items() if k in keys}
        self._running = {k: v for k, v in self._running.items() if k in keys}
        self._deployer.retain({t.container_id for t in snapshot.topology.nginx})
        pending = [
            (key, target)
            for key, target in keys.items()
            if deploy_due(digest, self._deployed.get(key), self._failed.get(key), now)
        ]
        results: list[DeployResult] = []
        if pending:
            content = snapshot.config.encode()
            with ThreadPoolExecutor(max_workers=min(8, len(pending))) as pool:
                results = list(pool.map(lambda p: self._deployer.deploy(p[1], content), pending))
        for (key, _), result in zip(pending, results, strict=True):
            if result.ok:
                self._deployed[key] = digest
                self._running[key] = snapshot
                self._failed.pop(key, None)
            else:
                self._failed[key] = failed(
                    self._failed.get(key),
                    digest,
                    snapshot.version,
                    result.error or "failed",
                    result.refused,
                    self._clock(),
                )
        self.nginx = {
            target.container_id: NginxState(
                target.container,
                target.container_id,
                self._running[key].version if key in self._running else None,
                self._running[key].serves if key in self._running else None,
                self._failed.get(key),
            )
            for key, target in keys.items()
        }
        return tuple(results)


def _warnings(topology: Topology) -> list[str]:
    found = list(topology.warnings)
    for service in topology.services:
        found.extend(f"service {service.name}: {w}" for w in service.warnings)
    return found


def _log_news(topology: Topology, before: Topology) -> None:
    """Log each warning and exclusion once, when it appears, not on every change."""
    seen = set(_warnings(before))
    for warning in _warnings(topology):
        if warning not in seen:
            log.warning("%s", warning)
    old = set(before.excluded)
    for exclusion in topology.excluded:
        if exclusion not in old:
            log.warning(
                "container %s%s left out: %s",
                exclusion.container,
                f" (service {exclusion.service})" if exclusion.service else "",
                exclusion.reason,
            )


STREAM_RESTORED = "stream-restored"
STOP = "stop"


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


class ControlLoop:
    """Runs the event watcher thread and the reconcile loop until `stop()`."""

    def __init__(self, reconciler: Reconciler, events: EventStream, settings: Settings) -> None:
        self._reconciler = reconciler
        self._events = events
        self._settings = settings
        # SimpleQueue: stop() puts from a signal handler, and its put is reentrant.
        self._queue: queue.SimpleQueue[DockerEvent | PassTicket | str] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._closing = threading.Lock()
        self._closed = False
        """Set, under `_closing`, once the loop drains its queue for good: no ticket is put
        after that, so none is left unanswered."""
        self._batching = BatchPolicy(settings.batch_quiet, settings.batch_max)
        self._held: Held | None = None
        self._last_added = float("-inf")
        """Monotonic time a change that added backends last went out, for core.batching."""
        self._last_event_ns = 0
        """Arrival of the latest event, to tell a quiet stream's first event."""
        self.ready = threading.Event()
        self.healthy = False
        """True while the last pass could reach Docker."""
        self.on_failure: list[Callable[[str, str], None]] = []

    def stop(self) -> None:
        self._stopping.set()
        self._events.close_events()
        self._queue.put(STOP)

    def request(self, reason: str, resync: bool = False) -> PassTicket:
        """Ask for a pass now, without waiting for a quiet event stream; `resync` re-inspects
        everything first."""
        ticket = PassTicket(reason, resync)
        with self._closing:
            if self._closed or self._stopping.is_set():
                ticket.fail("the controller is stopping")
            else:
                self._queue.put(ticket)
        return ticket

    def run(self) -> None:
        watcher = threading.Thread(target=self._watch, name="docker-events", daemon=True)
        watcher.start()
        self._pass("start")
        self.ready.set()
        next_resync = time.monotonic() + self._settings.resync_interval
        while not self._stopping.is_set():
            wake = (
                next_resync
                if self._held is None
                else min(next_resync, due(self._held, self._batching))
            )
            try:
                item = self._queue.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                item = None
            held = self._held
            if item is None and held is not None and time.monotonic() >= due(held, self._batching):
                self._pass("held new backends")
            if item is not None:
                reason, tickets = self._coalesce(item)
                # No reason: only events of containers and networks it does not watch.
                if reason and not self._stopping.is_set():
                    self._pass(reason, item if isinstance(item, DockerEvent) else None, tickets)
                for ticket in tickets:
                    ticket.fail("the controller is stopping")  # a no-op once it finished
            if time.monotonic() >= next_resync and not self._stopping.is_set():
                # Due even while events keep coming: it is what repairs a missed one.
                self._reconciler.invalidate()
                self._pass("periodic resync")
                next_resync = time.monotonic() + self._settings.resync_interval
        with self._closing:
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, PassTicket):
                item.fail("the controller is stopping")
        watcher.join(timeout=5)

    def _coalesce(self, first: DockerEvent | PassTicket | str) -> tuple[str, list[PassTicket]]:
        """Drain the burst that `first` opens; returns a short description of it (empty when
        nothing in it concerns this controller) and the tickets it answers. A ticket ends the
        wait for quiet: someone is waiting for it."""
        started = time.monotonic()
        events = 0
        restored = False
        leading = (
            isinstance(first, DockerEvent)
            and first.received_ns - self._last_event_ns >= self._settings.quiet_window * 1e9
        )
        tickets: list[PassTicket] = []
        item: DockerEvent | PassTicket | str | None = first
        while item is not None:
            if isinstance(item, DockerEvent):
                if self._reconciler.handle_event(item):
                    events += 1
                    self._last_event_ns = max(self._last_event_ns, item.received_ns)
            elif isinstance(item, PassTicket):
                tickets.append(item)
                if item.resync:
                    self._reconciler.invalidate()
                else:
                    self._reconciler.retry_refused()
            elif item == STREAM_RESTORED:
                restored = True
                self._reconciler.invalidate()
            elif item == STOP:
                return STOP, tickets
            deadline = min(
                time.monotonic() + self._settings.quiet_window, started + self._settings.max_wait
            )
            try:
                if tickets or leading:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
        parts = [STREAM_RESTORED] if restored else []
        parts.extend(dict.fromkeys(t.reason for t in tickets))
        if events:
            parts.append(f"{events} event(s)")
        return " + ".join(parts), tickets

    def _pass(
        self,
        reason: str,
        trigger: DockerEvent | None = None,
        tickets: list[PassTicket] | None = None,
    ) -> None:
        waiting = tickets or []

        def planned(snapshot: Snapshot) -> None:
            for ticket in waiting:
                ticket.plan(snapshot)

        before = self._reconciler.snapshot
        try:
            report = self._reconciler.reconcile(
                reason, trigger, planned, None if waiting else self._hold
            )
        except Exception as error:
            self._failed(reason, error, waiting)
            return
        self.healthy = True
        if not report.held:
            self._held = None
        after = self._reconciler.snapshot
        # The first pass finds every backend at once: that is no scale-out.
        if report.changed and before and after:
            if removes_backends(before.topology, after.topology):
                self._last_added = float("-inf")
            elif adds_backends(before.topology, after.topology):
                self._last_added = time.monotonic()
        for ticket in waiting:
            ticket.finish(report)
        if report.changed or report.deployed:
            log.info(
                "reconciled (%s): version %d, %d nginx updated, %.1f ms",
                reason,
                report.version,
                len(report.deployed),
                sum(report.timings.values()) * 1000,
            )

    def _hold(self, current: Topology, wanted: Topology) -> bool:
        """Asked by a pass (not one an operator is waiting for) that found a change."""
        self._held = hold(
            current, wanted, time.monotonic(), self._last_added, self._held, self._batching
        )
        return self._held is not None

    def _failed(self, reason: str, error: Exception, tickets: list[PassTicket]) -> None:
        """A failed pass releases a hold: the next pass (an event, a resync) finds it again;
        kept, its due time would start a failing pass after another at once."""
        self._held = None
        if isinstance(error, DockerUnavailable):
            self.healthy = False
            log.warning("reconcile (%s) skipped: %s", reason, error)
        elif isinstance(error, ControlPlaneError):
            log.error("reconcile (%s) failed, nginx keeps its config: %s", reason, error)
        else:
            log.exception("reconcile (%s) crashed, nginx keeps its config; please report", reason)
        for ticket in tickets:
            ticket.fail(str(error))
        for callback in self.on_failure:
            callback(reason, str(error))

    def _watch(self) -> None:
        """Follows the event stream; after a break, reconnects with backoff and resyncs, since
        events may have been missed while it was down (or before it first opened)."""
        delay = 0.1
        missed = True  # the first pass listed before the stream opened: resync once it is
        while not self._stopping.is_set():
            try:
                stream = self._events.open_events()
                if missed:
                    log.info("Docker event stream reconnected; resyncing")
                    self._queue.put(STREAM_RESTORED)
                delay = 0.1
                for event in stream:
                    self._queue.put(event)
                raise DockerUnavailable("the Docker event stream ended (dockerd restarting?)")
            except Exception as error:
                if self._stopping.is_set():
                    return
                self.healthy = False  # until a pass reaches Docker again
                log.warning("%s; reconnecting in %.1f s", error, delay)
            missed = True
            self._stopping.wait(delay)
            delay = min(delay * 2, 5.0)
