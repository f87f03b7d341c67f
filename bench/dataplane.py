"""Data planes side by side, in one run, their turns alternating: nginx with the Lua balancer
fed by the controller (dynamic), nginx whose config lists the backends and reloads (reload),
and HAProxy finding the backends in Docker's embedded DNS with server-template (haproxy),
through the figures of issue 15: sequential joins and stops, a burst of starts, scale 1<->5
under wrk, a method change through the API, proxied requests/s, and the state of 1,000
services x 10 backends pushed into nginx.

Each data plane has its own network, proxy and backends (the offline images; HAProxy's is
built from Debian's package by images/build.py) and, for nginx, its own controller in this
process with default flags, started for its turn and closed after it, so no controller sees
another plane's events. Requests go only to loopback published ports; everything the bench
creates carries controlplane.test=1 and is removed at the end (the images stay, cached by
content). Run:

    .venv/bin/python bench/dataplane.py [--scenario joins,burst,scale,algorithm,throughput,push]
        [--rounds 2] [--planes dynamic,reload,haproxy] [--haproxy-resolve 10ms]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import docker
import docker.errors
import httpx
from docker.models.containers import Container
from docker.models.networks import Network

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Prober, Running, machine_line, row, table
from bench.render_scale import docker_state
from controlplane.core.build import DEFAULT_CONFIG_PATH, BuildMemo, build_topology
from controlplane.core.dataplane import (
    Pushed,
    StateCache,
    delta_path,
    next_push,
    state_path,
    state_text,
)
from controlplane.core.model import DockerState, NginxTarget
from controlplane.core.render import RenderOptions, render_config
from controlplane.nginx_deployer import NginxDeployer
from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from controlplane.templating import load_template
from images.build import OfflineImages, ensure_haproxy_image, ensure_images
from tests.support.lab import Lab, wait_until
from tests.support.traffic import parse_wrk
from tests.unit.builders import container as container_facts

SERVICE = "bench"
DRAINING = {"STOP_DELAY": "0.5", "DRAIN_STATUS": "200"}
"""Backend env: it keeps answering 200 for 0.5 s after SIGTERM, so the last request routed
to it shows when the proxy stopped routing there (tests.support.lab's is 1 s)."""
PLANES = ("dynamic", "reload", "haproxy")
SCENARIOS = ("joins", "burst", "scale", "algorithm", "throughput", "push")
HAPROXY_SLOTS = 64
FAST_BACKEND_CONF = (
    b"# answers its host name (the container's) on every path: the requests/s bench's\n"
    b"# backend, as cheap as the proxy (the busybox one forks a shell per request)\n"
    b'server {\n    listen 80 default_server;\n    location / { return 200 "$hostname\\n"; }\n}\n'
)
PROBE_SERVICE = "zz-probe"
"""The synthetic state's one service with a real backend; last in the file, so a request it
serves shows the whole file loaded."""
LOADER_LINE = re.compile(
    r"state version (\d+) applied: (\d+) of (\d+) services changed, (\d+) removed, in ([\d.]+) ms"
)
DELTA_LINE = re.compile(r"state version \d+ applied over base \d+: .* in ([\d.]+) ms")
STEP_NAMES = {
    "open": "open a shell",
    "read": "read the config",
    "push": "write the state file",
    "copy": "write the config",
    "test": "nginx -t",
    "reload": "SIGHUP",
    "retire": "new workers up, old told to quit",
}

Samples = dict[str, list[float]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def started_ns(container: Container) -> int:
    """State.StartedAt (the engine's clock, as its start event) in ns since the epoch."""
    container.reload()
    text = container.attrs["State"]["StartedAt"].rstrip("Z")
    whole, _, fraction = text.partition(".")
    seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def ip_of(container: Container, network: Network) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def together(calls: Sequence[Callable[[], object]], workers: int = 25) -> None:
    """The calls on threads at once, as a burst of docker commands would come."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda call: call(), calls))


def bodies(port: int, count: int, path: str = "/") -> list[str]:
    """`count` requests, each on a new connection: the body of a 200, else what went wrong."""
    seen = []
    with httpx.Client(timeout=5.0, headers={"Host": SERVICE, "Connection": "close"}) as client:
        for _ in range(count):
            try:
                reply = client.get(f"http://127.0.0.1:{port}{path}")
            except httpx.HTTPError as error:
                seen.append(type(error).__name__)
                continue
            ok = reply.status_code == 200
            seen.append(reply.text.strip() if ok else f"HTTP {reply.status_code}")
    return seen


def routable(stats_csv: str) -> list[str]:
    """Addresses of the slots HAProxy routes to: neither in maintenance (an empty slot, or
    one whose address left the DNS answer: "MAINT (resolution)") nor down (a failed check)."""
    reader = csv.DictReader(io.StringIO(stats_csv.lstrip("# ")))
    return [
        r["addr"].rpartition(":")[0]
        for r in reader
        if r.get("pxname") == "service"
        and r.get("svname") != "BACKEND"
        and r.get("addr")
        and not (r.get("status") or "").startswith(("MAINT", "DOWN"))
    ]


class HaproxyTable:
    """HAProxy's own view of its slots, read from its stats page every ~5 ms in a thread:
    when each backend address was first and last routable, and since when it has been
    routable without a break (a check that failed once DNS listed it breaks the run)."""

    def __init__(self, port: int, max_seconds: float) -> None:
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.since: dict[str, int] = {}
        self._stop = threading.Event()
        deadline = time.monotonic() + max_seconds
        self._thread = threading.Thread(target=self._run, args=(port, deadline), daemon=True)
        self._thread.start()

    def _run(self, port: int, deadline: float) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                now = time.time_ns()
                with contextlib.suppress(httpx.HTTPError):
                    up = set(routable(client.get(f"http://127.0.0.1:{port}/stats;csv").text))
                    for address in up:
                        self.first.setdefault(address, now)
                        self.since.setdefault(address, now)
                        self.last[address] = now
                    for address in self.since.keys() - up:
                        del self.since[address]
                time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def first_seen(
    prober: Prober, value: str | Callable[[str], bool], after_ns: int, timeout: float = 20.0
) -> int:
    """When the prober first saw `value` (or a value it matches) from `after_ns` on; polled
    every 2 ms, bounded."""
    match = value if callable(value) else (lambda v: v == value)
    return wait_until(
        lambda: prober.first(match, after_ns),
        timeout=timeout,
        interval=0.002,
        what=f"the prober seeing {value}",
    )


def all_seen(prober: Prober, names: set[str], timeout: float = 60.0) -> None:
    wait_until(
        lambda: names <= {h.value for h in prober.hits},
        timeout=timeout,
        interval=0.05,
        what=f"the prober seeing all of {len(names)} backends",
    )


def pass_for(
    reports: Sequence[ReconcileReport], after_ns: int, name: str | None = None
) -> ReconcileReport | None:
    """The controller's first pass from `after_ns` on that deployed to every nginx and, when
    `name` is given, changed something of that container."""
    word = re.compile(rf"(^|\s){re.escape(name)}(\s|$)") if name else None
    for report in list(reports):
        if (
            report.started_ns >= after_ns
            and report.deployed
            and all(d.ok for d in report.deployed)
            and (word is None or any(word.search(change) for change in report.changes))
        ):
            return report
    return None


def controller_said(running: Running | None) -> str:
    """The controller's last passes in a line, for a failure's message."""
    if running is None:
        return ""
    passes = []
    for r in running.reports[-4:]:
        deployed = ", ".join(
            f"{'pushed' if d.pushed else 'config'} {'ok' if d.ok else d.error} via {d.via}"
            for d in r.deployed
        )
        passes.append(
            f"pass {r.version} ({r.reason}): changes {list(r.changes[:3])}, held "
            f"{list(r.held[:2])}, deployed [{deployed}]"
        )
    return "; the controller's last passes: " + " | ".join(passes)


def pass_end_ns(report: ReconcileReport) -> int:
    return report.started_ns + int(sum(report.timings.values()) * 1e9)


def pass_phases(report: ReconcileReport, mark_ns: int, seen_ns: int, what: str) -> Samples:
    """Where one pass's milliseconds went, from `what` at `mark_ns` to the request at
    `seen_ns`; each deploy step summed over the pass's results (a push, a config)."""
    phases: Samples = {
        f"{what} -> pass starts (event, debounce, any hold)": [(report.started_ns - mark_ns) / 1e6]
    }
    if report.trigger is not None:
        trip = (report.trigger.received_ns - report.trigger.time_ns) / 1e6
        phases["  (its first event's trip: engine -> controller)"] = [trip]
    phases |= {
        "  list + inspect": [report.timings.get("list", 0) * 1000],
        "  build + render": [report.timings.get("render", 0) * 1000],
        "  readiness: probe newcomers, wait for their answers": [
            report.timings.get("ready", 0) * 1000
        ],
    }
    steps: dict[str, float] = {}
    for result in report.deployed:
        for step, seconds in result.timings.items():
            steps[step] = steps.get(step, 0.0) + seconds
    via = report.deployed[0].via
    for step, seconds in steps.items():
        phases[f"  {STEP_NAMES.get(step, step)} ({via})"] = [seconds * 1000]
    phases["  pass done -> request seen"] = [(seen_ns - pass_end_ns(report)) / 1e6]
    return phases


@dataclass
class Plane:
    """One data plane: its network, its proxy (published on loopback) and, for nginx, the
    controller started for each of its turns."""

    name: str
    lab: Lab
    net: Network
    proxy: Container
    port: int
    stats_port: int | None = None

    @property
    def nginx(self) -> bool:
        return self.name != "haproxy"

    def reloads(self) -> int:
        """Counted from nginx's own log."""
        return self.lab.reloads(self.proxy) if self.nginx else 0

    @contextlib.contextmanager
    def controlled(self, api: bool = False) -> Iterator[Running | None]:
        """The plane's controller (default flags) for one turn; none for HAProxy."""
        if not self.nginx:
            yield None
            return
        settings = Settings(
            networks=frozenset({str(self.net.name)}), api_bind="127.0.0.1:0" if api else None
        )
        running = Running(settings)
        try:
            yield running
        finally:
            running.close()

    def watch(self, max_seconds: float) -> HaproxyTable | None:
        return HaproxyTable(self.stats_port, max_seconds) if self.stats_port else None

    def backend(self, start: bool = True, env: dict[str, str] | None = None) -> Container:
        return self.lab.backend(self.net, alias=SERVICE, env=env or {}, start=start)

    def fast_backend(self, start: bool = True) -> Container:
        """The offline nginx image answering its host name, the container's name."""
        name = self.lab.name("fast")
        container = self.lab._run(
            self.lab.images.nginx,
            name,
            self.net,
            aliases=[SERVICE],
            exact_name=True,
            start=False,
            hostname=name,
        )
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo("default.conf")
            info.size = len(FAST_BACKEND_CONF)
            tar.addfile(info, io.BytesIO(FAST_BACKEND_CONF))
        container.put_archive("/etc/nginx/conf.d", archive.getvalue())
        if start:
            container.start()
        return container

    def served(
        self, names: set[str], timeout: float = 30.0, running: Running | None = None
    ) -> None:
        """Until requests have reached every one of `names`."""
        seen: set[str] = set()
        last: list[str] = []

        def all_seen() -> bool:
            last[:] = bodies(self.port, 10)
            seen.update(last)
            return names <= seen

        try:
            wait_until(all_seen, timeout=timeout, interval=0.01)
        except AssertionError:
            raise AssertionError(
                f"{self.name}: {sorted(names - seen)} not served within {timeout:g} s; the "
                f"last requests got {last}{controller_said(running)}"
            ) from None

    def remove(self, containers: Sequence[Container]) -> None:
        together([lambda c=c: c.remove(force=True) for c in containers])

    def lua_said(self, since: float) -> list[str]:
        """The Lua balancer's warnings and errors in nginx's log since `since` (epoch s)."""
        logged = self.proxy.logs(since=int(since)).decode("utf-8", "replace").splitlines()
        return [ln for ln in logged if "[lua]" in ln and ("[warn]" in ln or "[error]" in ln)]

    def note_lua(self, result: Result, since: float) -> None:
        """How many peers the Lua balancer ejected (and its other complaints), with one of
        each as it said it."""
        if self.name != "dynamic":
            return
        said = self.lua_said(since)
        ejected = [ln for ln in said if " ejected for " in ln]
        result.count(self.name, "ejections logged by the Lua balancer", len(ejected))
        for line in [*ejected[:1], *[ln for ln in said if ln not in ejected][:2]]:
            result.notes.append(f"[{self.name}] nginx said: {line[:300]}")

    def reset(self) -> None:
        """Every container of this plane but its proxy removed: after a scenario failed."""
        label = f"controlplane.test.run={self.lab.run_id}"
        left = self.lab.client.containers.list(all=True, filters={"label": label})
        self.remove([c for c in left if c.id != self.proxy.id])


def make_plane(
    name: str, client: docker.DockerClient, images: OfflineImages, haproxy: str, resolve: str
) -> Plane:
    lab = Lab(client, images, dataplane=name if name != "haproxy" else "reload")
    net = lab.network(name)
    if name != "haproxy":
        proxy = lab.nginx(net)
        return Plane(name, lab, net, proxy, lab.published_port(proxy))
    proxy = lab._run(
        haproxy,
        "haproxy",
        net,
        environment={"SERVICE": SERVICE, "SLOTS": str(HAPROXY_SLOTS), "RESOLVE": resolve},
        ports={"80/tcp": ("127.0.0.1", None), "8404/tcp": ("127.0.0.1", None)},
    )
    proxy.reload()
    stats = int(proxy.ports["8404/tcp"][0]["HostPort"])
    return Plane(name, lab, net, proxy, lab.published_port(proxy), stats)


def turns(planes: Sequence[Plane], rounds: int) -> Iterator[tuple[int, Plane]]:
    """Each round gives every plane a turn; the order rotates, so none always goes first."""
    for r in range(rounds):
        shift = r % len(planes)
        for plane in [*planes[shift:], *planes[:shift]]:
            yield r, plane


def share(total: int, rounds: int, r: int) -> int:
    """Round r's part of `total` split over `rounds`."""
    return total // rounds + (1 if r < total % rounds else 0)


@dataclass
class Result:
    """One scenario's figures per plane (ms unless the unit says otherwise), its counts, and
    where the milliseconds went."""

    samples: dict[str, dict[str, tuple[list[float], str]]] = field(default_factory=dict)
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    breakdown: dict[str, Samples] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, plane: str, metric: str, values: Sequence[float], unit: str = "ms") -> None:
        self.samples.setdefault(plane, {}).setdefault(metric, ([], unit))[0].extend(values)

    def count(self, plane: str, what: str, value: float) -> None:
        counts = self.counts.setdefault(plane, {})
        counts[what] = counts.get(what, 0) + value

    def phases(self, plane: str, phases: Samples, prefix: str = "") -> None:
        into = self.breakdown.setdefault(plane, {})
        for name, values in phases.items():
            into.setdefault(prefix + name, []).extend(values)

    def print(self, title: str) -> None:
        print(f"\n=== {title}")
        print(machine_line())
        for note in self.notes:
            print(note)
        rows = [
            row(f"[{plane}] {metric}", values, unit)
            for plane, metrics in self.samples.items()
            for metric, (values, unit) in metrics.items()
        ]
        if rows:
            print(table(rows))
        for plane, counts in self.counts.items():
            print(f"[{plane}] " + ", ".join(f"{what}: {n:g}" for what, n in counts.items()))
        for plane, phases in self.breakdown.items():
            print(f"\nwhere the milliseconds go [{plane}]:")
            print(table([row(name, values) for name, values in phases.items()]))
        sys.stdout.flush()


# 1. Sequential joins and stops -------------------------------------------------------------


def joins(planes: Sequence[Plane], total: int, group: int) -> Result:
    """Per turn, `group` backends started one after another, each as soon as the previous
    one is served, then stopped one after another (DRAINING); one steady backend serves
    throughout. Small groups keep the round robin short: one prober request every ~2 ms
    reaches a new backend among n after ~n/2 requests."""
    result = Result()
    steady = {p.name: p.backend() for p in planes}
    rounds = -(-total // group)
    for r, plane in turns(planes, rounds):
        count = share(total, rounds, r)
        log(f"joins: round {r + 1}, {plane.name}: {count} backends")
        created = [plane.backend(start=False, env=DRAINING) for _ in range(count)]
        bound = 60 + count * 20
        with plane.controlled() as running:
            prober = Prober(plane.port, SERVICE, "", max_seconds=bound)
            watched = plane.watch(bound)
            try:
                plane.served({steady[plane.name].name}, running=running)
                time.sleep(0.5)
                ips = {}
                for container in created:
                    container.start()
                    returned = time.time_ns()
                    name = container.name
                    ips[name] = ip_of(container, plane.net)  # the prober keeps the time
                    try:
                        routed = first_seen(prober, name, returned)
                    except AssertionError:
                        saw = sorted({h.value for h in prober.hits if h.started_ns >= returned})
                        result.count(plane.name, "joins not served within 20 s", 1)
                        result.notes.append(
                            f"[{plane.name}] {name} not served within 20 s of its start; the "
                            f"prober saw {saw}{controller_said(running)}"
                        )
                        continue
                    result.add(
                        plane.name,
                        "docker start returned -> first request routed to it",
                        [(routed - returned) / 1e6],
                    )
                    breakdown(result, plane, running, watched, name, ips[name], returned, routed)
                time.sleep(0.3)
                for container in created:
                    called = time.time_ns()
                    container.stop(timeout=10)
                    time.sleep(0.3)
                    name = container.name
                    last = prober.last(lambda v, n=name: v == n) or called
                    result.add(
                        plane.name,
                        "docker stop called -> last request routed to it",
                        [max(0.0, (last - called) / 1e6)],
                    )
                    breakdown(
                        result, plane, running, watched, name, ips[name], called, last, stop=True
                    )
                hits = prober.hits
                result.count(plane.name, "probe requests", len(hits))
                result.count(plane.name, "failed", sum(1 for h in hits if h.failed))
            finally:
                prober.stop()
                if watched is not None:
                    watched.stop()
        plane.remove(created)
    for plane in planes:
        plane.remove([steady[plane.name]])
    return result


def breakdown(
    result: Result,
    plane: Plane,
    running: Running | None,
    watched: HaproxyTable | None,
    name: str,
    ip: str,
    mark: int,
    seen: int,
    stop: bool = False,
) -> None:
    """A join's (or stop's) milliseconds: the controller's pass, or HAProxy's table."""
    kind = "[stop] " if stop else "[start] "
    if running is not None:
        report = pass_for(running.reports, mark, name)
        if report is not None:
            docker_call = "docker stop called" if stop else "docker start returned"
            result.phases(plane.name, pass_phases(report, mark, seen, docker_call), kind)
    elif watched is not None:
        phases: Samples = {}
        if stop and ip in watched.last:
            phases["docker stop called -> last routable in HAProxy's table"] = [
                (watched.last[ip] - mark) / 1e6
            ]
        elif not stop and ip in watched.first:
            phases["docker start returned -> listed (DNS; negative: before it returned)"] = [
                (watched.first[ip] - mark) / 1e6
            ]
            if ip in watched.since:
                phases["docker start returned -> up for good (a check passed)"] = [
                    (watched.since[ip] - mark) / 1e6
                ]
                phases["  up for good -> request seen"] = [(seen - watched.since[ip]) / 1e6]
        result.phases(plane.name, phases, kind)


# 2. A burst of starts ------------------------------------------------------------------------


def burst(planes: Sequence[Plane], rounds: int, size: int) -> Result:
    """Per turn, `size` created backends started by 25 threads into a serving service: the
    reloads nginx logged, and from each start to routable (the controller's pass done, or
    HAProxy's table) and to the first request a prober saw reach it (one prober over all
    the backends: it samples each one only every ~N requests)."""
    result = Result()
    steady = {p.name: p.backend() for p in planes}
    for r, plane in turns(planes, rounds):
        log(f"burst: round {r + 1}, {plane.name}: {size} starts")
        created = [plane.backend(start=False) for _ in range(size)]
        with plane.controlled() as running:
            prober = Prober(plane.port, SERVICE, "", max_seconds=120)
            watched = plane.watch(120)
            try:
                plane.served({steady[plane.name].name})
                time.sleep(2)  # calm: a reload plane's scale-out hold starts afresh
                reloads = plane.reloads()
                began = time.time_ns()
                together([c.start for c in created])
                span = (time.time_ns() - began) / 1e9
                names = {c.name for c in created}
                all_seen(prober, names)
                time.sleep(1.5)
                result.count(plane.name, "reloads (nginx's log)", plane.reloads() - reloads)
                result.count(plane.name, "bursts", 1)
                result.count(plane.name, "start calls' span s", round(span, 2))
                served, ready = [], []
                for container in created:
                    start = started_ns(container)
                    seen = prober.first(lambda v, n=container.name: v == n, began)
                    if seen is not None:
                        served.append((seen - start) / 1e6)
                    at: int | None = None
                    if running is not None:
                        report = pass_for(running.reports, began, container.name)
                        if report is not None:
                            at = pass_end_ns(report)
                            phases = pass_phases(report, start, seen or at, "start event")
                            result.phases(plane.name, phases)
                    elif watched is not None:
                        ip = ip_of(container, plane.net)
                        at = watched.since.get(ip)
                        if ip in watched.first:
                            listed = (watched.first[ip] - start) / 1e6
                            result.phases(plane.name, {"start event -> listed (DNS)": [listed]})
                    if at is not None:
                        ready.append((at - start) / 1e6)
                result.add(plane.name, "start event -> routable (pass done | table)", ready)
                result.add(plane.name, "start event -> first request seen (sampled)", served)
                hits = [h for h in prober.hits if h.started_ns >= began]
                result.count(plane.name, "failed requests", sum(1 for h in hits if h.failed))
            finally:
                prober.stop()
                if watched is not None:
                    watched.stop()
        plane.remove(created)
    for plane in planes:
        plane.remove([steady[plane.name]])
    result.notes.append(
        "routable: nginx: the controller's pass that took the backend ended (state pushed, or "
        "config reloaded and old workers retired); haproxy: its stats page shows the address "
        "up for good (polled every 5 ms). A dynamic nginx's Lua loader reads the state within "
        "5 ms more."
    )
    return result


# 3. Scale 1 <-> 5 under wrk ------------------------------------------------------------------


WRK_STATUSES = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do total[code] = (total[code] or 0) + n end
  end
  for code, n in pairs(total) do io.write(string.format("status %d: %d\\n", code, n)) end
end
"""
"""Counts wrk's replies by status, so the non-2xx say what they were."""


def wrk(port: int, seconds: float, script: str | None = None) -> subprocess.Popen[str]:
    """wrk -t2 -c20 (keep-alive, unthrottled) through the proxy, bounded in time."""
    command = ["wrk", "-t2", "-c20", f"-d{max(1, round(seconds))}s", "-H", f"Host: {SERVICE}",
               "--timeout", "10s"]  # fmt: skip
    if script is not None:
        command += ["-s", script]
    return subprocess.Popen(
        [*command, f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ended(process: subprocess.Popen[str], interrupt: bool) -> str:
    """wrk's report: it prints it on SIGINT too."""
    if interrupt and process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def scale(planes: Sequence[Plane], rounds: int, cycles: int) -> Result:
    """Per turn, 4 backends started together next to a steady one, served, then stopped
    together and removed, under wrk -t2 -c20 (keep-alive, unthrottled) through the proxy:
    wrk's socket errors and non-2xx replies, by status. The backends are nginx (a stop is
    its graceful quit): 20 connections would overrun the busybox one's 16-deep backlog."""
    result = Result()
    steady = {p.name: p.fast_backend() for p in planes}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_STATUSES)
        script.flush()
        for r, plane in turns(planes, rounds):
            count = share(cycles, rounds, r)
            log(f"scale: round {r + 1}, {plane.name}: {count} cycles 1 <-> 5")
            with plane.controlled():
                plane.served({steady[plane.name].name})
                created = [plane.fast_backend(start=False) for _ in range(4 * count)]
                reloads = plane.reloads()
                since = time.time()
                load = wrk(plane.port, 30 + count * 20, script.name)
                try:
                    time.sleep(0.5)
                    began = time.monotonic()
                    for cycle in range(count):
                        added = created[4 * cycle : 4 * cycle + 4]
                        marks = [time.monotonic()]
                        together([c.start for c in added])
                        marks.append(time.monotonic())
                        plane.served({c.name for c in added})
                        marks.append(time.monotonic())
                        together([lambda c=c: c.stop(timeout=10) for c in added])
                        marks.append(time.monotonic())
                        phases = ("4 docker starts", "-> all 4 served", "4 docker stops")
                        result.phases(
                            plane.name,
                            {
                                p: [(b - a) * 1000]
                                for p, a, b in zip(phases, marks, marks[1:], strict=False)
                            },
                        )
                        time.sleep(0.3)
                    time.sleep(0.5)
                    took = time.monotonic() - began
                finally:
                    output = ended(load, interrupt=True)
                plane.remove(created)
                said = parse_wrk(output)
                statuses = dict(re.findall(r"status (\d+): (\d+)", output))
                result.count(plane.name, "cycles", count)
                result.count(plane.name, "wrk requests", said.requests)
                result.count(plane.name, "wrk errors + non-2xx", said.failed)
                result.count(plane.name, "reloads (nginx's log)", plane.reloads() - reloads)
                result.count(plane.name, "seconds", round(took, 1))
                plane.note_lua(result, since)
                by_status = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
                result.notes.append(
                    f"[{plane.name}] round {r + 1}: wrk {said.detail} (replies {by_status})"
                )
    for plane in planes:
        plane.remove([steady[plane.name]])
    return result


# 4. PUT algorithm -> served ------------------------------------------------------------------


def algorithm(planes: Sequence[Plane], rounds: int, changes: int) -> Result:
    """Per turn, the method switched through the API between ip_hash and hash $arg_u, with 3
    backends: one prober request shows which method served it (ip_hash sends this client to
    one backend; hash $arg_u sends ?u=<key> to another, a key picked for that)."""
    result = Result()
    nginx = [p for p in planes if p.nginx]
    backends = {p.name: [p.backend() for _ in range(3)] for p in nginx}
    for r, plane in turns(nginx, rounds):
        count = share(changes, rounds, r)
        log(f"algorithm: round {r + 1}, {plane.name}: {count} switches")
        with plane.controlled(api=True) as running:
            assert running is not None and running.controller.api is not None
            api = httpx.Client(base_url=running.controller.api.url, timeout=30)
            plane.served({c.name for c in backends[plane.name]})
            ip_hash = {"method": "ip_hash"}
            hashed = {"method": "hash", "key": "$arg_u"}
            put(api, ip_hash, wait=True)
            by_ip = settled(plane.port, "/?u=k0")
            put(api, hashed, wait=True)
            key, by_key = next(
                (f"/?u=k{i}", b)
                for i in range(200)
                if (b := settled(plane.port, f"/?u=k{i}")) != by_ip
            )
            prober = Prober(plane.port, SERVICE, "", max_seconds=60 + count * 15, path=key)
            try:
                first_seen(prober, by_key, 0)
                time.sleep(0.3)
                reloads = plane.reloads()
                since = time.time()
                for n in range(count):
                    body, expected = (ip_hash, by_ip) if n % 2 == 0 else (hashed, by_key)
                    sent = time.time_ns()
                    put(api, body)
                    replied = time.time_ns()
                    try:
                        seen = first_seen(prober, expected, sent, timeout=15)
                    except AssertionError:
                        after = [h.value for h in prober.hits if h.started_ns >= sent]
                        result.count(plane.name, "switches not served within 15 s", 1)
                        result.notes.append(
                            f"[{plane.name}] PUT {body}: expected {expected} within 15 s, the "
                            f"prober saw {sorted(set(after))}"
                        )
                        continue
                    result.add(
                        plane.name,
                        "PUT sent -> first request by the new method",
                        [(seen - sent) / 1e6],
                    )
                    result.add(plane.name, "PUT sent -> API reply", [(replied - sent) / 1e6])
                    report = pass_for(running.reports, sent)
                    if report is not None:
                        result.phases(plane.name, pass_phases(report, sent, seen, "PUT sent"))
                    time.sleep(0.2)
                time.sleep(1)
                result.count(plane.name, "switches", count)
                result.count(plane.name, "reloads (nginx's log)", plane.reloads() - reloads)
                failed = sum(1 for h in prober.hits if h.failed)
                result.count(plane.name, "failed requests", failed)
                plane.note_lua(result, since)
            finally:
                prober.stop()
                api.close()
    for plane in nginx:
        plane.remove(backends[plane.name])
    return result


def put(api: httpx.Client, body: dict[str, str], wait: bool = False) -> None:
    reply = api.put(
        f"/api/v1/services/{SERVICE}/algorithm", json=body, params={"wait": str(wait).lower()}
    )
    if reply.status_code >= 300:
        raise RuntimeError(f"PUT algorithm {body}: {reply.status_code} {reply.text}")


def settled(port: int, path: str) -> str:
    """The one backend that serves `path` several times in a row, once the method in force
    sends it to one (a reload's old workers may answer with the previous method first)."""

    def one() -> str | None:
        seen = set(bodies(port, 6, path))
        return seen.pop() if len(seen) == 1 else None

    return wait_until(one, timeout=10, interval=0.1, what=f"one backend for {path}")


# 5. Proxied requests/s -----------------------------------------------------------------------


def cpu_ns(container: Container) -> int:
    stats = container.client.api.stats(container.id, stream=False, one_shot=True)
    return int(stats["cpu_stats"]["cpu_usage"]["total_usage"])


def throughput(planes: Sequence[Plane], rounds: int, seconds: float) -> Result:
    """wrk -t2 -c20 (keep-alive) through each proxy to 2 nginx backends answering a small
    body, turns alternating, the controllers closed while wrk runs: requests/s, and the
    proxy container's CPU time per request."""
    result = Result()
    backends = {}
    for plane in planes:
        backends[plane.name] = [plane.fast_backend() for _ in range(2)]
        with plane.controlled():
            plane.served({c.name for c in backends[plane.name]})
            time.sleep(0.5)
    for r, plane in turns(planes, rounds):
        log(f"throughput: round {r + 1}, {plane.name}: wrk {seconds:g} s")
        ended(wrk(plane.port, 1), interrupt=False)  # warm: connections, the Lua code
        before = cpu_ns(plane.proxy)
        output = ended(wrk(plane.port, seconds), interrupt=False)
        used = cpu_ns(plane.proxy) - before
        said = parse_wrk(output)
        rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
        if rate is None or said.requests == 0:
            raise RuntimeError(f"wrk through {plane.name} said:\n{output}")
        result.add(plane.name, "requests/s", [float(rate.group(1))], "req/s")
        result.add(plane.name, "proxy CPU per request", [used / said.requests / 1000], "us")
        result.count(plane.name, "wrk errors + non-2xx", said.failed)
    rates = {p: statistics.median(m["requests/s"][0]) for p, m in result.samples.items()}
    cpu = {p: statistics.median(m["proxy CPU per request"][0]) for p, m in result.samples.items()}
    if "dynamic" in rates and "reload" in rates:
        result.notes.append(
            f"dynamic / reload requests/s (medians): {rates['dynamic'] / rates['reload']:.3f}; "
            f"per request: {1e6 / rates['dynamic'] - 1e6 / rates['reload']:+.1f} us of the "
            f"whole machine's time, {cpu['dynamic'] - cpu['reload']:+.1f} us of nginx's CPU"
        )
    for plane in planes:
        plane.remove(backends[plane.name])
    return result


# 6. The state of 1,000 services x 10 backends pushed -----------------------------------------


def synthetic(services: int, backends: int, probe_ip: str) -> DockerState:
    """bench/render_scale's services on unreachable addresses, and one service, last, whose
    one backend is a real container at `probe_ip`."""
    state = docker_state(services, backends)
    probe = container_facts(
        f"{PROBE_SERVICE}-1", aliases=(PROBE_SERVICE,), network="app", ip=probe_ip, exposed=(80,)
    )
    return DockerState(containers=(*state.containers, probe), networks=state.networks)


def push(client: docker.DockerClient, lab: Lab, services: int, backends: int, reps: int) -> Result:
    """A dynamic nginx of its own (no controller watches it) with the dynamic config of
    services x backends deployed, then the state pushed by NginxDeployer.push_all as the
    controller does (core.dataplane.next_push): whole (from an empty state), then with one
    service changed (a delta), in effect once a request to the probe service reaches the
    backend its new line names."""
    result = Result()
    net = lab.network("push")
    nginx = lab._run(
        lab.images.nginx_lua,
        "lb",
        net,
        ports={"80/tcp": ("127.0.0.1", None)},
        command=["nginx", "-g", "daemon off; error_log stderr info;"],  # the loader's lines
    )
    a, b = lab.backend(net, alias=None), lab.backend(net, alias=None)
    target = NginxTarget(
        nginx.id, nginx.name, DEFAULT_CONFIG_PATH, nginx.attrs["State"]["StartedAt"], (net.name,)
    )
    memo, cache, reachable = BuildMemo(), StateCache(), frozenset({"app"})
    to_a = build_topology(synthetic(services, backends, ip_of(a, net)), memo=memo)
    options = RenderOptions(
        dynamic=True,
        state_path=state_path(DEFAULT_CONFIG_PATH),
        delta_path=delta_path(DEFAULT_CONFIG_PATH),
    )
    config = render_config(to_a, load_template(), options)
    mark = time.perf_counter()
    lines_a = cache.lines(to_a.services, reachable)
    cold = (time.perf_counter() - mark) * 1000
    to_b = build_topology(synthetic(services, backends, ip_of(b, net)), memo=memo)
    mark = time.perf_counter()
    lines_b = cache.lines(to_b.services, reachable)
    warm = (time.perf_counter() - mark) * 1000
    changed = sum(1 for x, y in zip(lines_a, lines_b, strict=True) if x != y)
    full_text = state_text(1, lines_a)
    result.notes.append(
        f"{services} services x {backends} backends (+ {PROBE_SERVICE}): state "
        f"{len(full_text) / 1e6:.2f} MB, config {len(config) / 1e6:.2f} MB; lines made "
        f"cold {cold:.0f} ms, one service changed {warm:.1f} ms ({changed} line differs)"
    )
    version = 0
    given: Pushed | None = None

    def pushed(way: str, deployer: NginxDeployer, lines: Sequence[str]) -> tuple[int, float]:
        nonlocal version, given
        version += 1
        push = next_push(given, version, lines)
        if push is None:
            raise RuntimeError("nothing changed between two pushes of the bench")
        began = time.time_ns()
        (done,) = deployer.push_all([target], push.text.encode(), push.delta)
        if not done.ok:
            raise RuntimeError(f"push to {nginx.name} failed: {done.error}")
        given = push.after
        kind = "a delta" if push.delta else "the whole state"
        result.count(way, f"pushes of {kind} that went in via the {done.via}", 1)
        return began, done.timings["push"] * 1000

    def start_afresh() -> None:
        """The next push writes the whole state, as after an nginx's start."""
        nonlocal given
        given = None

    def in_effect(
        way: str, prober: Prober, value: str | Callable[[str], bool], began: int
    ) -> int | None:
        """When the prober first saw `value`; None (counted) if not within 10 s."""
        try:
            return first_seen(prober, value, began, timeout=10)
        except AssertionError:
            result.count(way, "pushes not in effect within 10 s", 1)
            return None

    for way, shell in (("shell", True), ("engine", False)):
        deployer = NginxDeployer(client.api, shell=shell)
        try:
            deployed = deployer.deploy(target, config.encode())
            if not deployed.ok:
                raise RuntimeError(f"nginx refused the dynamic config: {deployed.error}")
            prober = Prober(lab.published_port(nginx), PROBE_SERVICE, "", max_seconds=300)
            try:
                for _ in range(reps):
                    start_afresh()
                    began, _ = pushed(way, deployer, ())
                    in_effect(way, prober, lambda v: v.startswith("HTTP "), began)
                    began, took = pushed(way, deployer, lines_a)
                    result.add(way, "whole state: push", [took])
                    if (seen := in_effect(way, prober, a.name, began)) is not None:
                        result.add(
                            way, "whole state: push started -> in effect", [(seen - began) / 1e6]
                        )
                for n in range(2 * reps):
                    lines, by = (lines_b, b) if n % 2 == 0 else (lines_a, a)
                    began, took = pushed(way, deployer, lines)
                    result.add(way, "one service changed: push", [took])
                    if (seen := in_effect(way, prober, by.name, began)) is not None:
                        result.add(
                            way,
                            "one service changed: push started -> in effect",
                            [(seen - began) / 1e6],
                        )
            finally:
                prober.stop()
        finally:
            deployer.close()
    loaded: dict[str, list[float]] = {}
    for line in nginx.logs().decode("utf-8", "replace").splitlines():
        if "[error]" in line and "controlplane" in line:
            result.notes.append("nginx said: " + line[line.find("controlplane") :][:300])
        if (found := LOADER_LINE.search(line)) and int(found.group(3)) > 0:
            loaded.setdefault("Lua loader, whole state (its CPU time)", []).append(
                float(found.group(5))
            )
        elif found := DELTA_LINE.search(line):
            loaded.setdefault("Lua loader, a delta (its CPU time)", []).append(
                float(found.group(1))
            )
    result.breakdown["dynamic"] = loaded
    nginx.remove(force=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--planes", default=",".join(PLANES), help="comma-separated subset")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternating turns per plane (joins: see --join-group)",
    )
    parser.add_argument("--joins", type=int, default=20, help="sequential joins per plane")
    parser.add_argument("--join-group", type=int, default=5, help="joins per turn")
    parser.add_argument("--burst", type=int, default=50, help="containers started at once")
    parser.add_argument("--bursts", type=int, default=1, help="bursts per plane")
    parser.add_argument("--cycles", type=int, default=10, help="scale 1<->5 cycles per plane")
    parser.add_argument("--changes", type=int, default=20, help="method switches per plane")
    parser.add_argument("--wrk-seconds", type=float, default=5, help="each requests/s turn")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--push-reps", type=int, default=5, help="whole-state pushes per way")
    parser.add_argument(
        "--haproxy-resolve",
        default="10ms",
        help="HAProxy's resolvers: timeout resolve and hold valid (how often it asks again)",
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenario.split(",") if s.strip()]
    names = [p.strip() for p in args.planes.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS)) + sorted(set(names) - set(PLANES))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}; scenarios {SCENARIOS}, planes {PLANES}")

    client = docker.from_env(version="auto")
    images = ensure_images(client, progress=log)
    haproxy = ensure_haproxy_image(client, progress=log) if "haproxy" in names else ""
    planes = [make_plane(n, client, images, haproxy, args.haproxy_resolve) for n in names]
    push_lab = Lab(client, images, dataplane="dynamic")
    print(machine_line())
    print(
        "planes: dynamic = nginx-lua image, label controlplane.dataplane=dynamic; reload = "
        "nginx image, label reload; both 2 workers, a controller with default flags each. "
        f"haproxy = HAProxy {haproxy_version()} (nbthread = cores), server-template "
        f"{HAPROXY_SLOTS} slots, resolvers on 127.0.0.11: timeout resolve {args.haproxy_resolve}, "
        f"hold valid {args.haproxy_resolve}, hold obsolete 0s (failed answers: the default "
        "30 s hold), timeout retry 1s; health checks every 100 ms (rise 1, fall 1, down at a "
        "first failed connection); timeout connect 1s and retries as the nginx config "
        "(images/haproxy)"
    )
    try:
        for scenario in chosen:
            began = time.monotonic()
            try:
                run(scenario, args, client, planes, push_lab)
            except Exception as error:  # the next scenarios still run, on clean planes
                print(f"\n=== {scenario}: FAILED: {error}")
                for plane in planes:
                    print(f"--- {plane.name}: what {plane.proxy.name} logged last:")
                    print(plane.proxy.logs(tail=20).decode("utf-8", "replace"))
                    plane.reset()
            log(f"{scenario}: {time.monotonic() - began:.0f} s")
    finally:
        for lab in [*(plane.lab for plane in planes), push_lab]:
            try:
                lab.cleanup()
            except docker.errors.APIError as error:
                log(f"cleanup of run {lab.run_id}: {error}")


def run(
    scenario: str,
    args: argparse.Namespace,
    client: docker.DockerClient,
    planes: Sequence[Plane],
    push_lab: Lab,
) -> None:
    if scenario == "joins":
        joins(planes, args.joins, args.join_group).print(
            f"1. sequential joins and stops: {args.joins} per plane, in turns of "
            f"{args.join_group} (so <= {args.join_group + 1} backends in the round robin)"
        )
    elif scenario == "burst":
        burst(planes, args.bursts, args.burst).print(
            f"2. burst of {args.burst} starts (25 threads), {args.bursts} per plane"
        )
    elif scenario == "scale":
        scale(planes, args.rounds, args.cycles).print(
            f"3. scale 1 <-> 5 x{args.cycles} per plane under wrk -t2 -c20 (keep-alive)"
        )
    elif scenario == "algorithm":
        algorithm(planes, args.rounds, args.changes).print(
            f"4. PUT algorithm (ip_hash <-> hash $arg_u) -> served: {args.changes} switches "
            "per nginx plane"
        )
    elif scenario == "throughput":
        throughput(planes, args.rounds, args.wrk_seconds).print(
            f"5. proxied requests/s: wrk -t2 -c20 -d{args.wrk_seconds:g}s keep-alive, 2 nginx "
            f"backends, {args.rounds} turns per plane"
        )
    elif scenario == "push":
        push(client, push_lab, args.services, args.backends, args.push_reps).print(
            f"6. state push: {args.services} services x {args.backends} backends into one "
            "dynamic nginx (NginxDeployer.push_all, through the shell and the engine)"
        )


def haproxy_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        said = subprocess.run(["/usr/sbin/haproxy", "-v"], capture_output=True, text=True)
        if found := re.search(r"version (\S+)", said.stdout):
            return found.group(1)
    return "?"


if __name__ == "__main__":
    main()
