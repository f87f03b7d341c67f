"""What the dynamic data plane's Lua costs per proxied request, in the host's nginx (no Docker):
one proxy nginx (tests/support/lua_nginx.py) serves both the rendered config's routed server
(the Lua path: access, balancer and log phases) and a native upstream, each to the same two
backends, which a second nginx answers on loopback. `wrk -t1 -c20` (keep-alive) runs through
each path in turn, the order rotating every round, so a noisy machine weighs on all alike; for
each run, requests/s and the proxy nginx's CPU time per request (master and workers, from
/proc). Optional rows: the three Lua phases doing nothing but pick one of the two backends
(`--floor`: what having the phases costs at all), the Lua path of another revision of
templates/lua/controlplane.lua in a proxy of its own (`--against REV`), and the Lua path
counting traffic figures and sending them every second to a UDP socket of this process
(`--stats`, in a proxy of its own: configure's `stats` is per nginx), with its ratio to the
Lua path without them.

`--idle-polls 0.001,0.002,0.005` measures the loader instead: an idle nginx (1 worker) per
interval, all at once, over a base of 1,000 services x 10 backends and a delta of one, none
of which changes: the worker's CPU time per second, each poll reading the first line of both
files. One with a poll of an hour is the baseline. Run:

    .venv/bin/python bench/lua_cost.py [--rounds 5] [--seconds 5] [--workers 2] [--floor]
        [--against REV] [--stats] [--method round_robin]
        [--idle-polls 0.001,0.005 --idle-seconds 30]
"""

from __future__ import annotations

import argparse
import operator
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, percentile, table
from tests.support.lua_nginx import LUA_SOURCE, LuaNginx, Peer, service_json
from tests.support.ports import LOOPBACK, free_port

FLOOR = """\
    upstream floor {
        server 0.0.0.1:1;  # a placeholder: the balancer below picks
        balancer_by_lua_block {
            local port = math.random(2) == 1 and %(a)d or %(b)d
            require("ngx.balancer").set_current_peer("127.0.0.1", port)
        }
        keepalive 32;
    }
    server {
        listen %%(front)s;
        server_name floor;
        location / {
            access_by_lua_block { return }
            proxy_pass http://floor;
%%(proxy)s
            log_by_lua_block { return }
        }
    }"""
"""The three phases with no work of controlplane's: a random one of the two backends."""
HOUR = 3600.0
STATS_ROW = "Lua, traffic figures on"
WITH_STATS = """\
local M = (function()
%(source)s
end)()
local configure = M.configure
function M.configure(opts)
    opts.stats = {host = "%(host)s", port = %(port)d, tag = "%(tag)s"}
    return configure(opts)
end
return M"""
"""The balancer's source with configure given `stats`, as the rendered config does."""


@dataclass(frozen=True)
class Target:
    """One path through a proxy: its row's name, and the Host that takes it."""

    name: str
    proxy: LuaNginx
    host: str


@dataclass
class Runs:
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    failed: int = 0


