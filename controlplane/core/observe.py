"""Turns Docker's inspect JSON into owned facts, in one place.

Docker fills fields with null, omits them, or changes them between API versions; this module
absorbs that so the rest of the code reads plain typed values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from controlplane.core.model import (
    ContainerFacts,
    Endpoint,
    NetworkFacts,
    SwarmServiceFacts,
    TaskAddress,
    TaskFacts,
)


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


TIMESTAMP_RE = re.compile(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def canonical_time(value: Any) -> str:
    """RFC 3339 with all nine fraction digits: Docker trims trailing zeros, which would make
    `...:00.1Z` sort after `...:00.12Z` as text."""
    text = _str(value)
    match = TIMESTAMP_RE.fullmatch(text)
    if not match:
        return text
    return f"{match.group(1)}.{(match.group(2) or '').ljust(9, '0')}{match.group(3)}"


def container_facts(inspect: Mapping[str, Any]) -> ContainerFacts:
    """Facts from `GET /containers/{id}/json`."""
    config = _dict(inspect.get("Config"))
    state = _dict(inspect.get("State"))
    health = _dict(state.get("Health")).get("Status")
    labels = {str(k): str(v) for k, v in _dict(config.get("Labels")).items()}
    exposed = sorted(
        int(spec.split("/")[0])
        for spec in _dict(config.get("ExposedPorts"))
        if spec.endswith("/tcp") and spec.split("/")[0].isdigit()
    )
    networks = _dict(_dict(inspect.get("NetworkSettings")).get("Networks"))
    endpoints = tuple(
        Endpoint(
            network=str(name),
            ip=_str(_dict(ep).get("IPAddress")),
            ipv6=_str(_dict(ep).get("GlobalIPv6Address")),
            aliases=tuple(str(a) for a in (_dict(ep).get("Aliases") or ())),
        )
        for name, ep in sorted(networks.items())
    )
    status = _str(state.get("Status"))
    if state.get("Paused") is True:
        status = "paused"
    return ContainerFacts(
        id=_str(inspect.get("Id")),
        name=_str(inspect.get("Name")).lstrip("/"),
        created=canonical_time(inspect.get("Created")),
        status=status,
        health=health if isinstance(health, str) and health != "none" else None,
        started_at=canonical_time(state.get("StartedAt")),
        labels=labels,
        exposed_tcp_ports=tuple(dict.fromkeys(exposed)),
        endpoints=endpoints,
        stop_signal=config.get("StopSignal") if isinstance(config.get("StopSignal"), str) else None,
    )


def network_facts(inspect: Mapping[str, Any]) -> NetworkFacts:
    """Facts from `GET /networks` entries."""
    return NetworkFacts(
        id=_str(inspect.get("Id")),
        name=_str(inspect.get("Name")),
        driver=_str(inspect.get("Driver")),
        scope=_str(inspect.get("Scope")),
        subnets=tuple(
            _str(_dict(c).get("Subnet"))
            for c in (_dict(inspect.get("IPAM")).get("Config") or ())
            if _str(_dict(c).get("Subnet"))
        ),
    )


def is_swarm_manager(info: Mapping[str, Any]) -> bool:
    """From `GET /info`: only a manager can list services and the tasks of every node."""
    swarm = _dict(info.get("Swarm"))
    return swarm.get("LocalNodeState") == "active" and swarm.get("ControlAvailable") is True


def swarm_node_id(info: Mapping[str, Any]) -> str:
    """From `GET /info`: the node this engine is, empty outside a swarm."""
    return _str(_dict(info.get("Swarm")).get("NodeID"))


def _address(network_id: str, network: str, cidr: Any) -> TaskAddress | None:
    """From `10.0.1.3/24` (or an IPv6 one); None for a value that is not an address."""
    ip = _str(cidr).split("/", 1)[0]
    if not ip:
        return None
    if ":" in ip:
        return TaskAddress(network_id, network, "", ip)
    return TaskAddress(network_id, network, ip)


def task_facts(task: Mapping[str, Any], service_name: str) -> TaskFacts:
    """Facts from one entry of `GET /tasks`."""
    status = _dict(task.get("Status"))
    task_id = _str(task.get("ID"))
    slot = task.get("Slot")
    node = _str(task.get("NodeID"))
    addresses = []
    for attachment in task.get("NetworksAttachments") or ():
        network = _dict(_dict(attachment).get("Network"))
        name = _str(_dict(network.get("Spec")).get("Name"))
        for cidr in _dict(attachment).get("Addresses") or ():
            found = _address(_str(network.get("ID")), name, cidr)
            if found is not None:
                addresses.append(found)
    return TaskFacts(
        id=task_id,
        name=f"{service_name}.{slot if isinstance(slot, int) and slot > 0 else node}.{task_id}",
        node=node,
        state=_str(status.get("State")),
        desired_state=_str(task.get("DesiredState")),
        created=canonical_time(task.get("CreatedAt")),
        addresses=tuple(addresses),
        container_id=_str(_dict(status.get("ContainerStatus")).get("ContainerID")),
    )


def swarm_service_facts(
    inspect: Mapping[str, Any], tasks: Iterable[Mapping[str, Any]]
) -> SwarmServiceFacts:
    """Facts from `GET /services/{id}` and that service's entries of `GET /tasks`. A task
    that is not meant to run and is not on its way anywhere is history (Docker keeps a few
    per slot): left out."""
    spec = _dict(inspect.get("Spec"))
    template = _dict(spec.get("TaskTemplate"))
    labels = {
        str(k): str(v)
        for source in (spec.get("Labels"), _dict(template.get("ContainerSpec")).get("Labels"))
        for k, v in _dict(source).items()
    }
    endpoint = _dict(inspect.get("Endpoint"))
    mode = _str(_dict(endpoint.get("Spec")).get("Mode")) or _str(
        _dict(spec.get("EndpointSpec")).get("Mode")
    )
    replicas = _dict(_dict(spec.get("Mode")).get("Replicated")).get("Replicas")
    name = _str(spec.get("Name"))
    vips = (
        _address(_str(_dict(vip).get("NetworkID")), "", _dict(vip).get("Addr"))
        for vip in endpoint.get("VirtualIPs") or ()
    )
    live = (task_facts(t, name) for t in tasks)
    return SwarmServiceFacts(
        id=_str(inspect.get("ID")),
        name=name,
        created=canonical_time(inspect.get("CreatedAt")),
        labels=labels,
        networks=tuple(
            _str(_dict(n).get("Target"))
            for n in template.get("Networks") or spec.get("Networks") or ()
            if _str(_dict(n).get("Target"))
        ),
        endpoint_mode=mode or "vip",
        virtual_ips=tuple(v for v in vips if v is not None),
        replicas=replicas if isinstance(replicas, int) else None,
        updating=_str(_dict(inspect.get("UpdateStatus")).get("State"))
        in ("updating", "rollback_started"),
        tasks=tuple(
            sorted(
                (t for t in live if t.desired_state == "running" or t.moving),
                key=lambda t: (t.created, t.id),
            )
        ),
    )
