"""The CLI commands that talk to a running controller through its API: readable tables by
default, the API's JSON with --json; `top` polls it and redraws."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO, TypeVar

import click

from controlplane.api.bodies import Algorithm
from controlplane.api_client import DEFAULT_URL, ApiClient
from controlplane.core.model import HealthMode, Method
from controlplane.core.overrides import HEALTH_FIELDS, HealthSpec, describe_health
from controlplane.errors import ControlPlaneError

F = TypeVar("F", bound=Callable[..., Any])
TOKEN_ENV = "CONTROLPLANE_API_TOKEN"


def api_option(command: F) -> F:
    return click.option(
        "--api",
        "api_url",
        envvar="CONTROLPLANE_API",
        default=DEFAULT_URL,
        show_default=True,
        help=f"URL of the controller's API (env CONTROLPLANE_API; token from {TOKEN_ENV}).",
    )(command)


def client_options(command: F) -> F:
    command = click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON reply, for scripts."
    )(command)
    return api_option(command)


def _client(api_url: str, timeout: float = 30.0) -> ApiClient:
    return ApiClient(api_url, os.environ.get(TOKEN_ENV) or None, timeout)


def _call(api_url: str, method: str, path: str, body: object = None, **query: str) -> Any:
    try:
        return _client(api_url).call(method, path, body, query or None)
    except ControlPlaneError as error:
        raise click.ClickException(str(error)) from error


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def describe(algorithm: dict[str, Any]) -> str:
    """The API's algorithm object, read by the API's own model and written the way the
    core's model writes it (fields a newer API may add are left out)."""
    fields = {k: v for k, v in algorithm.items() if k in Algorithm.model_fields}
    return str(Algorithm.model_validate(fields).to_core())


def nginx_summary(service: dict[str, Any]) -> str:
    """One word for what the managed nginx run against what is wanted for this service."""
    states = service.get("nginx") or []
    if not states:
        return "-"
    if any(n["failure"] and n["failure"]["refused"] and n["in_sync"] is False for n in states):
        return "refused"
    if any(n["in_sync"] is False for n in states):
        return "behind"
    return "ok" if all(n["in_sync"] for n in states) else "?"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def services_table(services: list[dict[str, Any]]) -> str:
    rows = [
        (
            s["name"],
            describe(s["algorithm"]),
            s["algorithm_source"],
            f"{sum(b['state'] == 'up' for b in s['backends'])}/{len(s['backends'])}",
            nginx_summary(s),
            dataplanes(s),
            ",".join(s["hosts"]) or "-",
        )
        for s in services
    ]
    return table(("SERVICE", "METHOD", "SOURCE", "UP", "NGINX", "DATAPLANE", "NAMES"), rows)


def dataplanes(service: dict[str, Any]) -> str:
    """How its nginx get backends: dynamic (pushed, no reload), reload, or both."""
    found = sorted({n.get("dataplane") or "?" for n in service.get("nginx") or []})
    return ",".join(found) or "-"


def nginx_lines(service: dict[str, Any]) -> list[str]:
    """The nginx that do not run what the controller wants for this service, and why."""
    lines = []
    for n in service.get("nginx") or []:
        if n["in_sync"] is not False:
            continue
        line = (
            f"nginx {n['name']} runs version {n['version']}, serving {n['serving']} of this "
            "service's backends"
        )
        failure = n["failure"]
        if failure:
            verdict = "refused by nginx -t" if failure["refused"] else "not deployed"
            line += f"; version {failure['version']} {verdict}: {failure['error']}"
        lines.append(line)
    return lines


def describe_check(health: dict[str, Any]) -> str:
    """The API's health object in one line, with where it comes from."""
    spec = HealthSpec(**{f: health.get(f) for f in HEALTH_FIELDS})
    return f"{describe_health(spec, bool(health.get('active')))} ({health.get('source')})"


def _latency(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.2f}ms" if ms < 10 else f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"


def _streak(health: dict[str, Any]) -> str:
    """Passes or failures in a row (a probe resets the other count)."""
    if health["fails"]:
        return f"{health['fails']} failed"
    if health["passes"]:
        return f"{health['passes']} passed"
    return "-"


