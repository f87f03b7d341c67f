"""Swarm services served end to end on a swarm of the test's own (tests/support/swarm.py):
nginx and DNS answer with their tasks' overlay addresses, and what an operator does to a
service (scale, rolling update, label change, removal) reaches them with no failed request; on
one node, and on two (a task on the worker killed, lost with its node, drained).

The controller runs in this process, in the network namespace of a container attached to the
overlay network: where a controller deployed on the swarm sits, and the only place its
readiness probes reach the tasks (the engine's own namespace has no route into the overlay).
The requests and DNS queries are made from there too, to nginx's overlay address.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import Healthcheck, ServiceMode

from controlplane.core import labels as L
from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import Http, wait_until
from tests.support.load import Load
from tests.support.ports import free_port
from tests.support.swarm import PrivateSwarm

DATAPLANES = pytest.mark.parametrize("dataplane", ["reload", "dynamic"])
DRAINING = ["STOP_DELAY=3", "DRAIN_STATUS=200"]
"""Like a real app, a task keeps answering for a while after SIGTERM."""


def _running_tasks(swarm: PrivateSwarm, service: str) -> dict[str, str]:
    """Task name -> overlay address of the tasks that run and are meant to."""
    found = {}
    for task in swarm.client.api.tasks(filters={"service": service}):
        if task["Status"]["State"] == "running" and task["DesiredState"] == "running":
            address = task["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
            found[_task_name(service, task)] = address
    return found


def _states(swarm: PrivateSwarm, service: str) -> dict[str, str]:
    """Task name -> state, of every task Docker still lists."""
    return {
        _task_name(service, t): str(t["Status"]["State"])
        for t in swarm.client.api.tasks(filters={"service": service})
    }


def _task_name(service: str, task: dict[str, Any]) -> str:
    """As Docker names its container: by slot, or by node for a global service's task."""
    return f"{service}.{task.get('Slot') or task['NodeID']}.{task['ID']}"


def _live(controller: RunningController, service: str | None = None) -> set[str]:
    """The addresses the controller's current snapshot serves (for `service`, or any)."""
    snapshot = controller.controller.reconciler.snapshot
    if snapshot is None:
        return set()
    return {
        b.ip
        for s in snapshot.topology.services
        if service in (None, s.name)
        for b in s.live_backends
    }


def _node_state(swarm: PrivateSwarm, node_id: str) -> str:
    return str(swarm.client.nodes.get(node_id).attrs["Status"]["State"])


def _load_covers(load: Load, until: float) -> None:
    """The load was still sending at `until` (it stops by itself at its bounds)."""
    wait_until(
        lambda: any(r.started >= until for r in list(load.responses)),
        timeout=10,
        what="the load still sending at the end of the step",
    )


def _docker(swarm: PrivateSwarm, *args: str) -> None:
    """As an operator does, with the CLI: `service scale` and `service update` change only
    what they name (docker-py's update sends the whole spec back, which Docker takes as an
    update of every task)."""
    environment = {**os.environ, "DOCKER_HOST": swarm.engine.url}
    subprocess.run(["docker", *args], check=True, capture_output=True, env=environment)


def _backends_of(controller: RunningController, service: str) -> set[str]:
    """The addresses of the service's backends in the controller's snapshot, in any state."""
    snapshot = controller.controller.reconciler.snapshot
    if snapshot is None:
        return set()
    return {b.ip for s in snapshot.topology.services if s.name == service for b in s.backends}


def _virtual_ip(swarm: PrivateSwarm, service: str, network: Network) -> str:
    (found,) = swarm.client.services.list(filters={"name": service})
    (vip,) = [
        v["Addr"].split("/")[0]
        for v in found.attrs["Endpoint"]["VirtualIPs"]
        if v["NetworkID"] == network.id
    ]
    return str(vip)


def _ask(port: int, name: str, rtype: str) -> DNSRecord | None:
    query = DNSRecord.question(name, rtype)
    try:
        return DNSRecord.parse(query.send("127.0.0.1", port, timeout=2))
    except OSError:
        return None


def _dns(port: int, name: str) -> set[str]:
    reply = _ask(port, name, "A")
    return set() if reply is None else {str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A}


