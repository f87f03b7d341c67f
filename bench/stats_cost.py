"""What traffic figures (issue 17) cost, on both data planes in one run: "stats on vs off:
proxied requests/s through nginx (wrk, same run) >= 0.95x; controller CPU for stats at 5,000
proxied req/s: report it; memory flat over 1 M requests".

Per data plane, two labs side by side, each its own network, managed nginx (the test images:
2 workers) and 2 nginx backends answering a short body, and each its own controller in this
process: one with Settings(stats=True), one with stats=False, default flags otherwise, all
running throughout, so each renders its own nginx's config (reload: the syslog access log,
one datagram per request sent; dynamic: the Lua's per-worker counts, sent every second).
The reload data plane gets a stats-on lab per --samples value (--stats-sample: 10, the
default, sends one in ten fast answers; 1 sends every request). Before
any load the bench checks what each nginx runs (`nginx -T`) and that the stats-on listener
hears from its nginx; a data plane whose nginx sends nothing is left out, said so.

1. Proxied requests/s: wrk -t2 -c32 --latency (keep-alive), turns of --seconds alternating
   over the labs, the order rotating each round (a 1 s wrk first in round 1 opens nginx's
   connections to the backends and warms the Lua code): requests/s, p50/p99 latency; per request,
   nginx's CPU (its container's cgroup), this process's (every controller in it) and the
   whole machine's (/proc/stat: other tenants' too); with stats on, the listener thread's
   CPU and the requests it counted of those sent (after its last datagrams came in).
2. Controller CPU at --rate req/s: hey -c 50 -q rate/50 for --cpu-seconds through each lab:
   this process's CPU and the stats listener's thread (by its name, through its CPU clock),
   as % of one core.
3. Memory: about --memory-requests through each stats-on nginx in --chunks wrk runs, each
   as long as its share takes at the last rate seen (so the total is ~1 M), all within
   --memory-seconds: this process's RSS after each chunk and a full collection, the
   listener's book keys and running totals' keys (what grows with traffic, if anything).

Last, the listener's own Python path per reload datagram with no socket (StatsListener.received
on a typical datagram; the parse and the book's add alone), for where the time goes.
Requests go only to loopback published ports; everything created carries controlplane.test=1
and is removed at the end, also on Ctrl-C or SIGTERM. Run:

    .venv/bin/python bench/stats_cost.py [--planes reload,dynamic] [--parts 1,2,3]
        [--rounds 6] [--seconds 5] [--rate 5000] [--cpu-seconds 20] [--cpu-rounds 1]
        [--memory-requests 1000000] [--chunks 5] [--memory-seconds 300] [--samples 10,1]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import docker
import docker.errors
from docker.models.containers import Container

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Running, machine_line, percentile, table
from bench.dataplane import SERVICE, Plane, bodies, cpu_ns, ended, make_plane
from controlplane.addresses import SocketAddress
from controlplane.core import access_log
from controlplane.core.traffic import Key, TrafficBook
from controlplane.settings import Settings
from controlplane.stats_listener import StatsListener
from images.build import OfflineImages, ensure_images
from tests.support.lab import wait_until
from tests.support.traffic import parse_hey, parse_wrk

PLANES = ("reload", "dynamic")
PARTS = ("1", "2", "3")
LISTENER_THREAD = "stats-listener"
HEY_WORKERS = 50
SINK_PORT = re.compile(
    r"^access_log \S*syslog:server=(?:\[[^\]]*\]|[^\s:,]*):(\d+),"
    r"|^controlplane\.configure\(.*\bstats = \{[^}]*\bport = (\d+)",
    re.MULTILINE,
)
"""Where a config sends stats: the reload access log's port, or the dynamic configure()'s
(the Lua source inlined beside it has a `stats = {` of its own)."""
SAMPLE = b"<190>Dec  1 00:17:00 %s: cps2|1|bench|172.18.0.3:80|200|0.001|0.000|200|212|67"
"""A typical reload datagram: one try, answered."""
SAMPLE_SOURCE = "172.18.0.2"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
HEADER = ("lab", "metric", "median", "p99", "min", "max", "n", "unit")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f} {five:.2f} {fifteen:.2f}"


def rss_mib() -> float:
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def udp_drops() -> int:
    """Datagrams the kernel dropped for a full receive buffer in this network namespace
    (anyone's, not only the listener's)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [ln for ln in lines if ln and ln[0] == "Udp:"][:2]
    return int(dict(zip(names, values, strict=True)).get("RcvbufErrors", 0))


