"""Topology -> nginx config text, through a Jinja2 template.

The template gets plain view objects whose every string has passed the label grammar, and
quotes them again with the `q` filter; StrictUndefined turns a template typo into an error
instead of an empty directive. The same topology always gives byte-identical text, so a
checksum tells whether an nginx needs the file at all.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import jinja2

from controlplane.core.model import Backend, BackendState, Exclusion, Method, Service, Topology
from controlplane.errors import TemplateError

SERVICE_TEMPLATE = "service.conf.j2"
STATS_TAG_RE = re.compile(r"[A-Za-z0-9]{16,32}")
MAX_STATS_SAMPLE = 1000
"""nginx's split_clients takes percentages to two decimals: one in 1,000 is 0.10%."""
SAMPLED_STATUSES: tuple[int, ...] = (200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308)
SAMPLED_STATUSES += (400, 401, 403, 404, 405, 409, 410, 412, 422, 429)
"""The backend replies a sampled reload nginx reports one in --stats-sample of (each standing
for that many): the ordinary ones. Any other, and any request with no reply or more than one
try, is reported every time."""


@dataclass(frozen=True)
class StatsSink:
    """Where nginx sends its traffic figures (issue 17): the controller's UDP listener, as
    nginx reaches it, and the tag that proves a datagram came from a config the controller
    wrote. Every field is made by the controller, and checked here again because it is
    written into the config."""

    host: str
    port: int
    tag: str

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.host)
        if not 0 < self.port < 65536 or not STATS_TAG_RE.fullmatch(self.tag):
            raise ValueError(f"not a stats sink: port {self.port}, tag of {len(self.tag)}")


@dataclass(frozen=True)
class RenderOptions:
    listen_port: int = 80
    keepalive: int = 32
    reuseport: bool = True
    """One listening socket per worker. nginx keeps its old workers accepting for 100 ms after
    a reload; with a shared socket they take nearly every new connection in that time (the
    kernel wakes the first waiter), with reuseport the new workers take their share at once."""
    names_hash: bool = True
    """Size nginx's server-names hash for the names rendered (`server_names_hash_*`); off
    when the main nginx.conf sets those itself (nginx refuses a duplicate directive)."""
    upstream_header: bool = False
    """Add `X-Controlplane-Upstream: $upstream_addr` to replies, to see which backend answered;
    off by default since it shows clients internal addresses."""
    dynamic: bool = False
    """Render for the dynamic data plane: no service, host name or backend in the text, but a
    Lua balancer that reads them from the state file at `state_path` and the deltas over it
    at `delta_path` (core.dataplane)."""
    state_path: str = ""
    delta_path: str = ""
    poll: float = 0.005
    """How often (seconds) the Lua loader looks at the state file's first line."""
    stats: StatsSink | None = None
    """Where nginx sends its traffic figures; None: it sends none."""
    stats_sample: int = 1
    """Reload data plane: of the requests answered in one try, below 500 and within a second,
    nginx sends one in this many, standing for them all; every other request is sent."""

    def __post_init__(self) -> None:
        if not 1 <= self.stats_sample <= MAX_STATS_SAMPLE:
            raise ValueError(f"stats_sample {self.stats_sample} is not in 1..{MAX_STATS_SAMPLE}")


class ServerView(NamedTuple):
    """One server of an upstream; `directive` is `address` and `params` joined, and `note` the
    container made safe for a comment. The upstream's `server` lines are printed from these."""

    address: str
    params: tuple[str, ...]
    container: str
    directive: str
    note: str


class ServiceView(NamedTuple):
    """A tuple, not a frozen dataclass: a cold pass makes one per service, 1,000 at 1,000
    services x 10, and a tuple is several times cheaper."""

    name: str
    upstream: str
    zone_size: str
    """Of the upstream's shared-memory zone, in nginx's size syntax (zone_size)."""
    balancing: str | None
    server_lines: str
    """The upstream's `server` lines, ready to print: at 10,000 servers a Jinja loop over
    them costs more than the rest of the template."""
    server_names: tuple[str, ...]
    containers: int
    serving: int
    service: Service
    backends: tuple[Backend, ...]
    """The ones the upstream holds, in its order."""
    refused: str | None = None
    """Why this nginx can't serve the service as asked (it answers 503 saying so)."""

    @property
    def servers(self) -> tuple[ServerView, ...]:
        """The same servers, for a template that lays them out itself; made on demand."""
        return tuple(map(server_view, self.backends))


class NamesHash(NamedTuple):
    """`server_names_hash_bucket_size` and `_max_size` for the names a config holds."""

    bucket_size: int
    max_size: int


ZONE_FIXED_BYTES = 32 * 1024
ZONE_BYTES_PER_SERVER = 1280
ZONE_MIN_KIB = 64


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


