"""Every route of the API. A change is persisted first, then applied by a pass of the loop,
so a reply never claims a change that a restart would lose."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane.api.http import (
    ApiError,
    context,
    flag_arg,
    json_body,
    seconds_arg,
)
from controlplane.api.openapi import document
from controlplane.api.views import (
    Json,
    absent_service_json,
    exclusion_json,
    failure_json,
    service_json,
    zone_json,
)
from controlplane.core import labels as L
from controlplane.core.model import Backend, BackendOverride, Service
from controlplane.core.overrides import parse_algorithm, parse_backend_patch, parse_container_name
from controlplane.core.served import NginxState
from controlplane.errors import InvalidValue
from controlplane.reconciler import PassTicket, Snapshot

routes = Blueprint("api", __name__)
PREFIX = "/api/v1"
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


def _view(name: str, snapshot: Snapshot) -> Json:
    overrides = context().store.current
    service = _find(snapshot, name)
    if service is None:
        return absent_service_json(name, overrides)
    return service_json(
        service, snapshot.topology, overrides, snapshot.serves, _nginx_states(snapshot)
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


def _waiting() -> _Waiting:
    return _Waiting(
        flag_arg("wait"), seconds_arg("timeout", context().wait_timeout), flag_arg("create")
    )


def _apply(name: str, summary: str, query: _Waiting) -> Json:
    """Run a pass for the change and answer with the service as that pass sees it; with
    ?wait=true, only once every managed nginx has reloaded or failed (or the timeout)."""
    api = context()
    wait, timeout = query.wait, query.timeout
    api.activity.record("override", f"service {name}: {summary}", service=name)
    ticket = api.request_pass(f"api: {name} {summary}", False)
    (ticket.done if wait else ticket.planned).wait(timeout)
    snapshot = ticket.snapshot or _snapshot()
    reply = _view(name, snapshot)
    reply["applied"] = _applied(ticket, snapshot, wait, timeout)
    return reply


def _applied(ticket: PassTicket, snapshot: Snapshot, wait: bool, timeout: float) -> Json:
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
    return {
        "version": snapshot.version,
        "done": ticket.done.is_set() and ticket.error is None,
        "reloaded": [d.container for d in report.deployed if d.ok] if report else [],
        "errors": errors,
    }


@routes.get(f"{PREFIX}/services")
def list_services() -> Json:
    snapshot = _snapshot()
    overrides = context().store.current
    nginx = _nginx_states(snapshot)
    return {
        "services": [
            service_json(s, snapshot.topology, overrides, snapshot.serves, nginx)
            for s in snapshot.topology.services
        ]
    }


@routes.get(f"{PREFIX}/problems")
def get_problems() -> Json:
    """Every exclusion and warning in one place, and each nginx that did not take the
    current config: what an operator checks when something is missing."""
    snapshot = _snapshot()
    topology = snapshot.topology
    return {
        "version": snapshot.version,
        "excluded": [exclusion_json(e) for e in topology.excluded],
        "warnings": [
            *({"service": None, "warning": w} for w in topology.warnings),
            *({"service": s.name, "warning": w} for s in topology.services for w in s.warnings),
        ],
        "nginx": [
            {"name": n.container, "container": n.container_id, "failure": failure_json(n.failure)}
            for n in _nginx_states(snapshot)
            if n.failure is not None
        ],
    }


@routes.get(f"{PREFIX}/services/<name>")
def get_service(name: str) -> Json:
    snapshot = _snapshot()
    service = _service_name(name)
    overrides = context().store.current
    if service not in overrides.algorithms and service not in overrides.backends:
        _require(snapshot, service)
    return _view(service, snapshot)


@routes.put(f"{PREFIX}/services/<name>/algorithm")
def put_algorithm(name: str) -> Json:
    snapshot = _snapshot()
    service = _service_name(name)
    query = _waiting()
    algorithm = parse_algorithm(json_body())
    if not query.create:
        _require(snapshot, service)
    context().store.set_algorithm(service, algorithm)
    return _apply(service, f"algorithm set to {algorithm}", query)


@routes.delete(f"{PREFIX}/services/<name>/algorithm")
def delete_algorithm(name: str) -> Json:
    snapshot = _snapshot()
    service = _service_name(name)
    query = _waiting()
    if service not in context().store.current.algorithms:
        _require(snapshot, service)
    context().store.clear_algorithm(service)
    return _apply(service, "algorithm override removed", query)


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
def patch_backend(name: str, container: str) -> Json:
    snapshot = _snapshot()
    service = _service_name(name)
    query = _waiting()
    patch = parse_backend_patch(json_body())
    key = _backend_key(snapshot, service, container, query.create)
    updated = context().store.update_backend(service, key, patch.apply)
    return _apply(service, f"backend {key}: weight {updated.weight}, drain {updated.drain}", query)


@routes.delete(f"{PREFIX}/services/<name>/backends/<container>")
def delete_backend(name: str, container: str) -> Json:
    snapshot = _snapshot()
    service = _service_name(name)
    query = _waiting()
    key = _backend_key(snapshot, service, container, create=False)
    context().store.update_backend(service, key, lambda _: BackendOverride())
    return _apply(service, f"backend {key}: overrides removed", query)


@routes.get(f"{PREFIX}/config")
def get_config() -> Response:
    return Response(_snapshot().config, mimetype="text/plain")


@routes.get(f"{PREFIX}/nginx")
def get_nginx() -> Json:
    snapshot = _snapshot()
    statuses = context().activity.nginx()
    states = context().nginx()
    managed = []
    for target in snapshot.topology.nginx:
        status = statuses.get(target.container_id)
        state = states.get(target.container_id)
        managed.append(
            {
                "container": target.container_id,
                "name": target.container,
                "config_path": target.config_path,
                "networks": list(target.networks),
                "started_at": target.started_at,
                "checksum": status.checksum if status else None,
                "current": status is not None and status.checksum == snapshot.checksum,
                "last_attempt": status.last_attempt if status else None,
                "last_result": status.last_result if status else None,
                "last_reload": status.last_reload if status else None,
                "last_error": status.last_error if status else None,
                "reloads": status.reloads if status else 0,
                "failures": status.failures if status else 0,
                "version": state.version if state else None,
                "failure": failure_json(state.failure if state else None),
            }
        )
    excluded = [
        {"container": e.container, "reason": e.reason}
        for e in snapshot.topology.excluded
        if e.reason.startswith("managed nginx")
    ]
    return {"checksum": snapshot.checksum, "nginx": managed, "excluded": excluded}


@routes.get(f"{PREFIX}/events")
def get_events() -> Json:
    raw = request.args.get("limit", "100")
    try:
        limit = L.parse_int(raw, "limit", 1, 500)
    except InvalidValue as error:
        raise ApiError(422, "invalid_value", str(error), {"parameter": "limit"}) from None
    return {
        "events": [
            {"time": e.time, "kind": e.kind, "summary": e.summary, "details": e.details}
            for e in context().activity.entries(limit)
        ]
    }


@routes.get(f"{PREFIX}/dns/records")
def get_dns_records() -> Json:
    return zone_json(_snapshot().dns)


@routes.post(f"{PREFIX}/resync")
def post_resync() -> Json:
    api = context()
    timeout = seconds_arg("timeout", api.wait_timeout)
    ticket = api.request_pass("api: resync", True)
    ticket.done.wait(timeout)
    snapshot = ticket.snapshot or _snapshot()
    report = ticket.report
    return {
        **_applied(ticket, snapshot, True, timeout),
        "changed": bool(report and report.changed),
    }


@routes.get("/healthz")
def healthz() -> Json:
    return {"status": "ok"}


@routes.get("/readyz")
def readyz() -> tuple[Json, int]:
    reasons = context().ready()
    return {"ready": not reasons, "reasons": reasons}, 200 if not reasons else 503


@routes.get("/metrics")
def metrics() -> Response:
    return Response(context().metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


@routes.get(f"{PREFIX}/openapi.json")
def openapi() -> Json:
    return document()