def machine_busy() -> float:
    """CPU seconds all cores spent on anything but idle and iowait so far (/proc/stat)."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def container_cpu_ns(container: Container) -> int:
    """The container's CPU time so far, from its cgroup (v1 cpuacct, else v2 cpu.stat) when
    this process can read it: the engine's stats call takes a second to answer."""
    root = Path("/sys/fs/cgroup")
    v1 = root / "cpuacct" / "docker" / str(container.id) / "cpuacct.usage"
    with contextlib.suppress(OSError, ValueError):
        return int(v1.read_text())
    for v2 in (
        root / "system.slice" / f"docker-{container.id}.scope",
        root / "docker" / str(container.id),
    ):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            lines = (v2 / "cpu.stat").read_text().splitlines()
            return int(next(ln.split()[1] for ln in lines if ln.startswith("usage_usec "))) * 1000
    return cpu_ns(container)


def thread_cpu(ident: int | None) -> float:
    """CPU seconds of one thread of this process so far (0 without one)."""
    if ident is None:
        return 0.0
    with contextlib.suppress(OSError):
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    return 0.0


def listener_idents() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name == LISTENER_THREAD and t.ident}


@dataclass
class Lab:
    """One data plane with stats on or off: its nginx, backends and controller."""

    mode: str
    stats: bool
    plane: Plane
    sample: int = 1
    """--stats-sample (the reload data plane's; the dynamic one counts every request)."""
    running: Running | None = None
    listener_ident: int | None = None
    workers: int = 0

    @property
    def name(self) -> str:
        if not self.stats:
            return f"{self.mode}, stats off"
        sampled = f", 1 in {self.sample}" if self.mode == "reload" else ""
        return f"{self.mode}, stats on{sampled}"

    @property
    def listener(self) -> StatsListener | None:
        return self.running.controller.stats if self.running is not None else None

    def accepted(self) -> int:
        listener = self.listener
        return listener.datagrams()["accepted"] if listener is not None else 0

    def counted(self) -> int:
        """Requests to the service the listener counted since it started (running totals)."""
        listener = self.listener
        totals = listener.totals().get(Key(SERVICE, "")) if listener is not None else None
        return sum(totals.requests) if totals is not None else 0

    def config(self) -> str:
        code, output = self.plane.proxy.exec_run(["nginx", "-T"])
        text = output.decode("utf-8", "replace")
        if code != 0:
            raise RuntimeError(f"{self.name}: nginx -T failed: {text[-500:]}")
        return text

    def close(self) -> None:
        if self.running is not None:
            self.running.close()
            self.running = None


def set_up(
    client: docker.DockerClient,
    images: OfflineImages,
    mode: str,
    stats: bool,
    sample: int,
    labs: list[Lab],
) -> Lab:
    """The lab (in `labs` as soon as it exists, so it is removed whatever happens), served by
    its own controller."""
    lab = Lab(mode, stats, make_plane(mode, client, images, "", ""), sample)
    labs.append(lab)
    backends = [lab.plane.fast_backend() for _ in range(2)]
    before = listener_idents()
    networks = frozenset({str(lab.plane.net.name)})
    lab.running = Running(Settings(networks=networks, stats=stats, stats_sample=sample))
    lab.listener_ident = next(iter(listener_idents() - before), None)
    lab.plane.served({str(c.name) for c in backends}, running=lab.running)
    lab.workers = sum(1 for p in lab.plane.proxy.top()["Processes"] if "worker process" in p[-1])
    return lab