@dataclass
class Stage:
    """An overlay network with a managed nginx on it, and a controller in the namespace of a
    container there (its DNS on a loopback port of that namespace)."""

    swarm: PrivateSwarm
    network: Network
    lb_address: str
    controller: RunningController
    dns_port: int
    http: Http

    def service(self, name: str, replicas: int, **labels: str) -> dict[str, str]:
        """Creates a draining service of `replicas` tasks (0: a global service, one task
        per node), labelled `labels` on its spec, and waits until they run: task name ->
        address."""
        self.swarm.client.services.create(
            self.swarm.images.backend,
            name=name,
            networks=[str(self.network.id)],
            mode=ServiceMode("replicated", replicas) if replicas else ServiceMode("global"),
            env=DRAINING,
            labels=labels,
            container_labels={L.PORT: "80"},
        )
        return self.running(name, replicas or len(self.swarm.client.nodes.list()))

    def running(self, name: str, replicas: int) -> dict[str, str]:
        return wait_until(
            lambda: (
                len(_running_tasks(self.swarm, name)) == replicas
                and _running_tasks(self.swarm, name)
            ),
            timeout=90,
            what=f"{replicas} running tasks of {name}",
        )

    def served(self, name: str, tasks: dict[str, str], timeout: float = 30) -> None:
        """The controller, nginx and DNS serve exactly these tasks."""
        addresses = set(tasks.values())
        wait_until(
            lambda: _live(self.controller, name) == addresses,
            timeout=timeout,
            what=f"the controller serving the {len(tasks)} tasks",
        )
        wait_until(
            lambda: self.http.settled(name, tasks), timeout=30, what=f"the {len(tasks)} served"
        )
        wait_until(
            lambda: _dns(self.dns_port, f"{name}.internal") == addresses,
            what=f"DNS answering the {len(tasks)} tasks",
        )

    def load(self, name: str) -> Load:
        return Load(80, name, max_seconds=150, address=self.lb_address)


@contextmanager
def staged(
    swarm: PrivateSwarm, start_controller: ControllerFactory, dataplane: str
) -> Iterator[Stage]:
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
    seat = swarm.seat(str(network.name), f"cpt-{run}-controller")
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
            yield Stage(swarm, network, lb_address, controller, dns_port, http)
        finally:
            http.close()


@DATAPLANES
def test_a_swarm_service_is_served_by_task_address_and_scales_without_a_failed_request(
    private_swarm: PrivateSwarm, start_controller: ControllerFactory, dataplane: str
) -> None:
    swarm = private_swarm
    with staged(swarm, start_controller, dataplane) as stage:
        tasks = stage.service("web", 3, **{L.ALGORITHM: "least_conn"})
        stage.served("web", tasks)
        snapshot = stage.controller.controller.reconciler.snapshot
        assert snapshot is not None
        [service] = snapshot.topology.services
        assert service.algorithm.method.value == "least_conn"

        reloads = stage.controller.reloads()
        with stage.load("web") as load:
            for replicas in (10, 1):
                before = _running_tasks(swarm, "web")
                _docker(swarm, "service", "scale", "--detach", f"web={replicas}")
                now = stage.running("web", replicas)
                wait_until(
                    lambda now=now: _live(stage.controller) == set(now.values()),
                    timeout=30,
                    what=f"the controller serving the {replicas} tasks",
                )
                if replicas < len(before):
                    # drained on its desired state: out before Docker stopped it
                    leaving = set(before) - set(now)
                    states = _states(swarm, "web")
                    assert "running" in {states[name] for name in leaving}, states
                stage.served("web", now)
        assert load.failures == []
        assert len(load.by_backend()) >= 10  # every task that ran got requests
        # the dynamic data plane takes the scales without a reload; plain nginx reloads
        assert (stage.controller.reloads() > reloads) is (dataplane == "reload")


