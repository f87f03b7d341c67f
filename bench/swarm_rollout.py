"""Swarm under hey: a rolling update of 5 replicas (`docker service update --force`,
parallelism 1) and a scale 3 -> 10 -> 1, through each data plane and a peer in one run
(issue 18's figures): failed requests, and reloads counted from nginx's own log.

Everything runs on a private single-node swarm (tests/support/swarm.py): an overlay network,
a "seat" container in whose namespace this process's controller and hey run (where a
controller deployed on the swarm sits), and for each plane in turn a service `web` of the
offline busybox backend (5 replicas; each task answers for a second after SIGTERM, as an app
finishing its work does) and its proxy: nginx (reload: plain; dynamic: with Lua) with a
controller of its own, or HAProxy asking Docker's embedded DNS for `tasks.web` every 10 ms
(server-template, the image of bench/dataplane.py). hey sends a bounded rate for a bounded
time to the proxy's overlay address only. The swarm and its engine are removed at the end.
Run:

    .venv/bin/python bench/swarm_rollout.py [--rate 50] [--workers 4]   # ~4 min
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import ServiceMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Running, machine_line, table
from bench.swarm_converge import docker
from controlplane.core import labels as L
from controlplane.settings import Settings
from images.build import ensure_haproxy_image
from tests.support.lab import wait_until
from tests.support.swarm import PrivateSwarm, start_swarm
from tests.support.traffic import LoadResult, parse_hey

SERVICE = "web"
PLANES = ("dynamic", "reload", "haproxy")
DRAINING = ["STOP_DELAY=1", "DRAIN_STATUS=200"]
TIMEOUT = 120.0
"""Seconds any one wait may take (a task to run, a proxy to serve it)."""


def running(swarm: PrivateSwarm) -> set[str]:
    """Container names of the tasks that run and are meant to."""
    return {
        f"{SERVICE}.{t['Slot']}.{t['ID']}"
        for t in swarm.client.api.tasks(filters={"service": SERVICE})
        if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
    }


def serves(address: str, names: set[str]) -> bool:
    """Fresh connections reach these tasks, every one of them, and no other."""
    seen = set()
    with httpx.Client(headers={"Host": SERVICE, "Connection": "close"}, timeout=2) as client:
        for _ in range(4 * len(names)):
            try:
                reply = client.get(f"http://{address}/")
            except httpx.HTTPError:
                return False
            seen.add(reply.text.strip() if reply.status_code == 200 else "")
    return seen == names


def settle(
    swarm: PrivateSwarm, address: str, count: int, old: frozenset[str] = frozenset()
) -> None:
    """Waits until `count` tasks run, none of `old`, and the proxy serves exactly them."""

    def tasks() -> set[str] | None:
        now = running(swarm)
        return now if len(now) == count and not now & old else None

    found = wait_until(tasks, timeout=TIMEOUT, what=f"{count} running tasks")
    assert found is not None
    wait_until(lambda: serves(address, found), timeout=TIMEOUT, what=f"{count} tasks served")


@contextmanager
def hey(address: str, args: argparse.Namespace) -> Iterator[list[LoadResult]]:
    """hey against the proxy for the block (bounded by TIMEOUT x 4 however long it runs)."""
    command = ["hey", "-z", f"{int(TIMEOUT * 4)}s", "-c", str(args.workers), "-q",
               str(args.rate), "-host", SERVICE, f"http://{address}/"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result: list[LoadResult] = []
    try:
        time.sleep(1)
        yield result
        time.sleep(1)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
        result.append(parse_hey(output))


def reloads(proxy: Container) -> int:
    lines = proxy.logs(stdout=True, stderr=True).decode("utf-8", "replace").splitlines()
    return sum(1 for line in lines if line.endswith(": reconfiguring"))


@contextmanager
def proxied(
    swarm: PrivateSwarm, network: Network, plane: str, haproxy: str
) -> Iterator[tuple[Container, str]]:
    """The plane's proxy on the overlay network (with a controller of its own for nginx),
    and its address there."""
    name = f"{network.name}-{plane}"
    if plane == "haproxy":
        environment = {"SERVICE": f"tasks.{SERVICE}", "SLOTS": "64", "RESOLVE": "10ms"}
        proxy = swarm.client.containers.run(
            haproxy, name=name, network=str(network.name), environment=environment, detach=True
        )
    else:
        image = swarm.images.nginx if plane == "reload" else swarm.images.nginx_lua
        labels = {L.ROLE: "nginx", L.DATAPLANE: plane}
        proxy = swarm.client.containers.run(
            image, name=name, network=str(network.name), labels=labels, detach=True
        )
    controller = None
    try:
        proxy.reload()
        address = proxy.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        if plane != "haproxy":
            settings = Settings(networks=None, docker_url=swarm.engine.url, stats=False)
            controller = Running(settings)
        yield proxy, address
    finally:
        if controller is not None:
            controller.close()
        proxy.remove(force=True)


def measure(
    swarm: PrivateSwarm,
    network: Network,
    seat: Container,
    plane: str,
    haproxy: str,
    args: argparse.Namespace,
) -> list[list[str]]:
    swarm.client.services.create(
        swarm.images.backend,
        name=SERVICE,
        networks=[str(network.id)],
        mode=ServiceMode("replicated", 5),
        env=DRAINING,
        container_labels={L.PORT: "80"},
    )
    rows = []
    try:
        with swarm.entered(str(seat.id)), proxied(swarm, network, plane, haproxy) as proxy:
            lb, address = proxy
            settle(swarm, address, 5)
            before = reloads(lb)
            old = frozenset(running(swarm))
            with hey(address, args) as rolled:
                docker(swarm, "service", "update", "--detach", "--force",
                       "--update-parallelism", "1", SERVICE)  # fmt: skip
                settle(swarm, address, 5, old)
            middle = reloads(lb)
            with hey(address, args) as scaled:
                for count in (3, 10, 1):
                    docker(swarm, "service", "scale", "--detach", f"{SERVICE}={count}")
                    settle(swarm, address, count)
            after = reloads(lb)
        for what, (result,), count in (
            ("rolling update --force of 5, parallelism 1", rolled, middle - before),
            ("scale 3 -> 10 -> 1", scaled, after - middle),
        ):
            shown = "-" if plane == "haproxy" else str(count)
            rows.append([plane, what, str(result.requests), str(result.failed), shown,
                         result.detail])  # fmt: skip
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    finally:
        swarm.client.api.remove_service(SERVICE)  # type: ignore[no-untyped-call]
        tasks = {"label": f"com.docker.swarm.service.name={SERVICE}"}
        wait_until(
            lambda: not swarm.client.containers.list(all=True, filters=tasks, ignore_removed=True),
            timeout=TIMEOUT,
            what="the service's task containers gone",
        )
    return rows


def run(args: argparse.Namespace) -> str:
    swarm = start_swarm()
    try:
        network = swarm.client.networks.create(
            f"cpb-{secrets.token_hex(3)}-ov", driver="overlay", attachable=True
        )
        seat = swarm.seat(str(network.name), f"{network.name}-seat")
        haproxy = ensure_haproxy_image(swarm.client) if "haproxy" in args.planes else ""
        rows = []
        for plane in args.planes:
            rows += measure(swarm, network, seat, plane, haproxy, args)
    finally:
        swarm.close()
    header = ("plane", "scenario", "requests", "failed", "reloads (nginx's log)", "hey says")
    return "\n".join(
        [
            f"swarm under hey (-c {args.workers} -q {args.rate}: {args.workers * args.rate} "
            f"req/s at most, fresh connections): tasks answer 1 s after SIGTERM",
            table(rows, header),
            machine_line(),
        ]
    )


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=50, help="requests/s per hey worker")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--planes", type=lambda s: s.split(","), default=list(PLANES), help="comma-separated"
    )
    return parser.parse_args()


def main() -> None:
    print(run(options()))


if __name__ == "__main__":
    main()
