"""The Docker edge for discovery: listing, inspecting and the event stream.

Inspect results are cached per container and dropped whenever an event names that container,
so a reconcile after one event inspects one container, not all of them; a periodic full resync
drops the whole cache, which repairs anything an event could have missed. On a Swarm manager,
every pass also lists the services and their tasks (on every node) through the manager's API:
a task on another node changes state without any event here, so nothing of it is cached.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.utils import kwargs_from_env

from controlplane.core.model import ContainerFacts, DockerState, NetworkFacts, SwarmServiceFacts
from controlplane.core.observe import (
    container_facts,
    is_swarm_manager,
    network_facts,
    swarm_node_id,
    swarm_service_facts,
)
from controlplane.errors import DockerUnavailable

log = logging.getLogger(__name__)

CONTAINER_ACTIONS = frozenset(
    {
        "start",
        "restart",
        "kill",
        "die",
        "stop",
        "pause",
        "unpause",
        "destroy",
        "rename",
        "update",
        "oom",
        "health_status",
    }
)
NETWORK_ACTIONS = frozenset({"connect", "disconnect", "create", "destroy"})
SWARM_KINDS = frozenset({"service", "node"})
"""A manager's events for a service (create, update, remove: a scale, a rolling update) or a
node (its availability, its loss): the pass lists services and tasks again."""
EVENT_TYPES = ["container", "network", *sorted(SWARM_KINDS)]
DOCKER_ERRORS = (requests.exceptions.ConnectionError, docker.errors.DockerException, OSError)


@dataclass(frozen=True)
class DockerEvent:
    """A Docker event reduced to what the loop needs. `time_ns` is the engine's timestamp and
    `received_ns` this process's clock on arrival, for the event-to-served breakdown."""

    kind: str
    action: str
    container_id: str
    signal: str | None
    time_ns: int
    received_ns: int = 0
    network: str | None = None
    """A network event's network name."""


def connect(base_url: str | None, timeout: int = 10) -> docker.APIClient:
    """A low-level client negotiating the engine's API version (dockerd 20.10 is API 1.41)."""
    try:
        if base_url:
            # TLS settings still come from DOCKER_TLS_VERIFY and DOCKER_CERT_PATH.
            tls = kwargs_from_env().get("tls", False)
            api = docker.APIClient(base_url=base_url, version="auto", timeout=timeout, tls=tls)
        else:
            api = docker.from_env(version="auto", timeout=timeout).api
        api.ping()
    except DOCKER_ERRORS as error:
        where = base_url or "DOCKER_HOST or the default socket"
        raise DockerUnavailable(
            f"cannot reach the Docker engine at {where}: {error}. Start dockerd, or point "
            "--docker-url (or DOCKER_HOST) at it, and check you may use its socket"
        ) from error
    return api


def parse_event(raw: dict[str, Any], received_ns: int = 0) -> DockerEvent | None:
    """None for events that can't change the topology (exec, attach, archive, ...)."""
    kind = raw.get("Type")
    action = str(raw.get("Action") or raw.get("status") or "").split(":", 1)[0]
    actor = raw.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    if kind == "container" and action in CONTAINER_ACTIONS:
        container_id = str(actor.get("ID") or raw.get("id") or "")
    elif kind == "network" and action in NETWORK_ACTIONS:
        container_id = str(attributes.get("container") or "")
    elif kind in SWARM_KINDS:
        container_id = ""
    else:
        return None
    return DockerEvent(
        kind=kind,
        action=action,
        container_id=container_id,
        signal=attributes.get("signal"),
        time_ns=int(raw.get("timeNano") or 0),
        received_ns=received_ns,
        network=str(attributes["name"]) if kind == "network" and "name" in attributes else None,
    )