def _health_cells(health: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """HEALTH, IN A ROW, LAST, LATENCY; dashes for a backend not checked."""
    if health is None:
        return ("-", "-", "-", "-")
    return (
        health["state"],
        _streak(health),
        health["last"] or "-",
        _latency(health["last_latency_ms"]),
    )


def service_text(service: dict[str, Any]) -> str:
    lines = [
        f"service {service['name']}: {describe(service['algorithm'])} "
        f"({service['algorithm_source']})"
        + ("" if service["exists"] else " - no backend yet, overrides kept for when it appears"),
        f"names: {', '.join(service['hosts']) or '-'}",
    ]
    if service.get("health"):
        lines.append(f"health: {describe_check(service['health'])}")
    if service["backends"]:
        lines.append(
            table(
                (
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
                ),
                [
                    (
                        b["name"],
                        b["container"][:12],
                        b["network"],
                        f"{b['ip']}:{b['port']}",
                        f"{b['weight']}{' backup' if b['backup'] else ''}",
                        b["state"],
                        _yes_no(b.get("in_nginx")),
                        *_health_cells(b.get("health")),
                    )
                    for b in service["backends"]
                ],
            )
        )
    lines.extend(
        f"{b['name']} ({b['network']}) is {b['state']}: {b['reason']}"
        for b in service["backends"]
        if b.get("reason")
    )
    lines.extend(nginx_lines(service))
    lines.extend(f"excluded {e['container']}: {e['reason']}" for e in service["excluded"])
    lines.extend(f"warning: {w}" for w in service["warnings"])
    return "\n".join(lines)


def _show_change(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    else:
        click.echo(service_text(reply))
        applied = reply["applied"]
        running = ", ".join(applied["reloaded"]) or "none yet"
        click.echo(f"saved; version {applied['version']}, nginx running it: {running}")
    if reply["applied"]["errors"]:
        raise click.ClickException(
            "saved, but not applied everywhere: " + "; ".join(reply["applied"]["errors"])
        )


@click.command()
@click.argument("name", required=False)
@client_options
def services(name: str | None, api_url: str, as_json: bool) -> None:
    """List services, or show one with its backends."""
    if name:
        reply = _call(api_url, "GET", f"/api/v1/services/{name}")
        click.echo(json.dumps(reply, indent=2) if as_json else service_text(reply))
        return
    reply = _call(api_url, "GET", "/api/v1/services")
    click.echo(json.dumps(reply, indent=2) if as_json else services_table(reply["services"]))


CREATE_OPTION = click.option(
    "--create", is_flag=True, help="Keep it even if the service or backend does not exist yet."
)


@click.command()
@click.argument("service")
@click.argument(
    "method",
    required=False,
    type=click.Choice([m.value for m in Method]),
)
@click.option("--key", help="Hash key for method hash, e.g. '$request_uri'.")
@click.option("--consistent", is_flag=True, help="Method hash: ketama consistent hashing.")
@click.option("--two", is_flag=True, help="Method random: pick two, send to the less loaded.")
@click.option("--reset", is_flag=True, help="Drop the override: labels decide again.")
@CREATE_OPTION
@client_options
def algorithm(
    service: str,
    method: str | None,
    key: str | None,
    consistent: bool,
    two: bool,
    reset: bool,
    create: bool,
    api_url: str,
    as_json: bool,
) -> None:
    """Set a service's balancing method (persisted; beats labels)."""
    path = f"/api/v1/services/{service}/algorithm"
    if reset == (method is not None):
        raise click.UsageError("give a METHOD, or --reset to drop the override")
    if reset:
        reply = _call(api_url, "DELETE", path, wait="true")
    else:
        body = {"method": method, "key": key, "consistent": consistent, "two": two}
        extra = {"create": "true"} if create else {}
        reply = _call(api_url, "PUT", path, body, wait="true", **extra)
    _show_change(reply, as_json)


@click.command()
@click.argument("service")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in HealthMode]),
    help="tcp: a connect to the port; http: a GET whose status must be in range (implied by "
    "--path, --host or --status); none: not checked.",
)
@click.option("--path", help="http: the path to GET (default /).")
@click.option("--port", type=int, help="The port to check (default: the backend's).")
@click.option("--host", help="http: the Host header (default: the backend's address).")
@click.option("--status", help="http: the statuses that pass, NNN or LOW-HIGH (default 200-399).")
@click.option("--interval", help="How often each backend is checked, e.g. 500ms, 5s (default 5s).")
@click.option("--timeout", help="How long a probe may take, e.g. 500ms (default 1s).")
@click.option("--fails", type=int, help="Failures in a row that take a backend out (default 3).")
@click.option("--passes", type=int, help="Passes in a row that bring it back (default 2).")
@click.option(
    "--start-period", help="How long a new backend has to pass, e.g. 30s, 2m (default 60s)."
)
@click.option("--reset", is_flag=True, help="Drop the override: labels decide again.")
@CREATE_OPTION
@client_options
def health(
    service: str, reset: bool, create: bool, api_url: str, as_json: bool, **fields: Any
) -> None:
    """Set a service's health check (persisted; beats labels): checked for as long as a
    backend runs, unless --mode none."""
    path = f"/api/v1/services/{service}/health"
    given = {name: value for name, value in fields.items() if value is not None}
    if reset == bool(given):
        raise click.UsageError(
            "give --mode or a check option (e.g. --mode http --path /healthz), or --reset to "
            "drop the override"
        )
    if reset:
        reply = _call(api_url, "DELETE", path, wait="true")
    else:
        extra = {"create": "true"} if create else {}
        reply = _call(api_url, "PUT", path, given, wait="true", **extra)
    _show_change(reply, as_json)


