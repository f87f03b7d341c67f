"""A single-node Docker Swarm of the suite's own, on a private engine (tests/support/engine.py).

Swarm mode refuses an engine started with --live-restore, which the machine's engine is, and a
test must never reconfigure the machine's engine: so the swarm is a private engine started
without it, `swarm init` advertising its namespace's loopback, with the offline images built
in it: nothing can be pulled, and a service created through the API runs a local tag without
asking a registry (what `--no-resolve-image` does for the CLI). Closing leaves the swarm and
removes the engine.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

from images.build import OfflineImages, ensure_images
from tests.support.engine import PrivateEngine
from tests.support.netns import entered

SWARM_FLAGS = ("--userland-proxy=false",)
"""The machine engine's flags but --live-restore, which swarm mode refuses."""
ADVERTISE = "127.0.0.1"
"""The engine's own loopback (in its namespace): a single node has no peer to reach it."""


@dataclass
class PrivateSwarm:
    """A private engine that is a swarm manager, and the offline images in it."""

    engine: PrivateEngine
    images: OfflineImages
    node_id: str
    closed: bool = False

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

    def close(self) -> None:
        """`swarm leave --force` (services, tasks and overlay networks go with the swarm),
        then the engine is removed; raises, as PrivateEngine.close does, if anything is left.
        Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(docker.errors.APIError):
            self.client.swarm.leave(force=True)
        self.engine.close()


def start_swarm() -> PrivateSwarm:
    """Raises EngineUnavailable where a private engine can't run."""
    engine = PrivateEngine(flags=SWARM_FLAGS)
    try:
        node_id = engine.client.swarm.init(
            advertise_addr=ADVERTISE, listen_addr=f"{ADVERTISE}:2377"
        )
        return PrivateSwarm(engine, ensure_images(engine.client), str(node_id))
    except BaseException:
        engine.close()
        raise
