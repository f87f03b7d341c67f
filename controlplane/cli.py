"""The `controlplane` command: run the controller, or print what it would render.

Each flag of `run` and `render` is declared once, with the Settings field it fills, and is read
from the environment when not given (--dns-bind from CONTROLPLANE_DNS_BIND); the command
passes the values on as they are, and Settings refuses a wrong combination.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from controlplane.addresses import parse_address
from controlplane.cli_client import COMMANDS
from controlplane.core import labels as L
from controlplane.core.model import DataPlane
from controlplane.core.render import MAX_STATS_SAMPLE
from controlplane.dns_process import DnsOptions, serve
from controlplane.errors import ControlPlaneError, InvalidValue
from controlplane.settings import DEFAULT_API_PORT, IpNetwork, Settings
from controlplane.wiring import build_controller, render_once

F = TypeVar("F", bound=Callable[..., Any])
LOG_LEVELS = ["debug", "info", "warning", "error"]


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


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def setting(field: str, flag: str, **options: Any) -> Decorator:
    """A flag for Settings.`field`, also read from the environment: --dns-bind from
    CONTROLPLANE_DNS_BIND."""
    options.setdefault("show_default", options.get("default") is not None)
    env = "CONTROLPLANE_" + flag.split("/")[0].removeprefix("--").replace("-", "_").upper()
    return click.option(flag, field, envvar=env, show_envvar=True, **options)


STATE_DIR_OPTION = setting(
    "state_dir",
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    callback=_state_dir,
    help="Where the API's overrides persist. "
    "Default: /var/lib/controlplane as root, else $XDG_STATE_HOME/controlplane.",
)

DISCOVERY: list[Decorator] = [
    setting(
        "docker_url",
        "--docker-url",
        default=None,
        help="Docker engine URL. Default: DOCKER_HOST (with DOCKER_TLS_VERIFY and "
        "DOCKER_CERT_PATH) or the local socket.",
    ),
    setting(
        "networks",
        "--network",
        multiple=True,
        callback=_networks,
        help="Watch only this network (repeatable; in the environment, separated by spaces). "
        "Default: all user-defined bridge networks, and the overlay networks a managed nginx "
        "is attached to.",
    ),
    setting(
        "domain",
        "--domain",
        default="internal",
        callback=_domain,
        help="Services answer to NAME and NAME.DOMAIN.",
    ),
    setting(
        "listen_port",
        "--listen-port",
        default=80,
        type=click.IntRange(1, 65535),
        help="Port the rendered nginx server blocks listen on.",
    ),
    setting(
        "reuseport",
        "--reuseport/--no-reuseport",
        default=True,
        help="Listen with reuseport: after a reload, new connections reach the new nginx "
        "workers at once instead of ~100 ms later. Turn off if another server block of "
        "yours sets options on the same port.",
    ),
    setting(
        "names_hash",
        "--names-hash/--no-names-hash",
        default=True,
        help="Size nginx's server-names hash (server_names_hash_bucket_size and _max_size) "
        "for the host names rendered. Turn off if your nginx.conf sets them.",
    ),
    setting(
        "upstream_header",
        "--upstream-header/--no-upstream-header",
        default=False,
        help="Add X-Controlplane-Upstream (the backend's address) to every proxied reply, "
        "to see which backend answered. It shows clients internal addresses.",
    ),
    setting(
        "keepalive",
        "--upstream-keepalive",
        default=32,
        type=click.IntRange(1, 10000),
        help="Idle connections to its backends each nginx worker keeps per upstream.",
    ),
    setting(
        "templates_dir",
        "--templates",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Directory whose templates override the shipped ones.",
    ),
    STATE_DIR_OPTION,
    click.option(
        "--log-level",
        envvar="CONTROLPLANE_LOG_LEVEL",
        show_envvar=True,
        default="info",
        show_default=True,
        type=click.Choice(LOG_LEVELS),
    ),
]

RUN: list[Decorator] = [
    setting(
        "quiet_window",
        "--debounce",
        default=0.05,
        type=click.FloatRange(0, 10),
        help="Seconds of quiet in the event stream before a reconcile.",
    ),
    setting(
        "max_wait",
        "--debounce-max",
        default=1.0,
        type=click.FloatRange(0, 60),
        help="A reconcile runs at most this many seconds after the first event of a burst "
        "(at least --debounce).",
    ),
    setting(
        "batch_quiet",
        "--batch-quiet",
        default=2.0,
        type=click.FloatRange(0.05, 60),
        help="During a scale-out, new backends of a service that already serves are held "
        "until Docker has been quiet this many seconds (a leaving backend is never held).",
    ),
    setting(
        "batch_max",
        "--batch-max",
        default=10.0,
        type=click.FloatRange(0, 300),
        help="Seconds a held new backend waits at most (0 holds nothing, else at least "
        "--batch-quiet).",
    ),
    setting(
        "dataplane",
        "--dataplane",
        default="auto",
        type=click.Choice([m.value for m in DataPlane]),
        callback=lambda ctx, param, value: DataPlane(value),
        help="How nginx gets its backends, unless its controlplane.dataplane label says: "
        "dynamic (a Lua balancer fed without reloads; needs lua-nginx-module, e.g. "
        "OpenResty), reload (rendered into the config, any nginx), auto (dynamic where "
        "nginx has Lua).",
    ),
    setting(
        "nginx_shell",
        "--nginx-shell/--no-nginx-shell",
        default=True,
        help="Deploy through a shell kept open in each nginx that has /bin/sh (~10 ms), "
        "instead of the engine's copy, exec and kill calls (~180 ms on dockerd 20.10).",
    ),
    setting(
        "retire_old_workers",
        "--retire-old-workers/--no-retire-old-workers",
        default=True,
        help="After a reload through the shell, tell nginx's old workers to quit as soon as "
        "the new ones are up (~10 ms), instead of the 100 ms nginx waits; until then the old "
        "workers route by the old config.",
    ),
    setting(
        "readiness_wait",
        "--readiness-wait",
        default=0.025,
        type=click.FloatRange(0, 1),
        help="Seconds a reconcile waits at most for the first probe of its new backends, so "
        "one that already listens gets traffic in that reconcile; the others are probed every "
        "~50 ms and join as soon as their port accepts a connection.",
    ),
    setting(
        "stats",
        "--stats/--no-stats",
        default=True,
        help="Collect traffic figures from every managed nginx (per service and backend, in "
        "the API, the metrics and the dashboard): nginx sends them over UDP to this "
        "controller.",
    ),
    setting(
        "stats_bind",
        "--stats-bind",
        default="0.0.0.0:0",
        help="IP:PORT of the UDP listener nginx sends traffic figures to (port 0: any free "
        "port). It takes reports only from managed nginx, with this controller's secret tag.",
    ),
    setting(
        "stats_address",
        "--stats-address",
        default=None,
        help="The IP of this controller that nginx sends traffic figures to. Default: found "
        "from Docker (its address on a network it shares with nginx, or that network's "
        "gateway when it runs on the host).",
    ),
    setting(
        "stats_sample",
        "--stats-sample",
        default=10,
        type=click.IntRange(1, MAX_STATS_SAMPLE),
        help="Reload data plane: nginx reports one in N of the requests answered in one try, "
        "below 500 and within a second (each counting for N), and every other request. "
        "1: every request (a UDP send per request costs nginx ~25% of its throughput at "
        "saturation). The dynamic data plane always counts every request.",
    ),
    setting(
        "resync_interval",
        "--resync",
        default=30.0,
        type=click.FloatRange(1, 86400),
        help="Seconds between full resyncs that repair missed events.",
    ),
    setting(
        "stop_grace",
        "--stop-grace",
        default=60.0,
        type=click.FloatRange(1, 3600),
        help="Seconds a backend stays out after a stop signal while its container still runs "
        "(it is draining); after that, a container still running counts as up again.",
    ),
    setting(
        "dns_binds",
        "--dns-bind",
        multiple=True,
        help="Answer DNS on IP:PORT, UDP and TCP (repeatable). Default: no DNS server.",
    ),
    setting(
        "dns_domain",
        "--dns-domain",
        default=None,
        callback=lambda ctx, param, value: None if value is None else _domain(ctx, param, value),
        help="Zone the resolver answers for. Default: the --domain value.",
    ),
    setting("dns_ttl", "--dns-ttl", default=5, type=click.IntRange(0, 86400)),
    setting(
        "dns_udp_answers",
        "--dns-udp-answers",
        default=0,
        type=click.IntRange(0, 65535),
        help="At most N A/AAAA/SRV records in a UDP answer, picked at random per query "
        "(Consul's udp_answer_limit); 0: as many as fit the client's buffer. TCP gets all.",
    ),
    setting(
        "dns_upstreams",
        "--dns-upstream",
        multiple=True,
        help="Forward names outside the zone to IP:PORT (repeatable, tried in order).",
    ),
    setting(
        "dns_allow",
        "--dns-allow",
        multiple=True,
        callback=_cidrs,
        help="CIDR allowed to use forwarding (repeatable). Default: loopback and watched networks.",
    ),
    setting(
        "dns_forward_private_reverse",
        "--dns-forward-private-reverse",
        is_flag=True,
        default=False,
        help="Forward reverse lookups of private addresses that are no backend's to the "
        "upstreams (as dnsmasq does without --bogus-priv), instead of NXDOMAIN (RFC 6303; "
        "RFC 7793's 100.64.0.0/10 too, which Tailscale and carrier-grade NAT use).",
    ),
    setting(
        "dns_keep",
        "--dns-keep",
        default=60.0,
        type=click.FloatRange(0, 86400),
        help="Seconds DNS keeps answering the last known state once the controller is gone "
        "(stopped, crashed, killed), unless a new controller takes it over first.",
    ),
    setting(
        "api_bind",
        "--api-bind",
        default=f"127.0.0.1:{DEFAULT_API_PORT}",
        callback=lambda _ctx, _param, value: None if value.strip().lower() == "off" else value,
        help="IP:PORT of the REST API, or 'off'. Off loopback it needs --api-token or --insecure.",
    ),
    setting(
        "api_token",
        "--api-token",
        default=None,
        help="Bearer token every mutating API request must carry (the environment keeps it "
        "out of `ps`).",
    ),
    setting(
        "insecure",
        "--insecure",
        is_flag=True,
        default=False,
        help="Serve the API off loopback without a token (only on a network you trust).",
    ),
    setting(
        "wait_timeout",
        "--wait-timeout",
        default=10.0,
        type=click.FloatRange(0.1, 60),
        help="Seconds an API change with ?wait=true waits for nginx by default.",
    ),
]


def _apply(options: Sequence[Decorator], command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option(command)
    return command


def _settings(values: dict[str, Any]) -> Settings:
    """The command's values as they are: only an empty setting becomes its default."""
    _setup_logging(values.pop("log_level"))
    chosen = {k: v for k, v in values.items() if v not in ((), None, "")}
    if "dns_domain" not in chosen and "domain" in chosen:
        chosen["dns_domain"] = chosen["domain"]
    try:
        return Settings(**chosen)
    except InvalidValue as error:
        raise click.UsageError(str(error)) from error


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


