"""core.lua_stats: the Lua balancer's traffic datagrams, read strictly (anything off the
grammar refuses the whole datagram, and no bytes make it raise); and the dynamic config's
configure call, which tells the Lua side where to send them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.labels import NAME_RE
from controlplane.core.lua_stats import MAX_BYTES, MAX_COUNT, Report, parse, read
from controlplane.core.model import Topology
from controlplane.core.render import RenderOptions, StatsSink, render_config
from controlplane.core.traffic import BUCKETS, COUNTS, VECTOR, Key
from controlplane.templating import load_template

TAG = "Abc123def456GHI789jk"
HEADER = f"cp-stats 1 {TAG} 4242 17"


def datagram(*lines: str, header: str = HEADER) -> bytes:
    return "\n".join([header, *lines]).encode()


def line(service: str, addr: str, counts: list[int], buckets: dict[int, int]) -> str:
    """A line as the Lua side writes it (figure_line)."""
    pairs = ",".join(f"{i}:{n}" for i, n in sorted(buckets.items())) or "-"
    return " ".join([service, addr, *map(str, counts), pairs])


def vector(counts: list[int], buckets: dict[int, int]) -> list[int]:
    found = [*counts, *[0] * BUCKETS]
    for i, n in buckets.items():
        found[COUNTS + i] = n
    return found


WEB = line("web", "-", [0, 7, 0, 1, 2, 1, 5120, 900], {0: 3, 5: 4, 32: 2})
PEER = line("web", "172.20.0.2:8080", [0, 7, 0, 1, 2, 0, 4000, 700], {4: 10})
V6 = line("web.internal", "[fd00::1:2]:80", [0, 0, 0, 0, 0, 3, 0, 0], {})


def test_a_datagram_as_the_lua_side_writes_it() -> None:
    report = parse(datagram(WEB, PEER, V6), TAG)
    assert report == (
        "4242",
        [
            (Key("web", ""), vector([0, 7, 0, 1, 2, 1, 5120, 900], {0: 3, 5: 4, 32: 2})),
            (Key("web", "172.20.0.2:8080"), vector([0, 7, 0, 1, 2, 0, 4000, 700], {4: 10})),
            (Key("web.internal", "[fd00::1:2]:80"), vector([0, 0, 0, 0, 0, 3, 0, 0], {})),
        ],
    )
    assert all(len(v) == VECTOR for _, v in report[1])


def test_read_gives_the_sequence_number_too() -> None:
    peer = (Key("web", "172.20.0.2:8080"), vector([0, 7, 0, 1, 2, 0, 4000, 700], {4: 10}))
    assert read(datagram(PEER), TAG) == Report("4242", 17, [peer])
    assert read(datagram(header=f"cp-stats 1 {TAG} 7 1"), TAG) == Report("7", 1, [])
    assert read(datagram(WEB), "Xbc123def456GHI789jk") is None


def test_a_header_alone_and_a_last_newline_are_fine() -> None:
    assert parse(datagram(), TAG) == ("4242", [])
    assert parse(datagram(WEB) + b"\n", TAG) == parse(datagram(WEB), TAG)


def test_a_wrong_tag_refuses_the_datagram() -> None:
    assert parse(datagram(WEB), "Xbc123def456GHI789jk") is None
    assert parse(datagram(WEB), TAG + "x") is None


BIG = str(MAX_COUNT + 1)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(datagram(WEB, header=f"cp-stats 2 {TAG} 4242 17"), id="version"),
        pytest.param(datagram(WEB, header=f"cp-stats 1 {TAG} 0 17"), id="pid 0"),
        pytest.param(datagram(WEB, header=f"cp-stats 1 {TAG} 42 -1"), id="seq"),
        pytest.param(datagram(WEB, header=f"cp-stats 1 {TAG}  42 1"), id="two spaces"),
        pytest.param(datagram(WEB, header=f"cp-stats 1 {TAG} 42 1 x"), id="header extra"),
        pytest.param(datagram(WEB, header="cp-stats 1 short 42 1"), id="short tag"),
        pytest.param(datagram(WEB, "", PEER), id="empty line"),
        pytest.param(datagram(WEB, WEB), id="key twice"),
        pytest.param(datagram(WEB.replace("web", "Web", 1)), id="upper case name"),
        pytest.param(datagram(WEB.replace("web", "web-", 1)), id="name ends in -"),
        pytest.param(datagram(WEB.replace("web", "a..b", 1)), id="empty label"),
        pytest.param(datagram(WEB.replace("web", "x" * 64, 1)), id="name too long"),
        pytest.param(datagram(WEB.replace("web", "w\teb", 1)), id="control char"),
        pytest.param(datagram(PEER.replace("172.20.0.2", "172.20.0.02")), id="leading zero"),
        pytest.param(datagram(PEER.replace("172.20.0.2", "172.20.0.256")), id="octet"),
        pytest.param(datagram(PEER.replace(":8080", ":0")), id="port 0"),
        pytest.param(datagram(PEER.replace(":8080", ":65536")), id="port too big"),
        pytest.param(datagram(PEER.replace(":8080", ":08080")), id="port leading zero"),
        pytest.param(datagram(PEER.replace(":8080", "")), id="no port"),
        pytest.param(datagram(V6.replace("[fd00::1:2]", "fd00::1:2")), id="v6 no brackets"),
        pytest.param(datagram(V6.replace("fd00::1:2", "fd00:0::1:2")), id="v6 not compressed"),
        pytest.param(datagram(V6.replace("fd00::1:2", "FD00::1:2")), id="v6 upper case"),
        pytest.param(datagram(V6.replace("[fd00::1:2]", "[172.20.0.2]")), id="v4 in brackets"),
        pytest.param(datagram(WEB.replace(" 7 ", " 07 ")), id="count leading zero"),
        pytest.param(datagram(WEB.replace(" 7 ", f" {BIG} ")), id="count too big"),
        pytest.param(datagram(WEB.replace(" 7 ", " -7 ")), id="negative"),
        pytest.param(datagram(WEB.replace(" 7 ", " 7.0 ")), id="not an integer"),
        pytest.param(datagram(WEB.replace(" 1 5120", " 5120")), id="a count short"),
        pytest.param(datagram(WEB + " 0"), id="a field more"),
        pytest.param(datagram(WEB.replace("32:2", "33:2")), id="bucket 33"),
        pytest.param(datagram(WEB.replace("32:2", f"32:{BIG}")), id="bucket count too big"),
        pytest.param(datagram(WEB.replace("5:4", "5:0")), id="bucket count 0"),
        pytest.param(datagram(WEB.replace("0:3,5:4", "5:4,0:3")), id="buckets out of order"),
        pytest.param(datagram(WEB.replace("0:3,5:4", "5:3,5:4")), id="bucket twice"),
        pytest.param(datagram(WEB.replace("0:3,", "0:3,,")), id="empty pair"),
        pytest.param(datagram(WEB.replace(",32:2", ",")), id="trailing comma"),
        pytest.param(datagram(WEB) + b"\n\n", id="two last newlines"),
        pytest.param(datagram(WEB).replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(datagram(WEB).replace(b"web", "wéb".encode()), id="not ascii"),
        pytest.param(datagram(*(f"s{i} - 0 0 0 0 0 0 0 0 -" for i in range(60))), id="too big"),
    ],
)
def test_anything_off_the_grammar_refuses_the_whole_datagram(bad: bytes) -> None:
    assert parse(bad, TAG) is None


def test_the_limits_themselves_are_fine() -> None:
    lines = [f"s{i} - 0 0 0 0 0 0 0 0 -" for i in range(55)]
    most = datagram(*lines, "x" * (MAX_BYTES - len(datagram(*lines)) - 21) + " - 0 0 0 0 0 0 0 0 -")
    assert len(most) == MAX_BYTES
    report = parse(most, TAG)
    assert report is not None and len(report[1]) == 56
    assert parse(most + b"\n", TAG) is None, "one byte more"
    top = line("a" * 63, "-", [MAX_COUNT] * 8, {i: MAX_COUNT for i in (0, 31, 32)})
    assert parse(datagram(top), TAG) is not None


def well_formed(report: tuple[str, list[tuple[Key, list[int]]]]) -> bool:
    return all(
        NAME_RE.fullmatch(key.service)
        and len(vector) == VECTOR
        and all(0 <= n <= MAX_COUNT for n in vector)
        for key, vector in report[1]
    )


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data: bytes) -> None:
    report = parse(data, TAG)
    assert report is None or well_formed(report)


VALID = datagram(WEB, PEER, V6)


@settings(max_examples=500)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(VALID)),
            st.sampled_from(["insert", "delete", "replace"]),
            st.sampled_from(b" \n:,-[]0123456789aAz.\x00\xff"),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mutated_datagrams_never_raise_and_what_parses_is_in_the_grammar(
    edits: list[tuple[int, str, int]],
) -> None:
    data = bytearray(VALID)
    for position, how, byte in edits:
        at = min(position, len(data))
        if how == "insert":
            data[at:at] = bytes([byte])
        elif how == "delete":
            del data[at : at + 1]
        else:
            data[at : at + 1] = bytes([byte])
    report = parse(bytes(data), TAG)
    assert report is None or well_formed(report)


def configure_line(stats: StatsSink | None) -> str:
    options = RenderOptions(dynamic=True, state_path="/s", delta_path="/d", stats=stats)
    text = render_config(Topology(), load_template(), options)
    return next(x for x in text.splitlines() if x.startswith("controlplane.configure("))


def test_the_dynamic_config_tells_the_lua_side_where_to_send() -> None:
    sink = StatsSink("172.20.0.1", 40123, TAG)
    assert configure_line(sink).endswith(
        f', stats = {{host = "172.20.0.1", port = 40123, tag = "{TAG}"}}}})'
    )
    assert "stats" not in configure_line(None)
