"""Event to served: how long from `docker run` / `docker stop` until nginx routes accordingly,
where each millisecond goes, and how many reloads a burst of starts costs.

Runs a real controller (in this process, to read its reports), a managed nginx and busybox
backends from the offline test images, and a bounded HTTP load on loopback; both ways into
nginx side by side. Run:

    .venv/bin/python bench/event_to_served.py [--events 50] [--burst 50]
        [--ways shell,shell-keep-workers,engine]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.models.containers import Container
from docker.models.networks import Network

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Prober, Running, machine_line, row, table
from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from images.build import ensure_images
from tests.support.lab import DRAINING, Lab, wait_until

TEMPLATES = Path(__file__).resolve().parent / "templates"
HOST = "bench"


def report_for(
    reports: list[ReconcileReport], container_id: str, after_ns: int
) -> ReconcileReport | None:
    """The pass whose burst this container's event opened (or joined), and that deployed."""
    for report in reports:
        if report.started_ns >= after_ns and report.deployed and report.trigger is not None:
            return report
    return None


def phases(report: ReconcileReport, routed_ns: int) -> dict[str, float]:
    trigger = report.trigger
    assert trigger is not None
    deploy = report.deployed[0].timings
    reconcile_end = report.started_ns + sum(report.timings.values()) * 1e9
    via = report.deployed[0].via
    return {
        "event: engine -> controller": (trigger.received_ns - trigger.time_ns) / 1e6,
        "wait in the loop (coalescing)": (report.started_ns - trigger.received_ns) / 1e6,
        "list + inspect": report.timings["list"] * 1000,
        "build + render": report.timings["render"] * 1000,
        f"write the file ({via})": deploy.get("copy", 0) * 1000,
        f"nginx -t ({via})": deploy.get("test", 0) * 1000,
        f"SIGHUP ({via})": deploy.get("reload", 0) * 1000,
        "new workers up, old ones told to quit": deploy.get("retire", 0) * 1000,
        "deploy done -> first request routed": (routed_ns - reconcile_end) / 1e6,
    }


@dataclass
class Measured:
    run: list[float] = field(default_factory=list)
    stop: list[float] = field(default_factory=list)
    breakdown: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {"run": {}, "stop": {}}
    )
    requests: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Burst:
    service: str
    span: float
    reloads: int
    served_after: float
    """From the last start returning to every new backend in the config, seconds."""


def run_stop_pairs(
    lab: Lab, net: Network, lb: Container, steady_ip: str, running: Running, events: int
) -> Measured:
    """`events` backends started then stopped one at a time, a bounded prober watching."""
    result = Measured()
    prober = Prober(lab.published_port(lb), HOST, "x-upstream", max_seconds=60 + events * 6)
    serving_since = wait_until(
        lambda: prober.first(lambda v: steady_ip in v, 0), what="steady backend"
    )
    for _ in range(events):
        before = time.time_ns()
        # Keeps answering 200 for 1 s after SIGTERM, like an app finishing its work: the
        # last request routed to it then shows when nginx stopped routing, not when its
        # passive health check gave up on a 503.
        new = lab.backend(net, alias=HOST, env=DRAINING)
        returned = time.time_ns()
        ip = new.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        routed = wait_until(
            lambda ip=ip, before=before: prober.first(lambda v: ip in v, before),
            timeout=10,
            interval=0.002,
        )
        result.run.append((routed - returned) / 1e6)
        report = report_for(running.reports, new.id, before)
        if report is not None:
            for name, value in phases(report, routed).items():
                result.breakdown["run"].setdefault(name, []).append(value)
        time.sleep(random.uniform(0.1, 0.3))

        stop_called = time.time_ns()
        new.stop(timeout=10)
        time.sleep(0.3)
        last = prober.last(lambda v, ip=ip: ip in v) or stop_called
        result.stop.append(max(0.0, (last - stop_called) / 1e6))
        report = report_for(running.reports, new.id, stop_called)
        if report is not None:
            for name, value in phases(report, last).items():
                result.breakdown["stop"].setdefault(name, []).append(value)
        new.remove(force=True)
        time.sleep(random.uniform(0.1, 0.3))
    prober.stop()
    measured = [h for h in prober.hits if h.started_ns >= serving_since]
    result.requests = len(measured)
    result.failed = sum(1 for h in measured if h.failed)
    return result