def checked(lab: Lab) -> str | None:
    """Why the lab can't be measured as it is named (None: it can): the config nginx runs
    sends stats to this controller's listener exactly when stats are on, and the listener counts
    requests sent through it."""
    ports = {int(n) for found in SINK_PORT.finditer(lab.config()) for n in found.groups() if n}
    listener = lab.listener
    if listener is None:
        return f"nginx -T sends stats to port {sorted(ports)} with stats off" if ports else None
    if ports != {listener.port}:
        return (
            f"nginx -T sends stats to ports {sorted(ports)}, not to this controller's "
            f"{listener.port} alone (its data plane sends none?)"
        )
    bodies(lab.plane.port, 10)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: lab.counted() > 0, timeout=3, interval=0.05)
        return None
    return f"its nginx sent no stats in 3 s after requests (listener: {listener.datagrams()})"


@contextlib.contextmanager
def load(command: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """A load generator, killed if still running on the way out (it is bounded anyway)."""
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def wrk(port: int, seconds: float) -> str:
    """wrk -t2 -c32 --latency (keep-alive) through nginx, bounded in time."""
    command = ["wrk", "-t2", "-c32", f"-d{max(1, round(seconds))}s", "--latency",
               "--timeout", "10s", "-H", f"Host: {SERVICE}"]  # fmt: skip
    command.append(f"http://127.0.0.1:{port}/")
    with load(command) as process:
        return ended(process, interrupt=False)


def rate_of(output: str) -> float:
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    return float(found.group(1)) if found else float("nan")


def latency_ms(output: str, percent: int) -> float:
    found = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    return float(found.group(1)) * UNITS[found.group(2)] if found else float("nan")


def settle(lab: Lab, timeout: float = 4.0) -> int:
    """The requests the listener counted, once that stops growing: the last datagrams in
    flight (reload), the workers' next send (dynamic, every second). Bounded."""
    last = lab.counted()
    if lab.listener is None:
        return last
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2 if lab.mode == "reload" else 1.2)
        now = lab.counted()
        if now == last:
            break
        last = now
    return last


@dataclass
class Usage:
    """CPU seconds and counts at one moment, for differences over a turn."""

    at: float
    nginx_ns: int
    process: float
    listener: float
    machine: float
    drops: int

    @classmethod
    def now(cls, lab: Lab) -> Usage:
        return cls(
            time.monotonic(),
            container_cpu_ns(lab.plane.proxy),
            time.process_time(),
            thread_cpu(lab.listener_ident),
            machine_busy(),
            udp_drops(),
        )


