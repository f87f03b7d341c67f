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
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import jinja2

from controlplane.core.batching import BatchPolicy, Held
from controlplane.core.build import BuildMemo, build_topology
from controlplane.core.dataplane import (
    PROBE_CONFIG,
    ModeChoice,
    Push,
    Pushed,
    StateCache,
    choose,
    delta_path,
    next_push,
    probe_verdict,
    state_path,
)
from controlplane.core.diff import describe_changes
from controlplane.core.dns_records import build_zone
from controlplane.core.health import Health
from controlplane.core.labels import DATAPLANE
from controlplane.core.lifecycle import ContainerEvent, StopMark, apply_event, prune
from controlplane.core.model import (
    ContainerFacts,
    DataPlane,
    DockerState,
    NginxTarget,
    Overrides,
    Topology,
)
from controlplane.core.render import RenderCache, StatsSink, render_config
from controlplane.core.schedule import Holding, Outcome, Run, Schedule, Timing, Wait
from controlplane.core.served import (
    Failure,
    NginxState,
    Serves,
    deploy_due,
    failed,
    served_by_reload,
    serving,
)
from controlplane.docker_source import DOCKER_ERRORS, DockerEvent
from controlplane.errors import ControlPlaneError, DockerUnavailable
from controlplane.nginx_deployer import DeployResult
from controlplane.settings import Settings
from controlplane.snapshot import PassTicket, ReconcileReport, Snapshot

log = logging.getLogger(__name__)

SWARM_POLL = 0.25
"""Seconds between two listings of a converging Swarm service: a task on its way to running
is served within about this much of the manager listing it running (the pass its container's
start event wakes on this node usually comes before that). A pass lists every task: at 100
tasks that is ~20 ms each, ~8% of a core, while a service converges only."""


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

    def push_all(
        self, targets: Sequence[NginxTarget], state: bytes, delta: bool = False
    ) -> tuple[DeployResult, ...]:
        """The dynamic data plane's state, or a delta over it, into each target, within the
        same deadlines."""
        ...

    def probe_all(self, targets: Sequence[NginxTarget], probe: bytes) -> tuple[DeployResult, ...]:
        """Whether each target takes `probe` as its config (ok), or refuses it (refused)."""
        ...

    def retain(self, container_ids: set[str]) -> None: ...

    def close(self) -> None: ...


