"""The dynamic data plane's Lua balancer (templates/lua/controlplane.lua) in the host's nginx
with lua-nginx-module, embedded as the rendered config embeds it, judged by real HTTP requests:
each method routes as nginx's own would (hash and ip_hash side by side with native upstreams),
retries and passive failures, draining, bad data kept to its service, and state changes taking
effect without a reload in every worker, written as a base or as a delta over it.

One nginx, its config shaped as the rendered one (one server; the Host header picks the
service), serves the whole module; each test uses services of its own, so balancer state
(counts, EWMA, ejections: keyed by service and address) never crosses tests.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.lab import wait_until
from tests.support.lua_nginx import (
    BAD_DATA,
    NO_LIVE,
    NO_SERVICE,
    LuaNginx,
    Peer,
    Reply,
    service_json,
    state_line,
)
from tests.support.ports import free_port


@dataclass(frozen=True)
class Setup:
    nginx: LuaNginx
    ports: list[int]
    dead: list[int]
    """Ports nothing listens on: connections to them are refused."""


def weighted(ports: list[int]) -> list[Peer]:
    """Three peers, the second of weight 2, as both a Lua service and a native upstream."""
    return [Peer(ports[0]), Peer(ports[1], weight=2), Peer(ports[2])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    ports = [free_port() for _ in range(5)]
    peers = weighted(ports)
    down = [peers[0], Peer(ports[1], weight=2, down=True), peers[2]]
    native = {
        "iph": ("ip_hash", peers),
        "hash": ("hash $arg_u", peers),
        "hash-down": ("hash $arg_u", down),
        "chash": ("hash $arg_u consistent", peers),
    }
    nginx = LuaNginx(tmp_path_factory.mktemp("lua"), ports, native)
    nginx.start()
    try:
        yield Setup(nginx, ports, [free_port(), free_port()])
    finally:
        nginx.stop()


def put(setup: Setup, **services: str) -> None:
    setup.nginx.put(**services)


def bodies(setup: Setup, service: str, count: int, path: str = "/") -> Counter[str]:
    """Which backends `count` requests (fresh connections, so both workers) reached."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        reply = setup.nginx.get(service, path)
        assert reply.status == 200, reply
        seen[reply.body] += 1
    return seen


def bodies_in_turn(setup: Setup, service: str, count: int) -> Counter[str]:
    """As bodies, on one keep-alive connection: its worker ends each request (the log
    phase, where its count drops) before it reads the next, so counts are exact. On fresh
    connections the other worker may pick while the last one's count is still up."""
    seen: Counter[str] = Counter()
    connection = setup.nginx.connection()
    try:
        for _ in range(count):
            reply = setup.nginx.get(service, connection=connection)
            assert reply.status == 200, reply
            seen[reply.body] += 1
    finally:
        connection.close()
    return seen


class Holder:
    """A request held on one backend: slow requests (slow only on `port`) are sent until one
    lands there, which then stays in flight for `ms`."""

    def __init__(self, setup: Setup, service: str, port: int, ms: int = 1200) -> None:
        self.setup, self.service, self.port, self.ms = setup, service, port, ms
        self.started = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_until(self._held, timeout=5, what=f"a request held on {port}")

    def _run(self) -> None:
        try:
            for _ in range(50):
                self.started = time.monotonic()
                reply = self.setup.nginx.get(self.service, f"/?slow={self.port}&ms={self.ms}")
                if reply.body == str(self.port):
                    return
        except (OSError, http.client.HTTPException):
            pass  # nginx stopped under it: the test failed before join, and says why
        finally:
            self.done.set()

    def _held(self) -> bool:
        if self.done.is_set():
            raise AssertionError(f"no request was held on {self.port}")
        return self.started > 0 and time.monotonic() - self.started > 0.2

    def join(self) -> None:
        self.thread.join(timeout=self.ms / 1000 + 5)


def test_round_robin_spreads_by_weight(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, rr=service_json("round_robin", [Peer(a), Peer(b, weight=3)]))
    seen: Counter[str] = Counter()
    connections = [setup.nginx.connection() for _ in range(4)]
    try:
        for i in range(400):
            seen[setup.nginx.get("rr", connection=connections[i % 4]).body] += 1
    finally:
        for c in connections:
            c.close()
    assert 90 <= seen[str(a)] <= 110, seen
    assert seen[str(a)] + seen[str(b)] == 400, seen


