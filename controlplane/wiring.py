"""Builds the object graph from Settings: the one place that knows every part."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from controlplane.core.build import build_topology
from controlplane.core.dns_records import Zone
from controlplane.core.render import render_config
from controlplane.dns_answer import Answerer
from controlplane.dns_server import DnsServer, Forwarder, parse_endpoint
from controlplane.docker_source import DockerSource, connect
from controlplane.nginx_deployer import NginxDeployer
from controlplane.reconciler import ControlLoop, Reconciler
from controlplane.settings import IpNetwork, Settings
from controlplane.templating import load_template


@dataclass(frozen=True)
class Controller:
    reconciler: Reconciler
    loop: ControlLoop
    dns: DnsServer | None = None


def build_controller(settings: Settings) -> Controller:
    """Two clients: the event stream holds one connection open for good."""
    template = load_template(settings.templates_dir)
    api = connect(settings.docker_url)
    source = DockerSource(api)
    reconciler = Reconciler(source, NginxDeployer(api), template, settings)
    loop = ControlLoop(reconciler, DockerSource(connect(settings.docker_url)), settings)
    return Controller(reconciler, loop, _dns_server(settings, reconciler))


def _dns_server(settings: Settings, reconciler: Reconciler) -> DnsServer | None:
    """The resolver reads the zone of the reconciler's current snapshot, whole."""
    if not settings.dns_binds:
        return None

    def zone() -> Zone | None:
        snapshot = reconciler.snapshot
        return snapshot.dns if snapshot else None

    def allowed() -> list[IpNetwork]:
        if settings.dns_allow is not None:
            return list(settings.dns_allow)
        snapshot = reconciler.snapshot
        networks = snapshot.topology.networks if snapshot else ()
        return [ipaddress.ip_network(s, strict=False) for n in networks for s in n.subnets]

    upstreams = [parse_endpoint(u) for u in settings.dns_upstreams]
    answerer = Answerer(zone, allowed, forwarding=bool(upstreams))
    binds = [parse_endpoint(b, default_port=53) for b in settings.dns_binds]
    return DnsServer(binds, answerer, Forwarder(upstreams) if upstreams else None)


def render_once(settings: Settings) -> str:
    """The config the current Docker state gives, without touching any nginx."""
    template = load_template(settings.templates_dir)
    state = DockerSource(connect(settings.docker_url)).snapshot()
    topology = build_topology(state, settings.build_options)
    return render_config(topology, template, settings.render_options)