class Gate(Protocol):
    """The readiness gate (Gatekeeper, or a fake in tests)."""

    def admit(self, topology: Topology, first: bool) -> Topology:
        """The topology with the backends it holds out; `first`: the controller's first pass,
        whose backends an nginx may already serve."""
        ...

    def health(self) -> Mapping[tuple[str, str], Health]: ...

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
        gate: Gate | None = None,
        stats: Callable[[Sequence[NginxTarget]], StatsSink | None] | None = None,
    ) -> None:
        """`overrides` returns the operator's current choices (the store's value); `gate`
        holds new backends out until they are ready (None: nothing is held); `stats` says
        where the managed nginx send their traffic figures (None: they send none)."""
        self._source = source
        self._gate = gate
        self._stats = stats
        self._overrides = overrides
        self._deployer = deployer
        self._template = template
        self._settings = settings
        self._build = settings.build_options
        self._render = settings.render_options
        self._render_cache = RenderCache()
        self._dynamic: dict[str, tuple[RenderCache, int, str, str]] = {}
        """By state path: the dynamic config's cache, and the last text with its version."""
        self._state_cache = StateCache()
        self._state_epoch = secrets.randbits(20) << 32
        """Makes the state file's versions this controller's own: the Lua loader applies any
        version other than the one it has, and a restarted controller counts from 1 again."""
        self._modes: dict[tuple[str, str], ModeChoice] = {}
        self._pushed: dict[tuple[str, str], int] = {}
        self._given: dict[tuple[str, str], Pushed] = {}
        """What each dynamic nginx was given: the base its deltas are over."""
        self._push_failed: dict[tuple[str, str], Failure] = {}
        self._build_memo = BuildMemo()
        self._clock = clock
        self._converging = False
        """The last listing found a Swarm service still converging."""
        self._marks: dict[str, StopMark] = {}
        self._deployed: dict[tuple[str, str], str] = {}
        self._failed: dict[tuple[str, str], Failure] = {}
        self._running: dict[tuple[str, str], Snapshot] = {}
        """The snapshot whose config each nginx (id, start) last took from this controller."""
        self.snapshot: Snapshot | None = None
        self.nginx: Mapping[str, NginxState] = {}
        """By container id, swapped whole after each pass's deploys; read without locks."""
        self.on_report: list[Callable[[ReconcileReport], None]] = []
        self.on_snapshot: list[Callable[[Snapshot], None]] = []
        """Called as a pass settles on a new snapshot, before its deploys (not to block)."""

    def handle_event(self, event: DockerEvent) -> bool:
        """Whether the event can change what this controller serves: one for a container or
        network it does not watch (another controller's, or nobody's) costs no pass."""
        if event.kind == "network":
            if event.action in ("create", "destroy"):
                self._source.invalidate_networks()  # what a connect changes is the container's
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
        """Ends the shells kept open in nginx containers, and the gate's probes."""
        self._deployer.close()
        if self._gate is not None:
            self._gate.close()

    def health(self) -> Mapping[tuple[str, str], Health]:
        """By (container id, network): each checked backend's health."""
        return self._gate.health() if self._gate is not None else {}

    def invalidate(self) -> None:
        """Re-inspect everything: for resyncs and reconnects. A config nginx refused is tried
        again only when its wait is over (core.served), not on every resync."""
        self._source.invalidate()

    def retry_at(self) -> float:
        """The earliest time a failed deploy or push is due again (math.inf: none). One due
        already had its chance in the pass that just ran: if it is still there, that pass did
        not want it (another text is wanted now), and waking for it would loop."""
        now = self._clock()
        failures = [*self._failed.values(), *self._push_failed.values()]
        return min((f.retry_at for f in failures if f.retry_at > now), default=math.inf)

    def poll_at(self) -> float:
        """When a Swarm service the last pass found converging is listed again (math.inf:
        none is): its tasks on other nodes change state without an event here."""
        return self._clock() + SWARM_POLL if self._converging else math.inf

    def retry_refused(self) -> None:
        """Deploy again to nginx that refused the current config: an operator asked for a
        pass (the API), so the answer must say what nginx says now, not what it said before."""
        self._failed = {k: replace(f, retry_at=float("-inf")) for k, f in self._failed.items()}
        self._push_failed = {
            k: replace(f, retry_at=float("-inf")) for k, f in self._push_failed.items()
        }

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
        self._converging = any(s.converging for s in state.swarm_services or ())
        running = [c.id for c in state.containers]
        self._marks = prune(self._marks, running, self._clock(), self._settings.stop_grace)
        mark = time.perf_counter()
        topology = build_topology(
            state, self._build, self._marks, self._overrides(), memo=self._build_memo
        )
        if self._gate is not None:
            gating = time.perf_counter()
            topology = self._gate.admit(topology, first=self.snapshot is None)
            timings["ready"] = time.perf_counter() - gating
        if self._stats is not None:
            sink = self._stats(topology.nginx)
            if sink != self._render.stats:
                self._render = replace(self._render, stats=sink)
        config = render_config(topology, self._template, self._render, self._render_cache)
        timings["render"] = time.perf_counter() - mark - timings.get("ready", 0.0)
        digest = checksum(config)
        previous = self.snapshot
        if previous is not None and previous.checksum == digest and previous.topology == topology:
            return Plan(reason, trigger, started_ns, timings, previous, previous)
        # A scale-out is held only for nginx that reload: a dynamic one takes it for free.
        if holding is not None and not self._any_reload(topology):
            holding = None
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
        lines = (
            self._state_cache.lines(
                topology.services, frozenset(n for t in topology.nginx for n in t.networks)
            )
            if self._any_dynamic(topology)
            else ()
        )
        snapshot = Snapshot(version, topology, config, digest, zone, serving(topology), lines)
        self.snapshot = snapshot
        for callback in self.on_snapshot:
            callback(snapshot)
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
        current: tuple[str, ...] = ()
        timings = dict(plan.timings)
        if plan.held is None:
            mark = time.perf_counter()
            deployed, current = self._deploy(plan.snapshot)
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
                current=current,
            )
        )

    def _publish(self, report: ReconcileReport) -> ReconcileReport:
        for callback in self.on_report:
            callback(report)
        return report

    def _requested(self, target: NginxTarget) -> tuple[DataPlane, str]:
        if target.dataplane is not None:
            return target.dataplane, f"its label {DATAPLANE}={target.dataplane.value}"
        return self._settings.dataplane, f"--dataplane {self._settings.dataplane.value}"

    def _mode(self, target: NginxTarget) -> DataPlane | None:
        """Its data plane; None for an `auto` nginx not probed yet in this start."""
        known = self._modes.get((target.container_id, target.started_at))
        if known is not None:
            return known.mode
        requested, _ = self._requested(target)
        return None if requested is DataPlane.AUTO else requested

    def _any_reload(self, topology: Topology) -> bool:
        return any(self._mode(t) is not DataPlane.DYNAMIC for t in topology.nginx)

    def any_reload(self) -> bool:
        """Whether some nginx of the current snapshot reloads for a change (or may: its mode
        is not known yet), which is what coalescing events is for (core.schedule)."""
        return self.snapshot is None or self._any_reload(self.snapshot.topology)

    def _any_dynamic(self, topology: Topology) -> bool:
        return any(self._mode(t) is not DataPlane.RELOAD for t in topology.nginx)

    def _probe(self, targets: Sequence[NginxTarget]) -> None:
        """Settles each target's data plane, once per container start: `auto` asks nginx
        whether it takes a config that needs Lua. A probe that could not run (the way in
        failed) is tried again next pass; meanwhile that nginx gets the reload config."""
        unknown = [t for t in targets if (t.container_id, t.started_at) not in self._modes]
        auto = []
        for target in unknown:
            requested, source = self._requested(target)
            if requested is DataPlane.AUTO:
                auto.append((target, source))
            else:
                self._modes[target.container_id, target.started_at] = choose(
                    requested, source, None
                )
        if not auto:
            return
        results = self._deployer.probe_all([target for target, _ in auto], PROBE_CONFIG.encode())
        for (target, source), result in zip(auto, results, strict=True):
            lua = probe_verdict(result.ok, result.error or "")
            if lua is not None:
                choice = choose(DataPlane.AUTO, source, lua, result.error or "")
                self._modes[target.container_id, target.started_at] = choice
                log.info(
                    "nginx %s runs the %s data plane: %s", target.container, choice.mode, choice.why
                )
            else:
                log.warning(
                    "nginx %s: could not tell whether it has Lua (%s); it gets the reload config "
                    "until a probe tells",
                    target.container,
                    result.error,
                )

    def _dynamic_config(self, snapshot: Snapshot, config_path: str) -> tuple[str, str]:
        """The dynamic config for nginx whose config goes to `config_path`, and its
        checksum; made once per snapshot."""
        path = state_path(config_path)
        cache, version, text, digest = self._dynamic.get(path, (RenderCache(), 0, "", ""))
        if version != snapshot.version or not text:
            options = replace(
                self._render, dynamic=True, state_path=path, delta_path=delta_path(config_path)
            )
            text = render_config(snapshot.topology, self._template, options, cache)
            digest = checksum(text)
        self._dynamic[path] = (cache, snapshot.version, text, digest)
        return text, digest

    def _deploy(self, snapshot: Snapshot) -> tuple[tuple[DeployResult, ...], tuple[str, ...]]:
        """Each nginx gets what its data plane needs and does not have yet: a reload one the
        config, a dynamic one the state (pushed first, so that new workers find it) and the
        dynamic config when its text changed. A config that failed is not sent again before
        its wait (core.served) is over. Returns what was sent, and the nginx that run the
        snapshot now."""
        now = self._clock()
        keys = {(t.container_id, t.started_at): t for t in snapshot.topology.nginx}
        known_by_key = (
            self._deployed,
            self._failed,
            self._running,
            self._modes,
            self._pushed,
            self._given,
        )
        for known in known_by_key:
            for key in [k for k in known if k not in keys]:
                del known[key]
        self._push_failed = {k: v for k, v in self._push_failed.items() if k in keys}
        self._deployer.retain({t.container_id for t in snapshot.topology.nginx})
        self._probe(list(keys.values()))
        dynamic = {k: t for k, t in keys.items() if self._mode(t) is DataPlane.DYNAMIC}
        texts: dict[str, str] = {}
        wanted: dict[tuple[str, str], str] = {}
        for key, target in keys.items():
            if key in dynamic:
                text, digest = self._dynamic_config(snapshot, target.config_path)
            else:
                text, digest = snapshot.config, snapshot.checksum
            texts[digest], wanted[key] = text, digest
        paths = {state_path(t.config_path) for t in dynamic.values()}
        self._dynamic = {p: entry for p, entry in self._dynamic.items() if p in paths}
        results = list(self._push(snapshot, dynamic, wanted, now))
        by_text: dict[str, list[tuple[tuple[str, str], NginxTarget]]] = {}
        for key, target in keys.items():
            # A dynamic config without its state would route nothing: it waits for a push.
            if key in dynamic and key not in self._pushed:
                continue
            digest = wanted[key]
            if deploy_due(digest, self._deployed.get(key), self._failed.get(key), now):
                by_text.setdefault(digest, []).append((key, target))
        for digest, pending in by_text.items():
            deployed = self._deployer.deploy_all(
                [target for _, target in pending], texts[digest].encode()
            )
            for (key, _), result in zip(pending, deployed, strict=True):
                if result.ok:
                    self._deployed[key] = digest
                    self._failed.pop(key, None)
                    if key not in dynamic or self._pushed.get(key) == snapshot.version:
                        self._running[key] = snapshot
                else:
                    self._failed[key] = failed(
                        self._failed.get(key),
                        digest,
                        snapshot.version,
                        result.error or "failed",
                        result.refused,
                        self._clock(),
                    )
            results.extend(deployed)
        self.nginx = {
            target.container_id: NginxState(
                target.container,
                target.container_id,
                self._running[key].version if key in self._running else None,
                self._serves(key, target),
                self._failed.get(key) or self._push_failed.get(key),
                self._modes.get(key),
            )
            for key, target in keys.items()
        }
        current = tuple(
            target.container
            for key, target in keys.items()
            if self._deployed.get(key) == wanted[key]
            and (key not in dynamic or self._pushed.get(key) == snapshot.version)
        )
        return tuple(results), current

    def config_of(self, snapshot: Snapshot, target: NginxTarget) -> str | None:
        """The config `target` is given by `snapshot`: the dynamic one once it runs that data
        plane, else the snapshot's; None when the dynamic one for that snapshot is not made
        (yet, or any more). Read by the API's thread: it only reads dicts that passes
        replace or add to."""
        if self._mode(target) is not DataPlane.DYNAMIC:
            return snapshot.config
        entry = self._dynamic.get(state_path(target.config_path))
        return entry[2] if entry is not None and entry[1] == snapshot.version else None

    def _serves(self, key: tuple[str, str], target: NginxTarget) -> Serves | None:
        """What the nginx serves by the snapshot it runs, as its data plane can."""
        running = self._running.get(key)
        if running is None:
            return None
        if self._mode(target) is DataPlane.DYNAMIC:
            return running.serves
        return served_by_reload(running.serves, running.topology)

    def _push(
        self,
        snapshot: Snapshot,
        dynamic: Mapping[tuple[str, str], NginxTarget],
        wanted: Mapping[tuple[str, str], str],
        now: float,
    ) -> tuple[DeployResult, ...]:
        """The state to each dynamic nginx that does not have this snapshot's yet: the whole
        state after its start, else a delta over what it was given (core.dataplane.next_push),
        or nothing when its services are as they were."""
        digest = f"state {snapshot.version}"
        version = self._state_epoch + snapshot.version
        by_push: dict[tuple[bool, str], list[tuple[tuple[str, str], NginxTarget, Push]]] = {}
        results: list[DeployResult] = []
        for key, target in dynamic.items():
            if self._pushed.get(key) == snapshot.version or not deploy_due(
                digest, None, self._push_failed.get(key), now
            ):
                continue
            push = next_push(self._given.get(key), version, snapshot.state)
            if push is None:
                self._pushed_ok(key, snapshot, wanted[key])
                continue
            by_push.setdefault((push.delta, push.text), []).append((key, target, push))
        for (delta, text), pending in by_push.items():
            done = self._deployer.push_all([t for _, t, _ in pending], text.encode(), delta)
            for (key, _, push), result in zip(pending, done, strict=True):
                results.append(replace(result, pushed=True))
                if result.ok:
                    self._given[key] = push.after
                    self._pushed_ok(key, snapshot, wanted[key])
                    continue
                # It may have landed all the same (a reply lost after the rename): what the
                # nginx has is not known, so the next push is a whole state.
                self._given.pop(key, None)
                self._push_failed[key] = failed(
                    self._push_failed.get(key),
                    digest,
                    snapshot.version,
                    f"could not push the backends: {result.error}",
                    False,
                    self._clock(),
                )
        return tuple(results)

    def _pushed_ok(self, key: tuple[str, str], snapshot: Snapshot, wanted: str) -> None:
        self._pushed[key] = snapshot.version
        self._push_failed.pop(key, None)
        if self._deployed.get(key) == wanted:  # it runs the dynamic config
            self._running[key] = snapshot


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
    READINESS = "a backend's readiness changed"
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

    def readiness_changed(self) -> None:
        """The gate let a backend in or out between passes: a pass is due at once."""
        self._queue.put(Notice.READINESS)

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
        elif item is Notice.READINESS:
            self._schedule = self._schedule.prompt(self._clock(), item.value)

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
        outcome = Outcome.of(
            before,
            plan.snapshot.topology,
            plan.held,
            self._reconciler.retry_at(),
            self._reconciler.any_reload(),
            self._reconciler.poll_at(),
        )
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
