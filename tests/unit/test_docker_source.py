"""The Docker edge's listing: inspect results and the networks are kept until an event
says they changed."""

from __future__ import annotations

from typing import Any

from controlplane.docker_source import DockerSource, parse_event


class CountingApi:
    """The three listing calls DockerSource makes, counted."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.filters: list[dict[str, list[str]] | None] = []

    def networks(self) -> list[dict[str, Any]]:
        self.calls.append("networks")
        return [{"Id": "n1", "Name": "app", "Driver": "bridge", "Scope": "local"}]

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
    assert api.calls == ["networks", "containers", "inspect c1"]
    source.invalidate("c1")
    assert source.snapshot() == first
    assert api.calls[3:] == ["containers", "inspect c1"]
    source.invalidate_networks()
    source.snapshot()
    assert api.calls[5:] == ["networks", "containers"]
    source.invalidate()
    source.snapshot()
    assert api.calls[7:] == ["networks", "containers", "inspect c1"]


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
