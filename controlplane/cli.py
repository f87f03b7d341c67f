"""The `controlplane` command: run the controller, or print what it would render."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from controlplane.cli_client import COMMANDS
from controlplane.core import labels as L
from controlplane.errors import ControlPlaneError, InvalidValue
from controlplane.settings import DEFAULT_API_PORT, IpNetwork, Settings
from controlplane.wiring import build_controller, render_once

F = TypeVar("F", bound=Callable[..., Any])


def _networks(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> frozenset[str] | None:
    try:
        return frozenset(L.parse_network(v) for v in value) or None
    except InvalidValue as error:
        raise click.BadParameter(str(error)) from error


def _domain(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    domain = value.strip().lower().strip(".")
    if not L.HOST_RE.fullmatch(domain) or domain.startswith("*"):
        raise click.BadParameter(f"{value!r} is not a DNS domain such as internal or svc.example")
    return domain


def _cidrs(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> tuple[IpNetwork, ...] | None:
    try:
        return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in value) or None
    except ValueError as error:
        raise click.BadParameter(f"{error}: use CIDRs such as 10.0.0.0/8 or ::1/128") from error


def default_state_dir() -> Path:
    """Root (as in the container image) keeps state under /var/lib; a user under XDG."""
    if os.geteuid() == 0:
        return Path("/var/lib/controlplane")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "controlplane"


def _state_dir(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path:
    return value if value is not None else default_state_dir()


STATE_DIR_OPTION = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CONTROLPLANE_STATE_DIR",
    default=None,
    callback=_state_dir,
    help="Where the API's overrides persist (env CONTROLPLANE_STATE_DIR). "
    "Default: /var/lib/controlplane as root, else $XDG_STATE_HOME/controlplane.",
)


def discovery_options(command: F) -> F:
    """Flags shared by every command that reads Docker and renders."""
    options = [
        click.option(
            "--docker-url",
            default=None,
            help="Docker engine URL. Default: DOCKER_HOST (with DOCKER_TLS_VERIFY and "
            "DOCKER_CERT_PATH) or the local socket.",
        ),
        click.option(
            "--network",
            "networks",
            multiple=True,
            callback=_networks,
            help="Watch only this network (repeatable). Default: all user-defined bridge networks.",
        ),
        click.option(
            "--domain",
            default="internal",
            show_default=True,
            callback=_domain,
            help="Services answer to NAME and NAME.DOMAIN.",
        ),
        click.option(
            "--listen-port",
            default=80,
            show_default=True,
            type=click.IntRange(1, 65535),
            help="Port the rendered nginx server blocks listen on.",
        ),
        click.option(
            "--reuseport/--no-reuseport",
            default=True,
            show_default=True,
            help="Listen with reuseport: after a reload, new connections reach the new nginx "
            "workers at once instead of ~100 ms later. Turn off if another server block of "
            "yours sets options on the same port.",
        ),
        click.option(
            "--names-hash/--no-names-hash",
            default=True,
            show_default=True,
            help="Size nginx's server-names hash (server_names_hash_bucket_size and _max_size) "
            "for the host names rendered. Turn off if your nginx.conf sets them.",
        ),
        click.option(
            "--upstream-header/--no-upstream-header",
            default=False,
            show_default=True,
            help="Add X-Controlplane-Upstream (the backend's address) to every proxied reply, "
            "to see which backend answered. It shows clients internal addresses.",
        ),
        click.option(
            "--templates",
            "templates_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Directory whose templates override the shipped ones.",
        ),
        click.option(
            "--log-level",
            default="info",
            show_default=True,
            type=click.Choice(["debug", "info", "warning", "error"]),
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="controlplane")
def main() -> None:
    """Load balancer and service-discovery control plane for Docker."""


@main.command()
@discovery_options
@click.option(
    "--debounce",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 10),
    help="Seconds of quiet in the event stream before a reconcile.",
)
@click.option(
    "--debounce-max",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 60),
    help="A reconcile runs at most this many seconds after the first event of a burst.",
)
@click.option(
    "--batch-quiet",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.05, 60),
    help="During a scale-out, new backends of a service that already serves are held until "
    "Docker has been quiet this many seconds (a leaving backend is never held).",
)
@click.option(
    "--batch-max",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, 300),
    help="Seconds a held new backend waits at most; 0 holds nothing.",
)
@click.option(
    "--nginx-shell/--no-nginx-shell",
    default=True,
    show_default=True,
    help="Deploy through a shell kept open in each nginx that has /bin/sh (~10 ms), instead of "
    "the engine's copy, exec and kill calls (~180 ms on dockerd 20.10).",
)
@click.option(
    "--retire-old-workers/--no-retire-old-workers",
    default=True,
    show_default=True,
    help="After a reload through the shell, tell nginx's old workers to quit as soon as the new "
    "ones are up (~10 ms), instead of the 100 ms nginx waits; until then the old workers route "
    "by the old config.",
)
@click.option(
    "--resync",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1, 86400),
    help="Seconds between full resyncs that repair missed events.",
)
@click.option(
    "--dns-bind",
    "dns_binds",
    multiple=True,
    help="Answer DNS on IP:PORT, UDP and TCP (repeatable). Default: no DNS server.",
)
@click.option(
    "--dns-domain",
    default=None,
    callback=lambda ctx, param, value: None if value is None else _domain(ctx, param, value),
    help="Zone the resolver answers for. Default: the --domain value.",
)
@click.option("--dns-ttl", default=5, show_default=True, type=click.IntRange(0, 86400))
@click.option(
    "--dns-upstream",
    "dns_upstreams",
    multiple=True,
    help="Forward names outside the zone to IP:PORT (repeatable, tried in order).",
)
@click.option(
    "--dns-allow",
    "dns_allow",
    multiple=True,
    callback=_cidrs,
    help="CIDR allowed to use forwarding (repeatable). Default: loopback and watched networks.",
)
@click.option(
    "--api-bind",
    default=f"127.0.0.1:{DEFAULT_API_PORT}",
    show_default=True,
    help="IP:PORT of the REST API, or 'off'. Off loopback it needs --api-token or --insecure.",
)
@click.option(
    "--api-token",
    envvar="CONTROLPLANE_API_TOKEN",
    default=None,
    help="Bearer token every mutating API request must carry (env CONTROLPLANE_API_TOKEN, "
    "which keeps it out of `ps`).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve the API off loopback without a token (only on a network you trust).",
)
@STATE_DIR_OPTION
def run(
    docker_url: str | None,
    networks: frozenset[str] | None,
    domain: str,
    listen_port: int,
    reuseport: bool,
    names_hash: bool,
    upstream_header: bool,
    templates_dir: Path | None,
    log_level: str,
    debounce: float,
    debounce_max: float,
    batch_quiet: float,
    batch_max: float,
    nginx_shell: bool,
    retire_old_workers: bool,
    resync: float,
    dns_binds: tuple[str, ...],
    dns_domain: str | None,
    dns_ttl: int,
    dns_upstreams: tuple[str, ...],
    dns_allow: tuple[IpNetwork, ...] | None,
    api_bind: str,
    api_token: str | None,
    insecure: bool,
    state_dir: Path,
) -> None:
    """Watch Docker and keep every managed nginx serving the live backends."""
    _setup_logging(log_level)
    settings = Settings(
        docker_url=docker_url,
        networks=networks,
        domain=domain,
        listen_port=listen_port,
        reuseport=reuseport,
        names_hash=names_hash,
        upstream_header=upstream_header,
        templates_dir=templates_dir,
        quiet_window=debounce,
        max_wait=max(debounce, debounce_max),
        batch_quiet=batch_quiet,
        batch_max=batch_max,
        nginx_shell=nginx_shell,
        retire_old_workers=retire_old_workers,
        resync_interval=resync,
        dns_binds=dns_binds,
        dns_domain=dns_domain or domain,
        dns_ttl=dns_ttl,
        dns_upstreams=dns_upstreams,
        dns_allow=dns_allow,
        api_bind=None if api_bind.strip().lower() == "off" else api_bind,
        api_token=api_token or None,
        insecure=insecure,
        state_dir=state_dir,
    )
    try:
        controller = build_controller(settings)
        controller.start_servers()
    except ControlPlaneError as error:
        raise click.ClickException(str(error)) from error
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: controller.loop.stop())
    logging.getLogger("controlplane").info("controlplane running; watching Docker events")
    try:
        controller.loop.run()
    finally:
        controller.close()


@main.command()
@discovery_options
@STATE_DIR_OPTION
def render(
    docker_url: str | None,
    networks: frozenset[str] | None,
    domain: str,
    listen_port: int,
    reuseport: bool,
    names_hash: bool,
    upstream_header: bool,
    templates_dir: Path | None,
    log_level: str,
    state_dir: Path,
) -> None:
    """Print the nginx config the current Docker state gives, with the persisted overrides;
    changes nothing."""
    _setup_logging(log_level)
    settings = Settings(
        docker_url=docker_url,
        networks=networks,
        domain=domain,
        listen_port=listen_port,
        reuseport=reuseport,
        names_hash=names_hash,
        upstream_header=upstream_header,
        templates_dir=templates_dir,
        state_dir=state_dir,
    )
    try:
        click.echo(render_once(settings), nl=False)
    except ControlPlaneError as error:
        raise click.ClickException(str(error)) from error


for _command in COMMANDS:
    main.add_command(_command)
