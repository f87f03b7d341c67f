"""Hundreds of backends at once: started and removed by a pool of threads, and a keep-alive
client that tells, by the responses, when every one of them is served through nginx.

dockerd starts ~4-5 containers a second on two cores, so a few hundred started one after the
other take minutes, and the lab's own cleanup removes one at a time: both go through a pool.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import docker.errors
import httpx
from docker.models.networks import Network

from tests.support.lab import TEST_LABEL, Lab


@dataclass(frozen=True)
class Fleet:
    names: Mapping[str, frozenset[str]]
    """Service (network alias) -> its backends' hostnames, which they answer with."""
    first_ns: int
    """When the first `docker run` was called (time.time_ns)."""
    last_ns: int
    """When the last `docker run` returned."""

    @property
    def size(self) -> int:
        return sum(len(n) for n in self.names.values())


def name_backends(lab: Lab, services: Mapping[str, int]) -> dict[str, frozenset[str]]:
    """`services[alias]` fresh container names (their hostnames too) for each service."""
    return {alias: frozenset(lab.name(alias) for _ in range(n)) for alias, n in services.items()}


def run_backends(
    lab: Lab, network: Network, names: Mapping[str, frozenset[str]], threads: int = 12
) -> Fleet:
    """Each named backend created and started (a `docker run`) by a pool of threads, through
    the low-level API: two engine calls a container, no inspect. A failed run raises; the
    lab's cleanup still finds every container by its label."""
    api = lab.client.api
    net = str(network.name)

    def run(item: tuple[str, str]) -> None:
        alias, name = item
        created = api.create_container(
            lab.images.backend,
            name=name,
            hostname=name,
            labels=lab.labels,
            host_config=api.create_host_config(network_mode=net),
            networking_config=api.create_networking_config(  # the stubs say one endpoint,
                {net: api.create_endpoint_config(aliases=[alias])}  # type: ignore[arg-type]
            ),  # docker-py takes a network -> endpoint mapping
        )
        api.start(created["Id"])

    # Round robin over the services, so that each fills up as the others do.
    rows = itertools.zip_longest(*([(a, n) for n in sorted(ns)] for a, ns in names.items()))
    order = [item for row in rows for item in row if item is not None]
    first = time.time_ns()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(run, order))
    return Fleet(dict(names), first, time.time_ns())


def remove_all(lab: Lab, threads: int = 12, keep: Callable[[str], bool] = lambda _: False) -> None:
    """Every container of this lab's run, removed by a pool (`keep(name)` spares some); the
    lab's cleanup then only has the networks left to remove."""
    containers = lab.client.api.containers(
        all=True, filters={"label": f"{TEST_LABEL}.run={lab.run_id}"}
    )
    doomed = [c["Id"] for c in containers if not keep(c["Names"][0].lstrip("/"))]

    def remove(container_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            lab.client.api.remove_container(container_id, force=True)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(remove, doomed))


class Coverage:
    """Clients on kept-alive connections to nginx on loopback, each taking the next service
    still missing a backend and sending it 2N requests (N: its backends, at most 64 at a
    time): with round_robin, 2N requests see all N once nginx routes to them. Records when
    each backend first answered; bounded by `max_seconds` and `max_requests`, and stopped
    early by `stop`."""

    IDLE = 0.02
    """Pause after a visit that found no new backend: nginx is waiting for the controller."""

    def __init__(
        self,
        port: int,
        expected: Mapping[str, frozenset[str]],
        threads: int = 4,
        max_seconds: float = 600.0,
        max_requests: int = 1_000_000,
    ) -> None:
        self.first_seen: dict[str, int] = {}
        self.requests = 0
        self.errors = 0
        self._url = f"http://127.0.0.1:{port}/"
        self._expected = dict(expected)
        self._missing = {service: set(names) for service, names in expected.items() if names}
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._max_requests = max_requests
        self._threads = [threading.Thread(target=self._probe, daemon=True) for _ in range(threads)]
        if not self._missing:
            self._done.set()
        for thread in self._threads:
            thread.start()

    @property
    def served(self) -> int:
        return len(self.first_seen)

    @property
    def complete(self) -> bool:
        return not self._missing

    @property
    def all_served_ns(self) -> int | None:
        """When the last expected backend first answered; None while one never has."""
        return max(self.first_seen.values(), default=None) if self.complete else None

    def wait(self, timeout: float) -> bool:
        """True once every expected backend answered; False after `timeout` seconds, or
        once the probe's own bounds ran out."""
        self._done.wait(timeout)
        return self.complete

    def stop(self) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _next(self) -> str | None:
        with self._lock:
            pending = sorted(self._missing)
            return pending[next(self._turn) % len(pending)] if pending else None

    def _probe(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._done.is_set() and time.monotonic() < self._deadline:
                service = self._next()
                if service is None or self.requests >= self._max_requests:
                    break
                if not self._visit(client, service):
                    time.sleep(self.IDLE)
        self._done.set()

    def _visit(self, client: httpx.Client, service: str) -> bool:
        """True when this visit found a backend not seen before."""
        found = False
        for _ in range(min(64, 2 * len(self._expected[service]))):
            try:
                reply = client.get(self._url, headers={"Host": service})
            except httpx.HTTPError:
                with self._lock:
                    self.requests += 1
                    self.errors += 1
                continue
            now = time.time_ns()
            name = reply.text.strip() if reply.status_code == 200 else ""
            with self._lock:
                self.requests += 1
                missing = self._missing.get(service)
                if missing is None or name not in missing:
                    continue
                found = True
                missing.discard(name)
                self.first_seen[name] = now
                if not missing:
                    del self._missing[service]
                    if not self._missing:
                        self._done.set()
                    return True
        return found
