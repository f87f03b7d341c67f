"""The DNS server on real loopback sockets: `dig` and raw dnslib clients over UDP and TCP,
forwarding to a stub upstream on loopback (never a real resolver)."""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from dnslib import EDNS0 as Edns0
from dnslib import QTYPE, RCODE, DNSRecord

from controlplane.addresses import SocketAddress
from controlplane.core.dns_records import Zone
from controlplane.dns_answer import UDP_PLAIN_LIMIT, Answerer
from controlplane.dns_server import BATCH_AFTER, DnsServer, Forwarder, _UdpReader, bind_sockets
from controlplane.errors import ControlPlaneError
from controlplane.metrics import Metrics
from controlplane.udp_batch import Batch
from tests.support.dns_stub import (
    BIG,
    BIG_IPS,
    LOOPBACK,
    WEB_IPS,
    RunningDns,
    StubUpstream,
    frame,
    read_frame,
    running_dns,
    sample_zone,
    tcp_ask,
    udp_ask,
)
from tests.support.ports import free_port

ZONE = sample_zone()
DNS_LOGGERS = ("controlplane.dns_server", "controlplane.dns_answer", "asyncio")


def query(name: str, qtype: str = "A", *, ident: int = 0x2222, edns: int | None = None) -> bytes:
    request = DNSRecord.question(name, qtype)
    request.header.id = ident
    if edns is not None:
        request.add_ar(Edns0(udp_len=edns))
    return bytes(request.pack())


def dig(port: int, *args: str) -> str:
    """`dig` against the server, one try, bounded; the output as text."""
    done = subprocess.run(
        ["dig", f"@{LOOPBACK}", "-p", str(port), "+time=2", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing a client does may end in a logged exception."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [
        r for r in caplog.records if r.name.startswith(DNS_LOGGERS) and r.levelno >= logging.ERROR
    ]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.fixture(scope="module")
def dns() -> Iterator[RunningDns]:
    """Authoritative only: no upstream."""
    with running_dns(ZONE) as running:
        yield running


# ---------------------------------------------------------------- with dig


@pytest.mark.parametrize("transport", [(), ("+tcp",)], ids=["udp", "tcp"])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("web.internal", "A"), set(WEB_IPS)),
        (("WeB.InTeRnAl", "A"), set(WEB_IPS)),
        (("web.app.internal", "A"), set(WEB_IPS)),
        (("web.internal", "AAAA"), {"fd00::1"}),
        (
            ("_web._tcp.internal", "SRV"),
            {f"1 1 8080 w{i}.container.internal." for i in (1, 2, 3)},
        ),
        (
            ("web.internal", "SRV"),
            {f"1 1 8080 w{i}.container.internal." for i in (1, 2, 3)},
        ),
        (("w2.container.internal", "A"), {"172.20.0.3"}),
        (("-x", "172.20.0.3"), {"w2.container.internal."}),
        (("-x", "fd00::1"), {"w1.container.internal."}),
        (("internal", "NS"), {"ns.internal."}),
        (("internal", "SOA"), {"ns.internal. hostmaster.internal. 1 3600 600 86400 5"}),
        (("idle.internal", "A"), set()),
        (("nope.internal", "A"), set()),
    ],
    ids=[
        "a",
        "a-mixed-case",
        "a-scoped",
        "aaaa",
        "srv",
        "srv-consul",
        "host",
        "ptr",
        "ptr-v6",
        "ns",
        "soa",
        "nodata",
        "nxdomain",
    ],
)
def test_dig_short(
    dns: RunningDns, args: tuple[str, ...], expected: set[str], transport: tuple[str, ...]
) -> None:
    assert set(lines(dig(dns.port, *args, "+short", *transport))) == expected


@pytest.mark.parametrize("transport", [(), ("+tcp",)], ids=["udp", "tcp"])
@pytest.mark.parametrize(
    ("name", "status"),
    [("nope.internal", "NXDOMAIN"), ("idle.internal", "NOERROR"), ("example.test", "REFUSED")],
    ids=["nxdomain", "nodata", "outside-refused"],
)
def test_dig_status(dns: RunningDns, name: str, status: str, transport: tuple[str, ...]) -> None:
    out = dig(dns.port, name, *transport)
    assert f"status: {status}" in out
    flags = next(line for line in out.splitlines() if line.startswith(";; flags:"))
    assert "ad" not in flags.split(";")[2].split(), flags  # dig asks with AD=1; we validate nothing
    if status != "REFUSED":
        assert "flags: qr aa" in out
        assert "ANSWER: 0, AUTHORITY: 1" in out
        assert "IN\tSOA\tns.internal. hostmaster.internal. 1 " in out


