"""The dashboard: static files shipped in the package (controlplane/ui/), served by the API's
own server so it keeps the API's bind and token rules, with no build step and nothing fetched
from elsewhere.

Names and labels from Docker reach the page only as text; the Content-Security-Policy is the
second wall: only this server's own scripts and styles run, nothing inline, and no other site
may frame the page. Each file has a route of its own (no path parameter), so a request can
name nothing outside the folder.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

from flask import Blueprint, Response, request

from controlplane.api.openapi import operation

ASSETS = files("controlplane") / "ui"
INDEX = "index.html"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on every load (a 304 when unchanged): an upgraded controller serves its own
    # page at once, never a cached one that speaks an older API.
    "Cache-Control": "no-cache",
}


def shipped() -> list[str]:
    """The files of the dashboard, each served at /ui/<name>."""
    return sorted(
        entry.name
        for entry in ASSETS.iterdir()
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in TYPES)
    )


def _serve(name: str) -> Response:
    data = (ASSETS / name).read_bytes()
    response = Response(data, content_type=TYPES[name[name.rindex(".") :]])
    response.headers.update(HEADERS)
    response.set_etag(hashlib.sha256(data).hexdigest()[:32])
    response.make_conditional(request)
    return response


@operation("the dashboard (HTML; same bind and token rules as the API)", None)
def index() -> Response:
    return _serve(INDEX)


@operation("a file of the dashboard (script, style or page)", None)
def asset(name: str) -> Response:
    return _serve(name)


def dashboard() -> Blueprint:
    """The dashboard at / and /ui/, and each of its files at /ui/<name>."""
    ui = Blueprint("ui", __name__)
    ui.add_url_rule("/", endpoint="index", view_func=index, methods=["GET"])
    ui.add_url_rule("/ui/", endpoint="index", view_func=index, methods=["GET"])
    for name in shipped():
        ui.add_url_rule(
            f"/ui/{name}",
            endpoint="asset",
            view_func=asset,
            methods=["GET"],
            defaults={"name": name},
        )
    return ui
