"""The DNS data plane as its own process (dns_process, dns_child, dns_handover), without
Docker: a feeder process stands for the controller, so it can be killed like one."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from dnslib import RCODE, DNSRecord

from controlplane.addresses import SocketAddress
from controlplane.core.dns_records import ZONE_SIGNATURE, Zone, zone_data, zone_signature
from controlplane.dns_child import DnsChild
from controlplane.errors import ControlPlaneError
from tests.support.dns_stub import (
    LOOPBACK,
    WEB_IPS,
    StubUpstream,
    following,
    sample_zone,
    tcp_ask,
    udp_ask,
)
from tests.support.lab import wait_until
from tests.support.ports import free_port

OTHER_IPS = ("172.20.0.50", "172.20.0.51")

# A controller as far as DNS can tell: it starts the DNS process, feeds it one zone, says
# so, and stays until it is killed or its standard input closes.
FEEDER = textwrap.dedent(
    """
    import json, sys
    from controlplane.addresses import parse_address
    from controlplane.core.dns_records import zone_from_data
    from controlplane.dns_child import DnsChild
    bind, keep = sys.argv[1], float(sys.argv[2])
    zone = zone_from_data(json.loads(sys.stdin.readline()))
    child = DnsChild([parse_address(bind, 53)], [], 0, None, keep)
    child.start()
    child.publish(zone, [])
    assert child.applied(zone.version, 10)
    print(json.dumps({"dns": child.pid}), flush=True)
    sys.stdin.read()
    child.close()
    """
)


def zone_with(version: int, ips: tuple[str, ...] = WEB_IPS) -> Zone:
    zone = sample_zone(version=version)
    records = dict(zone.records)
    web = dict(records["web.internal"])
    web["A"] = tuple(type(web["A"][0])("web.internal", "A", zone.ttl, ip) for ip in ips)
    records["web.internal"] = web
    return Zone(zone.domain, zone.version, zone.ttl, records)


@dataclass
class Feeder:
    process: subprocess.Popen[str]
    dns_pid: int

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@dataclass
class Feeders:
    port: int
    started: list[Feeder] = field(default_factory=list)

    def __call__(self, zone: Zone, keep: float = 30) -> Feeder:
        process = subprocess.Popen(
            [sys.executable, "-c", FEEDER, f"{LOOPBACK}:{self.port}", str(keep)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(zone_data(zone)) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        assert line, "the feeder exited before its DNS process was ready"
        feeder = Feeder(process, json.loads(line)["dns"])
        self.started.append(feeder)
        return feeder


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is gone
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def feeders() -> Iterator[Feeders]:
    made = Feeders(free_port())
    yield made
    for feeder in made.started:
        if feeder.process.poll() is None:
            feeder.kill()
        if alive(feeder.dns_pid):
            os.kill(feeder.dns_pid, signal.SIGKILL)


def a_records(port: int) -> set[str]:
    reply = DNSRecord.parse(udp_ask(port, bytes(DNSRecord.question("web.internal").pack())))
    return {str(rr.rdata) for rr in reply.rr}


class Load:
    """UDP queries for web.internal at about `rate` per second, one at a time, each waiting 1 s
    for its answer: what each got, and which got none."""

    def __init__(self, port: int, rate: int = 500, seconds: float = 30) -> None:
        self.port = port
        self.rate = rate
        self.seconds = seconds
        self.answers: list[tuple[float, frozenset[str]]] = []
        self.unanswered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import socket

        deadline = time.monotonic() + self.seconds
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            ident = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                ident = (ident + 1) & 0xFFFF
                query = DNSRecord.question("web.internal")
                query.header.id = ident
                sent = time.monotonic()
                sock.sendto(query.pack(), (LOOPBACK, self.port))
                try:
                    while True:
                        reply = DNSRecord.parse(sock.recv(4096))
                        if reply.header.id == ident:
                            break
                except TimeoutError:
                    self.unanswered += 1
                    continue
                self.answers.append((sent, frozenset(str(rr.rdata) for rr in reply.rr)))
                time.sleep(max(0.0, 1 / self.rate - (time.monotonic() - sent)))


def test_udp_answers_reaches_the_dns_process() -> None:
    """--dns-udp-answers caps UDP answers of the process `controlplane run` starts, never TCP."""
    port = free_port()
    child = DnsChild([SocketAddress(LOOPBACK, port)], [], 2, None, keep=0)
    child.start()
    try:
        zone = sample_zone()
        child.publish(zone, [])
        assert child.applied(zone.version, 10)
        query = bytes(DNSRecord.question("web.internal").pack())
        assert len(DNSRecord.parse(udp_ask(port, query)).rr) == 2
        (raw,) = tcp_ask(port, query)
        assert len(DNSRecord.parse(raw).rr) == len(WEB_IPS)
        wait_until(lambda: child.outcomes().get("noerror", 0) >= 2, what="the outcomes report")
    finally:
        child.close()
    assert child.pid is not None and not alive(child.pid)


def test_a_killed_controller_leaves_dns_answering_and_its_successor_takes_over(
    feeders: Feeders,
) -> None:
    """kill -9 of the controller: its DNS process answers the last zone; the next controller's
    takes the sockets over once it has a zone, and no query goes unanswered throughout."""
    first = feeders(zone_with(1))
    with Load(feeders.port) as load:
        time.sleep(0.5)
        first.kill()
        time.sleep(1.0)
        assert alive(first.dns_pid), "the DNS process died with its controller"
        killed_at = time.monotonic()
        second = feeders(zone_with(2, OTHER_IPS))
        took_over = time.monotonic()
        wait_until(lambda: not alive(first.dns_pid), what="the first DNS process to stop")
        time.sleep(0.5)
    assert load.unanswered == 0
    before = {ips for sent, ips in load.answers if sent < killed_at}
    after = {ips for sent, ips in load.answers if sent > took_over}
    assert before == {frozenset(WEB_IPS)}
    assert after == {frozenset(OTHER_IPS)}
    assert len(load.answers) > 500
    assert alive(second.dns_pid)


def test_a_second_live_controller_cannot_take_the_port(feeders: Feeders) -> None:
    """Two controllers on one DNS address is a mistake: the second is told, the first keeps
    serving."""
    first = feeders(zone_with(1))
    child = DnsChild([SocketAddress(LOOPBACK, feeders.port)], [], 0, None, keep=0)
    with pytest.raises(ControlPlaneError, match="whose controller still runs"):
        child.start()
    assert a_records(feeders.port) == set(WEB_IPS)
    assert alive(first.dns_pid)


def test_keep_bounds_how_long_the_last_zone_is_answered(feeders: Feeders) -> None:
    """Once its controller is gone the DNS process answers for --dns-keep seconds, then goes
    and frees the port."""
    first = feeders(zone_with(1), keep=1.5)
    first.kill()
    gone = time.monotonic()
    assert a_records(feeders.port) == set(WEB_IPS)
    wait_until(lambda: not alive(first.dns_pid), timeout=10, what="the DNS process to stop")
    assert time.monotonic() - gone >= 1.4
    with pytest.raises(TimeoutError):
        udp_ask(feeders.port, bytes(DNSRecord.question("web.internal").pack()), timeout=0.5)


def test_a_zone_it_cannot_read_keeps_the_last_one() -> None:
    """A zone line it can't use (another controlplane version, or worse) is logged and
    skipped; the process answers the last good zone and reads on."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "dns", f"--bind={LOOPBACK}:{port}", "--keep=0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert "ready" in json.loads(process.stdout.readline())
        good = {"zone": zone_data(zone_with(1)), "allowed": []}
        bad = {"zone": {**zone_data(zone_with(2)), "ttl": -1}, "allowed": []}
        for message in (good, bad, "not json"):
            process.stdin.write(json.dumps(message) + "\n")
        process.stdin.flush()
        assert json.loads(process.stdout.readline()) == {"zone": 1}
        wait_until(lambda: a_records(port) == set(WEB_IPS), what="the first zone")
        newer = {"zone": zone_data(zone_with(3, OTHER_IPS)), "allowed": []}
        process.stdin.write(json.dumps(newer) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        while "outcomes" in line:
            line = process.stdout.readline()
        assert json.loads(line) == {"zone": 3}
        assert a_records(port) == set(OTHER_IPS)
    finally:
        process.stdin.close()
        process.wait(timeout=10)
    assert process.stderr is not None
    errors = process.stderr.read()
    assert errors.count("the controller sent a zone that can't be used") == 2
    assert "ttl must be a whole number" in errors


def test_a_dns_process_that_dies_is_started_again_with_the_latest_zone() -> None:
    """Nothing changes in the cluster, the DNS process is killed: the controller's side starts
    another at once and gives it the zone it had."""
    port = free_port()
    child = DnsChild([SocketAddress(LOOPBACK, port)], [], 0, None, keep=0)
    child.start()
    try:
        zone = zone_with(4, OTHER_IPS)
        child.publish(zone, [])
        assert child.applied(zone.version, 10)
        first = child.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: child.pid != first, what="another DNS process")
        wait_until(lambda: a_records(port) == set(OTHER_IPS), what="the zone answered again")
        assert child.applied(zone.version, 1)
    finally:
        child.close()