def answer_count(out: str) -> int:
    return int(out.split("ANSWER: ", 1)[1].split(",", 1)[0])


@pytest.mark.parametrize(
    ("args", "size", "fitting"),
    [(("+noedns",), UDP_PLAIN_LIMIT, 30), (("+bufsize=1232",), 1232, 74)],
    ids=["no-edns", "edns-1232"],
)
def test_dig_gets_as_many_big_a_answers_as_fit_over_udp(
    dns: RunningDns, args: tuple[str, ...], size: int, fitting: int
) -> None:
    """90 backends: no TC, as many records as the buffer holds, a different pick each time."""
    picks = set()
    for _ in range(5):
        out = dig(dns.port, "big.internal", *args, "+ignore")
        assert "flags: qr aa rd;" in out
        assert answer_count(out) == fitting
        assert int(out.split("MSG SIZE  rcvd: ", 1)[1].split()[0]) <= size
        answers = frozenset(line.split()[-1] for line in lines(out) if "\tIN\tA\t" in line)
        assert len(answers) == fitting and answers <= set(BIG_IPS)
        picks.add(answers)
    assert len(picks) > 1
    assert set(lines(dig(dns.port, "big.internal", "+tcp", "+short"))) == set(BIG_IPS)


# ---------------------------------------------------------------- raw UDP and TCP


def test_udp_answer(dns: RunningDns) -> None:
    reply = DNSRecord.parse(udp_ask(dns.port, query("web.internal", ident=0x1357)))
    assert reply.header.id == 0x1357
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.aa == 1
    assert {str(rr.rdata) for rr in reply.rr} == set(WEB_IPS)


def test_tcp_answer(dns: RunningDns) -> None:
    (raw,) = tcp_ask(dns.port, query("web.internal", ident=0x2468))
    reply = DNSRecord.parse(raw)
    assert reply.header.id == 0x2468
    assert {str(rr.rdata) for rr in reply.rr} == set(WEB_IPS)


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
def test_several_queries_on_one_tcp_connection(dns: RunningDns, pipelined: bool) -> None:
    asked = [
        query("web.internal", ident=1),
        query("_web._tcp.internal", "SRV", ident=2),
        query("nope.internal", ident=3),
        query("big.internal", ident=4),
        query("web.internal", ident=5),
        query("example.test", ident=6),
    ]
    replies = [DNSRecord.parse(r) for r in tcp_ask(dns.port, *asked, pipelined=pipelined)]
    assert [r.header.id for r in replies] == [1, 2, 3, 4, 5, 6]
    assert [r.header.rcode for r in replies] == [
        RCODE.NOERROR,
        RCODE.NOERROR,
        RCODE.NXDOMAIN,
        RCODE.NOERROR,
        RCODE.NOERROR,
        RCODE.REFUSED,
    ]
    assert [len(r.rr) for r in replies] == [3, 3, 0, BIG, 3, 0]
    assert replies[3].header.tc == 0


def test_a_fitting_pick_over_udp_then_all_over_tcp(dns: RunningDns) -> None:
    data = query("big.internal", ident=0x0BAD)
    raw = udp_ask(dns.port, data)
    assert len(raw) <= UDP_PLAIN_LIMIT
    picked = DNSRecord.parse(raw)
    assert picked.header.tc == 0
    assert picked.header.id == 0x0BAD
    assert 0 < len(picked.rr) < BIG
    assert str(picked.q.qname) == "big.internal."

    (raw,) = tcp_ask(dns.port, data)
    full = DNSRecord.parse(raw)
    assert full.header.tc == 0
    assert full.header.id == 0x0BAD
    assert {str(rr.rdata) for rr in full.rr} == set(BIG_IPS)


