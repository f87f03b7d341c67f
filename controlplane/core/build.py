"""Docker state -> topology: which containers serve which services, and why others don't.

A pure function of the listing, so any trigger (start-up, event, timer) rebuilds the same
answer from scratch and a missed event can't leave the result wrong. Bad input excludes the
one container or alias it came from, with a reason; everything else is still built.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

from controlplane.core import labels as L
from controlplane.core.lifecycle import StopMark, is_stopping
from controlplane.core.model import (
    METHODS_WITHOUT_BACKUP,
    Algorithm,
    Backend,
    BackendOverride,
    BackendState,
    ContainerFacts,
    DockerState,
    Endpoint,
    Exclusion,
    HealthCheck,
    HealthMode,
    Method,
    NginxTarget,
    Overrides,
    RemoteNginx,
    Service,
    SwarmEndpoint,
    SwarmServiceFacts,
    TaskAddress,
    Topology,
)
from controlplane.core.overrides import for_service
from controlplane.errors import InvalidValue

DEFAULT_CONFIG_PATH = "/etc/nginx/conf.d/controlplane.conf"
DEFAULT_PORT = 80
SWARM_SERVICE_ID = "com.docker.swarm.service.id"
"""The label Docker puts on a Swarm task's container: a manager's listing serves it through
its service, with the tasks on the other nodes."""


@dataclass(frozen=True)
class BuildOptions:
    """`networks` None watches every user-defined bridge network; `domain` is the zone that
    services are named in (NAME.DOMAIN), so no label can claim another service's name."""

    networks: frozenset[str] | None = None
    domain: str = "internal"


@dataclass(slots=True, eq=False)
class _Member:
    """One container on one network, in the services `names`: its backend as its labels make
    it (`_service` applies overrides), and the service-wide labels it proposes. Compared by
    identity: an unchanged container's plan comes from the memo with the very same members, so
    comparing a service's members does not compare every field of every backend. Not frozen,
    only because a frozen one costs three times as much to make (10,000 in a cold pass);
    nothing changes one once made."""

    names: tuple[str, ...]
    backend: Backend
    service: L.ServiceLabels


_OLDEST_FIRST = operator.attrgetter("created", "name")
_SERVICE_LABEL_FIELDS = tuple(f.name for f in fields(L.ServiceLabels))


class _Plan(NamedTuple):
    """What one container brings to the topology, whatever the others, and what that was made
    from, so the next build can tell whether it still holds. One object per container kept:
    a separate key and entry would be two more for every full collection to walk."""

    container: ContainerFacts
    watched: frozenset[str]
    stopping: bool
    watch_all: bool
    warnings: tuple[str, ...]
    excluded: tuple[Exclusion, ...]
    members: tuple[_Member, ...]


_ServiceKey = tuple[
    tuple[_Member, ...],
    frozenset[str] | None,
    str,
    Algorithm | None,
    tuple[tuple[str, BackendOverride], ...],
    HealthCheck | None,
]


class BuildMemo:
    """What the last build made of each container and each service, so the next build with
    the same memo redoes only what changed: the Docker edge hands over the same facts for an
    unchanged container. Owned by whoever builds again and again (one per reconciler), never
    shared through the module. Each build keeps only the containers and services it met, so
    the memo's size follows what is running, not every container ever seen."""

    __slots__ = ("_plans", "_services")

    def __init__(self) -> None:
        self._plans: dict[str, _Plan] = {}
        self._services: dict[str, tuple[_ServiceKey, tuple[Service, tuple[Exclusion, ...]]]] = {}

    def __len__(self) -> int:
        """Containers and services remembered."""
        return len(self._plans) + len(self._services)


class _Parsed(NamedTuple):
    """One build's parses, shared by the replicas that carry the same labels and aliases."""

    labels: dict[frozenset[tuple[str, str]], L.ContainerLabels]
    aliases: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]


