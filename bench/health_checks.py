"""Active health checks with real Docker and nginx (issue 16), both data planes side by side in
one run, their turns alternating: how long a backend whose health path starts answering 500,
or that accepts and never answers, takes to go out of nginx and DNS (the bound: interval x
fails + 1 s); how long it takes to come back once it passes again (interval x passes + 1 s);
and, on the everyday path beside them, how long a newly started backend takes to be served
with an active http check and with the readiness gate alone (no health label).

Each data plane (reload: the nginx image; dynamic: the nginx-lua image) has its own network,
managed nginx published on loopback, and backends from the offline images: `web`, two backends
checked every 500 ms (timeout 300 ms, fails 2, passes 2) whose /health a `docker exec C
/health.sh 500|ok|hang` switches (images/backend), and `checked` and `plain`, one steady
backend each, for the joins. A controller with default flags and DNS on loopback runs in this
process for each turn (so its snapshot and reports can be read) and is closed after it.

- `500 -> out`, `hang -> out`: from the `docker exec` returning to the later of: requests
  through nginx no longer reaching the backend (the first request after its last one, once
  20 more were all answered by the other backend; one client, back to back, a new
  connection each) and the controller's DNS no longer listing its address. The controller's
  own view (its snapshot's serves) is beside it, for comparison.
- `ok -> back`: from `/health.sh ok` returning to the first request through nginx it answers.
- `join`: from `container.start()` returning to the first request through nginx it answers,
  into `checked` (the same check's labels) or `plain` (none), alternating.
- reloads: counted in nginx's own log over the health flips (the joins left out).

Requests go only to loopback ports; everything the bench creates carries controlplane.test=1
and is removed at the end, on failure and on Ctrl-C too. Run (~3.5 min by default on 2 cores):

    .venv/bin/python bench/health_checks.py [--cycles 10] [--rounds 2]
        [--planes reload,dynamic]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import docker
import docker.errors
from dnslib import QTYPE, DNSRecord
from docker.models.containers import Container
from docker.models.networks import Network

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Prober, Running, machine_line, row, table
from bench.dataplane import first_seen, ip_of, log, pass_end_ns, pass_for, pass_phases, share
from controlplane.core import labels as L
from controlplane.settings import Settings
from images.build import OfflineImages, ensure_images
from tests.support.lab import Lab, wait_until
from tests.support.ports import free_port
from tests.support.served import served_names

PLANES = ("reload", "dynamic")
INTERVAL, TIMEOUT, FAILS, PASSES = 0.5, 0.3, 2, 2
CHECK = {
    L.HEALTH_PATH: "/health",
    L.HEALTH_INTERVAL: f"{INTERVAL * 1000:.0f}ms",
    L.HEALTH_TIMEOUT: f"{TIMEOUT * 1000:.0f}ms",
    L.HEALTH_FAILS: str(FAILS),
    L.HEALTH_PASSES: str(PASSES),
}
OUT_BOUND = INTERVAL * FAILS + 1.0
BACK_BOUND = INTERVAL * PASSES + 1.0
STREAK = 20
"""Requests in a row answered by the other backend that show a client it is out."""
GIVE_UP = 15.0
"""Seconds a flip or a join is waited for at most; one that takes longer is counted."""
POLL = 0.01
"""Seconds between two looks at the controller's snapshot and DNS."""
DOMAIN = Settings().dns_domain

Samples = dict[str, list[float]]


