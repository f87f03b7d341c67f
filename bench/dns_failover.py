"""DNS through a `kill -9` of its server and a restart, under a steady query rate (issue 19:
"Controller SIGKILLed and restarted under 2,000 q/s: 0 queries unanswered"), side by side
with the everyday path and with dnsmasq in the same run:

  (a) `controlplane run --dns-bind` with busybox backends aliased `web`: dnsperf at --rate
      q/s for --seconds; once with nothing done (everyday), once with the controller
      SIGKILLed after 2 s and started again at once (its DNS process answers on; the new
      controller's takes the sockets over after its first pass);
  (b) dnsmasq answering the same names from a hosts file, the same two runs (its restart is
      the peer: a resolver whose process is its only copy).

Each run reports dnsperf's lost queries (no answer within 1 s), its per-query latency
p50/p99/max, and for (a) the seconds from the restart to the takeover (the old DNS process
gone). Rounds are interleaved. Nothing leaves loopback and the bench network; every container
and network carries controlplane.test=1 and is removed at the end. Needs dnsperf and
dnsmasq. Run:

    .venv/bin/python bench/dns_failover.py [--rate 2000] [--seconds 8] [--rounds 3]  # ~3 min
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, percentile, table
from bench.dns_throughput import CONTROLPLANE, DOMAIN, Result, process, wait_answers
from images.build import ensure_images
from tests.support.dns_stub import dns_processes
from tests.support.lab import Lab, wait_until
from tests.support.ports import free_port

KILL_AFTER = 2.0


def log(message: str) -> None:
    print(f"[dns_failover] {message}", file=sys.stderr, flush=True)


@dataclass
class Dnsperf:
    """dnsperf in the background, its output to a file: -v writes a line per query, and a
    pipe read only at the end would fill and stall dnsperf's receiving (queries "lost")."""

    process: subprocess.Popen[bytes]
    output: IO[str]

    @classmethod
    def start(cls, port: int, queries: Path, rate: int, seconds: int) -> Dnsperf:
        cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries)]
        cmd += ["-Q", str(rate), "-l", str(seconds), "-t", "1", "-q", "100", "-v"]
        output = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by finished())
        return cls(subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT), output)

    def finished(self, seconds: int) -> Result:
        self.process.wait(timeout=seconds + 30)
        with self.output:
            self.output.seek(0)
            return Result.parse("dnsperf", self.output.read())