@pytest.mark.parametrize("edns", [None, 4096], ids=["no-edns", "edns-4096"])
def test_big_srv_over_udp_is_a_pick_with_its_glue(dns: RunningDns, edns: int | None) -> None:
    data = query("_big._tcp.internal", "SRV", edns=edns)
    raw = udp_ask(dns.port, data)
    assert len(raw) <= (UDP_PLAIN_LIMIT if edns is None else 1232)
    picked = DNSRecord.parse(raw)
    assert picked.header.tc == 0
    assert 0 < len(picked.rr) < BIG
    targets = {str(rr.rdata.target) for rr in picked.rr}
    assert {str(rr.rname) for rr in picked.ar if rr.rtype == QTYPE.A} == targets
    (raw,) = tcp_ask(dns.port, data)
    full = DNSRecord.parse(raw)
    assert len(full.rr) == BIG
    assert len([rr for rr in full.ar if rr.rtype == QTYPE.A]) == BIG


def test_rotation_is_seen_by_a_real_client(dns: RunningDns) -> None:
    firsts = [
        str(DNSRecord.parse(udp_ask(dns.port, query("web.internal", ident=i))).rr[0].rdata)
        for i in range(6)
    ]
    assert len(set(firsts[:3])) == 3
    assert set(firsts) == set(WEB_IPS)


def test_garbage_over_udp_gets_formerr_and_short_packets_nothing(dns: RunningDns) -> None:
    raw = udp_ask(dns.port, b"\xab\xcd" + b"\xff" * 30)
    reply = DNSRecord.parse(raw)
    assert reply.header.rcode == RCODE.FORMERR
    assert reply.header.id == 0xABCD
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(b"\x01\x02\x03", dns.address)
        with pytest.raises(TimeoutError):
            sock.recv(512)
    assert DNSRecord.parse(udp_ask(dns.port, query("web.internal"))).rr


def test_one_batch_of_every_kind_of_query_answers_each_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent before the server starts: the first BATCH_AFTER are read one at a time, which
    shows a backlog, so the rest come in one batch: prebuilt replies, built ones, a
    forward, FORMERR and a dropped scrap, in one row."""
    with StubUpstream() as stub:
        port = free_port()
        sockets = bind_sockets([SocketAddress(LOOPBACK, port)])
        answerer = Answerer(lambda: [], forwarding=True)
        answerer.use(ZONE)
        server = DnsServer(
            [SocketAddress(LOOPBACK, port)], answerer, Forwarder([stub.endpoint]), sockets
        )
        batches: list[int] = []
        answer_batch = _UdpReader._answer_batch

        def counted(reader: _UdpReader, batch: Batch, lengths: list[int]) -> None:
            batches.append(len(lengths))
            answer_batch(reader, batch, lengths)

        monkeypatch.setattr(_UdpReader, "_answer_batch", counted)
        one_by_one = [query("web.internal", ident=100 + n) for n in range(BATCH_AFTER)]
        batched = [
            query("web.internal", ident=1),
            query("web.internal", ident=2),
            query("example.test", ident=3),  # forwarded: leaves the row
            b"\x00\x04" + b"\xff" * 30,  # FORMERR
            b"\x05",  # nothing: too short for a header
            query("nope.internal", ident=6),
            query("web.internal", ident=7),
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(3)
            for data in one_by_one + batched:
                client.sendto(data, (LOOPBACK, port))
            server.start()
            try:
                replies = {}
                for _ in range(BATCH_AFTER + 6):
                    reply = DNSRecord.parse(client.recv(4096))
                    replies[reply.header.id] = reply
            finally:
                server.stop()
    assert batches == [len(batched)]
    assert sorted(replies) == [1, 2, 3, 4, 6, 7, *range(100, 100 + BATCH_AFTER)]
    web = [1, 2, 7, *range(100, 100 + BATCH_AFTER)]
    assert {str(rr.rdata) for i in web for rr in replies[i].rr} == set(WEB_IPS)
    assert all(str(replies[i].q.qname) == "web.internal." for i in web)
    assert [str(rr.rdata) for rr in replies[3].rr] == ["192.0.2.1"]
    assert replies[4].header.rcode == RCODE.FORMERR
    assert replies[6].header.rcode == RCODE.NXDOMAIN


def test_a_burst_past_one_batch_is_answered_whole(dns: RunningDns) -> None:
    """Two and a half batches."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # room for every reply
        client.settimeout(3)
        for ident in range(160):
            client.sendto(query("web.internal", ident=ident), dns.address)
        idents = {DNSRecord.parse(client.recv(4096)).header.id for _ in range(160)}
    assert idents == set(range(160))


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM], ids=["ENOSYS", "EPERM"])
def test_where_batches_cannot_be_read_it_reads_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """A sandbox that filters recvmmsg out (ENOSYS, or EPERM as Docker's seccomp profile
    says it): the first backlog finds it, and from then on every datagram is read alone,
    and answered."""

    def refused(_batch: Batch, _fd: int) -> list[int]:
        raise OSError(code, "refused by a filter")

    monkeypatch.setattr(Batch, "receive", refused)
    with running_dns(ZONE) as running:
        test_a_burst_past_one_batch_is_answered_whole(running)
        test_a_burst_past_one_batch_is_answered_whole(running)
    assert "reads one datagram per call from now" in caplog.text


