"""The CLI's API commands against a real HTTP server on loopback (waitress, port 0); `top`
against a fake API too."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from controlplane import cli_client
from controlplane.api.server import ApiServer
from controlplane.api_client import ApiClientError
from controlplane.cli import main
from controlplane.cli_client import CLEAR, NO_FIGURES, TOP_FIGURES, top_text, watch
from controlplane.core import labels as L
from controlplane.errors import ControlPlaneError
from tests.support.ports import free_port
from tests.unit.builders import container
from tests.unit.conftest import WEB, ApiHarness, HarnessFactory


@pytest.fixture
def served(make_api: HarnessFactory) -> Iterator[tuple[ApiHarness, str]]:
    api = make_api(token="t0ken")
    server = ApiServer(api.app, "127.0.0.1", 0)
    server.start()
    yield api, server.url
    server.stop()


def cli(url: str, *args: str, token: str | None = "t0ken") -> Result:
    env = {"CONTROLPLANE_API": url, "CONTROLPLANE_API_TOKEN": token or ""}
    return CliRunner().invoke(main, list(args), env=env)


def test_services_table_and_json(served: tuple[ApiHarness, str]) -> None:
    _, url = served
    result = cli(url, "services")
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.split() == ["SERVICE", "METHOD", "SOURCE", "UP", "NGINX", "DATAPLANE", "NAMES"]
    assert row.split() == [
        "web",
        "round_robin",
        "default",
        "2/2",
        "ok",
        "reload",
        "web,web.internal",
    ]
    parsed = json.loads(cli(url, "services", "--json").output)
    assert parsed["services"][0]["name"] == "web"


def test_one_service_shows_its_backends(served: tuple[ApiHarness, str]) -> None:
    _, url = served
    lines = cli(url, "services", "web").output.splitlines()
    assert lines[0] == "service web: round_robin (default)"
    assert lines[2] == (
        "health: tcp connect to its port, until it first passes (timeout 1s), not after; "
        "start period 60s (default)"
    )
    assert re.split(r"\s{2,}", lines[3]) == [
        "CONTAINER",
        "ID",
        "NETWORK",
        "ADDRESS",
        "WEIGHT",
        "STATE",
        "IN NGINX",
        "HEALTH",
        "IN A ROW",
        "LAST",
        "LATENCY",
    ]
    # no check has run: this harness has no gate
    assert lines[4].split()[0] == "w1" and lines[4].split()[-6:] == [
        "up",
        "yes",
        "-",
        "-",
        "-",
        "-",
    ]


def test_algorithm_weight_drain_undrain(served: tuple[ApiHarness, str]) -> None:
    api, url = served
    result = cli(url, "algorithm", "web", "hash", "--key", "$request_uri", "--consistent")
    assert result.exit_code == 0, result.output
    assert "service web: hash $request_uri consistent (override)" in result.output
    assert "nginx running it: lb" in result.output
    assert 'hash "$request_uri" consistent;' in api.config
    assert cli(url, "weight", "web", "w1", "9").exit_code == 0
    assert "weight=9" in api.config
    drained = cli(url, "drain", "web", "w2")
    assert drained.exit_code == 0 and "draining" in drained.output
    assert "172.20.0.3:80 down;" in api.config
    assert cli(url, "undrain", "web", "w2").exit_code == 0
    assert cli(url, "weight", "web", "w1", "--reset").exit_code == 0
    assert cli(url, "algorithm", "web", "--reset").exit_code == 0
    assert api.store.current.algorithms == {} and api.store.current.backends == {}


def test_errors_say_what_to_do(served: tuple[ApiHarness, str]) -> None:
    _, url = served
    unknown = cli(url, "drain", "web", "w9")
    assert unknown.exit_code == 1
    assert "not a backend of service web" in unknown.output and "(HTTP 404)" in unknown.output
    no_token = cli(url, "algorithm", "web", "ip_hash", token=None)
    assert no_token.exit_code == 1 and "set CONTROLPLANE_API_TOKEN" in no_token.output
    usage = cli(url, "algorithm", "web")
    assert usage.exit_code == 2 and "give a METHOD, or --reset" in usage.output


def test_no_api_listening() -> None:
    result = cli(f"http://127.0.0.1:{free_port()}", "services")
    assert result.exit_code == 1
    assert "no controlplane API answers" in result.output and "CONTROLPLANE_API" in result.output


def test_a_taken_port_fails_the_start(served: tuple[ApiHarness, str]) -> None:
    api, url = served
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ControlPlaneError, match=r"could not listen on 127.0.0.1:.*--api-bind"):
        ApiServer(api.app, "127.0.0.1", port)


@pytest.fixture
def not_the_api() -> Iterator[str]:
    """What the CLI met on 8080: nginx's own 404, plain text, with a Server header."""

    class Nginx(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response_only(404)
            self.send_header("Server", "nginx/1.22.1")
            self.end_headers()
            self.wfile.write(b"controlplane: no service here for host 127.0.0.1\n")

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nginx)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_the_api_is_named_as_such(not_the_api: str) -> None:
    result = cli(not_the_api, "services")
    assert result.exit_code == 1
    assert f"{not_the_api} is not a controlplane API (it answered HTTP 404" in result.output
    assert "server 'nginx/1.22.1'" in result.output
    assert "http://127.0.0.1:8081" in result.output