def zone_size(servers: int) -> str:
    """An upstream zone that holds its servers: nginx refuses the whole config when one does
    not ("no memory in upstream zone"). Measured on nginx 1.22: a fixed ~24 KiB and ~0.8 KiB
    a server (0.86 with IPv6); 1.25 KiB a server leaves room for other builds."""
    size = ZONE_FIXED_BYTES + servers * ZONE_BYTES_PER_SERVER
    return f"{max(ZONE_MIN_KIB, _align(size, 4096) // 1024)}k"


DICT_UNIT_BYTES = 1024
DICT_MIN_BYTES = 4 << 20


def dict_size(units: int) -> str:
    """A shared dict of the dynamic data plane, for `units` KiB at least: a power of two, so
    that it changes (the text changes: a reload) only when the fleet doubles."""
    wanted = max(DICT_MIN_BYTES, units * DICT_UNIT_BYTES)
    return f"{(1 << (wanted - 1).bit_length()) >> 10}k"


class DynamicDicts(NamedTuple):
    """The dynamic data plane's two shared dicts: the routing the loader writes (never
    evicted: a full one refuses) and the balancer's counters (which may evict each other)."""

    routes: str
    counters: str


def dynamic_dicts(topology: Topology) -> DynamicDicts:
    """A backend's JSON and a host name take well under 1 KiB of routing; a backend's five
    counters (in flight, failures, ejected, EWMA and its time) about 1 KiB."""
    backends = sum(len(s.backends) for s in topology.services)
    hosts = sum(len(s.names) or 1 for s in topology.services)
    return DynamicDicts(dict_size(backends + hosts), dict_size(2 * backends))


def names_hash(names: Iterable[str]) -> NamesHash:
    """nginx refuses a config whose longest server name does not fit a hash bucket, and builds
    a slow hash (with a warning) when the table can't grow enough. A bucket here holds four
    entries of the longest name (nginx: a pointer plus the name and its length, aligned to 8;
    buckets to a 64-byte cache line); the table may grow to twice the names' count."""
    count, longest = 1, 1
    for name in names:
        count += 1
        longest = max(longest, len(name))
    entry = 8 + _align(longest + 2, 8)
    return NamesHash(
        max(64, _align(8 + 4 * entry, 64)), max(512, 1 << (2 * count - 1).bit_length())
    )


