"""The readiness gate in the reconcile pass and the loop, with a fake prober on a fake clock:
a newcomer that accepts at once is served by the pass that found it; one that does not is
held, and the probe that later connects wakes the loop for a pass at once. And the TCP prober
itself, on loopback."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from controlplane.activity import Activity
from controlplane.api.app import create_app
from controlplane.cli_client import service_text
from controlplane.core import labels as L
from controlplane.core.build import build_topology
from controlplane.core.health import Address, Outcome, ReadinessPolicy, Result
from controlplane.core.model import BackendState, ContainerFacts, HealthCheck, HealthMode, Overrides
from controlplane.docker_source import DockerEvent
from controlplane.gatekeeper import Gatekeeper
from controlplane.metrics import Metrics
from controlplane.prober import SocketProber, outcome_of
from controlplane.reconciler import Arrival, ControlLoop, Notice, Reconciler
from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from controlplane.store import OverrideStore
from controlplane.templating import load_template
from controlplane.wiring import api_context
from tests.unit.builders import container, nginx, state
from tests.unit.fakes import FakeDeployer, FakeEvents, FakeProber, FakeSource

LB = nginx("lb")
W1 = container("w1", ip="172.20.0.2")
W2 = container("w2", ip="172.20.0.3")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Run:
    """A reconciler with a gate and its loop, whose steps the test takes on a fake clock."""

    def __init__(self, prober: FakeProber, *containers: ContainerFacts) -> None:
        self.clock = Clock(100.0)
        self.prober = prober
        self.source = FakeSource(state(*containers))
        self.gate = Gatekeeper(
            prober,
            wait=0.0,
            clock=self.clock,
            wall=lambda: 1e9,
            draw=lambda: 0.5,
            background=False,
        )
        settings = Settings(quiet_window=0.5, max_wait=2.0)
        self.reconciler = Reconciler(
            self.source,
            FakeDeployer(),
            load_template(),
            settings,
            clock=self.clock,
            gate=self.gate,
        )
        self.reports: list[ReconcileReport] = []
        self.reconciler.on_report.append(self.reports.append)
        self.loop = ControlLoop(self.reconciler, FakeEvents([]), settings, clock=self.clock)
        self.woken: list[float] = []
        self.gate.on_change.append(lambda: self.woken.append(self.clock.now))
        self.at(100.0)

    def at(self, now: float, *items: DockerEvent | Notice) -> None:
        self.clock.now = now
        for item in items:
            self.loop.take(Arrival(now, item) if isinstance(item, DockerEvent) else item)
        self.loop.run_due()

    def starts(self, facts: ContainerFacts, now: float) -> None:
        self.source.state = state(*self.source.state.containers, facts)
        self.at(now, DockerEvent("container", "start", facts.id, None, 0))

    def served(self) -> set[str]:
        snapshot = self.reconciler.snapshot
        assert snapshot is not None
        return {
            b.container
            for s in snapshot.topology.services
            for b in s.backends
            if b.container_id in snapshot.serves[s.name]
        }

    def state_of(self, name: str) -> BackendState:
        snapshot = self.reconciler.snapshot
        assert snapshot is not None
        return next(
            b.state for s in snapshot.topology.services for b in s.backends if b.container == name
        )


def test_a_newcomer_that_accepts_is_served_by_the_pass_that_found_it() -> None:
    run = Run(
        FakeProber({"172.20.0.2": Outcome.CONNECTED, "172.20.0.3": Outcome.CONNECTED}), LB, W1
    )
    run.starts(W2, 105.0)
    assert run.served() == {"w1", "w2"}
    assert [r.reason for r in run.reports] == ["start", "1 event(s)"]
    assert "service web: + w2 (172.20.0.3:80, up)" in run.reports[-1].changes
    assert "ready" in run.reports[-1].timings
    assert run.woken == []


def test_a_newcomer_that_does_not_accept_yet_is_held_and_its_first_connect_wakes_the_loop() -> None:
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED})
    run = Run(prober, LB, W1)
    run.starts(W2, 105.0)
    assert run.served() == {"w1"} and run.state_of("w2") is BackendState.STARTING
    hold = run.reconciler.health()[W2.id, "app"]
    assert hold.reason is not None
    assert hold.reason.startswith("waiting for port 80 to accept a connection (since 0.0 s")
    prober.answer("172.20.0.3", Outcome.REFUSED)
    assert run.woken == []
    run.clock.now = 105.06
    assert run.gate.tick() == 105.0 + 60  # the probe is in flight: only the start period
    assert len([a for a in prober.sent if a.host == "172.20.0.3"]) == 2
    run.clock.now = 105.07
    prober.answer("172.20.0.3", Outcome.CONNECTED)
    assert run.woken == [105.07]
    run.at(105.07, Notice.READINESS)  # what loop.readiness_changed queues
    run.at(105.57)  # the nginx here reloads: its quiet window first
    assert run.reports[-1].reason == "a backend's readiness changed"
    assert run.served() == {"w1", "w2"}
    assert "service web: w2 starting -> up" in run.reports[-1].changes
    assert {k: h.state for k, h in run.reconciler.health().items()} == {
        (W1.id, "app"): "up",
        (W2.id, "app"): "up",
    }


def test_backends_served_before_a_controller_restart_stay_served_while_probed() -> None:
    prober = FakeProber()
    run = Run(prober, LB, W1, W2)
    assert run.served() == {"w1", "w2"}
    prober.answer("172.20.0.2", Outcome.CONNECTED)
    prober.answer("172.20.0.3", Outcome.TIMEOUT)
    assert run.woken == []
    assert run.served() == {"w1", "w2"}


def test_a_backend_that_never_accepts_gives_up_after_its_start_period() -> None:
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED, "172.20.0.3": Outcome.REFUSED})
    run = Run(prober, LB, W1)
    run.starts(replace(W2, labels={L.HEALTH_START_PERIOD: "3s"}), 105.0)
    for step in range(1, 60):
        run.clock.now = 105.0 + step * 0.05
        run.gate.tick()
    assert run.woken == [] and len(prober.sent) > 50
    run.clock.now = 108.0
    run.gate.tick()
    assert run.woken == [108.0]
    run.at(108.0, Notice.READINESS)
    run.at(108.5)  # the quiet window of an nginx that reloads
    assert run.state_of("w2") is BackendState.UNHEALTHY
    assert run.reconciler.health()[W2.id, "app"].reason == (
        "never accepted a connection on port 80 within the start period (3s); it stays out "
        "until it restarts"
    )


def test_health_none_serves_a_newcomer_without_a_probe() -> None:
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED})
    run = Run(prober, LB, replace(W1, labels={L.HEALTH: "none"}))
    run.starts(W2, 105.0)
    assert run.served() == {"w1", "w2"} and prober.sent == []


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_the_gate_on_its_threads_lets_a_late_listener_in_within_a_few_probes() -> None:
    """Real clock, real threads: the probe thread retries every ~50 ms and the loop runs the
    pass that serves the backend once one connects."""
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED, "172.20.0.3": Outcome.REFUSED})
    source = FakeSource(state(LB, W1))
    gate = Gatekeeper(prober, wait=0.01, policy=ReadinessPolicy(interval=0.02))
    settings = Settings(quiet_window=0.01)
    reconciler = Reconciler(source, FakeDeployer(), load_template(), settings, gate=gate)
    events = FakeEvents([])
    loop = ControlLoop(reconciler, events, settings)
    gate.on_change.append(loop.readiness_changed)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        assert loop.ready.wait(5)
        source.state = state(LB, W1, W2)
        events.push(DockerEvent("container", "start", W2.id, None, 0))
        poll(lambda: len([a for a in prober.sent if a.host == "172.20.0.3"]) >= 3, "retries")
        snapshot = reconciler.snapshot
        assert snapshot is not None and snapshot.serves["web"] == {W1.id}
        prober.answers["172.20.0.3"] = Outcome.CONNECTED
        poll(
            lambda: (
                reconciler.snapshot is not None
                and reconciler.snapshot.serves["web"] == {W1.id, W2.id}
            ),
            "the pass that serves w2",
        )
    finally:
        loop.stop()
        thread.join(timeout=5)
        reconciler.close()
    assert not thread.is_alive()


def test_the_api_and_the_cli_show_a_held_backend_and_why() -> None:
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED})
    run = Run(prober, LB, W1)
    run.starts(W2, 105.0)
    run.clock.now = 106.5
    settings = Settings()
    activity, store = Activity(), OverrideStore(None)
    metrics = Metrics(lambda: run.reconciler.snapshot, nginx=lambda: run.reconciler.nginx)
    app = create_app(api_context(settings, run.reconciler, run.loop, store, activity, metrics))
    reply = app.test_client().get("/api/v1/services/web").get_json()
    w1, w2 = reply["backends"]
    assert (w1["state"], w1["reason"], w1["since"]) == ("up", None, None)
    assert w2["state"] == "starting"
    assert w2["reason"] == "waiting for port 80 to accept a connection (since 1.5 s)"
    assert w2["since"] == "2001-09-09T01:46:38.500+00:00"  # wall 1e9, 1.5 s before
    text = service_text(reply)
    assert f"w2 (app) is starting: {w2['reason']}" in text.splitlines()


def test_the_tcp_prober_tells_a_listening_port_from_a_closed_one() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    open_port = listening.getsockname()[1]
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    answers: dict[int, Outcome] = {}
    done = threading.Event()

    def record(address: Address, result: Result) -> None:
        answers[address.port] = result.outcome
        if len(answers) == 2:
            done.set()

    prober = SocketProber()
    try:
        for port in (open_port, closed_port):
            prober.probe(Address("c", "s", "n", "127.0.0.1", port), HealthCheck(), record)
        assert done.wait(5)
    finally:
        prober.close()
        listening.close()
    assert answers == {open_port: Outcome.CONNECTED, closed_port: Outcome.REFUSED}


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Outcome.REFUSED),
        (OSError(errno.EHOSTUNREACH, "no route to host"), Outcome.HOST_UNREACHABLE),
        (OSError(errno.ENETUNREACH, "network is unreachable"), Outcome.NETWORK_UNREACHABLE),
        (OSError(errno.EADDRNOTAVAIL, "cannot assign"), Outcome.FAILED),
    ],
    ids=["refused", "host", "network", "other"],
)
def test_connect_errors_and_what_they_say(error: OSError, outcome: Outcome) -> None:
    assert outcome_of(error) is outcome


def test_each_probe_is_counted_by_outcome() -> None:
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED, "172.20.0.3": Outcome.REFUSED})
    run = Run(prober, LB, W1)
    metrics = Metrics(lambda: run.reconciler.snapshot)
    run.gate.on_probe.append(metrics.on_probe)
    run.starts(W2, 105.0)
    run.clock.now = 105.1
    run.gate.tick()
    text = metrics.exposition().decode()
    assert 'controlplane_health_probes_total{result="fail"} 2.0' in text
    assert 'controlplane_health_probe_failures_total{reason="refused"} 2.0' in text


def test_an_active_check_takes_a_failing_backend_out_and_says_so_once() -> None:
    checked = {L.HEALTH_PATH: "/health", L.HEALTH_INTERVAL: "1s", L.HEALTH_FAILS: "2"}
    w1, w2 = replace(W1, labels=checked), replace(W2, labels=checked)
    good = Result(Outcome.STATUS, 200, 0.001)
    prober = FakeProber({"172.20.0.2": good, "172.20.0.3": good})
    run = Run(prober, LB, w1, w2)
    moves: list[tuple[str, str, str | None]] = []
    run.gate.on_transition.append(lambda key, h: moves.append((key.host, h.state, h.reason)))
    assert run.served() == {"w1", "w2"}
    assert all(c.path == "/health" for c in prober.checks)
    prober.answers["172.20.0.3"] = Result(Outcome.STATUS, 500, 0.001)
    for now in (101.0, 102.0, 103.0):
        run.clock.now = now
        run.gate.tick()
    assert run.woken == [102.0] and moves == [
        (
            "172.20.0.3",
            "down",
            "failed 2 checks in a row (last: status 500); back in after 2 passing in a row "
            "(0 so far)",
        )
    ]
    run.at(102.0, Notice.READINESS)
    run.at(102.5)
    assert run.served() == {"w1"} and run.state_of("w2") is BackendState.UNHEALTHY
    health = run.reconciler.health()[W2.id, "app"]
    assert (health.state, health.fails, health.last, health.since) == (
        "down",
        3,
        "status 500",
        1e9 - 0.5,  # down at 102.0, asked at 102.5
    )


def test_turning_a_check_off_tells_the_transition_of_a_down_backend() -> None:
    checked = {L.HEALTH_PATH: "/health", L.HEALTH_INTERVAL: "1s", L.HEALTH_FAILS: "1"}
    w2 = replace(W2, labels=checked)
    good = Result(Outcome.STATUS, 200, 0.001)
    prober = FakeProber({"172.20.0.2": good, "172.20.0.3": good})
    run = Run(prober, LB, W1, w2)  # the check is service-wide: w1 is checked too
    moves: list[tuple[str, str]] = []
    run.gate.on_transition.append(lambda key, h: moves.append((key.host, h.state)))
    prober.answers["172.20.0.3"] = Result(Outcome.STATUS, 500, 0.001)
    run.clock.now = 101.0
    run.gate.tick()
    assert moves == [("172.20.0.3", "down")]
    run.source.state = state(LB, W1, W2)  # the labels are gone: no check any more
    run.at(102.0, DockerEvent("container", "update", W2.id, None, 0))
    assert moves == [("172.20.0.3", "down"), ("172.20.0.3", "up")]
    assert run.served() == {"w1", "w2"}


def test_a_probe_in_flight_when_the_check_changed_is_not_judged_by_the_new_one() -> None:
    checked = {L.HEALTH_PATH: "/health", L.HEALTH_INTERVAL: "1s", L.HEALTH_FAILS: "2"}
    w1, w2 = replace(W1, labels=checked), replace(W2, labels=checked)
    good = Result(Outcome.STATUS, 200, 0.001)
    prober = FakeProber({"172.20.0.2": good, "172.20.0.3": good})
    run = Run(prober, LB, w1, w2)
    del prober.answers["172.20.0.3"]  # its next probe stays in flight
    run.clock.now = 101.0
    run.gate.tick()
    assert {(a.host, c.path) for a, c in zip(prober.sent, prober.checks, strict=True)} == {
        ("172.20.0.2", "/health"),
        ("172.20.0.3", "/health"),
    }
    ready = {**checked, L.HEALTH_PATH: "/ready"}
    w1, w2 = replace(W1, labels=ready), replace(W2, labels=ready)
    run.source.state = state(LB, w1, w2)
    run.at(101.5, DockerEvent("container", "update", W2.id, None, 0))
    sent = [(a.host, c.path) for a, c in zip(prober.sent, prober.checks, strict=True)]
    assert ("172.20.0.3", "/ready") in sent[-2:], "the new check at once, not after the old"
    prober.answer("172.20.0.3", Result(Outcome.STATUS, 404, 0.001))  # both: /health's dropped
    health = run.reconciler.health()[W2.id, "app"]
    assert (health.state, health.fails) == ("up", 1)
    assert run.woken == [] and run.served() == {"w1", "w2"}


class LateProber:
    """Answers CONNECTED a millisecond later, from another thread, as the real one does."""

    def __init__(self) -> None:
        self.sent: list[float] = []

    def probe(self, address: Address, check: HealthCheck, done: Callable[..., None]) -> None:
        self.sent.append(time.monotonic())
        threading.Timer(0.001, done, args=(address, Result(Outcome.CONNECTED))).start()

    def close(self) -> None:
        pass


def test_a_check_made_active_later_is_probed_though_no_thread_ran_before() -> None:
    """Every backend passed in the pass that found it, so no probe thread was needed; an
    active check set afterwards (through the API) must still get its probes answered."""
    prober = LateProber()
    gate = Gatekeeper(prober, wait=0.05)
    try:
        gate.admit(build_topology(state(LB, W1)), first=True)
        active = HealthCheck(HealthMode.TCP, active=True, interval_ms=200)
        overrides = Overrides(health={"web": active})
        gate.admit(build_topology(state(LB, W1), overrides=overrides), first=False)
        poll(lambda: len(prober.sent) >= 5, "probes every 200 ms")
    finally:
        gate.close()


def test_a_failing_callback_does_not_stop_the_probe_thread() -> None:
    prober = FakeProber({"172.20.0.2": Outcome.CONNECTED, "172.20.0.3": Outcome.REFUSED})
    gate = Gatekeeper(prober, wait=0.0, policy=ReadinessPolicy(interval=0.02))

    def boom() -> None:
        raise RuntimeError("a listener failed")

    gate.on_change.append(boom)
    try:
        gate.admit(build_topology(state(LB, W1, W2)), first=False)
        prober.answers["172.20.0.3"] = Outcome.CONNECTED
        poll(lambda: gate.health()[W2.id, "app"].state == "up", "w2 up despite the callback")
        assert gate._thread is not None and gate._thread.is_alive()
    finally:
        gate.close()