@dataclass
class Figures:
    """Per data plane: the table's samples (ms), the counts, where the time went."""

    samples: dict[str, dict[str, tuple[list[float], float | None]]] = field(default_factory=dict)
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    breakdown: dict[str, dict[str, Samples]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, plane: str, metric: str, ms: float, bound: float | None = None) -> None:
        self.samples.setdefault(plane, {}).setdefault(metric, ([], bound))[0].append(ms)

    def count(self, plane: str, what: str, value: float = 1) -> None:
        counts = self.counts.setdefault(plane, {})
        counts[what] = counts.get(what, 0) + value

    def phases(self, plane: str, section: str, phases: Mapping[str, float | list[float]]) -> None:
        into = self.breakdown.setdefault(plane, {}).setdefault(section, {})
        for name, value in phases.items():
            into.setdefault(name, []).extend(value if isinstance(value, list) else [value])

    def print(self, planes: Sequence[str]) -> None:
        header = ("data plane", "measurement", "p50", "p99", "max", "n", "bound", "over", "unit")
        rows = []
        for plane in planes:
            for metric, (values, bound) in self.samples.get(plane, {}).items():
                over = "-" if bound is None else str(sum(1 for v in values if v > bound * 1000))
                shown = "-" if bound is None else f"{bound * 1000:.0f}"
                rows.append([plane, *row(metric, values)[:5], shown, over, "ms"])
        print(table(rows, header))
        for plane in planes:
            counts = self.counts.get(plane, {})
            if counts:
                print(f"[{plane}] " + ", ".join(f"{what}: {n:g}" for what, n in counts.items()))
        for note in self.notes:
            print(note)
        for plane in planes:
            for section, phases in self.breakdown.get(plane, {}).items():
                print(f"\nwhere the time goes [{plane}] {section} (ms):")
                print(table([row(name, values) for name, values in phases.items()]))
        sys.stdout.flush()


@dataclass
class Rig:
    """One data plane's network, nginx and backends; its controller runs for each turn."""

    plane: str
    lab: Lab
    net: Network
    lb: Container
    port: int
    good: Container
    bad: Container
    steady: dict[str, Container]
    """By service: the `checked` and `plain` backends that serve throughout the joins."""

    @classmethod
    def make(cls, plane: str, lab: Lab) -> Rig:
        net = lab.network(plane)
        lb = lab.nginx(net)
        good = lab.backend(net, labels=CHECK)
        bad = lab.backend(net, labels=CHECK)
        steady = {
            "checked": lab.backend(net, alias="checked", labels=CHECK),
            "plain": lab.backend(net, alias="plain"),
        }
        return cls(plane, lab, net, lb, lab.published_port(lb), good, bad, steady)

    @contextlib.contextmanager
    def controlled(self) -> Iterator[Controlled]:
        """A controller with default flags and DNS on a free loopback port, for one turn."""
        dns = free_port()
        settings = Settings(
            networks=frozenset({str(self.net.name)}),
            dns_binds=(f"127.0.0.1:{dns}",),
            dns_keep=0,
        )
        running = Running(settings)
        try:
            yield Controlled(running, dns)
        finally:
            running.close()


@dataclass
class Controlled:
    running: Running
    dns: int

    def serves(self, service: str) -> frozenset[str]:
        """The backends the controller's snapshot lets have traffic, by container name."""
        return served_names(self.running.controller.reconciler.snapshot, service)

    def listed(self, service: str) -> frozenset[str] | None:
        """The addresses the controller's DNS answers for the service; None: no answer."""
        question = DNSRecord.question(f"{service}.{DOMAIN}", "A")
        try:
            reply = DNSRecord.parse(question.send("127.0.0.1", self.dns, timeout=1.0))
        except (OSError, ValueError):
            return None
        return frozenset(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A)

    def decided_ns(self, container: Container, state: str) -> int | None:
        """When the checks put the container in `state` (up, down), by its health's since."""
        for (container_id, _), health in self.running.controller.reconciler.health().items():
            if container_id == container.id and health.state == state:
                return int(health.since * 1e9)
        return None


def switch(container: Container, mode: str) -> tuple[int, int]:
    """`/health.sh MODE` in the backend: when the exec was called and when it returned (ns)."""
    called = time.time_ns()
    code, output = container.exec_run(["/health.sh", mode])
    returned = time.time_ns()
    if code != 0:
        raise RuntimeError(f"/health.sh {mode} in {container.name} said: {output!r}")
    return called, returned


