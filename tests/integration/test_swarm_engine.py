"""The swarm tests' engine (tests/support/swarm.py): a single-node swarm runs the offline
images as service tasks, and the machine's engine stays as it was: not in a swarm, and
without any of the swarm's networks or containers."""

from __future__ import annotations

import secrets

import docker
from docker.types import ServiceMode

from tests.support.lab import wait_until
from tests.support.swarm import PrivateSwarm
from tests.support.witness import MachineEngineWitness


def _running_tasks(client: docker.DockerClient, service: str) -> list[dict[str, object]]:
    tasks = client.api.tasks(filters={"service": service, "desired-state": "running"})
    return [t for t in tasks if t["Status"]["State"] == "running"]


def test_a_private_swarm_runs_services_and_leaves_the_machines_engine_alone(
    private_swarm: PrivateSwarm,
    machine_witness: MachineEngineWitness,
    docker_client: docker.DockerClient,
) -> None:
    swarm = private_swarm
    client = swarm.client
    assert docker_client.info()["Swarm"]["LocalNodeState"] == "inactive"
    info = client.info()["Swarm"]
    assert (info["LocalNodeState"], info["ControlAvailable"]) == ("active", True)

    name = f"cpt-{secrets.token_hex(4)}"
    network = client.networks.create(f"{name}-ov", driver="overlay", attachable=True)
    client.services.create(
        swarm.images.backend, name=name, networks=[network.id], mode=ServiceMode("replicated", 2)
    )
    tasks = wait_until(
        lambda: len(_running_tasks(client, name)) == 2 and _running_tasks(client, name),
        timeout=60,
        what="2 running tasks",
    )
    containers = {t["Status"]["ContainerStatus"]["ContainerID"] for t in tasks}
    networks = {n.id for n in client.networks.list()}

    assert docker_client.info()["Swarm"]["LocalNodeState"] == "inactive"
    assert not containers & {c.id for c in docker_client.containers.list(all=True)}
    assert not networks & {n.id for n in docker_client.networks.list()}
    assert not [n for n in docker_client.networks.list() if n.name == network.name]
    swarm.close()
    assert swarm.engine.leftovers() == []
    assert docker_client.info()["Swarm"]["LocalNodeState"] == "inactive"
    assert machine_witness.changes() == []
