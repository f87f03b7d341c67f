"""Every route of the API. A change is persisted first, then applied by a pass of the loop,
so a reply never claims a change that a restart would lose."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane.api import bodies
from controlplane.api import views as V
from controlplane.api.http import body, context, query, reply
from controlplane.api.openapi import document, operation
from controlplane.core import labels as L
from controlplane.core.dns_records import (
    ZONE_SIGNATURE,
    forwarding_networks,
    zone_data,
    zone_signature,
)
from controlplane.core.model import Backend, BackendOverride, Method, Service
from controlplane.core.overrides import HealthSpec, describe_health, parse_container_name
from controlplane.core.served import NginxState
from controlplane.core.traffic import Key
from controlplane.errors import ApiError, InvalidValue
from controlplane.snapshot import PassTicket, Snapshot

routes = Blueprint("api", __name__)
PREFIX = "/api/v1"
OPENAPI = "controlplane.openapi"
"""Where the app keeps its document, as served."""
MIN_ID_PREFIX = 4


def _snapshot() -> Snapshot:
    snapshot = context().snapshot()
    if snapshot is None:
        raise ApiError(
            503,
            "not_ready",
            "the controller has not finished its first sync with Docker yet; retry shortly "
            "(GET /readyz says why)",
        )
    return snapshot


def _service_name(name: str) -> str:
    """Case-insensitive like DNS, but no stray whitespace: a path names one service."""
    try:
        if name != name.strip():
            raise InvalidValue(f"service {L.show(name)} has spaces or control characters")
        return L.parse_name(name, "service")
    except InvalidValue as error:
        raise ApiError(404, "unknown_service", str(error)) from None


def _find(snapshot: Snapshot, name: str) -> Service | None:
    return next((s for s in snapshot.topology.services if s.name == name), None)


def _require(snapshot: Snapshot, name: str) -> Service:
    service = _find(snapshot, name)
    if service is None:
        known = [s.name for s in snapshot.topology.services]
        raise ApiError(
            404,
            "unknown_service",
            f"no service {name}: no running container has it as a network alias or "
            f"controlplane.service label (to keep a change for when the service appears, add "
            "?create=true to the request, or --create to the CLI command)",
            {"services": known[:100]},
        )
    return service


def _view(name: str, snapshot: Snapshot) -> V.Service:
    """The service with its figures and each backend's, read at once."""
    overrides = context().store.current
    service = _find(snapshot, name)
    if service is None:
        whole = Key(name, "")
        return V.absent_service_view(name, overrides, context().traffic([whole]).get(whole))
    return V.service_view(
        service,
        snapshot.topology,
        overrides,
        snapshot.serves,
        _nginx_states(snapshot),
        context().health(),
        context().traffic(V.traffic_keys(service)),
        context().stats_sample,
    )


def _nginx_states(snapshot: Snapshot) -> list[NginxState]:
    """Each nginx the snapshot manages, as far as this controller knows what it runs."""
    states = context().nginx()
    return [
        states.get(t.container_id) or NginxState(t.container, t.container_id)
        for t in snapshot.topology.nginx
    ]


@dataclass(frozen=True)
class _Waiting:
    """The query of a change, read before anything is saved: a bad value changes nothing."""

    wait: bool
    timeout: float
    create: bool


def _waiting(model: type[bodies.WaitQuery] = bodies.WaitQuery) -> _Waiting:
    read = query(model)
    timeout = context().wait_timeout if read.timeout is None else read.timeout
    return _Waiting(read.wait, timeout, isinstance(read, bodies.ChangeQuery) and read.create)


def _apply(name: str, summary: str, waiting: _Waiting) -> Response:
    """Run a pass for the change and answer with the service as that pass sees it; with
    ?wait=true, only once every managed nginx has reloaded or failed (or the timeout)."""
    api = context()
    wait, timeout = waiting.wait, waiting.timeout
    api.activity.record("override", f"service {name}: {summary}", service=name)
    ticket = api.request_pass(f"api: {name} {summary}", False)
    (ticket.done if wait else ticket.planned).wait(timeout)
    snapshot = ticket.snapshot or _snapshot()
    applied = _applied(ticket, snapshot, wait, timeout)
    return reply(V.ServiceChange(**dict(_view(name, snapshot)), applied=applied))


