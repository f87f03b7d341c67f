"""Real Docker, real nginx: fixtures for the edges.

Without a Docker engine (or, for the tests that restart one, without a private engine of
their own) these tests skip locally, but fail under CI=true: CI must never pass by skipping
the part that matters.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import NoReturn

import docker
import pytest

from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from controlplane.wiring import Controller, build_controller
from images.build import OfflineImages, ensure_images
from tests.support.engine import EngineUnavailable, PrivateEngine
from tests.support.lab import Http, Lab, wait_until
from tests.support.swarm import PrivateSwarm, start_swarm
from tests.support.witness import MachineEngineWitness


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use an engine (through any fixture) carry the `docker` marker."""
    for item in items:
        if {"docker_client", "private_engine", "private_swarm", "two_node_swarm"} & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.docker)


def unavailable(message: str) -> NoReturn:
    """Skip here; fail under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(version="auto")
        client.ping()
    except Exception as error:
        unavailable(f"no Docker engine answers ({error}); start dockerd (see .ci/run)")
    yield client
    client.close()


@pytest.fixture
def private_engine() -> Iterator[PrivateEngine]:
    """An engine of the test's own, for a test that restarts one: the machine's engine is
    never stopped, restarted or reconfigured by a test."""
    try:
        engine = PrivateEngine()
    except EngineUnavailable as error:
        unavailable(f"no private Docker engine: {error}")
    try:
        yield engine
    finally:
        engine.close()


def _swarm(worker: bool) -> Iterator[PrivateSwarm]:
    try:
        swarm = start_swarm(worker=worker)
    except EngineUnavailable as error:
        unavailable(f"no private Docker engine for a swarm: {error}")
    try:
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def _module_swarm() -> Iterator[PrivateSwarm]:
    yield from _swarm(worker=False)


@pytest.fixture(scope="module")
def _module_two_node_swarm() -> Iterator[PrivateSwarm]:
    yield from _swarm(worker=True)


def _shared(swarm: PrivateSwarm) -> Iterator[PrivateSwarm]:
    """The module's swarm for one test, emptied after it; one that can't be emptied is closed,
    and the module's next tests fail at once rather than on what it left."""
    if swarm.closed:
        pytest.fail(
            "this module's swarm is closed: a test closed it, or it could not be emptied after "
            "an earlier test (that test's teardown error says why)"
        )
    yield swarm
    try:
        swarm.reset()
    except BaseException:
        swarm.close()
        raise


@pytest.fixture
def private_swarm(_module_swarm: PrivateSwarm) -> Iterator[PrivateSwarm]:
    """A single-node swarm on an engine of the test's own: swarm mode refuses the machine's
    engine (--live-restore), and a test must not reconfigure it anyway. The tests of a module
    share it (it takes seconds to start and to stop); each finds it empty (reset)."""
    yield from _shared(_module_swarm)


@pytest.fixture
def two_node_swarm(_module_two_node_swarm: PrivateSwarm) -> Iterator[PrivateSwarm]:
    """A manager and a worker, each an engine in a namespace of its own, joined by a link of
    their own: two machines as far as Swarm, gossip and the overlay's VXLAN can tell. Shared
    as private_swarm is."""
    yield from _shared(_module_two_node_swarm)


@pytest.fixture
def machine_witness(
    docker_client: docker.DockerClient, images: OfflineImages
) -> Iterator[MachineEngineWitness]:
    """The machine's dockerd and a sentinel on it, to prove a test left them as they were."""
    witness = MachineEngineWitness(docker_client, images.backend)
    try:
        yield witness
    finally:
        witness.remove()


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> OfflineImages:
    return ensure_images(docker_client)


@pytest.fixture
def lab(
    docker_client: docker.DockerClient, images: OfflineImages, request: pytest.FixtureRequest
) -> Iterator[Lab]:
    """Its nginx run the reload data plane unless the test parametrizes `lab` with
    "dynamic" (indirect), or with both through `both_dataplanes`."""
    lab = Lab(docker_client, images, getattr(request, "param", "reload"))
    yield lab
    lab.cleanup()


@dataclass
class RunningController:
    """A controller running in this process, so tests can read its snapshot and reports."""

    controller: Controller
    thread: threading.Thread
    reports: list[ReconcileReport] = field(default_factory=list)
    stopped: bool = False

    @property
    def config(self) -> str:
        snapshot = self.controller.reconciler.snapshot
        return snapshot.config if snapshot else ""

    def applied(self, *fragments: str) -> bool:
        """True when the current config has every fragment and some nginx has loaded it."""
        snapshot = self.controller.reconciler.snapshot
        if snapshot is None or not all(f in snapshot.config for f in fragments):
            return False
        return any(
            r.version == snapshot.version and any(d.ok for d in r.deployed) for r in self.reports
        )

    def reloads(self) -> int:
        return sum(1 for r in self.reports for d in r.deployed if d.ok and not d.pushed)

    @property
    def api_url(self) -> str:
        assert self.controller.api is not None, "start the controller with api_bind"
        return self.controller.api.url

    def stop(self) -> None:
        """Idempotent: a test may stop a controller itself to start another."""
        if self.stopped:
            return
        self.stopped = True
        self.controller.loop.stop()
        self.thread.join(timeout=10)
        self.controller.close()


class ControllerFactory:
    def __init__(self) -> None:
        self.running: list[RunningController] = []

    def __call__(self, *networks: str, **overrides: object) -> RunningController:
        # dns_keep=0: a stopped controller's DNS process goes at once, not a minute later
        base = Settings(networks=frozenset(networks), dns_keep=0)
        settings = replace(base, **overrides)  # type: ignore[arg-type]
        controller = build_controller(settings)
        controller.start_servers()
        running = RunningController(
            controller, threading.Thread(target=controller.loop.run, daemon=True)
        )
        controller.reconciler.on_report.append(running.reports.append)
        running.thread.start()
        wait_until(controller.loop.ready.is_set, what="the first sync")
        self.running.append(running)
        return running


@pytest.fixture
def start_controller() -> Iterator[ControllerFactory]:
    factory = ControllerFactory()
    yield factory
    for running in factory.running:
        running.stop()


@pytest.fixture
def http_for(lab: Lab) -> Iterator[type[Http]]:
    clients: list[Http] = []

    class TrackedHttp(Http):
        def __init__(self, port: int) -> None:
            super().__init__(port)
            clients.append(self)

    yield TrackedHttp
    for client in clients:
        client.close()
