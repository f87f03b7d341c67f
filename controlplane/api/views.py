"""What the API answers with: each reply as a pydantic model (the OpenAPI document is made from
them), and how each is made from the core's model; no Flask, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from controlplane.api.bodies import Algorithm, HealthCheck
from controlplane.core import health as H
from controlplane.core import model as core
from controlplane.core.dns_records import Record, Soa, Srv, Zone
from controlplane.core.overrides import HealthSpec
from controlplane.core.render import address
from controlplane.core.served import Failure as CoreFailure
from controlplane.core.served import NginxState, Serves
from controlplane.core.traffic import Key, Summary


class Reply(BaseModel):
    """Every field is always there (null when not known), so the schema requires them all."""

    model_config = ConfigDict(frozen=True, json_schema_serialization_defaults_required=True)


class ErrorBody(Reply):
    code: str = Field(description="what went wrong, for programs: e.g. invalid_value")
    message: str = Field(description="what went wrong and what to do, for people")
    details: dict[str, Any] = Field(description="e.g. the field or parameter that was wrong")


class Error(Reply):
    """Every error the API gives, whatever the status."""

    error: ErrorBody


class BackendHealth(Reply):
    """What the controller's checks say of one backend (core.health)."""

    state: Literal["starting", "up", "down", "gave up", "unchecked"] = Field(
        description="starting: waiting for its first passing check; up: passing; down: failed "
        "`fails` checks in a row; gave up: never passed within the start period; unchecked: "
        "the controller cannot reach its network"
    )
    checked: bool = Field(description="the check is active: it goes on while the backend runs")
    since: str = Field(description="when this state began")
    last: str | None = Field(description="the last probe's result, e.g. status 200, refused")
    last_latency_ms: float | None
    last_at: str | None
    fails: int = Field(description="failed probes in a row")
    passes: int = Field(description="passing probes in a row")


class Requests(Reply):
    """Requests by the status class of the upstream's reply."""

    model_config = ConfigDict(
        frozen=True, json_schema_serialization_defaults_required=True, serialize_by_alias=True
    )
    c1xx: int = Field(alias="1xx")
    c2xx: int = Field(alias="2xx")
    c3xx: int = Field(alias="3xx")
    c4xx: int = Field(alias="4xx")
    c5xx: int = Field(alias="5xx")


class Traffic(Reply):
    """What the managed nginx reported over the last minute (--stats). At a backend, each
    try counts (a request retried elsewhere counts at each backend it tried); at a service,
    each request counts once."""

    rps_10s: float = Field(description="requests per second over the last 10 s")
    rps_1m: float = Field(description="requests per second over the last 60 s")
    requests: Requests = Field(description="over the last 60 s, by the upstream's status class")
    connect_errors: int = Field(
        description="over the last 60 s: tries whose connect failed (refused, timed out, "
        "unreachable); they are in no status class"
    )
    p50_ms: float | None = Field(
        description="the upstream's response time over the last 60 s, median, within 19% "
        "(null: no reply timed)"
    )
    p95_ms: float | None
    p99_ms: float | None
    bytes_sent: int = Field(description="to clients, over the last 60 s")
    bytes_received: int = Field(description="from clients, over the last 60 s")
    per_second: list[int] = Field(
        description="requests in each of the last 60 seconds, oldest first"
    )


class Backend(Reply):
    container: str = Field(description="container ID")
    name: str = Field(description="container name")
    network: str
    ip: str
    port: int
    weight: int
    backup: bool
    state: core.BackendState
    reason: str | None = Field(
        description="why it is not up, when the controller knows more than its state: e.g. "
        "waiting for its port to accept a connection (the readiness gate)"
    )
    since: str | None = Field(description="when that began (null: no reason given)")
    health: BackendHealth | None = Field(
        description="the controller's checks (null: not checked: health none, or not running)"
    )
    in_nginx: bool | None = Field(
        description="every managed nginx runs a config that sends it requests (null: not "
        "known yet, or no managed nginx)"
    )
    served_by: list[str] = Field(description="the nginx whose running config does")
    traffic: Traffic | None = Field(
        description="its tries over the last minute, by its address (null: none reported, "
        "traffic figures are off, or in GET /api/v1/services, which leaves them out)"
    )


class Failure(Reply):
    """The last config an nginx did not take; it keeps the one it had."""

    version: int = Field(description="of the config that did not take")
    error: str
    refused: bool = Field(description="nginx -t said no (else the way in failed)")
    attempts: int


