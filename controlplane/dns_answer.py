"""DNS wire format: from a query's bytes to the reply's bytes, for one zone version.

The hot path does no parsing: replies are kept by the query's bytes after the transaction ID
(so case and EDNS options are echoed exactly) and only the ID is patched in. dnslib parses
and encodes on a miss only. The cache belongs to one zone version and is bounded, so random
names can't grow it and a reply never outlives the model it came from. A zone is handed in
with `use()`, which swaps zone and cache as one: every query read after it returns is
answered from the new version.

For UDP, a reply with a few orders (a name's records, rotated) gets all of them built at its
first miss and kept in `fast`, a plain dict the UDP reader looks into itself, before any call:
that is most queries, and their whole cost is a dict lookup, a `next()` and a send.

An A, AAAA or SRV set too big for the client's UDP buffer (or above --dns-udp-answers) is
answered with as many records as fit, picked at random per query, without TC: a stub
resolver that can't retry over TCP still gets addresses, and the load spreads. TCP gets all.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from dnslib import (
    AAAA,
    NS,
    OPCODE,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    A,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)
from dnslib import EDNS0 as Edns0

from controlplane.core.dns_records import Record, Soa, Srv, Zone
from controlplane.settings import IpNetwork

log = logging.getLogger(__name__)

UDP_PLAIN_LIMIT = 512
UDP_EDNS_MAX = 1232  # the DNS flag day 2020 size: no IP fragmentation on common paths
CACHE_ENTRIES = 10_000
CACHE_BYTES = 32 * 1024 * 1024
MAX_NAME_OCTETS = 255
TC_BIT = 0x02  # in the header's third byte
CLASS_IN, CLASS_ANY = 1, 255
OPT = 41
DO_BIT = 0x8000  # in the OPT record's TTL field (RFC 3225)
BADVERS = 16  # an extended RCODE: 1 in the OPT record's high bits, 0 in the header
SUBSET_TYPES = frozenset((int(QTYPE.A), int(QTYPE.AAAA), int(QTYPE.SRV)))
FAST_ORDERS = 16  # a name with more records than this is rotated through the plain cache
# Queries by outcome: indexes 0-15 are the reply's RCODE; then what got no reply of ours;
# then BADVERS (16).
OUTCOMES = (
    "noerror",
    "formerr",
    "servfail",
    "nxdomain",
    "notimp",
    "refused",
    *(f"rcode{n}" for n in range(6, 16)),
    "forwarded",
    "dropped",
    "badvers",
)
FORWARDED, DROPPED, BAD_VERSION = 16, 17, 18


@dataclass(frozen=True)
class Forward:
    """The query is for a name outside the zone and the client may use the upstreams."""

    request: DNSRecord


@dataclass
class _Cached:
    """A reply set: the orders built so far (without the ID) and whose turn is next."""

    replies: _Replies
    variants: dict[int, bytes]
    turn: int = 0


FastReplies = dict[bytes, tuple[Iterator[bytes], int]]
"""A UDP query's bytes after the ID -> its replies' orders without the ID, taken in turn,
and the reply's index in OUTCOMES."""


@dataclass
class _Cache:
    """One zone version's replies, and each name's rotation turn: clients that send a fresh
    EDNS cookie with every query miss the reply cache but still see the order rotate."""

    zone: Zone | None
    entries: dict[tuple[bool, bytes], _Cached] = field(default_factory=dict)
    turns: dict[tuple[str, int], int] = field(default_factory=dict)
    fast: FastReplies = field(default_factory=dict)
    size: int = 0