def test_a_tcp_message_without_a_header_closes_the_connection(dns: RunningDns) -> None:
    with socket.create_connection(dns.address, timeout=3) as sock:
        sock.sendall(frame(query("web.internal", ident=9)))
        assert DNSRecord.parse(read_frame(sock)).header.id == 9
        sock.sendall(frame(b"\x00\x01"))
        assert sock.recv(10) == b""
    (raw,) = tcp_ask(dns.port, query("web.internal"))
    assert DNSRecord.parse(raw).rr


def test_a_tcp_client_that_hangs_up_mid_message(dns: RunningDns) -> None:
    for partial in (b"\x00", b"\x00\x40", b"\x00\x40" + query("web.internal")[:10]):
        with socket.create_connection(dns.address, timeout=3) as sock:
            sock.sendall(partial)
    (raw,) = tcp_ask(dns.port, query("web.internal"))
    assert DNSRecord.parse(raw).rr


def answering(zone: Zone) -> Answerer:
    answerer = Answerer(list, False)
    answerer.use(zone)
    return answerer


def test_stop_releases_the_port() -> None:
    port = free_port()
    for _ in range(2):
        server = DnsServer([SocketAddress(LOOPBACK, port)], answering(ZONE), None)
        server.start()
        try:
            assert DNSRecord.parse(udp_ask(port, query("web.internal"))).rr
        finally:
            server.stop()


def test_a_taken_port_is_a_clear_error(dns: RunningDns) -> None:
    server = DnsServer([SocketAddress(LOOPBACK, dns.port)], answering(ZONE), None)
    with pytest.raises(ControlPlaneError, match="--dns-bind"):
        server.start()
    server.stop()


def test_before_the_first_sync_servfail() -> None:
    with running_dns(None) as running:
        reply = DNSRecord.parse(udp_ask(running.port, query("web.internal")))
        assert reply.header.rcode == RCODE.SERVFAIL


# ---------------------------------------------------------------- forwarding


def test_forwarded_answer_carries_the_client_id_then_comes_from_the_cache() -> None:
    with StubUpstream() as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        first = DNSRecord.parse(udp_ask(running.port, query("example.test", ident=0x1111)))
        assert first.header.id == 0x1111
        assert first.header.rcode == RCODE.NOERROR
        assert [(str(rr.rdata), rr.ttl) for rr in first.rr] == [("192.0.2.1", 30)]
        assert stub.count == 1
        assert str(stub.queries[0].q.qname) == "example.test."

        second = DNSRecord.parse(udp_ask(running.port, query("example.test", ident=0x2222)))
        assert second.header.id == 0x2222
        assert [str(rr.rdata) for rr in second.rr] == ["192.0.2.1"]
        (raw,) = tcp_ask(running.port, query("example.test", ident=0x3333))
        assert DNSRecord.parse(raw).header.id == 0x3333
        assert set(lines(dig(running.port, "example.test", "+short"))) == {"192.0.2.1"}
        assert stub.count == 1  # all from the forward cache

        # In-zone names are still answered here, never forwarded.
        assert set(lines(dig(running.port, "web.internal", "+short"))) == set(WEB_IPS)
        assert stub.count == 1


