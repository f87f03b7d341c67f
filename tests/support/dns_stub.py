"""DNS test helpers on loopback only: a stub upstream resolver, a running DnsServer, clients.

Nothing here talks to a real resolver: the forwarder under test is pointed at `StubUpstream`,
a tiny UDP responder in a thread that answers a fixed table and counts what it was asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from controlplane.addresses import SocketAddress
from controlplane.core import labels as L
from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.dns_records import Zone, build_zone
from controlplane.dns_answer import Answerer, Forward
from controlplane.dns_server import DnsServer, Forwarder
from controlplane.errors import ControlPlaneError
from controlplane.settings import IpNetwork
from tests.support.ports import free_port
from tests.unit.builders import container, state

LOOPBACK = "127.0.0.1"
KEPT_QUERIES = 100


def _udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket]:
    """A resolver's two sockets on one loopback port (a few tries: the TCP twin of a free UDP
    port is seldom taken)."""
    for _ in range(10):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LOOPBACK, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((LOOPBACK, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise OSError("no loopback port free for both UDP and TCP")


class StubUpstream:
    """A resolver on loopback, UDP and TCP: A records from `records` (name -> (IPs, TTL)),
    NXDOMAIN for anything else; `silent` never answers (an upstream that is down without
    saying so); `truncating` answers every UDP query with TC and no records, as an upstream
    does when the answer is too big for the client's buffer; without `tcp`, connections are
    refused."""

    def __init__(
        self,
        records: Mapping[str, tuple[str | Sequence[str], int]] | None = None,
        *,
        silent: bool = False,
        truncating: bool = False,
        tcp: bool = True,
    ) -> None:
        self.records = {
            k.lower(): v for k, v in (records or {"example.test": ("192.0.2.1", 30)}).items()
        }
        self.silent = silent
        self.truncating = truncating
        self.tcp = tcp
        self.tcp_count = 0
        self.queries: list[DNSRecord] = []  # the first KEPT_QUERIES, so a flood can't grow it
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock, self._listener = _udp_and_tcp_on_one_port()
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="stub-upstream", daemon=True)
        self._tcp_thread = threading.Thread(
            target=self._serve_tcp, name="stub-upstream-tcp", daemon=True
        )

    @property
    def endpoint(self) -> SocketAddress:
        return SocketAddress(LOOPBACK, self.port)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def __enter__(self) -> StubUpstream:
        self._thread.start()
        if self.tcp:
            self._tcp_thread.start()
        else:
            self._listener.close()  # nothing listens on the port: TCP is refused
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._tcp_thread.is_alive():
            self._tcp_thread.join(timeout=5)
        self._sock.close()
        self._listener.close()

    def _reply(self, request: DNSRecord) -> DNSRecord:
        reply = request.reply(ra=1, aa=0)
        name = str(request.q.qname).rstrip(".").lower()
        found = self.records.get(name)
        if found is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            ips, ttl = found
            for ip in (ips,) if isinstance(ips, str) else ips:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=ttl))
        return reply

    def _serve_tcp(self) -> None:
        """One query per connection: all the forwarder asks over TCP."""
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ConnectionError):
                conn.settimeout(2)
                request = DNSRecord.parse(read_frame(conn))
                with self._lock:
                    self.tcp_count += 1
                conn.sendall(frame(bytes(self._reply(request).pack())))

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                request = DNSRecord.parse(data)
            except Exception:
                continue
            with self._lock:
                self._count += 1
                if len(self.queries) < KEPT_QUERIES:
                    self.queries.append(request)
            if self.silent:
                continue
            if self.truncating:
                reply = request.reply(ra=1, aa=0)
                reply.header.tc = 1
            else:
                reply = self._reply(request)
            with contextlib.suppress(OSError):
                self._sock.sendto(bytes(reply.pack()), addr)


class CountingAnswerer(Answerer):
    """Counts every packet the server hands over, so a load test knows what was processed;
    the count lives in shared memory so a sender in another process can pace itself by it.
    Every packet: so no reply goes into `fast`, which the server reads without a call."""

    def __init__(
        self,
        allowed: Callable[[], Iterable[IpNetwork]],
        forwarding: bool,
    ) -> None:
        super().__init__(allowed, forwarding, fill_fast=False)
        self.shared_seen = multiprocessing.RawValue(ctypes.c_uint64, 0)

    @property
    def seen(self) -> int:
        return int(self.shared_seen.value)

    def answer(self, data: bytes, client: str, udp: bool) -> bytes | Forward | None:
        self.shared_seen.value += 1
        return super().answer(data, client, udp)


@dataclass
class RunningDns:
    server: DnsServer
    answerer: Answerer
    forwarder: Forwarder | None
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)


@contextlib.contextmanager
def running_dns(
    zone: Zone | None,
    *,
    upstreams: Sequence[SocketAddress] = (),
    allowed: Iterable[IpNetwork] = (),
    timeout: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    counting: bool = False,
) -> Iterator[RunningDns]:
    """A DnsServer on a free loopback port, wired the way `wiring._dns_server` wires it;
    `counting`: with a CountingAnswerer."""
    networks = list(allowed)
    kind = CountingAnswerer if counting else Answerer
    answerer = kind(lambda: networks, forwarding=bool(upstreams))
    answerer.use(zone)
    forwarder = Forwarder(upstreams, timeout, clock) if upstreams else None
    for attempt in range(5):
        port = free_port()
        server = DnsServer([SocketAddress(LOOPBACK, port)], answerer, forwarder)
        try:
            server.start()
        except ControlPlaneError:  # the port was taken in between: try another
            if attempt == 4:
                raise
            continue
        break
    try:
        yield RunningDns(server, answerer, forwarder, port)
    finally:
        server.stop()


def udp_ask(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """One datagram out, the reply with the same ID back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, (LOOPBACK, port))
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            reply = sock.recv(65535)
            if reply[:2] == data[:2]:
                return reply


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("closed by the server")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def read_frame(sock: socket.socket) -> bytes:
    return recv_exactly(sock, int.from_bytes(recv_exactly(sock, 2), "big"))


