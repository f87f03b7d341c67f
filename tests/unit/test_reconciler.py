"""The reconcile pass and the coalescing loop, with fakes for Docker and nginx."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from controlplane.core.model import DockerState, NginxTarget
from controlplane.docker_source import DockerEvent
from controlplane.errors import DockerUnavailable
from controlplane.nginx_deployer import DeployResult
from controlplane.reconciler import ControlLoop, Reconciler
from controlplane.settings import Settings
from controlplane.templating import load_template
from tests.unit.builders import container, nginx, state


class FakeSource:
    def __init__(self, current: DockerState) -> None:
        self.state = current
        self.invalidated: list[str | None] = []

    def snapshot(self) -> DockerState:
        return self.state

    def invalidate(self, container_id: str | None = None) -> None:
        self.invalidated.append(container_id)


class FakeDeployer:
    def __init__(self) -> None:
        self.deployed: list[tuple[str, bytes]] = []
        self.refuse = False

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        self.deployed.append((target.container, content))
        if self.refuse:
            return DeployResult(target.container, False, "nginx -t failed")
        return DeployResult(target.container, True)

    def retain(self, container_ids: set[str]) -> None:
        pass


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


def test_refused_config_is_not_retried_until_it_changes_or_a_resync() -> None:
    source, deployer, reconciler = make(nginx("lb"), container("w1"))
    deployer.refuse = True
    assert not reconciler.reconcile("start").deployed[0].ok
    assert reconciler.reconcile("event").deployed == ()
    reconciler.invalidate()
    assert len(reconciler.reconcile("resync").deployed) == 1
    source.state = state(nginx("lb"), container("w1"), container("w2", ip="172.20.0.3"))
    assert len(reconciler.reconcile("event").deployed) == 1


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


class FakeEvents:
    """Yields the scripted events, then blocks until closed; `breaks` first opens fail."""

    def __init__(self, events: list[DockerEvent], gap: float = 0.0, breaks: int = 0) -> None:
        self.events = events
        self.gap = gap
        self.breaks = breaks
        self.opened = 0
        self.closed = threading.Event()

    def open_events(self) -> Iterator[DockerEvent]:
        self.opened += 1
        if self.opened <= self.breaks:
            raise DockerUnavailable("dockerd restarting")
        return self._stream()

    def _stream(self) -> Iterator[DockerEvent]:
        for item in self.events:
            time.sleep(self.gap)
            yield item
        self.events = []
        self.closed.wait(10)

    def close_events(self) -> None:
        self.closed.set()


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
    burst = [event(f"{i:064x}", "start") for i in range(50)]
    reasons = run_loop(FakeEvents(burst, gap=0.002), 0.6)
    assert reasons == ["start", "stream-restored + 50 event(s)"]


@pytest.mark.parametrize("max_wait", [0.2, 0.3])
def test_a_long_burst_is_cut_at_the_maximum_wait(max_wait: float) -> None:
    burst = [event(f"{i:064x}", "start") for i in range(40)]  # ~0.8 s of events 20 ms apart
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
