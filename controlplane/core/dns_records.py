"""Topology -> the DNS zone controlplane answers for, as plain data.

Built from the same snapshot that renders nginx, so a backend nginx no longer routes to is no
longer answered, and one zone value is one version of the model: an answer can't mix two.
Names are lower case without the trailing dot. The server turns these records into wire
format; nothing here knows dnslib.

The reverse zones of private and special-use addresses (RFC 6303) are answered here too:
backends' PTR records, and NXDOMAIN with the zone's own SOA for every other name in them, so
such queries never leak to the upstreams.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from controlplane.core.model import Backend, Topology

LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SOA_TIMES = (3600, 600, 86400)  # refresh, retry, expire: no secondaries, so only informative
LOCAL_SOA_TIMES = (3600, 1200, 604800)  # RFC 6303 section 3
LOCAL_RNAME = "nobody.invalid"  # RFC 6303 section 3
LOCAL_ZONES = frozenset(
    (
        # RFC 6303 4.2: RFC 1918 space
        "10.in-addr.arpa",
        *(f"{n}.172.in-addr.arpa" for n in range(16, 32)),
        "168.192.in-addr.arpa",
        # 4.3: RFC 5735 special-use space
        "0.in-addr.arpa",
        "127.in-addr.arpa",
        "254.169.in-addr.arpa",
        "2.0.192.in-addr.arpa",
        "100.51.198.in-addr.arpa",
        "113.0.203.in-addr.arpa",
        "255.255.255.255.in-addr.arpa",
        # RFC 7793: the shared address space 100.64.0.0/10 (carrier-grade NAT)
        *(f"{n}.100.in-addr.arpa" for n in range(64, 128)),
        # 4.4: the unspecified and loopback IPv6 addresses
        "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa",
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa",
        # 4.5-4.7: unique local, link-local and documentation IPv6 space
        "d.f.ip6.arpa",
        "8.e.f.ip6.arpa",
        "9.e.f.ip6.arpa",
        "a.e.f.ip6.arpa",
        "b.e.f.ip6.arpa",
        "8.b.d.0.1.0.0.2.ip6.arpa",
    )
)


@dataclass(frozen=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int


@dataclass(frozen=True)
class Record:
    """`value` is an address (A, AAAA), a name (PTR, NS), an Srv or a Soa."""

    name: str
    rtype: str
    ttl: int
    value: str | Srv | Soa


@dataclass(frozen=True)
class Zone:
    domain: str
    version: int
    ttl: int
    records: Mapping[str, Mapping[str, tuple[Record, ...]]] = field(hash=False)
    """name -> record type -> records; a name with an empty mapping exists with no data."""

    @property
    def soa(self) -> Record:
        return self.records[self.domain]["SOA"][0]

    def in_zone(self, name: str) -> bool:
        return (
            name == self.domain
            or name.endswith("." + self.domain)
            or name in self.records
            or local_zone(name) is not None
        )

    def only_local_reverse(self, name: str) -> bool:
        """Whether `name` is in a private reverse zone (RFC 6303) and no backend's PTR (or
        above one): what an upstream may know better, when the operator says so."""
        return name not in self.records and local_zone(name) is not None

    def soa_for(self, name: str) -> Record:
        """The SOA of the zone `name` is in: a local reverse zone's own, else the domain's."""
        apex = local_zone(name)
        return self.soa if apex is None else self._local_apex(apex)["SOA"][0]

    def types(self, name: str) -> Mapping[str, tuple[Record, ...]] | None:
        """Every record of `name` by type; None for a name that does not exist."""
        types = self.records.get(name)
        if name in LOCAL_ZONES:
            return {**(types or {}), **self._local_apex(name)}
        return types

    def lookup(self, name: str, rtype: str) -> tuple[Record, ...] | None:
        """The records of that type; () for a name that exists without them (NODATA); None for
        a name that does not exist (NXDOMAIN)."""
        types = self.types(name)
        if types is None:
            return None
        return types.get(rtype, ())

    def _local_apex(self, apex: str) -> dict[str, tuple[Record, ...]]:
        """RFC 6303's SOA and NS, with this zone's TTL as the negative TTL: a name answered
        NXDOMAIN now may be a new backend's PTR in the next version."""
        soa = Soa(apex, LOCAL_RNAME, self.version, *LOCAL_SOA_TIMES, self.ttl)
        return {
            "SOA": (Record(apex, "SOA", self.ttl, soa),),
            "NS": (Record(apex, "NS", self.ttl, apex),),
        }


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def local_zone(name: str) -> str | None:
    """The RFC 6303 zone `name` is in (or is), if any."""
    if not name.endswith(("in-addr.arpa", "ip6.arpa")):
        return None
    labels = name.split(".")
    for i in range(len(labels) - 2):
        suffix = ".".join(labels[i:])
        if suffix in LOCAL_ZONES:
            return suffix
    return None


