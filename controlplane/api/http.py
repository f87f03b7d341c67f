"""The HTTP plumbing every route shares: the context, the error type and strict request
parsing (content type, size, JSON, query values), each failure with its own status."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, request

from controlplane.activity import Activity
from controlplane.core import labels as L
from controlplane.core.served import NginxState
from controlplane.errors import InvalidValue
from controlplane.metrics import Metrics
from controlplane.reconciler import PassTicket, Snapshot
from controlplane.store import OverrideStore

MAX_BODY = 64 * 1024


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
    token: str | None = None
    wait_timeout: float = 10.0


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


def context() -> ApiContext:
    found: ApiContext = current_app.extensions["controlplane"]
    return found


def error_response(
    status: int, code: str, message: str, details: dict[str, object] | None = None
) -> Response:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


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


def flag_arg(name: str) -> bool:
    value = request.args.get(name)
    if value is None:
        return False
    try:
        return L.parse_bool(value, name)
    except InvalidValue as error:
        raise ApiError(422, "invalid_value", str(error), {"parameter": name}) from None


def seconds_arg(name: str, default: float, low: float = 0.1, high: float = 60.0) -> float:
    value = request.args.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not low <= seconds <= high:
        raise ApiError(
            422,
            "invalid_value",
            f"{name}={L.show(value)} must be a number of seconds from {low} to {high}",
            {"parameter": name, "minimum": low, "maximum": high},
        )
    return seconds
