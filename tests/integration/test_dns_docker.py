"""The resolver follows the live model of real containers, and containers can use it."""

from __future__ import annotations

import socket
import subprocess

from docker.models.containers import Container

from tests.integration.conftest import ControllerFactory
from tests.support.lab import Lab, wait_until


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dig(port: int, *query: str, server: str = "127.0.0.1") -> list[str]:
    result = subprocess.run(
        ["dig", f"@{server}", "-p", str(port), "+short", "+time=2", "+tries=1", *query],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return sorted(line for line in result.stdout.splitlines() if line and not line.startswith(";"))


def ip_of(container: Container, network: str) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])


def test_answers_follow_scale_pause_and_stop(lab: Lab, start_controller: ControllerFactory) -> None:
    net = lab.network()
    port = free_port()
    backends = [lab.backend(net) for _ in range(2)]
    controller = start_controller(net.name, dns_binds=(f"127.0.0.1:{port}",))

    def ips() -> list[str]:
        return sorted(ip_of(b, str(net.name)) for b in backends)

    wait_until(lambda: dig(port, "web.internal", "A") == ips(), what="the two backends in DNS")
    assert dig(port, f"web.{net.name}.internal", "A") == ips()
    assert len(dig(port, "_web._tcp.internal", "SRV")) == 2

    backends.append(lab.backend(net))
    wait_until(lambda: dig(port, "web.internal", "A") == ips(), what="the third backend in DNS")

    paused = backends[0]
    paused.pause()
    wait_until(
        lambda: ip_of(paused, str(net.name)) not in dig(port, "web.internal", "A"),
        what="the paused backend out of DNS",
    )
    paused.unpause()
    wait_until(lambda: dig(port, "web.internal", "A") == ips(), what="unpaused backend back")

    stopped = backends.pop()
    stopped_ip = ip_of(stopped, str(net.name))
    stopped.stop()
    wait_until(lambda: stopped_ip not in dig(port, "web.internal", "A"), what="stopped one out")
    snapshot = controller.controller.reconciler.snapshot
    assert snapshot is not None and f"# {stopped.name}" not in snapshot.config, (
        "DNS and nginx must change in the same reconcile"
    )
    assert dig(port, "-x", stopped_ip) == []


def test_a_container_resolves_services_through_the_resolver(
    lab: Lab, start_controller: ControllerFactory
) -> None:
    net = lab.network()
    gateway = str(net.attrs["IPAM"]["Config"][0]["Gateway"])
    web = lab.backend(net)
    start_controller(net.name, dns_binds=(f"{gateway}:53",))
    web_ip = ip_of(web, str(net.name))
    wait_until(lambda: dig(53, "web.internal", server=gateway) == [web_ip], what="resolver up")

    client = lab.backend(net, alias=None, dns=[gateway])
    exit_code, output = client.exec_run(["nslookup", "web.internal"])
    assert exit_code == 0, output.decode()
    assert web_ip in output.decode()