def test_the_api_and_the_cli_agree_on_the_default_port() -> None:
    run = next(p for p in main.commands["run"].params if p.name == "api_bind")
    services = next(p for p in main.commands["services"].params if p.name == "api_url")
    assert run.default == "127.0.0.1:8081"
    assert services.default == "http://127.0.0.1:8081"


def test_a_refused_config_shows_in_services_and_problems(served: tuple[ApiHarness, str]) -> None:
    api, url = served
    api.deployer.refuse = True
    api.set_state(*WEB, container("w3", ip="172.20.0.4"), container("bad", labels={L.WEIGHT: "x"}))
    assert cli(url, "algorithm", "web", "least_conn").exit_code == 1
    row = cli(url, "services").output.splitlines()[1].split()
    assert row[4] == "refused"
    text = cli(url, "services", "web").output
    assert "w3" in text and [line.split()[0] for line in text.splitlines() if "  no  " in line] == [
        "w3"
    ]
    # The version that failed depends on whether the start-up passes came before the change.
    assert re.search(
        r"nginx lb runs version 1, serving 2 of this service's backends; version \d+ refused "
        r"by nginx -t: nginx -t failed",
        text,
    ), text
    problems = cli(url, "problems").output.splitlines()
    assert problems[0].startswith(f"excluded bad from service web: {L.WEIGHT}='x'")
    assert re.fullmatch(r"nginx lb did not take version \d+: nginx -t failed", problems[-1])


def test_create_keeps_a_backend_override_for_a_backend_not_there_yet(
    served: tuple[ApiHarness, str],
) -> None:
    _, url = served
    missing = cli(url, "drain", "web", "w9")
    assert missing.exit_code == 1 and "--create to the CLI command" in missing.output
    assert cli(url, "drain", "web", "w9", "--create").exit_code == 0
    assert cli(url, "weight", "web", "w9", "4", "--create").exit_code == 0
    assert cli(url, "undrain", "web", "w9", "--create").exit_code == 0


def test_health_sets_shows_and_resets_a_check(served: tuple[ApiHarness, str]) -> None:
    api, url = served
    result = cli(
        url,
        "health",
        "web",
        "--path",
        "/healthz",
        "--interval",
        "2s",
        "--timeout",
        "500ms",
        "--fails",
        "3",
        "--passes",
        "2",
        "--status",
        "200-299",
        "--port",
        "8080",
        "--host",
        "app.example.com",
        "--start-period",
        "2m",
    )
    assert result.exit_code == 0, result.output
    expected = (
        "health: http GET /healthz (Host app.example.com) on port 8080, status 200-299, every "
        "2s (timeout 500ms), out after 3 failing in a row, back after 2 passing; start period "
        "120s (api)"
    )
    assert expected in result.output.splitlines()
    assert "saved; version" in result.output
    check = api.store.current.health["web"]
    assert (check.path, check.port, check.interval_ms, check.start_period) == (
        "/healthz",
        8080,
        2000,
        120,
    )
    assert expected in cli(url, "services", "web").output.splitlines()
    shown = json.loads(cli(url, "services", "web", "--json").output)["health"]
    assert shown["source"] == "api" and shown["interval"] == "2s"
    assert cli(url, "health", "web", "--mode", "none").exit_code == 0
    assert "health: none: not checked, served as soon as it runs (api)" in (
        cli(url, "services", "web").output
    )
    reset = cli(url, "health", "web", "--reset")
    assert reset.exit_code == 0 and api.store.current.health == {}
    assert "start period 60s (default)" in reset.output


