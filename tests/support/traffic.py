"""Bounded HTTP load through nginx with real clients, hey and wrk, for the chaos scenarios.

hey (Go's HTTP client) retries an idempotent request when a kept-alive connection is closed
under it, as browsers and HTTP libraries do; a failure it reports is one a user would see.
wrk does not retry, so it counts the keep-alive connections that old nginx workers close after
a reload as read errors; it is reported beside hey, not judged. Both run on loopback only,
bounded in time and rate, and stop by themselves; leaving the `with` block stops them early.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class LoadResult:
    tool: str
    requests: int
    failed: int
    """Non-2xx replies and socket errors."""
    detail: str


def parse_hey(output: str) -> LoadResult:
    statuses = {
        int(code): int(count)
        for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)
    }
    errors = output.split("Error distribution:", 1)[1] if "Error distribution:" in output else ""
    error_count = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", errors, re.MULTILINE))
    bad = sum(n for code, n in statuses.items() if not 200 <= code < 300)
    detail = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
    if error_count:
        first = errors.strip().splitlines()[0].strip()
        detail += f"; {error_count} socket errors, e.g. {first[:160]}"
    return LoadResult("hey", sum(statuses.values()) + error_count, bad + error_count, detail)


def parse_wrk(output: str) -> LoadResult:
    total = re.search(r"(\d+) requests in", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = [int(n) for n in sockets.groups()] if sockets else [0, 0, 0, 0]
    bad = int(non_2xx.group(1)) if non_2xx else 0
    detail = "connect {}, read {}, write {}, timeout {}".format(*errors) + f"; non-2xx {bad}"
    return LoadResult("wrk", int(total.group(1)) if total else 0, sum(errors) + bad, detail)


class Traffic:
    """hey, and wrk when `with_wrk`, against one published nginx port and Host header."""

    def __init__(
        self,
        port: int,
        host: str,
        max_seconds: float = 60.0,
        workers: int = 4,
        rate: int = 50,
        with_wrk: bool = True,
    ) -> None:
        for tool in ("hey", "wrk") if with_wrk else ("hey",):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: run `make dev` (Debian package {tool})")
        url = f"http://127.0.0.1:{port}/"
        seconds = f"{max(1, int(max_seconds))}s"
        self._commands = {
            "hey": ["hey", "-z", seconds, "-c", str(workers), "-q", str(rate), "-host", host, url],
        }
        if with_wrk:
            self._commands["wrk"] = [
                "wrk",
                "-t1",
                "-c2",
                "-d",
                seconds,
                "-H",
                f"Host: {host}",
                "--timeout",
                "10s",
                url,
            ]
        self._processes: dict[str, subprocess.Popen[str]] = {}
        self.results: dict[str, LoadResult] = {}

    def __enter__(self) -> Traffic:
        for tool, command in self._commands.items():
            self._processes[tool] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for tool, process in self._processes.items():
            try:
                output, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
            parse = parse_hey if tool == "hey" else parse_wrk
            self.results[tool] = parse(output)

    @property
    def hey(self) -> LoadResult:
        return self.results["hey"]
