"""Answerer: query bytes -> reply bytes, with no socket. Replies are parsed back with dnslib."""

from __future__ import annotations

import collections
import ipaddress
import itertools
import random
from collections.abc import Iterable
from typing import Any

import pytest
from dnslib import (
    CLASS,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from dnslib import EDNS0 as Edns0
from dnslib import EDNSOption as EdnsOption
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import dns_answer
from controlplane.core import labels as L
from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.dns_records import Record, Zone, build_zone
from controlplane.core.model import ContainerFacts
from controlplane.dns_answer import (
    CACHE_ENTRIES,
    UDP_EDNS_MAX,
    UDP_PLAIN_LIMIT,
    Answerer,
    Forward,
)
from controlplane.settings import IpNetwork
from tests.unit.builders import container, state

DOMAIN = "internal"
TTL = 5
WEB_IPS = ("172.20.0.2", "172.20.0.3", "172.20.0.4")
BIG = 90  # the figure: far more A records than 512 bytes hold
BIG_IPS = tuple(f"172.20.1.{i}" for i in range(1, BIG + 1))
ALLOWED = (ipaddress.ip_network("172.30.0.0/16"), ipaddress.ip_network("fd30::/64"))


def topology_containers(web_ips: Iterable[str] = WEB_IPS) -> list[ContainerFacts]:
    web = [
        container(
            f"w{i}",
            ip=ip,
            ipv6=f"fd00::{i}" if i == 1 else "",
            labels={L.PORT: "8080", L.WEIGHT: str(i)},
        )
        for i, ip in enumerate(web_ips, start=1)
    ]
    big = [container(f"b{i:02d}", aliases=("big",), ip=ip) for i, ip in enumerate(BIG_IPS)]
    idle = container("p1", aliases=("idle",), ip="172.20.2.1", status="paused")
    return [*web, *big, idle]


def make_zone(version: int = 1, web_ips: Iterable[str] = WEB_IPS) -> Zone:
    topology = build_topology(state(*topology_containers(web_ips)), BuildOptions())
    return build_zone(topology, DOMAIN, TTL, version)


ZONE = make_zone()


def answerer(
    zone: Zone | None = ZONE,
    forwarding: bool = False,
    allowed: Iterable[IpNetwork] = ALLOWED,
    **options: Any,
) -> Answerer:
    a = Answerer(lambda: list(allowed), forwarding, **options)
    a.use(zone)
    return a


def query(
    name: str,
    qtype: str = "A",
    *,
    ident: int = 0x1234,
    edns: int | None = None,
    options: Iterable[EdnsOption] = (),
    opcode: int = OPCODE.QUERY,
    qclass: str = "IN",
) -> bytes:
    request = DNSRecord.question(name, qtype, qclass)
    request.header.id = ident
    request.header.opcode = opcode
    if edns is not None:
        request.add_ar(Edns0(udp_len=edns, opts=list(options)))
    return bytes(request.pack())


def cookie(seed: int) -> EdnsOption:
    return EdnsOption(10, random.Random(seed).randbytes(8))


def ask(a: Answerer, data: bytes, client: str = "127.0.0.1", udp: bool = True) -> DNSRecord:
    """As the server asks: a UDP query looks into `fast` first."""
    fast = a.fast.get(data[2:]) if udp else None
    reply = a.answer(data, client, udp) if fast is None else data[:2] + next(fast[0])
    assert isinstance(reply, bytes | bytearray), reply
    return DNSRecord.parse(reply)


def rrs(section: list[RR]) -> set[tuple[str, str, str]]:
    return {(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in section if rr.rtype != 41}


def first_a(reply: DNSRecord) -> str:
    return str(reply.rr[0].rdata)


def opt(reply: DNSRecord) -> list[RR]:
    return [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]


def counting(a: Answerer) -> list[bytes]:
    """Spies on the slow path: every packet that missed the reply cache."""
    misses: list[bytes] = []
    slow = a._answer

    def spy(data: bytes, *args: object) -> object:
        misses.append(data)
        return slow(data, *args)  # type: ignore[arg-type]

    a._answer = spy  # type: ignore[method-assign,assignment]
    return misses


# ---------------------------------------------------------------- record types


def srv(weight: int, host: str) -> tuple[str, str, str]:
    return ("_web._tcp.internal.", "SRV", f"1 {weight} 8080 {host}.container.internal.")


HOSTS_A = {
    ("w1.container.internal.", "A", "172.20.0.2"),
    ("w1.container.internal.", "AAAA", "fd00::1"),
    ("w2.container.internal.", "A", "172.20.0.3"),
    ("w3.container.internal.", "A", "172.20.0.4"),
}
SOA = ("internal.", "SOA", "ns.internal. hostmaster.internal. 1 3600 600 86400 5")


@pytest.mark.parametrize(
    ("name", "qtype", "answers", "additional"),
    [
        ("web.internal", "A", {("web.internal.", "A", ip) for ip in WEB_IPS}, set()),
        ("web.internal", "AAAA", {("web.internal.", "AAAA", "fd00::1")}, set()),
        ("web.app.internal", "A", {("web.app.internal.", "A", ip) for ip in WEB_IPS}, set()),
        (
            "_web._tcp.internal",
            "SRV",
            {srv(1, "w1"), srv(2, "w2"), srv(3, "w3")},
            HOSTS_A,
        ),
        (
            "web.internal",
            "SRV",
            {("web.internal.", *srv(i, f"w{i}")[1:]) for i in (1, 2, 3)},
            HOSTS_A,
        ),
        ("w2.container.internal", "A", {("w2.container.internal.", "A", "172.20.0.3")}, set()),
        (
            "3.0.20.172.in-addr.arpa",
            "PTR",
            {("3.0.20.172.in-addr.arpa.", "PTR", "w2.container.internal.")},
            set(),
        ),
        (
            ipaddress.ip_address("fd00::1").reverse_pointer,
            "PTR",
            {
                (
                    ipaddress.ip_address("fd00::1").reverse_pointer + ".",
                    "PTR",
                    "w1.container.internal.",
                )
            },
            set(),
        ),
        ("internal", "SOA", {SOA}, set()),
        ("internal", "NS", {("internal.", "NS", "ns.internal.")}, set()),
        ("internal", "ANY", {SOA, ("internal.", "NS", "ns.internal.")}, set()),
        (
            "w1.container.internal",
            "ANY",
            {
                ("w1.container.internal.", "A", "172.20.0.2"),
                ("w1.container.internal.", "AAAA", "fd00::1"),
            },
            set(),
        ),
    ],
    ids=[
        "a",
        "aaaa",
        "a-scoped",
        "srv-tcp-with-glue",
        "srv-consul-with-glue",
        "host-a",
        "ptr-v4",
        "ptr-v6",
        "soa",
        "ns",
        "any-apex",
        "any-host",
    ],
)
def test_record_types(
    name: str,
    qtype: str,
    answers: set[tuple[str, str, str]],
    additional: set[tuple[str, str, str]],
) -> None:
    reply = ask(answerer(), query(name, qtype), udp=False)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.qr == 1
    assert reply.header.aa == 1
    assert reply.header.tc == 0
    assert rrs(reply.rr) == answers
    assert len(reply.rr) == len(answers)
    assert rrs(reply.ar) == additional
    assert reply.auth == []
    assert {rr.ttl for rr in reply.rr} == {TTL}


@pytest.mark.parametrize(
    ("name", "qtype", "rcode"),
    [
        ("nope.internal", "A", RCODE.NXDOMAIN),
        ("web.nope.internal", "A", RCODE.NXDOMAIN),
        ("_nope._tcp.internal", "SRV", RCODE.NXDOMAIN),
        ("4.3.2.1.in-addr.arpa", "PTR", None),  # a public address's: not ours to deny
        ("web.internal", "TXT", RCODE.NOERROR),
        ("web.internal", "MX", RCODE.NOERROR),
        ("web.internal", "PTR", RCODE.NOERROR),
        ("idle.internal", "A", RCODE.NOERROR),
        ("idle.internal", "SRV", RCODE.NOERROR),
        ("_tcp.internal", "SRV", RCODE.NOERROR),
        ("container.internal", "A", RCODE.NOERROR),
        ("app.internal", "A", RCODE.NOERROR),
        ("internal", "A", RCODE.NOERROR),
        ("p1.container.internal", "A", RCODE.NXDOMAIN),
    ],
    ids=[
        "nxdomain",
        "nxdomain-deep",
        "nxdomain-srv",
        "unknown-reverse-refused",
        "nodata-txt",
        "nodata-mx",
        "nodata-ptr",
        "nodata-no-live-backend",
        "nodata-no-live-backend-srv",
        "nodata-ent-tcp",
        "nodata-ent-container",
        "nodata-ent-network",
        "nodata-apex-a",
        "nxdomain-paused-host",
    ],
)
def test_negative_answers_carry_the_soa(name: str, qtype: str, rcode: int | None) -> None:
    reply = ask(answerer(), query(name, qtype))
    if rcode is None:
        assert reply.header.rcode == RCODE.REFUSED
        return
    assert reply.header.rcode == rcode
    assert reply.header.aa == 1
    assert reply.rr == []
    assert rrs(reply.auth) == {SOA}
    assert reply.auth[0].ttl == TTL


def local_soa(apex: str) -> tuple[str, str, str]:
    return (f"{apex}.", "SOA", f"{apex}. nobody.invalid. 1 3600 1200 604800 {TTL}")


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "answers", "apex"),
    [
        ("9.9.20.172.in-addr.arpa", "PTR", RCODE.NXDOMAIN, set(), "20.172.in-addr.arpa"),
        ("3.2.1.10.in-addr.arpa", "PTR", RCODE.NXDOMAIN, set(), "10.in-addr.arpa"),
        ("9.9.168.192.in-addr.arpa", "PTR", RCODE.NXDOMAIN, set(), "168.192.in-addr.arpa"),
        ("1.0.0.127.in-addr.arpa", "PTR", RCODE.NXDOMAIN, set(), "127.in-addr.arpa"),
        (
            ipaddress.ip_address("fd00::9").reverse_pointer,
            "PTR",
            RCODE.NXDOMAIN,
            set(),
            "d.f.ip6.arpa",
        ),
        (
            ipaddress.ip_address("fe80::1").reverse_pointer,
            "PTR",
            RCODE.NXDOMAIN,
            set(),
            "8.e.f.ip6.arpa",
        ),
        (
            ipaddress.ip_address("2001:db8::1").reverse_pointer,
            "PTR",
            RCODE.NXDOMAIN,
            set(),
            "8.b.d.0.1.0.0.2.ip6.arpa",
        ),
        ("0.20.172.in-addr.arpa", "PTR", RCODE.NOERROR, set(), "20.172.in-addr.arpa"),
        ("2.0.20.172.in-addr.arpa", "A", RCODE.NOERROR, set(), "20.172.in-addr.arpa"),
        (
            "2.0.20.172.in-addr.arpa",
            "PTR",
            RCODE.NOERROR,
            {("2.0.20.172.in-addr.arpa.", "PTR", "w1.container.internal.")},
            None,
        ),
        ("10.in-addr.arpa", "SOA", RCODE.NOERROR, {local_soa("10.in-addr.arpa")}, None),
        (
            "10.in-addr.arpa",
            "NS",
            RCODE.NOERROR,
            {("10.in-addr.arpa.", "NS", "10.in-addr.arpa.")},
            None,
        ),
    ],
    ids=[
        "rfc1918-172",
        "rfc1918-10",
        "rfc1918-192",
        "loopback",
        "ula",
        "link-local",
        "documentation-v6",
        "empty-non-terminal-above-a-backend",
        "backend-ptr-name-nodata",
        "backend-ptr",
        "apex-soa",
        "apex-ns",
    ],
)
def test_private_reverse_zones_are_answered_here(
    name: str, qtype: str, rcode: int, answers: set[tuple[str, str, str]], apex: str | None
) -> None:
    """RFC 6303: never forwarded, even by a forwarder; NXDOMAIN carries that zone's SOA."""
    reply = ask(answerer(forwarding=True), query(name, qtype))
    assert reply.header.rcode == rcode
    assert reply.header.aa == 1
    assert rrs(reply.rr) == answers
    assert rrs(reply.auth) == (set() if apex is None else {local_soa(apex)})


