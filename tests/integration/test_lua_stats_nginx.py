"""The Lua balancer's traffic figures (issue 17), end to end in the host's nginx: the rendered
dynamic config (templates/controlplane.conf.j2 with RenderOptions.stats) in front of stub
backends, a UDP socket in this process as the controller's listener on loopback, and every
datagram read by core.lua_stats.parse.

What the figures must say is worked out again here from nginx's own access log of the same
requests (each one's $upstream_* lists, $status and bytes, logged in the same log phase), by
the rules the Lua side documents: so the counts are checked exactly, per try.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.core.lua_stats import MAX_BYTES, parse
from controlplane.core.model import Topology
from controlplane.core.render import RenderOptions, StatsSink, render_config
from controlplane.core.traffic import (
    BYTES_RECEIVED,
    BYTES_SENT,
    CONNECT_ERRORS,
    COUNTS,
    VECTOR,
    Key,
    bucket,
)
from controlplane.templating import load_template
from tests.support.lab import wait_until
from tests.support.lua_nginx import MODULES, LuaNginx, Peer, service_json
from tests.support.ports import LOOPBACK, free_port

TRIES_FORMAT = (
    "$host|$status|$bytes_sent|$request_length|$upstream_addr|$upstream_status|"
    "$upstream_response_time|$upstream_connect_time"
)
WRAPPER = """\
load_module %(modules)s/ndk_http_module.so;
load_module %(modules)s/ngx_http_lua_module.so;
%(user)s
worker_processes 2;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log info;
events { worker_connections 1024; }
http {
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    log_format tries '%(format)s';
    access_log %(dir)s/access.log tries;
%(rendered)s
}
"""
"""The main nginx.conf around the rendered config, as a managed nginx's includes it, with
an access log of what each request tried."""
LUA_ERROR = re.compile(r"\[(?:error|crit|alert|emerg)\].*(?:lua|controlplane)|traffic figures")
Totals = dict[Key, list[int]]


class Listener:
    """The controller's side: a UDP socket on loopback that keeps every datagram."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((LOOPBACK, 0))
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]
        self.tag = secrets.token_hex(12)
        self.received: list[tuple[float, bytes]] = []

    def drain(self) -> list[tuple[float, bytes]]:
        """Every datagram so far, with when it was read."""
        while True:
            try:
                self.received.append((time.monotonic(), self.socket.recv(65536)))
            except BlockingIOError:
                return self.received

    def reports(self, since: float = 0.0) -> list[tuple[str, int, list[tuple[Key, list[int]]]]]:
        """(worker pid, seq, counts) of each datagram read after `since`; every one parses."""
        found = []
        for at, datagram in self.drain():
            assert len(datagram) <= MAX_BYTES, datagram
            report = parse(datagram, self.tag)
            assert report is not None, f"a datagram that does not parse: {datagram!r}"
            seq = int(datagram.split(b"\n", 1)[0].rsplit(b" ", 1)[1])
            if at > since:
                found.append((report[0], seq, report[1]))
        return found

    def totals(self) -> Totals:
        """Each key's counts summed over the workers, each worker's latest."""
        latest: dict[tuple[str, Key], tuple[int, list[int]]] = {}
        for pid, seq, entries in self.reports():
            for key, vector in entries:
                if (pid, key) not in latest or latest[pid, key][0] < seq:
                    latest[pid, key] = (seq, vector)
        summed: Totals = defaultdict(lambda: [0] * VECTOR)
        for (_, key), (_, vector) in latest.items():
            summed[key] = [a + b for a, b in zip(summed[key], vector, strict=True)]
        return dict(summed)

    def pids(self) -> set[str]:
        return {pid for pid, _, _ in self.reports()}

    def close(self) -> None:
        self.socket.close()