def _patch(
    api_url: str, service: str, container: str, body: dict[str, object], create: bool
) -> Any:
    path = f"/api/v1/services/{service}/backends/{container}"
    extra = {"create": "true"} if create else {}
    return _call(api_url, "PATCH", path, body, wait="true", **extra)


@click.command()
@click.argument("service")
@click.argument("container")
@click.argument("weight", required=False, type=click.IntRange(1, 1000))
@click.option("--reset", is_flag=True, help="Drop the weight override: the label decides.")
@CREATE_OPTION
@client_options
def weight(
    service: str,
    container: str,
    weight: int | None,
    reset: bool,
    create: bool,
    api_url: str,
    as_json: bool,
) -> None:
    """Set a backend's weight (1-1000), by container name or ID."""
    if reset == (weight is not None):
        raise click.UsageError("give a WEIGHT, or --reset to drop the override")
    _show_change(_patch(api_url, service, container, {"weight": weight}, create), as_json)


@click.command()
@click.argument("service")
@click.argument("container")
@CREATE_OPTION
@client_options
def drain(service: str, container: str, create: bool, api_url: str, as_json: bool) -> None:
    """Send a backend no new requests (and leave it out of DNS) until undrained."""
    _show_change(_patch(api_url, service, container, {"drain": True}, create), as_json)


@click.command()
@click.argument("service")
@click.argument("container")
@CREATE_OPTION
@client_options
def undrain(service: str, container: str, create: bool, api_url: str, as_json: bool) -> None:
    """Give a drained backend traffic again."""
    _show_change(_patch(api_url, service, container, {"drain": False}, create), as_json)


def problems_text(reply: dict[str, Any]) -> str:
    lines = [
        f"excluded {e['container']}"
        + (f" from service {e['service']}" if e["service"] else "")
        + f": {e['reason']}"
        for e in reply["excluded"]
    ]
    lines.extend(
        "warning" + (f" (service {w['service']})" if w["service"] else "") + f": {w['warning']}"
        for w in reply["warnings"]
    )
    lines.extend(
        f"nginx {n['name']} did not take version {n['failure']['version']}: {n['failure']['error']}"
        for n in reply["nginx"]
    )
    return "\n".join(lines) or f"no problems (version {reply['version']})"


@click.command()
@client_options
def problems(api_url: str, as_json: bool) -> None:
    """Every container left out (with the reason), every warning, and each nginx that did
    not take the current config."""
    reply = _call(api_url, "GET", "/api/v1/problems")
    click.echo(json.dumps(reply, indent=2) if as_json else problems_text(reply))


class Caller(Protocol):
    """What `top` asks of the API (ApiClient; a fake in tests)."""

    def call(self, method: str, path: str) -> Any: ...


TOP_FIGURES = ("REQ/S", "2XX", "4XX", "5XX", "CONN ERR", "P50", "P95", "P99")
NO_FIGURES = (
    "no traffic figures: nothing reported in the last minute, or the controller runs with "
    "--no-stats"
)


