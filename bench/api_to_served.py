"""API change to served: how long from `PUT /api/v1/services/bench/algorithm` until nginx
answers with the new method, over a series of method switches.

Runs a real controller with its API on loopback (in this process, to read its reports), a
managed nginx and busybox backends from the offline test images. A prober sends requests back
to back, each on a new connection, and reads the X-Balancing header that bench/templates adds.
Run:

    .venv/bin/python bench/api_to_served.py [--changes 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Prober, Running, machine_line, row, table
from controlplane.settings import Settings
from images.build import ensure_images
from tests.support.lab import Lab, wait_until

TEMPLATES = Path(__file__).resolve().parent / "templates"
HOST = "bench"
CHANGES = [
    ({"method": "least_conn"}, "least_conn"),
    ({"method": "hash", "key": "$request_uri", "consistent": True}, "hash-consistent"),
    ({"method": "ip_hash"}, "ip_hash"),
    ({"method": "random", "two": True}, "random"),
    ({"method": "round_robin"}, "round_robin"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=50, help="method switches to measure")
    args = parser.parse_args()

    client = docker.from_env(version="auto")
    lab = Lab(client, ensure_images(client, progress=lambda line: print(line, file=sys.stderr)))
    served: list[float] = []
    replied: list[float] = []
    phases: dict[str, list[float]] = {}
    try:
        net = lab.network("bench")
        lb = lab.nginx(net)
        for _ in range(3):
            lab.backend(net, alias=HOST)
        with tempfile.TemporaryDirectory() as state_dir:
            settings = Settings(
                networks=frozenset({net.name}),
                templates_dir=TEMPLATES,
                api_bind="127.0.0.1:0",
                state_dir=Path(state_dir),
            )
            running = Running(settings)
            reports = running.reports
            controller = running.controller
            assert controller.api is not None
            api = httpx.Client(base_url=controller.api.url, timeout=30)
            prober = Prober(lab.published_port(lb), HOST, "x-balancing", 60 + args.changes * 3)
            wait_until(lambda: prober.first(lambda v: v == "round_robin", 0), what="nginx serving")
            for n in range(args.changes):
                body, expected = CHANGES[n % len(CHANGES)]
                sent = time.time_ns()
                reply = api.put(f"/api/v1/services/{HOST}/algorithm?wait=true", json=body)
                answered = time.time_ns()
                reply.raise_for_status()
                seen = wait_until(
                    lambda expected=expected, sent=sent: prober.first(
                        lambda v: v == expected, sent
                    ),
                    timeout=10,
                    interval=0.002,
                )
                assert seen is not None
                served.append((seen - sent) / 1e6)
                replied.append((answered - sent) / 1e6)
                report = next(r for r in reports if r.started_ns >= sent and r.deployed)
                deploy = report.deployed[0].timings
                via = report.deployed[0].via
                for name, value in (
                    ("queue -> pass start", (report.started_ns - sent) / 1e6),
                    (
                        "list + build + render",
                        (report.timings["list"] + report.timings["render"]) * 1000,
                    ),
                    (f"write the file ({via})", deploy.get("copy", 0) * 1000),
                    (f"nginx -t ({via})", deploy.get("test", 0) * 1000),
                    (f"SIGHUP ({via})", deploy.get("reload", 0) * 1000),
                    ("new workers up, old ones told to quit", deploy.get("retire", 0) * 1000),
                ):
                    phases.setdefault(name, []).append(value)
                time.sleep(0.2)
            prober.stop()
            running.close()
    finally:
        lab.cleanup()

    print(machine_line())
    print(
        f"{args.changes} method switches through the API (?wait=true), one managed nginx "
        "(2 workers), one client sending requests back to back\n"
    )
    print(
        table(
            [
                row("PUT sent -> nginx serving with the new method", served),
                row("PUT sent -> reply (?wait=true: nginx reloaded)", replied),
                *[row(f"  {name}", values) for name, values in phases.items()],
            ]
        )
    )
    failed = sum(1 for h in prober.hits if h.failed)
    print(f"\nrequests sent while measuring: {len(prober.hits)}, failed: {failed}")


if __name__ == "__main__":
    main()
