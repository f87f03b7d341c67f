"""Render at scale: 1,000 services x 10 backends through the pure core, and nginx -t on it.

.venv/bin/python bench/render_scale.py [--services 1000] [--backends 10] [--runs 20]
    [--cold-runs 5]

Cold: build_topology + render_config with every memo empty (a new BuildMemo and a new
RenderCache), as at start-up. One container changed: the pass after an
event, memos warm. A full collection runs before each timed pass, so no pass pays for the
garbage of the one before; the collections a pass triggers itself are counted.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, row, table
from controlplane.core.build import BuildMemo, build_topology
from controlplane.core.model import ContainerFacts, DockerState, Endpoint, NetworkFacts
from controlplane.core.observe import container_facts
from controlplane.core.render import RenderCache, render_config
from controlplane.templating import load_template

METHODS = ["round_robin", "least_conn", "ip_hash", "random"]


def docker_state(services: int, backends: int) -> DockerState:
    containers: list[ContainerFacts] = []
    for s in range(services):
        for b in range(backends):
            n = s * backends + b
            containers.append(
                ContainerFacts(
                    id=f"{n:064x}",
                    name=f"svc{s}-{b}",
                    created=f"2026-01-01T00:00:00.{n:09d}Z",
                    status="running",
                    health=None,
                    started_at="2026-01-01T00:00:00.000000000Z",
                    labels={
                        "controlplane.algorithm": METHODS[s % len(METHODS)],
                        "controlplane.weight": str(1 + b % 3),
                    },
                    exposed_tcp_ports=(8080,),
                    endpoints=(
                        Endpoint(
                            "app", f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", "", (f"svc{s}",)
                        ),
                    ),
                    stop_signal=None,
                )
            )
    lb = container_facts(
        {
            "Id": "f" * 64,
            "Name": "/lb",
            "State": {"Status": "running"},
            "Config": {"Labels": {"controlplane.role": "nginx"}},
            "NetworkSettings": {"Networks": {"app": {"IPAddress": "10.255.255.254"}}},
        }
    )
    return DockerState(
        containers=(*containers, lb), networks=(NetworkFacts("n", "app", "bridge", "local"),)
    )


def nginx_t(config: str) -> float | None:
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if nginx is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "cp.conf").write_text(config)
        (root / "nginx.conf").write_text(
            f"pid {root}/pid;\nerror_log {root}/err;\nevents {{}}\n"
            f"http {{ include {root}/cp.conf; }}\n"
        )
        started = time.perf_counter()
        result = subprocess.run(
            [nginx, "-t", "-p", directory, "-e", f"{root}/err", "-c", f"{root}/nginx.conf"],
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"nginx -t failed on the rendered config:\n{result.stderr}")
        return elapsed


def one_changed(state: DockerState, run: int) -> DockerState:
    """One container's weight label changed, as one event would."""
    containers = list(state.containers)
    changed = containers[run % len(containers)]
    containers[run % len(containers)] = replace(
        changed, labels={**changed.labels, "controlplane.weight": str(5 + run % 100)}
    )
    return replace(state, containers=tuple(containers))


def timed(
    state: DockerState,
    template: jinja2.Template,
    memo: BuildMemo,
    cache: RenderCache,
    into: dict[str, list[float]],
) -> str:
    gc.collect()
    t0 = time.perf_counter()
    topology = build_topology(state, memo=memo)
    t1 = time.perf_counter()
    config = render_config(topology, template, cache=cache)
    t2 = time.perf_counter()
    into["build"].append((t1 - t0) * 1000)
    into["render"].append((t2 - t1) * 1000)
    into["total"].append((t2 - t0) * 1000)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20, help="passes with one container changed")
    parser.add_argument("--cold-runs", type=int, default=5, help="passes with every memo empty")
    args = parser.parse_args()
    state = docker_state(args.services, args.backends)
    template = load_template()
    cold: dict[str, list[float]] = {"build": [], "render": [], "total": []}
    warm: dict[str, list[float]] = {"build": [], "render": [], "total": []}
    for _ in range(args.cold_runs):
        timed(state, template, BuildMemo(), RenderCache(), cold)
    memo, cache = BuildMemo(), RenderCache()
    config = render_config(build_topology(state, memo=memo), template, cache=cache)
    for run in range(args.runs):
        state = one_changed(state, run)
        config = timed(state, template, memo, cache, warm)
    check = nginx_t(config)
    print(machine_line())
    print(
        f"{args.services} services x {args.backends} backends, "
        f"{len(config) / 1e6:.1f} MB of config, {args.cold_runs} cold runs, "
        f"{args.runs} runs with one container changed\n"
    )
    rows = [
        row("cold: build_topology", cold["build"]),
        row("cold: render_config", cold["render"]),
        row("cold: build + render", cold["total"]),
        row("one container changed: build_topology", warm["build"]),
        row("one container changed: render_config", warm["render"]),
        row("one container changed: build + render", warm["total"]),
    ]
    if check is not None:
        rows.append(row("nginx -t on the host (once, apart)", [check * 1000]))
    print(table(rows))


if __name__ == "__main__":
    main()
