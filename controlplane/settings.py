"""Every knob of a running controller in one typed value, filled from the CLI (each flag is
declared once in cli.py, named after its field here)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from controlplane.core.build import BuildOptions
from controlplane.core.model import DataPlane
from controlplane.core.render import RenderOptions
from controlplane.errors import InvalidValue

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_API_PORT = 8081
"""Where the controller serves its API and the CLI looks for it; 8080 stays nginx's."""


@dataclass(frozen=True)
class Settings:
    docker_url: str | None = None
    networks: frozenset[str] | None = None
    domain: str = "internal"
    listen_port: int = 80
    reuseport: bool = True
    names_hash: bool = True
    upstream_header: bool = False
    keepalive: int = 32
    templates_dir: Path | None = None
    quiet_window: float = 0.05
    max_wait: float = 1.0
    batch_quiet: float = 2.0
    batch_max: float = 10.0
    """New backends during a scale-out: see core.batching.BatchPolicy."""
    dataplane: DataPlane = DataPlane.AUTO
    """For an nginx without a `controlplane.dataplane` label (core.dataplane)."""
    nginx_shell: bool = True
    """Deploy through a shell kept open in each nginx that has one (nginx_shell)."""
    retire_old_workers: bool = True
    """Through the shell, retire nginx's old workers once the new ones are up (nginx_workers)."""
    readiness_wait: float = 0.025
    """Seconds a pass waits at most for its new backends' first probes (gatekeeper)."""
    resync_interval: float = 30.0
    stop_grace: float = 60.0
    dns_binds: tuple[str, ...] = ()
    dns_domain: str = "internal"
    dns_ttl: int = 5
    dns_udp_answers: int = 0
    """At most this many A, AAAA or SRV records in a UDP answer, a random pick per query
    (Consul's udp_answer_limit); 0: as many as fit the client's buffer. TCP gets them all."""
    dns_upstreams: tuple[str, ...] = ()
    dns_allow: tuple[IpNetwork, ...] | None = None
    """None: loopback and the watched networks' subnets may use the forwarder."""
    dns_forward_private_reverse: bool = False
    """Reverse names in the RFC 6303 zones that are no backend's go to the upstreams."""
    dns_keep: float = 60.0
    """Seconds the DNS process answers the last zone once the controller is gone (stopped or
    crashed), unless a new controller takes it over first (dns_process)."""
    api_bind: str | None = None
    """IP:PORT of the REST API; None: no API."""
    api_token: str | None = None
    insecure: bool = False
    """Allow the API on a non-loopback address without a token."""
    state_dir: Path | None = None
    """Where overrides persist; None keeps them in memory only (tests, `render`)."""
    wait_timeout: float = 10.0
    stats: bool = True
    """Collect traffic figures from every managed nginx (stats_listener); off: nginx is
    told to send none."""
    stats_bind: str = "0.0.0.0:0"
    """IP:PORT of the UDP listener nginx reports to (checked where it is bound, as the
    API's); port 0: any free port (the rendered config names the one taken)."""
    stats_address: str | None = None
    """The IP nginx sends its reports to; None: found from Docker (stats_sink)."""
    stats_sample: int = 10
    """Reload nginx sends one in this many of its fast, successful, one-try requests (each
    standing for this many) and every other request: one datagram per request would cost
    nginx about a quarter of its throughput. 1: every request."""

    def __post_init__(self) -> None:
        """A wrong pair is refused, never repaired behind the operator's back."""
        if self.max_wait < self.quiet_window:
            raise InvalidValue(
                f"--debounce-max ({self.max_wait:g} s) is shorter than --debounce "
                f"({self.quiet_window:g} s): a coalesced pass could never wait for its quiet "
                f"window; set --debounce-max to at least {self.quiet_window:g}"
            )
        if 0 < self.batch_max < self.batch_quiet:
            raise InvalidValue(
                f"--batch-max ({self.batch_max:g} s) is shorter than --batch-quiet "
                f"({self.batch_quiet:g} s): a held scale-out would always end at --batch-max; "
                "set --batch-max to 0 (hold nothing) or to at least --batch-quiet"
            )
        if self.stats_address is not None:
            try:
                ipaddress.ip_address(self.stats_address)
            except ValueError as error:
                raise InvalidValue(
                    f"--stats-address {self.stats_address!r} is not an IP address: give the "
                    "address of this controller that every managed nginx can reach"
                ) from error

    @property
    def build_options(self) -> BuildOptions:
        return BuildOptions(networks=self.networks, domain=self.domain)

    @property
    def render_options(self) -> RenderOptions:
        return RenderOptions(
            listen_port=self.listen_port,
            reuseport=self.reuseport,
            names_hash=self.names_hash,
            upstream_header=self.upstream_header,
            keepalive=self.keepalive,
            stats_sample=self.stats_sample,
        )