class ServiceNginx(Reply):
    name: str
    container: str
    version: int | None = Field(description="of the config it runs (null: not deployed to yet)")
    in_sync: bool | None = Field(
        description="it sends this service's requests where the controller wants"
    )
    serving: int | None = Field(description="how many of this service's backends it sends to")
    failure: Failure | None
    dataplane: Literal["dynamic", "reload"] | None = Field(
        description="how it gets backends: pushed to its Lua balancer, or by a reload "
        "(null: not known yet)"
    )
    stats_sample: int | None = Field(
        default=None,
        description="as in /api/v1/nginx: this nginx reports one in this many of its "
        "ordinary answers, so the service's counts of them are estimates (1: every request; "
        "null: it counts every request itself (dynamic), or traffic figures are off)",
    )


class Excluded(Reply):
    container: str
    reason: str


class Exclusion(Excluded):
    service: str | None


class BackendOverride(Reply):
    weight: int | None
    drain: bool


class Overrides(Reply):
    algorithm: Algorithm | None
    backends: dict[str, BackendOverride] = Field(description="by container name")
    health: HealthCheck | None = Field(
        description="the check set through the API, as PUT .../health takes it"
    )


class ServiceHealth(Reply):
    """A service's check, its fields as PUT .../health takes them; null where it does not use
    one (path, host and status are http's; interval, fails and passes an active check's; none
    uses nothing)."""

    mode: core.HealthMode
    active: bool = Field(
        description="every backend is checked every `interval` for as long as it runs, out "
        "after `fails` failures in a row and back after `passes` passes; false: only until its "
        "first pass (the readiness gate), so interval, fails and passes do not apply"
    )
    path: str | None
    port: int | None = Field(description="null: the backend's own")
    host: str | None = Field(description="the Host header; null: the backend's address")
    status: str | None = Field(description="the statuses that pass, e.g. 200-399")
    interval: str | None
    timeout: str | None
    fails: int | None
    passes: int | None
    start_period: str | None = Field(description="how long a new backend has to pass")
    source: Literal["default", "label", "api"] = Field(
        description="api: an override (PUT .../health), label: the service's "
        "controlplane.health labels, default: no label (the readiness gate alone)"
    )


class Service(Reply):
    name: str
    exists: bool = Field(description="false: only overrides (?create=true) so far")
    networks: list[str]
    algorithm: Algorithm
    algorithm_source: Literal["override", "label", "default"]
    hosts: list[str]
    health: ServiceHealth
    backends: list[Backend]
    nginx: list[ServiceNginx]
    excluded: list[Excluded]
    warnings: list[str]
    overrides: Overrides
    traffic: Traffic | None = Field(
        description="its requests over the last minute (null: none reported, or traffic "
        "figures are off)"
    )


class Applied(Reply):
    version: int
    done: bool = Field(description="the pass finished its deploys")
    reloaded: list[str] = Field(
        description="nginx containers that run this version's config, whichever pass loaded "
        "it (one that started just after the change was saved may have taken it first; a "
        "change that leaves the config as it was lists every nginx already running it)"
    )
    errors: list[str]


class ServiceChange(Service):
    """The service as the pass that applies the change sees it."""

    applied: Applied


class ServiceList(Reply):
    services: list[Service]


class ServiceWarning(Reply):
    service: str | None
    warning: str


class NginxFailure(Reply):
    name: str
    container: str
    failure: Failure | None


class Problems(Reply):
    version: int
    excluded: list[Exclusion]
    warnings: list[ServiceWarning]
    nginx: list[NginxFailure]


class Nginx(Reply):
    container: str
    name: str
    config_path: str
    networks: list[str]
    started_at: str
    checksum: str | None
    current: bool
    last_attempt: str | None
    last_result: Literal["ok", "failed"] | None
    last_reload: str | None
    last_error: str | None
    reloads: int
    failures: int
    pushes: int = Field(description="times the backends went to its Lua balancer (no reload)")
    last_push: str | None
    version: int | None
    failure: Failure | None
    dataplane: Literal["dynamic", "reload"] | None = Field(
        description="how it gets backends: pushed to its Lua balancer (no reload), or "
        "rendered into its config (a reload each change); null: not known yet"
    )
    dataplane_reason: str | None = Field(description="why it runs that data plane")
    stats_sample: int | None = Field(
        default=None,
        description="a reload nginx reports one in this many of its ordinary answers, each "
        "counting for that many, so its counts of them are estimates (1: every request); "
        "null: it counts every request itself (dynamic), or traffic figures are off",
    )


