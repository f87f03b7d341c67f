"""The typed model: what Docker shows (facts) and what controlplane makes of it (topology).

Every value is frozen so a snapshot can be shared between the reconciler, the DNS server and
the API without locks; a new snapshot replaces the old one as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple


class Method(StrEnum):
    """nginx balancing methods, named as operators write them in labels and the API."""

    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"
    IP_HASH = "ip_hash"
    HASH = "hash"
    RANDOM = "random"
    LEAST_TIME = "least_time"
    """Only on the dynamic data plane: nginx OSS has no such method."""


class DataPlane(StrEnum):
    """How a managed nginx gets its backends: `reload` renders them into its config (every
    change is a reload; any nginx), `dynamic` pushes them to a Lua balancer in it (no reload;
    needs lua-nginx-module), `auto` picks dynamic where that nginx has the module."""

    AUTO = "auto"
    DYNAMIC = "dynamic"
    RELOAD = "reload"


class SwarmEndpoint(StrEnum):
    """What a Swarm service's upstream holds: `tasks`, each running task's address (so
    least_conn, hash and least_time see every backend), or `vip`, the one virtual IP that
    Docker balances itself."""

    TASKS = "tasks"
    VIP = "vip"


class HealthMode(StrEnum):
    """How the controller checks a service's backends: `tcp` by a connect to the port, `http`
    by a GET whose status must be in range, `none` not at all (a backend is served as soon as
    it runs and Docker's own health check, if any, passes)."""

    TCP = "tcp"
    HTTP = "http"
    NONE = "none"


@dataclass(frozen=True)
class HealthCheck:
    """A service's check, from its service-wide labels or the API. Without any health label
    it is the readiness gate alone: a new backend's port must accept a connection before it
    gets traffic, and it is not checked after that. A health label makes the check `active`:
    every backend is checked every `interval` for as long as it runs, `fails` failures in a
    row take it out and `passes` successes in a row bring it back."""

    mode: HealthMode = HealthMode.TCP
    active: bool = False
    start_period: int = 60
    """Seconds a new backend has to pass its first check; after that it stays out (checked
    on, if the check is active) with the reason."""
    path: str = "/"
    port: int | None = None
    """The port to check; None: the backend's own."""
    host: str | None = None
    """The HTTP Host header; None: the backend's address."""
    status: tuple[int, int] = (200, 399)
    """The statuses that pass, both ends included."""
    interval_ms: int = 5000
    timeout_ms: int = 1000
    fails: int = 3
    passes: int = 2


METHODS_WITHOUT_BACKUP = frozenset({Method.HASH, Method.IP_HASH, Method.RANDOM})


@dataclass(frozen=True)
class Algorithm:
    method: Method = Method.ROUND_ROBIN
    key: str | None = None
    consistent: bool = False
    two: bool = False

    def __str__(self) -> str:
        """As operators write it: `hash $request_uri consistent`, `random two`."""
        words = [self.method.value, *([self.key] if self.key else [])]
        return " ".join(words + [f for f in ("consistent", "two") if getattr(self, f)])


class BackendState(StrEnum):
    """Why a backend does or does not get traffic; only UP backends are served."""

    UP = "up"
    PAUSED = "paused"
    UNHEALTHY = "unhealthy"
    STARTING = "starting"
    STOPPING = "stopping"
    DRAINING = "draining"


@dataclass(frozen=True)
class Endpoint:
    """One network attachment of a container, as `docker inspect` shows it."""

    network: str
    ip: str
    ipv6: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class ContainerFacts:
    """The part of `docker inspect` that controlplane reads, owned so no SDK object leaks."""

    id: str
    name: str
    created: str
    status: str
    health: str | None
    started_at: str
    labels: Mapping[str, str] = field(hash=False)
    exposed_tcp_ports: tuple[int, ...]
    endpoints: tuple[Endpoint, ...]
    stop_signal: str | None

    def __hash__(self) -> int:
        """Cheap, for the builder's memo: equal facts have equal IDs, states and start times."""
        return hash((self.id, self.status, self.health, self.started_at))


@dataclass(frozen=True)
class NetworkFacts:
    id: str
    name: str
    driver: str
    scope: str
    subnets: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskAddress:
    """A Swarm task's (or a service's virtual) address on one network."""

    network_id: str
    network: str
    ip: str
    ipv6: str = ""


TASK_MOVING_STATES = frozenset(
    {"new", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
)
"""Task states on the way to running: Docker is still placing or starting the task."""


@dataclass(frozen=True)
class TaskFacts:
    """One task of a Swarm service, on any node, as the manager lists it."""

    id: str
    name: str
    """SERVICE.SLOT.ID (SERVICE.NODE.ID in global mode): its container's name."""
    node: str
    state: str
    desired_state: str
    created: str
    addresses: tuple[TaskAddress, ...]
    container_id: str = ""
    """Its container's ID, on its node's engine; empty until the node has created it."""

    @property
    def moving(self) -> bool:
        """Docker is still taking it to its desired state."""
        if self.desired_state == "running":
            return self.state in TASK_MOVING_STATES
        return self.state == "running" or self.state in TASK_MOVING_STATES


@dataclass(frozen=True)
class SwarmServiceFacts:
    """A Swarm service and its live tasks, owned so no SDK object leaks."""

    id: str
    name: str
    created: str
    labels: Mapping[str, str] = field(hash=False)
    """The service's labels overlaid by its task template's container labels."""
    networks: tuple[str, ...]
    """IDs of the networks its task template attaches."""
    endpoint_mode: str
    """vip or dnsrr."""
    virtual_ips: tuple[TaskAddress, ...]
    replicas: int | None
    """Replicated mode's desired count; None in global mode."""
    updating: bool
    """A rolling update (or its rollback) is under way."""
    tasks: tuple[TaskFacts, ...]
    """Those that run or are meant to: a task's history is left out."""

    @property
    def converging(self) -> bool:
        """Docker is still moving it (an update, a scale, a restart): worth listing again
        soon rather than at the next event."""
        wanted = sum(1 for t in self.tasks if t.desired_state == "running")
        return (
            self.updating
            or any(t.moving for t in self.tasks)
            or (self.replicas is not None and wanted != self.replicas)
        )


@dataclass(frozen=True)
class DockerState:
    containers: tuple[ContainerFacts, ...]
    networks: tuple[NetworkFacts, ...]
    swarm_services: tuple[SwarmServiceFacts, ...] | None = None
    """None: the engine is no Swarm manager, so services and tasks can't be listed."""
    node_id: str = ""
    """The Swarm node this engine is (empty outside a swarm): a task on another node runs on
    an engine this controller does not reach."""


@dataclass(frozen=True)
class BackendOverride:
    """An operator's choice for one container of one service, made through the API."""

    weight: int | None = None
    drain: bool = False


@dataclass(frozen=True)
class Overrides:
    """Every persisted operator choice; it beats what labels say. Backends are keyed by
    container name, which survives a restart of the container and of the controller."""

    algorithms: Mapping[str, Algorithm] = field(default_factory=dict, hash=False)
    backends: Mapping[str, Mapping[str, BackendOverride]] = field(default_factory=dict, hash=False)
    health: Mapping[str, HealthCheck] = field(default_factory=dict, hash=False)


class Backend(NamedTuple):
    """One container on one network, serving one service. A tuple, not a frozen dataclass:
    a pass over 10,000 containers builds one each, and a tuple is several times cheaper to
    build and to hash."""

    container_id: str
    container: str
    network: str
    ip: str
    ipv6: str
    port: int
    created: str
    state: BackendState = BackendState.UP
    weight: int = 1
    backup: bool = False
    max_fails: int | None = None
    fail_timeout: str | None = None
    max_conns: int | None = None
    started_at: str = ""
    """When its container last started: a restart makes it a new backend to check."""


@dataclass(frozen=True)
class Service:
    name: str
    networks: tuple[str, ...]
    algorithm: Algorithm
    algorithm_source: str
    hosts: tuple[str, ...]
    backends: tuple[Backend, ...]
    warnings: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    """Every host name that routes to this service: NAME, NAME.DOMAIN, then `hosts`, each
    only where no other service owns it first."""
    health: HealthCheck = HealthCheck()
    health_source: str = "default"
    """Where `health` came from: default, label or api."""

    @property
    def live_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.state is BackendState.UP)


@dataclass(frozen=True)
class Exclusion:
    """A container (or one of its aliases) left out, with the reason the operator needs."""

    container_id: str
    container: str
    reason: str
    service: str | None = None


@dataclass(frozen=True)
class NginxTarget:
    """A managed nginx container: where its config goes and which networks it can reach."""

    container_id: str
    container: str
    config_path: str
    started_at: str
    networks: tuple[str, ...]
    dataplane: DataPlane | None = None
    """Its `controlplane.dataplane` label; None: the controller's --dataplane."""


@dataclass(frozen=True)
class RemoteNginx:
    """A task of an nginx Swarm service that runs on another node: listed, not managed, since
    its config goes through the engine of the node it runs on."""

    task_id: str
    task: str
    node: str
    reason: str


@dataclass(frozen=True)
class Topology:
    services: tuple[Service, ...] = ()
    excluded: tuple[Exclusion, ...] = ()
    nginx: tuple[NginxTarget, ...] = ()
    warnings: tuple[str, ...] = ()
    networks: tuple[NetworkFacts, ...] = ()
    """The watched networks."""
    remote_nginx: tuple[RemoteNginx, ...] = ()
