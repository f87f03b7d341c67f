"""Fakes for the reconciler's edges, satisfying the same Protocols as DockerSource,
NginxDeployer, the event stream and the readiness prober."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace

from controlplane.core.health import Address, Outcome, Result
from controlplane.core.model import ContainerFacts, DockerState, HealthCheck, NginxTarget
from controlplane.docker_source import DockerEvent
from controlplane.errors import DockerUnavailable
from controlplane.nginx_deployer import DeployResult
from controlplane.prober import Done


class FakeSource:
    def __init__(self, current: DockerState) -> None:
        self.state = current
        self.invalidated: list[str | None] = []
        self.inspected: list[str] = []
        self.seen: dict[str, ContainerFacts] = {}
        self.unavailable = False

    def snapshot(self) -> DockerState:
        if self.unavailable:
            raise DockerUnavailable("the fake engine is down")
        self.seen = {c.id: c for c in self.state.containers}
        return self.state

    def invalidate(self, container_id: str | None = None) -> None:
        self.invalidated.append(container_id)

    def invalidate_networks(self) -> None:
        self.invalidated.append("networks")

    def known(self, container_id: str) -> ContainerFacts | None:
        """As of the last snapshot, as DockerSource's inspect cache."""
        return self.seen.get(container_id)

    def inspect(self, container_id: str) -> ContainerFacts | None:
        self.inspected.append(container_id)
        return next((c for c in self.state.containers if c.id == container_id), None)


class FakeDeployer:
    def __init__(self) -> None:
        self.deployed: list[tuple[str, bytes]] = []
        self.refuse = False
        self.delay = 0.0
        self.lua = False
        self.push_fails = False
        self.pushed: list[tuple[str, bytes, bool]] = []
        """Each push: the nginx, what was written, whether it was a delta."""
        self.probed: list[str] = []

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        time.sleep(self.delay)
        self.deployed.append((target.container, content))
        if self.refuse:
            return DeployResult(
                target.container, False, "nginx -t failed", {}, target.container_id, refused=True
            )
        return DeployResult(target.container, True, None, {}, target.container_id)

    def deploy_all(
        self,
        targets: Sequence[NginxTarget],
        content: bytes,
        on_result: Callable[[DeployResult], object] | None = None,
    ) -> tuple[DeployResult, ...]:
        """All at once, as NginxDeployer: `delay` is a pass's, not each nginx's."""
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            futures = [pool.submit(self.deploy, target, content) for target in targets]
            for future in as_completed(futures):
                if on_result is not None:
                    on_result(future.result())
        return tuple(future.result() for future in futures)

    def push_all(
        self, targets: Sequence[NginxTarget], state: bytes, delta: bool = False
    ) -> tuple[DeployResult, ...]:
        """Records each push of the dynamic data plane's state, or of a delta over it."""
        self.pushed.extend((target.container, state, delta) for target in targets)
        return tuple(
            DeployResult(
                target.container,
                not self.push_fails,
                "the shell stalled" if self.push_fails else None,
                {},
                target.container_id,
            )
            for target in targets
        )

    def probe_all(self, targets: Sequence[NginxTarget], probe: bytes) -> tuple[DeployResult, ...]:
        """`lua`: whether the nginx take the probe (else they refuse it, as plain nginx)."""
        self.probed.extend(target.container for target in targets)
        return tuple(
            DeployResult(
                target.container,
                self.lua,
                None if self.lua else 'unknown directive "lua_shared_dict"',
                {},
                target.container_id,
                refused=not self.lua,
            )
            for target in targets
        )

    def retain(self, container_ids: set[str]) -> None:
        pass

    def close(self) -> None:
        pass


class FakeEvents:
    """Yields the scripted events, then the pushed ones until closed; `breaks` first opens
    fail. Each event is stamped with its arrival, as the Docker edge does."""

    def __init__(self, events: list[DockerEvent], gap: float = 0.0, breaks: int = 0) -> None:
        self.events = events
        self.gap = gap
        self.breaks = breaks
        self.opened = 0
        self.closed = threading.Event()
        self.pushed: queue.SimpleQueue[DockerEvent] = queue.SimpleQueue()

    def push(self, event: DockerEvent) -> None:
        self.pushed.put(event)

    def open_events(self) -> Iterator[DockerEvent]:
        self.opened += 1
        if self.opened <= self.breaks:
            raise DockerUnavailable("dockerd restarting")
        return self._stream()

    def _stream(self) -> Iterator[DockerEvent]:
        for item in self.events:
            time.sleep(self.gap)
            yield replace(item, received_ns=time.time_ns())
        self.events = []
        deadline = time.monotonic() + 10
        while not self.closed.is_set() and time.monotonic() < deadline:
            try:
                item = self.pushed.get(timeout=0.01)
            except queue.Empty:
                continue
            yield replace(item, received_ns=time.time_ns())

    def close_events(self) -> None:
        self.closed.set()


def _result(answer: Outcome | Result) -> Result:
    return answer if isinstance(answer, Result) else Result(answer)


class FakeProber:
    """Answers each probe at once with `answers[host]`; a probe of a host with no answer
    waits in `pending` until the test calls `answer`."""

    def __init__(self, answers: dict[str, Outcome | Result] | None = None) -> None:
        self.answers: dict[str, Outcome | Result] = dict(answers or {})
        self.sent: list[Address] = []
        self.checks: list[HealthCheck] = []
        self.pending: list[tuple[Address, Done]] = []

    def probe(self, address: Address, check: HealthCheck, done: Done) -> None:
        self.sent.append(address)
        self.checks.append(check)
        answer = self.answers.get(address.host)
        if answer is None:
            self.pending.append((address, done))
        else:
            done(address, _result(answer))

    def answer(self, host: str, outcome: Outcome | Result) -> None:
        """Each pending probe of `host` says `outcome`."""
        waiting = [(a, d) for a, d in self.pending if a.host == host]
        self.pending = [(a, d) for a, d in self.pending if a.host != host]
        for address, done in waiting:
            done(address, _result(outcome))

    def close(self) -> None:
        pass