def test_least_conn_prefers_the_idle_backend_and_counts_survive_a_change(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, lc=service_json("least_conn", [Peer(a), Peer(b)]))
    holder = Holder(setup, "lc", a)
    assert bodies_in_turn(setup, "lc", 20) == {str(b): 20}
    # a weight change keeps the peer: the request held on it is still counted (1/2 > 0/1;
    # counts lost would make it 0/2, a tie, and round robin would send it 2 in 3)
    put(setup, lc=service_json("least_conn", [Peer(a, weight=2), Peer(b)]))
    assert bodies_in_turn(setup, "lc", 20) == {str(b): 20}
    holder.join()


def test_ip_hash_sticks_like_nginx_and_moves_when_the_backend_goes(setup: Setup) -> None:
    peers = weighted(setup.ports)
    put(setup, iph=service_json("ip_hash", peers))
    seen = bodies(setup, "iph", 20)
    assert len(seen) == 1, seen
    (chosen,) = seen
    native = bodies(setup, "native-iph", 5)
    assert native == {chosen: 5}, "nginx's own ip_hash picks another backend"
    drained = [Peer(p.port, p.weight, down=str(p.port) == chosen) for p in peers]
    put(setup, iph=service_json("ip_hash", drained))
    moved = bodies(setup, "iph", 20)
    assert len(moved) == 1 and chosen not in moved, moved
    # removed, not drained: the weights change, so the key may land elsewhere, but still
    # on one backend
    put(setup, iph=service_json("ip_hash", [p for p in peers if str(p.port) != chosen]))
    removed = bodies(setup, "iph", 20)
    assert len(removed) == 1 and chosen not in removed, removed


@pytest.mark.parametrize("service", ["hash", "hash-down", "chash"])
def test_hash_routes_every_key_as_nginx_does(setup: Setup, service: str) -> None:
    peers = weighted(setup.ports)
    if service == "hash-down":
        peers[1] = Peer(peers[1].port, weight=2, down=True)
    put(
        setup,
        **{service: service_json("hash", peers, key="$arg_u", consistent=service == "chash")},
    )
    lua, native = setup.nginx.connection(), setup.nginx.connection()
    try:
        ours = {u: setup.nginx.get(service, f"/?u=k{u}", lua).body for u in range(150)}
        theirs = {u: setup.nginx.get(f"native-{service}", f"/?u=k{u}", native).body for u in ours}
    finally:
        lua.close()
        native.close()
    assert ours == theirs
    assert len(set(ours.values())) == (2 if service == "hash-down" else 3)
    again = {u: setup.nginx.get(service, f"/?u=k{u}").body for u in range(0, 150, 10)}
    assert again == {u: ours[u] for u in again}, "a key changed backend on another connection"


def test_consistent_hash_moves_few_keys_and_keeps_draining_peers_in_the_ring(
    setup: Setup,
) -> None:
    a, b, c, d = (Peer(p) for p in setup.ports[:4])

    def routes() -> dict[int, str]:
        conn = setup.nginx.connection()
        try:
            return {u: setup.nginx.get("chash4", f"/?u=user{u}", conn).body for u in range(200)}
        finally:
            conn.close()

    def chash(*peers: Peer) -> str:
        return service_json("hash", peers, key="$arg_u", consistent=True)

    put(setup, chash4=chash(a, b, c))
    before = routes()
    put(setup, chash4=chash(a, b, c, d))
    after = routes()
    moved = [u for u in before if before[u] != after[u]]
    assert len(moved) <= 200 * (1 / 4 + 0.10), f"{len(moved)} of 200 keys moved"
    assert {after[u] for u in moved} == {str(d.port)}, "a key moved between the old peers"
    put(setup, chash4=chash(a, Peer(b.port, down=True), c, d))
    drained = routes()
    for u in before:
        if after[u] != str(b.port):
            assert drained[u] == after[u], f"key {u} left {after[u]} when {b.port} drained"
        else:
            assert drained[u] != str(b.port)