def test_forwarding_over_tcp() -> None:
    with StubUpstream() as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        assert set(lines(dig(running.port, "example.test", "+short", "+tcp"))) == {"192.0.2.1"}
        assert stub.count == 1


def test_upstream_nxdomain_is_relayed() -> None:
    with StubUpstream() as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        reply = DNSRecord.parse(udp_ask(running.port, query("nothing.test", ident=7)))
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert reply.header.id == 7
        assert stub.count == 1


def test_forward_cache_honours_the_ttl() -> None:
    records = {"short.test": ("192.0.2.7", 1)}
    with StubUpstream(records) as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        udp_ask(running.port, query("short.test"))
        udp_ask(running.port, query("short.test"))
        assert stub.count == 1
        time.sleep(1.2)  # the TTL itself is what is under test
        reply = DNSRecord.parse(udp_ask(running.port, query("short.test")))
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.7"]
        assert stub.count == 2


def test_a_truncated_upstream_reply_is_asked_again_over_tcp() -> None:
    with (
        StubUpstream(truncating=True) as stub,
        running_dns(ZONE, upstreams=[stub.endpoint]) as running,
    ):
        reply = DNSRecord.parse(udp_ask(running.port, query("example.test", ident=0x7E7E)))
        assert reply.header.id == 0x7E7E
        assert reply.header.tc == 0
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.1"]
        assert (stub.count, stub.tcp_count) == (1, 1)
        # The full answer is what is kept: the next client is served it from the cache.
        udp_ask(running.port, query("example.test", ident=0x7E7F))
        assert (stub.count, stub.tcp_count) == (1, 1)


def test_a_truncated_upstream_reply_is_relayed_when_tcp_fails() -> None:
    """The client is told TC, to ask over TCP itself; nothing truncated is kept."""
    with (
        StubUpstream(truncating=True, tcp=False) as stub,
        running_dns(ZONE, upstreams=[stub.endpoint]) as running,
    ):
        for ident in (0x6161, 0x6262):
            reply = DNSRecord.parse(udp_ask(running.port, query("example.test", ident=ident)))
            assert (reply.header.id, reply.header.tc, reply.rr) == (ident, 1, [])
        assert stub.count == 2


def test_a_forwarded_answer_too_big_for_the_client_is_truncated_for_it() -> None:
    """The upstream's full answer (asked over TCP) is kept; a UDP client without EDNS0 gets TC
    from us and then all of it over TCP, from the cache."""
    many = tuple(f"192.0.2.{i}" for i in range(1, 41))  # 40 A records: more than 512 bytes
    with (
        StubUpstream({"many.test": (many, 30)}, truncating=True) as stub,
        running_dns(ZONE, upstreams=[stub.endpoint]) as running,
    ):
        raw = udp_ask(running.port, query("many.test", ident=0x4242))
        assert len(raw) <= UDP_PLAIN_LIMIT
        cut = DNSRecord.parse(raw)
        assert (cut.header.id, cut.header.tc, cut.header.ra, cut.rr) == (0x4242, 1, 1, [])
        (raw,) = tcp_ask(running.port, query("many.test", ident=0x4343))
        assert {str(rr.rdata) for rr in DNSRecord.parse(raw).rr} == set(many)
        assert (stub.count, stub.tcp_count) == (1, 1)


def test_a_kept_answer_carries_the_edns0_and_rd_of_the_client_asking_now() -> None:
    """RFC 6891: no OPT to a client that sent none; RFC 3225: DO as that client set it."""
    first = DNSRecord.question("example.test")
    first.add_ar(Edns0(udp_len=4096, flags="do"))
    plain = DNSRecord.question("example.test")
    plain.header.rd = 0
    without_do = DNSRecord.question("example.test")
    without_do.add_ar(Edns0(udp_len=1232))
    with StubUpstream() as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        replies = [
            DNSRecord.parse(udp_ask(running.port, bytes(r.pack())))
            for r in (first, plain, without_do, first)
        ]
        assert stub.count == 1  # the last three from the cache
    opts = [[rr for rr in r.ar if rr.rtype == QTYPE.OPT] for r in replies]
    assert [len(o) for o in opts] == [1, 0, 1, 1]
    assert [bool(o[0].ttl & 0x8000) for o in opts if o] == [True, False, True]
    assert [r.header.rd for r in replies] == [1, 0, 1, 1]
    assert all([str(rr.rdata) for rr in r.rr] == ["192.0.2.1"] for r in replies)


