"""Fakes for the reconciler's edges, satisfying the same Protocols as DockerSource,
NginxDeployer and the event stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from controlplane.core.model import DockerState, NginxTarget
from controlplane.docker_source import DockerEvent
from controlplane.errors import DockerUnavailable
from controlplane.nginx_deployer import DeployResult


class FakeSource:
    def __init__(self, current: DockerState) -> None:
        self.state = current
        self.invalidated: list[str | None] = []
        self.unavailable = False

    def snapshot(self) -> DockerState:
        if self.unavailable:
            raise DockerUnavailable("the fake engine is down")
        return self.state

    def invalidate(self, container_id: str | None = None) -> None:
        self.invalidated.append(container_id)


class FakeDeployer:
    def __init__(self) -> None:
        self.deployed: list[tuple[str, bytes]] = []
        self.refuse = False
        self.delay = 0.0

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        time.sleep(self.delay)
        self.deployed.append((target.container, content))
        if self.refuse:
            return DeployResult(target.container, False, "nginx -t failed", {}, target.container_id)
        return DeployResult(target.container, True, None, {}, target.container_id)

    def retain(self, container_ids: set[str]) -> None:
        pass


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