@pytest.mark.parametrize(
    ("name", "forwarded"),
    [
        ("3.2.1.10.in-addr.arpa", True),
        ("9.9.20.172.in-addr.arpa", True),
        ("10.in-addr.arpa", True),
        ("2.0.20.172.in-addr.arpa", False),  # a backend's PTR stays ours
        ("0.20.172.in-addr.arpa", False),  # above one
        ("web.internal", False),
    ],
)
def test_forward_private_reverse_sends_what_no_backend_holds_upstream(
    name: str, forwarded: bool
) -> None:
    """--dns-forward-private-reverse (dnsmasq's default, its --bogus-priv off): a corporate
    resolver's PTRs for private addresses are asked for; the backends' are still answered."""
    a = answerer(forwarding=True, forward_private_reverse=True)
    result = a.answer(query(name, "PTR"), "127.0.0.1", True)
    assert isinstance(result, Forward) == forwarded
    alone = answerer(forwarding=False, forward_private_reverse=True)  # no upstream: ours
    assert not isinstance(alone.answer(query(name, "PTR"), "127.0.0.1", True), Forward)


@pytest.mark.parametrize(
    "name", ["4.3.2.1.in-addr.arpa", "1.0.32.172.in-addr.arpa", "in-addr.arpa"]
)
def test_public_reverse_names_are_forwarded(name: str) -> None:
    assert isinstance(
        answerer(forwarding=True).answer(query(name, "PTR"), "127.0.0.1", True), Forward
    )


