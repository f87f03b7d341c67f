"""DNS throughput and latency, side by side: controlplane's resolver, dnsmasq and Docker's
embedded DNS, each loaded by the same dnsperf (Debian's) with the same parameters, for names
that exist, on the same machine in one run (issue 3, "Figures to reach").

  (a) `controlplane run --network N --dns-bind 127.0.0.1:P` (a subprocess, whose DNS process
      answers and is the one measured), with busybox backends aliased `web` on N:
      web.internal, web.N.internal, C.container.internal;
  (b) dnsmasq on loopback answering the same names with the same addresses from a hosts file;
  (c) Docker's embedded DNS, 127.0.0.11 inside a container on N, for the same service and
      container: web, web.N and C (dnsperf from a FROM-scratch image of the host's binary).

Each server gets a saturating run (-q queries in flight for --seconds: queries/s overall and
per 1-s interval, lost queries, dnsperf's average latency) and a run at a fixed --rate (default
10k queries/s, with -v: every query's latency, so p50/p99/max), --rounds times, interleaved
a, b, c so that a noisy minute hits all three. Each server's CPU time during each run (dockerd's
for (c)) is read from /proc, dnsperf's from rusage or the shell's `times`: on 2 cores, the sum
shows whether the server or the machine was the limit. Nothing leaves loopback and the bench
network (only names that exist are asked, so Docker forwards nothing upstream); every container
and network carries controlplane.test=1 and is removed at the end.
Needs dnsperf and dnsmasq (apt-get install -y dnsperf dnsmasq-base). Run:

    .venv/bin/python bench/dns_throughput.py [--seconds 15] [--rounds 3]   # ~5 min
    .venv/bin/python bench/dns_throughput.py --seconds 3 --rounds 1        # smoke, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import docker
from dnslib import QTYPE, DNSRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, percentile, row, table
from images.build import ensure_images
from tests.support.dns_stub import dns_processes
from tests.support.dnsperf_image import ensure_dnsperf_image
from tests.support.lab import Lab, wait_until
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CONTROLPLANE = ROOT / ".venv" / "bin" / "controlplane"
DOMAIN = "internal"
CLK_TCK = os.sysconf("SC_CLK_TCK")
INTERVAL_LINE = re.compile(r"^\d+\.\d+: ([\d.]+)$", re.M)
OTHERS_NOISY = 0.25  # cores used by neither the server nor dnsperf: someone else is busy
QUERY_LINE = re.compile(r"^> (\S+) \S+ \S+ ([\d.]+)$", re.M)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- dnsperf -------------------------------------------------------------------------------


@dataclass
class Result:
    """One dnsperf run, parsed from its output."""

    command: str
    output: str
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    avg_latency_ms: float = float("nan")
    max_latency_ms: float = float("nan")
    rcodes: str = ""
    sizes: str = ""
    intervals: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    server_cpu: float = float("nan")  # CPU seconds per wall second, 1.0 = one core
    client_cpu: float = float("nan")
    machine_cpu: float = float("nan")  # every process and interrupt: others' load shows here

    @classmethod
    def parse(cls, command: str, output: str) -> Result:
        def number(label: str, cast: Callable[[str], float] = float) -> float:
            found = re.search(rf"^\s*{label}:\s+([\d.]+)", output, re.M)
            if found is None:
                raise RuntimeError(f"dnsperf printed no {label!r}:\n{output[-3000:]}")
            return cast(found.group(1))

        result = cls(command, output)
        result.sent = int(number("Queries sent", int))
        result.completed = int(number("Queries completed", int))
        result.lost = int(number("Queries lost", int))
        result.qps = number("Queries per second")
        latency = re.search(
            r"Average Latency \(s\):\s+([\d.]+) \(min [\d.]+, max ([\d.]+)\)", output
        )
        if latency:
            result.avg_latency_ms = float(latency.group(1)) * 1000
            result.max_latency_ms = float(latency.group(2)) * 1000
        codes = re.search(r"Response codes:\s+(.*)", output)
        result.rcodes = codes.group(1).strip() if codes else ""
        sizes = re.search(r"Average packet size:\s+(.*)", output)
        result.sizes = sizes.group(1).strip() if sizes else ""
        # dnsperf sometimes prints a first interval of ~0 q/s (a stats-thread glitch): drop it.
        result.intervals = [float(v) for v in INTERVAL_LINE.findall(output) if float(v) >= 1]
        result.latencies_ms = [float(v) * 1000 for _, v in QUERY_LINE.findall(output)]
        return result


@dataclass(frozen=True)
class Load:
    """The dnsperf parameters every server gets."""

    seconds: int
    clients: int
    threads: int
    outstanding: int
    timeout: int

    def args(self, rate: int | None) -> list[str]:
        common = ["-l", str(self.seconds), "-c", str(self.clients), "-T", str(self.threads)]
        common += ["-t", str(self.timeout)]
        if rate is None:  # saturating: as many in flight as -q allows, stats every second
            return [*common, "-q", str(self.outstanding), "-S", "1"]
        return [*common, "-q", str(self.outstanding), "-Q", str(rate), "-v"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every core; /proc/stat minus idle, iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def measured(server_pid: int) -> Iterator[dict[str, float]]:
    """Wall time, and the server's and the machine's CPU time over the block, in cores."""
    out: dict[str, float] = {}
    cpu0, busy0, wall0 = cpu_seconds(server_pid), machine_busy(), time.monotonic()
    yield out
    out["wall"] = time.monotonic() - wall0
    out["server"] = (cpu_seconds(server_pid) - cpu0) / out["wall"]
    out["machine"] = (machine_busy() - busy0) / out["wall"]


def host_dnsperf(port: int, queries: Path, load: Load, rate: int | None, pid: int) -> Result:
    """dnsperf on the host against 127.0.0.1:port; output goes to a file, not a pipe."""
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *load.args(rate)]
    with tempfile.TemporaryFile("w+") as out:
        before = children_cpu()
        with measured(pid) as cpu:
            subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=load.seconds + load.timeout + 30,
            )
        out.seek(0)
        result = Result.parse(" ".join(cmd), out.read())
    result.server_cpu, result.machine_cpu = cpu["server"], cpu["machine"]
    result.client_cpu = (children_cpu() - before) / cpu["wall"]
    return result


def _tar_one(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _untar_one(chunks: Iterator[bytes]) -> str:
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        member = tar.next()
        assert member is not None
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read().decode(errors="replace")


def container_dnsperf(
    lab: Lab, image: str, network: str, queries: bytes, load: Load, rate: int | None, pid: int
) -> Result:
    """dnsperf inside a container on ``network`` against 127.0.0.11 (Docker's embedded DNS).
    Its output goes to a file in the container (read back with get_archive), so per-query
    lines don't go through dockerd's log copier, which shares a process with the server."""
    argv = ["dnsperf", "-s", "127.0.0.11", "-p", "53", "-d", "/tmp/queries", *load.args(rate)]
    script = f"{' '.join(argv)} > /tmp/out 2>&1; echo $? > /tmp/rc; times > /tmp/times"
    container = lab.client.containers.create(
        image,
        entrypoint=["/bin/busybox", "sh", "-c", script],
        name=lab.name("dnsperf"),
        network=network,
        labels=lab.labels,
    )
    try:
        container.put_archive("/tmp", _tar_one("queries", queries))
        with measured(pid) as cpu:
            container.start()
            container.wait(timeout=load.seconds + load.timeout + 60)
        output = _untar_one(container.get_archive("/tmp/out")[0])
        rc = _untar_one(container.get_archive("/tmp/rc")[0]).strip()
        times = _untar_one(container.get_archive("/tmp/times")[0]).split()
    finally:
        container.remove(force=True)
    if rc != "0":
        raise RuntimeError(f"dnsperf in a container exited with {rc}:\n{output[-3000:]}")
    result = Result.parse(" ".join(argv) + f"   (inside a container on {network})", output)
    result.server_cpu, result.machine_cpu = cpu["server"], cpu["machine"]
    # `times`: the shell's user and system time, then its children's (dnsperf's).
    result.client_cpu = sum(_minutes(t) for t in times[2:4]) / cpu["wall"]
    return result


def _minutes(text: str) -> float:
    minutes, _, seconds = text.partition("m")
    return int(minutes) * 60 + float(seconds.rstrip("s"))


# --- servers -------------------------------------------------------------------------------


def a_records(port: int, name: str) -> set[str]:
    """The A records 127.0.0.1:port answers for ``name`` (empty on any failure)."""
    query = DNSRecord.question(name, "A")
    try:
        reply = DNSRecord.parse(query.send("127.0.0.1", port, timeout=0.5))
    except Exception:  # timeouts, refused, garbage: not ready yet
        return set()
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}


def docker_pid() -> int:
    """dockerd's pid: the embedded DNS server is a goroutine of it."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/var/run/docker.pid").read_text())
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "dockerd":
                return int(proc.name)
    raise RuntimeError("dockerd's pid not found (is the engine local?)")


@contextlib.contextmanager
def process(cmd: Sequence[str], logfile: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess, stopped with SIGTERM (then SIGKILL) at the end."""
    with logfile.open("wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_answers(
    proc: subprocess.Popen[bytes],
    logfile: Path,
    port: int,
    expected: dict[str, set[str]],
    timeout: float,
) -> None:
    """Until the server answers every name with exactly the expected addresses."""

    def ready(name: str) -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n{logfile.read_text()}")
        return a_records(port, name) == expected[name]

    for name, want in expected.items():
        wait_until(partial(ready, name), timeout, what=f"{name} answered as {sorted(want)}")


# --- report --------------------------------------------------------------------------------


def _fmt3(values_ms: Sequence[float], name: str, unit: str = "ms") -> list[str]:
    """row() with 3 decimals: these latencies are fractions of a millisecond."""
    formatted = row(name, values_ms, unit)
    if values_ms:
        formatted[1:4] = [
            f"{statistics.median(values_ms):.3f}",
            f"{percentile(values_ms, 99):.3f}",
            f"{max(values_ms):.3f}",
        ]
    return formatted


def rows_for(
    label: str, saturated: list[Result], fixed: list[Result], rate: int
) -> list[list[str]]:
    def plain(metric: str, value: str, n: int | str, unit: str) -> list[str]:
        return [f"{label}: {metric}", value, "-", "-", str(n), unit]

    def med(values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")

    k = f"{rate / 1000:g}k q/s"
    return [
        row(f"{label}: q/s, whole runs", [r.qps for r in saturated], "q/s"),
        row(f"{label}: q/s, 1-s intervals", [v for r in saturated for v in r.intervals], "q/s"),
        plain(
            "lost, saturated",
            str(sum(r.lost for r in saturated)),
            f"{sum(r.sent for r in saturated)} sent",
            "queries",
        ),
        [
            f"{label}: latency saturated (p50: dnsperf's avg)",
            f"{med([r.avg_latency_ms for r in saturated]):.3f}",
            "-",
            f"{max(r.max_latency_ms for r in saturated):.3f}",
            str(len(saturated)),
            "ms",
        ],
        _fmt3([v for r in fixed for v in r.latencies_ms], f"{label}: latency at {k}"),
        plain(
            f"lost at {k}",
            str(sum(r.lost for r in fixed)),
            f"{sum(r.sent for r in fixed)} sent",
            "queries",
        ),
        plain(
            "CPU server / dnsperf / machine, saturated",
            f"{med([r.server_cpu for r in saturated]):.2f} / "
            f"{med([r.client_cpu for r in saturated]):.2f} / "
            f"{med([r.machine_cpu for r in saturated]):.2f}",
            len(saturated),
            "cores",
        ),
        plain(
            f"CPU server / dnsperf / machine at {k}",
            f"{med([r.server_cpu for r in fixed]):.2f} / {med([r.client_cpu for r in fixed]):.2f}"
            f" / {med([r.machine_cpu for r in fixed]):.2f}",
            len(fixed),
            "cores",
        ),
        plain("avg packet size (run 1)", saturated[0].sizes, saturated[0].rcodes, "bytes"),
    ]


# --- main ----------------------------------------------------------------------------------


Runner = Callable[[int | None], Result]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15, help="length of each dnsperf run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per server and load, interleaved a, b, c"
    )
    parser.add_argument("--rate", type=int, default=10_000, help="q/s of the latency runs")
    parser.add_argument("--backends", type=int, default=3, help="containers aliased `web`")
    parser.add_argument("--clients", type=int, default=1, help="dnsperf -c")
    parser.add_argument("--threads", type=int, default=1, help="dnsperf -T")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    parser.add_argument("--timeout", type=int, default=1, help="dnsperf -t: lost after this")
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y dnsperf dnsmasq-base")
    load = Load(args.seconds, args.clients, args.threads, args.outstanding, args.timeout)

    client = docker.from_env(version="auto")
    images = ensure_images(client, progress=log)
    dnsperf_image = ensure_dnsperf_image(client, progress=log)
    lab = Lab(client, images)
    work = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    work.chmod(0o755)  # dnsmasq reads the hosts file after dropping root
    saturated: dict[str, list[Result]] = {}
    fixed: dict[str, list[Result]] = {}
    servers: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            net = lab.network("dnsbench")
            net_name = str(net.name)
            backends = [lab.backend(net, alias="web") for _ in range(args.backends)]
            ips = [b.attrs["NetworkSettings"]["Networks"][net_name]["IPAddress"] for b in backends]
            first = backends[0]
            names = [
                f"web.{DOMAIN}",
                f"web.{net_name}.{DOMAIN}",
                f"{first.name}.container.{DOMAIN}",
            ]
            expected = {names[0]: set(ips), names[1]: set(ips), names[2]: {ips[0]}}
            queries = work / "queries.txt"
            queries.write_text("".join(f"{n} A\n" for n in names))
            docker_names = ["web", f"web.{net_name}", str(first.name)]
            docker_queries = "".join(f"{n} A\n" for n in docker_names).encode()

            # (a) controlplane's resolver
            port_a = free_port()
            cp_cmd = [str(CONTROLPLANE), "run", "--network", net_name]
            cp_cmd += ["--dns-bind", f"127.0.0.1:{port_a}", "--dns-keep", "0"]
            cp_log = work / "controlplane.log"
            log(f"(a) {' '.join(cp_cmd)}")
            cp = stack.enter_context(process(cp_cmd, cp_log))
            wait_answers(cp, cp_log, port_a, expected, timeout=30)
            (dns_pid,) = dns_processes(port_a)  # the DNS process answers, not the controller
            servers.append(f"(a) controlplane: {' '.join(cp_cmd)} (DNS: process {dns_pid})")

            # (b) dnsmasq with the same names and addresses
            hosts = work / "hosts"
            hosts.write_text(
                "".join(f"{ip} {names[0]} {names[1]}\n" for ip in ips) + f"{ips[0]} {names[2]}\n"
            )
            hosts.chmod(0o644)
            port_b = free_port()
            dm_cmd = ["dnsmasq", "--no-daemon", f"--port={port_b}", "--listen-address=127.0.0.1"]
            dm_cmd += ["--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}"]
            dm_cmd += ["--log-facility=-", f"--pid-file={work / 'dnsmasq.pid'}"]
            dm_log = work / "dnsmasq.log"
            log(f"(b) {' '.join(dm_cmd)}")
            dm = stack.enter_context(process(dm_cmd, dm_log))
            wait_answers(dm, dm_log, port_b, expected, timeout=10)
            servers.append(f"(b) dnsmasq: {' '.join(dm_cmd)}")

            # (c) Docker's embedded DNS, from a container on the same network
            dockerd = docker_pid()
            servers.append(
                f"(c) docker DNS: dockerd (pid {dockerd}) at 127.0.0.11 in a container on "
                f"{net_name}, dnsperf from {dnsperf_image}"
            )

            runners: dict[str, Runner] = {
                "controlplane": partial(host_dnsperf, port_a, queries, load, pid=dns_pid),
                "dnsmasq": partial(host_dnsperf, port_b, queries, load, pid=dm.pid),
                "docker DNS": partial(
                    container_dnsperf,
                    lab,
                    dnsperf_image,
                    net_name,
                    docker_queries,
                    load,
                    pid=dockerd,
                ),
            }
            for round_ in range(1, args.rounds + 1):
                for rate, into in ((None, saturated), (args.rate, fixed)):
                    for label, run in runners.items():
                        what = "saturated" if rate is None else f"{rate} q/s"
                        log(f"round {round_}/{args.rounds}: {label}, {what}")
                        result = run(rate)
                        into.setdefault(label, []).append(result)
                        tail = ""
                        if result.latencies_ms:
                            tail = f", p99 {percentile(result.latencies_ms, 99):.3f} ms"
                        log(
                            f"  {result.qps:.0f} q/s, lost {result.lost}, {result.rcodes}{tail}; "
                            f"CPU server {result.server_cpu:.2f}, dnsperf "
                            f"{result.client_cpu:.2f}, machine {result.machine_cpu:.2f} cores"
                        )
                        for proc, logfile in ((cp, cp_log), (dm, dm_log)):
                            if proc.poll() is not None:
                                raise RuntimeError(f"{proc.args!r} exited:\n{logfile.read_text()}")
    finally:
        lab.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"DNS: {args.backends} backends aliased `web`, A queries for 3 existing names, "
        f"{args.rounds} round(s) of {args.seconds} s runs per server, interleaved"
    )
    print(machine_line())
    rows = [
        r for label in runners for r in rows_for(label, saturated[label], fixed[label], args.rate)
    ]
    print(table(rows))
    print()
    cp_qps = statistics.median(r.qps for r in saturated["controlplane"])
    dk_qps = statistics.median(r.qps for r in saturated["docker DNS"])
    dm_qps = statistics.median(r.qps for r in saturated["dnsmasq"])
    cp_lat = [v for r in fixed["controlplane"] for v in r.latencies_ms]
    per_run = "; ".join(
        f"{label} " + ", ".join(f"{percentile(r.latencies_ms, 99):.3f}" for r in fixed[label])
        for label in runners
    )
    print(
        f"throughput (median of runs): controlplane / docker DNS {cp_qps / dk_qps:.2f}x "
        f"(target >= 1.0x), controlplane / dnsmasq {cp_qps / dm_qps:.2f}x"
    )
    print(
        f"controlplane at {args.rate} q/s: p99 {percentile(cp_lat, 99):.3f} ms (target < 1 ms), "
        f"lost "
        f"{sum(r.lost for r in fixed['controlplane'])} of "
        f"{sum(r.sent for r in fixed['controlplane'])} (target 0)"
    )
    print(
        f"p99 at {args.rate} q/s of each run, ms (dnsmasq's shows the machine's noise): {per_run}"
    )
    others = [
        r.machine_cpu - r.server_cpu - r.client_cpu
        for runs in (*saturated.values(), *fixed.values())
        for r in runs
    ]
    if max(others) > OTHERS_NOISY:
        print(
            f"warning: other processes (not server, not dnsperf) kept up to {max(others):.2f} of "
            f"{os.cpu_count()} cores busy during a run (median {statistics.median(others):.2f}; "
            "for docker DNS this includes containerd and the shim): these figures are noisy"
        )
    print("\nservers:")
    print("\n".join(f"  {s}" for s in servers))
    print(f"queries (a), (b): {', '.join(names)};  (c): {', '.join(docker_names)}")
    print("dnsperf (same parameters for all; the file holds the names above, A):")
    for label in runners:
        print(f"  {label}:\n    {saturated[label][0].command}\n    {fixed[label][0].command}")


if __name__ == "__main__":
    main()