@dataclass
class Figures:
    """Per lab, per metric: one value per turn."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def add(self, lab: Lab, metric: str, value: float, unit: str = "") -> None:
        self.values.setdefault(lab.name, {}).setdefault(metric, []).append(value)
        self.units[metric] = unit

    def get(self, lab: Lab, metric: str) -> list[float]:
        return [v for v in self.values.get(lab.name, {}).get(metric, []) if v == v]

    def median(self, lab: Lab, metric: str) -> float:
        values = self.get(lab, metric)
        return statistics.median(values) if values else float("nan")

    def rows(self) -> list[list[str]]:
        rows = []
        for name, metrics in self.values.items():
            for metric, values in metrics.items():
                finite = [v for v in values if v == v]
                if not finite:
                    rows.append([name, metric, "-", "-", "-", "-", "0", self.units[metric]])
                    continue
                digits = 3 if max(abs(v) for v in finite) < 10 else 1
                shown = [
                    statistics.median(finite),
                    percentile(finite, 99),
                    min(finite),
                    max(finite),
                ]
                cells = [f"{v:.{digits}f}" for v in shown]
                rows.append([name, metric, *cells, str(len(finite)), self.units[metric]])
        return rows


def rotated(labs: Sequence[Lab], rounds: int) -> Iterator[tuple[int, Lab]]:
    """Each round gives every lab a turn; the order rotates, so none always goes first."""
    for r in range(rounds):
        shift = r % len(labs)
        for lab in [*labs[shift:], *labs[:shift]]:
            yield r, lab


def pairs(labs: Sequence[Lab]) -> Iterator[tuple[Lab, Lab]]:
    """(stats on, stats off) per data plane, for each stats-on lab of it."""
    for mode in dict.fromkeys(lab.mode for lab in labs):
        off = [lab for lab in labs if lab.mode == mode and not lab.stats]
        for on in (lab for lab in labs if lab.mode == mode and lab.stats):
            if off:
                yield on, off[0]


def title(text: str) -> None:
    print(f"\n=== {text}")
    print(machine_line())
    print(load_line())


# 1. Requests/s on vs off -----------------------------------------------------------------


def throughput(labs: Sequence[Lab], rounds: int, seconds: float) -> Figures:
    figures = Figures()
    for r, lab in rotated(labs, rounds):
        log(f"1. round {r + 1}, {lab.name}: wrk {seconds:g} s")
        if r == 0:
            wrk(lab.plane.port, 1)  # nginx's connections to the backends, the Lua code
        counted = settle(lab)
        drops = udp_drops()
        before = Usage.now(lab)
        output = wrk(lab.plane.port, seconds)
        after = Usage.now(lab)
        said = parse_wrk(output)
        n = said.requests
        if n == 0:
            raise RuntimeError(f"wrk through {lab.name} said:\n{output}")
        figures.add(lab, "requests/s", rate_of(output), "req/s")
        figures.add(lab, "latency p50", latency_ms(output, 50), "ms")
        figures.add(lab, "latency p99", latency_ms(output, 99), "ms")
        figures.add(lab, "nginx CPU / request", (after.nginx_ns - before.nginx_ns) / n / 1e3, "us")
        figures.add(lab, "process CPU / request", (after.process - before.process) / n * 1e6, "us")
        figures.add(lab, "machine CPU / request", (after.machine - before.machine) / n * 1e6, "us")
        figures.add(lab, "wrk errors + non-2xx", said.failed)
        if lab.stats:
            used = after.listener - before.listener
            figures.add(lab, "listener CPU / request", used / n * 1e6, "us")
            figures.add(lab, "requests counted / sent", (settle(lab) - counted) / n)
            figures.add(lab, "UDP receive-buffer drops", udp_drops() - drops)
    title(
        f"1. proxied requests/s, stats on vs off: wrk -t2 -c32 -d{seconds:g}s --latency "
        f"(keep-alive) through nginx to 2 nginx backends, {rounds} turns per lab, alternating"
    )
    print(table(figures.rows(), HEADER))
    for on, off in pairs(labs):
        rate_on, rate_off = figures.get(on, "requests/s"), figures.get(off, "requests/s")
        ratios = [a / b for a, b in zip(rate_on, rate_off, strict=False)]
        if not ratios:
            continue
        medians = statistics.median(rate_on) / statistics.median(rate_off)

        def extra(metric: str, on: Lab = on, off: Lab = off) -> float:
            return figures.median(on, metric) - figures.median(off, metric)

        print(
            f"[{on.name}] on / off requests/s: {medians:.3f} (medians), "
            f"{statistics.median(ratios):.3f} (median of the rounds' ratios, "
            f"{min(ratios):.3f} to {max(ratios):.3f}); per request with stats (medians): nginx "
            f"{extra('nginx CPU / request'):+.1f} us, this process "
            f"{extra('process CPU / request'):+.1f} us, the machine "
            f"{extra('machine CPU / request'):+.1f} us; nginx has {on.workers} workers"
        )
    sys.stdout.flush()
    return figures


# 2. Controller CPU at a fixed rate -------------------------------------------------------


def cpu_at_rate(labs: Sequence[Lab], rate: int, seconds: float, rounds: int) -> None:
    per_worker = max(1, round(rate / HEY_WORKERS))
    rows = []
    busy: dict[str, list[float]] = {}
    for r, lab in rotated(labs, rounds):
        log(f"2. round {r + 1}, {lab.name}: hey {rate} req/s for {seconds:g} s")
        counted = settle(lab)
        accepted = lab.accepted()
        url = f"http://127.0.0.1:{lab.plane.port}/"
        command = ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(HEY_WORKERS),
                   "-q", str(per_worker), "-host", SERVICE, url]  # fmt: skip
        before = Usage.now(lab)
        with load(command) as process:
            output = ended(process, interrupt=False)
        after = Usage.now(lab)
        counted = settle(lab) - counted
        accepted = lab.accepted() - accepted
        said = parse_hey(output)
        took = after.at - before.at
        share = (after.process - before.process) / took * 100
        listener = after.listener - before.listener
        busy.setdefault(lab.name, []).append(share)
        on = lab.stats
        rows.append(
            [
                lab.name,
                str(r + 1),
                f"{rate_of(output):.0f}",
                f"{share:.1f}",
                f"{listener / took * 100:.1f}" if on else "-",
                f"{listener / accepted * 1e6:.1f}" if on and accepted else "-",
                str(accepted) if on else "-",
                f"{counted / said.requests:.3f}" if on and said.requests else "-",
                f"{(after.nginx_ns - before.nginx_ns) / 1e9 / took * 100:.1f}",
                f"{(after.machine - before.machine) / took * 100:.0f}",
                str(said.failed),
            ]
        )
    title(
        f"2. controller CPU at {rate} proxied req/s: hey -z {seconds:g}s -c {HEY_WORKERS} -q "
        f"{per_worker} (keep-alive); CPU as % of one core over the run"
    )
    header = ("lab", "round", "req/s", "process %", "listener thread %", "listener us/datagram",
              "datagrams", "counted/sent", "nginx %", "machine %", "failed")  # fmt: skip
    print(table(rows, header))
    for on_lab, off_lab in pairs(labs):
        if busy.get(on_lab.name) and busy.get(off_lab.name):
            extra = statistics.median(busy[on_lab.name]) - statistics.median(busy[off_lab.name])
            print(f"[{on_lab.name}] this process, stats on - off: {extra:+.1f}% of one core")
    sys.stdout.flush()


# 3. Memory over 1 M requests -------------------------------------------------------------


def memory(
    labs: Sequence[Lab], requests: int, chunks: int, budget: float, rates: dict[str, float]
) -> None:
    """Each chunk runs for what it takes to reach its part of `requests` at the last rate
    seen (`rates`: part 1's, per lab), within what is left of `budget`."""
    rows = []
    for lab in [lab for lab in labs if lab.stats]:
        listener = lab.listener
        assert listener is not None
        rate = rates.get(lab.name, 10000.0)
        deadline = time.monotonic() + budget
        sent = 0
        rows.append(memory_row(lab, listener, "before", sent, 0))
        for chunk in range(chunks):
            left = deadline - time.monotonic()
            wanted = requests * (chunk + 1) // chunks - sent
            if left < 1 or wanted <= 0:
                break
            seconds = max(1, min(int(left), round(wanted / rate)))
            log(
                f"3. {lab.name}: chunk {chunk + 1} of {chunks}: ~{wanted:,} requests in {seconds} s"
            )
            began = time.monotonic()
            output = wrk(lab.plane.port, seconds)
            took = time.monotonic() - began
            done = parse_wrk(output).requests
            ran = re.search(r"requests in ([\d.]+)s", output)
            rate = done / float(ran.group(1)) if ran and done else rate
            sent += done
            settle(lab)
            rows.append(memory_row(lab, listener, str(chunk + 1), sent, took))
    title(
        f"3. memory with stats on: ~{requests:,} requests per data plane in {chunks} wrk -t2 -c32 "
        f"chunks (at most {budget:g} s per plane); RSS after a full collection"
    )
    header = ("lab", "chunk", "requests sent", "counted", "datagrams accepted", "RSS MiB",
              "book keys", "totals keys", "seconds")  # fmt: skip
    print(table(rows, header))
    sys.stdout.flush()


def memory_row(lab: Lab, listener: StatsListener, chunk: str, sent: int, took: float) -> list[str]:
    return [
        lab.name,
        chunk,
        f"{sent:,}",
        f"{lab.counted():,}",
        f"{listener.datagrams()['accepted']:,}",
        f"{rss_mib():.1f}",
        str(len(listener._book)),  # private: the book's keys, each a bounded ring
        str(len(listener.totals())),
        f"{took:.0f}",
    ]


# The listener's path per datagram, no socket -----------------------------------------------


def per_datagram(count: int = 20000) -> None:
    """What the listener's thread does per datagram once it has read it, `count` times on the
    same datagram (StatsListener.received: each one also goes into the book, where a read of
    many adds each key once), then its parse and its tally alone."""
    tag = "T" * 24
    data = SAMPLE % tag.encode()
    listener = StatsListener(SocketAddress("127.0.0.1", 0), tag, lambda: {SAMPLE_SOURCE})
    try:
        whole = timed(lambda: listener.received(data, SAMPLE_SOURCE), count)
        assert listener.datagrams()["accepted"] == count, listener.datagrams()
    finally:
        listener.close()
    parse = timed(lambda: access_log.parse(data, tag), count)
    request = access_log.parse(data, tag)
    assert request is not None, "the sample datagram no longer parses"
    vectors: dict[Key, list[int]] = {}
    tally = timed(lambda: access_log.tally(vectors, request), count)
    book = TrafficBook()
    add = timed(lambda: access_log.add(book, request, time.monotonic()), count)
    title(f"the listener's Python path per reload datagram, no socket ({count:,} times)")
    rows = [
        ["StatsListener.received (each into the book)", f"{whole:.1f}"],
        ["  access_log.parse", f"{parse:.1f}"],
        ["  access_log.tally (per datagram of a read)", f"{tally:.1f}"],
        ["  access_log.add (tally + the book, per key)", f"{add:.1f}"],
    ]
    print(table(rows, ("step", "us each")))


def timed(call: Callable[[], object], count: int) -> float:
    began = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - began) / count * 1e6