def test_a_successor_binds_afresh_when_its_predecessor_is_gone_before_its_first_zone(
    feeders: Feeders,
) -> None:
    """The old DNS process agreed to hand over, then its --dns-keep ran out before the new
    controller's first pass: the new one binds the port itself."""
    first = feeders(zone_with(1), keep=1)
    first.kill()
    child = DnsChild([SocketAddress(LOOPBACK, feeders.port)], [], 0, None, keep=0)
    child.start()  # finds the old one (still answering), which agrees
    try:
        wait_until(lambda: not alive(first.dns_pid), what="the old DNS process to go")
        zone = zone_with(2, OTHER_IPS)
        child.publish(zone, [])
        assert child.applied(zone.version, 10)
        assert a_records(feeders.port) == set(OTHER_IPS)
    finally:
        child.close()


def test_one_successor_at_a_time(feeders: Feeders) -> None:
    """Two controllers starting at once on one address: the second is told another is taking
    over; the first takes over."""
    first = feeders(zone_with(1))
    first.kill()
    one = DnsChild([SocketAddress(LOOPBACK, feeders.port)], [], 0, None, keep=0)
    two = DnsChild([SocketAddress(LOOPBACK, feeders.port)], [], 0, None, keep=0)
    one.start()
    try:
        with pytest.raises(ControlPlaneError, match="another controller is taking DNS"):
            two.start()
        zone = zone_with(2, OTHER_IPS)
        one.publish(zone, [])
        assert one.applied(zone.version, 10)
        wait_until(lambda: not alive(first.dns_pid), what="the old DNS process to go")
        assert a_records(feeders.port) == set(OTHER_IPS)
    finally:
        one.close()


