"""The Docker edge's listing: inspect results and the networks are kept until an event
says they changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests

from controlplane.docker_source import DockerSource, parse_event
from controlplane.errors import DockerUnavailable

FIXTURES = Path(__file__).parent / "fixtures"


class CountingApi:
    """The listing calls DockerSource makes, counted; `manager`: the engine is a Swarm
    manager, whose services and tasks are the fixtures."""

    def __init__(self, manager: bool = False) -> None:
        self.calls: list[str] = []
        self.filters: list[dict[str, list[str]] | None] = []
        self.manager = manager
        self.leaderless = False

    def networks(self) -> list[dict[str, Any]]:
        self.calls.append("networks")
        return [{"Id": "n1", "Name": "app", "Driver": "bridge", "Scope": "local"}]

    def info(self) -> dict[str, Any]:
        self.calls.append("info")
        if self.manager:
            return {"Swarm": {"LocalNodeState": "active", "ControlAvailable": True, "NodeID": "n1"}}
        return {"Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False}}

    def _manager_only(self, what: str) -> None:
        self.calls.append(what)
        if not self.manager or self.leaderless:
            response = requests.Response()
            response.status_code = 503
            message = "The swarm does not have a leader." if self.manager else "not a manager."
            raise docker.errors.APIError(message, response, explanation=message)

    def services(self) -> list[dict[str, Any]]:
        self._manager_only("services")
        return [json.loads((FIXTURES / "swarm_service.json").read_text())]

    def tasks(self) -> list[dict[str, Any]]:
        self._manager_only("tasks")
        other = {"ID": "t-of-another-service", "ServiceID": "other", "DesiredState": "running"}
        return [*json.loads((FIXTURES / "swarm_tasks.json").read_text()), other]

    def containers(
        self, all: bool = False, filters: dict[str, list[str]] | None = None
    ) -> list[dict[str, Any]]:
        self.calls.append("containers")
        self.filters.append(filters)
        return [{"Id": "c1"}]

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.calls.append(f"inspect {container_id}")
        return {"Id": container_id, "Name": "/web", "State": {"Status": "running"}}


def test_networks_are_listed_again_only_after_they_may_have_changed() -> None:
    api = CountingApi()
    source = DockerSource(api)  # type: ignore[arg-type]
    first = source.snapshot()
    assert [n.name for n in first.networks] == ["app"]
    assert first.swarm_services is None
    assert api.calls == ["networks", "info", "containers", "inspect c1"]
    source.invalidate("c1")
    assert source.snapshot() == first
    assert api.calls[4:] == ["containers", "inspect c1"]
    source.invalidate_networks()
    source.snapshot()
    assert api.calls[6:] == ["networks", "info", "containers"]
    source.invalidate()
    source.snapshot()
    assert api.calls[9:] == ["networks", "info", "containers", "inspect c1"]


def test_a_manager_lists_services_and_tasks_in_every_pass() -> None:
    """A task on another node changes state without an event here: nothing is cached."""
    api = CountingApi(manager=True)
    source = DockerSource(api)  # type: ignore[arg-type]
    first = source.snapshot()
    [web] = first.swarm_services or ()
    assert (web.name, len(web.tasks), web.converging) == ("web", 2, True)
    assert first.node_id == "n1"  # a task elsewhere runs on an engine it does not reach
    assert api.calls == ["networks", "info", "containers", "inspect c1", "services", "tasks"]
    source.snapshot()
    assert api.calls[6:] == ["containers", "services", "tasks"]


def test_a_manager_demoted_since_it_was_asked_lists_no_services() -> None:
    api = CountingApi(manager=True)
    source = DockerSource(api)  # type: ignore[arg-type]
    source.snapshot()
    api.manager = False
    assert source.snapshot().swarm_services is None
    assert source.snapshot().swarm_services is None
    assert api.calls.count("services") == 2  # asked again with the networks only


def test_a_manager_whose_swarm_has_no_leader_fails_the_pass_rather_than_drop_services() -> None:
    api = CountingApi(manager=True)
    source = DockerSource(api)  # type: ignore[arg-type]
    source.snapshot()
    api.leaderless = True
    with pytest.raises(DockerUnavailable, match=r"does not have a leader.*keep the last listing"):
        source.snapshot()
    api.leaderless = False
    assert [s.name for s in source.snapshot().swarm_services or ()] == ["web"]


def test_losing_the_manager_mid_listing_says_the_engine_is_unavailable() -> None:
    api = CountingApi(manager=True)
    source = DockerSource(api)  # type: ignore[arg-type]
    source.snapshot()

    def broken() -> list[dict[str, Any]]:
        raise requests.exceptions.ConnectionError("connection refused")

    api.tasks = broken  # type: ignore[method-assign]
    with pytest.raises(DockerUnavailable, match="lost the Docker engine while listing"):
        source.snapshot()


@pytest.mark.parametrize(
    ("raw", "kind", "action"),
    [
        ({"Type": "service", "Action": "update", "Actor": {"ID": "s1"}}, "service", "update"),
        ({"Type": "service", "Action": "remove", "Actor": {"ID": "s1"}}, "service", "remove"),
        ({"Type": "node", "Action": "update", "Actor": {"ID": "n1"}}, "node", "update"),
    ],
    ids=["service-update", "service-remove", "node-update"],
)
def test_swarm_events_wake_the_loop(raw: dict[str, Any], kind: str, action: str) -> None:
    event = parse_event(raw)
    assert event is not None
    assert (event.kind, event.action, event.container_id) == (kind, action, "")


def test_with_named_networks_only_their_containers_are_listed() -> None:
    """Another controller's containers (on other networks) cost no inspect."""
    api = CountingApi()
    DockerSource(api, frozenset({"b", "a"})).snapshot()  # type: ignore[arg-type]
    DockerSource(api).snapshot()  # type: ignore[arg-type]
    assert api.filters == [{"network": ["a", "b"]}, None]


def test_events_keep_what_says_whether_they_concern_this_controller() -> None:
    connect = parse_event(
        {
            "Type": "network",
            "Action": "connect",
            "Actor": {"ID": "n1", "Attributes": {"container": "c" * 64, "name": "app"}},
            "timeNano": 5,
        }
    )
    assert connect is not None and (connect.network, connect.container_id) == ("app", "c" * 64)
    start = parse_event({"Type": "container", "Action": "start", "Actor": {"ID": "c" * 64}})
    assert start is not None and start.network is None
    assert parse_event({"Type": "container", "Action": "exec_start: sh", "Actor": {}}) is None
