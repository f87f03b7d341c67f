"""What the controller's active health checks cost it (issue 16, "1,000 backends checked
every 1 s: <= 10% of one core for the controller's probing").

A subprocess (its CPU is not counted) stands in for the backends: one uvloop process listening
on N ports of 127.0.0.1, answering `HTTP/1.0 200 OK` to any request and closing. This process
builds a topology of N backends, one per port, in one service whose check is active
(controlplane.health=http or tcp, interval 1s, path /health), and drives a real
Gatekeeper(SocketProber(), wait=0.025) with its background thread: one pass, then it runs on
its own for --seconds. Over the steady window (after --warmup) it samples, once a second, the
process's CPU time and that of the gatekeeper's thread ("readiness") and the prober's loop
("health-probes"), as % of one core; and it counts the probes answered (`on_probe`) and their
latency. Rows, one after the other in one run: http and tcp at --backends, http at --small
(everyday scale), and `idle`: --backends tracked by the readiness gate alone (no active check),
which should cost about nothing once they all passed. RLIMIT_NOFILE is raised to what N needs,
within the hard limit, in both processes. `--profile` adds a cProfile of each of the two
threads (it slows them: read the shares, not the totals). Run:

    .venv/bin/python bench/probe_cost.py [--backends 1000] [--small 100] [--seconds 20]
        [--warmup 2] [--modes http,tcp,idle] [--profile]                 # ~90 s
    .venv/bin/python bench/probe_cost.py --backends 20 --small 0 --seconds 3  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import pstats
import resource
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, percentile, table
from controlplane.core import labels as L
from controlplane.core.build import build_topology
from controlplane.core.health import Result
from controlplane.core.model import Topology
from controlplane.gatekeeper import Gatekeeper
from controlplane.metrics import Metrics
from controlplane.prober import SocketProber
from tests.unit.builders import container, nginx, state

MODES = ("http", "tcp", "idle")
THREADS = ("readiness", "health-probes")
"""The gatekeeper's thread and the prober's loop, by the names they give their threads."""
REPLY = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
SERVER_START = 60.0
"""Seconds the backends' process has to say its ports."""
SPARE_FILES = 512
"""Descriptors beyond one per backend: the probes in flight, the interpreter's own."""


# -- the backends' process -------------------------------------------------------------------


class Answer(asyncio.Protocol):
    """200 to whatever request head arrives, then close."""

    def __init__(self) -> None:
        self.head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.head += data
        if self.transport is not None and (b"\r\n\r\n" in self.head or len(self.head) > 4096):
            self.transport.write(REPLY)
            self.transport.close()


async def serve(count: int) -> None:
    """Listens on `count` ports, prints them as one JSON line, and serves until stdin closes
    (the bench ended, however it ended)."""
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Answer, "127.0.0.1", 0, backlog=128) for _ in range(count)]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    print(json.dumps(ports), flush=True)
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    for server in servers:
        server.close()


def raise_nofile(count: int) -> str:
    """Soft RLIMIT_NOFILE up to what `count` backends need, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return f"RLIMIT_NOFILE raised from {soft} to {wanted} (hard {hard})"
    return f"RLIMIT_NOFILE {soft} (hard {hard}): enough"


@contextlib.contextmanager
def backends(count: int) -> Iterator[list[int]]:
    """The backends' process and its ports; killed on the way out, whatever happens."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], SERVER_START)
        line = process.stdout.readline() if ready else ""
        if not line:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
            raise RuntimeError(
                f"the backends' process said no ports within {SERVER_START:.0f} s "
                f"(exit status {process.returncode}); see its error output above"
            )
        ports = json.loads(line)
        if len(ports) != count:
            raise RuntimeError(f"the backends' process listens on {len(ports)} ports, not {count}")
        yield ports
    finally:
        process.kill()
        process.wait(timeout=10)


