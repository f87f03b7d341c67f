"""Swarm: from `docker service scale` returning to the new task being served through nginx
(each data plane), with Docker's own DNS (`tasks.NAME`, asked from a container on the overlay
network) as the peer; and what listing and building a 100-task service costs a pass (issue
18's figures).

Everything runs on a private single-node swarm (tests/support/swarm.py) in its own network
namespace: an overlay network, a "seat" container whose namespace this process's controller,
pollers and DNS queries run in (where a controller deployed on the swarm sits), and a service
`web` of the offline busybox backend. For each data plane in turn, one managed nginx (plain
nginx: reload; nginx with Lua: dynamic) and a controller of its own: each round scales `web`
from 1 to 2 tasks and times, from the moment the CLI returns, when the manager lists the new
task `running`, when nginx first answers from it (and how long after running: the
controller's share), and when `tasks.web` on Docker's embedded DNS (127.0.0.11 in the seat's
namespace) lists its address; then scales back to 1, waits until nginx answers from that task
only, and waits out the scale-out batching's quiet time so the next round is a lone scale.
Pollers are bounded (--timeout per round) and send only to the bench's own containers and to
Docker's DNS in the seat's namespace. Then `web` is scaled to --tasks (100) and the
controller's Docker edge (DockerSource.snapshot: containers, services, tasks) and
build_topology (with the reconciler's memo, and fresh) are timed over --passes passes. The
swarm and its engine are removed at the end. Run:

    .venv/bin/python bench/swarm_converge.py [--rounds 20] [--tasks 100] [--passes 30]  # ~5 min
    .venv/bin/python bench/swarm_converge.py --rounds 2 --tasks 10 --passes 3   # smoke
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
from dnslib import QTYPE, DNSRecord
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import ServiceMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Running, machine_line, row, table
from controlplane.core import labels as L
from controlplane.core.batching import BatchPolicy
from controlplane.core.build import BuildMemo, BuildOptions, build_topology
from controlplane.docker_source import DockerSource, connect
from controlplane.settings import Settings
from tests.support.lab import wait_until
from tests.support.swarm import PrivateSwarm, start_swarm

SERVICE = "web"
DOCKER_DNS = "127.0.0.11"
"""Docker's embedded DNS, in every container's namespace on a user-defined network."""
POLL = 0.005
"""Seconds between two polls of one poller."""
RUNNING = "task listed running"
DNS = f"in Docker DNS tasks.{SERVICE}"


def docker(swarm: PrivateSwarm, *args: str) -> None:
    environment = {**os.environ, "DOCKER_HOST": swarm.engine.url}
    subprocess.run(["docker", *args], check=True, capture_output=True, env=environment)


def running_tasks(swarm: PrivateSwarm) -> dict[str, str]:
    """Task container name -> overlay address, of the tasks that run and are meant to."""
    found = {}
    for task in swarm.client.api.tasks(filters={"service": SERVICE}):
        if task["Status"]["State"] == "running" and task["DesiredState"] == "running":
            address = task["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
            found[f"{SERVICE}.{task['Slot']}.{task['ID']}"] = address
    return found


def answer(client: httpx.Client, address: str) -> str:
    try:
        reply = client.get(f"http://{address}/", timeout=2.0)
    except httpx.HTTPError:
        return ""
    return reply.text.strip() if reply.status_code == 200 else ""


def docker_dns() -> set[str]:
    query = DNSRecord.question(f"tasks.{SERVICE}", "A")
    try:
        reply = DNSRecord.parse(query.send(DOCKER_DNS, 53, timeout=1))
    except OSError:
        return set()
    return {str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A}


def first_time(seen: Callable[[], bool], deadline: float) -> float | None:
    """time.monotonic() when `seen` first holds, None if it did not by `deadline`."""
    while time.monotonic() < deadline:
        if seen():
            return time.monotonic()
        time.sleep(POLL)
    return None


def new_task(swarm: PrivateSwarm, old: set[str]) -> Callable[[], bool]:
    return lambda: bool(set(running_tasks(swarm)) - old)


def new_in_dns(old: set[str]) -> Callable[[], bool]:
    return lambda: bool(docker_dns() - old)


def nginx_poller(address: str, old: set[str], deadline: float) -> Callable[[], float | None]:
    def poll() -> float | None:
        with httpx.Client(headers={"Host": SERVICE, "Connection": "close"}) as client:
            return first_time(lambda: answer(client, address) not in old | {""}, deadline)

    return poll


def converge_rounds(
    swarm: PrivateSwarm, mode: str, address: str, rounds: int, timeout: float
) -> dict[str, list[float]]:
    """Per measure, the ms from `docker service scale` returning, one per round. Rounds are
    spaced by the scale-out batching's quiet time (core.batching), so each is a lone scale
    (a reload nginx holds a newcomer that comes sooner after the last one, by design)."""
    served = f"served by nginx ({mode})"
    share = f"  of which after running ({mode})"
    measured: dict[str, list[float]] = {RUNNING: [], served: [], share: [], DNS: []}
    for _ in range(rounds):
        before = running_tasks(swarm)
        old_names, old_ips = set(before), set(before.values())
        docker(swarm, "service", "scale", "--detach", f"{SERVICE}=2")
        returned = time.monotonic()
        deadline = returned + timeout
        pollers: dict[str, Callable[[], float | None]] = {
            RUNNING: partial(first_time, new_task(swarm, old_names), deadline),
            served: nginx_poller(address, old_names, deadline),
            DNS: partial(first_time, new_in_dns(old_ips), deadline),
        }
        with ThreadPoolExecutor(len(pollers)) as pool:
            futures = {name: pool.submit(poll) for name, poll in pollers.items()}
            seen = {name: future.result() for name, future in futures.items()}
        for name, at in seen.items():
            if at is not None:
                measured[name].append((at - returned) * 1000)
        running, routed = seen[RUNNING], seen[served]
        if running is not None and routed is not None:
            measured[share].append((routed - running) * 1000)
        docker(swarm, "service", "scale", "--detach", f"{SERVICE}=1")
        one = wait_until(
            lambda: len(running_tasks(swarm)) == 1 and running_tasks(swarm),
            timeout=timeout,
            what="1 running task",
        )
        serves_only(address, one, timeout)
        time.sleep(BatchPolicy().quiet)
    return measured


def serves_only(address: str, tasks: Collection[str], timeout: float) -> None:
    with httpx.Client(headers={"Host": SERVICE, "Connection": "close"}) as client:
        wait_until(
            lambda: all(answer(client, address) in tasks for _ in range(10)),
            timeout=timeout,
            what=f"nginx {address} serving {len(tasks)} task(s) only",
        )


def pass_cost(swarm: PrivateSwarm, network: str, tasks: int, passes: int) -> list[list[str]]:
    """DockerSource.snapshot and build_topology with a service of `tasks` running tasks on
    `network` (named, as --network does: no nginx is left to choose it)."""
    options = BuildOptions(networks=frozenset({network}))
    docker(swarm, "service", "scale", "--detach", f"{SERVICE}={tasks}")
    wait_until(lambda: len(running_tasks(swarm)) == tasks, timeout=30 + 2 * tasks, what="all tasks")
    source = DockerSource(connect(swarm.engine.url))
    state = source.snapshot()  # inspects every container once, as a first pass does
    memo = BuildMemo()
    listing, built, fresh = [], [], []
    for _ in range(passes):
        started = time.perf_counter()
        state = source.snapshot()
        listing.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        topology = build_topology(state, options, memo=memo)
        built.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        build_topology(state, options)
        fresh.append((time.perf_counter() - started) * 1000)
    [web] = [s for s in topology.services if s.name == SERVICE]
    live = len(web.live_backends)
    assert live == tasks, f"{live} live backends, not {tasks}"
    return [
        row(f"listing: containers, services, tasks ({tasks} tasks)", listing),
        row(f"build_topology with the memo ({tasks} tasks)", built),
        row(f"build_topology fresh ({tasks} tasks)", fresh),
    ]


def phase(
    swarm: PrivateSwarm, network: Network, seat: Container, mode: str, args: argparse.Namespace
) -> dict[str, list[float]]:
    """One managed nginx of this data plane and a controller of its own, then the rounds."""
    image = swarm.images.nginx if mode == "reload" else swarm.images.nginx_lua
    lb: Container = swarm.client.containers.run(
        image,
        name=f"{network.name}-lb-{mode}",
        network=str(network.name),
        labels={L.ROLE: "nginx", L.DATAPLANE: mode},
        detach=True,
    )
    try:
        lb.reload()
        address = lb.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        with swarm.entered(seat.id):
            controller = Running(
                Settings(networks=None, docker_url=swarm.engine.url, stats=False, dns_binds=())
            )
            try:
                serves_only(address, running_tasks(swarm), 60)
                time.sleep(BatchPolicy().quiet)
                return converge_rounds(swarm, mode, address, args.rounds, args.timeout)
            finally:
                controller.close()
    finally:
        lb.remove(force=True)


def run(args: argparse.Namespace) -> str:
    swarm = start_swarm()
    try:
        client = swarm.client
        network = client.networks.create(
            f"cpb-{secrets.token_hex(3)}-ov", driver="overlay", attachable=True
        )
        seat = swarm.seat(str(network.name), f"{network.name}-seat")
        client.services.create(
            swarm.images.backend,
            name=SERVICE,
            networks=[str(network.id)],
            mode=ServiceMode("replicated", 1),
            container_labels={L.PORT: "80"},
        )
        wait_until(lambda: len(running_tasks(swarm)) == 1, timeout=60, what="the first task")
        measured: dict[str, list[float]] = {}
        for mode in ("reload", "dynamic"):
            for name, values in phase(swarm, network, seat, mode, args).items():
                measured.setdefault(name, []).extend(values)
        rounds = {name: args.rounds * (1 if "(" in name else 2) for name in measured}
        missed = {name: rounds[name] - len(values) for name, values in measured.items()}
        rows = [row(name, values) for name, values in measured.items()]
        rows += pass_cost(swarm, str(network.name), args.tasks, args.passes)
    finally:
        swarm.close()
    lines = [
        f"swarm convergence: {args.rounds} rounds per data plane of `docker service scale "
        f"{SERVICE}=2` (from 1), ms from the command returning; then the cost of a pass",
        table(rows),
        f"rounds without the measure by the --timeout ({args.timeout:g} s): {missed}",
        machine_line(),
    ]
    return "\n".join(lines)


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds, per round")
    return parser.parse_args()


def main() -> None:
    print(run(options()))


if __name__ == "__main__":
    main()
