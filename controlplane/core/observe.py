"""Turns Docker's inspect JSON into owned facts, in one place.

Docker fills fields with null, omits them, or changes them between API versions; this module
absorbs that so the rest of the code reads plain typed values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from controlplane.core.model import ContainerFacts, Endpoint, NetworkFacts


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