# -- the controller's side -------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    mode: str
    count: int

    @property
    def labels(self) -> dict[str, str]:
        if self.mode == "idle":
            return {L.SERVICE: "web"}
        path = {L.HEALTH_PATH: "/health"} if self.mode == "http" else {}
        return {L.SERVICE: "web", L.HEALTH: self.mode, L.HEALTH_INTERVAL: "1s", **path}


def topology(scenario: Scenario, ports: Sequence[int]) -> Topology:
    containers = [
        container(f"b{i}", ip="127.0.0.1", labels={**scenario.labels, L.PORT: str(port)})
        for i, port in enumerate(ports[: scenario.count])
    ]
    built = build_topology(state(nginx(), *containers))
    found = sum(len(s.backends) for s in built.services)
    if found != scenario.count:
        raise RuntimeError(f"the topology has {found} backends, not {scenario.count}")
    return built


@dataclass
class Measured:
    scenario: Scenario
    window: float = 0.0
    probes: int = 0
    failed: int = 0
    cpu: float = 0.0
    """Seconds of the process's CPU over the window."""
    system: float = 0.0
    """Of which in the kernel (on loopback, the TCP work of both ends is mostly here)."""
    samples: list[float] = field(default_factory=list)
    """% of one core, per sample."""
    threads: dict[str, float] = field(default_factory=dict)
    """Seconds of CPU over the window, by thread."""
    latencies: list[float] = field(default_factory=list)
    """Seconds, of the probes answered in the window."""
    rounds: int = 0
    """The gatekeeper thread's rounds (`tick`s) in the window."""


def thread_cpu(name: str) -> float:
    """CPU seconds of the live thread of this name so far (0 if there is none)."""
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            with contextlib.suppress(OSError):  # it just ended
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return 0.0


def measure(scenario: Scenario, ports: Sequence[int], seconds: float, warmup: float) -> Measured:
    """One pass over the scenario's topology, then the gatekeeper on its own: CPU sampled
    about once a second from `warmup` to `seconds`."""
    built = topology(scenario, ports)
    answers: list[tuple[Result, bool]] = []
    gate = Gatekeeper(SocketProber(), wait=0.025)
    gate.on_probe.append(Metrics(lambda: None).on_probe)  # as the controller is wired
    gate.on_probe.append(lambda result, ok: answers.append((result, ok)))
    ticks = [0]
    tick = gate.tick

    def counted() -> float:
        ticks[0] += 1
        return tick()

    gate.tick = counted  # type: ignore[method-assign]  # its thread calls self.tick
    measured = Measured(scenario)
    try:
        started = time.monotonic()
        gate.admit(built, first=False)
        time.sleep(max(0.0, started + warmup - time.monotonic()))
        samples = max(1, round(seconds - warmup))
        step = (seconds - warmup) / samples
        threads = {name: thread_cpu(name) for name in THREADS}
        first, rounds = len(answers), ticks[0]
        begun, cpu_begun = time.monotonic(), time.process_time()
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        at, cpu_at = begun, cpu_begun
        for _ in range(samples):
            time.sleep(max(0.0, at + step - time.monotonic()))
            now, cpu = time.monotonic(), time.process_time()
            measured.samples.append((cpu - cpu_at) / (now - at) * 100)
            at, cpu_at = now, cpu
        measured.system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - system
        in_window, measured.rounds = answers[first:], ticks[0] - rounds
        measured.window = at - begun
        measured.cpu = cpu_at - cpu_begun
        measured.threads = {name: thread_cpu(name) - before for name, before in threads.items()}
        measured.probes = len(in_window)
        measured.failed = sum(1 for _, ok in in_window if not ok)
        measured.latencies = [result.latency for result, _ in in_window]
    finally:
        gate.close()
    return measured