class Answerer:
    """Answers from the zone last given to `use()` (none before the first sync: SERVFAIL).

    `udp_answers`: at most this many records in a UDP answer (0: as many as fit).
    `fill_fast`: whether UDP replies go into `fast`; off, every query comes through
    `answer()` (a test that counts them). `forward_private_reverse`: private reverse names
    that are no backend's go to the upstreams (dnsmasq's default), not NXDOMAIN here."""

    def __init__(
        self,
        allowed: Callable[[], Iterable[IpNetwork]],
        forwarding: bool,
        *,
        udp_answers: int = 0,
        rng: random.Random | None = None,
        fill_fast: bool = True,
        forward_private_reverse: bool = False,
    ) -> None:
        self.fill_fast = fill_fast
        self._forward_private_reverse = forwarding and forward_private_reverse
        self._allowed = allowed
        self._forwarding = forwarding
        self._udp_answers = udp_answers
        self._rng = rng or random.Random()
        self._cache = _Cache(None)
        self.fast: FastReplies = self._cache.fast

    def use(self, zone: Zone | None) -> None:
        """Answers from `zone` from now on, with a fresh cache (even for the same records: a
        version is what a reply may not outlive)."""
        cache = _Cache(zone)
        self.fast = cache.fast
        self._cache = cache

    @property
    def zone(self) -> Zone | None:
        return self._cache.zone

    def answer(self, data: bytes, client: str, udp: bool) -> bytes | Forward | None:
        """Reply bytes, a Forward, or None to drop (not even a DNS header)."""
        cache = self._cache
        zone = cache.zone
        key = (udp, data[2:])
        hit = cache.entries.get(key)
        if hit is not None:
            if hit.replies.shuffled:
                turn = int(self._rng.random() * hit.replies.count)  # randrange costs 3x
            else:
                turn = hit.turn % hit.replies.count
                hit.turn += 1
            variant = hit.variants.get(turn)
            if variant is None:  # each order is encoded once, when its turn first comes
                variant = hit.replies.build(turn)[2:]
                if cache.size + len(variant) <= CACHE_BYTES:
                    hit.variants[turn] = variant
                    cache.size += len(variant)
            return data[:2] + variant
        result = self._answer(data, client, udp, zone)
        if not isinstance(result, _Replies):
            return result
        turn = 0
        if result.shuffled:
            turn = int(self._rng.random() * result.count)
        elif result.rotation is not None and result.count > 1:
            turn = cache.turns.get(result.rotation, 0) % result.count
            cache.turns[result.rotation] = turn + 1
        reply = result.build(turn)
        if not result.cacheable or zone is None or len(cache.entries) >= CACHE_ENTRIES:
            return reply
        if udp and self.fill_fast and not result.shuffled and result.count <= FAST_ORDERS:
            orders = [result.build(t)[2:] for t in range(result.count)]
            size = sum(map(len, orders)) + len(key[1])
            if cache.size + size <= CACHE_BYTES:
                later = orders[turn + 1 :] + orders[: turn + 1]
                cache.fast[key[1]] = (itertools.cycle(later), outcome(reply))
                cache.entries[key] = _Cached(result, dict(enumerate(orders)), turn + 1)
                cache.size += size
            return reply
        size = len(reply) + len(key[1])
        if cache.size + size <= CACHE_BYTES:
            cache.entries[key] = _Cached(result, {turn: reply[2:]}, turn + 1)
            cache.size += size
        return reply

    def _answer(
        self, data: bytes, client: str, udp: bool, zone: Zone | None
    ) -> _Replies | Forward | bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several types for bad packets; all mean FORMERR
            return formerr(data)
        if request.header.qr:
            return None  # a reply sent to us: answering it could start a loop
        ra = self._forwarding  # RA says what the server offers, in every reply
        if request.header.opcode != OPCODE.QUERY:
            return _status(request, RCODE.NOTIMP, ra)
        if len(request.questions) != 1:
            return _status(request, RCODE.FORMERR, ra)
        opts = [rr for rr in request.ar if rr.rtype == OPT]
        if len(opts) > 1:
            return formerr(data)  # RFC 6891 6.1.1
        if opts and (opts[0].ttl >> 16) & 0xFF:
            return _status(request, BADVERS, ra)  # RFC 6891 6.1.3: we speak EDNS version 0 only
        if sum(len(label) + 1 for label in request.q.qname.label) + 1 > MAX_NAME_OCTETS:
            return formerr(data)  # dnslib reads such a name but can't write it back
        if zone is None:
            return _status(request, RCODE.SERVFAIL, ra)
        name = str(request.q.qname).rstrip(".").lower()
        if request.q.qclass not in (CLASS_IN, CLASS_ANY):
            return _status(request, RCODE.REFUSED, ra)  # CHAOS, HESIOD: not served here
        if zone.in_zone(name) and not (
            self._forward_private_reverse and zone.only_local_reverse(name)
        ):
            return self._authoritative(request, name, zone, udp)
        if self._forwarding and self._client_allowed(client):
            return Forward(request)
        return _status(request, RCODE.REFUSED, False, cacheable=False)

    def _client_allowed(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 client of a dual-stack [::] socket
        return address.is_loopback or any(address in net for net in self._allowed())

    def _authoritative(self, request: DNSRecord, name: str, zone: Zone, udp: bool) -> _Replies:
        qtype = QTYPE.get(request.q.qtype)
        found: tuple[Record, ...] | None
        if qtype == "ANY":
            types = zone.types(name)
            found = None if types is None else tuple(r for rs in types.values() for r in rs)
        else:
            found = zone.lookup(name, str(qtype))
        ra = self._forwarding
        if not found:
            reply = _reply_to(request, aa=True, ra=ra)
            if found is None:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(_rr(zone.soa_for(name)))
            packed = _pack(reply, request, udp)
            return _Replies(1, lambda _turn: packed)
        owner = request.q.qname  # its case, as asked: resolvers using 0x20 compare it
        answers = [_rr(record, owner) for record in found]  # each record is encoded once
        glue = [
            [
                _rr(r)
                for t in ("A", "AAAA")
                if isinstance(record.value, Srv)
                for r in zone.lookup(record.value.target, t) or ()
            ]
            for record in found
        ]

        def build(turn: int) -> bytes:
            """The reply with the records rotated by `turn`, whatever its size."""
            return _packed(request, ra, answers[turn:] + answers[:turn], glue)

        rotation = (name, int(request.q.qtype))
        if not udp:
            return _Replies(len(found), build, rotation=rotation)
        whole = build(0)
        too_big = len(whole) > udp_limit(request)
        cap = self._udp_answers or len(found)
        if int(request.q.qtype) in SUBSET_TYPES and (too_big or cap < len(found)):

            def subset(_turn: int) -> bytes:
                """One random pick of what fits: `count` of them, each encoded once."""
                picked = self._rng.sample(range(len(found)), len(found))
                chosen = [answers[i] for i in picked], [glue[i] for i in picked]
                return _fit(request, ra, *chosen, min(cap, len(found)), len(whole))

            return _Replies(len(found), subset, shuffled=True)
        if too_big:  # truncated replies are all alike
            cut = truncated(request, aa=True, ra=ra)
            return _Replies(1, lambda _turn: cut, rotation=rotation)
        return _Replies(
            len(found), lambda turn: whole if turn == 0 else build(turn), rotation=rotation
        )


@dataclass(frozen=True)
class _Replies:
    """`count` variants of one reply, each built on demand by `build(turn)`: orders taken in
    turn, or (`shuffled`) random subsets, one picked at random per query."""

    count: int
    build: Callable[[int], bytes]
    cacheable: bool = True
    rotation: tuple[str, int] | None = None
    shuffled: bool = False


def _packed(request: DNSRecord, ra: bool, answers: list[RR], glue: list[list[RR]]) -> bytes:
    """An authoritative reply with these answers and their glue, and our OPT if asked for."""
    reply = _reply_to(request, aa=True, ra=ra)
    reply.add_answer(*answers)  # all at once: dnslib recounts the header at each call
    reply.add_ar(*(rr for rrs in glue for rr in rrs))
    add_opt(reply, request)
    return bytes(reply.pack())


def _fit(
    request: DNSRecord, ra: bool, answers: list[RR], glue: list[list[RR]], cap: int, whole: int
) -> bytes:
    """The first n of `answers` (n <= cap), each with its glue, for the largest n that fits
    the client's UDP buffer; TC if not even one fits. `whole`, the size of them all, gives
    n at the first try when records are of one size (A, AAAA); a step or two finds it else."""
    limit = udp_limit(request)

    def pack(n: int) -> bytes:
        return _packed(request, ra, answers[:n], glue[:n])

    base = len(pack(0))
    n = max(1, min(cap, (limit - base) * len(answers) // max(1, whole - base)))
    packed = pack(n)
    while len(packed) > limit and n > 1:
        n -= 1
        packed = pack(n)
    if len(packed) > limit:
        return truncated(request, aa=True, ra=ra)
    while n < cap:
        bigger = pack(n + 1)
        if len(bigger) > limit:
            break
        n, packed = n + 1, bigger
    return packed


def _reply_to(request: DNSRecord, aa: bool, ra: bool) -> DNSRecord:
    """A fresh header: only ID, opcode, RD and CD come from the query (dnslib's reply()
    would echo AD, TC, Z and RCODE bits a client set)."""
    header = DNSHeader(id=request.header.id, qr=1, aa=int(aa), ra=int(ra), rd=request.header.rd)
    header.opcode = request.header.opcode
    header.cd = request.header.cd  # RFC 4035 3.2.2: CD is copied
    return DNSRecord(header, q=request.questions[0] if len(request.questions) == 1 else None)


def _status(request: DNSRecord, rcode: int, ra: bool, cacheable: bool = True) -> _Replies:
    reply = status(request, rcode, ra)
    return _Replies(1, lambda _turn: reply, cacheable)


def status(request: DNSRecord, rcode: int, ra: bool = False) -> bytes:
    """A reply with no records and this RCODE (extended ones in the OPT record), keeping the
    client's EDNS0."""
    reply = _reply_to(request, aa=False, ra=ra)
    reply.header.rcode = rcode & 0x0F
    add_opt(reply, request, rcode >> 4)
    return bytes(reply.pack())


def truncated(request: DNSRecord, aa: bool, ra: bool) -> bytes:
    """TC and the question only: the client is to ask again over TCP."""
    reply = _reply_to(request, aa=aa, ra=ra)
    reply.header.tc = 1
    add_opt(reply, request)
    return bytes(reply.pack())


def add_opt(reply: DNSRecord, request: DNSRecord, ext_rcode: int = 0) -> None:
    """Our OPT (version 0, our buffer size) when the client sent one, with its DO bit copied
    (RFC 3225: a server that does not sign still echoes it)."""
    for rr in request.ar:
        if rr.rtype == OPT:
            flags = "do" if rr.ttl & DO_BIT else ""
            reply.add_ar(Edns0(udp_len=UDP_EDNS_MAX, ext_rcode=ext_rcode, flags=flags))
            return


def outcome(result: bytes | Forward | None) -> int:
    """The index in OUTCOMES of how a query was answered."""
    if result is None:
        return DROPPED
    if isinstance(result, Forward):
        return FORWARDED
    if (rcode := result[3] & 0x0F) or result[7] or result[6]:  # an error, or answers
        return rcode
    # NOERROR without answers: a NODATA, a TC, or BADVERS (its high bits in the OPT)
    return BAD_VERSION if extended_rcode(result) == BADVERS else 0


def extended_rcode(reply: bytes) -> int:
    """A reply's whole RCODE: the header's 4 bits, and the high bits in the OPT record when
    that is its only record (as in our BADVERS: an OPT without options ends it)."""
    rcode = reply[3] & 0x0F
    if reply[6:10] == b"\0\0\0\0" and reply[-11:-8] == b"\0\0\x29" and reply[-2:] == b"\0\0":
        rcode |= reply[-6] << 4
    return rcode


def formerr(data: bytes) -> bytes | None:
    """FORMERR for a packet with a readable header; nothing for one too short to have one."""
    if len(data) < 12:
        return None
    header = DNSHeader(id=int.from_bytes(data[:2], "big"), qr=1, rcode=RCODE.FORMERR)
    header.opcode = (data[2] >> 3) & 0xF
    return bytes(DNSRecord(header).pack())


def udp_limit(request: DNSRecord) -> int:
    """The client's EDNS0 buffer size (bounded), or 512 without EDNS0."""
    for rr in request.ar:
        if rr.rtype == OPT:
            return max(UDP_PLAIN_LIMIT, min(int(rr.rclass), UDP_EDNS_MAX))
    return UDP_PLAIN_LIMIT


def _pack(reply: DNSRecord, request: DNSRecord, udp: bool) -> bytes:
    """Adds OPT when the client sent one; over UDP, a reply that doesn't fit goes out
    truncated (TC, question only) so the client retries over TCP."""
    add_opt(reply, request)
    packed = bytes(reply.pack())
    if udp and len(packed) > udp_limit(request):
        return truncated(request, aa=True, ra=bool(reply.header.ra))
    return packed


def _rr(record: Record, owner: DNSLabel | None = None) -> RR:
    """`owner`: the name to write for the record's own (the question's, in its case)."""
    value = record.value
    rdata: object
    if isinstance(value, Srv):
        rdata = SRV(value.priority, value.weight, value.port, value.target + ".")
    elif isinstance(value, Soa):
        rdata = SOA(
            value.mname + ".",
            value.rname + ".",
            (value.serial, value.refresh, value.retry, value.expire, value.minimum),
        )
    elif record.rtype == "A":
        rdata = A(value)
    elif record.rtype == "AAAA":
        rdata = AAAA(value)
    elif record.rtype == "PTR":
        rdata = PTR(value + ".")
    else:
        rdata = NS(value + ".")
    name = record.name + "." if owner is None else owner
    return RR(name, getattr(QTYPE, record.rtype), rdata=rdata, ttl=record.ttl)
