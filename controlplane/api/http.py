"""The HTTP plumbing every route shares: the context, strict reading of the request (content
type, size, JSON, then the models of api/bodies.py), each failure with its own status, and
replies and errors written from the models of api/views.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Response, current_app, request
from pydantic import BaseModel

from controlplane.activity import Activity
from controlplane.api.bodies import parse, parse_query
from controlplane.api.views import Error, ErrorBody
from controlplane.core.health import Health
from controlplane.core.model import NginxTarget
from controlplane.core.served import NginxState
from controlplane.core.traffic import Key, Summary
from controlplane.errors import ApiError
from controlplane.metrics import Metrics
from controlplane.snapshot import PassTicket, Snapshot
from controlplane.store import OverrideStore

MAX_BODY = 64 * 1024
MUTATING = frozenset({"PUT", "PATCH", "DELETE", "POST"})
"""The methods that change routing: they need the token when one is set."""
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ApiContext:
    """Everything the routes read or change; the wiring module fills it."""

    snapshot: Callable[[], Snapshot | None]
    store: OverrideStore
    request_pass: Callable[[str, bool], PassTicket]
    """(reason, resync) -> a ticket for the pass that will include the change."""
    activity: Activity
    metrics: Metrics
    ready: Callable[[], list[str]]
    """Why the controller is not ready; empty when it is."""
    nginx: Callable[[], Mapping[str, NginxState]]
    """What each managed nginx runs, by container id (core.served)."""
    config_of: Callable[[Snapshot, NginxTarget], str | None]
    """The config a managed nginx is given by a snapshot, as its data plane wants (None:
    not made for that snapshot)."""
    redact: Callable[[str], str] = field(default=lambda text: text)
    """A config as the API shows it: without the secret nginx proves its reports with (this
    route is read without the token, and anyone with the tag could forge figures)."""
    traffic: Callable[[Iterable[Key]], Mapping[Key, Summary]] = field(default=lambda keys: {})
    """Each key's traffic figures over the last minute (core.traffic; absent: none)."""
    health: Callable[[], Mapping[tuple[str, str], Health]] = field(default=lambda: {})
    """By (container id, network): each checked backend's health."""
    newer: Callable[[int, float], Snapshot | None] | None = None
    """(version, timeout) -> the first snapshot whose version is not `version`, waiting up
    to `timeout` for one (snapshot.Published); None: `snapshot` at once."""
    token: str | None = None
    wait_timeout: float = 10.0
    stats_sample: int | None = None
    """--stats-sample, what a reload nginx's traffic reports sample (None: no stats)."""


def context() -> ApiContext:
    found: ApiContext = current_app.extensions["controlplane"]
    return found


def reply(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status=status, mimetype="application/json")


def error_response(
    status: int, code: str, message: str, details: dict[str, object] | None = None
) -> Response:
    return reply(Error(error=ErrorBody(code=code, message=message, details=details or {})), status)


def body(model: type[M]) -> M:
    """The request's JSON body read as `model`: 422 (InvalidValue) naming what is wrong."""
    return parse(model, json_body())


def query(model: type[M]) -> M:
    """The query read as `model`: 422 (InvalidValue) naming the parameter."""
    return parse_query(model, request.args.to_dict())


def json_body() -> Any:
    """The request's JSON body: 415 unless it says application/json, 413 past MAX_BODY, 400
    unless it parses (NaN and Infinity are not JSON)."""
    if request.mimetype != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON with the header Content-Type: application/json",
            {"content_type": request.content_type},
        )
    data = request.get_data(cache=False)

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(data, parse_constant=reject)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
