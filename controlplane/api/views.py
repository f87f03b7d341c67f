"""The JSON shapes the API answers with, made from the model; no Flask, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.core.dns_records import Record, Soa, Srv, Zone
from controlplane.core.model import Algorithm, Backend, Exclusion, Overrides, Service, Topology
from controlplane.core.served import Failure, NginxState, Serves

Json = dict[str, object]


def algorithm_json(algorithm: Algorithm) -> Json:
    return {
        "method": algorithm.method.value,
        "key": algorithm.key,
        "consistent": algorithm.consistent,
        "two": algorithm.two,
    }


def in_nginx(service: str, container_id: str, nginx: Sequence[NginxState]) -> bool | None:
    """True when every managed nginx runs a config that sends it requests, False when one
    does not, None when that is not known (no nginx, or none deployed to yet)."""
    known = [n for n in nginx if n.serves is not None]
    if not known:
        return None
    served = [container_id in (n.serves or {}).get(service, ()) for n in known]
    if not all(served):
        return False
    return True if len(known) == len(nginx) else None


def backend_json(backend: Backend, service: str, nginx: Sequence[NginxState]) -> Json:
    return {
        "container": backend.container_id,
        "name": backend.container,
        "network": backend.network,
        "ip": backend.ip or backend.ipv6,
        "port": backend.port,
        "weight": backend.weight,
        "backup": backend.backup,
        "state": backend.state.value,
        "in_nginx": in_nginx(service, backend.container_id, nginx),
        "served_by": [
            n.container
            for n in nginx
            if n.serves is not None and backend.container_id in n.serves.get(service, ())
        ],
    }


def failure_json(failure: Failure | None) -> Json | None:
    if failure is None:
        return None
    return {
        "version": failure.version,
        "error": failure.error,
        "refused": failure.refused,
        "attempts": failure.attempts,
    }


def service_nginx_json(service: str, wanted: Serves, nginx: Sequence[NginxState]) -> list[Json]:
    """Per managed nginx: does the config it runs send this service's requests where the
    controller wants them, and if not, what stopped the newer one."""
    return [
        {
            "name": n.container,
            "container": n.container_id,
            "version": n.version,
            "in_sync": n.in_sync(service, wanted),
            "serving": None if n.serves is None else len(n.serves.get(service, ())),
            "failure": failure_json(n.failure),
        }
        for n in nginx
    ]


def exclusion_json(exclusion: Exclusion) -> Json:
    return {
        "container": exclusion.container,
        "service": exclusion.service,
        "reason": exclusion.reason,
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


def service_json(
    service: Service,
    topology: Topology,
    overrides: Overrides,
    wanted: Serves,
    nginx: Sequence[NginxState],
) -> Json:
    """`wanted`: what the current config sends traffic to; `nginx`: what each nginx runs."""
    return {
        "name": service.name,
        "exists": True,
        "networks": list(service.networks),
        "algorithm": algorithm_json(service.algorithm),
        "algorithm_source": service.algorithm_source,
        "hosts": list(service.names),
        "backends": [backend_json(b, service.name, nginx) for b in service.backends],
        "nginx": service_nginx_json(service.name, wanted, nginx),
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
        "nginx": [],
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