def nginx_quote(value: object) -> str:
    """Double-quote a value for nginx; control characters are refused, never escaped away."""
    text = str(value)
    # isprintable() is False for every control character, so it settles the common case.
    if not text.isprintable() and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise TemplateError(
            f"refusing to write a control character into the nginx config: {text!r}"
        )
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(value: object) -> str:
    """Make any text safe inside a `#` comment: one line, printable ASCII only."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text)


def make_environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["q"] = nginx_quote
    env.filters["comment"] = comment
    env.globals["source"] = lambda name: loader.get_source(env, name)[0]
    return env


def balancing_directive(service: Service) -> str | None:
    algorithm = service.algorithm
    if algorithm.method is Method.ROUND_ROBIN:
        return None
    if algorithm.method is Method.HASH:
        return f"hash {nginx_quote(algorithm.key)}" + (
            " consistent" if algorithm.consistent else ""
        )
    if algorithm.method is Method.RANDOM:
        return "random two least_conn" if algorithm.two else "random"
    if algorithm.method is Method.LEAST_TIME:
        return None
    return algorithm.method.value


def least_time_refused(service: Service) -> str:
    return (
        f"controlplane: service {service.name} uses least_time, which only the dynamic data "
        "plane has (this nginx runs the reload one)"
    )


_UP, _DRAINING = BackendState.UP, BackendState.DRAINING
"""Read once: reading a member off an enum class goes through its metaclass, several times
slower than a global on CPython 3.11, and these are compared for every backend."""


def server_params(backend: Backend) -> tuple[str, ...]:
    params = []
    if backend.weight != 1:
        params.append(f"weight={backend.weight}")
    if backend.max_fails is not None:
        params.append(f"max_fails={backend.max_fails}")
    if backend.fail_timeout is not None:
        params.append(f"fail_timeout={backend.fail_timeout}")
    if backend.max_conns is not None:
        params.append(f"max_conns={backend.max_conns}")
    if backend.backup:
        params.append("backup")
    if backend.state is _DRAINING:
        params.append("down")
    return tuple(params)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
IPV4_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
"""Dotted quad, no leading zeros; without capturing groups, which made it twice as slow."""


def address(backend: Backend) -> str:
    """ip:port, checked: an address from Docker still goes into the config only if valid
    (a regex for IPv4, which is fast at thousands of backends; ipaddress for IPv6)."""
    if backend.ip and IPV4_RE.fullmatch(backend.ip):
        return f"{backend.ip}:{backend.port}"
    ip = ipaddress.ip_address(backend.ip or backend.ipv6)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host}:{backend.port}"


_IN_UPSTREAM = frozenset({_UP, _DRAINING})


def upstream_backends(service: Service, reachable: Iterable[str]) -> tuple[Backend, ...]:
    """One server per container, on a network a managed nginx is on; with no managed nginx
    (e.g. `controlplane render` to preview), on the container's first network. A drained
    backend stays, marked down, so hash methods keep mapping the other keys as before."""
    backends = service.backends
    if not any(b.state is _UP for b in backends):
        return ()
    networks = reachable if isinstance(reachable, frozenset) else frozenset(reachable)
    chosen = [
        b for b in backends if b.state in _IN_UPSTREAM and (not networks or b.network in networks)
    ]
    if len({b.container_id for b in chosen}) == len(chosen):
        return tuple(chosen)
    first: dict[str, Backend] = {}
    for backend in chosen:
        first.setdefault(backend.container_id, backend)
    return tuple(first.values())


def server_directive(backend: Backend) -> str:
    """What a `server` line gives nginx: the address, then the parameters."""
    host, params = address(backend), server_params(backend)
    return f"{host} {' '.join(params)}" if params else host


def server_view(backend: Backend) -> ServerView:
    return ServerView(
        address(backend),
        server_params(backend),
        backend.container,
        server_directive(backend),
        comment(backend.container),
    )


def server_lines(backends: Iterable[Backend]) -> str:
    """Each `server_view(b)` as `server {directive};  # {note}`, from the same functions
    without making the views: a cold render makes 10,000 lines."""
    return "\n".join(
        [f"    server {server_directive(b)};  # {comment(b.container)}" for b in backends]
    )


def service_view(service: Service, reachable: Iterable[str], options: RenderOptions) -> ServiceView:
    backends = upstream_backends(service, reachable)
    # nginx refuses an upstream of backups only; build.py reports it as a service warning.
    if backends and all(b.backup for b in backends):
        backends = tuple(b._replace(backup=False) for b in backends)
    return ServiceView(
        name=service.name,
        upstream=f"cp_{service.name}",
        zone_size=zone_size(len(backends)),
        balancing=balancing_directive(service),
        server_lines=server_lines(backends),
        server_names=service.names or (service.name,),
        containers=len({b.container_id for b in service.backends}),
        serving=sum(1 for b in backends if b.state is _UP),
        service=service,
        backends=backends,
        refused=(
            least_time_refused(service) if service.algorithm.method is Method.LEAST_TIME else None
        ),
    )


Rendered = tuple[ServiceView, str]


class RenderCache:
    """Each service's view and block from the last render: a pass where one service changed
    renders one block. A service is found by identity, since the builder hands over the very
    same Service for an unchanged one (hashing every service each pass would cost more than
    rendering the one that changed). Each entry holds its Service, so no other object can
    take that id while the entry is kept; the cache keeps only the last render's services,
    and starts afresh for another template, reachable networks or options."""

    def __init__(self) -> None:
        self._context: tuple[jinja2.Template, frozenset[str], RenderOptions] | None = None
        self._entries: dict[int, tuple[Service, Rendered]] = {}

    def render(
        self,
        template: jinja2.Template,
        services: Iterable[Service],
        reachable: frozenset[str],
        options: RenderOptions,
    ) -> list[Rendered]:
        context = (template, reachable, options)
        last = self._entries if context == self._context else {}
        entries: dict[int, tuple[Service, Rendered]] = {}
        rendered = []
        for service in services:
            entry = last.get(id(service))
            if entry is None:
                view = service_view(service, reachable, options)
                entry = (service, (view, template.render(s=view, options=options)))
            entries[id(service)] = entry
            rendered.append(entry[1])
        self._context, self._entries = context, entries
        return rendered


def render_config(
    topology: Topology,
    template: jinja2.Template,
    options: RenderOptions = RenderOptions(),
    cache: RenderCache | None = None,
) -> str:
    """`template` is the main template; each service is rendered by SERVICE_TEMPLATE from the
    same environment, through `cache` when one is given."""
    reachable = frozenset(network for target in topology.nginx for network in target.networks)
    excluded: list[Exclusion] = sorted(
        topology.excluded, key=lambda e: (e.container, e.service or "", e.reason)
    )
    try:
        rendered: list[Rendered] = []
        # On the dynamic data plane the services are in the state the Lua balancer reads,
        # not in the text: one server routes every host.
        if topology.services and not options.dynamic:
            service_template = template.environment.get_template(SERVICE_TEMPLATE)
            memo = cache or RenderCache()
            rendered = memo.render(service_template, topology.services, reachable, options)
        return template.render(
            sampled_statuses=SAMPLED_STATUSES,
            services=[view for view, _ in rendered],
            service_blocks=[block for _, block in rendered],
            excluded=excluded,
            warnings=list(topology.warnings),
            options=options,
            names_hash=(
                names_hash(n for view, _ in rendered for n in view.server_names)
                if options.names_hash and not options.dynamic
                else None
            ),
            dicts=dynamic_dicts(topology) if options.dynamic else None,
        )
    except jinja2.TemplateError as error:
        name = getattr(error, "name", None) or template.name or "?"
        raise TemplateError(
            f"template {name} failed to render: {error}; fix the template "
            "(the previous config stays in place)"
        ) from error
