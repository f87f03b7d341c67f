"""The Compose stack of compose/, with the offline images: up with 4 backends, nginx and DNS
see all 4, the method switches through the API, down to 1, and nothing is left behind."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from docker.models.containers import Container

from images.build import ensure_images
from tests.support.lab import Http, Lab, wait_until
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"


def free_subnet(client: docker.DockerClient) -> ipaddress.IPv4Network:
    taken = [
        ipaddress.ip_network(config["Subnet"])
        for network in client.networks.list()
        for config in (network.attrs.get("IPAM") or {}).get("Config") or []
        if "Subnet" in config and ":" not in config["Subnet"]
    ]
    while True:
        subnet = ipaddress.ip_network(
            f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24"
        )
        if not any(subnet.overlaps(t) for t in taken):
            return subnet


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    dns_ip: str
    client: docker.DockerClient
    dataplane: str

    def compose(self, *args: str) -> None:
        command = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        done = subprocess.run(
            command, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def containers(self, service: str) -> list[Container]:
        labels = [
            f"com.docker.compose.project={self.project}",
            f"com.docker.compose.service={service}",
        ]
        found: list[Container] = self.client.containers.list(filters={"label": labels})
        return found

    def web_ips(self) -> set[str]:
        network = self.env["CP_NETWORK"]
        return {
            c.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
            for c in self.containers("web")
        }

    @property
    def dns_service_ips(self) -> tuple[str, str]:
        """The two replicas of the `dns` service."""
        return self.env["CP_DNS2_IP"], self.env["CP_DNS3_IP"]

    def dig(self, server: str | None = None) -> set[str]:
        """web.internal's addresses from the controller's DNS, or from `server`."""
        at = server or self.dns_ip
        done = subprocess.run(
            ["dig", f"@{at}", "+short", "+time=2", "+tries=1", "web.internal", "A"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return {line for line in done.stdout.split() if line}

    def leftovers(self) -> list[str]:
        label = f"com.docker.compose.project={self.project}"
        found = [c.name for c in self.client.containers.list(all=True, filters={"label": label})]
        found += [n.name for n in self.client.networks.list(names=[self.env["CP_NETWORK"]])]
        found += [v.name for v in self.client.volumes.list(filters={"label": label})]
        return found


@pytest.fixture(params=["dynamic", "reload"])
def stack(
    docker_client: docker.DockerClient, lab: Lab, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """The stack as shipped (nginx with Lua: the dynamic data plane), and with plain nginx
    one variable away (NGINX_IMAGE: the reload one)."""
    assert shutil.which("docker-compose"), "docker-compose is missing: run `make dev`"
    built = ensure_images(docker_client, controller=True)
    assert built.controller is not None
    subnet = free_subnet(docker_client)
    dns_ip = str(subnet.network_address + 53)
    project = f"cpt-{lab.run_id}"
    env = {
        "NGINX_IMAGE": built.nginx_lua if request.param == "dynamic" else built.nginx,
        "BACKEND_IMAGE": built.backend,
        "CONTROLPLANE_IMAGE": built.controller,
        "CONTROLPLANE_API_TOKEN": "t0ken",
        "CP_NETWORK": f"{project}_app",
        "CP_SUBNET": str(subnet),
        "CP_DNS_IP": dns_ip,
        "CP_DNS2_IP": str(subnet.network_address + 54),
        "CP_DNS3_IP": str(subnet.network_address + 55),
        "CP_HTTP_PORT": str(free_port()),
        "CP_API_PORT": str(free_port()),
        "CP_DNS_PORT": str(free_port()),
    }
    running = Stack(project, env, dns_ip, docker_client, request.param)
    try:
        yield running
    finally:
        running.compose("down", "--volumes", "--remove-orphans")


def reconfigured(nginx: Container) -> int:
    """Reloads, from nginx's own log."""
    lines = nginx.logs().decode("utf-8", "replace").splitlines()
    return sum(1 for line in lines if line.endswith(": reconfiguring"))


def test_scale_switch_and_tear_down(stack: Stack, http_for: type[Http]) -> None:
    stack.compose("up", "-d", "--scale", "web=4")
    http = http_for(int(stack.env["CP_HTTP_PORT"]))
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{stack.env['CP_API_PORT']}",
        headers={"Authorization": "Bearer t0ken"},
        timeout=30,
    )
    wait_until(lambda: len(stack.web_ips()) == 4, what="4 web containers")
    wait_until(
        lambda: (
            len(set(http.bodies("web", 40, timeout=2.0))) == 4
            if http.status("web") == 200
            else False
        ),
        timeout=60,
        what="nginx answering from the 4 backends",
    )
    wait_until(lambda: stack.dig() == stack.web_ips(), what="DNS answering the 4 addresses")
    four = stack.web_ips()
    for replica in stack.dns_service_ips:
        wait_until(lambda r=replica: stack.dig(r) == four, what=f"the dns service at {replica}")
    (controller,) = stack.containers("controlplane")
    controller.stop(timeout=10)  # the dns service answers on while the controller is down
    assert [stack.dig(r) for r in stack.dns_service_ips] == [four, four]
    (web,) = stack.containers("web")[:1]  # and a backend's own lookups go there
    looked_up = web.exec_run(["nslookup", "web.internal"])
    assert looked_up.exit_code == 0 and set(four) <= set(looked_up.output.decode().split())
    controller.start()
    wait_until(lambda: stack.dig() == four, timeout=30, what="the controller's DNS back")

    (nginx,) = stack.containers("nginx")
    # the restarted controller answers DNS from the zone it was handed at once; it knows
    # nginx's data plane once its first pass has probed it
    wait_until(
        lambda: api.get("/api/v1/nginx").json()["nginx"][0]["dataplane"] == stack.dataplane,
        timeout=30,
        what="the restarted controller naming nginx's data plane",
    )
    reloads = reconfigured(nginx)
    reply = api.put("/api/v1/services/web/algorithm?wait=true", json={"method": "least_conn"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["applied"]["errors"] == [] and reply.json()["applied"]["reloaded"]
    assert "least_conn;" in api.get("/api/v1/config").text
    if stack.dataplane == "dynamic":
        assert reconfigured(nginx) == reloads, "a method change reloaded a dynamic nginx"

    stack.compose("up", "-d", "--scale", "web=1")
    (last,) = wait_until(
        lambda: ips if len(ips := stack.web_ips()) == 1 else None, what="1 web container"
    )
    wait_until(lambda: stack.dig() == {last}, what="DNS answering the 1 address")
    for replica in stack.dns_service_ips:
        wait_until(lambda r=replica: stack.dig(r) == {last}, what=f"{replica} following")
    (remaining,) = stack.containers("web")
    wait_until(lambda: http.settled("web", {remaining.name}), what="nginx answering from 1")
    web = api.get("/api/v1/services/web").json()
    assert web["algorithm"]["method"] == "least_conn" and len(web["backends"]) == 1

    stack.compose("down", "--volumes", "--remove-orphans")
    assert stack.leftovers() == []
