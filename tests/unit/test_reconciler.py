"""The reconcile pass and the coalescing loop, with fakes for Docker and nginx."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from controlplane.core.model import ContainerFacts
from controlplane.docker_source import DockerEvent
from controlplane.reconciler import ControlLoop, Reconciler, ReconcileReport
from controlplane.settings import Settings
from controlplane.templating import load_template
from tests.unit.builders import container, container_id, nginx, state
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


def test_networks_are_listed_again_only_after_a_network_event() -> None:
    web = container("w1")
    source, _, reconciler = make(nginx("lb"), web)
    reconciler.handle_event(event(web.id, "start"))
    reconciler.handle_event(DockerEvent("network", "create", "", None, 0))
    reconciler.handle_event(DockerEvent("network", "connect", web.id, None, 0))
    assert source.invalidated == [web.id, "networks", "networks", web.id]


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


def run_loop(events: FakeEvents, seconds: float, **settings: float) -> list[str]:
    _, _, reconciler = make(nginx("lb"), container("w1"))
    reasons: list[str] = []
    reconciler.on_report.append(lambda report: reasons.append(report.reason))
    loop = ControlLoop(reconciler, events, replace(Settings(), **settings))
    thread = threading.Thread(target=loop.run)
    thread.start()
    time.sleep(seconds)
    loop.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    return reasons


def test_a_burst_of_events_gives_one_reconcile() -> None:
    burst = [event(container("w1").id, "health_status") for _ in range(50)]
    reasons = run_loop(FakeEvents(burst, gap=0.002), 0.6)
    assert reasons == ["start", "stream-restored + 50 event(s)"]


@pytest.mark.parametrize("max_wait", [0.2, 0.3])
def test_a_long_burst_is_cut_at_the_maximum_wait(max_wait: float) -> None:
    burst = [event(container("w1").id, "health_status") for _ in range(40)]  # ~0.8 s, 20 ms apart
    reasons = run_loop(FakeEvents(burst, gap=0.02), 1.5, max_wait=max_wait)
    passes = len(reasons) - 1  # the first burst also carries the resync after the stream opened
    assert 0.8 / max_wait - 1 <= passes <= 0.8 / max_wait + 2, reasons


def test_a_broken_stream_is_reopened_and_resynced() -> None:
    events = FakeEvents([], breaks=2)
    reasons = run_loop(events, 1.0)
    assert events.opened == 3
    assert reasons == ["start", "stream-restored"]


def test_the_periodic_resync_runs_while_events_keep_coming() -> None:
    storm = [event(f"{i:064x}", "start") for i in range(200)]  # ~2 s of events 10 ms apart
    reasons = run_loop(FakeEvents(storm, gap=0.01), 1.5, resync_interval=0.3, max_wait=0.2)
    assert reasons.count("periodic resync") >= 2, reasons


@contextlib.contextmanager
def running(loop: ControlLoop) -> Iterator[ControlLoop]:
    """The loop on a daemon thread, stopped even when the test fails."""
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        assert loop.ready.wait(5)
        yield loop
    finally:
        loop.stop()
        thread.join(timeout=5)


def test_a_requested_pass_skips_the_quiet_window_and_reports() -> None:
    source, _, reconciler = make(nginx("lb"), container("w1"))
    settings = replace(Settings(), quiet_window=5.0, max_wait=10.0)
    loop = ControlLoop(reconciler, FakeEvents([]), settings)
    with running(loop):
        ticket = loop.request("api", resync=True)
        assert ticket.done.wait(2), "a ticket must not wait for the 5 s quiet window"
        assert ticket.error is None and ticket.report is not None
        assert ticket.snapshot is not None and "api" in ticket.report.reason
        assert None in source.invalidated
    late = loop.request("api")
    assert late.done.is_set() and late.error == "the controller is stopping"


def test_a_failed_pass_fails_its_tickets_and_marks_the_loop_unhealthy() -> None:
    source, _, reconciler = make(nginx("lb"), container("w1"))
    loop = ControlLoop(reconciler, FakeEvents([]), Settings())
    failures: list[str] = []
    loop.on_failure.append(lambda reason, error: failures.append(error))
    with running(loop):
        assert loop.healthy
        source.unavailable = True
        ticket = loop.request("api")
        assert ticket.done.wait(2)
        assert ticket.error == "the fake engine is down" and not loop.healthy
        assert failures == ["the fake engine is down"]


def watched(
    *containers: object, **settings: float
) -> tuple[FakeSource, FakeEvents, ControlLoop, list[ReconcileReport]]:
    source, _, reconciler = make(*containers)
    reports: list[ReconcileReport] = []
    reconciler.on_report.append(reports.append)
    events = FakeEvents([])
    return source, events, ControlLoop(reconciler, events, replace(Settings(), **settings)), reports


def settle(reports: list[ReconcileReport], count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(reports) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(reports) >= count, [r.reason for r in reports]


def test_an_event_after_a_quiet_stream_is_applied_without_the_quiet_window() -> None:
    source, events, loop, reports = watched(nginx("lb"), container("w1"), quiet_window=1.0)
    with running(loop):
        settle(reports, 2)  # the first pass, then the resync once the stream opened
        time.sleep(1.1)
        source.state = state(nginx("lb"), container("w1"), container("w2", ip="172.20.0.3"))
        events.push(event(container_id("w2"), "start"))
        settle(reports, 3)
    report = reports[2]
    assert report.trigger is not None and report.changed
    waited = (report.started_ns - report.trigger.received_ns) / 1e9
    assert waited < 0.5, f"the pass waited {waited:.2f} s for a 1 s quiet window"


def test_new_backends_soon_after_a_change_are_held_and_applied_together() -> None:
    lb, w1 = nginx("lb"), container("w1")
    more = [container(f"n{i}", ip=f"172.20.1.{i}") for i in range(3)]
    source, events, loop, reports = watched(
        lb, w1, quiet_window=0.01, batch_quiet=0.4, batch_max=5.0
    )
    with running(loop):
        settle(reports, 2)
        time.sleep(0.5)  # calm: the next new backend goes at once
        source.state = state(lb, w1, container("w2", ip="172.20.0.3"))
        events.push(event(container_id("w2"), "start"))
        settle(reports, 3)
        for i, newcomer in enumerate(more):
            source.state = state(lb, w1, container("w2", ip="172.20.0.3"), *more[: i + 1])
            events.push(event(newcomer.id, "start"))
            time.sleep(0.1)
        deadline = time.monotonic() + 3
        while not reports[-1].changed and time.monotonic() < deadline:
            time.sleep(0.01)
    applied = [r for r in reports[2:] if r.changed]
    held = [r for r in reports[2:] if r.held]
    assert len(applied) == 2, [(r.reason, r.changed, r.held) for r in reports]
    assert held and any("+ n0" in line for line in held[0].held)
    assert applied[-1].reason == "held new backends"
    assert [c.split(" (")[0] for c in applied[-1].changes] == [
        f"service web: + n{i}" for i in range(3)
    ]


LB, W1, W2 = nginx("lb"), container("w1"), container("w2", ip="172.20.0.3")
W3, W4 = container("w3", ip="172.20.0.4"), container("w4", ip="172.20.0.5")


def change(
    source: FakeSource,
    events: FakeEvents,
    reports: list[ReconcileReport],
    containers: tuple[ContainerFacts, ...],
    happened: DockerEvent,
) -> None:
    """Docker now shows `containers`, after the event `happened`; waits for its pass."""
    source.state = state(*containers)
    events.push(happened)
    settle(reports, len(reports) + 1)


def test_a_leaving_backend_ends_a_hold_at_once() -> None:
    source, events, loop, reports = watched(
        LB, W1, W2, quiet_window=0.01, batch_quiet=5.0, batch_max=30.0
    )
    with running(loop):
        settle(reports, 2)
        # after a calm start-up: at once; then right after w3: held
        change(source, events, reports, (LB, W1, W2, W3), event(W3.id, "start"))
        change(source, events, reports, (LB, W1, W2, W3, W4), event(W4.id, "start"))
        change(source, events, reports, (LB, W1, W3, W4), event(W2.id, "kill", "15"))
    assert reports[2].changed and reports[3].held and not reports[3].changed
    assert reports[4].changed
    assert [c.split(" (")[0] for c in reports[4].changes] == [
        "service web: + w4",
        "service web: - w2",
    ]


def test_a_newcomer_right_after_a_backend_left_goes_at_once() -> None:
    """A replacement (as in a rolling update) restores capacity: not held like a scale-out."""
    source, events, loop, reports = watched(
        LB, W1, W2, quiet_window=0.01, batch_quiet=5.0, batch_max=30.0
    )
    with running(loop):
        settle(reports, 2)
        change(source, events, reports, (LB, W1, W2, W3), event(W3.id, "start"))
        change(source, events, reports, (LB, W1, W3), event(W2.id, "kill", "15"))
        # within batch_quiet of w3, but w2 left since
        change(source, events, reports, (LB, W1, W3, W4), event(W4.id, "start"))
    assert all(r.changed and not r.held for r in reports[2:5]), [
        (r.reason, r.changed, r.held) for r in reports
    ]


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


def test_a_burst_of_unwatched_events_runs_no_pass() -> None:
    other = container("x1", network="other", ip="172.30.0.2")
    settings = Settings(networks=frozenset({"app"}), quiet_window=0.01)
    source = FakeSource(state(nginx("lb"), container("w1"), other))
    reconciler = Reconciler(source, FakeDeployer(), load_template(), settings)
    reports: list[ReconcileReport] = []
    reconciler.on_report.append(reports.append)
    events = FakeEvents([])
    loop = ControlLoop(reconciler, events, settings)
    with running(loop):
        settle(reports, 2)
        for _ in range(5):
            events.push(event(other.id, "health_status"))
        events.push(event(container("w1").id, "health_status"))
        settle(reports, 3)
        time.sleep(0.1)
    assert [r.reason for r in reports] == ["start", "stream-restored", "1 event(s)"]
