"""Scale: real containers, one managed nginx, and how the controller copes as services grow.

For each case (one service of N backends, or M services of 2), the backends are started by a
pool of threads (`docker run` through docker-py) on one network the bench creates, with the
service's name as their network alias. Clients on kept-alive connections to the published
nginx port send `Host: <service>` requests until every backend has answered with its own
hostname: "served" is counted by the responses, not read from the config. Reloads are counted
in nginx's own log; pass times, `nginx -t` times and config sizes come from the controller's
reports; the controller runs in a process of its own, so its RSS and CPU time are read from
its /proc entry, and it shares no interpreter lock with the bench's docker and HTTP threads.
Its DNS server answers on loopback for the size of the big service's A answer. Traffic goes
to 127.0.0.1 only; every container and the network are removed at the end, even on failure.
Run:

    .venv/bin/python bench/scale.py [--one-service 50,200,500] [--many-services 100,300]
        [--per-service 2] [--threads 12] [--probe-threads 4] [--deadline 120] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import docker
import docker.errors
from dnslib import EDNS0, DNSRecord
from docker.models.containers import Container
from docker.models.networks import Network

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, percentile
from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from controlplane.wiring import build_controller
from images.build import ensure_images
from tests.support.fleet import Coverage, name_backends, remove_all, run_backends
from tests.support.lab import Lab, wait_until
from tests.support.ports import LOOPBACK, free_port

NGINX_NOTICE = ["nginx", "-g", "daemon off; error_log stderr notice;"]
RELOAD_LINE = b"(SIGHUP) received"
"""What nginx 1.22's master logs on a reload, at notice level: "signal 1 (SIGHUP) received
from N, reconfiguring". At the image's level (error) it logs nothing on a reload."""


@dataclass(frozen=True)
class Case:
    services: int
    backends: int
    """Per service."""

    @property
    def label(self) -> str:
        noun = "service" if self.services == 1 else "services"
        return f"{self.services} {noun} x {self.backends}"

    def aliases(self) -> dict[str, int]:
        if self.services == 1:
            return {"big": self.backends}
        return {f"svc{i}": self.backends for i in range(self.services)}


def _control(settings: Settings, sink: Connection, stop: Event) -> None:
    """The controller under test, in its own process: each pass's report goes back as a dict,
    with the CPU time the loop thread spent since the previous one (the loop thread only
    waits between passes: that is the pass's list, build, render, zone and deploy wait)."""
    logging.basicConfig(level=logging.ERROR, format="controller: %(levelname)s %(message)s")
    controller = build_controller(settings)
    cpu_before = [0.0]

    def forward(report: ReconcileReport) -> None:
        now = time.thread_time()
        snapshot = controller.reconciler.snapshot
        sink.send(
            {
                "started_ns": report.started_ns,
                "timings": dict(report.timings),
                "deploys": [(d.ok, d.error, dict(d.timings)) for d in report.deployed],
                "changed": report.changed,
                "cpu": now - cpu_before[0],
                "config_bytes": len(snapshot.config.encode()) if snapshot else 0,
            }
        )
        cpu_before[0] = now

    controller.reconciler.on_report.append(forward)
    controller.start_servers()
    thread = threading.Thread(target=controller.loop.run, daemon=True)
    thread.start()
    wait_until(controller.loop.ready.is_set, timeout=60, what="the controller's first pass")
    sink.send("ready")
    stop.wait()
    controller.loop.stop()
    thread.join(timeout=10)
    controller.close()


class ControllerProcess:
    """`_control` in a spawned process; its reports land in `passes`."""

    def __init__(self, settings: Settings) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=False)
        self._stop = context.Event()
        self._process = context.Process(
            target=_control, args=(settings, theirs, self._stop), daemon=True
        )
        self._process.start()
        theirs.close()
        self.passes: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._collect, args=(ours,), daemon=True)
        self._thread.start()
        if not self._ready.wait(90):
            self.close()
            raise RuntimeError("the controller did not finish its first pass in 90 s")

    def _collect(self, pipe: Connection) -> None:
        try:
            while True:
                message = pipe.recv()
                if message == "ready":
                    self._ready.set()
                else:
                    self.passes.append(message)
        except (EOFError, OSError):
            return

    def _proc(self, name: str) -> str:
        return (Path("/proc") / str(self._process.pid) / name).read_text()

    def memory_mib(self) -> tuple[float, float]:
        """Resident set now and its peak (VmRSS, VmHWM), MiB."""
        fields = dict(line.split(":", 1) for line in self._proc("status").splitlines())
        kib = [int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")]
        return kib[0] / 1024, kib[1] / 1024

    def cpu_seconds(self) -> float:
        """User + system time of every thread of the controller so far."""
        after_name = self._proc("stat").rsplit(")", 1)[1].split()
        return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=20)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class Dns:
    plain: str
    edns: str
    tcp: str


