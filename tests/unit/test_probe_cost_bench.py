"""bench/probe_cost.py with tiny numbers: its loopback backends answer every check, the
readiness gate alone sends nothing once they passed, its table has a row per scenario, and its
backends' process is gone at the end."""

from __future__ import annotations

import os
from pathlib import Path

from bench import probe_cost


def children() -> list[str]:
    pid = os.getpid()
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in found if Path(f"/proc/{c}/cmdline").exists()]


def test_a_tiny_run_checks_every_backend_and_the_idle_gate_sends_nothing() -> None:
    # the window (0.3 s to 1.5 s) holds each backend's second check, due 0.8 s to 1 s after
    # its first (which the pass sent): bounds, not an exact count, on a loaded machine
    args = probe_cost.options(
        ["--backends", "3", "--small", "0", "--seconds", "1.5", "--warmup", "0.3"]
    )
    results, nofile = probe_cost.run(args)

    found = {m.scenario.mode: m for m in results}
    assert list(found) == ["http", "tcp", "idle"]
    for mode in ("http", "tcp"):
        assert 1 <= found[mode].probes <= 6, mode
        assert found[mode].failed == 0, mode
        assert len(found[mode].latencies) == found[mode].probes, mode
    assert found["idle"].probes == 0
    assert all(m.samples and m.window > 0 and m.scenario.count == 3 for m in results)
    text = probe_cost.report(results, nofile, args)
    assert len(text.splitlines()) == 2 + len(results) + 2
    assert "RLIMIT_NOFILE" in text
    assert not [c for c in children() if "--serve" in Path(f"/proc/{c}/cmdline").read_text()]