def traffic_cells(traffic: dict[str, Any] | None) -> tuple[str, ...]:
    """TOP_FIGURES of an API traffic object: requests per second over 10 s, the rest over
    the last minute; dashes for none."""
    if traffic is None:
        return ("-",) * len(TOP_FIGURES)
    requests = traffic["requests"]
    return (
        f"{traffic['rps_10s']:.1f}",
        str(requests["2xx"]),
        str(requests["4xx"]),
        str(requests["5xx"]),
        str(traffic["connect_errors"]),
        _latency(traffic["p50_ms"]),
        _latency(traffic["p95_ms"]),
        _latency(traffic["p99_ms"]),
    )


def _up(service: dict[str, Any]) -> str:
    backends = service["backends"]
    return f"{sum(b['state'] == 'up' for b in backends)}/{len(backends)} up"


def top_text(api: Caller, service: str | None) -> str:
    """One screen of `top`: each service's figures, or with `service`, the service's and
    each of its backends' (one row per network it is on)."""
    if service is None:
        services = api.call("GET", "/api/v1/services")["services"]
        lines = [
            table(
                ("SERVICE", *TOP_FIGURES, "STATE"),
                [(s["name"], *traffic_cells(s["traffic"]), _up(s)) for s in services],
            )
            if services
            else "no services"
        ]
        if services and all(s["traffic"] is None for s in services):
            lines.append(NO_FIGURES)
        return "\n".join(lines)
    found = api.call("GET", f"/api/v1/services/{service}")
    whole = dict(zip(TOP_FIGURES, traffic_cells(found["traffic"]), strict=True))
    lines = [
        f"service {found['name']}: {_up(found)}; "
        + ", ".join(f"{name.lower()} {value}" for name, value in whole.items())
    ]
    backends = found["backends"]
    if backends:
        lines.append(
            table(
                ("CONTAINER", "NETWORK", "ADDRESS", *TOP_FIGURES, "STATE"),
                [
                    (
                        b["name"],
                        b["network"],
                        _address(b),
                        *traffic_cells(b["traffic"]),
                        b["state"],
                    )
                    for b in backends
                ],
            )
        )
    if found["traffic"] is None and all(b["traffic"] is None for b in backends):
        lines.append(NO_FIGURES)
    return "\n".join(lines)


def _address(backend: dict[str, Any]) -> str:
    ip = backend["ip"]
    return f"[{ip}]:{backend['port']}" if ":" in ip else f"{ip}:{backend['port']}"


CLEAR = "\x1b[H\x1b[2J"
"""Cursor home, then clear the screen: each frame is drawn from the top."""


def watch(
    first: str,
    frame: Callable[[], str],
    interval: float,
    out: TextIO,
    sleep: Callable[[float], None] = time.sleep,
    size: Callable[[], os.terminal_size] = shutil.get_terminal_size,
) -> None:
    """Draws `first`, then a new frame every `interval` seconds until Ctrl-C, each cut to the
    terminal so it never scrolls."""
    text = first
    try:
        while True:
            started = time.monotonic()
            columns, rows = size()
            lines = [line[:columns] for line in text.splitlines()[: max(1, rows - 1)]]
            out.write(CLEAR + "\n".join(lines) + "\n")
            out.flush()
            sleep(max(0.0, interval - (time.monotonic() - started)))
            text = frame()
    except KeyboardInterrupt:
        return


def _on_terminal() -> bool:
    return sys.stdout.isatty()


def _top_header(service: str | None, interval: float) -> str:
    scope = f"service {service}" if service else "every service"
    return (
        f"controlplane top: {scope}, every {interval:g}s, {time.strftime('%H:%M:%S')} "
        "(req/s over 10 s, the rest over 1 min)"
    )


@click.command()
@click.argument("service", required=False)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one screen and exit (also when not a TTY).")
@api_option
def top(service: str | None, interval: float, once: bool, api_url: str) -> None:
    """Live traffic per service, or per backend of SERVICE: requests per second, status
    classes, connect errors and response times, as nginx reports them. Redraws every
    --interval on a terminal; Ctrl-C exits."""
    api = _client(api_url, timeout=max(5.0, interval))

    def screen() -> str:
        return _top_header(service, interval) + "\n" + top_text(api, service)

    try:
        first = screen()
    except ControlPlaneError as error:
        raise click.ClickException(str(error)) from error
    if once or not _on_terminal():
        click.echo(first)
        return

    def frame() -> str:
        try:
            return screen()
        except ControlPlaneError as error:
            return f"{_top_header(service, interval)}\n{error}\n(trying again every {interval:g}s)"

    watch(first, frame, interval, sys.stdout)


COMMANDS = (services, problems, algorithm, health, weight, drain, undrain, top)
