"""One reconcile pass, and the loop that runs one when core.schedule says so.

Level-triggered: an event only wakes the loop; every pass rebuilds the whole desired state
from a fresh listing, renders it, and deploys only to the nginx containers whose last good
config differs. When a pass runs (bursts coalesced, scale-outs held, resyncs) is decided by
core.schedule, a pure policy: the loop here only reads its queue and clock and does what it
says, and the watcher thread feeds the queue from Docker's event stream.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import jinja2

from controlplane.core.batching import BatchPolicy, Held
from controlplane.core.build import BuildMemo, build_topology
from controlplane.core.diff import describe_changes
from controlplane.core.dns_records import build_zone
from controlplane.core.lifecycle import ContainerEvent, StopMark, apply_event, prune
from controlplane.core.model import ContainerFacts, DockerState, NginxTarget, Overrides, Topology
from controlplane.core.render import RenderCache, render_config
from controlplane.core.schedule import Holding, Outcome, Run, Schedule, Timing, Wait
from controlplane.core.served import Failure, NginxState, deploy_due, failed, serving
from controlplane.docker_source import DOCKER_ERRORS, DockerEvent
from controlplane.errors import ControlPlaneError, DockerUnavailable
from controlplane.nginx_deployer import DeployResult
from controlplane.settings import Settings
from controlplane.snapshot import PassTicket, ReconcileReport, Snapshot

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

    def deploy_all(
        self, targets: Sequence[NginxTarget], content: bytes
    ) -> tuple[DeployResult, ...]:
        """Deploys to every target at once; their results in the targets' order, each
        nginx's within the deployer's deadline (a stalled one's is a failure saying so)."""
        ...

    def retain(self, container_ids: set[str]) -> None: ...

    def close(self) -> None: ...


class EventStream(Protocol):
    def open_events(self) -> Iterator[DockerEvent]: ...

    def close_events(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    """A pass up to its deploys: the snapshot it settled on, or the change it held back."""

    reason: str
    trigger: DockerEvent | None
    started_ns: int
    timings: Mapping[str, float]
    before: Snapshot | None
    """The snapshot the pass started from."""
    snapshot: Snapshot
    """The snapshot it settled on: `before` unless it changed."""
    changed: bool = False
    changes: tuple[str, ...] = ()
    held: Held | None = None
    """The scale-out batch it holds back (core.batching): it deploys nothing."""
    held_changes: tuple[str, ...] = ()


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
        self._build_memo = BuildMemo()
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
        self, reason: str, trigger: DockerEvent | None = None, holding: Holding | None = None
    ) -> ReconcileReport:
        """One whole pass: `plan`, then `apply`."""
        return self.apply(self.plan(reason, trigger, holding))

    def plan(
        self, reason: str, trigger: DockerEvent | None = None, holding: Holding | None = None
    ) -> Plan:
        """List, build and render, and settle on a snapshot: a new one is current from here
        on, before any deploy. `trigger`: the first event of the burst this pass answers, if
        any. `holding` (core.schedule) may hold a change back during a scale-out: then the
        pass changes and deploys nothing."""
        started_ns = time.time_ns()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        state = self._source.snapshot()
        timings["list"] = time.perf_counter() - start
        running = [c.id for c in state.containers]
        self._marks = prune(self._marks, running, self._clock(), self._settings.stop_grace)
        mark = time.perf_counter()
        topology = build_topology(
            state, self._build, self._marks, self._overrides(), memo=self._build_memo
        )
        config = render_config(topology, self._template, self._render, self._render_cache)
        timings["render"] = time.perf_counter() - mark
        digest = checksum(config)
        previous = self.snapshot
        if previous is not None and previous.checksum == digest and previous.topology == topology:
            return Plan(reason, trigger, started_ns, timings, previous, previous)
        held = holding.decide(previous.topology, topology) if previous and holding else None
        if previous is not None and held is not None:
            changes = describe_changes(previous.topology, topology)
            return Plan(
                reason,
                trigger,
                started_ns,
                timings,
                previous,
                previous,
                held=held,
                held_changes=changes,
            )
        version = previous.version + 1 if previous else 1
        zone = build_zone(topology, self._settings.dns_domain, self._settings.dns_ttl, version)
        snapshot = Snapshot(version, topology, config, digest, zone, serving(topology))
        self.snapshot = snapshot
        before = previous.topology if previous else Topology()
        changes = describe_changes(before, topology)
        for change in changes:
            log.info("%s", change)
        _log_news(topology, before)
        return Plan(
            reason, trigger, started_ns, timings, previous, snapshot, changed=True, changes=changes
        )

    def apply(self, plan: Plan) -> ReconcileReport:
        """Deploy the plan's snapshot to each nginx where it is due (nowhere when the plan holds
        its change back), and publish the pass's report."""
        deployed: tuple[DeployResult, ...] = ()
        timings = dict(plan.timings)
        if plan.held is None:
            mark = time.perf_counter()
            deployed = self._deploy(plan.snapshot)
            timings["deploy"] = time.perf_counter() - mark
        return self._publish(
            ReconcileReport(
                plan.reason,
                plan.snapshot.version,
                changed=plan.changed,
                deployed=deployed,
                timings=timings,
                trigger=plan.trigger,
                started_ns=plan.started_ns,
                checksum=plan.snapshot.checksum,
                changes=plan.changes,
                held=plan.held_changes,
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
        results = (
            self._deployer.deploy_all([target for _, target in pending], snapshot.config.encode())
            if pending
            else ()
        )
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


class Notice(enum.Enum):
    """What the watcher and `stop()` put in the loop's queue beside events and tickets."""

    RESTORED = "the event stream is back"
    STOP = "stop"


class Arrival(NamedTuple):
    """An event, and when the watcher got it, on the loop's clock."""

    at: float
    event: DockerEvent


Item = Arrival | PassTicket | Notice

ENGINE_ERRORS = (DockerUnavailable, *DOCKER_ERRORS)
"""What the event stream raises when the engine goes away; anything else is a bug."""
RETRY_FIRST, RETRY_LONGEST = 0.1, 5.0
"""Seconds the watcher waits before it reopens a broken stream, doubling each time."""
STOPPING = "the controller is stopping"


class ControlLoop:
    """Runs the event watcher thread and the reconcile loop until `stop()`. The loop reads its
    queue until the schedule's next deadline (core.schedule) and runs the passes it says are
    due; `clock` is the schedule's time (monotonic seconds)."""

    def __init__(
        self,
        reconciler: Reconciler,
        events: EventStream,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reconciler = reconciler
        self._events = events
        self._clock = clock
        self._schedule: Schedule[PassTicket, DockerEvent] = Schedule(
            Timing(
                settings.quiet_window,
                settings.max_wait,
                settings.resync_interval,
                BatchPolicy(settings.batch_quiet, settings.batch_max),
            )
        )
        # SimpleQueue: stop() puts from a signal handler, and its put is reentrant.
        self._queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._closing = threading.Lock()
        self._closed = False
        """Set, under `_closing`, once the loop drains its queue for good: no ticket is put
        after that, so none is left unanswered."""
        self._reaches_docker = False
        """The last pass could reach Docker, and the stream has not broken since."""
        self._watcher_crashed = False
        self.ready = threading.Event()
        self.on_failure: list[Callable[[str, str], None]] = []

    @property
    def healthy(self) -> bool:
        """True while the last pass could reach Docker and the watcher follows its events."""
        return self._reaches_docker and not self._watcher_crashed

    def stop(self) -> None:
        self._stopping.set()
        self._events.close_events()
        self._queue.put(Notice.STOP)

    def request(self, reason: str, resync: bool = False) -> PassTicket:
        """Ask for a pass now, without waiting for a quiet event stream; `resync` re-inspects
        everything first."""
        ticket = PassTicket(reason, resync)
        with self._closing:
            if self._closed or self._stopping.is_set():
                ticket.fail(STOPPING)
            else:
                self._queue.put(ticket)
        return ticket

    def run(self) -> None:
        watcher = threading.Thread(target=self._watch, name="docker-events", daemon=True)
        watcher.start()
        deadline = self.run_due()
        self.ready.set()
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=max(0.0, deadline - self._clock()))
            except queue.Empty:
                deadline = self.run_due()
                continue
            self.take(item)
            deadline = -math.inf  # what is queued behind it joins before any pass runs
        with self._closing:
            self._closed = True
        tickets = list(self._schedule.tickets)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, PassTicket):
                tickets.append(item)
        for ticket in tickets:
            ticket.fail(STOPPING)
        watcher.join(timeout=5)

    def take(self, item: Item) -> None:
        """One input from the queue, told to the schedule; what it asks of the reconciler
        (forget what was inspected, try a refused config again) is done at once. The loop's
        thread calls this and `run_due`; tests call them on a fake clock instead."""
        if isinstance(item, Arrival):
            relevant = self._reconciler.handle_event(item.event)
            self._schedule = self._schedule.event(self._clock(), item.event, item.at, relevant)
        elif isinstance(item, PassTicket):
            if item.resync:
                self._reconciler.invalidate()
            else:
                self._reconciler.retry_refused()
            self._schedule = self._schedule.ticket(self._clock(), item, item.reason)
        elif item is Notice.RESTORED:
            self._reconciler.invalidate()
            self._schedule = self._schedule.restored(self._clock())

    def run_due(self) -> float:
        """Run every pass that is due now, one after another; returns when the next one is
        due if no input comes first."""
        while not self._stopping.is_set():
            schedule, action = self._schedule.next(self._clock())
            if isinstance(action, Wait):
                return action.until
            self._schedule = schedule
            self._pass(action)
        return self._clock()

    def _pass(self, run: Run[PassTicket, DockerEvent]) -> None:
        if run.resync:
            self._reconciler.invalidate()
        try:
            plan = self._reconciler.plan(run.reason, run.trigger, run.holding)
            for ticket in run.tickets:
                ticket.plan(plan.snapshot)
            report = self._reconciler.apply(plan)
        except Exception as error:
            self._schedule = self._schedule.failed(self._clock())
            self._failed(run.reason, error, run.tickets)
            return
        self._reaches_docker = True
        before = plan.before.topology if plan.before else None
        outcome = Outcome.of(before, plan.snapshot.topology, plan.held)
        self._schedule = self._schedule.passed(self._clock(), outcome)
        for ticket in run.tickets:
            ticket.finish(report)
        if report.changed or report.deployed:
            log.info(
                "reconciled (%s): version %d, %d nginx updated, %.1f ms",
                run.reason,
                report.version,
                len(report.deployed),
                sum(report.timings.values()) * 1000,
            )

    def _failed(self, reason: str, error: Exception, tickets: tuple[PassTicket, ...]) -> None:
        if isinstance(error, DockerUnavailable):
            self._reaches_docker = False
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
        """Follows the event stream; after an engine error, reconnects with backoff and
        resyncs, since events may have been missed while it was down (or before it first
        opened). Any other error is a bug: it ends the watcher, and the loop stays unhealthy
        (resyncs still run) so that it shows."""
        delay = RETRY_FIRST
        while not self._stopping.is_set():
            try:
                stream = self._events.open_events()
                # Also the first time: the first pass listed before the stream opened.
                log.info("Docker event stream reconnected; resyncing")
                self._queue.put(Notice.RESTORED)
                delay = RETRY_FIRST
                for event in stream:
                    self._queue.put(Arrival(self._clock(), event))
                raise DockerUnavailable("the Docker event stream ended (dockerd restarting?)")
            except ENGINE_ERRORS as error:
                if self._stopping.is_set():
                    return
                self._reaches_docker = False  # until a pass reaches Docker again
                log.warning("%s; reconnecting in %.1f s", error, delay)
            except Exception:
                if self._stopping.is_set():
                    return  # the stream closed under it by stop()
                self._watcher_crashed = True
                log.critical(
                    "the Docker event watcher crashed; please report this. The controller "
                    "no longer follows events (it still resyncs): restart it",
                    exc_info=True,
                )
                return
            self._stopping.wait(delay)
            delay = min(delay * 2, RETRY_LONGEST)