def cpu_seconds(nginx: LuaNginx) -> float:
    """The nginx's master and workers' user + system time so far."""
    assert nginx.process is not None
    master = nginx.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    ticks = 0
    for pid in [master, *map(int, children)]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk(target: Target, seconds: int) -> str:
    command = ["wrk", "-t1", "-c20", f"-d{seconds}s", "-H", f"Host: {target.host}"]
    return subprocess.run(
        [*command, "--timeout", "5s", f"http://{target.proxy.front}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout


def measure(target: Target, seconds: int, runs: Runs) -> None:
    wrk(target, 1)  # warm: connections, the JIT
    before = cpu_seconds(target.proxy)
    output = wrk(target, seconds)
    used = cpu_seconds(target.proxy) - before
    count = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if count is None or rate is None or int(count.group(1)) == 0:
        raise RuntimeError(f"wrk through {target.name} said:\n{output}")
    runs.rates.append(float(rate.group(1)))
    runs.cpu_us.append(used / int(count.group(1)) * 1e6)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    runs.failed += (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(map(int, errors.groups())) if errors else 0
    )


class Sink:
    """The controller's listener, as far as nginx can tell: a UDP socket on loopback, read
    (and counted) by a thread."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((LOOPBACK, 0))
        self.port: int = self.socket.getsockname()[1]
        self.tag = secrets.token_hex(12)
        self.datagrams = self.bytes = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.socket.recv(65536)
            except OSError:
                return
            self.datagrams += 1
            self.bytes += len(data)

    def source(self) -> str:
        source = LUA_SOURCE.read_text(encoding="utf-8")
        return WITH_STATS % {"source": source, "host": LOOPBACK, "port": self.port, "tag": self.tag}


def turns(targets: Sequence[Target], rounds: int) -> Iterator[tuple[int, Target]]:
    """Each round gives every path a turn; the order rotates, so none always goes first."""
    for r in range(rounds):
        shift = r % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            yield r, target


def source_at(revision: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        ["git", "-C", str(root), "show", f"{revision}:templates/lua/controlplane.lua"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def report(
    results: dict[str, Runs], args: argparse.Namespace, load: float, sink: Sink | None
) -> None:
    """Each path beside the native upstream by the medians of its rounds' ratios and
    differences: a round's turns run within seconds of each other, so the machine's drift
    between rounds cancels."""
    native = next(iter(results.values()))
    rows = [
        [
            name,
            f"{statistics.median(runs.rates):,.0f}",
            f"{percentile(runs.rates, 99):,.0f}",
            f"{statistics.median(runs.cpu_us):.2f}",
            f"{percentile(runs.cpu_us, 99):.2f}",
            f"{statistics.median(map(operator.truediv, runs.rates, native.rates)):.3f}",
            f"{statistics.median(map(operator.sub, runs.cpu_us, native.cpu_us)):+.2f}",
            str(runs.failed),
        ]
        for name, runs in results.items()
    ]
    header = ("path", "req/s p50", "req/s p99", "CPU us/req p50", "CPU p99",
              "req/s / native's", "CPU - native's, us", "errors")  # fmt: skip
    print(table(rows, header))
    if sink is not None:
        on, off = results[STATS_ROW], results["Lua"]
        ratio = statistics.median(map(operator.truediv, on.rates, off.rates))
        added = statistics.median(map(operator.sub, on.cpu_us, off.cpu_us))
        print(
            f"traffic figures on / off: {ratio:.3f}x requests/s, {added:+.2f} us CPU per "
            f"request (medians of the rounds'); {sink.datagrams:,} datagrams, "
            f"{sink.bytes:,} bytes received in all"
        )
    print(
        f"{args.rounds} rounds of wrk -t1 -c20 -d{args.seconds}s per path, turns rotating; the "
        f"proxy nginx: {args.workers} workers, {args.method} over 2 backends in another nginx; "
        f"load average at the start: {load:.2f}"
    )
    print(machine_line())


def idle_polls(polls: Sequence[float], seconds: int) -> None:
    """The loader's cost when nothing changes, per poll interval (see the docstring)."""
    body = {f"svc-{i}": service_json("round_robin", [Peer(20000 + i * 10 + j) for j in range(10)])
            for i in range(1000)}  # fmt: skip
    started: list[tuple[float, LuaNginx]] = []
    with tempfile.TemporaryDirectory(prefix="lua-poll-") as tmp:
        try:
            for poll in [HOUR, *polls]:
                directory = Path(tmp, f"poll-{poll}")
                directory.mkdir()
                nginx = LuaNginx(directory, [], workers=1, poll=poll)
                nginx.state.put(**body)
                nginx.state.put(**{"svc-0": body["svc-1"]})
                nginx.start()
                nginx.wait_applied(0)
                started.append((poll, nginx))
            size = started[0][1].state.path.stat().st_size
            before = {poll: cpu_seconds(nginx) for poll, nginx in started}
            time.sleep(seconds)
            used = {poll: cpu_seconds(nginx) - before[poll] for poll, nginx in started}
        finally:
            for _, nginx in started:
                nginx.stop()
    idle = used[HOUR] / seconds
    rows = [["none (1 h)", f"{idle * 1000:.2f}", f"{idle * 100:.3f}", "-"]]
    for poll in polls:
        per_second = used[poll] / seconds
        per_poll_us = (per_second - idle) * poll * 1e6
        rows.append([f"{poll * 1000:g} ms", f"{per_second * 1000:.2f}",
                     f"{per_second * 100:.3f}", f"{per_poll_us:.1f}"])  # fmt: skip
    print(table(rows, ("poll", "CPU ms/s", "% of a core", "us per poll")))
    print(
        f"idle nginx, 1 worker, over {seconds} s, all at once; base {size:,} bytes "
        f"(1,000 services x 10 backends) and a delta of 1 service, neither changing"
    )
    print(machine_line())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="the proxy nginx's workers")
    parser.add_argument("--floor", action="store_true", help="add the do-nothing Lua phases")
    parser.add_argument("--against", help="a git revision whose Lua runs side by side")
    parser.add_argument("--stats", action="store_true", help="add the Lua path with stats on")
    parser.add_argument("--method", default="round_robin")
    parser.add_argument("--idle-polls", help="poll intervals (s), comma-separated")
    parser.add_argument("--idle-seconds", type=int, default=30)
    args = parser.parse_args()
    if args.idle_polls:
        idle_polls([float(p) for p in args.idle_polls.split(",")], args.idle_seconds)
        return
    ports = [free_port(), free_port()]
    peers = [Peer(p) for p in ports]
    key = "$remote_addr" if args.method == "hash" else None
    body = service_json(args.method, peers, key=key)
    started: list[LuaNginx] = []
    with tempfile.TemporaryDirectory(prefix="lua-cost-") as tmp:

        def proxy(name: str, extra: Sequence[str] = (), source: str | None = None) -> LuaNginx:
            native = {"web": ("", peers)}
            made = LuaNginx(Path(tmp, name), [], native, error_level="notice",
                            workers=args.workers, extra=extra, lua_source=source)  # fmt: skip
            return start(made)

        def start(nginx: LuaNginx) -> LuaNginx:
            nginx.state.put(web=body)  # read at the first request: no poll awaited
            nginx.start()
            started.append(nginx)
            return nginx

        try:
            for name in ("backends", "proxy", "against", "stats"):
                Path(tmp, name).mkdir()
            start(LuaNginx(Path(tmp, "backends"), ports, plain_stubs=True, workers=1))
            ours = proxy("proxy", [FLOOR % {"a": ports[0], "b": ports[1]}] if args.floor else [])
            targets = [Target("native upstream", ours, "native-web"), Target("Lua", ours, "web")]
            if args.floor:
                targets.append(Target("Lua phases doing nothing", ours, "floor"))
            if args.against:
                theirs = proxy("against", source=source_at(args.against))
                targets.append(Target(f"Lua at {args.against}", theirs, "web"))
            sink = Sink() if args.stats else None
            if sink is not None:
                targets.append(Target(STATS_ROW, proxy("stats", source=sink.source()), "web"))
            for target in targets:
                reply = target.proxy.get(target.host)
                if reply.status != 200:
                    raise RuntimeError(f"{target.name} answers {reply}")
            results = {t.name: Runs() for t in targets}
            load = os.getloadavg()[0]
            for r, target in turns(targets, args.rounds):
                print(f"round {r + 1}: {target.name}", file=sys.stderr, flush=True)
                measure(target, args.seconds, results[target.name])
        finally:
            for nginx in started:
                nginx.stop()
    report(results, args, load, sink)


if __name__ == "__main__":
    main()
