"""Shared pieces of the benchmarks: percentiles, the table printer, the machine line."""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Sequence


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
