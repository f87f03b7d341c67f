"""The Flask app factory: auth and error handling for every route.

This API can redirect all traffic, so mutating requests need the token when one is set, and
every body is read strictly: the wrong content type, size, JSON or value each get their own
status and a JSON error naming what is allowed; nothing a client sends gives a 500.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from controlplane.api import API_HEADER
from controlplane.api.http import MAX_BODY, MUTATING, ApiContext, context, error_response
from controlplane.api.routes import routes
from controlplane.api.ui import dashboard
from controlplane.errors import ApiError, InvalidValue, StateError

log = logging.getLogger(__name__)


def _check_token() -> Response | None:
    token = context().token
    if token is None or request.method not in MUTATING:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    response = error_response(
        401,
        "unauthorized",
        "this request changes routing and needs the API token: send "
        "Authorization: Bearer <token> (the CLI reads CONTROLPLANE_API_TOKEN)",
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="controlplane"'
    return response


def _http_error(error: HTTPException) -> Response:
    code = (error.name or "error").lower().replace(" ", "_")
    response = error_response(error.code or 500, code, error.description or "")
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers.add(name, value)
    return response


def _api_error(error: ApiError) -> Response:
    return error_response(error.status, error.code, error.message, error.details)


def _invalid(error: InvalidValue) -> Response:
    return error_response(422, "invalid_value", str(error), error.details)


def _state_error(error: StateError) -> Response:
    log.error("%s", error)
    return error_response(503, "state_unavailable", str(error))


def _unexpected(error: Exception) -> Response:
    log.exception("API request %s %s failed", request.method, request.path)
    return error_response(
        500,
        "internal",
        f"the controller failed on this request ({type(error).__name__}); nothing is lost, "
        "see its log and please report it",
    )


def _mark(response: Response) -> Response:
    response.headers[API_HEADER] = "v1"
    return response


def create_app(api: ApiContext) -> Flask:
    app = Flask("controlplane.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions["controlplane"] = api
    app.before_request(_check_token)
    app.after_request(_mark)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(InvalidValue, _invalid)
    app.register_error_handler(StateError, _state_error)
    app.register_error_handler(Exception, _unexpected)
    app.register_blueprint(routes)
    app.register_blueprint(dashboard())
    return app
