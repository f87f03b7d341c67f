"""The dynamic data plane's traffic datagrams (issue 17), read strictly: each nginx worker's
Lua balancer sends its cumulative counts every second (templates/lua/controlplane.lua), and
the controller keeps only what parses whole. A datagram comes over UDP from anyone who can
reach the listener, so anything off the grammar refuses the whole datagram, and no bytes
make this raise.

    cp-stats 1 <tag> <worker pid> <seq>
    <service> <addr or -> <1xx> <2xx> <3xx> <4xx> <5xx> <connect errors> <sent> <received> <buckets>
    ...

<buckets> is "-" or "index:count" pairs joined by ",", indexes ascending (core.traffic.bucket).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import NamedTuple

from controlplane.core.labels import NAME_RE
from controlplane.core.traffic import BUCKETS, COUNTS, Key

MAX_BYTES = 1400
"""The Lua side keeps each datagram to this (no IP fragmentation on any usual link); it bounds
the lines too, to 62 (a line and its newline take 22 bytes at least)."""
MAX_COUNT = 2**53
"""What a Lua number counts exactly."""

_INT = r"(?:0|[1-9][0-9]{0,15})"
HEADER_RE = re.compile(rf"cp-stats 1 ([A-Za-z0-9]{{16,32}}) ([1-9][0-9]{{0,9}}) ({_INT})")
LINE_RE = re.compile(
    rf"([^ ]+) ([^ ]+) ({_INT}) ({_INT}) ({_INT}) ({_INT}) ({_INT}) ({_INT}) ({_INT}) ({_INT}) "
    rf"(-|(?:[0-9]{{1,2}}:{_INT},)*[0-9]{{1,2}}:{_INT})"
)
ADDR_RE = re.compile(r"(?:([0-9.]{7,15})|\[([0-9a-f:.]{2,45})\]):([1-9][0-9]{0,4})")

Entries = list[tuple[Key, list[int]]]
"""Each key's cumulative VECTOR."""


class Report(NamedTuple):
    pid: str
    """The sending worker's."""
    seq: int
    """The worker's datagrams so far, this one included: what core.traffic.Cumulative.report
    orders a worker's reports by (a late or repeated datagram adds nothing)."""
    entries: Entries


def read(datagram: bytes, tag: str) -> Report | None:
    """The worker's pid, the datagram's sequence number and its keys' counts, or None when
    anything in the datagram is off the grammar or the tag is not `tag`."""
    if len(datagram) > MAX_BYTES or not datagram.isascii():
        return None
    lines = datagram.decode("ascii").removesuffix("\n").split("\n")
    header = HEADER_RE.fullmatch(lines[0])
    if header is None:
        return None
    if not hmac.compare_digest(header[1].encode(), tag.encode()):
        return None
    found: Entries = []
    seen: set[Key] = set()
    for line in lines[1:]:
        entry = _entry(line)
        if entry is None or entry[0] in seen:
            return None
        seen.add(entry[0])
        found.append(entry)
    return Report(header[2], int(header[3]), found)


def parse(datagram: bytes, tag: str) -> tuple[str, Entries] | None:
    """`read` as the stats listener's decoders give it today: the pid and the entries."""
    report = read(datagram, tag)
    return None if report is None else (report.pid, report.entries)


def _entry(line: str) -> tuple[Key, list[int]] | None:
    fields = LINE_RE.fullmatch(line)
    if fields is None or not NAME_RE.fullmatch(fields[1]):
        return None
    backend = "" if fields[2] == "-" else _address(fields[2])
    if backend is None:
        return None
    vector = [int(fields[i]) for i in range(3, 3 + COUNTS)] + [0] * BUCKETS
    if fields[11] != "-":
        last = -1
        for pair in fields[11].split(","):
            index, count = pair.split(":")
            i = int(index)
            if not last < i < BUCKETS or count == "0":
                return None
            vector[COUNTS + i], last = int(count), i
    if max(vector) > MAX_COUNT:
        return None
    return Key(fields[1], backend), vector


def _address(text: str) -> str | None:
    """IPv4:port or [IPv6]:port as the controller writes it (render.address): any other
    spelling of the same address would be a different key."""
    parts = ADDR_RE.fullmatch(text)
    if parts is None or int(parts[3]) > 65535:
        return None
    host = parts[1] or parts[2]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if str(ip) != host or (ip.version == 6) != (parts[2] is not None):
        return None
    return text
