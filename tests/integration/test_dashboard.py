"""The dashboard in a real browser (Chromium through Playwright) over a live stack: real
Docker, nginx and controller. It lists what Docker has, a method switched or a backend drained
in the page reaches nginx, a change made elsewhere shows on the open page, and names and labels
made to look like markup stay text. Each page's screenshot is kept (build/artifacts/dashboard,
or $CONTROLPLANE_ARTIFACTS/dashboard) for a person to look at."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import EndpointConfig
from playwright.sync_api import BrowserContext, Locator, Page, expect

from controlplane.core import labels as L
from tests.integration.conftest import ControllerFactory, RunningController, unavailable
from tests.support.browser import BrowserUnavailable, Console, check, chromium
from tests.support.lab import Http, Lab, wait_until

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CONTROLPLANE_ARTIFACTS") or ROOT / "build" / "artifacts")
TOKEN = "dashboard-test-token"
WAIT_MS = 15_000
"""For a change to show: a reload under load on a busy machine, then the next poll."""


@dataclass
class Stack:
    net: Network
    lb: Container
    backends: list[Container]
    controller: RunningController
    port: int

    @property
    def url(self) -> str:
        return self.controller.api_url

    def nginx_config(self) -> str:
        """The config file inside the managed nginx, as nginx reads it."""
        (managed,) = httpx.get(f"{self.url}/api/v1/nginx", timeout=10).json()["nginx"]
        found = self.lb.exec_run(["cat", managed["config_path"]])
        assert found.exit_code == 0, found.output
        return str(found.output.decode())


def make_stack(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], **settings: object
) -> Stack:
    net = lab.network()
    lb = lab.nginx(net)
    backends = [lab.backend(net), lab.backend(net)]
    controller = start_controller(net.name, api_bind="127.0.0.1:0", **settings)
    port = lab.published_port(lb)
    names = {b.name for b in backends}
    wait_until(lambda: http_for(port).settled("web", names), what="both backends served")
    return Stack(net, lb, backends, controller, port)


@pytest.fixture
def stack(lab: Lab, start_controller: ControllerFactory, http_for: type[Http]) -> Stack:
    """Every request counted (--stats-sample 1), so the page's counts are the clients'."""
    return make_stack(lab, start_controller, http_for, stats_sample=1)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """Skipped here without Chromium or Playwright; a failure under CI=true."""
    try:
        check()
    except BrowserUnavailable as error:
        unavailable(str(error))
    with chromium(tmp_path / "profile") as context:
        yield context


@pytest.fixture
def page(browser: BrowserContext) -> Page:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    return page


def shot(page: Page, request: pytest.FixtureRequest, what: str) -> Path:
    """A full-page screenshot kept as an artifact of this test."""
    folder = ARTIFACTS / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{request.node.name}-{what}.png".replace("/", "_")
    page.screenshot(path=str(path), full_page=True)
    return path


def backend_row(page: Page, name: str) -> Locator:
    return page.locator("#main tbody tr").filter(has=page.locator("th", has_text=name))


def state_of(page: Page, name: str) -> Locator:
    """The State cell of a backend's row (after Backend and Address)."""
    return backend_row(page, name).locator("td").nth(1)