@DATAPLANES
def test_rolling_updates_stop_first_start_first_and_global_fail_no_request(
    private_swarm: PrivateSwarm, start_controller: ControllerFactory, dataplane: str
) -> None:
    swarm = private_swarm
    with staged(swarm, start_controller, dataplane) as stage:
        # two replicas, one replaced at a time: the other serves meanwhile (each stop-first
        # replacement costs ~7 s of Swarm's own: its 2 s gossip delay, the task's drain)
        tasks = stage.service("web", 2)
        stage.served("web", tasks)
        with stage.load("web") as load:
            for order in ("stop-first", "start-first"):
                before = set(tasks)
                _docker(
                    swarm,
                    *("service", "update", "--detach", "--update-parallelism", "1"),
                    *("--update-order", order, "--env-add", f"ORDER={order}", "web"),
                )
                tasks = wait_until(
                    lambda before=before: (
                        not (before & set(_running_tasks(swarm, "web")))
                        and len(_running_tasks(swarm, "web")) == 2
                        and _running_tasks(swarm, "web")
                    ),
                    timeout=90,
                    what=f"2 new tasks after a {order} update",
                )
                stage.served("web", tasks)
        assert load.failures == [], load.failures[:5]
        assert set(tasks) <= set(load.by_backend())  # the last round's tasks took over

        # a global service: one task per node, replaced start-first
        edge = stage.service("edge", 0)
        stage.served("edge", edge)
        with stage.load("edge") as load:
            _docker(
                swarm,
                *("service", "update", "--detach", "--update-order", "start-first"),
                *("--env-add", "ORDER=new", "edge"),
            )
            edge = wait_until(
                lambda old=set(edge): (
                    not (old & set(_running_tasks(swarm, "edge")))
                    and len(_running_tasks(swarm, "edge")) == 1
                    and _running_tasks(swarm, "edge")
                ),
                timeout=90,
                what="the global service's new task",
            )
            stage.served("edge", edge)
        assert load.failures == [], load.failures[:5]
        assert set(edge) <= set(load.by_backend())


@DATAPLANES
def test_a_label_update_srv_answers_and_a_removed_service(
    private_swarm: PrivateSwarm, start_controller: ControllerFactory, dataplane: str
) -> None:
    swarm = private_swarm
    with staged(swarm, start_controller, dataplane) as stage:
        tasks = stage.service("web", 3)
        stage.served("web", tasks)

        reply = _ask(stage.dns_port, "_web._tcp.internal", "SRV")
        assert reply is not None
        srv = [r.rdata for r in reply.rr if r.rtype == QTYPE.SRV]
        assert {r.port for r in srv} == {80} and len(srv) == 3
        targets = {str(r.target).rstrip(".") for r in srv}
        assert set().union(*(_dns(stage.dns_port, t) for t in targets)) == set(tasks.values())

        # controlplane.endpoint=vip: one backend, the service's virtual IP, read from the real
        # engine's spec. Whether it carries traffic is the kernel's IPVS, which this machine's
        # kernel lacks (a VIP times out here even from a container on the network): so the
        # backend is checked, not requests through it.
        stage.service("api", 2, **{L.ENDPOINT: "vip"})
        vip = _virtual_ip(swarm, "api", stage.network)
        wait_until(
            lambda: _backends_of(stage.controller, "api") == {vip},
            timeout=30,
            what="api by its VIP",
        )
        _docker(swarm, "service", "scale", "--detach", "api=3")
        stage.running("api", 3)
        assert _backends_of(stage.controller, "api") == {vip}  # a scale is Swarm's business
        _docker(swarm, "service", "rm", "api")
        wait_until(lambda: not _backends_of(stage.controller, "api"), timeout=30, what="api gone")

        # a label on the service's spec changes no task: the new method reaches nginx alone
        _docker(
            swarm,
            "service",
            "update",
            "--detach",
            "--label-add",
            f"{L.ALGORITHM}=least_conn",
            "web",
        )
        wait_until(lambda: stage.controller.applied("least_conn;"), what="least_conn in nginx")
        assert _running_tasks(swarm, "web") == tasks

        with stage.load("web") as load:
            wait_until(
                lambda: any(r.status == 200 for r in load.responses),
                what="requests served before the service is removed",
            )
            _docker(swarm, "service", "rm", "web")
            wait_until(lambda: not _live(stage.controller), what="the service out of the snapshot")
            wait_until(lambda: stage.http.status("web") == 404, what="nginx refusing host web")
            reply = _ask(stage.dns_port, "web.internal", "A")
            assert reply is not None and reply.header.rcode == RCODE.NXDOMAIN
        # every request was answered by a task (which keeps answering while it stops) or,
        # once the service is gone, by nginx's 404: none went to a stopped task
        assert {r.status for r in load.responses} <= {200, 404}, load.failures[:5]


