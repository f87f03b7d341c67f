"""Builds the object graph from Settings: the one place that knows every part."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.render import RenderOptions, render_config
from controlplane.docker_source import DockerSource, connect
from controlplane.nginx_deployer import NginxDeployer
from controlplane.reconciler import ControlLoop, Reconciler
from controlplane.settings import Settings
from controlplane.templating import load_template


@dataclass(frozen=True)
class Controller:
    reconciler: Reconciler
    loop: ControlLoop


def build_controller(settings: Settings) -> Controller:
    """Two clients: the event stream holds one connection open for good."""
    template = load_template(settings.templates_dir)
    api = connect(settings.docker_url)
    source = DockerSource(api)
    reconciler = Reconciler(source, NginxDeployer(api), template, settings)
    loop = ControlLoop(reconciler, DockerSource(connect(settings.docker_url)), settings)
    return Controller(reconciler, loop)


def render_once(settings: Settings) -> str:
    """The config the current Docker state gives, without touching any nginx."""
    template = load_template(settings.templates_dir)
    state = DockerSource(connect(settings.docker_url)).snapshot()
    topology = build_topology(
        state, BuildOptions(networks=settings.networks, domain=settings.domain)
    )
    return render_config(topology, template, RenderOptions(listen_port=settings.listen_port))