def out_since(prober: Prober, gone: str, stay: str, after_ns: int) -> int | None:
    """When requests stopped reaching `gone`: the first request after its last one, once
    STREAK requests after that were answered by `stay`."""
    hits = [h for h in list(prober.hits) if h.started_ns >= after_ns]
    last = max((i for i, h in enumerate(hits) if h.value == gone), default=-1)
    rest = hits[last + 1 :]
    if sum(1 for h in rest if h.value == stay) < STREAK:
        return None
    return rest[0].started_ns


def poll(
    what: str, checks: Mapping[str, Callable[[], int | None]], timeout: float = GIVE_UP
) -> dict[str, int]:
    """Each check's first time (ns), every POLL seconds until all have one; bounded."""
    found: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(checks):
        for name, check in checks.items():
            if name not in found and (seen := check()) is not None:
                found[name] = seen
        if len(found) == len(checks):
            break
        if time.monotonic() > deadline:
            missing = sorted(checks.keys() - found.keys())
            raise TimeoutError(f"{what}: {', '.join(missing)} not seen within {timeout:g} s")
        time.sleep(POLL)
    return found


def now_if(condition: bool) -> int | None:
    return time.time_ns() if condition else None


def gone(ctl: Controlled, service: str, name: str) -> Callable[[], bool]:
    """For polling: the container is out of the controller's snapshot."""
    return lambda: name not in ctl.serves(service)


def pass_breakdown(
    figures: Figures,
    rig: Rig,
    ctl: Controlled,
    section: str,
    mark: int,
    decided: int | None,
    seen: int,
) -> None:
    """Where one flip's time went: the checks' decision, the pass it woke, nginx."""
    phases: dict[str, float] = {}
    if decided is not None:
        phases["exec returned -> the checks decided (probes)"] = (decided - mark) / 1e6
        report = pass_for(ctl.running.reports, decided - 2_000_000, rig.bad.name)
        if report is not None:
            phases["decided -> its pass starts"] = (report.started_ns - decided) / 1e6
            phases["  list + inspect"] = report.timings.get("list", 0) * 1000
            phases["  build + render"] = report.timings.get("render", 0) * 1000
            phases["  readiness wait"] = report.timings.get("ready", 0) * 1000
            way = "push" if all(d.pushed for d in report.deployed) else "reload"
            phases[f"  deploy ({way}, all steps)"] = report.timings.get("deploy", 0) * 1000
            phases["pass done -> seen by the client (< 0: before the pass ended)"] = (
                seen - pass_end_ns(report)
            ) / 1e6
    figures.phases(rig.plane, section, phases)


def flip_out(figures: Figures, rig: Rig, ctl: Controlled, prober: Prober, mode: str) -> None:
    bad_ip = ip_of(rig.bad, rig.net)
    called, mark = switch(rig.bad, mode)
    figures.phases(rig.plane, "docker exec /health.sh", {"call -> return": (mark - called) / 1e6})
    seen = poll(
        f"{rig.plane}: {rig.bad.name} out after /health.sh {mode}",
        {
            "nginx": lambda: out_since(prober, str(rig.bad.name), str(rig.good.name), mark),
            "dns": lambda: now_if(
                (ips := ctl.listed("web")) is not None and bad_ip not in ips and bool(ips)
            ),
            "snapshot": lambda: now_if(rig.bad.name not in ctl.serves("web")),
        },
    )
    client = max(seen["nginx"], seen["dns"])
    figures.add(
        rig.plane, f"{mode} -> out (nginx + DNS, as clients see)", (client - mark) / 1e6, OUT_BOUND
    )
    figures.add(
        rig.plane,
        f"{mode} -> out: the controller's snapshot",
        (seen["snapshot"] - mark) / 1e6,
        OUT_BOUND,
    )
    decided = ctl.decided_ns(rig.bad, "down")
    section = f"{mode} -> out"
    pass_breakdown(figures, rig, ctl, section, mark, decided, seen["nginx"])
    figures.phases(
        rig.plane,
        section,
        {
            "exec returned -> out of nginx": (seen["nginx"] - mark) / 1e6,
            "exec returned -> out of DNS": (seen["dns"] - mark) / 1e6,
        },
    )


