"""The reload data plane's traffic reports (issue 17): one syslog datagram per request sent,
the `controlplane_stats` access log that templates/controlplane.conf.j2 declares, read into what
the traffic book counts. Pure, and it never raises: a datagram that is not exactly what
nginx sends (wrong tag, a field out of its grammar, more than MAX_TRIES tries) is None.

What nginx sends (nginx 1.22, `syslog:...,facility=local7,severity=info,tag=T,nohostname`):

  <190>Dec  1 00:17:00 T: cps2|1|web|10.0.0.3:80, 10.0.0.4:80|502, 200|0.000, 0.004|-, 0.001|200|9|7

after the `cps2` version: the weight (how many requests the line stands for: 1, or N for
one that nginx sent one in N of, --stats-sample), the service, then $upstream_addr,
$upstream_status, $upstream_response_time and $upstream_connect_time (one entry per try,
", " between tries, " : " between the upstreams of an internal redirect, the same layout in
all four), then $status, $bytes_sent and $request_length. Where no upstream was used (the
service's 503 with no live backend) the four are "-". Where nginx found no server to try
("no live upstreams"), the entry's address is the upstream's name: that entry is no try at a
backend.

A try is a connect error when its connect never finished ($upstream_connect_time "-") and
nginx gave it 502 (refused, unreachable) or 504 (the connect timed out): the status is then
nginx's, not the backend's, so it counts as a connect error at that backend and in no status
class. A backend that accepted and then failed (closed, timed out reading) has a connect
time: its 502 or 504 counts as a 5xx. Bytes to and from the client go to the backend whose
reply the client got (the last try, unless its connect failed), and to the service.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import NamedTuple

from controlplane.core.labels import NAME_RE
from controlplane.core.render import IPV4_RE, SAMPLED_STATUSES
from controlplane.core.traffic import (
    BYTES_RECEIVED,
    BYTES_SENT,
    CONNECT_ERRORS,
    COUNTS,
    VECTOR,
    Key,
    TrafficBook,
    bucket,
    status_class,
)

VERSION = "cps2"
FORMAT = (
    f"{VERSION}|$cp_weight|$cp_service|$upstream_addr|$upstream_status|$upstream_response_time"
    "|$upstream_connect_time|$status|$bytes_sent|$request_length"
)
"""The log_format the template declares (a test checks they agree)."""
PREFIX = b"<190>"
"""How every such datagram starts: the priority of local7.info (23 x 8 + 6), as the template
asks (the stats listener dispatches on it)."""
MAX_DATAGRAM = 2048
"""Bytes: 16 tries at IPv6 addresses take about 1,300."""
MAX_TRIES = 16
MAX_WEIGHT = 1000
"""As --stats-sample's (core.render.MAX_STATS_SAMPLE)."""

_HEADER_RE = re.compile(
    re.escape(PREFIX)
    + rb"[A-Z][a-z]{2} [ 1-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9] ([A-Za-z0-9_]{1,32}): "
    + VERSION.encode()
    + rb"\|(.*)"
)
"""`.` stops at a newline, so a datagram holding one is refused by fullmatch."""
_NAME_RE = re.compile(NAME_RE.pattern.encode())
_ONE_TRY_RE = re.compile(
    _HEADER_RE.pattern[: -len(rb"\|(.*)")]
    + rb"\|([1-9][0-9]{0,3})"
    + rb"\|([a-z0-9_.-]{1,63})"
    + rb"\|("
    + IPV4_RE.pattern.encode()
    + rb":([0-9]{1,5}))"
    + rb"\|([0-9]{3})\|([0-9]{1,9}\.[0-9]{3})\|[0-9]{1,9}\.[0-9]{3}"
    + rb"\|([0-9]{3})\|([0-9]{1,15})\|([0-9]{1,15})"
)
"""Most datagrams: one try at an IPv4 backend that connected. One match instead of a field
at a time; whatever it takes is what `parse` would make of it (a test holds them equal), and
everything else goes the long way."""
_IPV4_PORT_RE = re.compile(IPV4_RE.pattern.encode() + rb":([0-9]{1,5})")
_IPV6_PORT_RE = re.compile(rb"\[([0-9a-fA-F:.]{2,45})\]:([0-9]{1,5})")
_STATUS_RE = re.compile(rb"[0-9]{3}")
_TIME_RE = re.compile(rb"[0-9]{1,9}\.[0-9]{3}")
_BYTES_RE = re.compile(rb"[0-9]{1,15}")
_WEIGHT_RE = re.compile(rb"[1-9][0-9]{0,3}")
_SEPARATOR_RE = re.compile(rb", | : ")
_CONNECT_FAILED = frozenset({502, 504})
_SAMPLED = frozenset(SAMPLED_STATUSES)


class Try(NamedTuple):
    """One try at a backend."""

    backend: str
    """Its address as nginx names it, as in the config: IP:port or [IPv6]:port."""
    status: int | None
    """The backend's reply; None when it gave none (its connect failed, or the client left)."""
    seconds: float | None
    connect_error: bool


class Request(NamedTuple):
    service: str
    tries: tuple[Try, ...]
    status: int
    """What the client got."""
    seconds: float | None
    """Spent in upstreams, over all tries; None when no try has a time."""
    sent: int
    received: int
    weight: int = 1
    """How many requests this one stands for: N when nginx sent one in N like it."""


def parse(datagram: bytes, tag: str) -> Request | None:
    """The request one datagram reports, None unless it is one of ours to the byte."""
    if len(datagram) > MAX_DATAGRAM:
        return None
    one = _ONE_TRY_RE.fullmatch(datagram)
    if one is not None:
        quick = _one_try(one, tag)
        if quick is not None:
            return quick
    return _parse(datagram, tag)