@dataclass
class Proxy:
    """nginx serving the rendered dynamic config on `nginx.port`, its backends in another."""

    nginx: LuaNginx
    backends: LuaNginx
    listener: Listener
    live: list[int]
    dead: int
    """A port nothing listens on: connects to it are refused."""
    services: set[str] = field(default_factory=set)
    sent: int = 0
    """Requests sent to the services (by get)."""

    @property
    def access_log(self) -> Path:
        return self.nginx.directory / "access.log"

    def render(self, stats: StatsSink | None) -> None:
        """Writes the config: the rendered one with `stats`, inside WRAPPER."""
        state = self.nginx.state
        options = RenderOptions(
            listen_port=self.nginx.port,
            dynamic=True,
            state_path=str(state.path),
            delta_path=str(state.delta_path),
            stats=stats,
        )
        rendered = render_config(Topology(), load_template(), options)
        self.nginx.config.write_text(
            WRAPPER
            % {
                "modules": MODULES,
                "user": "user root;" if os.geteuid() == 0 else "",
                "dir": self.nginx.directory,
                "format": TRIES_FORMAT,
                "rendered": rendered,
            },
            encoding="utf-8",
        )

    def sink(self) -> StatsSink:
        return StatsSink(LOOPBACK, self.listener.port, self.listener.tag)

    def put(self, **services: str) -> None:
        self.services.update(services)
        self.nginx.put(**services)

    def get(self, service: str, path: str = "/") -> int:
        self.sent += 1
        return self.nginx.get(service, path).status

    def logged(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(encoding="utf-8").splitlines()

    def expected(self) -> Totals:
        """What the figures must be, from the access log (see expected_from), once it has
        every request sent (a client may read its answer before nginx logs it)."""
        wait_until(
            lambda: (
                sum(line.split("|", 1)[0] in self.services for line in self.logged()) >= self.sent
            ),
            timeout=5,
            what=f"{self.sent} requests logged",
        )
        return expected_from(self.logged(), self.services)

    def settled(self, timeout: float = 8.0) -> Totals:
        """Until the figures the workers sent match the access log (they send every second);
        then both, compared in full so a failure shows the difference."""
        expected = self.expected()
        try:
            wait_until(lambda: self.listener.totals() == expected, timeout=timeout)
        except AssertionError:
            assert self.listener.totals() == expected
        return expected

    def lua_errors(self) -> list[str]:
        return [line for line in self.nginx.error_log().splitlines() if LUA_ERROR.search(line)]


def expected_from(lines: list[str], services: set[str]) -> Totals:
    """The counts, by the rules the Lua side documents (templates/lua/controlplane.lua,
    "Traffic figures"): per try at its peer by its status, or as a connect error (a 502 or
    504 with no connect time), its response time bucketed when it answered; per request at
    its service by $status with the last try's time when it answered; bytes at the service
    and at the peer that answered. Requests for hosts that are no service are not counted."""
    totals: Totals = defaultdict(lambda: [0] * VECTOR)
    for line in lines:
        host, status, sent, received, addrs, codes, times, connects = line.split("|")
        if host not in services:
            continue
        answered: str | None = None
        refused = False
        rtt: float | None = None
        tries = zip(
            addrs.split(", "), codes.split(", "), times.split(", "), connects.split(", "),
            strict=True,
        )  # fmt: skip
        for addr, code, time_, connect in tries:
            if addr == "-":
                continue
            counts = totals[Key(host, addr)]
            answered, refused, rtt = None, False, None
            if code in ("502", "504") and connect == "-":
                counts[CONNECT_ERRORS] += 1
                refused = True
            elif code != "-":
                counts[int(code) // 100 - 1] += 1
                answered = addr
                if time_ != "-":
                    rtt = float(time_)
                    counts[COUNTS + bucket(rtt)] += 1
        service = totals[Key(host, "")]
        service[int(status) // 100 - 1] += 1
        service[CONNECT_ERRORS] += int(refused)
        if answered is not None and rtt is not None:
            service[COUNTS + bucket(rtt)] += 1
        for key in [Key(host, "")] + ([Key(host, answered)] if answered else []):
            totals[key][BYTES_SENT] += int(sent)
            totals[key][BYTES_RECEIVED] += int(received)
    return dict(totals)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    live = [free_port(), free_port()]
    (tmp_path / "backends").mkdir()
    (tmp_path / "proxy").mkdir()
    backends = LuaNginx(tmp_path / "backends", live, workers=1)
    listener = Listener()
    made = Proxy(LuaNginx(tmp_path / "proxy", []), backends, listener, live, free_port())
    made.render(made.sink())
    try:
        backends.start()
        made.nginx.start()
        yield made
    finally:
        made.nginx.stop()
        backends.stop()
        listener.close()


def put_mix(proxy: Proxy, extra: int = 0) -> None:
    """Services that give every kind of try: two backends, a refused one beside a live one
    (never ejected, so it is tried again and again), one whose every backend is down (503
    from the balancer itself), one backend alone, a refused one alone (the client gets
    nginx's 502), and `extra` more with one backend each."""
    a, b = proxy.live
    proxy.put(
        web=service_json("round_robin", [Peer(a), Peer(b)]),
        flaky=service_json("round_robin", [Peer(proxy.dead, max_fails=0), Peer(a)]),
        gone=service_json("round_robin", [Peer(a, down=True)]),
        slow=service_json("round_robin", [Peer(b)]),
        unreachable=service_json("round_robin", [Peer(proxy.dead, max_fails=0)]),
        **{f"s{i:02}": service_json("round_robin", [Peer(a)]) for i in range(extra)},
    )


def test_every_try_and_request_is_counted_exactly_and_sent_per_worker(proxy: Proxy) -> None:
    a, b = proxy.live
    put_mix(proxy, extra=20)
    statuses: dict[str, list[int]] = defaultdict(list)
    for i in range(300):
        if i % 10 == 0:
            service, path = "web", f"/?fail={a}"  # a answers 502, then b is tried
        elif i % 10 == 1:
            service, path = "flaky", "/"
        elif i % 25 == 2:
            service, path = "gone", "/"
        elif i % 25 == 3:
            service, path = "slow", f"/?slow={b}&ms=150"
        elif i % 25 == 9:
            service, path = "unreachable", "/"
        elif i % 10 in (4, 5):
            service, path = f"s{i % 20:02}", "/"
        else:
            service, path = "web", "/" if i % 7 else "/?fail=all"
        statuses[service].append(proxy.get(service, path))
    expected = proxy.settled()

    flaky_dead = expected[Key("flaky", f"{LOOPBACK}:{proxy.dead}")]
    assert flaky_dead[CONNECT_ERRORS] > 0 and sum(flaky_dead[:CONNECT_ERRORS]) == 0
    assert expected[Key("gone", "")][4] == statuses["gone"].count(503) > 0
    unreachable = expected[Key("unreachable", "")]
    assert unreachable[4] == unreachable[CONNECT_ERRORS] == statuses["unreachable"].count(502)
    assert sum(unreachable[COUNTS:]) == 0, "no answer, no response time"
    assert Key("gone", f"{LOOPBACK}:{a}") not in expected
    assert expected[Key("web", f"{LOOPBACK}:{a}")][4] > 0, "the ?fail= tries at a are 5xx"
    slow = expected[Key("slow", f"{LOOPBACK}:{b}")][COUNTS:]
    assert sum(slow[bucket(0.15) :]) == len(statuses["slow"]), "150 ms or more, bucketed"
    web = expected[Key("web", "")]
    assert sum(web[:CONNECT_ERRORS]) == len(statuses["web"])
    assert web[4] == statuses["web"].count(502) > 0
    assert len(proxy.listener.pids()) == 2, "both workers send"
    assert split_sends(proxy.listener), "a send too big for one datagram is split"
    assert proxy.lua_errors() == []


def split_sends(listener: Listener) -> int:
    """How many sends took more than one datagram: a worker's datagrams of one send follow
    each other at once (consecutive seq), its sends are a second apart."""
    last: dict[bytes, tuple[int, float]] = {}
    split = 0
    for at, datagram in listener.drain():
        _, _, _, pid, seq = datagram.split(b"\n", 1)[0].split(b" ")
        before = last.get(pid)
        if before is not None and before[0] + 1 == int(seq) and at - before[1] < 0.2:
            split += 1
        last[pid] = (int(seq), at)
    return split


def test_a_reload_sends_the_old_workers_last_counts(proxy: Proxy) -> None:
    put_mix(proxy)
    for i in range(60):
        proxy.get("flaky" if i % 2 else "web")
    proxy.settled()
    old = proxy.listener.pids()
    keys_of = {
        pid: {key for p, _, entries in proxy.listener.reports() if p == pid for key, _ in entries}
        for pid in old
    }
    for _ in range(40):  # flaky's keys stay as they were: only a full send has them again
        proxy.get("web")
    hup = time.monotonic()
    proxy.nginx.reload()
    wait_until(
        lambda: old <= {pid for pid, _, _ in proxy.listener.reports(since=hup)},
        timeout=10,
        what="a datagram from each old worker after the reload",
    )
    wait_until(lambda: not any(worker_alive(pid) for pid in old), timeout=10, what="old gone")
    proxy.settled()
    for pid in old:
        last = {key for p, _, entries in proxy.listener.reports(since=hup) if p == pid
                for key, _ in entries}  # fmt: skip
        assert keys_of[pid] <= last, f"worker {pid}'s last send has every key it had"
    proxy.get("web")
    wait_until(lambda: proxy.listener.pids() - old, timeout=5, what="the new workers send")
    proxy.settled()
    assert proxy.lua_errors() == []


def worker_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return True


def test_without_stats_nothing_is_counted_or_sent(proxy: Proxy) -> None:
    """The same nginx, its config rendered again without a stats sink and reloaded: the new
    workers send nothing to where the old ones sent."""
    put_mix(proxy)
    proxy.get("web")
    wait_until(proxy.listener.pids, timeout=5, what="a first send")
    proxy.render(None)
    since = proxy.nginx.log_size()
    hup = time.monotonic()
    proxy.nginx.reload()
    started = wait_until(
        lambda: set(re.findall(r"start worker process (\d+)", proxy.nginx.error_log(since))),
        timeout=5,
        what="new workers",
    )
    for i in range(100):
        assert proxy.get("flaky" if i % 2 else "web") == 200
    time.sleep(2.5)  # two seconds of sends, were there any
    assert not started & {pid for pid, _, _ in proxy.listener.reports(since=hup)}
    assert proxy.lua_errors() == []


def test_a_bad_stats_argument_is_said_and_routing_goes_on(proxy: Proxy) -> None:
    text = proxy.nginx.config.read_text(encoding="utf-8")
    proxy.nginx.config.write_text(text.replace(proxy.listener.tag, "short"), encoding="utf-8")
    since = proxy.nginx.log_size()
    proxy.nginx.reload()
    wait_until(
        lambda: "stats.tag must be 16-32 letters and digits" in proxy.nginx.error_log(since),
        timeout=5,
        what="the configure error",
    )
    put_mix(proxy)
    assert proxy.get("web") == 200