def test_a_task_with_a_healthcheck_is_served_once_docker_finds_it_healthy(
    private_swarm: PrivateSwarm, start_controller: ControllerFactory
) -> None:
    """Swarm keeps such a task `starting` until its HEALTHCHECK passes: `running` already
    means healthy. (Discovery alone: one data plane is enough.)"""
    swarm = private_swarm
    with staged(swarm, start_controller, "reload") as stage:
        swarm.client.services.create(
            swarm.images.backend,
            name="hc",
            networks=[str(stage.network.id)],
            container_labels={L.PORT: "80"},
            healthcheck=Healthcheck(  # failures in the start period don't count
                test=["CMD", "test", "-f", "/tmp/healthy"],
                interval=200_000_000,
                start_period=60_000_000_000,
            ),
        )
        [container_id] = wait_until(
            lambda: [
                t["Status"]["ContainerStatus"]["ContainerID"]
                for t in swarm.client.api.tasks(filters={"service": "hc"})
                if t["Status"]["State"] == "starting"
            ],
            timeout=60,
            what="the task starting, not yet healthy",
        )
        time.sleep(2)  # 8 listings of the converging service: none may serve it
        assert _states(swarm, "hc") == {n: "starting" for n in _states(swarm, "hc")}
        assert not _live(stage.controller) and stage.http.status("hc") == 404
        swarm.client.containers.get(container_id).exec_run(["touch", "/tmp/healthy"])
        stage.served("hc", stage.running("hc", 1))


@DATAPLANES
def test_an_nginx_swarm_service_is_managed_through_its_tasks_on_this_node(
    private_swarm: PrivateSwarm, start_controller: ControllerFactory, dataplane: str
) -> None:
    """`controlplane.role=nginx` on a service: each of its tasks here is a managed nginx."""
    swarm = private_swarm
    client = swarm.client
    run = secrets.token_hex(4)
    network = client.networks.create(f"cpt-{run}-ov", driver="overlay", attachable=True)
    seat = swarm.seat(str(network.name), f"cpt-{run}-controller")
    client.services.create(
        swarm.images.nginx if dataplane == "reload" else swarm.images.nginx_lua,
        name="edge",
        networks=[str(network.id)],
        mode=ServiceMode("replicated", 2),
        labels={L.ROLE: "nginx", L.DATAPLANE: dataplane},
    )
    client.services.create(
        swarm.images.backend,
        name="web",
        networks=[str(network.id)],
        mode=ServiceMode("replicated", 2),
        container_labels={L.PORT: "80"},
    )
    edges = wait_until(
        lambda: len(_running_tasks(swarm, "edge")) == 2 and _running_tasks(swarm, "edge"),
        timeout=90,
        what="2 running nginx tasks",
    )
    containers = {
        t["Status"]["ContainerStatus"]["ContainerID"]
        for t in client.api.tasks(filters={"service": "edge", "desired-state": "running"})
    }
    with swarm.entered(seat.id):
        controller: RunningController = start_controller(
            networks=None, docker_url=swarm.engine.url, stats=False
        )
        clients = [Http(80, address) for address in edges.values()]
        try:
            wait_until(lambda: _managed(controller) == containers, what="both nginx tasks managed")
            _serve_everywhere(clients, _running_tasks(swarm, "web"))
            reloads = controller.reloads()
            _docker(swarm, "service", "scale", "--detach", "web=3")
            tasks = wait_until(
                lambda: len(_running_tasks(swarm, "web")) == 3 and _running_tasks(swarm, "web"),
                timeout=90,
                what="3 running tasks",
            )
            _serve_everywhere(clients, tasks)
            snapshot = controller.controller.reconciler.snapshot
            assert snapshot is not None and snapshot.topology.remote_nginx == ()
            modes = {t.container_id: t.dataplane for t in snapshot.topology.nginx}
            assert {str(m) for m in modes.values()} == {dataplane}  # the service's label
            # the dynamic data plane took the scale without a reload
            assert (controller.reloads() > reloads) is (dataplane == "reload")
        finally:
            for http in clients:
                http.close()


