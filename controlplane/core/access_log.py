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
from controlplane.core.render import IPV4_RE
from controlplane.core.traffic import (
    BYTES_RECEIVED,
    BYTES_SENT,
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
_IPV4_PORT_RE = re.compile(IPV4_RE.pattern.encode() + rb":([0-9]{1,5})")
_IPV6_PORT_RE = re.compile(rb"\[([0-9a-fA-F:.]{2,45})\]:([0-9]{1,5})")
_STATUS_RE = re.compile(rb"[0-9]{3}")
_TIME_RE = re.compile(rb"[0-9]{1,9}\.[0-9]{3}")
_BYTES_RE = re.compile(rb"[0-9]{1,15}")
_WEIGHT_RE = re.compile(rb"[1-9][0-9]{0,3}")
_SEPARATOR_RE = re.compile(rb", | : ")
_CONNECT_FAILED = frozenset({502, 504})


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
    if count > 1 and not (len(tries) == 1 and not tries[0].connect_error):
        return None  # nginx samples only requests answered in one try
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
    """Each try at its backend, and the request once at its service (which counts every
    failed connect of its tries, as its backends do); a sampled request, `weight` times."""
    if request.weight > 1:
        _add_weighted(book, request, now)
        return
    last = len(request.tries) - 1
    answered = last if last >= 0 and not request.tries[last].connect_error else -1
    failed = 0
    for i, one in enumerate(request.tries):
        failed += one.connect_error
        book.add(
            Key(request.service, one.backend),
            one.status,
            one.seconds,
            now,
            connect_error=one.connect_error,
            sent=request.sent if i == answered else 0,
            received=request.received if i == answered else 0,
        )
    whole = Key(request.service, "")
    book.add(
        whole,
        request.status,
        request.seconds,
        now,
        connect_error=failed > 0,
        sent=request.sent,
        received=request.received,
    )
    for _ in range(failed - 1):
        book.add(whole, None, None, now, connect_error=True)


def _add_weighted(book: TrafficBook, request: Request, now: float) -> None:
    """A sampled request (one try, answered) as the vector of `weight` such requests."""
    (one,) = request.tries
    n = request.weight
    for key, status in (
        (Key(request.service, one.backend), one.status),
        (Key(request.service, ""), request.status),
    ):
        vector = [0] * VECTOR
        kind = None if status is None else status_class(status)
        if kind is not None:
            vector[kind] = n
            if request.seconds is not None:
                vector[COUNTS + bucket(request.seconds)] = n
        vector[BYTES_SENT] = n * request.sent
        vector[BYTES_RECEIVED] = n * request.received
        book.add_vector(key, vector, now)