def flip_back(figures: Figures, rig: Rig, ctl: Controlled, prober: Prober) -> None:
    bad_ip = ip_of(rig.bad, rig.net)
    _, mark = switch(rig.bad, "ok")
    seen = poll(
        f"{rig.plane}: {rig.bad.name} back after /health.sh ok",
        {
            "nginx": lambda: prober.first(lambda v: v == rig.bad.name, mark),
            "dns": lambda: now_if(bad_ip in (ctl.listed("web") or ())),
            "snapshot": lambda: now_if(rig.bad.name in ctl.serves("web")),
        },
    )
    figures.add(
        rig.plane, "ok -> back (nginx, as clients see)", (seen["nginx"] - mark) / 1e6, BACK_BOUND
    )
    figures.add(
        rig.plane,
        "ok -> back: the controller's snapshot",
        (seen["snapshot"] - mark) / 1e6,
        BACK_BOUND,
    )
    decided = ctl.decided_ns(rig.bad, "up")
    pass_breakdown(figures, rig, ctl, "ok -> back", mark, decided, seen["nginx"])
    figures.phases(rig.plane, "ok -> back", {"exec returned -> in DNS": (seen["dns"] - mark) / 1e6})


def flips(figures: Figures, rig: Rig, ctl: Controlled, cycles: int) -> None:
    """`cycles` times: 500 -> out, ok -> back, hang -> out, ok -> back, each switch at a
    random moment of the checks' schedule; one client sends requests to `web` throughout."""
    prober = Prober(rig.port, "web", "", max_seconds=60 + cycles * 4 * GIVE_UP)
    before = rig.lab.reloads(rig.lb)
    begun = time.time_ns()
    try:
        both = {rig.good.name, rig.bad.name}
        wait_until(
            lambda: both <= {h.value for h in prober.hits if h.started_ns >= begun},
            timeout=GIVE_UP,
            what=f"{rig.plane}: both web backends served",
        )
        for _ in range(cycles):
            for mode in ("500", "hang"):
                time.sleep(random.uniform(0.1, 0.1 + INTERVAL))
                try:
                    flip_out(figures, rig, ctl, prober, mode)
                    time.sleep(random.uniform(0.1, 0.1 + INTERVAL))
                    flip_back(figures, rig, ctl, prober)
                except TimeoutError as error:
                    figures.count(rig.plane, f"{mode} flips given up after {GIVE_UP:g} s")
                    figures.notes.append(f"[{rig.plane}] {error}")
                    switch(rig.bad, "ok")
                    wait_until(lambda: rig.bad.name in ctl.serves("web"), timeout=GIVE_UP)
        hits = [h for h in prober.hits if h.started_ns >= begun]
    finally:
        prober.stop()
    figures.count(rig.plane, "health flips", cycles * 4)
    figures.count(rig.plane, "nginx reloads over them (its log)", rig.lab.reloads(rig.lb) - before)
    figures.count(rig.plane, "requests to web", len(hits))
    figures.count(rig.plane, "failed", sum(1 for h in hits if h.failed))


JOINS = (("join, active http check", "checked"), ("join, readiness gate only", "plain"))