def test_health_errors_say_what_to_do(served: tuple[ApiHarness, str]) -> None:
    api, url = served
    usage = cli(url, "health", "web")
    assert usage.exit_code == 2 and "give --mode or a check option" in usage.output
    both = cli(url, "health", "web", "--reset", "--fails", "2")
    assert both.exit_code == 2 and "--reset" in both.output
    bad = cli(url, "health", "web", "--interval", "50ms")
    assert bad.exit_code == 1
    assert "interval='50ms' is not a duration from 0.1s to 3600s" in bad.output
    assert "(HTTP 422)" in bad.output
    tcp = cli(url, "health", "web", "--mode", "tcp", "--path", "/x")
    assert tcp.exit_code == 1 and "path applies only to mode http" in tcp.output
    missing = cli(url, "health", "api", "--mode", "tcp")
    assert missing.exit_code == 1 and "--create" in missing.output
    assert api.store.current.health == {}
    created = cli(url, "health", "api", "--mode", "tcp", "--create")
    assert created.exit_code == 0 and "no backend yet" in created.output


def traffic(rps: float, two_xx: int, five_xx: int = 0, p50: float | None = 1.19) -> dict[str, Any]:
    return {
        "rps_10s": rps,
        "rps_1m": rps,
        "requests": {"1xx": 0, "2xx": two_xx, "3xx": 0, "4xx": 2, "5xx": five_xx},
        "connect_errors": 1,
        "p50_ms": p50,
        "p95_ms": None if p50 is None else 4.757,
        "p99_ms": None if p50 is None else 152.2,
        "bytes_sent": 0,
        "bytes_received": 0,
        "per_second": [0] * 60,
    }


def backend(
    name: str, ip: str, figures: dict[str, Any] | None, state: str = "up"
) -> dict[str, Any]:
    return {
        "name": name,
        "network": "app",
        "ip": ip,
        "port": 80,
        "state": state,
        "traffic": figures,
    }


WEB_SERVICE = {
    "name": "web",
    "traffic": traffic(12.34, 700, 3),
    "backends": [
        backend("w1", "172.20.0.2", traffic(6.2, 350)),
        backend("w2", "fd00::3", traffic(6.1, 350, 3, p50=None), state="draining"),
    ],
}


