"""The reconcile pass and the loop that runs it, with fakes for Docker and nginx: the loop's
steps on a fake clock (when a pass runs is core.schedule's, tested in test_schedule), and one
run of its threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from controlplane.core.model import ContainerFacts, NginxTarget
from controlplane.core.schedule import POLL
from controlplane.docker_source import DockerEvent
from controlplane.nginx_deployer import DeployResult
from controlplane.reconciler import (
    STOPPING,
    Arrival,
    ControlLoop,
    Notice,
    Reconciler,
)
from controlplane.settings import Settings
from controlplane.snapshot import PassTicket, ReconcileReport
from controlplane.templating import load_template
from tests.unit.builders import container, network, nginx, state, swarm_service, task
from tests.unit.fakes import FakeDeployer, FakeEvents, FakeSource


def make(*containers: object) -> tuple[FakeSource, FakeDeployer, Reconciler]:
    source = FakeSource(state(*containers))  # type: ignore[arg-type]
    deployer = FakeDeployer()
    return source, deployer, Reconciler(source, deployer, load_template(), Settings())


def event(container_id: str, action: str, signal: str | None = None) -> DockerEvent:
    return DockerEvent("container", action, container_id, signal, 0)


def test_deploys_once_per_config_and_nginx() -> None:
    source, deployer, reconciler = make(
        nginx("lb1"), nginx("lb2", ip="172.20.0.101"), container("w1")
    )
    first = reconciler.reconcile("start")
    assert first.changed and first.version == 1
    assert sorted(name for name, _ in deployer.deployed) == ["lb1", "lb2"]
    again = reconciler.reconcile("timer")
    assert not again.changed and again.deployed == () and again.version == 1

    source.state = state(
        nginx("lb1"),
        nginx("lb2", ip="172.20.0.101"),
        container("w1"),
        container("w2", ip="172.20.0.3"),
    )
    third = reconciler.reconcile("event")
    assert third.changed and third.version == 2 and len(third.deployed) == 2


def test_a_pass_says_which_nginx_run_its_snapshot_even_when_an_earlier_pass_loaded_it() -> None:
    """A pass that started after a change was saved takes it first; the pass asked for it then
    sends nothing, and must still say that the nginx runs it (the API's `reloaded`)."""
    source, _, reconciler = make(nginx("lb"), container("w1"))
    assert reconciler.reconcile("start").current == ("lb",)
    source.state = state(nginx("lb"), container("w1"), container("w2", ip="172.20.0.3"))
    earlier = reconciler.reconcile("resync")
    asked = reconciler.reconcile("api: web hash")
    assert [d.container for d in earlier.deployed] == ["lb"]
    assert asked.deployed == () and asked.version == earlier.version
    assert asked.current == ("lb",)


def test_restarted_nginx_gets_the_config_again() -> None:
    source, _, reconciler = make(nginx("lb"), container("w1"))
    reconciler.reconcile("start")
    restarted = replace(nginx("lb"), started_at="2030-01-01T00:00:00.000000000Z")
    source.state = state(restarted, container("w1"))
    assert len(reconciler.reconcile("start event").deployed) == 1


def test_refused_config_waits_doubling_times_not_every_resync() -> None:
    """nginx -t refuses the same text the same way: it goes again after 60 s, 120 s, ...
    (core.served), at once when it changes or an operator asks (the API's passes)."""
    now = [100.0]
    source = FakeSource(state(nginx("lb"), container("w1")))
    deployer = FakeDeployer()
    reconciler = Reconciler(source, deployer, load_template(), Settings(), clock=lambda: now[0])
    deployer.refuse = True
    assert not reconciler.reconcile("start").deployed[0].ok
    assert reconciler.reconcile("event").deployed == ()
    reconciler.invalidate()
    assert reconciler.reconcile("resync").deployed == ()
    now[0] += 60
    assert len(reconciler.reconcile("resync").deployed) == 1
    now[0] += 60
    assert reconciler.reconcile("resync").deployed == ()
    now[0] += 60
    assert len(reconciler.reconcile("resync").deployed) == 1
    failure = reconciler.nginx[nginx("lb").id].failure
    assert failure is not None and failure.attempts == 3 and failure.refused
    assert failure.retry_at == now[0] + 240
    reconciler.retry_refused()
    assert len(reconciler.reconcile("api").deployed) == 1
    source.state = state(nginx("lb"), container("w1"), container("w2", ip="172.20.0.3"))
    assert len(reconciler.reconcile("event").deployed) == 1
    assert reconciler.nginx[nginx("lb").id].failure.attempts == 1  # type: ignore[union-attr]


def test_each_nginx_says_what_it_runs_beside_what_is_wanted() -> None:
    w1, w2 = container("w1"), container("w2", ip="172.20.0.3")
    source, deployer, reconciler = make(nginx("lb"), w1)
    reconciler.reconcile("start")
    lb = reconciler.nginx[nginx("lb").id]
    assert lb.version == 1 and lb.failure is None
    assert lb.serves == {"web": frozenset({w1.id})}
    deployer.refuse = True
    source.state = state(nginx("lb"), w1, w2)
    reconciler.reconcile("event")
    snapshot = reconciler.snapshot
    assert snapshot is not None and snapshot.serves == {"web": frozenset({w1.id, w2.id})}
    lb = reconciler.nginx[nginx("lb").id]
    assert lb.version == 1 and lb.serves == {"web": frozenset({w1.id})}
    assert lb.failure is not None and lb.failure.version == 2
    assert lb.in_sync("web", snapshot.serves) is False
    deployer.refuse = False
    reconciler.retry_refused()
    reconciler.reconcile("api")
    lb = reconciler.nginx[nginx("lb").id]
    assert lb.in_sync("web", snapshot.serves) and lb.failure is None and lb.version == 2


def test_networks_are_listed_again_only_after_one_is_created_or_destroyed() -> None:
    """A connect changes the container (inspected again), not the list of networks."""
    web = container("w1")
    source, _, reconciler = make(nginx("lb"), web)
    reconciler.handle_event(event(web.id, "start"))
    reconciler.handle_event(DockerEvent("network", "create", "", None, 0))
    reconciler.handle_event(DockerEvent("network", "connect", web.id, None, 0))
    reconciler.handle_event(DockerEvent("network", "destroy", "", None, 0))
    assert source.invalidated == [web.id, "networks", web.id, "networks"]


def test_kill_event_takes_a_backend_out_before_it_stops_running() -> None:
    web = container("w1")
    source, _, reconciler = make(nginx("lb"), web, container("w2", ip="172.20.0.3"))
    reconciler.reconcile("start")
    reconciler.handle_event(event(web.id, "kill", "15"))
    assert source.invalidated == [web.id]
    reconciler.reconcile("kill")
    assert reconciler.snapshot is not None
    assert "# w1" not in reconciler.snapshot.config and "# w2" in reconciler.snapshot.config
    reconciler.handle_event(event(web.id, "start"))
    reconciler.reconcile("start")
    assert "# w1" in reconciler.snapshot.config


def test_reload_signal_does_not_take_a_backend_out() -> None:
    web = container("w1")
    _, _, reconciler = make(nginx("lb"), web)
    reconciler.handle_event(event(web.id, "kill", "1"))
    reconciler.reconcile("hup")
    assert reconciler.snapshot is not None and "# w1" in reconciler.snapshot.config


def test_containers_and_networks_it_does_not_watch_cost_no_pass() -> None:
    """With --network app: another network's containers are another controller's. A
    container seen before is judged by what it was (no engine call); a new one is inspected
    once, and the pass reuses that."""
    other = container("x1", network="other", labels={"controlplane.weigth": "3"})
    source, _, reconciler = make(nginx("lb"), container("w1"), other)
    reconciler = Reconciler(
        source, FakeDeployer(), load_template(), Settings(networks=frozenset({"app"}))
    )
    reconciler.reconcile("start")
    assert reconciler.snapshot is not None and reconciler.snapshot.topology.warnings == ()
    assert not reconciler.handle_event(event(other.id, "die"))
    assert source.inspected == [other.id]  # it was known before: judged by what it was
    newcomer = container("x2", network="other", ip="172.30.0.2")
    source.state = state(nginx("lb"), container("w1"), other, newcomer)
    assert not reconciler.handle_event(event(newcomer.id, "start"))
    assert reconciler.handle_event(event(container("w1").id, "kill", "15"))
    assert not reconciler.handle_event(
        DockerEvent("network", "connect", newcomer.id, None, 0, network="other")
    )
    assert reconciler.handle_event(
        DockerEvent("network", "connect", newcomer.id, None, 0, network="app")
    )
    assert not reconciler.handle_event(event("f" * 64, "destroy"))  # gone before it was seen


LB, W1, W2 = nginx("lb"), container("w1"), container("w2", ip="172.20.0.3")
W3, W4 = container("w3", ip="172.20.0.4"), container("w4", ip="172.20.0.5")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Driven:
    """A loop whose steps the test takes itself, on a fake clock: no thread, no sleep."""

    clock: Clock
    source: FakeSource
    reconciler: Reconciler
    loop: ControlLoop
    reports: list[ReconcileReport]

    def at(self, now: float, *items: DockerEvent | PassTicket | Notice) -> float:
        """At `now`, the loop takes `items` (events arrive then), then runs what is due;
        returns when the next pass is due if nothing comes first."""
        self.clock.now = now
        for item in items:
            self.loop.take(Arrival(now, item) if isinstance(item, DockerEvent) else item)
        return self.loop.run_due()

    def shows(self, *containers: ContainerFacts) -> None:
        self.source.state = state(*containers)

    @property
    def passes(self) -> list[tuple[str, bool, bool]]:
        """Each pass's reason, whether it applied a change and whether it held one back."""
        return [(r.reason, r.changed, bool(r.held)) for r in self.reports]


def driven(
    *containers: ContainerFacts, deployer: FakeDeployer | None = None, **settings: object
) -> Driven:
    """Started at 100.0: the first pass ran, the next resync is due at 130.0."""
    clock = Clock(100.0)
    chosen = replace(
        Settings(quiet_window=0.5, max_wait=2.0, batch_quiet=2.0, batch_max=10.0),
        **settings,  # type: ignore[arg-type]
    )
    source = FakeSource(state(*containers))
    reconciler = Reconciler(
        source, deployer or FakeDeployer(), load_template(), chosen, clock=clock
    )
    reports: list[ReconcileReport] = []
    reconciler.on_report.append(reports.append)
    loop = ControlLoop(reconciler, FakeEvents([]), chosen, clock=clock)
    run = Driven(clock, source, reconciler, loop, reports)
    assert run.at(100.0) == 130.0
    return run


def test_an_event_after_quiet_goes_at_once_and_the_ones_after_it_wait_for_quiet() -> None:
    run = driven(LB, W1)
    run.shows(LB, W1, W2)
    assert run.at(105.0, event(W2.id, "start")) == 130.0
    assert run.at(105.25, event(W1.id, "health_status")) == 105.75
    assert run.at(105.5, event(W1.id, "health_status")) == 106.0
    assert run.at(106.0) == 130.0
    assert run.passes == [
        ("start", True, False),
        ("1 event(s)", True, False),
        ("2 event(s)", False, False),
    ]
    trigger = run.reports[1].trigger
    assert trigger is not None and trigger.container_id == W2.id


def test_a_converging_swarm_service_is_listed_every_quarter_second_until_it_settles() -> None:
    lb = nginx("lb", network="ov", ip="10.0.1.100")
    running, starting = task("web", 1, "10.0.1.3"), task("web", 2, "10.0.1.4", state="starting")
    run = driven(lb, batch_max=0.0)  # no scale-out hold: the task goes in when it runs
    run.source.state = replace(
        state(lb, networks=("bridge", network("ov", "overlay"))),
        swarm_services=(swarm_service("web", running, starting),),
    )
    assert run.at(105.0, DockerEvent("service", "update", "", None, 0)) == 105.25
    assert run.at(105.25) == 105.5
    run.source.state = replace(
        run.source.state,
        swarm_services=(swarm_service("web", running, replace(starting, state="running")),),
    )
    assert run.at(105.5) == 130.0
    assert [p[0] for p in run.passes] == ["start", "1 event(s)", POLL, POLL]
    assert [b.ip for b in run.reconciler.snapshot.topology.services[0].backends] == [
        "10.0.1.3",
        "10.0.1.4",
    ]


def test_new_backends_during_a_scale_out_are_held_and_applied_together() -> None:
    more = [container(f"n{i}", ip=f"172.20.1.{i}") for i in range(3)]
    run = driven(LB, W1)
    run.shows(LB, W1, W2)
    run.at(105.0, event(W2.id, "start"))  # after a calm start: at once
    for i, newcomer in enumerate(more):
        run.shows(LB, W1, W2, *more[: i + 1])
        assert run.at(106.0 + i, event(newcomer.id, "start")) == 108.0 + i
        assert run.reports[-1].deployed == ()
    assert [c.split(" (")[0] for c in run.reports[2].held] == ["service web: + n0"]
    assert run.reconciler.snapshot is not None and run.reconciler.snapshot.version == 2
    assert run.at(110.0) == 130.0
    assert run.passes[1:] == [
        ("1 event(s)", True, False),
        ("1 event(s)", False, True),
        ("1 event(s)", False, True),
        ("1 event(s)", False, True),
        ("held new backends", True, False),
    ]
    assert [c.split(" (")[0] for c in run.reports[-1].changes] == [
        f"service web: + n{i}" for i in range(3)
    ]


def test_a_leaving_backend_ends_a_hold_at_once() -> None:
    run = driven(LB, W1, W2)
    run.shows(LB, W1, W2, W3)
    run.at(105.0, event(W3.id, "start"))
    run.shows(LB, W1, W2, W3, W4)
    assert run.at(106.0, event(W4.id, "start")) == 108.0
    run.shows(LB, W1, W3, W4)
    assert run.at(107.0, event(W2.id, "kill")) == 130.0
    assert run.passes[1:] == [
        ("1 event(s)", True, False),
        ("1 event(s)", False, True),
        ("1 event(s)", True, False),
    ]
    assert [c.split(" (")[0] for c in run.reports[-1].changes] == [
        "service web: + w4",
        "service web: - w2",
    ]


class Planned(FakeDeployer):
    """Notes whether each ticket had its snapshot when the deploys started."""

    def __init__(self, tickets: list[PassTicket]) -> None:
        super().__init__()
        self.tickets = tickets
        self.seen: list[bool] = []

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        self.seen.extend(t.planned.is_set() for t in self.tickets)
        return super().deploy(target, content)


def test_a_ticket_does_not_wait_for_quiet_and_hears_its_snapshot_before_the_deploys() -> None:
    ticket = PassTicket("api", resync=True)
    deployer = Planned([ticket])
    run = driven(LB, W1, deployer=deployer)
    run.source.invalidated.clear()
    run.at(105.0, event(W1.id, "health_status"))
    run.shows(LB, W1, W2)
    assert run.at(105.25, event(W2.id, "start")) == 105.75
    assert run.at(105.5, ticket) == 130.0
    assert ticket.done.is_set() and ticket.error is None
    assert ticket.report is run.reports[-1] and ticket.report.reason == "api + 1 event(s)"
    assert ticket.snapshot is not None and ticket.snapshot.version == 2
    assert deployer.seen == [False, True], "the ticket heard its snapshot before the deploy"
    assert None in run.source.invalidated, "a resync ticket inspects everything again"


def test_a_failed_pass_fails_its_tickets_and_marks_the_loop_unhealthy() -> None:
    run = driven(LB, W1)
    failures: list[str] = []
    run.loop.on_failure.append(lambda reason, error: failures.append(error))
    assert run.loop.healthy
    run.source.unavailable = True
    ticket = PassTicket("api")
    run.at(105.0, ticket)
    assert ticket.done.is_set() and ticket.error == "the fake engine is down"
    assert failures == ["the fake engine is down"] and not run.loop.healthy
    run.source.unavailable = False
    run.at(130.0)
    assert run.loop.healthy and run.reports[-1].reason == "periodic resync"


def test_a_resync_and_the_stream_back_inspect_everything_again() -> None:
    run = driven(LB, W1)
    run.source.invalidated.clear()
    assert run.at(110.0, Notice.RESTORED) == 110.5
    assert run.source.invalidated == [None]
    assert run.at(110.5) == 130.0
    assert run.at(130.0) == 160.0
    assert run.source.invalidated == [None, None]
    assert [r.reason for r in run.reports] == ["start", "stream-restored", "periodic resync"]


def test_events_it_does_not_watch_cost_no_pass() -> None:
    other = container("x1", network="other", ip="172.30.0.2")
    run = driven(LB, W1, other, networks=frozenset({"app"}))
    for i in range(5):
        assert run.at(105.0 + i / 4, event(other.id, "health_status")) == 130.0
    assert run.at(107.0, event(W1.id, "health_status")) == 130.0
    assert [r.reason for r in run.reports] == ["start", "1 event(s)"]


def test_stop_answers_every_waiting_ticket() -> None:
    run = driven(LB, W1)
    taken, queued = PassTicket("taken"), run.loop.request("queued")
    run.loop.take(taken)  # in the schedule, its pass not run yet
    run.loop.stop()
    run.loop.run()
    assert taken.error == STOPPING and queued.error == STOPPING
    late = run.loop.request("late")
    assert late.done.is_set() and late.error == STOPPING


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_the_loop_and_its_watcher_on_their_threads() -> None:
    """The real clock and queue: the stream breaks twice, is reopened and resynced; an event
    and a ticket get their passes; stop() ends both threads."""
    source, _, reconciler = make(LB, W1)
    reports: list[ReconcileReport] = []
    reconciler.on_report.append(reports.append)
    events = FakeEvents([], breaks=2)
    loop = ControlLoop(reconciler, events, Settings(quiet_window=0.01))
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        assert loop.ready.wait(5)
        poll(lambda: any(r.reason == "stream-restored" for r in reports), "the resync")
        assert events.opened == 3
        source.state = state(LB, W1, W2)
        events.push(event(W2.id, "start"))
        poll(lambda: any("event(s)" in r.reason for r in reports), "the event's pass")
        ticket = loop.request("api")
        assert ticket.done.wait(5) and ticket.error is None and loop.healthy
    finally:
        loop.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert loop.request("late").error == STOPPING


class Broken:
    """An event stream with a bug: it raises what no engine error is."""

    def __init__(self) -> None:
        self.opened = 0

    def open_events(self) -> Iterator[DockerEvent]:
        self.opened += 1
        raise KeyError("Actor")

    def close_events(self) -> None:
        pass


def test_a_bug_in_the_watcher_ends_it_and_the_loop_shows_unhealthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not taken for a lost engine: no reconnecting; logged with its traceback, and the loop
    stays unhealthy while its passes go on."""
    _, _, reconciler = make(LB, W1)
    stream = Broken()
    loop = ControlLoop(reconciler, stream, Settings())
    thread = threading.Thread(target=loop.run)
    with caplog.at_level(logging.CRITICAL, logger="controlplane.reconciler"):
        thread.start()
        try:
            poll(lambda: bool(caplog.records), "the watcher's crash")
            ticket = loop.request("api")
            assert ticket.done.wait(5) and ticket.error is None
            assert not loop.healthy and stream.opened == 1
        finally:
            loop.stop()
            thread.join(timeout=5)
    [record] = caplog.records
    assert "watcher crashed" in record.getMessage() and record.exc_info is not None
