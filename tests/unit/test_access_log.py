"""The reload data plane's stats lines: what nginx sends, parsed to the byte; anything else
refused, whatever the bytes, without raising; and what a request adds to the traffic book.
The lines below are nginx 1.22's own, captured from a UDP socket."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import access_log as A
from controlplane.core.build import build_topology
from controlplane.core.render import RenderOptions, StatsSink, render_config
from controlplane.core.traffic import Key, TrafficBook
from tests.support.nginx_check import nginx_t
from tests.unit.builders import container, nginx, state

TAG = "abcdefghijklmnop1234"
HEADER = f"<190>Dec  1 00:17:00 {TAG}: "
WEB = "web"
B1, B2 = "172.20.0.3:80", "172.20.0.4:80"


def line(message: str, header: str = HEADER) -> bytes:
    return (header + message).encode()


def attempt(backend: str, status: int | None, seconds: float | None) -> A.Try:
    return A.Try(backend, status, seconds, False)


def refused(backend: str) -> A.Try:
    return A.Try(backend, None, None, True)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            f"cps2|1|web|{B1}|200|0.004|0.001|200|150|67",
            A.Request(WEB, (attempt(B1, 200, 0.004),), 200, 0.004, 150, 67),
        ),
        (
            f"cps2|1|web|{B1}, {B2}|502, 200|0.000, 0.002|-, 0.001|200|150|67",
            A.Request(WEB, (refused(B1), attempt(B2, 200, 0.002)), 200, 0.002, 150, 67),
        ),
        (
            f"cps2|1|web|{B1}|504|1.001|-|504|314|67",
            A.Request(WEB, (refused(B1),), 504, None, 314, 67),
        ),
        (
            f"cps2|1|web|{B1}|504|60.002|0.001|504|314|67",
            A.Request(WEB, (attempt(B1, 504, 60.002),), 504, 60.002, 314, 67),
        ),
        (
            f"cps2|1|web|{B1} : {B2}|404 : 200|0.001 : 0.003|0.000 : 0.001|200|150|72",
            A.Request(WEB, (attempt(B1, 404, 0.001), attempt(B2, 200, 0.003)), 200, 0.004, 150, 72),
        ),
        (
            "cps2|1|web|cp_web|502|0.000|-|502|314|67",
            A.Request(WEB, (), 502, None, 314, 67),
        ),
        (
            f"cps2|1|web|{B1}, cp_web|502, 502|0.000, 0.000|-, -|502|314|67",
            A.Request(WEB, (refused(B1),), 502, None, 314, 67),
        ),
        ("cps2|1|web|-|-|-|-|503|190|67", A.Request(WEB, (), 503, None, 190, 67)),
        (
            f"cps2|1|web|{B1}|-|0.500|0.001|499|0|67",
            A.Request(WEB, (attempt(B1, None, 0.5),), 499, 0.5, 0, 67),
        ),
        (
            "cps2|1|api.v2|[fd00::2]:8080|200|0.010|0.000|200|314|67",
            A.Request("api.v2", (attempt("[fd00::2]:8080", 200, 0.01),), 200, 0.01, 314, 67),
        ),
    ],
    ids=[
        "one-try",
        "refused-then-served",
        "connect-timeout",
        "read-timeout-is-a-5xx",
        "internal-redirect",
        "no-live-upstreams",
        "refused-then-none-left",
        "no-upstream",
        "client-left",
        "ipv6",
    ],
)
def test_what_nginx_sends_is_read(message: str, expected: A.Request) -> None:
    assert A.parse(line(message), TAG) == expected


GOOD = f"cps2|1|web|{B1}|200|0.004|0.001|200|150|67"


@pytest.mark.parametrize(
    "datagram",
    [
        line(GOOD, f"<190>Dec  1 00:17:00 {TAG[:-1]}x: "),
        line(GOOD, f"<191>Dec  1 00:17:00 {TAG}: "),
        line(GOOD, f"<190>Dec  1 00:17:00 host {TAG}: "),
        line(GOOD, f"<190>2026-12-01T00:17:00 {TAG}: "),
        line(GOOD.replace("cps2|1|", "cps1|")),
        line(GOOD.replace("cps2|1|", "cps2|0|")),
        line(GOOD.replace("cps2|1|", "cps2|01|")),
        line(GOOD.replace("cps2|1|", "cps2|1001|")),
        line(GOOD.replace("cps2|1|", "cps2||")),
        line(f"cps2|10|web|{B1}, {B2}|502, 200|0.000, 0.002|-, 0.001|200|150|67"),
        line(f"cps2|10|web|{B1}|502|0.000|-|502|150|67"),
        line("cps2|10|web|-|-|-|-|503|190|67"),
        line(GOOD + "|1"),
        line(GOOD.replace("|67", "|67\n")),
        line(GOOD + "\n" + GOOD),
        line(GOOD.replace("web", "Web")),
        line(GOOD.replace("web", "-web")),
        line(GOOD.replace("web", "w" * 64)),
        line(GOOD.replace(B1, "172.20.0.3:0")),
        line(GOOD.replace(B1, "172.20.0.3:65536")),
        line(GOOD.replace(B1, "172.20.0.300:80")),
        line(GOOD.replace(B1, "[172.20.0.3]:80")),
        line(GOOD.replace(B1, "[fd00::zz]:80")),
        line(GOOD.replace(B1, "unix:/tmp/x")),
        line(GOOD.replace(B1, "cp_api")),
        line(GOOD.replace("|200|0.004", "|2000|0.004")),
        line(GOOD.replace("0.004", "4")),
        line(GOOD.replace("0.004", "1234567890.004")),
        line(GOOD.replace("|150|", "|1234567890123456|")),
        line(GOOD.replace("|150|", "|-1|")),
        line(f"cps2|1|web|{B1}, {B2}|502|0.000, 0.002|-, 0.001|200|150|67"),
        line(f"cps2|1|web|{B1}, {B2}|502 : 200|0.000, 0.002|-, 0.001|200|150|67"),
        line(f"cps2|1|web|{B1} : |200 : |0.001 : |0.000 : |200|150|67"),
        line("cps2|1|web|-|-|0.001|-|503|190|67"),
        line(
            "cps2|1|web|"
            + "|".join(", ".join([v] * (A.MAX_TRIES + 1)) for v in (B1, "200", "0.001", "0.000"))
            + "|200|150|67"
        ),
        line(GOOD).replace(b"web", b"w\xe9b"),
        b"",
        b"<190>",
    ],
    ids=lambda d: repr(d[22:60]),
)
def test_anything_else_is_refused(datagram: bytes) -> None:
    assert A.parse(datagram, TAG) is None


def test_up_to_sixteen_tries_and_no_more_bytes_than_a_datagram_holds() -> None:
    fields = [
        ", ".join([v] * A.MAX_TRIES) for v in ("[fd00::1234:5678]:65535", "200", "0.001", "0.000")
    ]
    datagram = line("cps2|1|web|" + "|".join(fields) + "|200|150|67")
    request = A.parse(datagram, TAG)
    assert request is not None and len(request.tries) == A.MAX_TRIES
    assert len(datagram) <= A.MAX_DATAGRAM
    assert A.parse(datagram + b" " * A.MAX_DATAGRAM, TAG) is None


def test_a_request_counts_once_at_its_service_and_each_try_at_its_backend() -> None:
    book = TrafficBook()
    retried = A.parse(line(f"cps2|1|web|{B1}, {B2}|502, 200|0.000, 0.002|-, 0.001|200|150|67"), TAG)
    none_left = A.parse(line(f"cps2|1|web|{B1}, cp_web|502, 502|0.000, 0.000|-, -|502|314|60"), TAG)
    assert retried is not None and none_left is not None
    A.add(book, retried, 100.0)
    A.add(book, none_left, 100.0)
    first, second, whole = (book.summary(Key(WEB, b), 100.0) for b in (B1, B2, ""))
    assert first is not None and second is not None and whole is not None
    assert sum(first.requests.values()) == 0 and first.connect_errors == 2
    assert (first.bytes_sent, first.bytes_received) == (0, 0)
    assert second.requests["2xx"] == 1 and second.connect_errors == 0
    assert (second.bytes_sent, second.bytes_received) == (150, 67)
    assert second.p50_ms is not None and 1.4 < second.p50_ms < 2.9
    assert whole.requests == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1}
    assert whole.connect_errors == 2 and (whole.bytes_sent, whole.bytes_received) == (464, 127)


def test_the_template_declares_the_format_parsed_here(
    template: jinja2.Template, tmp_path: Path
) -> None:
    """The http-level log and the service's variable; nginx accepts them, with an IPv6 sink
    too, sampled or not."""
    topology = build_topology(state(nginx(), container("web-1")))
    for host, sample in (("172.20.0.1", 1), ("fd00::1", 1), ("172.20.0.1", 10), ("fd00::1", 7)):
        sink = StatsSink(host, 5514, "A" * 32)
        options = RenderOptions(listen_port=18080, stats=sink, stats_sample=sample)
        config = render_config(topology, template, options)
        formats = re.findall(
            r"^log_format controlplane_stats escape=default '(.*)';$", config, re.M
        )
        assert formats == [A.FORMAT]
        assert 'set $cp_service "web";' in config
        target = f"[{host}]" if ":" in host else host
        assert (
            f'access_log "syslog:server={target}:5514,facility=local7,severity=info,tag={"A" * 32},'
            'nohostname" controlplane_stats if=$cp_send;' in config
        )
        assert ("split_clients" in config) == (sample > 1)
        assert nginx_t(tmp_path, config).returncode == 0
    plain = render_config(topology, template, RenderOptions())
    assert "cp_service" not in plain and "syslog" not in plain
    dynamic = render_config(topology, template, RenderOptions(dynamic=True, stats=sink))
    assert "controlplane_stats" not in dynamic


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert A.parse(data, TAG) is None or data.startswith(A.PREFIX)
    assert A.parse(line("cps2|1|") + data, TAG) is None or b"|" in data


MUTATIONS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=200), st.binary(min_size=0, max_size=4)),
    min_size=1,
    max_size=6,
)


@given(
    st.sampled_from(
        [
            GOOD,
            f"cps2|1|web|{B1}, {B2}|502, 200|0.000, 0.002|-, 0.001|200|150|67",
            f"cps2|1|web|{B1} : {B2}|404 : 200|0.001 : 0.003|0.000 : 0.001|200|150|72",
            "cps2|1|api.v2|[fd00::2]:8080|200|0.010|0.000|200|314|67",
        ]
    ),
    MUTATIONS,
)
def test_mutated_lines_never_raise_and_what_passes_is_bounded(
    message: str, mutations: list[tuple[int, bytes]]
) -> None:
    data = bytearray(line(message))
    for at, insert in mutations:
        cut = min(at, len(data))
        data[cut : cut + len(insert) % 2] = insert
    request = A.parse(bytes(data), TAG)
    if request is not None:
        assert len(request.tries) <= A.MAX_TRIES
        assert 0 <= request.status <= 999 and 0 <= request.sent < 10**15
        for one in request.tries:
            assert one.status is None or 0 <= one.status <= 999
            assert one.seconds is None or 0 <= one.seconds < 10**9
        A.add(TrafficBook(), request, 1.0)


def test_a_sampled_request_counts_as_many_as_it_stands_for() -> None:
    """One in ten fast answers is sent, weight 10: the book counts ten, bytes and times
    included, as if each had been sent."""
    weighted, alone = TrafficBook(), TrafficBook()
    sampled = A.parse(line(f"cps2|10|web|{B1}|200|0.004|0.001|200|150|67"), TAG)
    single = A.parse(line(GOOD), TAG)
    assert sampled is not None and sampled.weight == 10 and single is not None
    A.add(weighted, sampled, 100.0)
    for _ in range(10):
        A.add(alone, single, 100.0)
    for key in (Key(WEB, B1), Key(WEB, "")):
        assert weighted.summary(key, 100.5) == alone.summary(key, 100.5)


FIELD = st.sampled_from
ONE_TRY = st.tuples(
    FIELD(["1", "10", "1000", "1001", "0", "01"]),
    FIELD(["web", "api.v2", "a_b-c", "0", "-web", "web-", "a..b", "a.-b", "w" * 63, "w" * 64]),
    FIELD([B1, "10.0.0.255:65535", "10.0.0.3:0", "10.0.0.3:65536", "010.0.0.3:80", "[fd00::1]:80"]),
    FIELD(["200", "404", "429", "500", "502", "504", "418", "999", "000", "-"]),
    FIELD(["0.004", "123456789.000", "1234567890.000", "-", "4"]),
    FIELD(["0.001", "-", "1.5"]),
    FIELD(["200", "502", "999", "2000"]),
    FIELD(["150", "0", "1234567890123456"]),
)


@given(ONE_TRY, st.sampled_from([TAG, "T" * 16]))
def test_the_one_try_shortcut_reads_as_the_long_way(fields: tuple[str, ...], tag: str) -> None:
    """parse takes most datagrams in one match; it must say exactly what _parse says."""
    datagram = line("cps2|" + "|".join(fields) + "|67")
    assert A.parse(datagram, tag) == A._parse(datagram, tag)


@given(ONE_TRY)
def test_any_request_goes_into_the_book(fields: tuple[str, ...]) -> None:
    """Statuses outside 1xx-5xx included: they count in no class, and never raise."""
    request = A.parse(line("cps2|" + "|".join(fields) + "|67"), TAG)
    if request is not None:
        A.add(TrafficBook(), request, 100.0)