@pytest.mark.parametrize("forwarding", [False, True], ids=["authoritative-only", "forwarding"])
def test_ra_says_whether_recursion_is_available(forwarding: bool) -> None:
    reply = ask(answerer(forwarding=forwarding), query("web.internal"))
    assert reply.header.aa == 1
    assert reply.header.ra == int(forwarding)


def test_rd_is_echoed() -> None:
    request = DNSRecord.question("web.internal")
    request.header.rd = 0
    assert ask(answerer(), bytes(request.pack())).header.rd == 0
    assert ask(answerer(), query("web.internal")).header.rd == 1


# ---------------------------------------------------------------- echo and IDs


@pytest.mark.parametrize(
    ("name", "qtype", "edns"),
    [
        ("WeB.InTeRnAl", "A", None),
        ("WEB.INTERNAL", "A", 1232),
        ("NoPe.InTeRnAl", "A", None),
        ("_WeB._TcP.iNtErNaL", "SRV", 4096),
        ("BiG.InTeRnAl", "A", None),  # truncated
    ],
    ids=["mixed-case", "upper-case-edns", "nxdomain", "srv", "truncated"],
)
def test_reply_echoes_the_question_and_id_exactly(name: str, qtype: str, edns: int | None) -> None:
    a = answerer()
    for ident in (0x0000, 0xBEEF, 0xFFFF, 0xBEEF):  # the last one is a cache hit
        data = query(name, qtype, ident=ident, edns=edns)
        question_end = len(query(name, qtype))  # header and question, no OPT
        reply = a.answer(data, "127.0.0.1", True)
        assert isinstance(reply, bytes | bytearray)
        assert reply[:2] == ident.to_bytes(2, "big")
        assert reply[12:question_end] == data[12:question_end]
        parsed = DNSRecord.parse(reply)
        assert str(parsed.q.qname) == name + "."
        assert len(parsed.questions) == 1


def test_cd_is_echoed() -> None:
    request = DNSRecord.question("web.internal")
    request.header.cd = 1
    assert ask(answerer(), bytes(request.pack())).header.cd == 1


@pytest.mark.parametrize(
    ("bit", "name"),
    [
        ("ad", "web.internal"),
        ("ad", "nope.internal"),
        ("tc", "web.internal"),
        ("tc", "nope.internal"),
        ("z", "web.internal"),
        ("z", "nope.internal"),
        ("rcode", "web.internal"),  # NXDOMAIN replies set their own rcode
    ],
    ids=["ad", "ad-nxdomain", "tc", "tc-nxdomain", "z", "z-nxdomain", "rcode"],
)
def test_query_header_bits_are_not_echoed(bit: str, name: str) -> None:
    request = DNSRecord.question(name)
    setattr(request.header, bit, 1 if bit != "rcode" else RCODE.NXDOMAIN)
    reply = ask(answerer(), bytes(request.pack()), udp=False)
    assert getattr(reply.header, bit) == 0


def test_answers_for_mixed_case_are_the_same_records() -> None:
    a = answerer()
    lower = ask(a, query("web.internal"), udp=False)
    mixed = ask(a, query("WeB.InTeRnAl"), udp=False)
    assert {str(rr.rdata) for rr in lower.rr} == {str(rr.rdata) for rr in mixed.rr}


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("WeB.InTeRnAl", "A"),
        ("_WEB._Tcp.internal", "SRV"),
        ("W1.Container.Internal", "ANY"),
        ("2.0.20.172.IN-ADDR.arpa", "PTR"),
    ],
)
def test_answer_owner_names_echo_the_question_case(name: str, qtype: str) -> None:
    """0x20: a resolver that randomises case checks it comes back as sent."""
    a = answerer()
    for _ in range(2):  # miss, then hit
        reply = ask(a, query(name, qtype), udp=False)
        assert reply.rr
        assert {rr.rname.label for rr in reply.rr} == {DNSLabel(name).label}


