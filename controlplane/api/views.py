"""The JSON shapes the API answers with, made from the model; no Flask, no I/O."""

from __future__ import annotations

from controlplane.core.dns_records import Record, Soa, Srv, Zone
from controlplane.core.model import Algorithm, Backend, Overrides, Service, Topology

Json = dict[str, object]


def algorithm_json(algorithm: Algorithm) -> Json:
    return {
        "method": algorithm.method.value,
        "key": algorithm.key,
        "consistent": algorithm.consistent,
        "two": algorithm.two,
    }


def backend_json(backend: Backend) -> Json:
    return {
        "container": backend.container_id,
        "name": backend.container,
        "network": backend.network,
        "ip": backend.ip or backend.ipv6,
        "port": backend.port,
        "weight": backend.weight,
        "backup": backend.backup,
        "state": backend.state.value,
    }


def overrides_json(overrides: Overrides, service: str) -> Json:
    algorithm = overrides.algorithms.get(service)
    return {
        "algorithm": algorithm_json(algorithm) if algorithm else None,
        "backends": {
            container: {"weight": o.weight, "drain": o.drain}
            for container, o in sorted(overrides.backends.get(service, {}).items())
        },
    }


def service_json(service: Service, topology: Topology, overrides: Overrides) -> Json:
    return {
        "name": service.name,
        "exists": True,
        "networks": list(service.networks),
        "algorithm": algorithm_json(service.algorithm),
        "algorithm_source": service.algorithm_source,
        "hosts": list(service.names),
        "backends": [backend_json(b) for b in service.backends],
        "excluded": [
            {"container": e.container, "reason": e.reason}
            for e in topology.excluded
            if e.service == service.name
        ],
        "warnings": list(service.warnings),
        "overrides": overrides_json(overrides, service.name),
    }


def absent_service_json(name: str, overrides: Overrides) -> Json:
    """A service with overrides but no backend yet (created with ?create=true)."""
    algorithm = overrides.algorithms.get(name)
    return {
        "name": name,
        "exists": False,
        "networks": [],
        "algorithm": algorithm_json(algorithm or Algorithm()),
        "algorithm_source": "override" if algorithm else "default",
        "hosts": [],
        "backends": [],
        "excluded": [],
        "warnings": [],
        "overrides": overrides_json(overrides, name),
    }


def record_value(record: Record) -> str:
    """Zone-file presentation of the record's data."""
    value = record.value
    if isinstance(value, Srv):
        return f"{value.priority} {value.weight} {value.port} {value.target}."
    if isinstance(value, Soa):
        return (
            f"{value.mname}. {value.rname}. {value.serial} {value.refresh} {value.retry} "
            f"{value.expire} {value.minimum}"
        )
    if record.rtype in ("PTR", "NS"):
        return f"{value}."
    return value


def zone_json(zone: Zone) -> Json:
    return {
        "domain": zone.domain,
        "version": zone.version,
        "ttl": zone.ttl,
        "records": [
            {"name": name, "type": rtype, "ttl": r.ttl, "value": record_value(r)}
            for name in sorted(zone.records)
            for rtype, records in sorted(zone.records[name].items())
            for r in records
        ],
    }
