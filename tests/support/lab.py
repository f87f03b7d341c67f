"""Real Docker resources for one test: random names, labels, and removal at the end.

Everything a test creates carries `controlplane.test=1` (so a crashed run can be swept with
`docker rm -f $(docker ps -aq --filter label=controlplane.test=1)`) and the test's run id.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import docker
import docker.errors
import httpx
import pytest
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import EndpointConfig

from images.build import OfflineImages

TEST_LABEL = "controlplane.test"
DRAINING = {"STOP_DELAY": "1", "DRAIN_STATUS": "200"}
"""Backend env: like a real app, it keeps answering 200 for a second after SIGTERM."""
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll instead of sleeping; the failure names what was awaited and the last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or predicate}: {value!r}"
            )
        time.sleep(interval)
        value = predicate()
    return value


BOTH_DATAPLANES = pytest.mark.parametrize("lab", ["reload", "dynamic"], indirect=True)
"""Runs a test that uses `lab` once with nginx on each data plane."""


class Lab:
    def __init__(
        self, client: docker.DockerClient, images: OfflineImages, dataplane: str = "reload"
    ) -> None:
        """`dataplane`: what the managed nginx run: reload (the plain image) or dynamic (the
        image with lua-nginx-module), named by their controlplane.dataplane label too."""
        self.client = client
        self.images = images
        self.dataplane = dataplane
        self.run_id = secrets.token_hex(4)
        self._count = 0

    @property
    def labels(self) -> dict[str, str]:
        return {TEST_LABEL: "1", f"{TEST_LABEL}.run": self.run_id}

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"cpt-{self.run_id}-{prefix}-{self._count}"

    def network(self, prefix: str = "net") -> Network:
        return self.client.networks.create(self.name(prefix), driver="bridge", labels=self.labels)

    def nginx(self, network: Network, labels: Mapping[str, str] | None = None) -> Container:
        """A managed nginx published on a random loopback port."""
        container = self._run(
            self.images.nginx_lua if self.dataplane == "dynamic" else self.images.nginx,
            "lb",
            network,
            labels={
                "controlplane.role": "nginx",
                "controlplane.dataplane": self.dataplane,
                **(labels or {}),
            },
            ports={"80/tcp": ("127.0.0.1", None)},
        )
        return container

    def backend(
        self,
        network: Network,
        alias: str | None = "web",
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Container:
        """A busybox backend: every path answers with its container name (images/backend).
        The hostname is that name too, unless given: it is the reply if no name is found."""
        name = self.name(alias or "backend")
        kwargs.setdefault("hostname", name)
        return self._run(
            self.images.backend,
            name,
            network,
            aliases=[alias] if alias else None,
            labels=labels,
            environment=dict(env or {}),
            exact_name=True,
            **kwargs,
        )

    def _run(
        self,
        image: str,
        prefix: str,
        network: Network,
        aliases: list[str] | None = None,
        labels: Mapping[str, str] | None = None,
        exact_name: bool = False,
        start: bool = True,
        **kwargs: Any,
    ) -> Container:
        name = prefix if exact_name else self.name(prefix)
        network_name = str(network.name)
        endpoint = EndpointConfig(version=self.client.api.api_version, aliases=aliases or [])
        container = self.client.containers.create(
            image,
            name=name,
            labels={**self.labels, **(labels or {})},
            network=network_name,
            networking_config={network_name: endpoint},
            **kwargs,
        )
        if start:
            container.start()
        container.reload()
        return container

    def reloads(self, nginx: Container) -> int:
        """Reloads nginx itself logged (its error log goes to the container's output): the
        count that does not take the controller's word for it."""
        lines = nginx.logs(stdout=True, stderr=True).decode("utf-8", "replace").splitlines()
        return sum(1 for line in lines if line.endswith(": reconfiguring"))

    def published_port(self, container: Container) -> int:
        container.reload()
        bindings = container.ports.get("80/tcp") or []
        return int(bindings[0]["HostPort"])

    def cleanup(self) -> None:
        for container in self.client.containers.list(
            all=True, filters={"label": f"{TEST_LABEL}.run={self.run_id}"}
        ):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for network in self.client.networks.list(
            filters={"label": f"{TEST_LABEL}.run={self.run_id}"}
        ):
            remove_network(network)


def remove_network(network: Network, attempts: int = 20) -> None:
    """After dozens of containers were removed at once, dockerd can still hold an endpoint of
    one for a moment ("has active endpoints"): disconnect what is left, by force, and retry."""
    for _ in range(attempts - 1):
        try:
            network.remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as error:
            if "active endpoints" not in str(error):
                raise
        network.reload()
        for endpoint in network.attrs.get("Containers") or {}:
            with contextlib.suppress(docker.errors.APIError):
                network.disconnect(endpoint, force=True)
        time.sleep(0.25)
    try:
        network.remove()
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as error:
        network.reload()
        if "active endpoints" not in str(error) or network.attrs.get("Containers"):
            raise
        # No container is attached, yet dockerd counts endpoints: its endpoint count went
        # wrong while many containers started at once, and only a dockerd restart fixes it
        # ("Fixing inconsistent endpoint_cnt" in its log). The suite must not restart the
        # machine's engine, so it says so and goes on.
        warnings.warn(
            f"network {network.name} is left behind: dockerd counts endpoints on it that do "
            "not exist (its endpoint count race); it goes at the next dockerd restart",
            stacklevel=2,
        )


class Http:
    """A client of one published nginx; a new connection per request, so a reload's closed
    keep-alive connection can't be mistaken for a failure."""

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        self.base = f"http://{address}:{port}"
        self.client = httpx.Client(timeout=10.0, headers={"Connection": "close"})

    def get(self, host: str, path: str = "/", timeout: float = 10.0) -> httpx.Response:
        return self.client.get(self.base + path, headers={"Host": host}, timeout=timeout)

    def status(self, host: str, path: str = "/") -> int | None:
        """For polling: None while requests fail (e.g. one stuck on a backend being paused)."""
        try:
            return self.get(host, path, timeout=2.0).status_code
        except httpx.HTTPError:
            return None

    def bodies(self, host: str, count: int, path: str = "/", timeout: float = 10.0) -> Counter[str]:
        result: Counter[str] = Counter()
        for _ in range(count):
            response = self.get(host, path, timeout)
            result[
                response.text.strip()
                if response.status_code == 200
                else f"HTTP {response.status_code}"
            ] += 1
        return result

    def serves(self, host: str, expected: Iterable[str], probes: int = 30) -> bool:
        """True once `probes` requests reach exactly the expected backends."""
        try:
            seen = self.bodies(host, probes, timeout=2.0)
        except httpx.HTTPError:
            return False
        return set(seen) == set(expected)

    def only(self, host: str, expected: Iterable[str], probes: int = 40) -> bool:
        """True when `probes` requests in a row come from the expected backends only: after a
        reload, the old workers keep answering with the old config for a little while."""
        allowed = set(expected)
        try:
            return set(self.bodies(host, probes, timeout=2.0)) <= allowed
        except httpx.HTTPError:
            return False

    def settled(self, host: str, expected: Iterable[str]) -> bool:
        """Exactly the expected backends answer, and nothing else does any more."""
        names = set(expected)
        return self.only(host, names) and self.serves(host, names)

    def close(self) -> None:
        self.client.close()