# ---------------------------------------------------------------------------------------------


def interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planes", default=",".join(PLANES), help="comma-separated subset")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--rounds", type=int, default=6, help="part 1: turns per lab")
    parser.add_argument("--seconds", type=float, default=5, help="part 1: each wrk turn")
    parser.add_argument("--rate", type=int, default=5000, help="part 2: proxied req/s")
    parser.add_argument("--cpu-seconds", type=float, default=20, help="part 2: each hey run")
    parser.add_argument("--cpu-rounds", type=int, default=1, help="part 2: runs per lab")
    parser.add_argument("--memory-requests", type=int, default=1_000_000, help="part 3")
    parser.add_argument("--chunks", type=int, default=5, help="part 3: wrk runs per plane")
    parser.add_argument("--memory-seconds", type=float, default=300, help="part 3: per plane")
    parser.add_argument(
        "--samples", default="10,1", help="reload: a stats-on lab per --stats-sample value"
    )
    args = parser.parse_args()
    samples = [int(n) for n in args.samples.split(",") if n.strip()]
    planes = [p.strip() for p in args.planes.split(",") if p.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(planes) - set(PLANES)) + sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}; planes {PLANES}, parts {PARTS}")

    signal.signal(signal.SIGTERM, interrupted)
    client = docker.from_env(version="auto")
    labs: list[Lab] = []
    print(machine_line())
    print(load_line() + " (at the start)")
    began = time.monotonic()
    try:
        images = ensure_images(client, progress=log)
        for mode in planes:
            for stats, sample in [
                *((True, n) for n in (samples if mode == "reload" else [1])),
                (False, 1),
            ]:
                log(f"setting up {mode}, stats {'on' if stats else 'off'}, sample {sample}")
                set_up(client, images, mode, stats, sample, labs)
        measured = []
        for lab in labs:
            why = checked(lab)
            if why is None:
                measured.append(lab)
            else:
                print(f"[{lab.name}] left out with its data plane: {why}")
        left_out = {lab.mode for lab in labs if lab not in measured}
        measured = [lab for lab in measured if lab.mode not in left_out]
        for lab in measured:
            said = lab.listener.datagrams() if lab.listener is not None else "-"
            print(f"[{lab.name}] nginx: {lab.workers} workers; stats datagrams so far: {said}")
        rates: dict[str, float] = {}
        if "1" in parts:
            figures = throughput(measured, args.rounds, args.seconds)
            rates = {lab.name: figures.median(lab, "requests/s") for lab in measured}
        if "2" in parts:
            cpu_at_rate(measured, args.rate, args.cpu_seconds, args.cpu_rounds)
        if "3" in parts:
            memory(measured, args.memory_requests, args.chunks, args.memory_seconds, rates)
        per_datagram()
    finally:
        for lab in labs:
            lab.close()
        for lab in labs:
            try:
                lab.plane.lab.cleanup()
            except docker.errors.APIError as error:
                log(f"cleanup of run {lab.plane.lab.run_id}: {error}")
        log(f"{time.monotonic() - began:.0f} s in all")


if __name__ == "__main__":
    main()