def burst(lab: Lab, net: Network, running: Running, service: str, count: int) -> Burst:
    """`count` created containers started by 25 threads, as fast as dockerd starts them."""
    created = [lab.backend(net, alias=service, start=False) for _ in range(count)]
    time.sleep(2)  # calm, so that the burst's first backend goes at once
    before = running.reloads
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=25) as pool:
        list(pool.map(lambda c: c.start(), created))
    ended = time.monotonic()
    snapshot = lambda: running.controller.reconciler.snapshot  # noqa: E731
    wait_until(
        lambda: all(f"# {c.name}" in snapshot().config for c in created),  # type: ignore[union-attr]
        timeout=60,
        interval=0.01,
    )
    served = time.monotonic() - ended
    time.sleep(1.5)
    reloads = running.reloads - before
    for container in created:
        container.remove(force=True)
    time.sleep(1.5)
    return Burst(service, ended - began, reloads, served)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50, help="run/stop pairs per deploy way")
    parser.add_argument("--burst", type=int, default=50, help="containers started at once")
    parser.add_argument(
        "--ways",
        default="shell,shell-keep-workers,engine",
        help="deploy ways to compare side by side: shell (a shell kept open in nginx), "
        "shell-keep-workers (the same, nginx retiring its old workers itself 100 ms after "
        "the reload), engine (docker cp + exec + kill)",
    )
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]

    client = docker.from_env(version="auto")
    lab = Lab(client, ensure_images(client, progress=lambda line: print(line, file=sys.stderr)))
    results: dict[str, Measured] = {}
    bursts: list[Burst] = []
    try:
        net = lab.network("bench")
        lb = lab.nginx(net)
        steady = lab.backend(net, alias=HOST)
        steady_ip = steady.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        for way in ways:
            settings = Settings(
                networks=frozenset({net.name}),
                templates_dir=TEMPLATES,
                nginx_shell=way.startswith("shell"),
                retire_old_workers=way == "shell",
            )
            running = Running(settings)
            try:
                results[way] = run_stop_pairs(lab, net, lb, steady_ip, running, args.events)
                if way == ways[0] and args.burst:
                    bursts.append(burst(lab, net, running, "burst", args.burst))
                    bursts.append(burst(lab, net, running, HOST, args.burst))
            finally:
                running.close()
    finally:
        lab.cleanup()

    print(machine_line())
    print(
        f"{args.events} run/stop pairs per deploy way through one managed nginx (2 workers), "
        "one client sending requests back to back; quiet window 50 ms\n"
    )
    rows = []
    for way, result in results.items():
        rows.append(row(f"[{way}] docker run returned -> first request routed to it", result.run))
        rows.append(row(f"[{way}] docker stop called -> last request routed to it", result.stop))
    print(table(rows))
    for way, result in results.items():
        for kind in ("run", "stop"):
            print(f"\nbreakdown [{way}], {kind} (from the controller's reports):")
            print(table([row(n, v) for n, v in result.breakdown[kind].items()]))
        print(f"requests sent: {result.requests}, failed or not proxied: {result.failed}")
    for b in bursts:
        print(
            f"\nburst into {'a new service' if b.service == 'burst' else 'a serving service'}: "
            f"{args.burst} containers started by 25 threads over {b.span:.1f} s -> "
            f"{b.reloads} reloads; all in the config {b.served_after:.2f} s after the last start "
            f"returned (--batch-quiet {Settings().batch_quiet:g}, "
            f"--batch-max {Settings().batch_max:g})"
        )


if __name__ == "__main__":
    main()
