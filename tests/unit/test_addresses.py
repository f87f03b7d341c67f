"""Literal IP:PORT addresses for listening and forwarding: names are refused."""

from __future__ import annotations

import pytest

from controlplane.addresses import SocketAddress, is_loopback, parse_address
from controlplane.errors import ControlPlaneError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", SocketAddress("127.0.0.1", 5353)),
        ("127.0.0.1", SocketAddress("127.0.0.1", 53)),
        (" 10.0.0.1:53 ", SocketAddress("10.0.0.1", 53)),
        ("0.0.0.0:1", SocketAddress("0.0.0.0", 1)),
        ("127.0.0.1:65535", SocketAddress("127.0.0.1", 65535)),
        ("[::1]:5353", SocketAddress("::1", 5353)),
        ("[::1]", SocketAddress("::1", 53)),
        ("::1", SocketAddress("::1", 53)),
        ("::", SocketAddress("::", 53)),
        ("fd00::53", SocketAddress("fd00::53", 53)),
        ("[fe80::1%eth0]:53", SocketAddress("fe80::1%eth0", 53)),
    ],
    ids=[
        "v4-port",
        "v4-default-port",
        "spaces",
        "any-port-1",
        "port-max",
        "v6-port",
        "v6-brackets-default-port",
        "v6-bare",
        "v6-any",
        "v6-bare-ula",
        "v6-scoped",
    ],
)
def test_parse_address_accepts(text: str, expected: SocketAddress) -> None:
    assert parse_address(text, 53) == expected


def test_parse_address_default_port_and_str() -> None:
    assert parse_address("127.0.0.1", default_port=5353) == SocketAddress("127.0.0.1", 5353)
    assert str(parse_address("[::1]:53", 53)) == "[::1]:53"
    assert str(parse_address("127.0.0.1:53", 53)) == "127.0.0.1:53"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "localhost:53",
        "localhost",
        "dns.example",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:53:53",
        "127.0.0.1:port",
        "127.0.0.256:53",
        "::1:53:x",
        "[::1]:x",
        "[::1]:99999",
        "[localhost]:53",
        "1.2.3:53",
        ":53",
    ],
    ids=[
        "empty",
        "name-port",
        "name",
        "fqdn",
        "port-0",
        "port-too-big",
        "port-negative",
        "two-ports",
        "port-not-number",
        "bad-octet",
        "v6-junk",
        "v6-port-not-number",
        "v6-port-too-big",
        "name-in-brackets",
        "short-v4",
        "port-only",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ControlPlaneError, match="IP:PORT"):
        parse_address(text, 53)


@pytest.mark.parametrize("text", ["[::1]53", "127.0.0.1:", "127.0.0.1:+53", "127.0.0.1:5_3"])
def test_parse_address_rejects_sloppy_forms(text: str) -> None:
    with pytest.raises(ControlPlaneError):
        parse_address(text, 53)


def test_port_zero_only_when_any_port() -> None:
    assert parse_address("127.0.0.1:0", 8080, any_port=True) == SocketAddress("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("text", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("0.0.0.0", False), ("::", False)],
    ids=["v4", "v4-any-127", "v6", "v4-all", "v6-all"],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert is_loopback(parse_address(text, 80)) is loopback
