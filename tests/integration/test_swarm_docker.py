"""A Swarm service served end to end on a single-node swarm of the test's own
(tests/support/swarm.py): nginx and DNS answer with its tasks' overlay addresses, and a scale
up and down under traffic fails no request.

The controller runs in this process, in the network namespace of a container attached to the
overlay network: where a controller deployed on the swarm sits, and the only place its
readiness probes reach the tasks (the engine's own namespace has no route into the overlay).
The requests and DNS queries are made from there too, to nginx's overlay address.
"""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest
from dnslib import QTYPE, DNSRecord
from docker.models.containers import Container
from docker.types import ServiceMode

from controlplane.core import labels as L
from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import Http, wait_until
from tests.support.load import Load
from tests.support.ports import free_port
from tests.support.swarm import PrivateSwarm

DRAINING = ["STOP_DELAY=3", "DRAIN_STATUS=200"]
"""Like a real app, a task keeps answering for a while after SIGTERM."""


def _running_tasks(swarm: PrivateSwarm, service: str) -> dict[str, str]:
    """Task name -> overlay address of the tasks that run and are meant to."""
    found = {}
    for task in swarm.client.api.tasks(filters={"service": service}):
        if task["Status"]["State"] == "running" and task["DesiredState"] == "running":
            address = task["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
            found[f"{service}.{task['Slot']}.{task['ID']}"] = address
    return found


def _states(swarm: PrivateSwarm, service: str) -> dict[str, str]:
    """Task name -> state, of every task Docker still lists."""
    return {
        f"{service}.{t['Slot']}.{t['ID']}": str(t["Status"]["State"])
        for t in swarm.client.api.tasks(filters={"service": service})
    }


def _live(controller: RunningController) -> set[str]:
    """The addresses the controller's current snapshot serves."""
    snapshot = controller.controller.reconciler.snapshot
    if snapshot is None:
        return set()
    return {b.ip for s in snapshot.topology.services for b in s.live_backends}


def _scale(swarm: PrivateSwarm, service: str, replicas: int) -> None:
    """As an operator does: the CLI's scale changes the replica count only (docker-py's
    update sends the whole spec back, which Docker takes as an update of every task)."""
    environment = {**os.environ, "DOCKER_HOST": swarm.engine.url}
    subprocess.run(
        ["docker", "service", "scale", "--detach", f"{service}={replicas}"],
        check=True,
        capture_output=True,
        env=environment,
    )


def _dns(port: int, name: str) -> set[str]:
    query = DNSRecord.question(name, "A")
    try:
        reply = DNSRecord.parse(query.send("127.0.0.1", port, timeout=2))
    except OSError:
        return set()
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}


@pytest.mark.parametrize("dataplane", ["reload", "dynamic"])
def test_a_swarm_service_is_served_by_task_address_and_scales_without_a_failed_request(
    private_swarm: PrivateSwarm, start_controller: ControllerFactory, dataplane: str
) -> None:
    swarm = private_swarm
    client = swarm.client
    run = secrets.token_hex(4)
    network = client.networks.create(f"cpt-{run}-ov", driver="overlay", attachable=True)
    lb: Container = client.containers.run(
        swarm.images.nginx if dataplane == "reload" else swarm.images.nginx_lua,
        name=f"cpt-{run}-lb",
        network=str(network.name),
        labels={L.ROLE: "nginx", L.DATAPLANE: dataplane},
        detach=True,
    )
    seat: Container = client.containers.run(
        swarm.images.backend,
        name=f"cpt-{run}-controller",
        network=str(network.name),
        entrypoint=["sleep", "3600"],
        detach=True,
    )
    client.services.create(
        swarm.images.backend,
        name="web",
        networks=[str(network.id)],
        mode=ServiceMode("replicated", 3),
        env=DRAINING,
        labels={L.ALGORITHM: "least_conn"},
        container_labels={L.PORT: "80"},
    )
    tasks = wait_until(
        lambda: len(_running_tasks(swarm, "web")) == 3 and _running_tasks(swarm, "web"),
        timeout=60,
        what="3 running tasks",
    )
    lb.reload()
    lb_address = lb.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]

    with swarm.entered(seat.id):
        dns_port = free_port()
        controller: RunningController = start_controller(
            networks=None,  # the default: the overlay network the managed nginx is on
            docker_url=swarm.engine.url,
            dns_binds=(f"127.0.0.1:{dns_port}",),
            stats=False,
        )
        http = Http(80, lb_address)
        try:
            wait_until(lambda: http.settled("web", tasks), timeout=30, what="the 3 tasks served")
            assert _dns(dns_port, "web.internal") == set(tasks.values())
            snapshot = controller.controller.reconciler.snapshot
            assert snapshot is not None
            [service] = snapshot.topology.services
            assert service.algorithm.method.value == "least_conn"
            assert _live(controller) == set(tasks.values())

            reloads = controller.reloads()
            with Load(80, "web", max_seconds=120, address=lb_address) as load:
                for replicas in (5, 2):
                    before = _running_tasks(swarm, "web")
                    _scale(swarm, "web", replicas)
                    now = wait_until(
                        lambda n=replicas: (
                            len(_running_tasks(swarm, "web")) == n and _running_tasks(swarm, "web")
                        ),
                        timeout=60,
                        what=f"{replicas} running tasks",
                    )
                    wait_until(
                        lambda now=now: _live(controller) == set(now.values()),
                        timeout=30,
                        what=f"the controller serving the {replicas} tasks",
                    )
                    if replicas < len(before):
                        # drained on its desired state: out before Docker stopped it
                        leaving = set(before) - set(now)
                        states = _states(swarm, "web")
                        assert "running" in {states[name] for name in leaving}, states
                    wait_until(
                        lambda now=now: http.settled("web", now),
                        timeout=30,
                        what=f"the {replicas} tasks served",
                    )
                    wait_until(
                        lambda now=now: _dns(dns_port, "web.internal") == set(now.values()),
                        what=f"DNS answering the {replicas} tasks",
                    )
            assert load.failures == []
            assert len(load.by_backend()) >= 5  # every task that ran got requests
            # the dynamic data plane takes the scales without a reload; plain nginx reloads
            assert (controller.reloads() > reloads) is (dataplane == "reload")
        finally:
            http.close()
