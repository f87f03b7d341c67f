"""Small builders for the core's input, Traefik-style: a container with this name, on this
network, with these labels. Plain functions, so parametrize tables can call them at import time.

Containers look like real Docker ones: a 64-hex ID derived from the name, and on every network
the short-ID alias (first 12 hex digits) that dockerd adds, so tests prove it is ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from controlplane.core import labels as L
from controlplane.core.model import (
    ContainerFacts,
    DockerState,
    Endpoint,
    NetworkFacts,
    SwarmServiceFacts,
    TaskAddress,
    TaskFacts,
)

CREATED = "2024-05-01T10:00:00.000000001Z"


def container_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def container(
    name: str,
    *,
    aliases: Iterable[str] = ("web",),
    network: str = "app",
    ip: str = "172.20.0.2",
    ipv6: str = "",
    more_networks: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    status: str = "running",
    health: str | None = None,
    created: str = CREATED,
    exposed: Iterable[int] = (),
    stop_signal: str | None = None,
    id: str | None = None,
) -> ContainerFacts:
    """`more_networks` maps further network names to this container's IP on them."""
    cid = id or container_id(name)
    short_id_alias = cid[:12]
    attachments = {network: ip, **(more_networks or {})}
    return ContainerFacts(
        id=cid,
        name=name,
        created=created,
        status=status,
        health=health,
        started_at=created,
        labels=dict(labels or {}),
        exposed_tcp_ports=tuple(exposed),
        endpoints=tuple(
            Endpoint(
                network=net,
                ip=addr,
                ipv6=ipv6,
                aliases=(*aliases, short_id_alias),
            )
            for net, addr in sorted(attachments.items())
        ),
        stop_signal=stop_signal,
    )


def nginx(
    name: str = "proxy",
    *,
    network: str = "app",
    ip: str = "172.20.0.100",
    more_networks: Mapping[str, str] | None = None,
    config_path: str | None = None,
    status: str = "running",
) -> ContainerFacts:
    """A managed nginx container (`controlplane.role=nginx`)."""
    labels = {L.ROLE: "nginx"}
    if config_path is not None:
        labels[L.CONFIG_PATH] = config_path
    return container(
        name,
        aliases=(),
        network=network,
        ip=ip,
        more_networks=more_networks,
        labels=labels,
        status=status,
    )


def network(name: str, driver: str = "bridge") -> NetworkFacts:
    scope = "swarm" if driver == "overlay" else "local"
    return NetworkFacts(id=container_id("network:" + name), name=name, driver=driver, scope=scope)


def state(
    *containers: ContainerFacts,
    networks: Iterable[str | NetworkFacts] = ("bridge", "app"),
) -> DockerState:
    """Networks given by name are bridges; "bridge" is then Docker's default network."""
    return DockerState(
        containers=tuple(containers),
        networks=tuple(n if isinstance(n, NetworkFacts) else network(n) for n in networks),
    )


def task(
    service: str,
    slot: int,
    ip: str,
    *,
    network: str = "ov",
    state: str = "running",
    desired: str = "running",
    created: str = CREATED,
    node: str = "node1",
    container: str = "",
) -> TaskFacts:
    """A Swarm task of `service` in `slot`, with its address on one overlay network;
    `container`: its container's ID."""
    task_id = container_id(f"task:{service}.{slot}.{ip}")[:25]
    return TaskFacts(
        id=task_id,
        name=f"{service}.{slot}.{task_id}",
        node=node,
        state=state,
        desired_state=desired,
        created=created,
        addresses=(TaskAddress(container_id("network:" + network), network, ip),),
        container_id=container,
    )


def swarm_service(
    name: str,
    *tasks: TaskFacts,
    labels: Mapping[str, str] | None = None,
    networks: Iterable[str] = ("ov",),
    endpoint_mode: str = "vip",
    vip: str = "10.0.1.2",
    created: str = CREATED,
) -> SwarmServiceFacts:
    """A replicated Swarm service with these tasks, and a VIP on each of its networks."""
    ids = tuple(container_id("network:" + n) for n in networks)
    return SwarmServiceFacts(
        id=container_id(f"service:{name}")[:25],
        name=name,
        created=created,
        labels=dict(labels or {}),
        networks=ids,
        endpoint_mode=endpoint_mode,
        virtual_ips=tuple(TaskAddress(i, "", vip) for i in ids) if endpoint_mode == "vip" else (),
        replicas=len(tasks),
        updating=False,
        tasks=tasks,
    )
