"""Builds the object graph from Settings: the one place that knows every part."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import docker

from controlplane.activity import Activity, HealthEvents
from controlplane.addresses import SocketAddress, is_loopback, parse_address
from controlplane.api.app import create_app
from controlplane.api.http import ApiContext
from controlplane.api.server import ApiServer
from controlplane.api.views import traffic_keys
from controlplane.core import lua_stats
from controlplane.core.build import build_topology
from controlplane.core.dns_records import forwarding_networks
from controlplane.core.render import render_config
from controlplane.dns_child import DnsChild
from controlplane.docker_source import DockerSource, connect
from controlplane.errors import ControlPlaneError
from controlplane.gatekeeper import Gatekeeper
from controlplane.metrics import Metrics
from controlplane.nginx_deployer import NginxDeployer
from controlplane.prober import SocketProber
from controlplane.reconciler import ControlLoop, Reconciler
from controlplane.settings import DEFAULT_API_PORT, Settings
from controlplane.snapshot import Published, ReconcileReport, Snapshot
from controlplane.stats_listener import StatsListener
from controlplane.stats_sink import SinkFinder, new_tag, remember, remembered
from controlplane.store import FILE_NAME, OverrideStore
from controlplane.templating import load_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Controller:
    reconciler: Reconciler
    loop: ControlLoop
    store: OverrideStore
    activity: Activity
    metrics: Metrics
    dns: DnsChild | None = None
    api: ApiServer | None = None
    stats: StatsListener | None = None

    def start_servers(self) -> None:
        if self.stats is not None:
            self.stats.start()
        if self.dns is not None:
            self.dns.start()
        if self.api is not None:
            self.api.start()

    def close(self) -> None:
        if self.api is not None:
            self.api.stop()
        if self.dns is not None:
            self.dns.close()
        if self.stats is not None:
            self.stats.close()
        self.reconciler.close()
        self.store.close()


def build_controller(settings: Settings) -> Controller:
    """Two Docker clients: the event stream holds one connection open for good. Everything
    that can refuse to start (the state file, the template, a taken port) is done here,
    before the loop runs."""
    api_bind = _api_bind(settings)
    store = OverrideStore(settings.state_dir)
    template = load_template(settings.templates_dir)
    api = connect(settings.docker_url)
    gatekeeper = Gatekeeper(SocketProber(), settings.readiness_wait)
    source = DockerSource(api, settings.networks)
    stats, sinks = _stats(settings, api, lambda: addresses())
    reconciler = Reconciler(
        source,
        NginxDeployer(api, shell=settings.nginx_shell, retire=settings.retire_old_workers),
        template,
        settings,
        overrides=lambda: store.current,
        gate=gatekeeper,
        stats=sinks.sink if sinks is not None else None,
    )
    addresses = NginxAddresses(reconciler, source)
    loop = ControlLoop(reconciler, DockerSource(connect(settings.docker_url)), settings)
    gatekeeper.on_change.append(loop.readiness_changed)
    dns = _dns_server(settings, reconciler)
    activity = Activity()
    metrics = Metrics(
        lambda: reconciler.snapshot,
        dns.outcomes if dns is not None else None,
        lambda: reconciler.nginx,
        stats.datagrams if stats is not None else None,
        upstreams=stats.totals if stats is not None else None,
        stats_refused=stats.refused if stats is not None else None,
    )
    health = HealthEvents(activity, lambda: reconciler.snapshot, source.known)
    reconciler.on_report.extend([health.on_report, activity.on_report, metrics.on_report])
    gatekeeper.on_probe.append(metrics.on_probe)
    gatekeeper.on_transition.append(health.on_transition)
    loop.on_failure.extend([activity.on_failure, metrics.on_failure])
    if stats is not None:  # the traffic book takes only the keys of the current model
        reconciler.on_report.append(lambda _: _retain_traffic(stats, reconciler.snapshot))
    server = None
    if api_bind is not None:
        context = api_context(settings, reconciler, loop, store, activity, metrics)
        if stats is not None:
            tag = stats.tag
            context = replace(
                context,
                traffic=stats.summaries,
                redact=lambda text: text.replace(tag, "(the stats tag: not shown)"),
            )
        server = ApiServer(create_app(context), api_bind.host, api_bind.port)
    return Controller(reconciler, loop, store, activity, metrics, dns, server, stats)


def _retain_traffic(stats: StatsListener, snapshot: Snapshot | None) -> None:
    """The traffic book keeps the keys of the model each pass settled on (each service's,
    each backend's address as nginx names it), and no made-up one."""
    if snapshot is not None:
        stats.retain(k for s in snapshot.topology.services for k in traffic_keys(s))


class NginxAddresses:
    """The managed nginx's addresses: the only senders the stats listener takes. Read on the
    listener's thread from what the last pass saw; an nginx whose inspect is being redone
    (an event just cleared it) keeps the addresses it had, so its reports are not dropped
    meanwhile."""

    def __init__(self, reconciler: Reconciler, source: DockerSource) -> None:
        self._reconciler = reconciler
        self._source = source
        self._known: dict[str, frozenset[str]] = {}

    def __call__(self) -> frozenset[str]:
        snapshot = self._reconciler.snapshot
        found: dict[str, frozenset[str]] = {}
        for target in snapshot.topology.nginx if snapshot is not None else ():
            facts = self._source.known(target.container_id)
            if facts is not None:
                found[target.container_id] = frozenset(
                    a for e in facts.endpoints for a in (e.ip, e.ipv6) if a
                )
            elif target.container_id in self._known:
                found[target.container_id] = self._known[target.container_id]
        self._known = found
        return frozenset().union(*found.values())


def _stats(
    settings: Settings, api: docker.APIClient, allowed: Callable[[], frozenset[str]]
) -> tuple[StatsListener | None, SinkFinder | None]:
    """The listener nginx send their traffic figures to, and where they find it (none with
    --no-stats). Bound here: its port goes into the first config."""
    if not settings.stats:
        return None, None
    bind = parse_address(settings.stats_bind, default_port=0, any_port=True)
    decoders = {b"cp-stats ": lua_stats.read}
    last = remembered(settings.state_dir)
    listener = None
    if last is not None and bind.port == 0:  # the last run's port and tag, if it is free
        with contextlib.suppress(ControlPlaneError):
            listener = StatsListener(replace(bind, port=last[0]), last[1], allowed, decoders)
    if listener is None:
        listener = StatsListener(bind, new_tag(), allowed, decoders)
    remember(settings.state_dir, listener.port, listener.tag)
    return listener, SinkFinder(api, listener.port, listener.tag, settings.stats_address)


def api_context(
    settings: Settings,
    reconciler: Reconciler,
    loop: ControlLoop,
    store: OverrideStore,
    activity: Activity,
    metrics: Metrics,
) -> ApiContext:
    def not_ready() -> list[str]:
        reasons = []
        if reconciler.snapshot is None:
            reasons.append("the first sync with Docker has not finished")
        if not loop.healthy:
            reasons.append("the last reconcile could not reach Docker")
        return reasons

    published = Published()
    published.publish(reconciler.snapshot)
    reconciler.on_report.append(lambda _: published.publish(reconciler.snapshot))
    return ApiContext(
        snapshot=lambda: reconciler.snapshot,
        store=store,
        request_pass=loop.request,
        activity=activity,
        metrics=metrics,
        ready=not_ready,
        nginx=lambda: reconciler.nginx,
        config_of=reconciler.config_of,
        health=reconciler.health,
        token=settings.api_token,
        wait_timeout=settings.wait_timeout,
        stats_sample=settings.stats_sample if settings.stats else None,
        newer=published.newer,
    )


def _api_bind(settings: Settings) -> SocketAddress | None:
    """This API can send all traffic anywhere: off loopback it needs a token, or --insecure."""
    if settings.api_bind is None:
        return None
    bind = parse_address(settings.api_bind, default_port=DEFAULT_API_PORT, any_port=True)
    if not is_loopback(bind) and not settings.api_token and not settings.insecure:
        raise ControlPlaneError(
            f"refusing to serve the API on {bind} without a token: anyone who reaches it "
            "could send all traffic elsewhere. Set --api-token (or CONTROLPLANE_API_TOKEN), "
            "bind to 127.0.0.1, or pass --insecure if the network is trusted"
        )
    return bind


DNS_APPLY_WAIT = 2.0


def _dns_server(settings: Settings, reconciler: Reconciler) -> DnsChild | None:
    """The DNS process gets the zone of each snapshot the reconciler settles on, whole, with
    the networks that may use its forwarder."""
    if not settings.dns_binds:
        return None
    child = DnsChild(
        [parse_address(b, default_port=53) for b in settings.dns_binds],
        [parse_address(u, default_port=53) for u in settings.dns_upstreams],
        settings.dns_udp_answers,
        settings.dns_allow,
        settings.dns_keep,
        forward_private_reverse=settings.dns_forward_private_reverse,
    )

    def new_zone(snapshot: Snapshot) -> None:
        """Sent as the pass settles on it: DNS changes while nginx deploys."""
        child.publish(snapshot.dns, forwarding_networks(snapshot.topology))

    def pass_done(report: ReconcileReport) -> None:
        """The pass is done when DNS answers from its zone too (bounded)."""
        if report.changed and not child.applied(report.version, DNS_APPLY_WAIT):
            log.warning(
                "DNS did not take zone version %s within %gs: it answers an older one until "
                "it does",
                report.version,
                DNS_APPLY_WAIT,
            )

    reconciler.on_snapshot.append(new_zone)
    reconciler.on_report.append(pass_done)
    return child


def render_once(settings: Settings) -> str:
    """The config the current Docker state gives, with the persisted overrides (read only),
    without touching any nginx."""
    template = load_template(settings.templates_dir)
    saved = settings.state_dir
    if saved is not None and (saved / FILE_NAME).exists():
        store = OverrideStore(saved, read_only=True)
    else:
        store = OverrideStore(None)
    try:
        state = DockerSource(connect(settings.docker_url), settings.networks).snapshot()
        topology = build_topology(state, settings.build_options, overrides=store.current)
    finally:
        store.close()
    return render_config(topology, template, settings.render_options)