def _applied(ticket: PassTicket, snapshot: Snapshot, wait: bool, timeout: float) -> V.Applied:
    errors = [ticket.error] if ticket.error else []
    report = ticket.report
    if report is not None:
        errors.extend(f"{d.container}: {d.error}" for d in report.deployed if not d.ok)
    elif ticket.snapshot is None:
        errors.append(
            f"the pass that applies the change had not started after {timeout:g} s (another "
            "was running); the change is saved and will apply, and this reply shows the "
            "service as it was before"
        )
    elif wait and not ticket.done.is_set():
        errors.append(
            f"nginx had not reloaded after {timeout:g} s; the change is saved and will apply "
            "(GET /api/v1/nginx shows each nginx)"
        )
    return V.Applied(
        version=snapshot.version,
        done=ticket.done.is_set() and ticket.error is None,
        reloaded=list(report.current) if report else [],
        errors=errors,
    )


@routes.get(f"{PREFIX}/services")
@operation("every service", V.ServiceList, errors=(503,))
def list_services() -> Response:
    snapshot = _snapshot()
    overrides = context().store.current
    nginx = _nginx_states(snapshot)
    health = context().health()
    services = snapshot.topology.services
    # each service's figures, read at once; its backends' are left out, which keeps a list of
    # thousands cheap to poll (GET .../services/{name} has them)
    traffic = context().traffic([Key(s.name, "") for s in services])
    return reply(
        V.ServiceList(
            services=[
                V.service_view(
                    s,
                    snapshot.topology,
                    overrides,
                    snapshot.serves,
                    nginx,
                    health,
                    traffic,
                    context().stats_sample,
                )
                for s in services
            ]
        )
    )


@routes.get(f"{PREFIX}/problems")
@operation("every exclusion, warning and nginx that refused", V.Problems, errors=(503,))
def get_problems() -> Response:
    """Every exclusion and warning in one place, and each nginx that did not take the
    current config: what an operator checks when something is missing."""
    snapshot = _snapshot()
    topology = snapshot.topology
    return reply(
        V.Problems(
            version=snapshot.version,
            excluded=[V.exclusion_view(e) for e in topology.excluded],
            warnings=[
                *(V.ServiceWarning(service=None, warning=w) for w in topology.warnings),
                *(
                    V.ServiceWarning(service=s.name, warning=w)
                    for s in topology.services
                    for w in s.warnings
                ),
            ],
            nginx=[
                V.NginxFailure(
                    name=n.container, container=n.container_id, failure=V.failure_view(n.failure)
                )
                for n in _nginx_states(snapshot)
                if n.failure is not None
            ],
        )
    )


