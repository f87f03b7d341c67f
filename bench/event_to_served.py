"""Event to served: how long from `docker run` / `docker stop` until nginx routes accordingly,
where each millisecond goes, and how many reloads a burst of starts costs.

Runs a real controller (in this process, to read its reports), a managed nginx and busybox
backends from the offline test images, and a bounded HTTP load on loopback. Run:

    .venv/bin/python bench/event_to_served.py [--events 50]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Prober, machine_line, row, table
from controlplane.reconciler import ReconcileReport
from controlplane.settings import Settings
from controlplane.wiring import build_controller
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
    return {
        "event: engine -> controller": (trigger.received_ns - trigger.time_ns) / 1e6,
        "debounce (quiet window)": (report.started_ns - trigger.received_ns) / 1e6,
        "list + inspect": report.timings["list"] * 1000,
        "build + render": report.timings["render"] * 1000,
        "copy (put_archive)": deploy.get("copy", 0) * 1000,
        "nginx -t (exec)": deploy.get("test", 0) * 1000,
        "SIGHUP": deploy.get("reload", 0) * 1000,
        "new workers -> routed": (routed_ns - reconcile_end) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50, help="run/stop pairs to measure")
    parser.add_argument("--burst", type=int, default=50, help="containers started at once")
    args = parser.parse_args()

    client = docker.from_env(version="auto")
    lab = Lab(client, ensure_images(client, progress=lambda line: print(line, file=sys.stderr)))
    reports: list[ReconcileReport] = []
    try:
        net = lab.network("bench")
        lb = lab.nginx(net)
        steady = lab.backend(net, alias=HOST)
        settings = Settings(networks=frozenset({net.name}), templates_dir=TEMPLATES)
        controller = build_controller(settings)
        controller.reconciler.on_report.append(reports.append)
        loop = threading.Thread(target=controller.loop.run, daemon=True)
        loop.start()
        wait_until(controller.loop.ready.is_set)
        port = lab.published_port(lb)
        prober = Prober(port, HOST, "x-upstream", max_seconds=60 + args.events * 6)
        steady_ip = steady.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        serving_since = wait_until(
            lambda: prober.first(lambda v: steady_ip in v, 0), what="steady backend"
        )

        run_total: list[float] = []
        stop_total: list[float] = []
        breakdown: dict[str, dict[str, list[float]]] = {"run": {}, "stop": {}}
        for _ in range(args.events):
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
            run_total.append((routed - returned) / 1e6)
            report = report_for(reports, new.id, before)
            if report is not None:
                for name, value in phases(report, routed).items():
                    breakdown["run"].setdefault(name, []).append(value)
            time.sleep(random.uniform(0.1, 0.3))

            stop_called = time.time_ns()
            new.stop(timeout=10)
            time.sleep(0.3)
            last = prober.last(lambda v, ip=ip: ip in v) or stop_called
            stop_total.append(max(0.0, (last - stop_called) / 1e6))
            report = report_for(reports, new.id, stop_called)
            if report is not None:
                for name, value in phases(report, last).items():
                    breakdown["stop"].setdefault(name, []).append(value)
            new.remove(force=True)
            time.sleep(random.uniform(0.1, 0.3))
        prober.stop()
        measured = [h for h in prober.hits if h.started_ns >= serving_since]
        failed = sum(1 for h in measured if h.failed)

        created = [lab.backend(net, alias="burst", start=False) for _ in range(args.burst)]
        count_before = sum(1 for r in reports if r.deployed)
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=25) as pool:
            list(pool.map(lambda c: c.start(), created))
        span = time.monotonic() - began
        wait_until(
            lambda: (
                controller.reconciler.snapshot is not None
                and all(f"# {c.name}" in controller.reconciler.snapshot.config for c in created)
            ),
            timeout=60,
        )
        time.sleep(1.5)
        burst_reloads = sum(1 for r in reports if r.deployed) - count_before
        controller.loop.stop()
        loop.join(timeout=10)
    finally:
        lab.cleanup()

    print(machine_line())
    print(
        f"{args.events} run/stop pairs through one managed nginx (2 workers), "
        "one client sending requests back to back\n"
    )
    rows = [
        row("docker run returned -> first request routed to it", run_total),
        row("docker stop called -> last request routed to it", stop_total),
    ]
    print(table(rows))
    for kind in ("run", "stop"):
        print(f"\nbreakdown, {kind} (from the controller's reports):")
        print(table([row(name, values) for name, values in breakdown[kind].items()]))
    print(f"\nrequests sent while measuring: {len(measured)}, failed or not proxied: {failed}")
    print(
        f"burst: {args.burst} containers started by 25 threads over {span:.1f} s "
        f"-> {burst_reloads} reloads (quiet window 50 ms, max wait 1 s)"
    )


if __name__ == "__main__":
    main()