# ---------------------------------------------------------------- rotation


def test_rotation_with_identical_queries() -> None:
    a = answerer()
    data = query("web.internal")
    replies = [ask(a, data) for _ in range(6)]
    firsts = [first_a(r) for r in replies]
    assert all(x != y for x, y in itertools.pairwise(firsts)), firsts
    assert set(firsts[:3]) == set(WEB_IPS)
    assert firsts[3:] == firsts[:3]  # a cycle, so every backend is first as often
    for r in replies:
        assert sorted(str(rr.rdata) for rr in r.rr) == sorted(WEB_IPS)


def test_rotation_with_differing_ids() -> None:
    a = answerer()
    firsts = [first_a(ask(a, query("web.internal", ident=i))) for i in range(3)]
    assert set(firsts) == set(WEB_IPS)


def test_rotation_with_a_fresh_cookie_every_query() -> None:
    """Clients that send a new EDNS cookie each time miss the reply cache: still rotated."""
    a = answerer()
    firsts = [
        first_a(ask(a, query("web.internal", ident=i, edns=1232, options=[cookie(i)])))
        for i in range(6)
    ]
    assert all(x != y for x, y in itertools.pairwise(firsts)), firsts
    assert set(firsts[:3]) == set(WEB_IPS)


def test_rotation_keeps_the_order_of_a_ring() -> None:
    a = answerer()
    orders = [tuple(str(rr.rdata) for rr in ask(a, query("web.internal")).rr) for _ in range(3)]
    for order in orders:
        i = order.index(WEB_IPS[0])
        assert order[i:] + order[:i] == WEB_IPS


def test_rotation_of_srv_keeps_the_glue() -> None:
    a = answerer()
    replies = [ask(a, query("_web._tcp.internal", "SRV"), udp=False) for _ in range(3)]
    assert len({str(r.rr[0].rdata) for r in replies}) == 3
    assert all(rrs(r.ar) == HOSTS_A for r in replies)


def test_every_backend_comes_first_in_turn() -> None:
    a = answerer()
    data = query("big.internal")
    firsts = {first_a(ask(a, data, udp=False)) for _ in range(BIG)}
    assert firsts == set(BIG_IPS)


# ---------------------------------------------------------------- cache


def test_cache_hit_returns_the_same_bytes_with_the_new_id() -> None:
    a = answerer()
    misses = counting(a)
    first = a.answer(query("w1.container.internal", ident=1), "127.0.0.1", True)
    second = a.answer(query("w1.container.internal", ident=0xABCD), "127.0.0.1", True)
    assert isinstance(first, bytes | bytearray)
    assert isinstance(second, bytes | bytearray)
    assert len(misses) == 1
    assert second[:2] == b"\xab\xcd"
    assert second[2:] == first[2:]


def test_cache_hit_over_tcp_is_not_the_udp_reply() -> None:
    a = answerer()
    udp = ask(a, query("big.internal"), udp=True)
    tcp = ask(a, query("big.internal"), udp=False)
    udp_again = ask(a, query("big.internal"), udp=True)
    assert 0 < len(udp.rr) < BIG
    assert 0 < len(udp_again.rr) < BIG
    assert tcp.header.tc == 0
    assert len(tcp.rr) == BIG


def test_negative_answers_are_cached_too() -> None:
    a = answerer()
    misses = counting(a)
    for ident in range(5):
        assert ask(a, query("nope.internal", ident=ident)).header.rcode == RCODE.NXDOMAIN
    assert len(misses) == 1


def test_a_new_zone_version_never_returns_old_answers() -> None:
    a = answerer(make_zone(1), allowed=[])
    web = query("web.internal")
    new_name = query("w4.container.internal")
    for _ in range(3):  # warm every rotation variant
        assert {str(rr.rdata) for rr in ask(a, web).rr} == set(WEB_IPS)
    assert ask(a, new_name).header.rcode == RCODE.NXDOMAIN
    assert ask(a, query("internal", "SOA")).rr[0].rdata.times[0] == 1

    a.use(make_zone(2, web_ips=("172.20.0.3", "172.20.0.9", "172.20.0.10", "172.20.0.11")))
    for _ in range(8):
        assert {str(rr.rdata) for rr in ask(a, web).rr} == {
            "172.20.0.3",
            "172.20.0.9",
            "172.20.0.10",
            "172.20.0.11",
        }
    assert [str(rr.rdata) for rr in ask(a, new_name).rr] == ["172.20.0.11"]
    assert ask(a, query("internal", "SOA")).rr[0].rdata.times[0] == 2
    assert ask(a, query("nope.internal")).auth[0].rdata.times[0] == 2


def test_a_new_version_with_the_same_records_is_answered_afresh() -> None:
    a = answerer(make_zone(1), allowed=[])
    misses = counting(a)
    ask(a, query("web.internal"))
    ask(a, query("web.internal"))
    assert len(misses) == 1
    a.use(make_zone(2))
    ask(a, query("web.internal"))
    assert len(misses) == 2


def test_the_cache_stays_bounded_under_random_names() -> None:
    a = answerer()
    rng = random.Random(3)
    total = CACHE_ENTRIES + 2_000
    for i in range(total):
        name = f"{rng.getrandbits(64):016x}.internal"
        reply = a.answer(query(name, ident=i & 0xFFFF), "127.0.0.1", True)
        assert isinstance(reply, bytes | bytearray)
    assert len(a._cache.entries) == CACHE_ENTRIES  # full, and no further
    assert a._cache.turns == {}  # NXDOMAIN has nothing to rotate
    # Still right once full, for names seen before and names not seen before.
    assert {str(rr.rdata) for rr in ask(a, query("web.internal"), udp=False).rr} == set(WEB_IPS)
    assert ask(a, query("zzz.internal")).header.rcode == RCODE.NXDOMAIN