def test_random_spreads_and_random_two_prefers_the_idle_backend(setup: Setup) -> None:
    a, b, c = setup.ports[:3]
    put(setup, rand=service_json("random", [Peer(a), Peer(b), Peer(c)]))
    seen = bodies(setup, "rand", 300)
    assert all(seen[str(p)] >= 60 for p in (a, b, c)), seen
    put(setup, rand2=service_json("random", [Peer(a), Peer(b)], two=True))
    spread = bodies(setup, "rand2", 200)
    assert all(spread[str(p)] >= 50 for p in (a, b)), spread
    holder = Holder(setup, "rand2", a)
    assert bodies_in_turn(setup, "rand2", 20) == {str(b): 20}
    holder.join()


def test_least_time_steers_away_from_a_slow_backend_and_keeps_it_across_a_change(
    setup: Setup,
) -> None:
    a, b, c = setup.ports[:3]
    # far slower than a hiccup of this shared machine: one slow first sample stays in a fast
    # peer's EWMA for seconds
    slow = f"/?slow={a}&ms=250"
    put(setup, lt=service_json("least_time", [Peer(a), Peer(b), Peer(c)]))
    bodies(setup, "lt", 30, slow)  # warm-up: every peer gets a response time
    seen = bodies(setup, "lt", 60, slow)
    assert seen[str(a)] <= 6, seen
    # a weight change keeps the peer: its EWMA too (a new peer would start at the mean of
    # the fast ones' and get work until it learned)
    put(setup, lt=service_json("least_time", [Peer(a, weight=2), Peer(b), Peer(c)]))
    after = bodies(setup, "lt", 30, slow)
    assert after[str(a)] <= 3, after


def upstreams(reply: Reply) -> list[str]:
    return [u.strip() for u in reply.upstream.split(",")]


def test_a_refused_backend_is_retried_elsewhere_ejected_and_tried_again_later(
    setup: Setup,
) -> None:
    a, b = setup.ports[:2]
    dead = f"127.0.0.1:{setup.dead[0]}"
    put(
        setup,
        retry=service_json(
            "round_robin",
            [Peer(a, fail_timeout=1), Peer(b, fail_timeout=1), Peer(setup.dead[0], fail_timeout=1)],
        ),
    )
    replies = [setup.nginx.get("retry") for _ in range(30)]
    assert all(r.status == 200 for r in replies), replies
    tried_dead = [r for r in replies if dead in upstreams(r)]
    assert len(tried_dead) == 1, [r.upstream for r in replies]
    assert upstreams(tried_dead[0])[0] == dead, "the retry did not go to another backend"
    time.sleep(1.2)  # fail_timeout: the ejection is over, the backend gets one more try
    later = [setup.nginx.get("retry") for _ in range(10)]
    assert all(r.status == 200 for r in later), later
    assert sum(dead in upstreams(r) for r in later) == 1, [r.upstream for r in later]


def test_when_every_backend_is_ejected_they_are_all_tried_again(setup: Setup) -> None:
    put(setup, ejected=service_json("round_robin", [Peer(p) for p in setup.dead]))
    dead = {f"127.0.0.1:{p}" for p in setup.dead}
    since = setup.nginx.log_size()
    first = setup.nginx.get("ejected")
    assert first.status == 502 and set(upstreams(first)) == dead, first
    # the first try's failure is seen at the retry, the last one's in the log phase
    # just joined: out for 1 s, not the whole fail_timeout (it may not listen yet)
    wanted = [f"service ejected: 127.0.0.1:{p} (stub-{p}) ejected for 1 s" for p in setup.dead]
    wait_until(
        lambda: all(w in setup.nginx.error_log(since) for w in wanted), timeout=5, what=str(wanted)
    )
    again = setup.nginx.get("ejected")  # both ejected now: nginx would try them anyway
    assert again.status == 502 and set(upstreams(again)) == dead, again


def test_an_ipv6_peer_is_given_to_nginx_in_brackets(setup: Setup) -> None:
    a = setup.ports[0]
    v6 = Peer(setup.dead[0], host="::1")
    put(setup, ipv6=service_json("round_robin", [v6, Peer(a)]))
    replies = [setup.nginx.get("ipv6") for _ in range(4)]
    assert all(r.status == 200 and r.body == str(a) for r in replies), replies
    assert any(v6.addr in upstreams(r) for r in replies), [r.upstream for r in replies]