def build_topology(
    state: DockerState,
    options: BuildOptions = BuildOptions(),
    stopping: Mapping[str, StopMark] | None = None,
    overrides: Overrides | None = None,
    memo: BuildMemo | None = None,
) -> Topology:
    """`overrides`: the operator's persisted choices, which beat labels. `memo`: the previous
    build's work, updated to this one's (without one, everything is worked out afresh)."""
    chosen = overrides or Overrides()
    memo = memo if memo is not None else BuildMemo()
    parsed = _Parsed({}, {})
    plans: dict[str, _Plan] = {}
    swarm_nginx, remote = _swarm_nginx(state)
    watched, warnings = _watched_networks(state, options, swarm_nginx)
    watch_all = options.networks is None
    marks = stopping or {}
    nginx: list[NginxTarget] = []
    excluded: list[Exclusion] = []
    members: dict[str, list[_Member]] = defaultdict(list)
    for container in sorted(state.containers, key=_OLDEST_FIRST):
        if container.status not in ("running", "paused"):
            continue
        if container.id in swarm_nginx:
            target = _nginx_target(container, watched, excluded, swarm_nginx[container.id])
            if target is not None:
                nginx.append(target)
            continue
        if container.labels.get(L.ROLE) == "nginx" and not (
            state.swarm_services is not None and SWARM_SERVICE_ID in container.labels
        ):
            if any(e.network in watched for e in container.endpoints):
                labels = L.parse_container_labels(container.labels, parsed.labels)
                warnings.extend(
                    _label_typos(f"container {container.name}", container.labels, labels)
                )
            target = _nginx_target(container, watched, excluded)
            if target is not None:
                nginx.append(target)
            continue
        if state.swarm_services is not None and SWARM_SERVICE_ID in container.labels:
            continue
        mark = marks.get(container.id)
        stopping_now = mark is not None and is_stopping(mark, container.stop_signal)
        plan = memo._plans.get(container.id)
        if (
            plan is None
            or (plan.container is not container and plan.container != container)
            or plan.stopping is not stopping_now
            or plan.watched != watched
            or plan.watch_all is not watch_all
        ):
            plan = _plan(container, watched, stopping_now, watch_all, parsed)
        plans[container.id] = plan
        if plan.warnings:
            warnings.extend(plan.warnings)
        if plan.excluded:
            excluded.extend(plan.excluded)
        for member in plan.members:
            for name in member.names:
                members[name].append(member)
    network_names = {n.id: n.name for n in state.networks}
    for swarm_service in sorted(state.swarm_services or (), key=_OLDEST_FIRST):
        if swarm_service.labels.get(L.ROLE) == "nginx":
            labels = L.parse_container_labels(swarm_service.labels, parsed.labels)
            what = f"swarm service {swarm_service.name}"
            warnings.extend(_label_typos(what, swarm_service.labels, labels, swarm=True))
            continue
        found = _swarm_members(swarm_service, watched, watch_all, network_names, parsed)
        warnings.extend(found.warnings)
        excluded.extend(found.excluded)
        for member in found.members:
            members[member.names[0]].append(member)

    reachable = frozenset(network for target in nginx for network in target.networks)
    services = []
    built: dict[str, tuple[_ServiceKey, tuple[Service, tuple[Exclusion, ...]]]] = {}
    for name in [n for n in members if n.endswith(f".{options.domain}")]:
        # web.internal as a service would take service web's own NAME.DOMAIN
        excluded.extend(
            Exclusion(
                m.container_id,
                m.container,
                f"service name {name} ends with the zone .{options.domain}: every service is "
                "already reachable as NAME.DOMAIN; name it without the domain",
                service=name,
            )
            for m in (member.backend for member in members.pop(name))
        )
    for name in sorted(members):
        service_key = (
            tuple(members[name]),
            reachable if nginx else None,
            options.domain,
            *for_service(chosen, name),
        )
        made = memo._services.get(name)
        if made is None or made[0] != service_key:
            made = (service_key, _service(name, *service_key))
        built[name] = made
        service, dropped = made[1]
        services.append(service)
        excluded.extend(dropped)
    memo._plans, memo._services = plans, built
    services, host_warnings = _claim_hosts(services, options.domain)
    return Topology(
        services=tuple(services),
        excluded=tuple(dict.fromkeys(excluded)),
        nginx=tuple(nginx),
        warnings=tuple(dict.fromkeys(warnings + host_warnings)),
        networks=tuple(n for n in state.networks if n.name in watched),
        remote_nginx=remote,
    )