def test_forwarded_ttls_count_down_from_when_the_answer_was_stored() -> None:
    """Never a TTL above what is left: whole seconds begun since are taken off."""
    now = [1000.0]
    with (
        StubUpstream({"example.test": ("192.0.2.1", 30)}) as stub,
        running_dns(ZONE, upstreams=[stub.endpoint], clock=lambda: now[0]) as running,
    ):
        ttls = []
        for at in (1000.0, 1000.0, 1010.5, 1029.9):
            now[0] = at
            reply = DNSRecord.parse(udp_ask(running.port, query("example.test")))
            ttls.append(reply.rr[0].ttl)
        assert ttls == [30, 30, 19, 0]
        assert stub.count == 1
        now[0] = 1030.0  # expired: asked again, and told with the upstream's TTL
        assert DNSRecord.parse(udp_ask(running.port, query("example.test"))).rr[0].ttl == 30
        assert stub.count == 2


@pytest.mark.parametrize("dead", ["refused", "silent"])
def test_fail_over_to_the_next_upstream(dead: str) -> None:
    with StubUpstream(silent=True) as silent, StubUpstream() as stub:
        first = silent.endpoint if dead == "silent" else SocketAddress(LOOPBACK, free_port())
        with running_dns(ZONE, upstreams=[first, stub.endpoint], timeout=1.0) as running:
            started = time.monotonic()
            reply = DNSRecord.parse(udp_ask(running.port, query("example.test", ident=0x0F0F)))
            elapsed = time.monotonic() - started
            assert reply.header.id == 0x0F0F
            assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.1"]
            assert elapsed < 1.5
            assert stub.count == 1
            assert silent.count == (1 if dead == "silent" else 0)


def test_every_upstream_dead_is_servfail() -> None:
    with StubUpstream(silent=True) as silent:
        upstreams = [SocketAddress(LOOPBACK, free_port()), silent.endpoint]
        with running_dns(ZONE, upstreams=upstreams, timeout=0.5) as running:
            started = time.monotonic()
            reply = DNSRecord.parse(udp_ask(running.port, query("example.test", ident=0x5A5A)))
            assert time.monotonic() - started < 2.0
            assert reply.header.rcode == RCODE.SERVFAIL
            assert reply.header.id == 0x5A5A
            assert (reply.header.aa, reply.header.ra) == (0, 1)
            assert str(reply.q.qname) == "example.test."
            # A failure is not cached: the next query asks again.
            udp_ask(running.port, query("example.test", ident=0x5A5B))
            assert silent.count == 2


def test_forward_cache_echoes_the_question_of_each_client() -> None:
    with StubUpstream() as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        udp_ask(running.port, query("example.test"))
        reply = DNSRecord.parse(udp_ask(running.port, query("ExAmPlE.TeSt")))
        assert str(reply.q.qname) == "ExAmPlE.TeSt."


def test_queries_are_counted_by_result_for_the_metrics() -> None:
    with running_dns(ZONE) as running:
        udp_ask(running.port, query("web.internal"))
        udp_ask(running.port, query("nope.internal", ident=0x3333))
        udp_ask(running.port, query("example.com", ident=0x4444))
        badvers = DNSRecord.question("web.internal")
        badvers.add_ar(Edns0(udp_len=1232, version=1))
        udp_ask(running.port, bytes(badvers.pack()))
        udp_ask(running.port, query("big.internal", "ANY"))  # TC: no records either
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\x00", (LOOPBACK, running.port))  # too short for a header
        wait_until_dropped = time.monotonic() + 2
        while running.server.outcomes()["dropped"] == 0 and time.monotonic() < wait_until_dropped:
            time.sleep(0.01)
        outcomes = running.server.outcomes()
    assert outcomes["nxdomain"] == 1
    assert outcomes["refused"] == 1 and outcomes["dropped"] == 1
    assert outcomes["badvers"] == 1 and outcomes["noerror"] == 2
    metrics = Metrics(lambda: None, lambda: outcomes).exposition().decode()
    assert 'controlplane_dns_queries_total{result="nxdomain"} 1.0' in metrics
    assert "rcode7" not in metrics