def tcp_ask(
    port: int, *queries: bytes, timeout: float = 3.0, pipelined: bool = False
) -> list[bytes]:
    """Every query on one connection, one reply each; `pipelined` sends them all first."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        if pipelined:
            sock.sendall(b"".join(frame(q) for q in queries))
            return [read_frame(sock) for _ in queries]
        replies = []
        for query in queries:
            sock.sendall(frame(query))
            replies.append(read_frame(sock))
        return replies


WEB_IPS = ("172.20.0.2", "172.20.0.3", "172.20.0.4")
BIG = 90
BIG_IPS = tuple(f"172.20.1.{i}" for i in range(1, BIG + 1))


def sample_zone(domain: str = "internal", ttl: int = 5, version: int = 1) -> Zone:
    """web: three backends (w1 also on IPv6) on port 8080; big: 90 backends, more than a UDP
    reply holds; idle: a service whose only backend is paused."""
    web = [
        container(
            f"w{i}",
            ip=ip,
            ipv6="fd00::1" if i == 1 else "",
            labels={L.PORT: "8080"},
        )
        for i, ip in enumerate(WEB_IPS, start=1)
    ]
    big = [container(f"b{i:02d}", aliases=("big",), ip=ip) for i, ip in enumerate(BIG_IPS)]
    idle = container("p1", aliases=("idle",), ip="172.20.2.1", status="paused")
    topology = build_topology(state(*web, *big, idle), BuildOptions())
    return build_zone(topology, domain, ttl, version)


def dns_processes(port: int) -> list[int]:
    """Pids of the `controlplane dns` processes serving 127.0.0.1:port (a controller's, which
    outlive it for --dns-keep seconds)."""
    wanted = [b"controlplane", b"dns", f"--bind={LOOPBACK}:{port}".encode()]
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(word in argv for word in wanted):
            pids.append(int(entry))
    return pids


@dataclass
class DnsLoad:
    """dnsperf at a fixed rate for a bounded time, in the background; `outcome()` waits for
    it: queries sent, those that got no answer within its timeout (1 s), answers by RCODE."""

    port: int
    rate: int
    seconds: int
    name: str = "web.internal"

    def __post_init__(self) -> None:
        self._queries = tempfile.NamedTemporaryFile("w", suffix=".txt")  # noqa: SIM115
        self._queries.write(f"{self.name} A\n")
        self._queries.flush()
        self._process = subprocess.Popen(
            ["dnsperf", "-s", LOOPBACK, "-p", str(self.port), "-d", self._queries.name,
             "-Q", str(self.rate), "-l", str(self.seconds), "-t", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def outcome(self) -> DnsOutcome:
        """Waits for dnsperf; what it counted."""
        output, _ = self._process.communicate(timeout=self.seconds + 30)
        self._queries.close()
        sent = re.search(r"Queries sent:\s+(\d+)", output)
        lost = re.search(r"Queries lost:\s+(\d+)", output)
        codes = re.search(r"Response codes:\s+(.*)$", output, re.M)
        if sent is None or lost is None:
            raise AssertionError(f"dnsperf printed no counts:\n{output[-2000:]}")
        return DnsOutcome(
            lost=int(lost.group(1)),
            sent=int(sent.group(1)),
            codes={
                code: int(count)
                for code, count in re.findall(r"(\w+) (\d+) \(", codes.group(1) if codes else "")
            },
        )


@dataclass(frozen=True)
class DnsOutcome:
    lost: int
    sent: int
    codes: dict[str, int]
    """Answers by RCODE, as dnsperf's "Response codes" line gives them."""


@contextlib.contextmanager
def following(
    port: int, controller: str, *flags: str, env: Mapping[str, str] | None = None
) -> Iterator[list[str]]:
    """`controlplane dns --controller` on 127.0.0.1:port; yields a list that holds its log
    (standard error) once it has been stopped with SIGTERM, as Compose stops it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "dns", f"--bind={LOOPBACK}:{port}",
         f"--controller={controller}", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    log: list[str] = []
    try:
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=10)
        log.append(errors)
