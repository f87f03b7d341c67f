"""The conformance table: query -> RCODE, header flags, DO and section counts, asked of the
server over loopback UDP; the rows marked shared are asked of dnsmasq too, started here on
loopback with the same names in a hosts file and nowhere to forward (--no-resolv), to show
both agree where the behaviour is common ground.

dnsmasq adds no SOA to its local negative answers, so the authority count is compared with
ours only. docs/dns.md shows this table.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import EDNS0 as Edns0
from dnslib import OPCODE, QTYPE, RCODE, DNSRecord

from controlplane.core.dns_records import Zone
from controlplane.dns_answer import DO_BIT
from tests.support.dns_stub import (
    LOOPBACK,
    RunningDns,
    StubUpstream,
    running_dns,
    sample_zone,
    udp_ask,
)
from tests.support.ports import free_port

ZONE = sample_zone()
BADVERS_HIGH = 1  # RCODE 16 = this in the OPT record's extended RCODE, 0 in the header


@dataclass(frozen=True)
class Row:
    id: str
    name: str
    qtype: str = "A"
    rd: bool = True
    edns: bool = True
    do: bool = False
    version: int = 0
    opcode: int = OPCODE.QUERY
    qclass: str = "IN"
    # expected
    rcode: int = RCODE.NOERROR
    flags: str = "aa rd ra"
    answer: int = 0
    authority: int = 0
    additional: int = 0
    shared: bool = False
    """dnsmasq gives the same RCODE, flags, DO and answer/additional counts."""
    shown: str = ""
    """How docs/dns.md names the query, when not by its name and type."""

    def query(self, ident: int) -> bytes:
        request = DNSRecord.question(self.name, self.qtype, self.qclass)
        request.header.id = ident
        request.header.rd = int(self.rd)
        request.header.opcode = self.opcode
        if self.edns:
            flags = "do" if self.do else ""
            request.add_ar(Edns0(udp_len=1232, flags=flags, version=self.version))
        return bytes(request.pack())


OPCODES = {OPCODE.NOTIFY: "NOTIFY"}


def describe(row: Row) -> str:
    """The row as docs/dns.md's table shows it."""
    klass = "" if row.qclass == "IN" else f" {row.qclass}"
    text = row.shown or f"`{row.name} {row.qtype}{klass}`"
    text += "".join(
        f", {words}"
        for on, words in [
            (not row.edns, "no EDNS0"),
            (not row.rd, "RD clear"),
            (bool(row.version), f"EDNS version {row.version}"),
            (row.do, "DO"),
            (row.opcode != OPCODE.QUERY, f"opcode {OPCODES.get(row.opcode)}"),
        ]
        if on
    )
    rcode = "BADVERS" if row.version else RCODE.get(row.rcode)
    counts = f"{row.answer}/{row.authority}/{row.additional}"
    return f"| {text} | {rcode} | {row.flags} | {counts} | {'agrees' if row.shared else ''} |"


def private_reverse(id: str, name: str, shown: str = "") -> Row:
    """A private address no backend has (RFC 6303): NXDOMAIN with that zone's SOA, here as
    in dnsmasq."""
    return Row(
        id,
        name,
        "PTR",
        rcode=RCODE.NXDOMAIN,
        authority=1,
        additional=1,
        shared=True,
        shown=shown,
    )


ROWS = (
    Row("a", "web.internal", answer=3, additional=1, shared=True),
    Row("a-no-edns", "web.internal", edns=False, answer=3, shared=True),
    Row("a-no-rd", "web.internal", rd=False, flags="aa ra", answer=3, additional=1, shared=True),
    Row(
        "a-0x20-case",
        "WeB.InTeRnAl",
        answer=3,
        additional=1,
        shared=True,
        shown="`WeB.InTeRnAl A` (answered in that case)",
    ),
    Row("a-do", "web.internal", do=True, flags="aa rd ra do", answer=3, additional=1, shared=True),
    Row("aaaa", "web.internal", "AAAA", answer=1, additional=1, shared=True),
    Row("host-a", "w2.container.internal", answer=1, additional=1, shared=True),
    Row(
        "ptr-backend",
        "3.0.20.172.in-addr.arpa",
        "PTR",
        answer=1,
        additional=1,
        shared=True,
        shown="`3.0.20.172.in-addr.arpa PTR` (a backend)",
    ),
    private_reverse("ptr-rfc1918-10", "3.2.1.10.in-addr.arpa"),
    private_reverse("ptr-rfc1918-172", "9.9.20.172.in-addr.arpa"),
    private_reverse("ptr-rfc1918-192", "9.9.168.192.in-addr.arpa"),
    private_reverse(
        "ptr-ula",
        "9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa",
        shown="PTR of `fd00::9` (unique local)",
    ),
    private_reverse(
        "ptr-link-local",
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f.ip6.arpa",
        shown="PTR of `fe80::1` (link-local)",
    ),
    Row(
        "ptr-shared-space",
        "9.9.64.100.in-addr.arpa",
        "PTR",
        rcode=RCODE.NXDOMAIN,
        authority=1,
        additional=1,
        shown="PTR of `100.64.9.9` (shared space, RFC 7793: dnsmasq forwards it)",
    ),
    Row("rfc6303-apex-soa", "168.192.in-addr.arpa", "SOA", answer=1, additional=1),
    Row("nxdomain", "nope.internal", rcode=RCODE.NXDOMAIN, authority=1, additional=1),
    Row(
        "nodata",
        "idle.internal",
        authority=1,
        additional=1,
        shown="`idle.internal A` (no live backend)",
    ),
    Row("srv-with-glue", "_web._tcp.internal", "SRV", answer=3, additional=5),
    Row("soa", "internal", "SOA", answer=1, additional=1),
    Row(
        "big-a-no-edns",
        "big.internal",
        edns=False,
        answer=30,
        shown="`big.internal A` (90 backends)",
    ),
    Row("big-a-edns", "big.internal", answer=74, additional=1),  # and what fits 1232
    Row("big-srv", "_big._tcp.internal", "SRV", answer=18, additional=19),  # with their glue
    Row("big-any-truncated", "big.internal", "ANY", flags="aa tc rd ra", additional=1),
    Row("badvers", "web.internal", version=1, flags="rd ra", additional=1),
    Row("badvers-do", "web.internal", version=1, do=True, flags="rd ra do", additional=1),
    Row(
        "chaos-refused",
        "version.bind",
        "TXT",
        qclass="CH",
        rcode=RCODE.REFUSED,
        flags="rd ra",
        additional=1,
    ),
    Row(
        "notify-notimp",
        "web.internal",
        opcode=OPCODE.NOTIFY,
        rcode=RCODE.NOTIMP,
        flags="rd ra",
        additional=1,
    ),
)