def _label_typos(
    what: str, raw: Mapping[str, str], parsed: L.ContainerLabels, swarm: bool = False
) -> list[str]:
    """A misspelt label would otherwise be ignored without a word; so would one that means
    nothing where it is. `what` names the labelled thing: container NAME, swarm service NAME."""
    if not parsed.unknown and L.ROLE not in raw and (swarm or L.ENDPOINT not in raw):
        return []
    warnings = [
        f"{what}: unknown label {L.show(key)} is ignored (a typo?)" for key in parsed.unknown
    ]
    role = raw.get(L.ROLE)
    if role is not None and role != "nginx":
        warnings.append(f"{what}: {L.ROLE}={L.show(role)} is ignored (the only role is nginx)")
    if not swarm and L.ENDPOINT in raw:
        warnings.append(f"{what}: {L.ENDPOINT} is ignored (it is for Swarm services)")
    return warnings


def _swarm_nginx(
    state: DockerState,
) -> tuple[dict[str, Mapping[str, str]], tuple[RemoteNginx, ...]]:
    """The tasks of the Swarm services labelled controlplane.role=nginx: those whose container
    runs on this node's engine are managed nginx (container ID -> the service's labels), the
    others are listed as remote, since only their own node's engine can deploy to them."""
    local: dict[str, Mapping[str, str]] = {}
    remote = []
    for service in state.swarm_services or ():
        if service.labels.get(L.ROLE) != "nginx":
            continue
        for task in service.tasks:
            if task.state != "running" or task.desired_state != "running":
                continue
            if task.node == state.node_id:
                if task.container_id:
                    local[task.container_id] = service.labels
                continue
            remote.append(
                RemoteNginx(
                    task.id,
                    task.name,
                    task.node,
                    f"runs on node {task.node}, not on this controller's node "
                    f"{state.node_id}: its config goes through that node's engine, which this "
                    "controller does not reach; run a controller there (a global service)",
                )
            )
    return local, tuple(remote)


def _watched_networks(
    state: DockerState, options: BuildOptions, swarm_nginx: Mapping[str, object]
) -> tuple[frozenset[str], list[str]]:
    """By default every user-defined bridge, and every overlay network a managed nginx (a
    container or a Swarm service's task here) is attached to (it can reach the tasks there);
    with --network, the bridges and overlay networks it names."""
    bridges = frozenset(
        n.name for n in state.networks if n.driver == "bridge" and n.name != "bridge"
    )
    overlays = frozenset(n.name for n in state.networks if n.driver == "overlay")
    if options.networks is None:
        with_nginx = {
            e.network
            for c in state.containers
            if (c.labels.get(L.ROLE) == "nginx" or c.id in swarm_nginx)
            and c.status in ("running", "paused")
            for e in c.endpoints
        }
        return bridges | (overlays & with_nginx), []
    warnings = []
    drivers = {n.name: n.driver for n in state.networks}
    for name in sorted(options.networks - bridges - overlays):
        if name not in drivers:
            warnings.append(
                f"network {L.show(name)} does not exist (yet): nothing is watched on it"
            )
        else:
            warnings.append(
                f"network {L.show(name)} has driver {drivers[name]}, neither a user-defined "
                "bridge nor an overlay network: it is not watched"
            )
    return (bridges | overlays) & options.networks, warnings


def _nginx_target(
    container: ContainerFacts,
    watched: frozenset[str],
    excluded: list[Exclusion],
    labels: Mapping[str, str] | None = None,
) -> NginxTarget | None:
    """Only an nginx on a watched network is managed: elsewhere it could reach no backend,
    and another controller may own it. `labels`: its Swarm service's, for a task's container
    (which carries only the task template's)."""
    labels = container.labels if labels is None else labels

    def exclude(reason: str) -> None:
        excluded.append(Exclusion(container.id, container.name, reason))

    networks = tuple(e.network for e in container.endpoints)
    if not watched.intersection(networks):
        return None
    if container.status != "running":
        exclude("managed nginx is paused: it gets the current config when it is unpaused")
        return None
    try:
        path = L.parse_config_path(labels.get(L.CONFIG_PATH, DEFAULT_CONFIG_PATH))
        requested = labels.get(L.DATAPLANE)
        dataplane = None if requested is None else L.parse_dataplane(requested)
    except InvalidValue as error:
        exclude(f"managed nginx not updated: {error}")
        return None
    return NginxTarget(
        container_id=container.id,
        container=container.name,
        config_path=path,
        started_at=container.started_at,
        networks=networks,
        dataplane=dataplane,
    )