@routes.get(f"{PREFIX}/services/<name>")
@operation("one service", V.Service, errors=(404, 503))
def get_service(name: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    kept = context().store.current
    if not any(service in k for k in (kept.algorithms, kept.backends, kept.health)):
        _require(snapshot, service)
    return reply(_view(service, snapshot))


CHANGED = "saved; the service as the pass that applies it sees it"


def _refuse_least_time(snapshot: Snapshot) -> None:
    """least_time exists only in the Lua balancer: a reload nginx would have to serve the
    service some other way, and the method is never changed behind the operator's back."""
    # one not probed yet gets the reload config meanwhile
    plain = [n for n in _nginx_states(snapshot) if V.dataplane(n) != "dynamic"]
    if plain:
        raise ApiError(
            422,
            "needs_dynamic_dataplane",
            f"least_time needs the dynamic data plane, and nginx {plain[0].container} runs the "
            f"reload one ({plain[0].mode.why if plain[0].mode else 'not probed yet'}): run nginx "
            "with lua-nginx-module (e.g. OpenResty), or choose another method",
            {"nginx": [n.container for n in plain]},
        )


@routes.put(f"{PREFIX}/services/<name>/algorithm")
@operation(
    "set the balancing method (persisted)",
    V.ServiceChange,
    body=bodies.Algorithm,
    query=bodies.ChangeQuery,
    errors=(404, 422, 503),
)
def put_algorithm(name: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    waiting = _waiting(bodies.ChangeQuery)
    algorithm = body(bodies.Algorithm).to_core()
    if not waiting.create:
        _require(snapshot, service)
    if algorithm.method is Method.LEAST_TIME:
        _refuse_least_time(snapshot)
    context().store.set_algorithm(service, algorithm)
    return _apply(service, f"algorithm set to {algorithm}", waiting)


@routes.delete(f"{PREFIX}/services/<name>/algorithm")
@operation("remove the method override", V.ServiceChange, query=bodies.WaitQuery, errors=(404, 503))
def delete_algorithm(name: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    waiting = _waiting()
    if service not in context().store.current.algorithms:
        _require(snapshot, service)
    context().store.clear_algorithm(service)
    return _apply(service, "algorithm override removed", waiting)


@routes.put(f"{PREFIX}/services/<name>/health")
@operation(
    "set the health check (persisted)",
    V.ServiceChange,
    body=bodies.HealthCheck,
    query=bodies.ChangeQuery,
    errors=(404, 503),
)
def put_health(name: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    waiting = _waiting(bodies.ChangeQuery)
    check = body(bodies.HealthCheck).to_core()
    if not waiting.create:
        _require(snapshot, service)
    context().store.set_health(service, check)
    summary = describe_health(HealthSpec.of(check), check.active)
    return _apply(service, f"health check set to {summary}", waiting)


@routes.delete(f"{PREFIX}/services/<name>/health")
@operation(
    "remove the health check override: the labels decide again",
    V.ServiceChange,
    query=bodies.WaitQuery,
    errors=(404, 503),
)
def delete_health(name: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    waiting = _waiting()
    if service not in context().store.current.health:
        _require(snapshot, service)
    context().store.clear_health(service)
    return _apply(service, "health check override removed", waiting)


def _backend_key(snapshot: Snapshot, service: str, container: str, create: bool) -> str:
    """The container name an override is kept under: `container` may be the name, the ID or
    an unambiguous ID prefix of a backend of the service."""
    found = _find(snapshot, service)
    backends: list[Backend] = list(found.backends) if found else []
    matches = {b.container for b in backends if b.container == container.lstrip("/")}
    if not matches and len(container) >= MIN_ID_PREFIX:
        matches = {b.container for b in backends if b.container_id.startswith(container)}
    if len(matches) > 1:
        raise ApiError(
            422,
            "ambiguous_container",
            f"{L.show(container)} is the start of several backends' IDs: "
            f"{', '.join(sorted(matches))}; use the container name",
        )
    if matches:
        return matches.pop()
    if create or container in context().store.current.backends.get(service, {}):
        return parse_container_name(container)
    if found is None:
        _require(snapshot, service)
    raise ApiError(
        404,
        "unknown_backend",
        f"container {L.show(container)} is not a backend of service {service} (to keep "
        "the override for when it joins, add ?create=true to the request, or --create to the "
        "CLI command)",
        {"backends": sorted({b.container for b in backends})[:100]},
    )


@routes.patch(f"{PREFIX}/services/<name>/backends/<container>")
@operation(
    "set a backend's weight or drain it (persisted)",
    V.ServiceChange,
    body=bodies.BackendPatch,
    query=bodies.ChangeQuery,
    errors=(404, 503),
)
def patch_backend(name: str, container: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    waiting = _waiting(bodies.ChangeQuery)
    patch = body(bodies.BackendPatch).to_core()
    key = _backend_key(snapshot, service, container, waiting.create)
    updated = context().store.update_backend(service, key, patch.apply)
    summary = f"backend {key}: weight {updated.weight}, drain {updated.drain}"
    return _apply(service, summary, waiting)


@routes.delete(f"{PREFIX}/services/<name>/backends/<container>")
@operation(
    "remove a backend's overrides", V.ServiceChange, query=bodies.WaitQuery, errors=(404, 503)
)
def delete_backend(name: str, container: str) -> Response:
    snapshot = _snapshot()
    service = _service_name(name)
    waiting = _waiting()
    key = _backend_key(snapshot, service, container, create=False)
    context().store.update_backend(service, key, lambda _: BackendOverride())
    return _apply(service, f"backend {key}: overrides removed", waiting)


@routes.get(f"{PREFIX}/config")
@operation(
    "the rendered nginx config", "text/plain", query=bodies.ConfigQuery, errors=(404, 422, 503)
)
def get_config() -> Response:
    snapshot = _snapshot()
    wanted = query(bodies.ConfigQuery).nginx
    if wanted is None:
        return Response(context().redact(snapshot.config), mimetype="text/plain")
    managed = snapshot.topology.nginx
    found = [t for t in managed if wanted in (t.container, t.container_id)] or [
        t for t in managed if len(wanted) >= 12 and t.container_id.startswith(wanted)
    ]
    if len(found) != 1:
        why = "is named" if not found else "has an id starting with"
        raise ApiError(
            404,
            "nginx_not_found",
            f"no one managed nginx {why} {wanted!r}: GET {PREFIX}/nginx lists them",
            {"nginx": wanted},
        )
    text = context().config_of(snapshot, found[0])
    if text is None:
        raise ApiError(
            503,
            "not_rendered",
            f"the config of {found[0].container} for version {snapshot.version} is not made "
            "yet: ask again after the pass under way",
            {"nginx": wanted},
        )
    return Response(context().redact(text), mimetype="text/plain")


@routes.get(f"{PREFIX}/nginx")
@operation("managed nginx containers", V.NginxList, errors=(503,))
def get_nginx() -> Response:
    snapshot = _snapshot()
    statuses = context().activity.nginx()
    states = context().nginx()
    managed = []
    for target in snapshot.topology.nginx:
        status = statuses.get(target.container_id)
        state = states.get(target.container_id)
        managed.append(
            V.Nginx(
                container=target.container_id,
                name=target.container,
                config_path=target.config_path,
                networks=list(target.networks),
                started_at=target.started_at,
                checksum=status.checksum if status else None,
                current=(
                    state is not None and state.version == snapshot.version
                    if V.dataplane(state) == "dynamic"
                    else status is not None and status.checksum == snapshot.checksum
                ),
                last_attempt=status.last_attempt if status else None,
                last_result=status.last_result if status else None,  # type: ignore[arg-type]
                last_reload=status.last_reload if status else None,
                last_error=status.last_error if status else None,
                reloads=status.reloads if status else 0,
                pushes=status.pushes if status else 0,
                last_push=status.last_push if status else None,
                failures=status.failures if status else 0,
                version=state.version if state else None,
                failure=V.failure_view(state.failure if state else None),
                dataplane=V.dataplane(state),
                dataplane_reason=state.mode.why if state and state.mode else None,
                stats_sample=(context().stats_sample if V.dataplane(state) == "reload" else None),
            )
        )
    excluded = [
        V.Excluded(container=e.container, reason=e.reason)
        for e in snapshot.topology.excluded
        if e.reason.startswith("managed nginx")
    ]
    remote = [
        V.RemoteNginx(task=r.task_id, name=r.task, node=r.node, reason=r.reason)
        for r in snapshot.topology.remote_nginx
    ]
    return reply(
        V.NginxList(checksum=snapshot.checksum, nginx=managed, excluded=excluded, remote=remote)
    )


@routes.get(f"{PREFIX}/events")
@operation(
    "passes, held scale-outs, failures and overrides, newest first",
    V.Events,
    query=bodies.EventsQuery,
)
def get_events() -> Response:
    limit = query(bodies.EventsQuery).limit
    return reply(
        V.Events(
            events=[
                V.Event(time=e.time, kind=e.kind, summary=e.summary, details=e.details)  # type: ignore[arg-type]
                for e in context().activity.entries(limit)
            ]
        )
    )


@routes.get(f"{PREFIX}/dns/records")
@operation("the DNS zone served", V.DnsRecords, errors=(503,))
def get_dns_records() -> Response:
    return reply(V.zone_view(_snapshot().dns))


@routes.get(f"{PREFIX}/dns/zone")
@operation(
    "the DNS zone for `controlplane dns --controller`: at once when its version is not "
    "`after`, else when the next one comes or after `timeout`",
    V.DnsZone,
    query=bodies.ZoneQuery,
    errors=(503,),
)
def get_dns_zone() -> Response:
    read = query(bodies.ZoneQuery)
    newer = context().newer
    snapshot = (newer(read.after, read.timeout) if newer else None) or _snapshot()
    response = reply(
        V.DnsZone(
            version=snapshot.dns.version,
            issued=time.time(),
            zone=zone_data(snapshot.dns),
            allowed=forwarding_networks(snapshot.topology),
        )
    )
    token = context().token
    if token:  # a DNS service with the token takes this zone from no one else
        response.headers[ZONE_SIGNATURE] = zone_signature(token, response.get_data())
    return response


@routes.post(f"{PREFIX}/resync")
@operation(
    "re-inspect every container and apply", V.Resync, query=bodies.TimeoutQuery, errors=(503,)
)
def post_resync() -> Response:
    api = context()
    read = query(bodies.TimeoutQuery).timeout
    timeout = api.wait_timeout if read is None else read
    ticket = api.request_pass("api: resync", True)
    ticket.done.wait(timeout)
    snapshot = ticket.snapshot or _snapshot()
    report = ticket.report
    applied = _applied(ticket, snapshot, True, timeout)
    return reply(V.Resync(**dict(applied), changed=bool(report and report.changed)))


@routes.get("/healthz")
@operation("liveness", V.Health)
def healthz() -> Response:
    return reply(V.Health(status="ok"))


@routes.get("/readyz")
@operation(
    "readiness: Docker reachable and first sync done",
    V.Ready,
    replies={503: (V.Ready, "not ready; reasons say why")},
)
def readyz() -> Response:
    reasons = context().ready()
    return reply(V.Ready(ready=not reasons, reasons=reasons), 200 if not reasons else 503)


@routes.get("/metrics")
@operation("Prometheus metrics", "text/plain")
def metrics() -> Response:
    return Response(context().metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


@routes.get(f"{PREFIX}/openapi.json")
@operation("this document (OpenAPI 3.1)", None)
def openapi() -> Response:
    """Made at the first request and kept: the routes don't change once the app is built."""
    served = current_app.extensions.get(OPENAPI)
    if served is None:
        served = current_app.extensions[OPENAPI] = json.dumps(document(current_app))
    return Response(served, mimetype="application/json")