class Server:
    """A resolver process that can be SIGKILLed and started again. `takes_over`: a
    controller, whose DNS process outlives it until the new one's takes the sockets over."""

    def __init__(
        self, cmd: list[str], work: Path, port: int, expected: dict[str, set[str]], takes_over: bool
    ) -> None:
        self.cmd, self.work, self.port, self.expected = cmd, work, port, expected
        self.takes_over = takes_over
        self._stack = contextlib.ExitStack()
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        logfile = self.work / f"{Path(self.cmd[0]).name}-{time.monotonic_ns()}.log"
        proc = self._stack.enter_context(process(self.cmd, logfile))
        wait_answers(proc, logfile, self.port, self.expected, timeout=30)
        return proc

    def kill_and_restart(self) -> float:
        """Seconds from the restart to answers (a controller: to the takeover, the old DNS
        process gone)."""
        old = dns_processes(self.port) if self.takes_over else []
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        started = time.monotonic()
        self.proc = self._start()
        wait_until(lambda: not set(old) & set(dns_processes(self.port)), 30, what="takeover")
        return time.monotonic() - started

    def close(self) -> None:
        self._stack.close()
        for pid in dns_processes(self.port) if self.takes_over else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run(
    server: Server, queries: Path, rate: int, seconds: int, kill: bool
) -> tuple[Result, float | None]:
    load = Dnsperf.start(server.port, queries, rate, seconds)
    took = None
    if kill:
        time.sleep(KILL_AFTER)
        took = server.kill_and_restart()
    return load.finished(seconds), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000, help="queries per second")
    parser.add_argument("--seconds", type=int, default=8, help="length of each dnsperf run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    lab = Lab(client, ensure_images(client, progress=log))
    work = Path(tempfile.mkdtemp(prefix="dns-failover-"))
    work.chmod(0o755)  # dnsmasq reads the hosts file after dropping root
    results: dict[str, list[tuple[Result, float | None]]] = {}
    servers: list[str] = []
    try:
        net = lab.network("dnsfail")
        net_name = str(net.name)
        backends = [lab.backend(net, alias="web") for _ in range(3)]
        ips = {b.attrs["NetworkSettings"]["Networks"][net_name]["IPAddress"] for b in backends}
        name = f"web.{DOMAIN}"
        queries = work / "queries.txt"
        queries.write_text(f"{name} A\n")
        hosts = work / "hosts"
        hosts.write_text("".join(f"{ip} {name}\n" for ip in sorted(ips)))
        hosts.chmod(0o644)
        port_a, port_b = free_port(), free_port()
        cp_cmd = [str(CONTROLPLANE), "run", "--network", net_name, "--api-bind", "off"]
        cp_cmd += ["--dns-bind", f"127.0.0.1:{port_a}", "--dns-keep", "30"]
        dm_cmd = ["dnsmasq", "--no-daemon", f"--port={port_b}", "--listen-address=127.0.0.1"]
        dm_cmd += ["--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}"]
        dm_cmd += ["--log-facility=-"]
        servers += [f"(a) {' '.join(cp_cmd)}", f"(b) {' '.join(dm_cmd)}"]
        made: dict[str, Callable[[], Server]] = {
            "controlplane": lambda: Server(cp_cmd, work, port_a, {name: ips}, takes_over=True),
            "dnsmasq": lambda: Server(dm_cmd, work, port_b, {name: ips}, takes_over=False),
        }
        with contextlib.ExitStack() as stack:
            running = {}
            for label, make in made.items():
                server = make()
                stack.callback(server.close)
                running[label] = server
            for round_ in range(1, args.rounds + 1):
                for label, server in running.items():
                    for kill in (False, True):
                        key = f"{label}, {'kill -9 and restart' if kill else 'everyday'}"
                        log(f"round {round_}: {key}")
                        results.setdefault(key, []).append(
                            run(server, queries, args.rate, args.seconds, kill)
                        )
    finally:
        lab.cleanup()
    print(report(results, args, servers))


def report(
    results: dict[str, list[tuple[Result, float | None]]],
    args: argparse.Namespace,
    servers: list[str],
) -> str:
    rows = []
    for key, runs in results.items():
        lost = [r.lost for r, _ in runs]
        sent = sum(r.sent for r, _ in runs)
        rows.append([f"{key}: lost", str(max(lost)), "-", str(max(lost)), f"{sent} sent", "q"])
        latencies = [ms for r, _ in runs for ms in r.latencies_ms]
        rows.append(
            [
                f"{key}: latency",
                f"{percentile(latencies, 50):.3f}",
                f"{percentile(latencies, 99):.3f}",
                f"{max(latencies, default=float('nan')):.3f}",
                str(len(latencies)),
                "ms",
            ]
        )
        took = [t for _, t in runs if t is not None]
        if took:
            what = "restart to takeover" if key.startswith("controlplane") else "restart to answers"
            rows.append(
                [
                    f"{key}: {what}",
                    f"{percentile(took, 50):.2f}",
                    "-",
                    f"{max(took):.2f}",
                    str(len(took)),
                    "s",
                ]
            )
    lines = [
        machine_line(),
        f"dnsperf -Q {args.rate} -l {args.seconds} -t 1 -q 100 -v, {args.rounds} rounds "
        f"interleaved; kill -9 after {KILL_AFTER:g} s, restarted at once",
        table(rows, ("metric", "p50", "p99", "max", "n", "unit")),
        "lost: dnsperf's count of queries without an answer within 1 s (the max over rounds)",
        "answers by RCODE, per round (all NOERROR: each query was for a name that exists):",
        *(f"  {key}: {' / '.join(r.rcodes for r, _ in runs)}" for key, runs in results.items()),
        *servers,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