class DockerSource:
    def __init__(self, api: docker.APIClient, networks: frozenset[str] | None = None) -> None:
        """`networks`: the watched ones, when named: only their containers are listed and
        inspected, so other containers on the engine cost nothing."""
        self._api = api
        self._filters = {"network": sorted(networks)} if networks else None
        self._cache: dict[str, ContainerFacts] = {}
        self._networks: tuple[NetworkFacts, ...] | None = None
        """Listed again after a network event (or a full invalidate): one engine call fewer
        in a pass that a container's event started."""
        self._manager = False
        """Whether the engine is a Swarm manager, asked again with the networks."""
        self._node_id = ""
        """The Swarm node the engine is, asked with it."""
        self._stream: Any = None

    def invalidate(self, container_id: str | None = None) -> None:
        """Forget one container's inspect result, or everything (networks too) with None."""
        if container_id is None:
            self._cache.clear()
            self._networks = None
        else:
            self._cache.pop(container_id, None)

    def invalidate_networks(self) -> None:
        self._networks = None

    def known(self, container_id: str) -> ContainerFacts | None:
        return self._cache.get(container_id)

    def inspect(self, container_id: str) -> ContainerFacts | None:
        try:
            facts = self._inspect(container_id)
        except DOCKER_ERRORS as error:
            raise DockerUnavailable(f"lost the Docker engine while inspecting: {error}") from error
        if facts is not None:
            self._cache[container_id] = facts
        return facts

    def snapshot(self) -> DockerState:
        try:
            if self._networks is None:
                self._networks = tuple(network_facts(n) for n in self._api.networks())
                info = self._api.info()
                self._manager = is_swarm_manager(info)
                self._node_id = swarm_node_id(info)
            networks = self._networks
            listed = [c["Id"] for c in self._api.containers(all=False, filters=self._filters)]
            containers = []
            for container_id in listed:
                facts = self._cache.get(container_id) or self._inspect(container_id)
                if facts is not None:
                    self._cache[container_id] = facts
                    containers.append(facts)
            swarm = self._swarm_services() if self._manager else None
        except DOCKER_ERRORS as error:
            raise DockerUnavailable(f"lost the Docker engine while listing: {error}") from error
        for gone in set(self._cache) - set(listed):
            del self._cache[gone]
        return DockerState(
            containers=tuple(containers),
            networks=networks,
            swarm_services=swarm,
            node_id=self._node_id,
        )

    def _swarm_services(self) -> tuple[SwarmServiceFacts, ...] | None:
        """None when the engine stopped being a manager since it was asked. A manager that
        can't list (its swarm has no leader: a partition, a failover) fails the pass, which
        leaves nginx and DNS as they are: answering None would drop every Swarm service."""
        api: Any = self._api  # docker-py leaves these two calls unannotated
        try:
            services = api.services()
            tasks = api.tasks()
        except docker.errors.APIError as error:
            if error.status_code != 503:
                raise
            # "This node is not a swarm manager", or a manager whose swarm has no leader
            if is_swarm_manager(self._api.info()):
                raise DockerUnavailable(
                    f"the Swarm manager lists no services ({error.explanation}): its swarm "
                    "may have no leader (a partition, or a manager failover under way). nginx "
                    "and DNS keep the last listing; the next event or resync lists again. If "
                    "it lasts, check `docker node ls` on another manager"
                ) from error
            self._manager = False
            return None
        by_service: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for task in tasks:
            by_service[str(task.get("ServiceID") or "")].append(task)
        return tuple(swarm_service_facts(s, by_service[str(s.get("ID"))]) for s in services)

    def _inspect(self, container_id: str) -> ContainerFacts | None:
        try:
            return container_facts(self._api.inspect_container(container_id))
        except docker.errors.NotFound:
            log.debug("container %s vanished between listing and inspect", container_id[:12])
            return None

    def open_events(self) -> Iterator[DockerEvent]:
        """Opens the stream now (raising DockerUnavailable if it can't) and yields from it."""
        try:
            stream = self._api.events(decode=True, filters={"type": EVENT_TYPES})
        except DOCKER_ERRORS as error:
            raise DockerUnavailable(f"cannot open the Docker event stream: {error}") from error
        self._stream = stream
        return self._follow(stream)

    def close_events(self) -> None:
        """Unblocks a thread reading the stream; used at shutdown."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    @staticmethod
    def _follow(stream: Iterator[dict[str, Any]]) -> Iterator[DockerEvent]:
        try:
            for raw in stream:
                event = parse_event(raw, time.time_ns())
                if event is not None:
                    yield event
        except DOCKER_ERRORS as error:
            raise DockerUnavailable(f"the Docker event stream broke: {error}") from error