def _managed(controller: RunningController) -> set[str]:
    """The container IDs of the nginx the controller has deployed to."""
    snapshot = controller.controller.reconciler.snapshot
    if snapshot is None:
        return set()
    done = {d.container_id for r in controller.reports for d in r.deployed if d.ok}
    return {t.container_id for t in snapshot.topology.nginx} & done


def _serve_everywhere(clients: list[Http], tasks: dict[str, str]) -> None:
    for http in clients:
        wait_until(
            lambda http=http: http.settled("web", tasks),
            timeout=30,
            what=f"nginx task {http.base} serving the {len(tasks)} tasks",
        )


def test_a_task_on_another_node_is_served_and_leaves_when_killed_lost_or_drained(
    two_node_swarm: PrivateSwarm, start_controller: ControllerFactory
) -> None:
    """Two nodes: the controller on the manager lists the worker's task through the manager's
    API (no event of the worker's engine reaches it), nginx on the manager reaches that task
    over the overlay; a task killed there goes out and its replacement comes in; the worker
    lost, its task goes out, and back, a new one comes in; the worker drained, its task goes
    out before it stops. Under load: no request sent after the loss fails, and none during
    the drain. On the dynamic data
    plane (the default) only: what a second node adds is the controller's listing and the
    overlay, which both planes share; every single-node test runs on both."""
    swarm = two_node_swarm
    assert swarm.worker is not None
    with staged(swarm, start_controller, "dynamic") as stage:
        edge = stage.service("edge", 0)  # global: one task per node
        assert {name.split(".")[1] for name in edge} == {swarm.node_id, swarm.worker_id}
        stage.served("edge", edge)

        (remote,) = [c for c in swarm.worker.client.containers.list() if c.name in edge]
        remote.kill()
        wait_until(
            lambda: (
                edge[str(remote.name)] not in _live(stage.controller, "edge")
                or bool(set(_running_tasks(swarm, "edge")) - set(edge))  # replaced already
            ),
            timeout=30,
            what="the task killed on the worker out",
        )
        edge = stage.running("edge", 2)
        stage.served("edge", edge)
        (on_manager,) = [name for name in edge if name.split(".")[1] == swarm.node_id]

        # the worker lost (its link cut): once the manager marks the node down (missed
        # heartbeats) the task's desired state is shutdown, and it leaves nginx and DNS;
        # requests sent meanwhile must be answered by the manager's (a connect to the lost
        # task times out and is tried again). One already in flight to the worker when the
        # link went waits for an answer that never comes, as with any machine lost mid-request.
        with stage.load("edge") as load:
            wait_until(lambda: set(edge) <= set(load.by_backend()), what="both tasks answering")
            cut = time.monotonic()
            swarm.set_link(up=False)
            stage.served("edge", {on_manager: edge[on_manager]}, timeout=60)
            assert _node_state(swarm, swarm.worker_id) == "down"
            _load_covers(load, time.monotonic())
        in_flight = [r for r in load.failures if r.started < cut]
        assert len(in_flight) <= load.workers, in_flight
        assert [r for r in load.failures if r.started >= cut] == [], load.failures[:5]

        # back: the worker rejoins and the global service starts a task there again
        swarm.set_link(up=True)
        edge = stage.running("edge", 2)
        stage.served("edge", edge)

        # drained: its task's desired state is shutdown, and it leaves nginx while it runs
        with stage.load("edge") as load:
            wait_until(lambda: set(edge) <= set(load.by_backend()), what="both tasks answering")
            _docker(swarm, "node", "update", "--availability", "drain", swarm.worker_id)
            left = stage.running("edge", 1)
            assert set(left) == {on_manager}
            wait_until(
                lambda: _live(stage.controller, "edge") == set(left.values()),
                timeout=30,
                what="the drained task out",
            )
            (leaving,) = set(edge) - set(left)
            assert _states(swarm, "edge").get(leaving) == "running"  # out before it stopped
            stage.served("edge", left)
            _load_covers(load, time.monotonic())
        assert load.failures == [], load.failures[:5]