@pytest.mark.parametrize("follow", [False, True])
def test_sigterm_stops_a_dns_process_at_once(follow: bool) -> None:
    """Compose's `docker stop` (and a supervisor's) is SIGTERM: it ends the process at once,
    whether it reads zones from a pipe or follows a controller."""
    port = free_port()
    feed = ["--controller=http://127.0.0.1:9"] if follow else []  # port 9: nobody answers
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "dns", f"--bind={LOOPBACK}:{port}", *feed],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: _answers_at_all(port), what="the DNS process listening")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers_at_all(port: int) -> bool:
    try:
        udp_ask(port, bytes(DNSRecord.question("web.internal").pack()), timeout=0.2)
    except TimeoutError:
        return False
    return True


class FakeController:
    """GET /api/v1/dns/zone as a controller serves it, from `replies` (status, body), the
    last one repeated; on loopback, in a thread."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        """Signs each reply with it, as the controller does with its API token."""
        self.replies: list[tuple[int, bytes]] = []
        self.asked: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked.append(self.path)
                status, body = outer.replies[0] if outer.replies else (503, b"{}")
                if len(outer.replies) > 1:
                    outer.replies.pop(0)
                self.send_response(status)
                if outer.token is not None:
                    self.send_header(ZONE_SIGNATURE, zone_signature(outer.token, body))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def zone(zone: Zone, issued: float | None = None) -> tuple[int, bytes]:
        body = {
            "version": zone.version,
            "issued": time.time() if issued is None else issued,
            "zone": zone_data(zone),
            "allowed": [],
        }
        return 200, json.dumps(body).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_following_a_controller_keep_servfail_and_back() -> None:
    """--controller: answers what the controller's zone holds; a 401 says to check the token;
    an unusable zone keeps the last one; with no zone for --keep seconds, SERVFAIL; a
    restarted controller (versions from 1 again) is followed at once."""
    controller = FakeController()
    port = free_port()
    with following(port, controller.url, "--keep=1.5") as log:
        controller.replies = [controller.zone(zone_with(7))]
        wait_until(lambda: _answers_at_all(port) and a_records(port) == set(WEB_IPS), what="v7")
        unusable = json.dumps({"version": 8, "zone": {"domain": "x"}, "allowed": []}).encode()
        controller.replies = [(200, unusable), (401, b"{}")]
        time.sleep(0.5)
        assert a_records(port) == set(WEB_IPS)  # the last good zone, for --keep
        wait_until(lambda: rcode(port) == "SERVFAIL", timeout=10, what="SERVFAIL after --keep")
        controller.replies = [controller.zone(zone_with(1, OTHER_IPS))]
        wait_until(lambda: a_records(port) == set(OTHER_IPS), timeout=10, what="v1 followed")
    controller.close()
    (errors,) = log
    assert "ttl" in errors or "can't be used" in errors
    assert "HTTP 401: check --controller and the API token" in errors
    assert "SERVFAIL until it answers" in errors


def test_a_follower_answered_at_once_with_the_same_zone_does_not_spin() -> None:
    """A controller whose long polls are all taken (a fifth follower) answers at once with
    the zone the follower has: it asks again after a pause, not in a loop."""
    controller = FakeController()
    controller.replies = [controller.zone(zone_with(7))]
    port = free_port()
    with following(port, controller.url):
        wait_until(lambda: _answers_at_all(port) and a_records(port) == set(WEB_IPS), what="v7")
        before = len(controller.asked)
        time.sleep(2)
        asked = len(controller.asked) - before
    controller.close()
    assert 1 <= asked <= 6, asked


def rcode(port: int) -> str:
    reply = DNSRecord.parse(udp_ask(port, bytes(DNSRecord.question("web.internal").pack())))
    return str(RCODE[reply.header.rcode])


def test_with_the_token_only_signed_fresh_zones_are_taken() -> None:
    """--api-token: a reply not signed with it (someone posing as the controller) or issued
    over a minute ago (a replay) is not taken; the token itself is never sent."""
    impostor, controller = FakeController(token="not-the-token"), FakeController(token="t0k")
    port = free_port()
    with following(port, impostor.url, env={"CONTROLPLANE_API_TOKEN": "t0k"}) as log:
        impostor.replies = [impostor.zone(zone_with(1, OTHER_IPS))]
        wait_until(lambda: _answers_at_all(port) and len(impostor.asked) > 1, what="two asks")
        assert rcode(port) == "SERVFAIL"  # never answered from the impostor's zone
    impostor.close()
    assert "not signed with the API token" in log[0]
    with following(port, controller.url, "--api-token=t0k") as log:
        controller.replies = [controller.zone(zone_with(2), issued=time.time() - 3600)]
        wait_until(lambda: _answers_at_all(port) and len(controller.asked) > 1, what="two asks")
        assert rcode(port) == "SERVFAIL"
        controller.replies = [controller.zone(zone_with(3, OTHER_IPS))]
        wait_until(lambda: a_records(port) == set(OTHER_IPS), timeout=10, what="the signed zone")
    controller.close()
    assert "issued more than 60s ago" in log[0]


@pytest.mark.parametrize("forward", [False, True])
def test_forward_private_reverse_reaches_the_dns_process(forward: bool) -> None:
    """--dns-forward-private-reverse: a private address no backend has is asked upstream;
    without it, NXDOMAIN here and the upstream never hears of it (RFC 6303)."""
    port = free_port()
    with StubUpstream() as stub:
        child = DnsChild(
            [SocketAddress(LOOPBACK, port)],
            [stub.endpoint],
            0,
            None,
            keep=0,
            forward_private_reverse=forward,
        )
        child.start()
        try:
            zone = sample_zone()
            child.publish(zone, [])
            assert child.applied(zone.version, 10)
            ptr = bytes(DNSRecord.question("3.2.1.10.in-addr.arpa", "PTR").pack())
            reply = DNSRecord.parse(udp_ask(port, ptr))
            assert reply.header.rcode == RCODE.NXDOMAIN
            assert any("10.in-addr.arpa" in str(q.q.qname) for q in stub.queries) == forward
            assert reply.header.aa == (0 if forward else 1)
        finally:
            child.close()