def _plan(
    container: ContainerFacts,
    watched: frozenset[str],
    stopping: bool,
    watch_all: bool,
    parsed: _Parsed,
) -> _Plan:
    def made(
        warnings: tuple[str, ...] = (),
        excluded: tuple[Exclusion, ...] = (),
        members: tuple[_Member, ...] = (),
    ) -> _Plan:
        return _Plan(container, watched, stopping, watch_all, warnings, excluded, members)

    endpoints = [e for e in container.endpoints if e.network in watched and (e.ip or e.ipv6)]
    if not endpoints:
        # With --network, another controller's or nobody's: it costs nothing, not even a
        # warning. Watching every bridge, a service label off them can only be a mistake.
        if not watch_all or L.SERVICE not in container.labels:
            return made()
        on = ", ".join(e.network for e in container.endpoints) or "no network"
        reason = f"has {L.SERVICE} but is on no watched network (it is on {on})"
        return made(excluded=(Exclusion(container.id, container.name, reason),))
    labels = L.parse_container_labels(container.labels, parsed.labels)
    warnings = tuple(_label_typos(f"container {container.name}", container.labels, labels))
    excluded: list[Exclusion] = []
    names_by_endpoint = [
        (e, _alias_services(container, e, excluded, parsed.aliases)) for e in endpoints
    ]
    if not any(names for _, names in names_by_endpoint) and L.SERVICE not in container.labels:
        return made(warnings, tuple(excluded))

    def exclude(reason: str) -> _Plan:
        """Under each service it would have joined, so the service's own view shows it."""
        named = [n for _, names in names_by_endpoint for n in names]
        label = labels.backend.service if not labels.errors else _label_service(container)
        services = tuple(dict.fromkeys([*named, *([label] if label else [])])) or (None,)
        excluded.extend(Exclusion(container.id, container.name, reason, s) for s in services)
        return made(warnings, tuple(excluded))

    if labels.errors:
        return exclude("; ".join(labels.errors))
    backend, service = labels.backend, labels.service
    if not backend.enabled:
        return exclude(f"opted out with {L.ENABLE}=false")
    port = backend.port
    if port is None:
        if len(container.exposed_tcp_ports) > 1:
            ports = ", ".join(str(p) for p in container.exposed_tcp_ports)
            return exclude(f"exposes several TCP ports ({ports}): set {L.PORT} to the one to use")
        port = container.exposed_tcp_ports[0] if container.exposed_tcp_ports else DEFAULT_PORT
    state = _backend_state(container, stopping)
    members = tuple(
        _Member(
            tuple(dict.fromkeys((*names, backend.service) if backend.service else names)),
            Backend(
                container.id,
                container.name,
                endpoint.network,
                endpoint.ip,
                endpoint.ipv6,
                port,
                container.created,
                state,
                backend.weight,
                backend.backup,
                backend.max_fails,
                backend.fail_timeout,
                backend.max_conns,
                container.started_at,
            ),
            service,
        )
        for endpoint, names in names_by_endpoint
    )
    return made(warnings, tuple(excluded), members)


class _Found(NamedTuple):
    warnings: list[str]
    excluded: list[Exclusion]
    members: list[_Member]