def test_the_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random case misses the cache each time (0x20 resolvers do it on purpose), and big
    replies must not fill memory before CACHE_ENTRIES is reached."""
    monkeypatch.setattr(dns_answer, "CACHE_BYTES", 64 * 1024)
    a = answerer()
    rng = random.Random(5)
    for i in range(400):
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in "_web._tcp.internal")
        reply = ask(a, query(name, "SRV", ident=i, edns=1232, options=[cookie(i)]), udp=False)
        assert len(reply.rr) == 3
    cache = a._cache
    assert 0 < len(cache.entries) < 400
    assert cache.size <= 64 * 1024
    assert cache.size >= sum(len(key[1]) for key in cache.entries)
    assert {str(rr.rdata) for rr in ask(a, query("web.internal"), udp=False).rr} == set(WEB_IPS)


@pytest.mark.parametrize(("name", "qtype"), [("big.internal", "A"), ("big.internal", "ANY")])
def test_a_miss_encodes_each_record_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch, name: str, qtype: str
) -> None:
    encoded: list[object] = []
    real_rr = dns_answer._rr

    def counting_rr(record: Record, owner: DNSLabel | None = None) -> RR:
        encoded.append(record)
        return real_rr(record, owner)

    monkeypatch.setattr(dns_answer, "_rr", counting_rr)
    reply = ask(answerer(), query(name, qtype), udp=False)
    assert len(reply.rr) >= BIG
    assert len(encoded) <= 4 * (len(reply.rr) + len(reply.ar))


# ---------------------------------------------------------------- sizes, EDNS0 and TC


A_FITTING = {None: 30, 512: 29, 100: 29, 700: 41, 4096: 74}
"""A records of big.internal in 512, 700 and 1232 bytes: 12 header, 18 question, 16 each,
11 for an OPT."""


@pytest.mark.parametrize(
    ("name", "qtype", "edns", "truncated", "limit", "answers"),
    [
        ("big.internal", "A", None, False, UDP_PLAIN_LIMIT, A_FITTING[None]),
        ("big.internal", "A", 512, False, UDP_PLAIN_LIMIT, A_FITTING[512]),
        ("big.internal", "A", 100, False, UDP_PLAIN_LIMIT, A_FITTING[100]),  # below 512: 512
        ("big.internal", "A", 700, False, 700, A_FITTING[700]),
        ("big.internal", "A", 4096, False, UDP_EDNS_MAX, A_FITTING[4096]),  # capped at 1232
        ("big.internal", "SRV", 4096, False, UDP_EDNS_MAX, None),
        ("_big._tcp.internal", "SRV", 65535, False, UDP_EDNS_MAX, None),
        ("_big._tcp.internal", "SRV", None, False, UDP_PLAIN_LIMIT, None),
        ("big.internal", "ANY", 4096, True, UDP_EDNS_MAX, 0),  # not a set to pick from
        ("web.internal", "A", None, False, UDP_PLAIN_LIMIT, 3),
        ("web.internal", "SRV", None, False, UDP_PLAIN_LIMIT, 3),
    ],
    ids=[
        "a-no-edns",
        "a-edns-512",
        "a-edns-below-512",
        "a-edns-700",
        "a-edns-4096-capped",
        "srv-edns-4096-capped",
        "srv-edns-max",
        "srv-no-edns",
        "any-truncated",
        "small-no-edns",
        "small-srv-no-edns",
    ],
)
def test_udp_size_limits(
    name: str, qtype: str, edns: int | None, truncated: bool, limit: int, answers: int | None
) -> None:
    a = answerer()
    for _ in range(2):  # miss, then hit
        raw = a.answer(query(name, qtype, edns=edns), "127.0.0.1", True)
        assert isinstance(raw, bytes | bytearray)
        assert len(raw) <= limit
        reply = DNSRecord.parse(raw)
        assert reply.header.tc == int(truncated)
        assert reply.header.rcode == RCODE.NOERROR
        assert reply.header.qr == 1
        assert str(reply.q.qname) == name + "."
        assert len(opt(reply)) == (edns is not None)
        if answers is not None:
            assert len(reply.rr) == answers
        else:
            assert 0 < len(reply.rr) < BIG
        if qtype == "SRV":  # each SRV answered comes with its target's address
            glue = {str(rr.rname) for rr in reply.ar if rr.rtype == QTYPE.A}
            assert glue == {str(rr.rdata.target) for rr in reply.rr}

        full = ask(a, query(name, qtype, edns=edns), udp=False)
        assert full.header.tc == 0
        assert len(full.rr) == (BIG if "big" in name else 3) * (2 if qtype == "ANY" else 1)
        if qtype == "SRV":
            assert len([rr for rr in full.ar if rr.rtype == QTYPE.A]) == len(full.rr)


def many_zone(count: int) -> Zone:
    """Service `many` with `count` backends, each on IPv4 and IPv6."""
    backends = [
        container(
            f"m{i:03d}",
            aliases=("many",),
            ip=f"172.21.{i // 250}.{i % 250 + 1}",
            ipv6=f"fd21::{i + 1:x}",
        )
        for i in range(count)
    ]
    return build_zone(build_topology(state(*backends), BuildOptions()), DOMAIN, TTL, 1)


MANY_ZONES = {n: many_zone(n) for n in (1, 2, 7, 30, 90, 150)}


def test_a_udp_subset_varies_across_queries_and_spreads_the_load() -> None:
    a = answerer(MANY_ZONES[90])
    data = query("many.internal")
    picks = [frozenset(str(rr.rdata) for rr in ask(a, data).rr) for _ in range(200)]
    assert len(set(picks)) > 50
    counts = collections.Counter(ip for pick in picks for ip in pick)
    assert len(counts) == 90  # every backend is handed out
    assert max(counts.values()) < 4 * min(counts.values())


@pytest.mark.parametrize("edns", [None, 1232, 4096], ids=["no-edns", "edns-1232", "edns-4096"])
@pytest.mark.parametrize("qtype", ["A", "AAAA", "SRV"])
def test_ninety_backends_over_udp_fit_without_tc_and_all_over_tcp(
    edns: int | None, qtype: str
) -> None:
    a = answerer(MANY_ZONES[90])
    data = query("many.internal", qtype, edns=edns)
    raw = a.answer(data, "127.0.0.1", True)
    assert isinstance(raw, bytes | bytearray)
    assert len(raw) <= (UDP_PLAIN_LIMIT if edns is None else UDP_EDNS_MAX)
    reply = DNSRecord.parse(raw)
    assert reply.header.tc == 0
    assert 0 < len(reply.rr) < 90
    assert len(ask(a, data, udp=False).rr) == 90


@pytest.mark.parametrize(
    ("limit", "name", "expected"),
    [
        (0, "web.internal", 3),
        (3, "web.internal", 3),
        (2, "web.internal", 2),
        (5, "big.internal", 5),
        (1, "_web._tcp.internal", 1),
    ],
)
def test_udp_answers_caps_a_udp_answer(limit: int, name: str, expected: int) -> None:
    """--dns-udp-answers, Consul's udp_answer_limit: a random pick of that many over UDP,
    all over TCP."""
    a = answerer(ZONE, allowed=[], udp_answers=limit)
    qtype = "SRV" if name.startswith("_") else "A"
    for _ in range(3):
        assert len(ask(a, query(name, qtype)).rr) == expected
        assert len(ask(a, query(name, qtype), udp=False).rr) == (BIG if "big" in name else 3)


@settings(max_examples=300, deadline=None)
@given(
    count=st.sampled_from(sorted(MANY_ZONES)),
    qtype=st.sampled_from(["A", "AAAA", "SRV"]),
    edns=st.one_of(st.none(), st.integers(0, 65535)),
    limit=st.integers(0, 12),
    seed=st.integers(0, 2**32),
)
def test_any_udp_answer_fits_its_limit(
    count: int, qtype: str, edns: int | None, limit: int, seed: int
) -> None:
    a = answerer(MANY_ZONES[count], allowed=[], udp_answers=limit, rng=random.Random(seed))
    data = query("mAnY.internal", qtype, edns=edns)
    raw = a.answer(data, "127.0.0.1", True)
    assert isinstance(raw, bytes | bytearray)
    size = UDP_PLAIN_LIMIT if edns is None else max(UDP_PLAIN_LIMIT, min(edns, UDP_EDNS_MAX))
    assert len(raw) <= size
    reply = DNSRecord.parse(raw)
    assert reply.header.tc == 0
    assert 1 <= len(reply.rr) <= (limit or count)
    assert all(rr.rname.label == DNSLabel("mAnY.internal").label for rr in reply.rr)
    full = {str(rr.rdata) for rr in ask(a, data, udp=False).rr}
    assert len(full) == count
    assert {str(rr.rdata) for rr in reply.rr} <= full
    if qtype == "SRV":
        targets = {str(rr.rdata.target) for rr in reply.rr}
        assert {str(rr.rname) for rr in reply.ar if rr.rtype == QTYPE.A} == targets
        assert {str(rr.rname) for rr in reply.ar if rr.rtype == QTYPE.AAAA} == targets


def test_edns_opt_is_echoed_with_our_size() -> None:
    reply = ask(answerer(), query("web.internal", edns=4096, options=[cookie(1)]))
    (record,) = opt(reply)
    assert record.rclass == UDP_EDNS_MAX
    assert opt(ask(answerer(), query("web.internal"))) == []
    nx = ask(answerer(), query("nope.internal", edns=1232))
    assert len(opt(nx)) == 1
    assert nx.header.rcode == RCODE.NXDOMAIN


def edns_query(name: str, *, do: bool = False, version: int = 0, opts: int = 1) -> bytes:
    request = DNSRecord.question(name)
    for _ in range(opts):
        request.add_ar(Edns0(udp_len=1232, flags="do" if do else "", version=version))
    return bytes(request.pack())


@pytest.mark.parametrize("name", ["web.internal", "nope.internal", "big.internal", "example.test"])
@pytest.mark.parametrize("do", [False, True], ids=["no-do", "do"])
def test_the_do_bit_is_copied(name: str, do: bool) -> None:
    """RFC 3225 3: the reply's DO bit is the query's, signed or not."""
    a = answerer()
    for _ in range(2):
        (record,) = opt(ask(a, edns_query(name, do=do)))
        assert bool(record.ttl & dns_answer.DO_BIT) == do
        assert (record.ttl >> 16) & 0xFF == 0  # our version: 0


@pytest.mark.parametrize("version", [1, 2, 255])
@pytest.mark.parametrize("name", ["web.internal", "example.test"])
def test_an_edns_version_above_0_is_badvers(version: int, name: str) -> None:
    """RFC 6891 6.1.3: BADVERS (16: 1 in the OPT's extended RCODE, 0 in the header), with an
    OPT of the version we speak."""
    reply = ask(answerer(forwarding=True), edns_query(name, version=version, do=True))
    assert reply.header.rcode == 0
    assert reply.rr == []
    (record,) = opt(reply)
    assert record.ttl >> 24 == 1
    assert (record.ttl >> 16) & 0xFF == 0
    assert record.ttl & dns_answer.DO_BIT


def test_two_opt_records_are_formerr() -> None:
    """RFC 6891 6.1.1."""
    reply = ask(answerer(), edns_query("web.internal", opts=2))
    assert reply.header.rcode == RCODE.FORMERR


# ---------------------------------------------------------------- errors and drops


@pytest.mark.parametrize(
    "opcode", [1, 2, 4, 5, 15], ids=["iquery", "status", "notify", "update", "15"]
)
def test_other_opcodes_get_notimp(opcode: int) -> None:
    raw = answerer().answer(query("web.internal", ident=77, opcode=opcode), "127.0.0.1", True)
    assert isinstance(raw, bytes | bytearray)
    reply = DNSRecord.parse(raw)
    assert reply.header.rcode == RCODE.NOTIMP
    assert reply.header.id == 77
    assert reply.header.opcode == opcode
    assert reply.header.qr == 1
    assert reply.rr == []


def _with_questions(*names: str) -> bytes:
    request = DNSRecord(DNSHeader(id=99), questions=[DNSQuestion(n) for n in names])
    return bytes(request.pack())


@pytest.mark.parametrize(
    "data",
    [_with_questions(), _with_questions("web.internal", "web.internal")],
    ids=["qdcount-0", "qdcount-2"],
)
def test_question_count_other_than_one_is_formerr(data: bytes) -> None:
    raw = answerer().answer(data, "127.0.0.1", True)
    assert isinstance(raw, bytes | bytearray)
    reply = DNSRecord.parse(raw)
    assert reply.header.rcode == RCODE.FORMERR
    assert reply.header.id == 99
    assert reply.header.qr == 1
    assert reply.rr == []


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # qdcount 1, no question
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40abc",  # label past the end
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # loop
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03w\xffb\x00\x00\x01\x00\x01",
        b"\x12\x34\x01\x00\x00\x01\x00\x05\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01",
        b"\x12\x34" + b"\xff" * 40,
    ],
    ids=[
        "missing-question",
        "label-past-end",
        "pointer-loop",
        "non-utf8-label",
        "answer-count-lies",
        "all-ones",
    ],
)
def test_garbage_with_a_header_is_formerr_with_its_id(data: bytes) -> None:
    raw = answerer().answer(data, "127.0.0.1", True)
    assert isinstance(raw, bytes | bytearray)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == 0x1234
    assert reply.header.qr == 1
    assert reply.header.rcode == RCODE.FORMERR
    assert reply.rr == []


@pytest.mark.parametrize("size", [0, 1, 2, 11])
def test_too_short_for_a_header_is_dropped(size: int) -> None:
    assert answerer().answer(query("web.internal")[:size], "127.0.0.1", True) is None


def test_a_reply_sent_to_us_is_dropped() -> None:
    request = DNSRecord.question("web.internal")
    reply = request.reply()
    reply.add_answer(RR("web.internal", QTYPE.A, rdata=A("1.2.3.4")))
    a = answerer(forwarding=True)
    assert a.answer(bytes(reply.pack()), "127.0.0.1", True) is None
    outside = DNSRecord.question("example.com").reply()
    assert a.answer(bytes(outside.pack()), "127.0.0.1", True) is None


def test_before_the_first_sync_servfail_then_answers() -> None:
    a = answerer(None, True, allowed=[])
    for _ in range(2):
        reply = ask(a, query("web.internal", ident=5))
        assert reply.header.rcode == RCODE.SERVFAIL
        assert reply.header.id == 5
        assert reply.rr == []
    assert ask(a, query("example.com")).header.rcode == RCODE.SERVFAIL
    a.use(ZONE)
    reply = ask(a, query("web.internal", ident=6))
    assert reply.header.rcode == RCODE.NOERROR
    assert {str(rr.rdata) for rr in reply.rr} == set(WEB_IPS)


# ---------------------------------------------------------------- outside the zone


@pytest.mark.parametrize(
    ("forwarding", "client", "forwarded"),
    [
        (False, "127.0.0.1", False),
        (False, "172.30.0.5", False),
        (True, "127.0.0.1", True),
        (True, "127.9.9.9", True),
        (True, "::1", True),
        (True, "172.30.0.5", True),
        (True, "fd30::5", True),
        (True, "fe80::1%eth0", False),
        (True, "172.31.0.5", False),
        (True, "10.0.0.1", False),
        (True, "fd31::5", False),
        (True, "?", False),
        (True, "", False),
    ],
    ids=[
        "off-loopback",
        "off-allowed",
        "loopback",
        "loopback-net",
        "loopback-v6",
        "allowed-net",
        "allowed-net-v6",
        "link-local-scoped",
        "next-net",
        "elsewhere",
        "elsewhere-v6",
        "unknown-peer",
        "empty-peer",
    ],
)
def test_outside_names(forwarding: bool, client: str, forwarded: bool) -> None:
    a = answerer(forwarding=forwarding)
    data = query("Example.COM", ident=321)
    for _ in range(2):  # neither verdict may be served from the cache to someone else
        result = a.answer(data, client, True)
        if forwarded:
            assert isinstance(result, Forward)
            assert result.request.header.id == 321
            assert str(result.request.q.qname) == "Example.COM."
            assert result.request.q.qtype == QTYPE.A
        else:
            assert isinstance(result, bytes | bytearray)
            reply = DNSRecord.parse(result)
            assert reply.header.rcode == RCODE.REFUSED
            assert reply.header.id == 321
            assert reply.rr == []
            assert str(reply.q.qname) == "Example.COM."


def test_a_refusal_is_not_served_to_an_allowed_client() -> None:
    a = answerer(forwarding=True)
    data = query("example.com")
    assert isinstance(a.answer(data, "10.0.0.1", True), bytes | bytearray)
    assert isinstance(a.answer(data, "172.30.0.5", True), Forward)
    assert isinstance(a.answer(data, "10.0.0.1", True), bytes | bytearray)


def test_the_allow_list_is_read_at_each_query() -> None:
    allowed: list[IpNetwork] = []
    a = answerer(ZONE, True, allowed)
    data = query("example.com")
    assert isinstance(a.answer(data, "172.30.0.5", True), bytes | bytearray)
    allowed.append(ipaddress.ip_network("172.30.0.0/16"))
    assert isinstance(a.answer(data, "172.30.0.5", True), Forward)


@pytest.mark.parametrize("client", ["::ffff:127.0.0.1", "::ffff:172.30.0.5"])
def test_ipv4_mapped_clients_are_matched_as_ipv4(client: str) -> None:
    assert isinstance(answerer(forwarding=True).answer(query("example.com"), client, True), Forward)


@pytest.mark.parametrize(
    ("zone", "data"),
    [
        (ZONE, query("example.com", edns=1232)),
        (ZONE, query("web.internal", edns=1232, opcode=4)),
        (None, query("web.internal", edns=1232)),
    ],
    ids=["refused", "notimp", "servfail"],
)
def test_status_replies_keep_edns(zone: Zone | None, data: bytes) -> None:
    """RFC 6891 section 7: a reply to a query with OPT carries OPT, whatever its RCODE."""
    reply = ask(answerer(zone), data)
    assert reply.header.rcode != RCODE.NOERROR
    assert reply.header.aa == 0
    assert reply.header.id == 0x1234
    assert len(opt(reply)) == 1


def test_chaos_queries_are_outside_the_zone() -> None:
    """CHAOS queries (version.bind) are outside the zone like any other name."""
    reply = ask(answerer(), query("version.bind", "TXT", qclass="CH"))
    assert reply.header.rcode == RCODE.REFUSED
    assert reply.q.qclass == CLASS.CH


@pytest.mark.parametrize("qclass", ["CH", "Hesiod"])
def test_in_zone_names_in_another_class_get_no_in_records(qclass: str) -> None:
    reply = ask(answerer(), query("web.internal", qclass=qclass))
    assert reply.rr == []


def overlong(suffix: bytes, labels: int = 125) -> bytes:
    """A question name past the 255-byte limit of RFC 1035: dnslib parses it, can't pack it."""
    name = b"\x01a" * labels + suffix
    return b"\x0b\xad\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"


def test_names_up_to_255_bytes_are_answered() -> None:
    data = overlong(b"\x08internal\x00", labels=122)  # 254 bytes on the wire
    reply = ask(answerer(), data)
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert reply.header.id == 0x0BAD


@pytest.mark.parametrize(
    ("suffix", "forwarding"),
    [
        (b"\x08internal\x00", False),
        (b"\x04test\x00", False),
        (b"\x04test\x00", True),
    ],
    ids=["in-zone", "outside-refused", "outside-forwarding"],
)
def test_overlong_names_are_formerr(suffix: bytes, forwarding: bool) -> None:
    raw = answerer(forwarding=forwarding).answer(overlong(suffix), "127.0.0.1", True)
    assert isinstance(raw, bytes | bytearray), raw
    reply = DNSRecord.parse(raw)
    assert reply.header.rcode == RCODE.FORMERR
    assert reply.header.id == 0x0BAD


# ---------------------------------------------------------------- any bytes at all


def _check_any_result(result: bytes | Forward | None, data: bytes) -> None:
    if result is None:
        assert len(data) < 12 or data[2] & 0x80
    elif isinstance(result, bytes | bytearray):
        assert result[:2] == data[:2]
        reply = DNSRecord.parse(result)
        assert reply.header.qr == 1
        assert len(result) <= UDP_EDNS_MAX
    else:
        assert isinstance(result, Forward)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_any_bytes_give_a_reply_with_their_id_or_nothing(data: bytes) -> None:
    a = answerer(forwarding=True)
    _check_any_result(a.answer(data, "127.0.0.1", True), data)


SEEDS = [
    query("web.internal"),
    query("_web._tcp.internal", "SRV", edns=1232, options=[cookie(1)]),
    query("big.internal", edns=4096),
    query("nope.internal"),
    query("3.0.20.172.in-addr.arpa", "PTR"),
    query("example.com"),
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
    st.booleans(),
)
def test_mutated_queries_never_raise(
    seed: bytes, flips: list[tuple[int, int]], cut: int, udp: bool
) -> None:
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    packet = bytes(data[: len(data) - cut % len(data)] if cut else data)
    a = answerer(forwarding=True)
    result = a.answer(packet, "127.0.0.1", udp)
    if udp or not isinstance(result, bytes | bytearray):
        _check_any_result(result, packet)
    else:
        assert result[:2] == packet[:2]
        assert DNSRecord.parse(result).header.qr == 1


def test_use_swaps_zone_and_replies_as_one() -> None:
    """The query after `use()` is answered from the new zone whole, fast replies included."""
    a = answerer(make_zone(1), allowed=[])
    web = query("web.internal")
    for _ in range(len(WEB_IPS) + 1):
        reply = ask(a, web)
        assert {str(rr.rdata) for rr in reply.rr} == set(WEB_IPS)
        assert reply.rr[0].ttl == TTL
    assert web[2:] in a.fast
    a.use(make_zone(2, web_ips=("172.20.0.9",)))
    assert a.fast == {}
    assert {str(rr.rdata) for rr in ask(a, web).rr} == {"172.20.0.9"}
    assert a.zone is not None and a.zone.version == 2


def test_fast_replies_rotate_and_carry_their_outcome() -> None:
    """The UDP reader's own path: each order in turn, then again; the outcome counted is
    the reply's."""
    a = answerer()
    web = query("web.internal")
    firsts = [first_a(ask(a, web)) for _ in range(2 * len(WEB_IPS))]
    assert firsts[: len(WEB_IPS)] == firsts[len(WEB_IPS) :]
    assert sorted(firsts[: len(WEB_IPS)]) == sorted(WEB_IPS)
    assert a.fast[web[2:]][1] == dns_answer.OUTCOMES.index("noerror")
    nope = query("nope.internal")
    ask(a, nope)
    assert a.fast[nope[2:]][1] == dns_answer.OUTCOMES.index("nxdomain")


def test_only_client_independent_replies_go_fast() -> None:
    """A refusal for a client outside the allow list, a forward and a random subset are
    decided per query: none of them is kept in `fast`."""
    a = answerer(forwarding=True, allowed=[])
    outside = query("example.com")
    assert isinstance(a.answer(outside, "172.30.0.5", True), bytes)
    assert isinstance(a.answer(outside, "127.0.0.1", True), Forward)
    big = query("big.internal")
    ask(a, big)
    ask(a, big)
    assert a.fast == {}