class ThreadProfiles:
    """A cProfile of each thread started while it is on: cProfile sees only the thread that
    enables it, so each new thread enables its own, at its first call. Its clock is the wall's:
    a call that lets go of the GIL (a socket's close) counts the wait to get it back."""

    def __init__(self) -> None:
        self.profiles: dict[str, cProfile.Profile] = {}

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._start)
        return self

    def __exit__(self, *_: object) -> None:
        threading.setprofile(None)

    def _start(self, frame: FrameType, event: str, arg: Any) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        self.profiles[threading.current_thread().name] = profile
        profile.enable()

    def report(self, top: int) -> str:
        """The functions that took the most time of their own, in each of THREADS."""
        out = io.StringIO()
        for name in THREADS:
            profile = self.profiles.get(name)
            if profile is None:
                continue
            out.write(f"--- thread {name}: top {top} by own time\n")
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
        return out.getvalue()


# -- the run ---------------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: {', '.join(unknown)} unknown; use some of {', '.join(MODES)}")
    found = [Scenario(m, args.backends) for m in modes if m != "idle"]
    if args.small and "http" in modes:
        found.append(Scenario("http", args.small))
    if "idle" in modes:
        found.append(Scenario("idle", args.backends))
    return found


def run(args: argparse.Namespace) -> tuple[list[Measured], str]:
    """Every scenario, one after the other, against one backends' process; and what was done
    to RLIMIT_NOFILE."""
    chosen = scenarios(args)
    count = max(s.count for s in chosen)
    nofile = raise_nofile(count)
    results = []
    with backends(count) as ports:
        for scenario in chosen:
            print(f"{scenario.mode} x {scenario.count}", file=sys.stderr, flush=True)
            if args.profile:
                with ThreadProfiles() as profiles:
                    results.append(measure(scenario, ports, args.seconds, args.warmup))
                print(profiles.report(args.profile_top), file=sys.stderr)
            else:
                results.append(measure(scenario, ports, args.seconds, args.warmup))
    return results, nofile


def report(results: Sequence[Measured], nofile: str, args: argparse.Namespace) -> str:
    rows = []
    for m in results:
        share = {name: f"{used / m.window * 100:.1f}" for name, used in m.threads.items()}
        latency = [x * 1000 for x in m.latencies]
        rows.append(
            [
                m.scenario.mode,
                f"{m.scenario.count:,}",
                f"{m.probes / m.window:,.0f}",
                f"{m.rounds / m.window:,.0f}",
                str(m.failed),
                f"{m.cpu / m.window * 100:.1f}",
                f"{m.system / m.window * 100:.1f}",
                f"{statistics.median(m.samples):.1f}",
                f"{percentile(m.samples, 99):.1f}",
                share.get("readiness", "-"),
                share.get("health-probes", "-"),
                f"{statistics.median(latency):.2f}" if latency else "-",
                f"{percentile(latency, 99):.2f}" if latency else "-",
            ]
        )
    header = ("check", "backends", "probes/s", "rounds/s", "failed", "CPU % mean", "sys %",
              "CPU % p50", "CPU % p99", "gate thread %", "prober thread %", "latency p50 ms",
              "p99 ms")  # fmt: skip
    return "\n".join(
        [
            table(rows, header),
            f"CPU: the controller's process, % of one core, over {args.seconds - args.warmup:g} s "
            f"after {args.warmup:g} s (p50/p99 of 1-s samples); checks every 1 s, backends on "
            "loopback in another process (not counted); this process's " + nofile,
            machine_line(),
        ]
    )


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--small", type=int, default=100, help="an http row at this scale too")
    parser.add_argument("--seconds", type=float, default=20.0, help="per row, warm-up included")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--profile", action="store_true", help="cProfile the two threads")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is None and (
        args.backends < 1 or args.small < 0 or args.seconds <= args.warmup or args.warmup < 0
    ):
        parser.error("--backends >= 1, --small >= 0, --seconds > --warmup >= 0, please")
    return args


def main() -> None:
    args = options()
    if args.serve is not None:  # the backends' process: the bench ends it, Ctrl-C included
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise_nofile(args.serve)
        uvloop.run(serve(args.serve))
        return
    print(report(*run(args), args))


if __name__ == "__main__":
    main()
