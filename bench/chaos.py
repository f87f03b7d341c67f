"""Chaos: every scenario of issue 6 under hey and wrk load through nginx, longer than the CI
tests, and a table of requests, failures, convergence and reloads.

hey's failures are the ones that count (it retries an idempotent request on a kept-alive
connection that a reloading nginx closed, as browsers do); wrk's are shown beside them. Each
scenario ends by checking that config and DNS hold exactly the live backends. Loopback only,
every load bounded in time. The dockerd restart runs on a private engine that the bench
starts and removes (tests/support/engine.py; needs root), never the machine's. Run:

    .venv/bin/python bench/chaos.py [--cycles 20] [--rounds 10] [--storm 50] [--events 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_line, table
from images.build import ensure_images
from tests.support import chaos
from tests.support.chaos import Rig, ScenarioResult
from tests.support.engine import PrivateEngine
from tests.support.lab import Lab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="scale 1<->5 cycles")
    parser.add_argument("--rounds", type=int, default=10, help="rolling replacements")
    parser.add_argument("--kills", type=int, default=10, help="backends killed with SIGKILL")
    parser.add_argument("--storm", type=int, default=50, help="containers in the storm")
    parser.add_argument("--events", type=int, default=1000, help="events for the leak check")
    args = parser.parse_args()

    client = docker.from_env(version="auto")
    lab = Lab(client, ensure_images(client, progress=lambda line: print(line, file=sys.stderr)))
    engine = PrivateEngine()  # at the start: a machine that can't run one fails at once

    def machine_rig() -> AbstractContextManager[Rig]:
        return contextlib.closing(Rig(lab))

    def private_rig() -> AbstractContextManager[Rig]:
        return chaos.private_rig(engine)

    Make = Callable[[Rig], Callable[[ScenarioResult], None]]
    scenarios: list[tuple[str, Callable[[], AbstractContextManager[Rig]], Make]] = [
        (f"1. scale 1<->5 x{args.cycles}", machine_rig, lambda r: chaos.scale(r, args.cycles)),
        ("2. stop/start/restart/pause/disconnect", machine_rig, chaos.lifecycle),
        (
            f"2. docker kill (SIGKILL) x{args.kills}",
            machine_rig,
            lambda r: chaos.kill(r, args.kills),
        ),
        (
            f"3. rolling replacement x{args.rounds}",
            machine_rig,
            lambda r: chaos.rolling(r, args.rounds),
        ),
        ("4. nginx restart + a second nginx", machine_rig, chaos.nginx_restart_and_second),
        ("5. controller SIGKILL during churn", machine_rig, chaos.controller_kill),
        (
            "6. dockerd restart (live-restore)",
            private_rig,
            lambda r: chaos.dockerd_restart(r, engine),
        ),
        (
            f"7. storm of {args.storm} start+stop",
            machine_rig,
            lambda r: chaos.storm(r, args.storm),
        ),
        (
            "7. the same, backends draining 1 s",
            machine_rig,
            lambda r: chaos.storm(r, args.storm, drain=True),
        ),
        (
            "7. the same, listening 1 s after start",
            machine_rig,
            lambda r: chaos.storm(r, args.storm, drain=True, listen_ms=1000),
        ),
        ("8. change nginx rejects, then a good one", machine_rig, chaos.rejected),
    ]
    rows = []
    leak = None
    try:
        for name, place, make in scenarios:
            print(f"running: {name}", file=sys.stderr, flush=True)
            with place() as rig:
                result = chaos.run(rig, name, make(rig), seconds=300, with_wrk=True)
            hey, wrk = result.hey, result.wrk
            assert hey is not None and wrk is not None
            rows.append(
                [
                    name,
                    str(hey.requests),
                    str(hey.failed),
                    f"{wrk.requests} / {wrk.failed}",
                    f"{result.max_converge * 1000:.0f}",
                    str(result.reloads),
                ]
            )
            for detail in (f"hey {hey.detail}", f"wrk {wrk.detail}", *result.notes):
                print(f"  {detail}", file=sys.stderr)
        with machine_rig() as rig:
            leak = chaos.leak(rig, args.events)
    finally:
        lab.cleanup()
        engine.close()

    print(machine_line())
    print("each scenario under hey (4 workers x 50 req/s, keep-alive) and wrk (1 thread, 2")
    print("connections, unthrottled) through one managed nginx; converge = from an action to")
    print("config deployed and DNS answering exactly the live backends (worst of the scenario)\n")
    header = ("scenario", "hey requests", "hey failed", "wrk requests / errors", "converge max ms",
              "reloads")  # fmt: skip
    print(table(rows, header))
    if leak is not None:
        (rss1, fds1), (rss2, fds2) = leak
        print(
            f"\ncontroller after {args.events // 10} events: RSS {rss1 / 1024:.1f} MiB, "
            f"{fds1} fds; after {args.events}: RSS {rss2 / 1024:.1f} MiB, {fds2} fds"
        )


if __name__ == "__main__":
    main()