class FakeApi:
    """The API as `top` calls it: canned replies by path, each call recorded."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.calls: list[str] = []

    def call(self, method: str, path: str) -> Any:
        assert method == "GET"
        self.calls.append(path)
        found = self.replies[path]
        if isinstance(found, Exception):
            raise found
        return found


def cells(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in text.splitlines()]


def test_top_shows_each_service() -> None:
    quiet = {"name": "api", "traffic": None, "backends": [backend("a1", "172.20.0.9", None)]}
    api = FakeApi({"/api/v1/services": {"services": [quiet, WEB_SERVICE]}})
    assert cells(top_text(api, None)) == [
        ["SERVICE", "REQ/S", "2XX", "4XX", "5XX", "CONN ERR", "P50", "P95", "P99", "STATE"],
        ["api", "-", "-", "-", "-", "-", "-", "-", "-", "1/1 up"],
        ["web", "12.3", "700", "2", "3", "1", "1.19ms", "4.76ms", "152ms", "1/2 up"],
    ]
    assert api.calls == ["/api/v1/services"]


def test_top_of_a_service_shows_each_backend() -> None:
    api = FakeApi({"/api/v1/services/web": WEB_SERVICE})
    lines = top_text(api, "web").splitlines()
    assert lines[0] == (
        "service web: 1/2 up; req/s 12.3, 2xx 700, 4xx 2, 5xx 3, conn err 1, p50 1.19ms, "
        "p95 4.76ms, p99 152ms"
    )
    assert cells("\n".join(lines[1:])) == [
        ["CONTAINER", "NETWORK", "ADDRESS", *TOP_FIGURES, "STATE"],
        [
            "w1",
            "app",
            "172.20.0.2:80",
            "6.2",
            "350",
            "2",
            "0",
            "1",
            "1.19ms",
            "4.76ms",
            "152ms",
            "up",
        ],
        ["w2", "app", "[fd00::3]:80", "6.1", "350", "2", "3", "1", "-", "-", "-", "draining"],
    ]


def test_top_says_when_there_are_no_figures() -> None:
    quiet = {"name": "api", "traffic": None, "backends": [backend("a1", "172.20.0.9", None)]}
    api = FakeApi({"/api/v1/services": {"services": [quiet]}, "/api/v1/services/api": quiet})
    assert top_text(api, None).splitlines()[-1] == NO_FIGURES
    assert top_text(api, "api").splitlines()[-1] == NO_FIGURES
    assert top_text(FakeApi({"/api/v1/services": {"services": []}}), None) == "no services"


def test_top_once_and_when_not_a_tty_prints_one_screen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = FakeApi({"/api/v1/services/web": WEB_SERVICE})
    monkeypatch.setattr(cli_client, "_client", lambda url, timeout: api)
    for args in (["top", "web", "--once"], ["top", "web", "--interval", "0.5"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert re.fullmatch(
            r"controlplane top: service web, every \S+s, \d\d:\d\d:\d\d .*", lines[0]
        )
        assert lines[1].startswith("service web: 1/2 up; req/s 12.3")
        assert "\x1b" not in result.output
    assert api.calls == ["/api/v1/services/web"] * 2


def test_top_against_the_api_says_what_is_wrong(served: tuple[ApiHarness, str]) -> None:
    _, url = served
    result = cli(url, "top", "--once")
    assert result.exit_code == 0, result.output
    assert cells(result.output)[2] == ["web", *["-"] * 8, "2/2 up"]
    assert result.output.splitlines()[-1] == NO_FIGURES
    unknown = cli(url, "top", "nope")
    assert unknown.exit_code == 1 and "no service nope" in unknown.output
    gone = cli(f"http://127.0.0.1:{free_port()}", "top")
    assert gone.exit_code == 1 and "no controlplane API answers" in gone.output


def test_watch_redraws_each_interval_cut_to_the_terminal_until_ctrl_c() -> None:
    frames = iter(["second\nrow", "third"])
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise KeyboardInterrupt

    out = io.StringIO()
    watch(
        "first line that is long\n2\n3\n4",
        lambda: next(frames),
        1.0,
        out,
        sleep,
        lambda: os.terminal_size((10, 3)),
    )
    assert out.getvalue() == (
        f"{CLEAR}first line\n2\n" + f"{CLEAR}second\nrow\n" + f"{CLEAR}third\n"
    )
    assert len(slept) == 3 and all(0.9 < s <= 1.0 for s in slept)


def test_top_keeps_polling_through_an_api_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal a failed poll is shown in place of the table, and the next one is tried."""
    api = FakeApi({"/api/v1/services": {"services": [WEB_SERVICE]}})
    drawn: list[str] = []

    def fake_watch(first: str, frame: Callable[[], str], *_: object) -> None:
        drawn.append(first)
        api.replies["/api/v1/services"] = ApiClientError("no controlplane API answers at x")
        drawn.append(frame())

    monkeypatch.setattr(cli_client, "_client", lambda url, timeout: api)
    monkeypatch.setattr(cli_client, "watch", fake_watch)
    monkeypatch.setattr(cli_client, "_on_terminal", lambda: True)
    result = CliRunner().invoke(main, ["top"])
    assert result.exit_code == 0, result.output
    assert "web" in drawn[0]
    assert drawn[1].splitlines()[1:] == [
        "no controlplane API answers at x",
        "(trying again every 1s)",
    ]