class RemoteNginx(Reply):
    task: str = Field(description="the Swarm task's ID")
    name: str
    node: str = Field(description="the Swarm node it runs on")
    reason: str = Field(description="why this controller does not manage it")


class NginxList(Reply):
    checksum: str
    nginx: list[Nginx]
    excluded: list[Excluded]
    remote: list[RemoteNginx] = Field(
        description="tasks of an nginx Swarm service on other nodes: their engine is not "
        "this controller's"
    )


class Event(Reply):
    time: str
    kind: Literal["reconcile", "held", "refused", "failure", "override", "health"] = Field(
        description="health: a backend's health state changed (details: from, to, reason)"
    )
    summary: str
    details: dict[str, Any]


class Events(Reply):
    events: list[Event]


class DnsRecord(Reply):
    name: str
    type: str
    ttl: int
    value: str


class DnsRecords(Reply):
    domain: str
    version: int
    ttl: int
    records: list[DnsRecord]


class DnsZone(Reply):
    """What `controlplane dns --controller` answers from."""

    version: int
    issued: float = Field(description="when this reply was made, Unix time (a replay is old)")
    zone: dict[str, Any] = Field(description="the zone as data (core.dns_records.zone_data)")
    allowed: list[str] = Field(description="CIDRs that may use the forwarder by default")


class Resync(Applied):
    changed: bool


class Health(Reply):
    status: Literal["ok"]


class Ready(Reply):
    ready: bool
    reasons: list[str]


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


def traffic_keys(service: core.Service) -> list[Key]:
    """The keys of a service's figures: the whole service, then each backend by its address
    as nginx names it (one per network it is on)."""
    return [Key(service.name, ""), *(Key(service.name, address(b)) for b in service.backends)]