def ask(port: int, name: str, edns: bool = False, tcp: bool = False) -> tuple[int, DNSRecord]:
    """The reply's size on the wire, and the reply."""
    query = DNSRecord.question(name, "A")
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    wire = query.send(LOOPBACK, port, tcp=tcp, timeout=5)
    return len(wire), DNSRecord.parse(wire)


def dns_sizes(port: int, name: str, expected: int) -> Dns:
    """The A answer for `name` over UDP without and with EDNS0 (1232 bytes), and over TCP,
    as a client retries after TC."""

    def udp(edns: bool) -> str:
        size, reply = ask(port, name, edns=edns)
        return f"{size} B TC" if reply.header.tc else f"{size} B, {len(reply.rr)} A"

    _, tcp = ask(port, name, tcp=True)
    return Dns(udp(False), udp(True), f"{len(tcp.rr)}/{expected}")


@dataclass(frozen=True)
class Result:
    case: Case
    started: float
    served_after: float | None
    served: int
    reloads_logged: int
    reloads_reported: int
    refused: int
    first_refusal: str | None
    passes: list[float]
    phases: list[dict[str, float]]
    """Each pass's list, render and deploy, and its deploy's steps (open, copy, test, ...)."""
    pass_cpu: list[float]
    render: float | None
    tests: list[float]
    config_bytes: int
    cpu: float
    rss: tuple[float, float]
    dns: Dns

    def cells(self) -> list[str]:
        size = self.case.services * self.case.backends
        return [
            self.case.label,
            str(size),
            str(size + 1),
            f"{self.started:.1f}",
            "-" if self.served_after is None else f"{self.served_after:.1f}",
            f"{self.served}/{size}",
            f"{self.reloads_logged} / {self.reloads_reported}",
            str(self.refused),
            str(len(self.passes)),
            spread(self.passes),
            spread(self.pass_cpu),
            "-" if self.render is None else f"{self.render:.1f}",
            f"{self.tests[-1]:.1f} ({statistics.median(self.tests):.1f})" if self.tests else "-",
            f"{self.config_bytes / 1024:.0f}",
            f"{self.cpu:.1f}",
            f"{self.rss[0]:.0f} ({self.rss[1]:.0f})",
            self.dns.plain,
            self.dns.edns,
            self.dns.tcp,
        ]


HEADER = [
    "case",
    "backends",
    "containers",
    "start wall s",
    "last run -> all served s",
    "served",
    "reloads (nginx log / ctl)",
    "refused",
    "passes",
    "pass ms p50/p99",
    "pass CPU ms p50/p99",
    "render ms",
    "nginx -t ms last (p50)",
    "config KB",
    "ctl CPU s",
    "ctl RSS MiB (peak)",
    "DNS UDP 512",
    "DNS EDNS 1232",
    "DNS TCP A",
]


def spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {percentile(values, 99):.1f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def start_nginx(lab: Lab, net: Network) -> Container:
    """A managed nginx like the lab's, logging at notice level to count its reloads."""
    container = lab.client.containers.run(
        lab.images.nginx,
        NGINX_NOTICE,
        detach=True,
        name=lab.name("lb"),
        labels={**lab.labels, "controlplane.role": "nginx"},
        network=str(net.name),
        ports={"80/tcp": (LOOPBACK, None)},
    )
    return container


def reloads_logged(nginx: Container) -> int:
    return int(nginx.logs(stdout=True, stderr=True).count(RELOAD_LINE))


def run_case(lab: Lab, net: Network, case: Case, args: argparse.Namespace) -> Result:
    nginx = start_nginx(lab, net)
    port = lab.published_port(nginx)
    dns_port = free_port()
    controller = ControllerProcess(
        Settings(
            networks=frozenset({str(net.name)}),
            dns_binds=(f"{LOOPBACK}:{dns_port}",),
            dns_keep=0,
        )
    )
    try:
        names = name_backends(lab, case.aliases())
        size = sum(len(n) for n in names.values())
        reloads_before = reloads_logged(nginx)
        cpu_before = controller.cpu_seconds()
        coverage = Coverage(
            port,
            names,
            threads=args.probe_threads,
            max_seconds=size / 2 + 60 + args.deadline,
            max_requests=200 * size + 20_000,
        )
        try:
            fleet = run_backends(lab, net, names, threads=args.threads)
            left = args.deadline - (time.time_ns() - fleet.last_ns) / 1e9
            coverage.wait(max(0.0, left))
        finally:
            coverage.stop()
        end_ns = time.time_ns()
        all_served = coverage.all_served_ns
        reloads = reloads_logged(nginx) - reloads_before
        cpu = controller.cpu_seconds() - cpu_before
        rss = controller.memory_mib()
        big = next(iter(names))
        dns = dns_sizes(dns_port, f"{big}.internal", len(names[big]))
        passes = [p for p in controller.passes if fleet.first_ns <= p["started_ns"] <= end_ns]
    finally:
        controller.close()
    deploys = [d for p in passes for d in p["deploys"]]
    refusals = [error for ok, error, _ in deploys if not ok]
    last = next((p for p in reversed(passes) if p["changed"]), None)
    tests = [timings["test"] * 1000 for _, _, timings in deploys if "test" in timings]
    return Result(
        case=case,
        started=(fleet.last_ns - fleet.first_ns) / 1e9,
        served_after=None if all_served is None else (all_served - fleet.last_ns) / 1e9,
        served=coverage.served,
        reloads_logged=reloads,
        reloads_reported=sum(1 for ok, _, _ in deploys if ok),
        refused=len(refusals),
        first_refusal=refusals[0] if refusals else None,
        passes=[sum(p["timings"].values()) * 1000 for p in passes],
        phases=[phases(p) for p in passes],
        pass_cpu=[p["cpu"] * 1000 for p in passes],
        render=None if last is None else last["timings"]["render"] * 1000,
        tests=tests,
        config_bytes=0 if last is None else last["config_bytes"],
        cpu=cpu,
        rss=rss,
        dns=dns,
    )


def phases(report: dict[str, Any]) -> dict[str, float]:
    """A pass's time by phase, ms: the reconciler's, then its deploys' steps."""
    steps = {name: value * 1000 for name, value in report["timings"].items()}
    for _, _, timings in report["deploys"]:
        for name, value in timings.items():
            steps[f"deploy: {name}"] = steps.get(f"deploy: {name}", 0.0) + value * 1000
    return steps


def breakdown(result: Result) -> list[str]:
    """Where a case's pass time went: summed over its passes, and in its slowest pass."""
    names = list(dict.fromkeys(name for steps in result.phases for name in steps))
    total = {name: sum(s.get(name, 0.0) for s in result.phases) / 1000 for name in names}
    slowest = result.phases[result.passes.index(max(result.passes))] if result.passes else {}
    return [
        result.case.label,
        ", ".join(f"{name} {total[name]:.2f}" for name in names),
        ", ".join(f"{name} {value:.0f}" for name, value in slowest.items()),
    ]


def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--one-service", default="50,200,500", help="backends of the one-service cases"
    )
    parser.add_argument(
        "--many-services", default="100,300", help="services of the many-services cases"
    )
    parser.add_argument("--per-service", type=int, default=2, help="backends a service, many")
    parser.add_argument("--threads", type=int, default=12, help="threads running containers")
    parser.add_argument("--probe-threads", type=int, default=4, help="HTTP clients")
    parser.add_argument(
        "--deadline", type=float, default=120, help="seconds after the last run returned"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one service of 20, 10 services x 2, deadline 60 s"
    )
    args = parser.parse_args()
    if args.quick:
        args.one_service, args.many_services, args.deadline = "20", "10", 60.0
    cases = [Case(1, n) for n in sizes(args.one_service)]
    cases += [Case(n, args.per_service) for n in sizes(args.many_services)]

    client = docker.from_env(version="auto", max_pool_size=args.threads + 8)
    lab = Lab(client, ensure_images(client, progress=lambda line: print(line, file=sys.stderr)))
    results: list[Result] = []
    try:
        net = lab.network("scale")
        try:
            for case in cases:
                print(f"case {case.label} ...", file=sys.stderr, flush=True)
                try:
                    results.append(run_case(lab, net, case, args))
                finally:
                    remove_all(lab, threads=args.threads)
        finally:
            report(results, args)
    finally:
        remove_all(lab, threads=args.threads)
        try:
            lab.cleanup()
        except docker.errors.APIError as error:
            # Seen once on dockerd 20.10 after a few hundred removals: the network's endpoint
            # count stays above zero with no endpoint left, until dockerd restarts.
            print(f"\nnot removed: {error}", file=sys.stderr)
        client.close()


def report(results: list[Result], args: argparse.Namespace) -> None:
    """Whatever was measured, also when a later case failed."""
    defaults = Settings()
    print(machine_line())
    print(
        f"backends started by {args.threads} threads, served counted by {args.probe_threads} "
        f"keep-alive HTTP clients; one managed nginx (2 workers); controller in its own "
        f"process (--batch-quiet {defaults.batch_quiet:g}, --batch-max {defaults.batch_max:g}, "
        f"--quiet-window {defaults.quiet_window:g}); deadline {args.deadline:g} s after the "
        "last run returned\n"
    )
    print(markdown(HEADER, [r.cells() for r in results]))
    print(
        "\nreloads: SIGHUPs in nginx's log / deploys the controller reported ok; refused: "
        "deploys nginx -t refused; passes, render, nginx -t, config: the controller's reports "
        "from the first run to all served (render and config: the last pass that changed "
        "something); pass CPU: the loop thread's; ctl CPU: every thread of the controller "
        "over the case; DNS: the A answer for the first service over UDP (size, TC) and the "
        "A records a TCP retry gets"
    )
    print()
    print(
        markdown(
            ["case", "summed over the passes, s", "the slowest pass, ms"],
            [breakdown(r) for r in results],
        )
    )
    for result in results:
        if result.first_refusal:
            print(f"\n{result.case.label}: first refusal: {result.first_refusal}")


if __name__ == "__main__":
    main()