def accessible(page: Page) -> None:
    """axe-core finds nothing on the page as it is (labels, names, roles, contrast, tables)."""
    found = Axe().run(page).response["violations"]
    assert not found, [(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in found]


def open_service(page: Page, stack: Stack, name: str = "web") -> None:
    page.goto(f"{stack.url}/ui/#/service/{quote(name)}")
    expect(page.locator("h1")).to_have_text(f"Service {name}")


def test_the_dashboard_lists_what_docker_has_with_no_console_error(
    stack: Stack, page: Page, request: pytest.FixtureRequest
) -> None:
    console = Console(page)
    page.goto(f"{stack.url}/")
    expect(page.locator("#live")).to_have_text("live")
    services = page.locator("#main table").first
    expect(services.locator("tbody tr")).to_have_count(1)
    expect(services.locator("tbody th")).to_have_text("web")
    expect(services.locator("tbody td").nth(0)).to_have_text("round_robin")
    expect(services.locator("tbody td").nth(2)).to_have_text("2 / 2")
    nginx = page.locator("#main table").nth(1)
    expect(nginx.locator("tbody th")).to_have_text(str(stack.lb.name))
    expect(nginx.locator("tbody td").nth(1)).to_contain_text("current")
    page.wait_for_timeout(1200)  # a few polls: none may log an error either
    shot(page, request, "overview")
    accessible(page)

    # by keyboard: the service's link, then the page's heading has the focus
    page.get_by_role("link", name="web", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{stack.url}/#/service/web")
    expect(page.locator("h1")).to_be_focused()
    for backend in stack.backends:
        expect(state_of(page, str(backend.name))).to_have_text("serving")
        expect(backend_row(page, str(backend.name))).to_contain_text(str(backend.id)[:12])
    expect(page.locator("#main tbody tr").filter(has_text="serving")).to_have_count(2)
    shot(page, request, "service")
    accessible(page)
    page.emulate_media(color_scheme="dark")
    accessible(page)
    page.emulate_media(color_scheme="light")

    page.goto(f"{stack.url}/ui/")
    expect(page.locator("#main tbody th").first).to_have_text("web")
    assert console.unexpected() == []


def test_switching_the_method_in_the_page_changes_nginx_and_the_page(
    stack: Stack, page: Page, request: pytest.FixtureRequest
) -> None:
    console = Console(page)
    open_service(page, stack)
    method = page.locator(".facts dd").first
    expect(method).to_contain_text("round_robin from default")
    page.get_by_label("Method", exact=True).select_option("hash")
    page.get_by_label("Hash key").fill("$request_uri")
    page.get_by_label("Consistent hashing (ketama)").check()
    page.get_by_label("Hash key").press("Enter")
    expect(method).to_have_text("hash $request_uri consistent from override")
    expect(page.locator(".method-form .result")).to_contain_text(f"nginx {stack.lb.name} took it")
    assert 'hash "$request_uri" consistent;' in stack.nginx_config()
    shot(page, request, "service-hash")

    page.get_by_role("button", name="Back to the labels").click()
    expect(method).to_have_text("round_robin from default")
    wait_until(lambda: 'hash "$request_uri"' not in stack.nginx_config(), what="hash gone")
    assert console.unexpected() == []


def test_draining_in_the_page_takes_the_backend_out_and_the_page_follows_the_api(
    lab: Lab,
    start_controller: ControllerFactory,
    http_for: type[Http],
    page: Page,
    request: pytest.FixtureRequest,
) -> None:
    stack = make_stack(lab, start_controller, http_for, api_token=TOKEN)
    first, second = (str(b.name) for b in stack.backends)
    console = Console(page)
    open_service(page, stack)
    drain = page.get_by_role("button", name=f"Drain {first}")

    # no token yet: the API's 401 is shown at the token field, which gets the focus
    drain.click()
    expect(page.locator("#token-error")).to_contain_text("needs the API token")
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#token-state")).to_have_text("a token is set for this tab")

    drain.focus()
    page.keyboard.press("Enter")
    expect(state_of(page, first)).to_have_text("draining")
    expect(page.get_by_role("button", name=f"Undrain {first}")).to_be_visible()
    http = http_for(stack.port)
    wait_until(lambda: http.settled("web", {second}), what=f"only {second} answering")
    shot(page, request, "service-drained")

    # a change made elsewhere shows on the open page, without reloading it
    headers = {"Authorization": f"Bearer {TOKEN}"}
    undrained = httpx.patch(
        f"{stack.url}/api/v1/services/web/backends/{first}",
        json={"drain": False},
        headers=headers,
        timeout=10,
    )
    assert undrained.status_code == 200, undrained.text
    expect(state_of(page, first)).to_have_text("serving")
    wait_until(lambda: http.settled("web", {first, second}), what="both answering again")

    # the API's own message beside the field; then a weight it takes
    weight = page.get_by_label(f"Weight of {second}")
    weight.fill("abc")
    weight.press("Enter")
    error = backend_row(page, second).locator("form .field-error")
    expect(error).to_have_text('weight must be a whole number from 1 to 1000 or null, not "abc"')
    expect(weight).to_have_attribute("aria-invalid", "true")
    weight.fill("3")
    weight.press("Enter")
    expect(error).to_have_text("")
    expect(backend_row(page, second)).to_contain_text("set through the API")
    wait_until(lambda: "weight=3" in stack.nginx_config(), what="weight=3 in nginx")

    # what is being typed survives the polls that redraw the page
    other = page.get_by_label(f"Weight of {first}")
    other.fill("7")
    page.wait_for_timeout(1500)
    expect(other).to_be_focused()
    expect(other).to_have_value("7")
    assert console.unexpected(401, 422) == []


def test_the_page_counts_what_was_sent_through_nginx(
    stack: Stack,
    page: Page,
    http_for: type[Http],
    request: pytest.FixtureRequest,
) -> None:
    """300 requests through nginx: each backend's count on the page and in the API is what
    the clients got from it, within 10% (issue 17)."""
    console = Console(page)
    time.sleep(1.5)  # what settling sent is reported by then; it is counted below
    before = backend_counts(stack)
    sent = http_for(stack.port).bodies("web", 300)
    assert sum(sent.values()) == 300
    open_service(page, stack)
    for name, count in sent.items():
        wanted = before.get(name, 0) + count
        wait_until(
            lambda n=name, w=wanted: backend_counts(stack).get(n, 0) >= w * 0.9,
            what=f"{name}'s requests in the API",
        )
        got = backend_counts(stack)[name] - before.get(name, 0)
        assert abs(got - count) <= count * 0.1, (name, got, count)
        shown = backend_row(page, name).locator("td").nth(5)
        expect(shown).to_contain_text(re.compile(r"\d+ in 1 min"))
        wait_until(
            lambda n=name, c=count: page_count(page, n) >= before.get(n, 0) + c * 0.9,
            what=f"{name}'s requests on the page",
        )
        assert abs(page_count(page, name) - before.get(name, 0) - count) <= count * 0.1
    shot(page, request, "service-traffic")
    assert console.unexpected() == []


def test_sampled_counts_are_marked_as_estimates(
    lab: Lab,
    start_controller: ControllerFactory,
    http_for: type[Http],
    page: Page,
    request: pytest.FixtureRequest,
) -> None:
    """At the default --stats-sample (10) a reload nginx reports one in ten ordinary
    answers: the page marks what it counts from them as estimates, and says why."""
    stack = make_stack(lab, start_controller, http_for)
    console = Console(page)
    http_for(stack.port).bodies("web", 400)  # some sampled for each backend, surely
    open_service(page, stack)
    name = stack.backends[0].name
    counted = backend_row(page, name).locator("td").nth(5)
    expect(counted).to_contain_text(re.compile(r"\u2248 \d+ in 1 min"))
    expect(counted.locator("[title]").first).to_have_attribute(
        "title", re.compile("reports 1 in 10 ordinary answers")
    )
    expect(page.locator("#main")).to_contain_text("counts 1 in 10 ordinary answers")
    shot(page, request, "service-estimates")
    assert console.unexpected() == []


def backend_counts(stack: Stack) -> dict[str, int]:
    """Requests per backend over the last minute, as the API says."""
    reply = httpx.get(f"{stack.url}/api/v1/services/web", timeout=10).json()
    return {
        b["name"]: sum(b["traffic"]["requests"].values())
        for b in reply["backends"]
        if b["traffic"] is not None
    }


def page_count(page: Page, name: str) -> int:
    text = backend_row(page, name).locator("td").nth(5).inner_text()
    found = re.search(r"(\d+) in 1 min", text)
    return int(found.group(1)) if found else 0


HOSTILE_ALIAS = "<img src=x onerror=alert(1)>"
HOSTILE_LABEL = "<script>alert(2)</script>"
HOSTILE_HOSTS = '"><svg onload=alert(3)>'
HOSTILE_KEY = "<img src=x onerror=alert(4)>"


def hostile_container(lab: Lab, net: Network) -> Container:
    """A backend whose name is what Docker's name rules allow of an attack, on a network
    alias that is markup, with labels whose values are markup."""
    name = f"cpt-{lab.run_id}-img.src-x.onerror-alert"
    network = str(net.name)
    endpoint = EndpointConfig(
        version=lab.client.api.api_version, aliases=["web", "xss", HOSTILE_ALIAS]
    )
    container: Container = lab.client.containers.run(
        lab.images.backend,
        name=name,
        hostname="hostile",
        detach=True,
        labels={**lab.labels, L.WEIGHT: HOSTILE_LABEL, L.HOSTS: HOSTILE_HOSTS},
        network=network,
        networking_config={network: endpoint},
    )
    return container


def no_markup_ran(page: Page) -> None:
    assert page.locator("img").count() == 0
    assert page.locator("script:not([src])").count() == 0
    assert page.locator("svg:not(.spark)").count() == 0


def test_names_and_labels_made_of_markup_are_shown_as_text(
    lab: Lab, stack: Stack, page: Page, request: pytest.FixtureRequest
) -> None:
    hostile = hostile_container(lab, stack.net)
    console = Console(page)
    page.goto(f"{stack.url}/")
    left_out = page.locator("#main tbody tr").filter(has_text=str(hostile.name))
    expect(left_out.first).to_be_visible()
    expect(left_out.filter(has_text=HOSTILE_ALIAS).first).to_be_visible()
    expect(left_out.filter(has_text=f"{L.WEIGHT}='{HOSTILE_LABEL}'").first).to_be_visible()
    no_markup_ran(page)
    shot(page, request, "overview")

    open_service(page, stack)
    row = backend_row(page, str(hostile.name))
    expect(row.locator("td").nth(1)).to_have_text("excluded")
    expect(row).to_contain_text(HOSTILE_LABEL)
    expect(row).to_contain_text(HOSTILE_HOSTS)
    page.get_by_label("Method", exact=True).select_option("hash")
    page.get_by_label("Hash key").fill(HOSTILE_KEY)
    page.get_by_role("button", name="Apply method").click()
    expect(page.locator("#key-error")).to_contain_text(f"key='{HOSTILE_KEY}'")
    no_markup_ran(page)
    shot(page, request, "service")
    accessible(page)  # with an error shown beside its field

    # a service named by the alias: the API's 404 message and the heading, as text
    page.goto(f"{stack.url}/#/service/{quote(HOSTILE_ALIAS, safe='')}")
    expect(page.locator("h1")).to_have_text(f"Service {HOSTILE_ALIAS}")
    expect(page.locator(".banner")).to_contain_text("is not a valid name")
    no_markup_ran(page)
    shot(page, request, "unknown-service")
    assert console.unexpected(404, 422) == []


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("controlplane-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "controlplane" / "ui").iterdir() if p.is_file()}
    assert {"index.html", "app.js", "style.css"} <= shipped
    assert {f"controlplane/ui/{n}" for n in shipped} <= names