def traffic_view(summary: Summary | None) -> Traffic | None:
    if summary is None:
        return None
    return Traffic(
        rps_10s=round(summary.rps_10s, 3),
        rps_1m=round(summary.rps_1m, 3),
        requests=Requests.model_validate(summary.requests),
        connect_errors=summary.connect_errors,
        p50_ms=_ms(summary.p50_ms),
        p95_ms=_ms(summary.p95_ms),
        p99_ms=_ms(summary.p99_ms),
        bytes_sent=summary.bytes_sent,
        bytes_received=summary.bytes_received,
        per_second=list(summary.per_second),
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def backend_view(
    backend: core.Backend,
    service: str,
    nginx: Sequence[NginxState],
    health: Mapping[tuple[str, str], H.Health],
    traffic: Mapping[Key, Summary],
) -> Backend:
    """`health`: the checks', by (container id, network); `traffic`: figures by key (a
    backend's absent: null)."""
    checked = health.get((backend.container_id, backend.network))
    hold = None
    if backend.state in (core.BackendState.STARTING, core.BackendState.UNHEALTHY):
        hold = checked if checked is not None and checked.reason is not None else None
    return Backend(
        container=backend.container_id,
        name=backend.container,
        network=backend.network,
        ip=backend.ip or backend.ipv6,
        port=backend.port,
        weight=backend.weight,
        backup=backend.backup,
        state=backend.state,
        reason=hold.reason if hold else None,
        since=_iso(hold.since) if hold else None,
        health=None if checked is None else health_view(checked),
        in_nginx=in_nginx(service, backend.container_id, nginx),
        served_by=[
            n.container
            for n in nginx
            if n.serves is not None and backend.container_id in n.serves.get(service, ())
        ],
        traffic=traffic_view(traffic.get(Key(service, address(backend)))),
    )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def health_view(health: H.Health) -> BackendHealth:
    return BackendHealth(
        state=health.state,  # type: ignore[arg-type]
        checked=health.checked,
        since=_iso(health.since),
        last=health.last,
        last_latency_ms=None
        if health.last_latency is None
        else round(health.last_latency * 1000, 3),
        last_at=None if health.last_at is None else _iso(health.last_at),
        fails=health.fails,
        passes=health.passes,
    )


def failure_view(failure: CoreFailure | None) -> Failure | None:
    if failure is None:
        return None
    return Failure(
        version=failure.version,
        error=failure.error,
        refused=failure.refused,
        attempts=failure.attempts,
    )


def dataplane(state: NginxState | None) -> Literal["dynamic", "reload"] | None:
    if state is None or state.mode is None:
        return None
    return "dynamic" if state.mode.mode is core.DataPlane.DYNAMIC else "reload"


def service_nginx_views(
    service: str, wanted: Serves, nginx: Sequence[NginxState], stats_sample: int | None
) -> list[ServiceNginx]:
    """Per managed nginx: does the config it runs send this service's requests where the
    controller wants them, and if not, what stopped the newer one. `stats_sample`: the
    controller's, which only a reload nginx applies."""
    return [
        ServiceNginx(
            name=n.container,
            container=n.container_id,
            version=n.version,
            in_sync=n.in_sync(service, wanted),
            serving=None if n.serves is None else len(n.serves.get(service, ())),
            failure=failure_view(n.failure),
            dataplane=dataplane(n),
            stats_sample=stats_sample if dataplane(n) == "reload" else None,
        )
        for n in nginx
    ]


def exclusion_view(exclusion: core.Exclusion) -> Exclusion:
    return Exclusion(
        container=exclusion.container, service=exclusion.service, reason=exclusion.reason
    )


def overrides_view(overrides: core.Overrides, service: str) -> Overrides:
    algorithm = overrides.algorithms.get(service)
    health = overrides.health.get(service)
    return Overrides(
        algorithm=Algorithm.of(algorithm) if algorithm else None,
        backends={
            container: BackendOverride(weight=o.weight, drain=o.drain)
            for container, o in sorted(overrides.backends.get(service, {}).items())
        },
        health=HealthCheck.of(health) if health else None,
    )


def check_view(check: core.HealthCheck, source: str) -> ServiceHealth:
    """Interval, fails and passes are null for the readiness gate alone (not active)."""
    spec = HealthSpec.of(check)
    active = check.active
    return ServiceHealth(
        mode=check.mode,
        active=active,
        path=spec.path,
        port=spec.port,
        host=spec.host,
        status=spec.status,
        interval=spec.interval if active else None,
        timeout=spec.timeout,
        fails=spec.fails if active else None,
        passes=spec.passes if active else None,
        start_period=spec.start_period,
        source=source,  # type: ignore[arg-type]
    )


def service_view(
    service: core.Service,
    topology: core.Topology,
    overrides: core.Overrides,
    wanted: Serves,
    nginx: Sequence[NginxState],
    health: Mapping[tuple[str, str], H.Health],
    traffic: Mapping[Key, Summary],
    stats_sample: int | None,
) -> Service:
    """`wanted`: what the current config sends traffic to; `nginx`: what each nginx runs;
    `health`: what the checks say of each backend; `traffic`: figures by key (traffic_keys),
    null where absent; `stats_sample`: see service_nginx_views."""
    return Service(
        name=service.name,
        exists=True,
        networks=list(service.networks),
        algorithm=Algorithm.of(service.algorithm),
        algorithm_source=service.algorithm_source,  # type: ignore[arg-type]
        hosts=list(service.names),
        health=check_view(service.health, service.health_source),
        backends=[backend_view(b, service.name, nginx, health, traffic) for b in service.backends],
        nginx=service_nginx_views(service.name, wanted, nginx, stats_sample),
        excluded=[
            Excluded(container=e.container, reason=e.reason)
            for e in topology.excluded
            if e.service == service.name
        ],
        warnings=list(service.warnings),
        overrides=overrides_view(overrides, service.name),
        traffic=traffic_view(traffic.get(Key(service.name, ""))),
    )


def absent_service_view(
    name: str, overrides: core.Overrides, traffic: Summary | None = None
) -> Service:
    """A service with overrides but no backend yet (created with ?create=true), or none
    left (`traffic`: what its last minute still holds)."""
    algorithm = overrides.algorithms.get(name)
    check = overrides.health.get(name)
    return Service(
        name=name,
        exists=False,
        networks=[],
        algorithm=Algorithm.of(algorithm or core.Algorithm()),
        algorithm_source="override" if algorithm else "default",
        hosts=[],
        health=check_view(check or core.HealthCheck(), "api" if check else "default"),
        backends=[],
        nginx=[],
        excluded=[],
        warnings=[],
        overrides=overrides_view(overrides, name),
        traffic=traffic_view(traffic),
    )


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


def zone_view(zone: Zone) -> DnsRecords:
    return DnsRecords(
        domain=zone.domain,
        version=zone.version,
        ttl=zone.ttl,
        records=[
            DnsRecord(name=name, type=rtype, ttl=r.ttl, value=record_value(r))
            for name in sorted(zone.records)
            for rtype, records in sorted(zone.records[name].items())
            for r in records
        ],
    )