def joins(figures: Figures, rig: Rig, ctl: Controlled, count: int) -> None:
    """`count` joins of each kind, alternating: a backend created beforehand, started, timed
    to its first request through nginx, then removed (and out of the controller's snapshot
    before the next)."""
    for n in range(2 * count):
        metric, service = JOINS[n % 2]
        steady = rig.steady[service]
        joiner = rig.lab.backend(
            rig.net, alias=service, labels=CHECK if service == "checked" else None, start=False
        )
        prober = Prober(rig.port, service, "", max_seconds=2 * GIVE_UP + 10)
        try:
            begun = time.time_ns()
            first_seen(prober, str(steady.name), begun, timeout=GIVE_UP)
            joiner.start()
            returned = time.time_ns()
            try:
                routed = first_seen(prober, str(joiner.name), returned, timeout=GIVE_UP)
            except AssertionError:
                figures.count(rig.plane, f"{metric}: not served within {GIVE_UP:g} s")
                continue
            figures.add(rig.plane, metric, (routed - returned) / 1e6)
            report = pass_for(ctl.running.reports, returned, joiner.name)
            if report is not None:
                phases = pass_phases(report, returned, routed, "start returned")
                figures.phases(rig.plane, metric, phases)
        finally:
            prober.stop()
            joiner.remove(force=True)
        wait_until(
            gone(ctl, service, str(joiner.name)),
            timeout=GIVE_UP,
            what=f"{rig.plane}: {joiner.name} gone from the snapshot",
        )


def turn(figures: Figures, rig: Rig, cycles: int, join_count: int) -> None:
    log(f"{rig.plane}: {cycles} flip cycles, {join_count} joins of each kind")
    with rig.controlled() as ctl:
        if cycles:
            flips(figures, rig, ctl, cycles)
        if join_count:
            joins(figures, rig, ctl, join_count)


def interrupted(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C or a kill: everything created is removed on the way out (SIGINT is handled
    even where a shell started the bench with it ignored)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10, help="repetitions of each figure")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating turns per plane (cycles split)"
    )
    parser.add_argument("--planes", default=",".join(PLANES), help="comma-separated subset")
    args = parser.parse_args()
    planes = [p.strip() for p in args.planes.split(",") if p.strip()]
    if unknown := sorted(set(planes) - set(PLANES)):
        parser.error(f"unknown planes: {', '.join(unknown)}; known: {', '.join(PLANES)}")
    if args.cycles < 1 or args.rounds < 1:
        parser.error("--cycles and --rounds must be at least 1")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupted)

    client = docker.from_env(version="auto")
    images: OfflineImages = ensure_images(client, progress=log)
    labs = {p: Lab(client, images, dataplane=p) for p in planes}
    figures = Figures()
    began = time.monotonic()
    try:
        rigs = [Rig.make(p, labs[p]) for p in planes]
        for r in range(args.rounds):
            shift = r % len(rigs)
            for rig in [*rigs[shift:], *rigs[:shift]]:
                part = share(args.cycles, args.rounds, r)
                turn(figures, rig, part, part)
    finally:
        for lab in labs.values():
            try:
                lab.cleanup()
            except docker.errors.APIError as error:
                log(f"cleanup of run {lab.run_id}: {error}")
    print(machine_line())
    print(
        f"per plane: {args.cycles} cycles of 500 -> out, ok -> back, hang -> out, ok -> back "
        f"and {args.cycles} joins of each kind, in {args.rounds} alternating turns; checks "
        f"every {INTERVAL * 1000:.0f} ms, timeout {TIMEOUT * 1000:.0f} ms, fails {FAILS}, "
        f"passes {PASSES}; out = {STREAK} requests in a row answered by the other backend and "
        f"DNS without its address; ok -> back after both kinds of flip; shared, noisy "
        f"machine; {time.monotonic() - began:.0f} s"
    )
    low, high = INTERVAL * (FAILS - 1), INTERVAL * FAILS
    print(
        "the checks' own part, by design: the next probe is due 0 to interval after the "
        f"switch, then (fails - 1) x interval more (+ the timeout for a hang): 500 -> down "
        f"{low:g}-{high:g} s, hang -> down {low + TIMEOUT:g}-{high + TIMEOUT:g} s, ok -> up "
        f"{INTERVAL * (PASSES - 1):g}-{INTERVAL * PASSES:g} s, less the part of the docker "
        "exec after the switch"
    )
    figures.print(planes)


if __name__ == "__main__":
    main()