def _swarm_members(
    service: SwarmServiceFacts,
    watched: frozenset[str],
    watch_all: bool,
    network_names: Mapping[str, str],
    parsed: _Parsed,
) -> _Found:
    """A Swarm service on a watched network: one backend per running task there (its
    address on that network), or its virtual IP with `controlplane.endpoint=vip`. A task
    whose desired state is no longer running is stopping: drained before Docker stops it."""
    found = _Found([], [], [])
    on = [network_names.get(n, n) for n in service.networks]
    networks = [n for n in on if n in watched]
    labels = L.parse_container_labels(service.labels, parsed.labels)
    what = f"swarm service {service.name}"

    def exclude(reason: str, name: str | None) -> _Found:
        found.excluded.append(Exclusion(service.id, service.name, reason, service=name))
        return found

    if not networks:
        if watch_all and L.SERVICE in service.labels:
            where = ", ".join(on) or "no network"
            return exclude(f"has {L.SERVICE} but is on no watched network (it is on {where})", None)
        return found
    found.warnings.extend(_label_typos(what, service.labels, labels, swarm=True))
    try:
        name = labels.backend.service or L.parse_name(service.name, "swarm service name")
        endpoint = L.parse_endpoint(service.labels.get(L.ENDPOINT, SwarmEndpoint.TASKS))
    except InvalidValue as error:
        return exclude(str(error), labels.backend.service)
    if labels.errors:
        return exclude("; ".join(labels.errors), name)
    backend = labels.backend
    if not backend.enabled:
        return exclude(f"opted out with {L.ENABLE}=false", name)
    if endpoint is SwarmEndpoint.VIP and service.endpoint_mode != "vip":
        return exclude(
            f"{L.ENDPOINT}=vip, but its endpoint mode is {service.endpoint_mode}, which has "
            "no virtual IP: drop the label (its tasks are served) or use --endpoint-mode vip",
            name,
        )

    def member(
        backend_id: str, shown: str, address: TaskAddress, created: str, up: bool
    ) -> _Member:
        return _Member(
            (name,),
            Backend(
                backend_id,
                shown,
                address.network or network_names.get(address.network_id, ""),
                address.ip,
                address.ipv6,
                backend.port or DEFAULT_PORT,
                created,
                BackendState.UP if up else BackendState.STOPPING,
                backend.weight,
                backend.backup,
                backend.max_fails,
                backend.fail_timeout,
                backend.max_conns,
                created,
            ),
            labels.service,
        )

    if endpoint is SwarmEndpoint.VIP:
        found.members.extend(
            member(service.id, service.name, vip, service.created, True)
            for vip in service.virtual_ips
            if network_names.get(vip.network_id) in networks
        )
        return found
    found.members.extend(
        member(task.id, task.name, address, task.created, task.desired_state == "running")
        for task in service.tasks
        if task.state == "running"
        for address in task.addresses
        if (address.network or network_names.get(address.network_id)) in networks
    )
    return found


def _label_service(container: ContainerFacts) -> str | None:
    """The service its label names, when that label is valid although another is not."""
    try:
        return L.parse_name(container.labels.get(L.SERVICE, ""), L.SERVICE)
    except InvalidValue:
        return None


def _alias_services(
    container: ContainerFacts,
    endpoint: Endpoint,
    excluded: list[Exclusion],
    parsed: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[tuple[str, str], ...]]],
) -> tuple[str, ...]:
    """Network aliases that name services. Docker adds the 12-digit short ID, and Compose the
    container's own name; neither names a service. Replicas share their aliases, so `parsed`
    (the build's) parses each tuple of them once."""
    own = (container.name, container.id, container.id[:12])
    aliases = tuple(a for a in endpoint.aliases if a not in own)
    found = parsed.get(aliases)
    if found is None:
        found = parsed[aliases] = _parse_aliases(aliases)
    names, errors = found
    excluded.extend(
        Exclusion(container.id, container.name, error, service=alias) for alias, error in errors
    )
    return names