def test_a_backend_answering_502_is_ejected_after_max_fails(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(
        setup,
        retry502=service_json("round_robin", [Peer(a), Peer(b, max_fails=2, fail_timeout=5)]),
    )
    replies = [setup.nginx.get("retry502", f"/?fail={b}") for _ in range(20)]
    assert all(r.status == 200 and r.body == str(a) for r in replies), replies
    assert sum(f"127.0.0.1:{b}" in upstreams(r) for r in replies) == 2


def test_a_draining_backend_gets_nothing_and_all_draining_is_503(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, drain=service_json("round_robin", [Peer(a), Peer(b, down=True)]))
    assert bodies(setup, "drain", 30) == {str(a): 30}
    put(setup, drain=service_json("round_robin", [Peer(a, down=True), Peer(b, down=True)]))
    reply = setup.nginx.get("drain")
    assert (reply.status, reply.body) == (503, NO_LIVE.format("drain"))
    assert reply.content_type == "text/plain"


def test_backup_only_when_the_primary_is_gone(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, backup=service_json("least_time", [Peer(a), Peer(b, backup=True)]))
    assert bodies(setup, "backup", 20) == {str(a): 20}
    put(setup, backup=service_json("least_time", [Peer(a, down=True), Peer(b, backup=True)]))
    assert bodies(setup, "backup", 10) == {str(b): 10}


def test_max_conns_skips_a_full_backend(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, mc=service_json("round_robin", [Peer(a, max_conns=1), Peer(b)]))
    holder = Holder(setup, "mc", a)
    assert bodies_in_turn(setup, "mc", 10) == {str(b): 10}
    # every live peer full: nginx's own answer for no live upstream
    put(setup, mc=service_json("round_robin", [Peer(a, max_conns=1)]))
    assert setup.nginx.get("mc").status == 502
    holder.join()
    # a count is released in the log phase, which nginx runs after the reply's last byte
    # went out: the client may ask again a moment before that, so the held request's is
    # awaited, and the requests after it go on one connection (its worker ends each one
    # before it reads the next)
    connection = setup.nginx.connection()
    try:
        wait_until(
            lambda: setup.nginx.get("mc", connection=connection).status == 200,
            timeout=2,
            what="the held request's count released",
        )
        after = [setup.nginx.get("mc", connection=connection).body for _ in range(4)]
    finally:
        connection.close()
    assert after == [str(a)] * 4, "the held request's count was not released"


def peer_json(port: int, /, **changes: object) -> dict[str, object]:
    return {**Peer(port).as_json(), **changes}


def service(method: str = "round_robin", **fields: object) -> dict[str, object]:
    return {"method": method, "key": None, "consistent": False, "two": False, **fields}


BAD = {
    "not json": None,
    "unknown method": service("fastest", peers=[]),
    "host not an ip": service(peers=[peer_json(1, host="example.com", addr="example.com:1")]),
    "ipv4 out of range": service(peers=[peer_json(1, host="10.0.0.256", addr="10.0.0.256:1")]),
    "port 0": service(peers=[peer_json(0, port=0, addr="127.0.0.1:0")]),
    "port as text": service(peers=[peer_json(80, port="80")]),
    "weight 0": service(peers=[peer_json(80, weight=0)]),
    "fractional weight": service(peers=[peer_json(80, weight=1.5)]),
    "negative max_fails": service(peers=[peer_json(80, max_fails=-1)]),
    "addr not host:port": service(peers=[peer_json(80, addr="127.0.0.1:81")]),
    "unknown peer field": service(peers=[peer_json(80, colour="red")]),
    "unknown field": service(peers=[], extra=1),
    "duplicate peer": service(peers=[peer_json(80), peer_json(80)]),
    "peers an object": service(peers={"a": peer_json(80)}),
    "backup with hash": service(
        "hash", key="$arg_u", peers=[peer_json(80), peer_json(81, backup=True)]
    ),
    "hash without key": service("hash", peers=[peer_json(80)]),
    "hash key with a space": service("hash", key="$arg_u x", peers=[peer_json(80)]),
    "key with round robin": service(key="$arg_u", peers=[peer_json(80)]),
    "consistent with random": service("random", consistent=True, peers=[peer_json(80)]),
    "down not a boolean": service(peers=[peer_json(80, down="no")]),
}


@pytest.mark.parametrize("why", BAD)
def test_bad_service_data_is_503_for_that_service_only(setup: Setup, why: str) -> None:
    body = BAD[why]
    text = '{"method": "round_robin", "peers": [' if body is None else json.dumps(body)
    a = setup.ports[0]
    since = setup.nginx.log_size()
    put(setup, bad=text, good=service_json("round_robin", [Peer(a)]))
    reply = setup.nginx.get("bad")
    assert (reply.status, reply.body, reply.content_type) == (
        503,
        BAD_DATA.format("bad"),
        "text/plain",
    )
    assert "controlplane: service bad (rev " in setup.nginx.error_log(since)
    assert bodies(setup, "good", 4) == {str(a): 4}


def test_an_unknown_host_is_404_and_others_keep_working(setup: Setup) -> None:
    a = setup.ports[0]
    put(setup, good=service_json("round_robin", [Peer(a)]))
    reply = setup.nginx.get("ghost")
    assert (reply.status, reply.body, reply.content_type) == (
        404,
        NO_SERVICE.format("ghost"),
        "text/plain",
    )
    assert bodies(setup, "good", 4) == {str(a): 4}


@pytest.mark.parametrize(
    ("why", "logged"),
    [
        ("torn", "a torn write"),
        ("cut last line", "its last line is cut"),
        ("bad header", "is not `controlplane-state 3"),
        ("bad name", "is not a service name"),
        ("bad rev", "is not 16 lowercase hex digits"),
        ("bad host", "is not a host name"),
        ("twice", "is listed twice"),
    ],
)
def test_a_bad_state_file_changes_nothing(setup: Setup, why: str, logged: str) -> None:
    a, b = setup.ports[:2]
    put(setup, loader=service_json("round_robin", [Peer(a)]))
    state = setup.nginx.state
    version = state.version + 1
    body = service_json("round_robin", [Peer(b)])
    line = f"loader\t{'0' * 16}\tloader\t{body}"
    text = {
        "torn": f"controlplane-state 3 {version} 3\n{line}\n",
        "cut last line": f"controlplane-state 3 {version} 1\n{line[:-3]}",
        "bad header": f"controlplane-state 1 {version} 1\n{line}\n",
        "bad name": f"controlplane-state 3 {version} 1\nLoader{line[6:]}\n",
        "bad rev": f"controlplane-state 3 {version} 1\nloader\tABC\tloader\t{body}\n",
        "bad host": f"controlplane-state 3 {version} 1\nloader\t{'0' * 16}\ta*b\t{body}\n",
        "twice": f"controlplane-state 3 {version} 2\n{line}\n{line}\n",
    }[why]
    since = setup.nginx.log_size()
    state.write_raw(text)
    wait_until(lambda: logged in setup.nginx.error_log(since), timeout=5, what=logged)
    assert bodies(setup, "loader", 10) == {str(a): 10}
    state.version, state.base = version, None  # the next good base comes after the bad one
    put(setup, loader=service_json("round_robin", [Peer(b)]))
    assert bodies(setup, "loader", 4) == {str(b): 4}


def test_a_state_change_takes_effect_without_a_reload(setup: Setup) -> None:
    a, b, c = setup.ports[:3]
    since = setup.nginx.log_size()
    put(setup, change=service_json("round_robin", [Peer(a), Peer(b)]))
    renamed = setup.nginx.state.put(change=service_json("round_robin", [Peer(a), Peer(b), Peer(c)]))
    deadline = renamed + 2
    while setup.nginx.get("change").body != str(c):
        assert time.monotonic() < deadline, "the new backend got no request in 2 s"
    took = time.monotonic() - renamed
    print(
        f"\nrename of the state file to the first request on the new backend: {took * 1000:.1f} ms"
    )
    assert took < 0.5
    put(setup, change=service_json("round_robin", [Peer(a), Peer(c)]))
    assert set(bodies(setup, "change", 30)) == {str(a), str(c)}
    put(setup, change=service_json("hash", [Peer(a), Peer(b), Peer(c)], key="$arg_u"))
    for u in range(5):
        assert len(bodies(setup, "change", 5, f"/?u={u}")) == 1
    setup.nginx.remove("change")
    reply = setup.nginx.get("change")
    assert (reply.status, reply.body) == (404, NO_SERVICE.format("change"))
    assert "reconfiguring" not in setup.nginx.error_log(since)


def test_every_worker_uses_the_new_state_and_a_lower_version_applies(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, workers=service_json("round_robin", [Peer(a)]))
    assert bodies(setup, "workers", 5) == {str(a): 5}
    put(setup, workers=service_json("round_robin", [Peer(b)]))
    replies = [setup.nginx.get("workers") for _ in range(50)]
    assert {r.body for r in replies} == {str(b)}
    assert len({r.worker for r in replies}) == 2, "the requests did not reach both workers"
    # a restarted controller starts again from a lower version: different is enough
    setup.nginx.state.version, setup.nginx.state.base = 0, None
    put(setup, workers=service_json("round_robin", [Peer(a)]))
    assert bodies(setup, "workers", 10) == {str(a): 10}


def test_after_a_reload_the_new_workers_route_and_the_new_worker_0_loads(setup: Setup) -> None:
    a, b = setup.ports[:2]
    put(setup, reload=service_json("round_robin", [Peer(a)]))
    old_workers = {setup.nginx.get("reload").worker for _ in range(10)}
    setup.nginx.reload()
    wait_until(
        lambda: setup.nginx.get("reload").worker not in old_workers,
        timeout=10,
        what="a request served by a new worker",
    )
    # the shared dict outlives the reload: no state write needed to route
    assert bodies(setup, "reload", 10) == {str(a): 10}
    put(setup, reload=service_json("round_robin", [Peer(b)]))
    assert bodies(setup, "reload", 10) == {str(b): 10}


# Deltas: the base and the cumulative delta over it, services reached by host name as the
# rendered config's one server routes them ------------------------------------------------


def served(setup: Setup, host: str, count: int = 4) -> set[str]:
    """What `count` requests with this Host got: the backends' ports, or the status."""
    seen = set()
    for _ in range(count):
        reply = setup.nginx.get(host)
        seen.add(reply.body if reply.status == 200 else str(reply.status))
    return seen


def one(port: int) -> str:
    return service_json("round_robin", [Peer(port)])


def test_a_delta_adds_changes_removes_and_moves_a_host(setup: Setup) -> None:
    a, b, c = setup.ports[:3]
    nginx = setup.nginx
    nginx.put(
        {"d-a": "a.delta.test", "d-b": "b.delta.test move.delta.test", "d-c": "c.delta.test"},
        **{"d-a": one(a), "d-b": one(b), "d-c": one(c)},
    )
    assert served(setup, "move.delta.test") == {str(b)}
    since = nginx.log_size()
    nginx.state.stage(
        {"d-a": "a.delta.test move.delta.test", "d-b": "b.delta.test", "d-n": "n.delta.test"},
        "d-c",
        **{"d-a": one(c), "d-n": one(a)},
    )
    nginx.write()
    assert nginx.state.base is not None and nginx.state.version > nginx.state.base
    assert f"applied over base {nginx.state.base}: 2 changed, 1 removed" in nginx.error_log(since)
    assert served(setup, "a.delta.test") == {str(c)}
    assert served(setup, "move.delta.test") == {str(c)}, "the host did not move to d-a"
    assert served(setup, "b.delta.test") == {str(b)}
    assert served(setup, "n.delta.test") == {str(a)}
    assert served(setup, "c.delta.test") == {"404"}
    # the next delta lists them all again (cumulative): nothing changes twice
    since = nginx.log_size()
    nginx.put(**{"d-b": one(a)})
    assert "1 changed, 0 removed of 5 listed" in nginx.error_log(since)
    assert served(setup, "b.delta.test") == {str(a)}
    assert served(setup, "c.delta.test") == {"404"}


def test_a_delta_over_another_base_waits_for_that_base(setup: Setup) -> None:
    a, b = setup.ports[:2]
    nginx, state = setup.nginx, setup.nginx.state
    nginx.put({"d-wait": "wait.delta.test"}, **{"d-wait": one(a)})
    base, delta = state.version + 1, state.version + 2
    line = state_line("d-wait", one(b), "wait.delta.test")
    since = nginx.log_size()
    state.write_raw(f"controlplane-delta 3 {base} {delta} 1\n{line}\n", delta=True)
    time.sleep(0.1)  # 20 polls
    assert served(setup, "wait.delta.test") == {str(a)}
    assert f"version {delta}" not in nginx.error_log(since), "a delta over another base is news"
    nginx.write(base=True)  # its base arrives: the base, then the delta over it
    wanted = f"state version {delta} applied over base {base}"
    wait_until(lambda: wanted in nginx.error_log(since), timeout=5, what=wanted)
    assert served(setup, "wait.delta.test") == {str(b)}
    state.version = delta  # what the nginx has: the base and that delta
    state.stage(None, **{"d-wait": one(b)})


@pytest.mark.parametrize(
    ("why", "logged"),
    [
        ("torn", "a torn write"),
        ("cut last line", "its last line is cut"),
        ("not after its base", "with a version after its base's"),
        ("bad name", "is not a service name"),
        ("bad rev", "is not 16 lowercase hex digits"),
        ("bad line", "nor a removed service's name"),
        ("twice", "is listed twice"),
    ],
)
def test_a_bad_delta_is_refused_whole_and_the_state_kept(
    setup: Setup, why: str, logged: str
) -> None:
    a, b = setup.ports[:2]
    nginx, state = setup.nginx, setup.nginx.state
    nginx.put({"d-bad": "bad.delta.test"}, **{"d-bad": one(a)})
    base, version = state.base, state.version + 1
    changed = state_line("d-bad", one(b), "bad.delta.test")
    added = state_line("d-new", one(b), "new.delta.test")
    head = f"controlplane-delta 3 {base} {version}"
    text = {
        "torn": f"{head} 3\n{changed}\n{added}\n",
        "cut last line": f"{head} 2\n{changed}\n{added[:-3]}",
        "not after its base": f"controlplane-delta 3 {base} {base} 2\n{changed}\n{added}\n",
        "bad name": f"{head} 2\n{changed}\nD-new{added[5:]}\n",
        "bad rev": f"{head} 2\n{changed}\nd-new\tABC\tnew.delta.test\t{one(b)}\n",
        "bad line": f"{head} 2\n{changed}\nd-new\tnew.delta.test\n",
        "twice": f"{head} 2\n{changed}\n{changed}\n",
    }[why]
    since = nginx.log_size()
    state.write_raw(text, delta=True)
    wait_until(lambda: logged in nginx.error_log(since), timeout=5, what=logged)
    assert "ignored whole" in nginx.error_log(since) or why == "not after its base"
    assert served(setup, "bad.delta.test") == {str(a)}
    assert served(setup, "new.delta.test") == {"404"}
    time.sleep(0.05)  # 10 polls: the same bad file is told once
    assert nginx.error_log(since).count(logged) == 1
    state.version = version  # the next delta comes after the refused one
    nginx.put(**{"d-bad": one(b)})
    assert served(setup, "bad.delta.test") == {str(b)}


def test_a_new_base_replaces_what_deltas_did(setup: Setup) -> None:
    a, b = setup.ports[:2]
    nginx, state = setup.nginx, setup.nginx.state
    nginx.put(
        {"d-gone": "gone.delta.test", "d-kept": "kept.delta.test"},
        **{"d-gone": one(a), "d-kept": one(a)},
    )
    nginx.remove("d-gone")
    nginx.put(**{"d-kept": one(b)})
    assert served(setup, "kept.delta.test") == {str(b)}
    # a base where d-kept has another line than the delta's (still on disk, over the old
    # base) gave it, and d-gone is absent
    state.stage(None, **{"d-kept": one(a)})
    nginx.write(base=True)
    assert served(setup, "kept.delta.test") == {str(a)}
    assert served(setup, "gone.delta.test") == {"404"}
    time.sleep(0.05)  # 10 polls: the old delta is not applied over the new base
    assert served(setup, "kept.delta.test") == {str(a)}
    nginx.put(**{"d-kept": one(b)})  # and a delta over the new base is
    assert served(setup, "kept.delta.test") == {str(b)}


def test_a_delta_removing_an_unknown_service_is_harmless(setup: Setup) -> None:
    a, b = setup.ports[:2]
    nginx = setup.nginx
    nginx.put({"d-here": "here.delta.test"}, **{"d-here": one(a)})
    since = nginx.log_size()
    nginx.state.stage({"d-here": "here.delta.test"}, "d-never", **{"d-here": one(b)})
    nginx.write()
    assert "1 changed, 0 removed" in nginx.error_log(since)
    assert served(setup, "here.delta.test") == {str(b)}


def test_a_fresh_nginx_serves_its_base_and_delta_from_the_first_request(
    setup: Setup, tmp_path: Path
) -> None:
    a, b = setup.ports[:2]
    fresh = LuaNginx(tmp_path, [])  # the module's nginx serves the backends
    fresh.state.put({"f-1": "one.fresh.test", "f-2": "two.fresh.test"}, **{"f-1": one(a)})
    fresh.state.put(**{"f-1": one(b), "f-2": one(a)})
    fresh.start()
    try:
        first = fresh.get("one.fresh.test")
        assert (first.status, first.body) == (200, str(b))
        assert fresh.get("two.fresh.test").body == str(a)
        assert "state version 2 applied over base 1" in fresh.error_log()
    finally:
        fresh.stop()


def test_refused_connects_use_up_no_try(setup: Setup) -> None:
    """Containers stopping at once refuse connections until their drain reaches nginx: a
    request tries on past them (every live peer once at most), where three tries would not."""
    a = setup.ports[0]
    dead = [free_port() for _ in range(5)]
    put(
        setup,
        stopping=service_json("round_robin", [*(Peer(p, max_fails=0) for p in dead), Peer(a)]),
    )
    replies = [setup.nginx.get("stopping") for _ in range(12)]
    assert all(r.status == 200 and r.body == str(a) for r in replies), replies
    assert max(len(upstreams(r)) for r in replies) == 6, [r.upstream for r in replies]
    put(setup, stopping=service_json("round_robin", [Peer(p, max_fails=0) for p in dead]))
    failed = setup.nginx.get("stopping")
    assert failed.status == 502 and len(upstreams(failed)) == 5, failed


@contextmanager
def unanswered_ports(count: int) -> Iterator[list[int]]:
    """Loopback ports whose accept queue is full (one connection queued, never accepted): the
    kernel drops every further SYN, so a connect times out, as to the address of a container
    that is gone."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=2))
            ports.append(port)
        yield ports


def test_timed_out_connects_give_their_try_back_twice(setup: Setup) -> None:
    """Containers just gone time connects out until their stop reaches nginx: a request tries
    on past two of them at no cost of a try, not more (each costs the 1 s connect timeout)."""
    a = setup.ports[0]
    with unanswered_ports(5) as gone:
        put(
            setup,
            gone=service_json("round_robin", [*(Peer(p, max_fails=0) for p in gone[:3]), Peer(a)]),
        )
        reply = setup.nginx.get("gone")
        assert reply.status == 200 and reply.body == str(a), reply
        # round robin starts at the first peer: three timed out, the fourth try answered
        assert len(upstreams(reply)) == 4, reply
        # a new service, so that round robin starts at the first peer again
        put(
            setup,
            more=service_json("round_robin", [*(Peer(p, max_fails=0) for p in gone), Peer(a)]),
        )
        failed = setup.nginx.get("more")
        assert failed.status == 504 and len(upstreams(failed)) == 5, failed


def test_a_502_answer_uses_up_its_try(setup: Setup) -> None:
    """An application answering 502 is not a refused connect: three tries, not one per peer
    (which would multiply a failing application's load by the number of backends)."""
    put(setup, answers502=service_json("round_robin", [Peer(p, max_fails=0) for p in setup.ports]))
    reply = setup.nginx.get("answers502", "/?fail=all")
    assert reply.status == 502 and len(upstreams(reply)) == 3, reply
