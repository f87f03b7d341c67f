"""Shared pieces of the benchmarks: percentiles, the table printer, the machine line."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

import httpx

from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from controlplane.wiring import build_controller
from tests.support.lab import wait_until


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def row(name: str, values: Sequence[float], unit: str = "ms") -> list[str]:
    if not values:
        return [name, "-", "-", "-", "0", unit]
    return [
        name,
        f"{statistics.median(values):.1f}",
        f"{percentile(values, 99):.1f}",
        f"{max(values):.1f}",
        str(len(values)),
        unit,
    ]


def table(
    rows: Sequence[Sequence[str]],
    header: Sequence[str] = ("metric", "p50", "p99", "max", "n", "unit"),
) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def machine_line() -> str:
    return (
        f"cores: {os.cpu_count()}  python: {sys.version.split()[0]}  command: {' '.join(sys.argv)}"
    )


@dataclass(frozen=True)
class Hit:
    started_ns: int
    value: str
    """The watched header (or the body) of a 200 reply, "HTTP <status>" otherwise, or
    "error"."""

    @property
    def failed(self) -> bool:
        return self.value in ("", "error") or self.value.startswith("HTTP ")


def _probe(
    port: int, host: str, header: str, path: str, deadline_ns: int, sink: Connection
) -> None:
    """The prober's loop, in its own process: hits go back one message each."""
    with httpx.Client(timeout=5.0, headers={"Host": host, "Connection": "close"}) as client:
        while time.time_ns() < deadline_ns and not sink.poll():
            started = time.time_ns()
            try:
                reply = client.get(f"http://127.0.0.1:{port}{path}")
            except httpx.HTTPError:
                sink.send((started, "error"))
                continue
            value = reply.headers.get(header, "") if header else reply.text.strip()
            ok = reply.status_code == 200
            sink.send((started, value if ok else f"HTTP {reply.status_code}"))
    sink.close()


class Prober:
    """One client sending requests to nginx on loopback back to back, each on a new
    connection (bounded by time), recording one response header of each; its resolution is
    one request (~2-5 ms). The client runs in its own process, as real clients do, so it
    does not compete with an in-process controller for the interpreter lock. `header` ""
    records the body instead (the backend image answers with its container's name)."""

    def __init__(
        self, port: int, host: str, header: str, max_seconds: float, path: str = "/"
    ) -> None:
        self.hits: list[Hit] = []
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        self._pipe = ours
        self._process = multiprocessing.get_context("spawn").Process(
            target=_probe,
            args=(port, host, header, path, time.time_ns() + int(max_seconds * 1e9), theirs),
            daemon=True,
        )
        self._process.start()
        theirs.close()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                started, value = self._pipe.recv()
                self.hits.append(Hit(started, value))

    def first(self, match: Callable[[str], bool], after_ns: int) -> int | None:
        return next(
            (h.started_ns for h in self.hits if h.started_ns >= after_ns and match(h.value)), None
        )

    def last(self, match: Callable[[str], bool]) -> int | None:
        times = [h.started_ns for h in self.hits if match(h.value)]
        return max(times) if times else None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._thread.join(timeout=10)


class Running:
    """A controller in this process (so a bench reads its reports), with its API and DNS when
    the settings ask for them; stopped by `close`."""

    def __init__(self, settings: Settings) -> None:
        self.reports: list[ReconcileReport] = []
        self.controller = build_controller(settings)
        self.controller.reconciler.on_report.append(self.reports.append)
        self.controller.start_servers()
        self._thread = threading.Thread(target=self.controller.loop.run, daemon=True)
        self._thread.start()
        wait_until(self.controller.loop.ready.is_set)

    @property
    def reloads(self) -> int:
        return sum(1 for r in self.reports if r.deployed)

    def close(self) -> None:
        self.controller.loop.stop()
        self._thread.join(timeout=10)
        self.controller.close()