def _parse_aliases(
    aliases: tuple[str, ...],
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Service names, and (alias, why not) for the aliases that are not names."""
    names = []
    errors = []
    for alias in aliases:
        try:
            names.append(L.parse_name(alias, "network alias"))
        except InvalidValue as error:
            errors.append((alias, str(error)))
    return tuple(names), tuple(errors)


def _backend_state(container: ContainerFacts, stopping: bool) -> BackendState:
    if stopping:
        return BackendState.STOPPING
    if container.status == "paused":
        return BackendState.PAUSED
    if container.health == "unhealthy":
        return BackendState.UNHEALTHY
    if container.health == "starting":
        return BackendState.STARTING
    return BackendState.UP


def _service(
    name: str,
    members: tuple[_Member, ...],
    reachable: frozenset[str] | None,
    domain: str,
    algorithm_override: Algorithm | None = None,
    backend_overrides: tuple[tuple[str, BackendOverride], ...] = (),
    health_override: HealthCheck | None = None,
) -> tuple[Service, tuple[Exclusion, ...]]:
    """`reachable`: networks some managed nginx is on (None: no nginx is managed)."""
    settings, warnings = _merge_service_labels(members)
    settings = _fit_health(settings, warnings)
    algorithm, source, problem = _algorithm(settings)
    if algorithm_override is not None:
        algorithm, source = algorithm_override, "override"
    elif problem:
        warnings.append(f"{problem}; using round_robin until that is fixed")
    chosen = dict(backend_overrides)
    no_backup = algorithm.method in METHODS_WITHOUT_BACKUP
    excluded = []
    backends = []
    for m in members:
        backend = m.backend
        if no_backup and backend.backup:
            excluded.append(
                Exclusion(
                    backend.container_id,
                    backend.container,
                    f"{L.BACKUP}=true can't be used with method {algorithm.method.value} "
                    "(nginx refuses it): left out of the upstream",
                    service=name,
                )
            )
            continue
        override = chosen.get(backend.container)
        if override is not None:
            drained = override.drain and backend.state is not BackendState.STOPPING
            backend = backend._replace(
                state=BackendState.DRAINING if drained else backend.state,
                weight=override.weight or backend.weight,
            )
        backends.append(backend)
    if reachable is not None and not all(m.backend.network in reachable for m in members):
        networks_of: dict[str, set[str]] = defaultdict(set)
        for m in members:
            networks_of[m.backend.container].add(m.backend.network)
        for container, networks in networks_of.items():
            if not networks & reachable:
                warnings.append(
                    f"{container} is on no network a managed nginx is on "
                    f"({', '.join(sorted(networks))}): nginx can't reach it, so it gets no "
                    "traffic; connect the nginx to one of them"
                )
    live = [b for b in backends if b.state is BackendState.UP]
    if live and all(b.backup for b in live):
        warnings.append(
            f"every live backend is {L.BACKUP}=true: they serve as primaries until one that is "
            "not a backup is up"
        )
    service = Service(
        name=name,
        networks=tuple(sorted({m.backend.network for m in members})),
        algorithm=algorithm,
        algorithm_source=source,
        hosts=settings.hosts or (),
        backends=tuple(backends),
        warnings=tuple(warnings),
        names=tuple(dict.fromkeys((name, f"{name}.{domain}", *(settings.hosts or ())))),
        health=health_override or _health(settings),
        health_source="api" if health_override else _health_source(settings),
    )
    return service, tuple(excluded)


def _merge_service_labels(members: Sequence[_Member]) -> tuple[L.ServiceLabels, list[str]]:
    """The first backend (oldest) that sets a service label wins; disagreement is reported.
    Replicas mostly say the same, which needs no merging."""
    first = members[0].service
    if all(m.service is first or m.service == first for m in members):
        return first, []
    chosen: dict[str, tuple[object, str]] = {}
    warnings: list[str] = []
    label_of = {
        "method": L.ALGORITHM,
        "hash_key": L.HASH_KEY,
        "consistent": L.HASH_CONSISTENT,
        "two": L.RANDOM_TWO,
        "hosts": L.HOSTS,
        "health": L.HEALTH,
        "start_period": L.HEALTH_START_PERIOD,
        "health_path": L.HEALTH_PATH,
        "health_port": L.HEALTH_PORT,
        "health_host": L.HEALTH_HOST,
        "health_status": L.HEALTH_STATUS,
        "health_interval": L.HEALTH_INTERVAL,
        "health_timeout": L.HEALTH_TIMEOUT,
        "health_fails": L.HEALTH_FAILS,
        "health_passes": L.HEALTH_PASSES,
    }
    for m in members:
        container = m.backend.container
        for field in _SERVICE_LABEL_FIELDS:
            value = getattr(m.service, field)
            if value is None:
                continue
            if field not in chosen:
                chosen[field] = (value, container)
            elif chosen[field][0] != value and container != chosen[field][1]:
                first_value, first_container = chosen[field]
                warning = (
                    f"{label_of[field]}: {container} says {_plain(value)} but "
                    f"{first_container} (older) says {_plain(first_value)}; using "
                    f"{_plain(first_value)}"
                )
                if warning not in warnings:
                    warnings.append(warning)
    merged = L.ServiceLabels(**{k: v for k, (v, _) in chosen.items()})  # type: ignore[arg-type]
    return merged, warnings


def _plain(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value.value if isinstance(value, Method) else value).lower()


def _algorithm(settings: L.ServiceLabels) -> tuple[Algorithm, str, str | None]:
    method = settings.method or Method.ROUND_ROBIN
    algorithm = Algorithm(
        method=method,
        key=settings.hash_key if method is Method.HASH else None,
        consistent=bool(settings.consistent) if method is Method.HASH else False,
        two=bool(settings.two) if method is Method.RANDOM else False,
    )
    problem = L.algorithm_problem(algorithm)
    if problem:
        return Algorithm(), "default", problem
    return algorithm, "label" if settings.method is not None else "default", None


_CHECK_FIELDS = tuple(f for f in _SERVICE_LABEL_FIELDS if f.startswith("health_"))
_HTTP_FIELDS = tuple(f"health_{f}" for f in L.HEALTH_HTTP_ONLY)


def _fit_health(settings: L.ServiceLabels, warnings: list[str]) -> L.ServiceLabels:
    """Each container's labels go with its own check mode (labels.health_misfit), but two
    containers can still disagree (one says tcp, another gives a path): the older one's mode
    stands, and a field it does not use is left out with a warning."""
    while True:
        given = [f for f in ("start_period", *_CHECK_FIELDS) if getattr(settings, f) is not None]
        misfit = L.health_misfit(
            settings.health,
            [f.removeprefix("health_") for f in given],
            L.HEALTH_LABELS.__getitem__,
            lambda mode: f"{L.HEALTH}={mode}",
        )
        if misfit is None:
            return settings
        field = "start_period" if misfit[0] == "start_period" else f"health_{misfit[0]}"
        warnings.append(f"{misfit[1]}; the containers disagree, so it is ignored until they agree")
        settings = replace(settings, **{field: None})


def _health(settings: L.ServiceLabels) -> HealthCheck:
    """No health label: the readiness gate alone. `health=tcp|http` or any check parameter
    makes the check active; a path, Host or status implies http."""
    default = HealthCheck()
    given = [f for f in _CHECK_FIELDS if getattr(settings, f) is not None]
    if settings.health is None and not given:
        return HealthCheck(start_period=settings.start_period or default.start_period)
    mode = settings.health
    if mode is None:
        http = any(getattr(settings, f) is not None for f in _HTTP_FIELDS)
        mode = HealthMode.HTTP if http else HealthMode.TCP
    return HealthCheck(
        mode=mode,
        active=mode is not HealthMode.NONE,
        start_period=settings.start_period or default.start_period,
        path=settings.health_path or default.path,
        port=settings.health_port,
        host=settings.health_host,
        status=settings.health_status or default.status,
        interval_ms=settings.health_interval or default.interval_ms,
        timeout_ms=settings.health_timeout or default.timeout_ms,
        fails=settings.health_fails or default.fails,
        passes=settings.health_passes or default.passes,
    )


def _health_source(settings: L.ServiceLabels) -> str:
    named = settings.health is not None or settings.start_period is not None
    return (
        "label"
        if named or any(getattr(settings, f) is not None for f in _CHECK_FIELDS)
        else "default"
    )


def _claim_hosts(services: list[Service], domain: str) -> tuple[list[Service], list[str]]:
    """Each host name routes to one service. Bare service names are claimed first, then every
    NAME.DOMAIN, then extra hosts from labels, each by the first service (by name) to ask.
    A service keeps the names `_service` gave it unless another one claimed one first."""
    owner: dict[str, str] = {}
    warnings = []

    def claim(service: Service, host: str, what: str) -> bool:
        if owner.setdefault(host, service.name) == service.name:
            return True
        warnings.append(
            f"{what} {host} of service {service.name} already routes to service "
            f"{owner[host]}: ignored for {service.name}"
        )
        return False

    for service in services:
        claim(service, service.name, "name")
    own = {s.name: claim(s, f"{s.name}.{domain}", "name") for s in services}
    result = []
    for service in services:
        hosts = tuple(h for h in service.hosts if claim(service, h, "host"))
        if own[service.name] and hosts == service.hosts:
            result.append(service)
            continue
        names = (service.name, *([f"{service.name}.{domain}"] if own[service.name] else []))
        result.append(replace(service, hosts=hosts, names=tuple(dict.fromkeys((*names, *hosts)))))
    return result, warnings
