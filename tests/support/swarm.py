"""A Docker Swarm of the suite's own, on private engines (tests/support/engine.py).

Swarm mode refuses an engine started with --live-restore, which the machine's engine is, and a
test must never reconfigure the machine's engine: so the swarm is a private engine started
without it, `swarm init` advertising its namespace's loopback, with the offline images built
in it: nothing can be pulled, and a service created through the API runs a local tag without
asking a registry (what `--no-resolve-image` does for the CLI). Closing leaves the swarm and
removes the engine.

With a worker, each engine is a node in a network namespace of its own, the two joined by a
veth pair with addresses of LINK only: the manager's API, gossip and the overlay's VXLAN go
over it as between two machines, and nothing else can reach either end.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

from images.build import OfflineImages, ensure_images
from tests.support.engine import PREDEFINED_NETWORKS, PrivateEngine
from tests.support.lab import remove_network, wait_until
from tests.support.netns import entered

KEPT_NETWORKS = PREDEFINED_NETWORKS | {"ingress", "docker_gwbridge"}
"""An engine's own networks, and those a swarm makes for itself."""
SWARM_FLAGS = ("--userland-proxy=false",)
"""The machine engine's flags but --live-restore, which swarm mode refuses."""
ADVERTISE = "127.0.0.1"
"""The engine's own loopback (in its namespace): a single node has no peer to reach it."""
LINK = ("100.64.213.1", "100.64.213.2", 24)
"""The manager's and the worker's addresses on the veth pair between their namespaces: in no
pool Docker allocates networks from (10/8 for overlays, 172.17-31 and 192.168 for bridges)."""


@dataclass
class PrivateSwarm:
    """A private engine that is a swarm manager, and the offline images in it."""

    engine: PrivateEngine
    images: OfflineImages
    node_id: str
    worker: PrivateEngine | None = None
    """The second node, when there is one (`start_swarm(worker=True)`)."""
    worker_id: str = ""
    link: str = ""
    """The worker's end of the link (in its namespace)."""
    closed: bool = False
    _engines: list[PrivateEngine] = field(default_factory=list)

    @property
    def client(self) -> docker.DockerClient:
        return self.engine.client

    def entered(self, container_id: str) -> AbstractContextManager[None]:
        """The block runs in a running container's network namespace: where a process on
        that container's networks sits, an overlay network's too. The engine's own namespace
        has no route into an overlay network (its addresses live in a namespace of their own),
        so a controller that must probe tasks there runs in such a container's."""
        pid = int(self.client.api.inspect_container(container_id)["State"]["Pid"])
        return entered(Path(f"/proc/{pid}/ns/net"))

    def seat(self, network: str, name: str) -> Container:
        """An idle container on `network` (an overlay) for `entered`: where a controller,
        a client or a bench runs to reach the tasks there."""
        seat: Container = self.client.containers.run(
            self.images.backend,
            name=name,
            network=network,
            entrypoint=["sleep", "3600"],
            detach=True,
        )
        return seat

    def set_link(self, up: bool) -> None:
        """Down: the worker is cut off from the manager, as a machine lost or partitioned (its
        engine and tasks go on); up: it comes back, and rejoins by itself."""
        assert self.worker is not None, "a single-node swarm has no link"
        command = self.worker.netns.command(
            ["ip", "link", "set", self.link, "up" if up else "down"]
        )
        subprocess.run(command, check=True, capture_output=True)

    def reset(self) -> None:
        """For the next test on this swarm: every service, container and network a test made
        is removed, on every node, and every node is active again (nothing, once closed)."""
        if self.closed:
            return
        for service in self.client.services.list():
            with contextlib.suppress(docker.errors.NotFound):
                service.remove()  # type: ignore[no-untyped-call]  # untyped in types-docker
        for engine in self._engines or [self.engine]:
            for container in engine.client.containers.list(all=True, ignore_removed=True):
                try:
                    container.remove(force=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as error:
                    if error.status_code != 409:  # its task's removal, already under way
                        raise
        if self.worker is not None:
            self.set_link(up=True)
            wait_until(
                lambda: all(
                    n.attrs["Status"]["State"] == "ready" for n in self.client.nodes.list()
                ),
                timeout=60,
                what="every node ready again",
            )
        for node in self.client.nodes.list():
            if node.attrs["Spec"].get("Availability") != "active":
                node.update({**node.attrs["Spec"], "Availability": "active"})
        for network in self.client.networks.list():
            if network.name not in KEPT_NETWORKS:
                remove_network(network)

    def close(self) -> None:
        """`swarm leave --force` (services, tasks and overlay networks go with the swarm),
        then the engine is removed; raises, as PrivateEngine.close does, if anything is left.
        Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        _close(self._engines or [self.engine])


def _close(engines: list[PrivateEngine]) -> None:
    """Workers leave first, then the manager; every engine is closed whatever failed."""
    try:
        for engine in reversed(engines):
            with contextlib.suppress(docker.errors.APIError, AssertionError):
                engine.client.swarm.leave(force=True)
    finally:
        errors = []
        for engine in reversed(engines):
            try:
                engine.close()
            except Exception as error:  # the next engine is closed all the same
                errors.append(error)
        if errors:
            raise errors[0]


def _link(manager: PrivateEngine, worker: PrivateEngine) -> str:
    """A veth pair from the manager's namespace into the worker's (named by its dockerd's
    PID, which lives there), each end up with its LINK address; it goes with the namespaces.
    Returns the worker's end."""
    token = secrets.token_hex(3)
    ends = (f"cpm{token}", f"cpw{token}")
    pair = f"link add {ends[0]} type veth peer name {ends[1]} netns {worker.pid}".split()
    steps = [manager.netns.command(["ip", *pair])]
    for engine, end, address in ((manager, ends[0], LINK[0]), (worker, ends[1], LINK[1])):
        steps.append(
            engine.netns.command(["ip", "addr", "add", f"{address}/{LINK[2]}", "dev", end])
        )
        steps.append(engine.netns.command(["ip", "link", "set", end, "up"]))
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(step)}` failed: {done.stderr.strip()}")
    return ends[1]


def start_swarm(worker: bool = False) -> PrivateSwarm:
    """A manager, and with `worker` a second node joined to it over a link of their own.
    Raises EngineUnavailable where a private engine can't run."""
    engines = [PrivateEngine(flags=SWARM_FLAGS)]
    try:
        manager = engines[0]
        if not worker:
            node_id = manager.client.swarm.init(
                advertise_addr=ADVERTISE, listen_addr=f"{ADVERTISE}:2377"
            )
            return PrivateSwarm(manager, ensure_images(manager.client), str(node_id))
        engines.append(PrivateEngine(flags=SWARM_FLAGS))
        second = engines[1]
        link = _link(manager, second)
        node_id = manager.client.swarm.init(advertise_addr=LINK[0], listen_addr=f"{LINK[0]}:2377")
        token = manager.client.swarm.attrs["JoinTokens"]["Worker"]
        second.client.swarm.join(
            remote_addrs=[f"{LINK[0]}:2377"],
            join_token=token,
            advertise_addr=LINK[1],
            listen_addr=f"{LINK[1]}:2377",
        )
        images = ensure_images(manager.client)
        ensure_images(second.client)
        worker_id = str(second.client.info()["Swarm"]["NodeID"])
        return PrivateSwarm(
            manager, images, str(node_id), second, worker_id, link, _engines=engines
        )
    except BaseException:
        _close(engines)
        raise
