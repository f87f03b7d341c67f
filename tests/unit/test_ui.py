"""The dashboard's files as the API serves them: every one from the package with the
Content-Security-Policy and the other headers, nothing else (no unknown file, no path out of
the folder), and no way for data to become markup in the page's own code."""

from __future__ import annotations

import re

import pytest

from controlplane.api.ui import ASSETS, CSP, shipped
from tests.unit.conftest import ApiHarness, HarnessFactory

PAGES = ["/", "/ui/"]
TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
SCRIPTS = sorted(name for name in shipped() if name.endswith(".js"))


def source(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def test_the_package_ships_the_page_its_scripts_and_style() -> None:
    assert {"index.html", "app.js", "style.css"} <= set(shipped())


@pytest.mark.parametrize("path", PAGES)
def test_the_dashboard_is_served_at_the_root_and_under_ui(api: ApiHarness, path: str) -> None:
    reply = api.client.get(path)
    assert reply.status_code == 200
    assert reply.mimetype == "text/html"
    assert reply.get_data() == (ASSETS / "index.html").read_bytes()


@pytest.mark.parametrize("name", shipped())
def test_each_file_is_served_with_its_type_and_the_security_headers(
    api: ApiHarness, name: str
) -> None:
    reply = api.client.get(f"/ui/{name}")
    assert reply.status_code == 200
    assert reply.mimetype == TYPES[name.rsplit(".", 1)[1]]
    assert reply.mimetype_params.get("charset") == "utf-8"
    assert reply.headers["Content-Security-Policy"] == CSP
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert reply.headers["Cache-Control"] == "no-cache"
    assert reply.get_data() == (ASSETS / name).read_bytes()


def test_the_policy_allows_only_this_servers_own_scripts_styles_and_requests() -> None:
    directives = dict(d.split(" ", 1) for d in CSP.split("; "))
    assert directives == {
        "default-src": "'none'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }


def test_an_unchanged_file_is_a_304(api: ApiHarness) -> None:
    first = api.client.get("/ui/app.js")
    etag = first.headers["ETag"]
    again = api.client.get("/ui/app.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.get_data() == b""


@pytest.mark.parametrize(
    "path",
    [
        "/ui/nope.js",
        "/ui/../app.py",
        "/ui/%2e%2e/app.py",
        "/ui/..%2fapi%2fapp.py",
        "/ui/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/ui//etc/passwd",
        "/ui/app.js/",
        "/ui/App.js",
        "/ui/ui.py",
        "/index.html",
        "/app.js",
    ],
    ids=str,
)
def test_anything_else_is_a_404_in_the_apis_error_shape(api: ApiHarness, path: str) -> None:
    reply = api.client.get(path)
    assert reply.status_code == 404
    assert reply.get_json()["error"]["code"] == "not_found"


def test_the_page_is_read_without_the_token_and_changes_still_need_it(
    make_api: HarnessFactory,
) -> None:
    api = make_api(token="s3cret")
    assert api.client.get("/").status_code == 200
    assert api.client.get("/ui/app.js").status_code == 200
    assert api.client.put("/ui/app.js").status_code == 401
    denied = api.client.patch("/api/v1/services/web/backends/w1", json={"drain": True})
    assert denied.status_code == 401


def test_the_page_has_no_inline_script_style_or_handler() -> None:
    page = source("index.html")
    assert re.findall(r"<script\b[^>]*>", page) == ['<script type="module" src="/ui/app.js">']
    assert "<style" not in page
    assert not re.search(r"\sstyle\s*=", page)
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE)


def test_every_file_the_page_names_is_shipped() -> None:
    """The page's assets and each module's imports: a file renamed but not its import would
    only show as a blank page."""
    named = re.findall(r'(?:src|href)="/ui/([^"]+)"', source("index.html"))
    for script in SCRIPTS:
        named += re.findall(r'from "\./([^"]+)"', source(script))
    assert named and set(named) <= set(shipped())


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_never_turn_data_into_markup(script: str) -> None:
    """Text goes in as text nodes, textContent or attributes (dom.js): no HTML parser sink,
    no code made from strings."""
    code = source(script)
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "createContextualFragment",
        "DOMParser",
        "eval(",
        "new Function",
        'setTimeout("',
        "javascript:",
    ):
        assert sink not in code, f"{script} uses {sink}"