def host_label(backend: Backend) -> str:
    """A container's own DNS label: its name when that is a valid label, else its short ID."""
    name = backend.container.lower()
    return name if LABEL_RE.fullmatch(name) else backend.container_id[:12]


def build_zone(topology: Topology, domain: str, ttl: int, version: int) -> Zone:
    """Records for every service and live backend of `topology` under `domain`."""
    records: dict[str, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    exists: set[str] = set()

    def add(name: str, rtype: str, value: str | Srv | Soa) -> None:
        name = name.lower()  # Docker network names may have upper case; DNS has no case
        if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
            return  # e.g. a network name past 63 characters: no DNS name can hold it
        existing = records[name][rtype]
        record = Record(name, rtype, ttl, value)
        if record not in existing:
            existing.append(record)

    add(domain, "SOA", Soa(f"ns.{domain}", f"hostmaster.{domain}", version, *SOA_TIMES, ttl))
    add(domain, "NS", f"ns.{domain}")
    # A dotted service name (web.app) beats a network-scoped one (web on network app).
    service_names = {f"{s.name}.{domain}".lower() for s in topology.services}
    for service in topology.services:
        base = f"{service.name}.{domain}".lower()
        # A service with no live backend still exists: NODATA, not NXDOMAIN, for both names.
        exists.update((base, f"_{service.name}._tcp.{domain}".lower()))
        seen_containers: set[str] = set()
        for backend in service.live_backends:
            host = f"{host_label(backend)}.container.{domain}"
            scoped = f"{service.name}.{backend.network}.{domain}"
            for ip, rtype in ((backend.ip, "A"), (backend.ipv6, "AAAA")):
                if ip:
                    add(base, rtype, ip)
                    if scoped.lower() not in service_names:
                        add(scoped, rtype, ip)
                    add(host, rtype, ip)
                    add(reverse_name(ip), "PTR", host)
            if backend.container_id not in seen_containers:
                seen_containers.add(backend.container_id)
                srv = Srv(1, backend.weight, backend.port, host)
                add(f"_{service.name}._tcp.{domain}", "SRV", srv)
                add(base, "SRV", srv)
    names: dict[str, dict[str, tuple[Record, ...]]] = {name: {} for name in exists}
    names.update({n: {t: tuple(rs) for t, rs in types.items()} for n, types in records.items()})
    for name in list(names):
        apex = domain if name.endswith("." + domain) else local_zone(name)
        if apex is not None and name != apex:
            parent = name[: -len(apex) - 1]
            while "." in parent:
                parent = parent.split(".", 1)[1]
                names.setdefault(f"{parent}.{apex}", {})
    return Zone(domain, version, ttl, names)


RTYPES = frozenset(("A", "AAAA", "SRV", "PTR", "SOA", "NS"))
MAX_NAME = 253  # characters without the trailing dot: 255 octets on the wire
MAX_TTL = 2**31 - 1  # RFC 2181 8


def forwarding_networks(topology: Topology) -> list[str]:
    """The subnets of the watched networks: who may use the forwarder by default."""
    return [
        str(ipaddress.ip_network(subnet, strict=False))
        for network in topology.networks
        for subnet in network.subnets
    ]


ZONE_SIGNATURE = "X-Controlplane-Signature"
MAX_ZONE_AGE = 60.0
"""Seconds a signed zone reply is taken after it was issued: a replayed old one is not."""


def zone_signature(token: str, body: bytes) -> str:
    """What the controller signs a zone reply with, by the API token both ends know: a DNS
    service following it over a network takes no zone from anyone else."""
    return "sha256=" + hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def signed_by(token: str, body: bytes, signature: str | None) -> bool:
    return signature is not None and hmac.compare_digest(zone_signature(token, body), signature)


def zone_data(zone: Zone) -> dict[str, object]:
    """The zone as JSON-ready data, for the DNS process to answer from (`zone_from_data`)."""

    def value(record: Record) -> object:
        v = record.value
        if isinstance(v, Srv):
            return [v.priority, v.weight, v.port, v.target]
        if isinstance(v, Soa):
            return [v.mname, v.rname, v.serial, v.refresh, v.retry, v.expire, v.minimum]
        return v

    return {
        "domain": zone.domain,
        "version": zone.version,
        "ttl": zone.ttl,
        "names": {
            name: {t: [[r.ttl, value(r)] for r in rs] for t, rs in types.items()}
            for name, types in zone.records.items()
        },
    }


def zone_from_data(data: object) -> Zone:
    """The zone `zone_data` gave, checked field by field: ValueError names the first wrong one
    (the data crossed a process boundary, and maybe a network)."""
    top = _mapping(data, "the zone")
    domain = _name(top.get("domain"), "domain")
    version = _int(top.get("version"), "version", 0, 2**63)
    ttl = _int(top.get("ttl"), "ttl", 0, MAX_TTL)
    names: dict[str, dict[str, tuple[Record, ...]]] = {}
    for name, types in _mapping(top.get("names"), "names").items():
        name = _name(name, "a name")
        if not (name == domain or name.endswith(("." + domain, ".in-addr.arpa", ".ip6.arpa"))):
            raise ValueError(f"{name!r} is outside the zone {domain!r} and the reverse zones")
        kept: dict[str, tuple[Record, ...]] = {}
        for rtype, records in _mapping(types, name).items():
            if rtype not in RTYPES:
                raise ValueError(f"{name}: record type {rtype!r} is not one of {sorted(RTYPES)}")
            if not isinstance(records, list):
                raise ValueError(f"{name} {rtype}: records must be a list")
            kept[rtype] = tuple(_record(name, rtype, r) for r in records)
        names[name] = kept
    if len(names.get(domain, {}).get("SOA", ())) != 1:
        raise ValueError(f"the zone needs exactly one SOA record at its domain {domain!r}")
    return Zone(domain, version, ttl, names)


def _record(name: str, rtype: str, data: object) -> Record:
    where = f"{name} {rtype}"
    if not isinstance(data, list) or len(data) != 2:
        raise ValueError(f"{where}: a record must be [ttl, value]")
    ttl = _int(data[0], f"{where} ttl", 0, MAX_TTL)
    raw = data[1]
    value: str | Srv | Soa
    if rtype in ("A", "AAAA"):
        version = 4 if rtype == "A" else 6
        try:
            address = ipaddress.ip_address(raw if isinstance(raw, str) else "")
        except ValueError:
            raise ValueError(f"{where}: {raw!r} is not an IPv{version} address") from None
        if address.version != version:
            raise ValueError(f"{where}: {raw!r} is not an IPv{version} address")
        value = str(address)
    elif rtype in ("PTR", "NS"):
        value = _name(raw, f"{where} target")
    elif rtype == "SRV":
        fields = raw if isinstance(raw, list) and len(raw) == 4 else None
        if fields is None:
            raise ValueError(f"{where}: must be [priority, weight, port, target]")
        priority, weight, port = (_int(v, f"{where} field", 0, 65535) for v in fields[:3])
        value = Srv(priority, weight, port, _name(fields[3], f"{where} target"))
    else:
        fields = raw if isinstance(raw, list) and len(raw) == 7 else None
        if fields is None:
            raise ValueError(f"{where}: must be [mname, rname, serial, refresh, retry, ...]")
        times = [_int(v, f"{where} field", 0, 2**32 - 1) for v in fields[2:]]
        value = Soa(_name(fields[0], f"{where} mname"), _name(fields[1], f"{where} rname"), *times)
    return Record(name, rtype, ttl, value)


def _mapping(data: object, what: str) -> dict[str, object]:
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{what} must be an object")
    return data


def _int(data: object, what: str, low: int, high: int) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or not low <= data <= high:
        raise ValueError(f"{what} must be a whole number from {low} to {high}, not {data!r}")
    return data


# Labels of 1-63 printable ASCII characters but dots and upper case: what the zone is built
# from is checked where it enters (labels, names); this only keeps out what can't be a name.
NAME_RE = re.compile(r"[!-\-/-@\[-~]{1,63}(\.[!-\-/-@\[-~]{1,63})*")


def _name(data: object, what: str) -> str:
    """A lower-case DNS name without the trailing dot."""
    if not isinstance(data, str) or len(data) > MAX_NAME or not NAME_RE.fullmatch(data):
        raise ValueError(f"{what} {data!r} is not a lower-case DNS name")
    return data
