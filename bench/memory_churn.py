"""Controller memory under container churn: RSS after 100 and after 10,000 start/stop cycles.

.venv/bin/python bench/memory_churn.py [--services 50] [--replicas 4] [--cycles 10000]

No Docker: a fake listing where each cycle stops the oldest replica of one service and starts
a new one (a new ID, name and address), with a pass after each of the two events as the
reconciler runs it: build_topology with the memo it keeps, then render_config with its
RenderCache. Nothing but the passes runs, so RSS growth past the first 100 cycles is what the
passes keep. RSS is read from /proc (Linux) after a full collection.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, table
from controlplane.core.build import BuildMemo, build_topology
from controlplane.core.model import ContainerFacts, DockerState, Endpoint, NetworkFacts
from controlplane.core.render import RenderCache, render_config
from controlplane.settings import Settings
from controlplane.templating import load_template

FIRST = 100
NETWORK = NetworkFacts("n" * 64, "app", "bridge", "local")
LB = ContainerFacts(
    id="f" * 64,
    name="lb",
    created="2026-01-01T00:00:00.000000000Z",
    status="running",
    health=None,
    started_at="2026-01-01T00:00:00.000000000Z",
    labels={"controlplane.role": "nginx"},
    exposed_tcp_ports=(80,),
    endpoints=(Endpoint("app", "10.255.255.254", "", ()),),
    stop_signal=None,
)


def replica(service: int, n: int) -> ContainerFacts:
    """The n-th container ever started: a new ID, name and address each time."""
    return ContainerFacts(
        id=f"{n:064x}",
        name=f"svc{service}-{n}",
        created=f"2026-01-01T00:00:01.{n:09d}Z",
        status="running",
        health=None,
        started_at=f"2026-01-01T00:00:01.{n:09d}Z",
        labels={"controlplane.service": f"svc{service}", "controlplane.weight": str(1 + n % 3)},
        exposed_tcp_ports=(8080,),
        endpoints=(Endpoint("app", f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", "", ()),),
        stop_signal=None,
    )


def rss_mib() -> float:
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=4, help="containers per service")
    parser.add_argument("--cycles", type=int, default=10_000, help="start/stop cycles in all")
    args = parser.parse_args()
    if args.cycles < FIRST:
        parser.error(f"--cycles must be at least {FIRST}")
    settings = Settings()
    template = load_template()
    memo, cache = BuildMemo(), RenderCache()
    started = itertools.count()
    fleet = [
        deque(replica(s, next(started)) for _ in range(args.replicas)) for s in range(args.services)
    ]

    def reconcile() -> None:
        state = DockerState((LB, *(c for replicas in fleet for c in replicas)), (NETWORK,))
        topology = build_topology(state, settings.build_options, {}, memo=memo)
        render_config(topology, template, settings.render_options, cache)

    reconcile()
    after: dict[int, float] = {}
    for cycle in range(1, args.cycles + 1):
        replicas = fleet[cycle % args.services]
        replicas.popleft()
        reconcile()
        replicas.append(replica(cycle % args.services, next(started)))
        reconcile()
        if cycle in (FIRST, args.cycles):
            after[cycle] = rss_mib()
    print(machine_line())
    print(
        f"{args.services} services x {args.replicas} replicas running, {args.cycles} cycles "
        "(stop one, pass, start one, pass)\n"
    )
    print(
        table(
            [
                [f"RSS after {FIRST} cycles", f"{after[FIRST]:.1f}", "MiB"],
                [f"RSS after {args.cycles} cycles", f"{after[args.cycles]:.1f}", "MiB"],
                ["growth", f"{after[args.cycles] - after[FIRST]:+.1f}", "MiB"],
                ["cores", str(os.cpu_count()), ""],
            ],
            header=("metric", "value", "unit"),
        )
    )


if __name__ == "__main__":
    main()