@dataclass(frozen=True)
class Seen:
    rcode: int
    flags: str
    answer: int
    authority: int
    additional: int
    owners_echo_case: bool


def ask(port: int, row: Row, ident: int) -> Seen:
    data = row.query(ident)
    reply = DNSRecord.parse(udp_ask(port, data))
    header = reply.header
    opts = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    ext = opts[0].ttl >> 24 if opts else 0
    names = ("aa", "tc", "rd", "ra")
    flags = [n for n in names if getattr(header, n)]
    if opts and opts[0].ttl & DO_BIT:
        flags.append("do")
    asked = DNSRecord.parse(data).q.qname.label
    return Seen(
        rcode=(ext << 4) | header.rcode,
        flags=" ".join(flags),
        answer=len(reply.rr),
        authority=len(reply.auth),
        additional=len(reply.ar),
        owners_echo_case=all(rr.rname.label == asked for rr in reply.rr),
    )


def expected(row: Row) -> Seen:
    rcode = 16 if row.version else row.rcode
    return Seen(rcode, row.flags, row.answer, row.authority, row.additional, True)


@pytest.fixture(scope="module")
def ours() -> Iterator[RunningDns]:
    """With an upstream (a stub on loopback), as dnsmasq is: RA set, and private reverse
    names still answered here, never forwarded."""
    with StubUpstream() as stub, running_dns(ZONE, upstreams=[stub.endpoint]) as running:
        yield running
        assert stub.count == 0


def hosts_file(zone: Zone, path: Path) -> Path:
    """The zone's addresses as dnsmasq reads them: one line per (address, name)."""
    lines = [
        f"{record.value} {name}"
        for name, types in sorted(zone.records.items())
        for rtype in ("A", "AAAA")
        for record in types.get(rtype, ())
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """dnsmasq on a free loopback port, answering only from its hosts file."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(binary).exists():
        pytest.fail("dnsmasq is not installed: run scripts/install-system-deps as root")
    hosts = hosts_file(ZONE, tmp_path_factory.mktemp("dnsmasq") / "hosts")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={hosts}",
            f"--listen-address={LOOPBACK}",
            "--bind-interfaces",
            f"--port={port}",
            "--local=/internal/",
            "--bogus-priv",
            "--edns-packet-max=1232",
            "--pid-file=",
            f"--user={getpass.getuser()}",
            "--log-facility=-",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                udp_ask(port, Row("probe", "web.internal").query(1), timeout=0.2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    stderr = process.stderr.read() if process.stderr else b""
                    pytest.fail(f"dnsmasq did not start: {stderr.decode(errors='replace')}")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_conformance(ours: RunningDns, row: Row) -> None:
    assert ask(ours.port, row, 0x4A4A) == expected(row)


SHARED = [r for r in ROWS if r.shared]


@pytest.mark.parametrize("row", SHARED, ids=[r.id for r in SHARED])
def test_dnsmasq_agrees(ours: RunningDns, dnsmasq: int, row: Row) -> None:
    theirs = ask(dnsmasq, row, 0x5B5B)
    mine = ask(ours.port, row, 0x5B5B)
    assert (theirs.rcode, theirs.flags, theirs.answer, theirs.additional) == (
        mine.rcode,
        mine.flags,
        mine.answer,
        mine.additional,
    )
    assert theirs.owners_echo_case and mine.owners_echo_case


def test_docs_show_this_table() -> None:
    """docs/dns.md's conformance table is this one, row for row."""
    table = "\n".join(
        [
            "| query | RCODE | flags | an/ns/ar | dnsmasq |",
            "| --- | --- | --- | --- | --- |",
            *map(describe, ROWS),
        ]
    )
    doc = (Path(__file__).resolve().parents[2] / "docs" / "dns.md").read_text()
    assert table in doc, table
