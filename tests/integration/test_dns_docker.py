"""The resolver follows the live model of real containers, and containers can use it."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

from dnslib import DNSRecord
from docker.models.containers import Container

from tests.integration.conftest import ControllerFactory
from tests.support.dns_stub import following
from tests.support.lab import Lab, wait_until
from tests.support.ports import free_port


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


def test_no_stale_answer_once_the_change_is_applied(
    lab: Lab, start_controller: ControllerFactory
) -> None:
    """Under a steady query load, no answer sent after the reconcile that removed a backend
    still names it, and every answer is one whole version (never a mix)."""
    net = lab.network()
    port = free_port()
    backends = [lab.backend(net) for _ in range(3)]
    controller = start_controller(net.name, dns_binds=(f"127.0.0.1:{port}",))
    all_ips = {ip_of(b, str(net.name)) for b in backends}
    wait_until(lambda: set(dig(port, "web.internal", "A")) == all_ips, what="all in DNS")
    victim = backends[0]
    victim_ip = ip_of(victim, str(net.name))
    applied: list[float] = []
    controller.controller.reconciler.on_report.append(
        lambda r: applied.append(time.monotonic()) if r.changed else None
    )
    answers: list[tuple[float, set[str]]] = []
    stop = threading.Event()

    def query() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                sock.sendto(DNSRecord.question("web.internal", "A").pack(), ("127.0.0.1", port))
                reply = DNSRecord.parse(sock.recv(4096))
                answers.append((sent, {str(rr.rdata) for rr in reply.rr}))

    thread = threading.Thread(target=query)
    thread.start()
    time.sleep(0.3)
    victim.stop()
    wait_until(lambda: applied, what="the reconcile that removed the backend")
    time.sleep(0.5)
    stop.set()
    thread.join()
    after = [ips for sent, ips in answers if sent > applied[0]]
    assert after and all(victim_ip not in ips for ips in after)
    versions = {frozenset(ips) for _, ips in answers}
    assert versions <= {frozenset(all_ips), frozenset(all_ips - {victim_ip})}, versions


def test_a_dns_service_follows_the_controller_and_outlives_it(
    lab: Lab, start_controller: ControllerFactory
) -> None:
    """`controlplane dns --controller URL` (Compose's dns service): answers what the API's
    zone holds, follows each change by long poll, answers on while the controller is gone,
    and SERVFAIL once --keep has passed without word from it."""
    net = lab.network()
    backends = [lab.backend(net) for _ in range(2)]
    controller = start_controller(net.name, api_bind="127.0.0.1:0")
    port = free_port()
    with following(port, controller.api_url, "--keep=2") as log:
        ips = sorted(ip_of(b, str(net.name)) for b in backends)
        wait_until(lambda: dig(port, "web.internal", "A") == ips, what="the backends in DNS")
        backends.append(lab.backend(net))
        ips = sorted(ip_of(b, str(net.name)) for b in backends)
        wait_until(lambda: dig(port, "web.internal", "A") == ips, what="the new backend in DNS")
        controller.stop()
        gone = time.monotonic()
        assert dig(port, "web.internal", "A") == ips
        wait_until(
            lambda: "status: SERVFAIL" in dig_full(port, "web.internal"),
            timeout=15,
            what="SERVFAIL once --keep passed",
        )
        assert time.monotonic() - gone >= 1.5
    assert "no zone from the controller" in log[0] and "SERVFAIL until it answers" in log[0]


def dig_full(port: int, name: str) -> str:
    return subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", name],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout  # fmt: skip
