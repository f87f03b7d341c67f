"""Topology -> DNS zone: which names exist, with which records, and which don't exist at all."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from controlplane.core import labels as L
from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.dns_records import (
    LOCAL_ZONES,
    SOA_TIMES,
    Soa,
    Srv,
    Zone,
    build_zone,
    local_zone,
    reverse_name,
    zone_data,
    zone_from_data,
)
from controlplane.core.lifecycle import StopMark
from controlplane.core.model import ContainerFacts
from tests.support.dns_stub import sample_zone
from tests.unit.builders import container, container_id, state

DOMAIN = "internal"
TTL = 5
VERSION = 7
NETWORKS = ("bridge", "app", "back")


def zone(
    *containers: ContainerFacts,
    stopping: Mapping[str, StopMark] | None = None,
    networks: tuple[str, ...] = NETWORKS,
    version: int = VERSION,
) -> Zone:
    topology = build_topology(state(*containers, networks=networks), BuildOptions(), stopping)
    return build_zone(topology, DOMAIN, TTL, version)


def values(z: Zone, name: str, rtype: str) -> tuple[object, ...] | None:
    found = z.lookup(name, rtype)
    return None if found is None else tuple(r.value for r in found)


def srv(host: str, port: int = 80, weight: int = 1) -> Srv:
    return Srv(1, weight, port, f"{host}.container.{DOMAIN}")


def short(name: str) -> str:
    return container_id(name)[:12]


W1 = container("w1", ip="172.20.0.2")
W2 = container("w2", ip="172.20.0.3")
# On app and back; w3 only on back.
MULTI = container("m1", ip="172.20.0.4", more_networks={"back": "172.21.0.4"})
BACK_ONLY = container("w3", network="back", ip="172.21.0.3")
V6 = container("v1", ip="172.20.0.5", ipv6="fd00::5")
LABELLED = container(
    "w1", ip="172.20.0.2", labels={L.PORT: "8080", L.WEIGHT: "5"}, exposed=(8080, 9090)
)
EXPOSED = container("w1", ip="172.20.0.2", exposed=(3000,))
TWO_SERVICES = container("w1", aliases=("web", "api"), ip="172.20.0.2")
UNDERSCORE = container("web_1", ip="172.20.0.2")
DOTTED = container("web.1", ip="172.20.0.2")
UPPER = container("Web1", ip="172.20.0.2")
PAUSED = container("p1", ip="172.20.0.9", status="paused")
UNHEALTHY = container("u1", ip="172.20.0.9", health="unhealthy")
STARTING = container("s1", ip="172.20.0.9", health="starting")
HEALTHY = container("h1", ip="172.20.0.2", health="healthy")


# ---------------------------------------------------------------- records that exist


@pytest.mark.parametrize(
    ("containers", "name", "rtype", "expected"),
    [
        ([W1, W2], "web.internal", "A", ("172.20.0.2", "172.20.0.3")),
        ([W1], "web.internal", "AAAA", ()),
        ([V6], "web.internal", "AAAA", ("fd00::5",)),
        ([V6], "web.app.internal", "AAAA", ("fd00::5",)),
        ([V6], "v1.container.internal", "AAAA", ("fd00::5",)),
        ([HEALTHY], "web.internal", "A", ("172.20.0.2",)),
        ([MULTI, BACK_ONLY], "web.internal", "A", ("172.20.0.4", "172.21.0.4", "172.21.0.3")),
        ([MULTI, BACK_ONLY], "web.app.internal", "A", ("172.20.0.4",)),
        ([MULTI, BACK_ONLY], "web.back.internal", "A", ("172.21.0.4", "172.21.0.3")),
        ([W1, W2], "_web._tcp.internal", "SRV", (srv("w1"), srv("w2"))),
        ([W1, W2], "web.internal", "SRV", (srv("w1"), srv("w2"))),
        ([LABELLED], "_web._tcp.internal", "SRV", (srv("w1", 8080, 5),)),
        ([LABELLED], "web.internal", "SRV", (srv("w1", 8080, 5),)),
        ([EXPOSED], "_web._tcp.internal", "SRV", (srv("w1", 3000),)),
        ([MULTI], "_web._tcp.internal", "SRV", (srv("m1"),)),
        ([TWO_SERVICES], "_api._tcp.internal", "SRV", (srv("w1"),)),
        ([TWO_SERVICES], "api.internal", "A", ("172.20.0.2",)),
        ([W1], "w1.container.internal", "A", ("172.20.0.2",)),
        ([MULTI], "m1.container.internal", "A", ("172.20.0.4", "172.21.0.4")),
        ([UPPER], "web1.container.internal", "A", ("172.20.0.2",)),
        ([UNDERSCORE], f"{short('web_1')}.container.internal", "A", ("172.20.0.2",)),
        ([DOTTED], f"{short('web.1')}.container.internal", "A", ("172.20.0.2",)),
        (
            [UNDERSCORE],
            "web.internal",
            "SRV",
            (Srv(1, 1, 80, f"{short('web_1')}.container.internal"),),
        ),
        ([W1], "2.0.20.172.in-addr.arpa", "PTR", ("w1.container.internal",)),
        ([MULTI], "4.0.21.172.in-addr.arpa", "PTR", ("m1.container.internal",)),
        ([TWO_SERVICES], "2.0.20.172.in-addr.arpa", "PTR", ("w1.container.internal",)),
        ([V6], reverse_name("fd00::5"), "PTR", ("v1.container.internal",)),
        ([W1], "internal", "NS", ("ns.internal",)),
    ],
    ids=[
        "a-every-live-backend",
        "aaaa-none-without-ipv6",
        "aaaa-service",
        "aaaa-scoped",
        "aaaa-host",
        "healthy-is-live",
        "a-every-network",
        "a-scoped-app",
        "a-scoped-back",
        "srv-tcp-name",
        "srv-consul-name",
        "srv-port-and-weight-labels",
        "srv-consul-port-and-weight-labels",
        "srv-exposed-port",
        "srv-once-per-container-on-two-networks",
        "srv-second-alias",
        "a-second-alias",
        "host-a",
        "host-a-every-network",
        "host-lower-case",
        "host-short-id-for-underscore-name",
        "host-short-id-for-dotted-name",
        "srv-target-short-id",
        "ptr-v4",
        "ptr-second-network",
        "ptr-once-for-two-services",
        "ptr-v6",
        "ns-apex",
    ],
)
def test_records(
    containers: list[ContainerFacts], name: str, rtype: str, expected: tuple[object, ...]
) -> None:
    assert values(zone(*containers), name, rtype) == expected


def test_soa_at_the_apex_carries_the_version() -> None:
    z = zone(W1, version=42)
    assert values(z, "internal", "SOA") == (
        Soa("ns.internal", "hostmaster.internal", 42, *SOA_TIMES, TTL),
    )
    assert z.soa.value == Soa("ns.internal", "hostmaster.internal", 42, *SOA_TIMES, TTL)
    assert z.version == 42
    assert z.domain == DOMAIN


def test_every_record_has_the_zone_ttl() -> None:
    z = zone(W1, V6, LABELLED, MULTI)
    records = [r for types in z.records.values() for rs in types.values() for r in rs]
    assert records
    assert {r.ttl for r in records} == {TTL}


def test_names_are_lower_case_and_in_the_zone() -> None:
    z = zone(W1, UPPER, V6, MULTI, BACK_ONLY, UNDERSCORE)
    for name, types in z.records.items():
        assert name == name.lower()
        assert not name.endswith(".")
        assert z.in_zone(name)
        for rtype, records in types.items():
            assert all(r.name == name and r.rtype == rtype for r in records)


def test_every_parent_of_a_name_exists() -> None:
    """No gap between a name and the apex: a parent is at least an empty non-terminal."""
    z = zone(W1, V6, MULTI, BACK_ONLY)
    for name in z.records:
        if name.endswith("." + DOMAIN):
            labels = name.split(".")
            for i in range(1, len(labels)):
                assert ".".join(labels[i:]) in z.records, (name, ".".join(labels[i:]))


# ---------------------------------------------------------------- NODATA and NXDOMAIN


@pytest.mark.parametrize(
    ("containers", "stopping", "name", "rtype", "expected"),
    [
        # The service exists without records: NODATA, for every type.
        ([PAUSED], None, "web.internal", "A", ()),
        ([PAUSED], None, "web.internal", "SRV", ()),
        ([UNHEALTHY], None, "web.internal", "A", ()),
        ([STARTING], None, "web.internal", "A", ()),
        ([W1], {W1.id: StopMark(frozenset({15}), 1.0)}, "web.internal", "A", ()),
        ([W1], None, "web.internal", "TXT", ()),
        ([W1], None, "web.internal", "MX", ()),
        ([W1], None, "w1.container.internal", "SRV", ()),
        ([W1], None, "2.0.20.172.in-addr.arpa", "A", ()),
        ([W1], None, "internal", "A", ()),
        # Empty non-terminals exist with no data.
        ([W1], None, "_tcp.internal", "SRV", ()),
        ([W1], None, "container.internal", "A", ()),
        ([W1], None, "app.internal", "A", ()),
        ([MULTI], None, "back.internal", "A", ()),
        # A backend that is not live leaves no trace of itself.
        ([W1, PAUSED], None, "web.internal", "A", ("172.20.0.2",)),
        ([W1, UNHEALTHY], None, "web.internal", "SRV", (srv("w1"),)),
        ([PAUSED], None, "p1.container.internal", "A", None),
        ([UNHEALTHY], None, "u1.container.internal", "A", None),
        ([PAUSED], None, "9.0.20.172.in-addr.arpa", "PTR", None),
        ([W1], {W1.id: StopMark(frozenset({15}), 1.0)}, "2.0.20.172.in-addr.arpa", "PTR", None),
        ([W1], {W1.id: StopMark(frozenset({15}), 1.0)}, "w1.container.internal", "A", None),
        # Names that don't exist: NXDOMAIN.
        ([W1], None, "nope.internal", "A", None),
        ([W1], None, "web.nope.internal", "A", None),
        ([W1], None, "web.bridge.internal", "A", None),
        ([W1], None, "w9.container.internal", "A", None),
        ([W1], None, "x.web.internal", "A", None),
        ([W1], None, "_nope._tcp.internal", "SRV", None),
        ([W1], None, "_web._udp.internal", "SRV", None),
        ([W1], None, "3.0.20.172.in-addr.arpa", "PTR", None),
        ([W1], None, "example.com", "A", None),
        ([], None, "web.internal", "A", None),
    ],
    ids=[
        "paused-only-nodata",
        "paused-only-nodata-srv",
        "unhealthy-only-nodata",
        "starting-only-nodata",
        "stopping-only-nodata",
        "service-txt-nodata",
        "service-mx-nodata",
        "host-srv-nodata",
        "reverse-a-nodata",
        "apex-a-nodata",
        "ent-tcp",
        "ent-container",
        "ent-network",
        "ent-second-network",
        "paused-backend-absent",
        "unhealthy-backend-absent-srv",
        "paused-host-nxdomain",
        "unhealthy-host-nxdomain",
        "paused-ptr-nxdomain",
        "stopping-ptr-nxdomain",
        "stopping-host-nxdomain",
        "unknown-service",
        "unknown-network",
        "unwatched-network",
        "unknown-host",
        "below-a-service",
        "unknown-srv",
        "srv-udp",
        "unknown-ptr",
        "outside",
        "empty-topology",
    ],
)
def test_absent(
    containers: list[ContainerFacts],
    stopping: Mapping[str, StopMark] | None,
    name: str,
    rtype: str,
    expected: tuple[object, ...] | None,
) -> None:
    assert values(zone(*containers, stopping=stopping), name, rtype) == expected


def test_empty_topology_has_only_the_apex() -> None:
    z = zone()
    assert set(z.records) == {"internal"}
    assert set(z.records["internal"]) == {"SOA", "NS"}


# ---------------------------------------------------------------- in_zone


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("internal", True),
        ("web.internal", True),
        ("nope.internal", True),
        ("a.b.c.internal", True),
        ("_web._tcp.internal", True),
        ("2.0.20.172.in-addr.arpa", True),
        (reverse_name("fd00::5"), True),
        ("3.0.20.172.in-addr.arpa", True),
        ("0.20.172.in-addr.arpa", True),
        ("4.3.2.1.in-addr.arpa", False),
        ("10.in-addr.arpa", True),
        ("in-addr.arpa", False),
        ("example.com", False),
        ("internalx", False),
        ("xinternal", False),
        ("internal.com", False),
        ("web.internal.com", False),
        ("", False),
    ],
    ids=[
        "apex",
        "service",
        "unknown-in-zone",
        "deep-unknown-in-zone",
        "srv-name",
        "ptr-known-v4",
        "ptr-known-v6",
        "ptr-unknown-private-ip",
        "ptr-parent",
        "ptr-public-ip",
        "rfc6303-apex",
        "arpa",
        "outside",
        "suffix-without-dot",
        "prefix-without-dot",
        "zone-as-label",
        "zone-in-the-middle",
        "root",
    ],
)
def test_in_zone(name: str, expected: bool) -> None:
    assert zone(W1, V6).in_zone(name) is expected


@pytest.mark.parametrize(
    ("ip", "apex"),
    [
        ("10.1.2.3", "10.in-addr.arpa"),
        ("172.16.0.1", "16.172.in-addr.arpa"),
        ("172.31.255.1", "31.172.in-addr.arpa"),
        ("172.32.0.1", None),
        ("172.15.0.1", None),
        ("192.168.1.1", "168.192.in-addr.arpa"),
        ("192.169.1.1", None),
        ("169.254.1.1", "254.169.in-addr.arpa"),
        ("100.64.0.1", "64.100.in-addr.arpa"),
        ("100.127.255.1", "127.100.in-addr.arpa"),
        ("100.63.0.1", None),
        ("100.128.0.1", None),
        ("8.8.8.8", None),
        ("fd12::1", "d.f.ip6.arpa"),
        ("fc00::1", None),
        ("fe80::1", "8.e.f.ip6.arpa"),
        ("febf::1", "b.e.f.ip6.arpa"),
        ("fec0::1", None),
        ("::1", f"1.{'.'.join('0' * 31)}.ip6.arpa"),
        ("2001:db8::1", "8.b.d.0.1.0.0.2.ip6.arpa"),
        ("2001:db9::1", None),
    ],
)
def test_local_zone_of_an_address(ip: str, apex: str | None) -> None:
    assert local_zone(reverse_name(ip)) == apex
    if apex is not None:
        assert apex in LOCAL_ZONES
        assert local_zone(apex) == apex


def test_a_backend_reverse_name_has_its_parents_up_to_the_local_zone() -> None:
    z = zone(W1, V6)
    assert z.lookup("0.20.172.in-addr.arpa", "PTR") == ()
    assert z.lookup("9.0.20.172.in-addr.arpa", "PTR") is None
    assert "172.in-addr.arpa" not in z.records  # above the zone: not ours
    assert values(z, "20.172.in-addr.arpa", "SOA") == (
        Soa("20.172.in-addr.arpa", "nobody.invalid", VERSION, 3600, 1200, 604800, TTL),
    )
    assert values(z, "20.172.in-addr.arpa", "NS") == ("20.172.in-addr.arpa",)
    assert z.soa_for("9.9.20.172.in-addr.arpa").name == "20.172.in-addr.arpa"
    assert z.soa_for("web.internal") == z.soa


def test_reverse_name_is_the_standard_pointer() -> None:
    assert reverse_name("172.20.0.2") == "2.0.20.172.in-addr.arpa"
    assert reverse_name("fd00::5") == ipaddress.ip_address("fd00::5").reverse_pointer
    assert reverse_name("fd00::5").endswith(".ip6.arpa")


def test_another_domain() -> None:
    topology = build_topology(state(W1, networks=NETWORKS), BuildOptions())
    z = build_zone(topology, "svc.example", 30, 3)
    assert values(z, "web.svc.example", "A") == ("172.20.0.2",)
    assert values(z, "_web._tcp.svc.example", "SRV") == (Srv(1, 1, 80, "w1.container.svc.example"),)
    assert values(z, "2.0.20.172.in-addr.arpa", "PTR") == ("w1.container.svc.example",)
    assert values(z, "svc.example", "SOA") == (
        Soa("ns.svc.example", "hostmaster.svc.example", 3, *SOA_TIMES, 30),
    )
    assert values(z, "example", "A") is None
    assert not z.in_zone("example")
    assert z.lookup("web.svc.example", "A") is not None
    assert {r.ttl for r in z.lookup("web.svc.example", "A") or ()} == {30}


def test_same_topology_same_zone() -> None:
    """Pure: the same input gives equal records, so a rebuild changes nothing but the serial."""
    a, b = zone(W1, W2, V6), zone(W1, W2, V6)
    assert a.records == b.records


def test_scoped_name_of_a_network_with_upper_case() -> None:
    """Docker network names keep their case; DNS names have none, and the Answerer looks up
    the lower-cased query name."""
    z = zone(container("w1", network="Front", ip="172.20.0.2"), networks=("bridge", "Front"))
    assert values(z, "web.front.internal", "A") == ("172.20.0.2",)
    assert z.lookup("front.internal", "A") == ()
    assert all(name == name.lower() for name in z.records)


def test_a_dotted_service_name_and_a_scoped_name_do_not_mix() -> None:
    dotted = container("a1", aliases=("web.app",), ip="172.20.0.7")
    z = zone(dotted, W1)
    assert values(z, "web.internal", "A") == ("172.20.0.2",)
    assert values(z, "web.app.internal", "A") in (("172.20.0.7",), ("172.20.0.2",))


def test_a_service_with_no_live_backend_has_both_names_without_records() -> None:
    """NODATA, not NXDOMAIN, for S.<domain> and _S._tcp.<domain> alike."""
    z = zone(container("w1", status="paused"))
    assert z.lookup("web.internal", "A") == ()
    assert z.lookup("_web._tcp.internal", "SRV") == ()


# ---------------------------------------------------------------- the zone as data (dns_process)


def test_a_zone_goes_through_json_whole() -> None:
    zone = sample_zone()
    again = zone_from_data(json.loads(json.dumps(zone_data(zone))))
    assert again == zone and again.records == zone.records


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.update(ttl=-1), "ttl must be a whole number"),
        (lambda d: d.update(version=True), "version must be a whole number"),
        (lambda d: d.update(domain="Internal"), "is not a lower-case DNS name"),
        (lambda d: d["names"].update({"a..b": {}}), "'a..b' is not a lower-case DNS name"),
        (lambda d: d["names"]["web.internal"].update(TXT=[]), "record type 'TXT'"),
        (lambda d: d["names"]["web.internal"].update(A=[[5, "::1"]]), "not an IPv4 address"),
        (lambda d: d["names"]["web.internal"].update(A=[[5, "x"]]), "not an IPv4 address"),
        (lambda d: d["names"]["web.internal"].update(A=[5]), "must be [ttl, value]"),
        (lambda d: d["names"]["web.internal"].update(SRV=[[5, [1, 2, 70000, "w.x"]]]), "65535"),
        (lambda d: d["names"].pop("internal"), "exactly one SOA record"),
        (
            lambda d: d["names"]["internal"]["SOA"].append(d["names"]["internal"]["SOA"][0]),
            "one SOA",
        ),
        (lambda d: d["names"].update({"example.com": {}}), "outside the zone"),
        (lambda d: d.update(names=[]), "names must be an object"),
    ],
)
def test_zone_data_is_checked_field_by_field(
    change: Callable[[dict[str, Any]], None], reason: str
) -> None:
    data = json.loads(json.dumps(zone_data(sample_zone())))
    change(data)
    with pytest.raises(ValueError, match=re.escape(reason)):
        zone_from_data(data)


def test_a_name_no_dns_name_can_hold_is_left_out_of_the_zone() -> None:
    """A network name past 63 characters can't be a label: its scoped name is skipped, the
    rest of the zone stands (and still goes through zone_data)."""
    long_net = "n" * 70
    built = zone(container("w1", network=long_net, ip="10.9.0.2"), networks=(long_net,))
    assert values(built, "web.internal", "A") == ("10.9.0.2",)
    assert not any(long_net in name for name in built.records)
    assert zone_from_data(zone_data(built)) == built