def run(**values: Any) -> None:
    """Watch Docker and keep every managed nginx serving the live backends."""
    settings = _settings(values)
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


def render(**values: Any) -> None:
    """Print the nginx config the current Docker state gives, with the persisted overrides;
    changes nothing."""
    settings = _settings(values)
    try:
        click.echo(render_once(settings), nl=False)
    except ControlPlaneError as error:
        raise click.ClickException(str(error)) from error


@click.option("--bind", "binds", multiple=True, required=True, help="IP:PORT (repeatable).")
@click.option("--upstream", "upstreams", multiple=True, help="IP:PORT to forward to (repeatable).")
@click.option(
    "--udp-answers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="At most N records in a UDP answer; 0: as many as fit.",
)
@click.option(
    "--allow",
    multiple=True,
    callback=_cidrs,
    help="CIDR that may use forwarding (repeatable). Default: the controller's networks.",
)
@click.option(
    "--forward-private-reverse",
    is_flag=True,
    default=False,
    help="Forward private reverse names that are no backend's (as dnsmasq does) instead of "
    "answering them NXDOMAIN here (RFC 6303, and RFC 7793's 100.64.0.0/10).",
)
@click.option(
    "--keep",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, 86400),
    help="Seconds to answer the last zone once the controller is gone; then exit (standard "
    "input) or answer SERVFAIL until it is back (--controller).",
)
@click.option(
    "--controller",
    default=None,
    help="Follow this controller's API (http://HOST:PORT) instead of standard input: DNS as "
    "a service of its own.",
)
@click.option(
    "--api-token",
    envvar="CONTROLPLANE_API_TOKEN",
    show_envvar=True,
    default=None,
    help="With --controller: the controller's API token; only zones it signed are taken "
    "(never sent).",
)
@click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS))
def dns(**values: Any) -> None:
    """Serve DNS from a controller's zones: those of `run --dns-bind`, which starts this, on
    standard input; or, with --controller, those its API gives (dns_process)."""
    _setup_logging(values["log_level"])
    controller = values["controller"]
    if controller is not None and not controller.startswith(("http://", "https://")):
        raise click.BadParameter(
            f"{controller!r} is not an http:// or https:// URL, e.g. http://controlplane:8081",
            param_hint="--controller",
        )
    try:
        options = DnsOptions(
            binds=tuple(parse_address(b, default_port=53) for b in values["binds"]),
            upstreams=tuple(parse_address(u, default_port=53) for u in values["upstreams"]),
            udp_answers=values["udp_answers"],
            forward_private_reverse=values["forward_private_reverse"],
            allow=values["allow"] or None,
            keep=values["keep"],
            controller=values["controller"],
            token=values["api_token"],
        )
    except ControlPlaneError as error:
        raise click.UsageError(str(error)) from error
    if controller is None:  # fed by `run`: a terminal's ^C is the controller's
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(serve(options, sys.stdin, sys.stdout if controller is None else None))


main.add_command(click.command("run")(_apply(DISCOVERY + RUN, run)))
main.add_command(click.command("dns")(dns))
main.add_command(click.command("render")(_apply(DISCOVERY, render)))


for _command in COMMANDS:
    main.add_command(_command)
