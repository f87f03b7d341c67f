"""Render at scale: 1,000 services x 10 backends through the pure core, and nginx -t on it.

.venv/bin/python bench/render_scale.py [--services 1000] [--backends 10] [--runs 20]
    [--cold-runs 5] [--against RENDER_PY]

Cold: build_topology + render_config with every memo empty (a new BuildMemo and a new
RenderCache), as at start-up. One container changed: the pass after an
event, memos warm. A full collection runs before each timed pass, so no pass pays for the
garbage of the one before; the collections a pass triggers itself are counted.

--against times another version of controlplane/core/render.py beside this one, e.g.
`git show HEAD~1:controlplane/core/render.py > /tmp/render_before.py`: this machine's speed
drifts from minute to minute, so each pass runs with both, in turns, each with its own memos,
and the two configs must be byte-identical.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, percentile, row, table
from controlplane.core import render
from controlplane.core.build import BuildMemo, build_topology
from controlplane.core.model import ContainerFacts, DockerState, Endpoint, NetworkFacts
from controlplane.core.observe import container_facts
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


def load_renderer(path: Path) -> ModuleType:
    """Another version of render.py, as a module of its own beside controlplane.core.render."""
    spec = importlib.util.spec_from_file_location("render_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up
    spec.loader.exec_module(module)
    return module


Timings = dict[str, list[float]]
STAGES = [("build", "build_topology"), ("render", "render_config"), ("total", "build + render")]


def timed(
    state: DockerState,
    template: jinja2.Template,
    renderer: ModuleType,
    memo: BuildMemo,
    cache: object,
    into: Timings,
) -> str:
    gc.collect()
    t0 = time.perf_counter()
    topology = build_topology(state, memo=memo)
    t1 = time.perf_counter()
    config: str = renderer.render_config(topology, template, cache=cache)
    t2 = time.perf_counter()
    into["build"].append((t1 - t0) * 1000)
    into["render"].append((t2 - t1) * 1000)
    into["total"].append((t2 - t0) * 1000)
    return config


def in_turns(names: list[str], run: int) -> list[str]:
    """Each renderer goes first as often as the other."""
    start = run % len(names)
    return names[start:] + names[:start]


def side_by_side(name: str, this: list[float], against: list[float]) -> list[str]:
    return [
        name,
        f"{statistics.median(this):.1f}",
        f"{statistics.median(against):.1f}",
        f"{percentile(this, 99):.1f}",
        f"{percentile(against, 99):.1f}",
        str(len(this)),
        "ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20, help="passes with one container changed")
    parser.add_argument("--cold-runs", type=int, default=5, help="passes with every memo empty")
    parser.add_argument("--against", type=Path, help="another render.py, timed beside this one")
    args = parser.parse_args()
    state = docker_state(args.services, args.backends)
    template = load_template()
    template.environment.get_template(render.SERVICE_TEMPLATE)  # compiled before any timing
    renderers = {"this": render}
    if args.against is not None:
        renderers["against"] = load_renderer(args.against)
    names = list(renderers)
    cold: dict[str, Timings] = {n: {"build": [], "render": [], "total": []} for n in names}
    warm: dict[str, Timings] = {n: {"build": [], "render": [], "total": []} for n in names}
    for run in range(args.cold_runs):
        for name in in_turns(names, run):
            renderer = renderers[name]
            timed(state, template, renderer, BuildMemo(), renderer.RenderCache(), cold[name])
    memos = {n: (BuildMemo(), r.RenderCache()) for n, r in renderers.items()}
    configs = {
        n: renderers[n].render_config(build_topology(state, memo=memo), template, cache=cache)
        for n, (memo, cache) in memos.items()
    }
    for run in range(args.runs):
        state = one_changed(state, run)
        for name in in_turns(names, run):
            configs[name] = timed(state, template, renderers[name], *memos[name], warm[name])
        if len(set(configs.values())) > 1:
            raise SystemExit(f"--against {args.against} renders another config than this one")
    config = configs["this"]
    check = nginx_t(config)
    print(machine_line())
    print(
        f"{args.services} services x {args.backends} backends, "
        f"{len(config) / 1e6:.1f} MB of config, {args.cold_runs} cold runs, "
        f"{args.runs} runs with one container changed\n"
    )
    passes = [("cold", cold), ("one container changed", warm)]
    if args.against is None:
        rows = [
            row(f"{kind}: {label}", timings["this"][key])
            for kind, timings in passes
            for key, label in STAGES
        ]
        if check is not None:
            rows.append(row("nginx -t on the host (once, apart)", [check * 1000]))
        print(table(rows))
        return
    print(f"against: {args.against}, the same passes in turns with this one\n")
    rows = [
        side_by_side(f"{kind}: {label}", timings["this"][key], timings["against"][key])
        for kind, timings in passes
        for key, label in STAGES
    ]
    print(table(rows, ("metric", "p50", "p50 against", "p99", "p99 against", "n", "unit")))
    if check is not None:
        print(f"\nnginx -t on the host (once, apart): {check * 1000:.1f} ms")


if __name__ == "__main__":
    main()