def _one_try(found: re.Match[bytes], tag: str) -> Request | None:
    (mark, weight, service, backend, port, code, took, status, sent, received) = found.groups()
    count = int(weight)
    reply = int(code)
    if not (
        hmac.compare_digest(mark, tag.encode())
        and count <= MAX_WEIGHT
        and 0 < int(port) < 65536
        and _NAME_RE.fullmatch(service)
        and (count == 1 or reply in _SAMPLED)
    ):
        return None
    seconds = float(took)
    try_ = Try(backend.decode(), reply, seconds, False)
    return Request(service.decode(), (try_,), int(status), seconds, int(sent), int(received), count)


def _parse(datagram: bytes, tag: str) -> Request | None:
    header = _HEADER_RE.fullmatch(datagram)
    if header is None or not hmac.compare_digest(header.group(1), tag.encode()):
        return None
    fields = header.group(2).split(b"|")
    if len(fields) != 9:
        return None
    weight, service, addrs, statuses, times, connects, status, sent, received = fields
    if not (
        _WEIGHT_RE.fullmatch(weight)
        and int(weight) <= MAX_WEIGHT
        and _NAME_RE.fullmatch(service)
        and _STATUS_RE.fullmatch(status)
        and _BYTES_RE.fullmatch(sent)
        and _BYTES_RE.fullmatch(received)
    ):
        return None
    name = service.decode()
    tries = _tries(name, addrs, statuses, times, connects)
    if tries is None:
        return None
    spent = [t.seconds for t in tries if t.seconds is not None]
    count = int(weight)
    if count > 1 and not (len(tries) == 1 and tries[0].status in _SAMPLED):
        return None  # nginx samples only ordinary answers in one try
    return Request(
        name,
        tries,
        int(status),
        sum(spent) if spent else None,
        int(sent),
        int(received),
        count,
    )


def _tries(
    service: str, addrs: bytes, statuses: bytes, times: bytes, connects: bytes
) -> tuple[Try, ...] | None:
    fields = (addrs, statuses, times, connects)
    if fields == (b"-", b"-", b"-", b"-"):
        return ()
    layout = _SEPARATOR_RE.findall(addrs)
    if len(layout) >= MAX_TRIES or any(_SEPARATOR_RE.findall(f) != layout for f in fields[1:]):
        return None
    no_server = f"cp_{service}".encode()
    tries = []
    for addr, code, took, connect in zip(*(_SEPARATOR_RE.split(f) for f in fields), strict=True):
        if not (
            (code == b"-" or _STATUS_RE.fullmatch(code))
            and (took == b"-" or _TIME_RE.fullmatch(took))
            and (connect == b"-" or _TIME_RE.fullmatch(connect))
        ):
            return None
        if addr == no_server:
            continue
        backend = _backend(addr)
        if backend is None:
            return None
        reply = None if code == b"-" else int(code)
        if connect == b"-" and reply in _CONNECT_FAILED:
            tries.append(Try(backend, None, None, True))
        else:
            tries.append(Try(backend, reply, None if took == b"-" else float(took), False))
    return tuple(tries)


def _backend(addr: bytes) -> str | None:
    """IP:port or [IPv6]:port, checked; None for anything else."""
    v4 = _IPV4_PORT_RE.fullmatch(addr)
    if v4 is not None:
        port = v4.group(1)
    else:
        v6 = _IPV6_PORT_RE.fullmatch(addr)
        if v6 is None or not _is_ipv6(v6.group(1).decode()):
            return None
        port = v6.group(2)
    return addr.decode() if 0 < int(port) < 65536 else None


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def add(book: TrafficBook, request: Request, now: float) -> None:
    """One request into the book (as `tally`, at `now`)."""
    vectors: dict[Key, list[int]] = {}
    tally(vectors, request)
    for key, vector in vectors.items():
        book.add_vector(key, vector, now)


def tally(vectors: dict[Key, list[int]], request: Request) -> None:
    """Adds the request to count vectors per key (core.traffic's VECTOR), to go into the book
    at once, so a listener adds many requests per key at the cost of one: each try at its
    backend, and the request once at its service (which counts every failed connect of its
    tries, as its backends do); a sampled request `weight` times."""
    n = request.weight
    last = len(request.tries) - 1
    answered = last if last >= 0 and not request.tries[last].connect_error else -1
    failed = 0
    for i, one in enumerate(request.tries):
        vector = vectors.get(key := Key(request.service, one.backend))
        if vector is None:
            vector = vectors[key] = [0] * VECTOR
        if one.connect_error:
            failed += 1
            vector[CONNECT_ERRORS] += n
        elif one.status is not None and (kind := status_class(one.status)) is not None:
            vector[kind] += n
            if one.seconds is not None:
                vector[COUNTS + bucket(one.seconds)] += n
        if i == answered:
            vector[BYTES_SENT] += n * request.sent
            vector[BYTES_RECEIVED] += n * request.received
    vector = vectors.get(key := Key(request.service, ""))
    if vector is None:
        vector = vectors[key] = [0] * VECTOR
    kind = status_class(request.status)
    if kind is not None:
        vector[kind] += n
        if request.seconds is not None:
            vector[COUNTS + bucket(request.seconds)] += n
    vector[CONNECT_ERRORS] += failed * n
    vector[BYTES_SENT] += n * request.sent
    vector[BYTES_RECEIVED] += n * request.received
