"""`docker inspect` JSON -> owned facts, including the nulls and gaps real engines produce."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controlplane.core.model import ContainerFacts, Endpoint, NetworkFacts
from controlplane.core.observe import canonical_time, container_facts, network_facts

ID = "4f1c0d2e9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d"

# Trimmed from dockerd 20.10's `GET /containers/{id}/json`; the fields the core never reads
# are kept so the test also shows they are ignored.
INSPECT: dict[str, Any] = {
    "Id": ID,
    "Created": "2024-05-01T10:00:00.123456789Z",
    "Path": "/docker-entrypoint.sh",
    "Args": ["nginx", "-g", "daemon off;"],
    "State": {
        "Status": "running",
        "Running": True,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": 4242,
        "ExitCode": 0,
        "Error": "",
        "StartedAt": "2024-05-01T10:00:01.5Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
        "Health": {"Status": "healthy", "FailingStreak": 0, "Log": []},
    },
    "Image": "sha256:" + "ab" * 32,
    "Name": "/shop-web-1",
    "RestartCount": 0,
    "Config": {
        "Hostname": ID[:12],
        "Env": ["PATH=/usr/sbin:/usr/bin"],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "Image": "shop-web",
        "Labels": {
            "com.docker.compose.project": "shop",
            "controlplane.weight": "3",
        },
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}},
        "StopSignal": "SIGQUIT",
    },
    "NetworkSettings": {
        "Bridge": "",
        "Ports": {"80/tcp": None},
        "IPAddress": "",
        "Networks": {
            "shop_app": {
                "IPAMConfig": None,
                "Links": None,
                "Aliases": ["shop-web-1", "web", ID[:12]],
                "NetworkID": "9" * 64,
                "EndpointID": "8" * 64,
                "Gateway": "172.20.0.1",
                "IPAddress": "172.20.0.5",
                "IPPrefixLen": 16,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "fd00:20::5",
                "GlobalIPv6PrefixLen": 64,
                "MacAddress": "02:42:ac:14:00:05",
                "DriverOpts": None,
            },
            "bridge": {
                "Aliases": None,
                "IPAddress": "172.17.0.3",
                "GlobalIPv6Address": "",
            },
        },
    },
}


DELETE = object()


def inspect(**changes: Any) -> dict[str, Any]:
    """A copy of INSPECT with fields replaced; `State__Health=DELETE` removes that field."""
    data = copy.deepcopy(INSPECT)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return data


def test_container_facts_from_a_real_inspect() -> None:
    assert container_facts(INSPECT) == ContainerFacts(
        id=ID,
        name="shop-web-1",
        created="2024-05-01T10:00:00.123456789Z",
        status="running",
        health="healthy",
        started_at="2024-05-01T10:00:01.500000000Z",
        labels={"com.docker.compose.project": "shop", "controlplane.weight": "3"},
        exposed_tcp_ports=(80, 8080),
        endpoints=(
            Endpoint(network="bridge", ip="172.17.0.3", ipv6="", aliases=()),
            Endpoint(
                network="shop_app",
                ip="172.20.0.5",
                ipv6="fd00:20::5",
                aliases=("shop-web-1", "web", ID[:12]),
            ),
        ),
        stop_signal="SIGQUIT",
    )


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"Config__Labels": None}, "labels", {}),
        ({"Config__Labels": {"n": 1}}, "labels", {"n": "1"}),
        ({"Config__ExposedPorts": None}, "exposed_tcp_ports", ()),
        ({"Config__ExposedPorts": {"53/udp": {}}}, "exposed_tcp_ports", ()),
        ({"Config__ExposedPorts": {"x/tcp": {}, "443/tcp": {}}}, "exposed_tcp_ports", (443,)),
        ({"Config__StopSignal": DELETE}, "stop_signal", None),
        ({"Config__StopSignal": None}, "stop_signal", None),
        ({"Config": None}, "labels", {}),
        ({"State__Health": DELETE}, "health", None),
        ({"State__Health": None}, "health", None),
        ({"State__Health": {"Status": "none"}}, "health", None),
        ({"State__Health": {"Status": "starting"}}, "health", "starting"),
        ({"State__Health": {"Status": "unhealthy"}}, "health", "unhealthy"),
        ({"State": None}, "status", ""),
        ({"State__Status": "exited", "State__Running": False}, "status", "exited"),
        ({"State__Status": "paused", "State__Paused": True}, "status", "paused"),
        ({"State__Status": "running", "State__Paused": True}, "status", "paused"),
        ({"Name": DELETE}, "name", ""),
        ({"Created": None}, "created", ""),
        ({"Created": "2024-05-01T10:00:00.12Z"}, "created", "2024-05-01T10:00:00.120000000Z"),
        (
            {"State__StartedAt": "0001-01-01T00:00:00Z"},
            "started_at",
            "0001-01-01T00:00:00.000000000Z",
        ),
        ({"State__StartedAt": None}, "started_at", ""),
        ({"NetworkSettings": None}, "endpoints", ()),
        ({"NetworkSettings__Networks": None}, "endpoints", ()),
        ({"NetworkSettings__Networks": {}}, "endpoints", ()),
    ],
    ids=[
        "labels-null",
        "label-value-not-string",
        "exposed-null",
        "udp-only",
        "unparsable-port-skipped",
        "stop-signal-missing",
        "stop-signal-null",
        "config-null",
        "health-missing",
        "health-null",
        "health-none",
        "health-starting",
        "health-unhealthy",
        "state-null",
        "exited",
        "paused",
        "paused-flag-wins",
        "name-missing",
        "created-null",
        "created-padded",
        "never-started",
        "started-at-null",
        "network-settings-null",
        "networks-null",
        "no-networks",
    ],
)
def test_container_facts_absorbs_gaps(changes: dict[str, Any], field: str, expected: Any) -> None:
    assert getattr(container_facts(inspect(**changes)), field) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T10:00:00.123456789Z", "2024-05-01T10:00:00.123456789Z"),
        ("2024-05-01T10:00:00.1Z", "2024-05-01T10:00:00.100000000Z"),
        ("2024-05-01T10:00:00.12Z", "2024-05-01T10:00:00.120000000Z"),
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00.000000000Z"),
        ("2024-05-01T12:00:00.5+02:00", "2024-05-01T12:00:00.500000000+02:00"),
        ("2024-05-01T10:00:00.1234567891Z", "2024-05-01T10:00:00.1234567891Z"),
        ("2024-05-01 10:00:00Z", "2024-05-01 10:00:00Z"),
        ("yesterday", "yesterday"),
        ("", ""),
        (None, ""),
        (1714557600, ""),
    ],
    ids=[
        "nine-digits-kept",
        "one-digit",
        "two-digits",
        "no-fraction",
        "offset-kept",
        "ten-digits-left-alone",
        "not-rfc3339-left-alone",
        "garbage-left-alone",
        "empty",
        "null",
        "not-a-string",
    ],
)
def test_canonical_time(value: object, expected: str) -> None:
    assert canonical_time(value) == expected


def test_canonical_times_sort_as_text_in_time_order() -> None:
    """Docker trims trailing zeros of the nanoseconds, so raw text order is not time order."""
    raw = [
        "2024-05-01T10:00:01Z",
        "2024-05-01T10:00:00.12Z",
        "2024-05-01T10:00:00.1Z",
        "2024-05-01T10:00:00.000000001Z",
        "2024-05-01T10:00:00Z",
    ]
    assert sorted(raw) != raw[::-1]
    assert sorted(raw, key=canonical_time) == raw[::-1]


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (
            {"Aliases": None, "IPAddress": None, "GlobalIPv6Address": None},
            Endpoint("n", "", "", ()),
        ),
        ({}, Endpoint("n", "", "", ())),
        (None, Endpoint("n", "", "", ())),
        ({"Aliases": ["a"], "IPAddress": "10.0.0.2"}, Endpoint("n", "10.0.0.2", "", ("a",))),
    ],
    ids=["all-null", "empty", "endpoint-null", "partial"],
)
def test_endpoint_absorbs_nulls(endpoint: Any, expected: Endpoint) -> None:
    facts = container_facts(inspect(NetworkSettings__Networks={"n": endpoint}))
    assert facts.endpoints == (expected,)


def test_container_facts_of_an_empty_document() -> None:
    facts = container_facts({})
    assert (facts.id, facts.name, facts.status, facts.endpoints) == ("", "", "", ())


def test_labels_are_a_copy() -> None:
    data = inspect()
    facts = container_facts(data)
    data["Config"]["Labels"]["controlplane.weight"] = "9"
    assert facts.labels["controlplane.weight"] == "3"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"Name": "shop_app", "Id": "9" * 64, "Driver": "bridge", "Scope": "local"},
            NetworkFacts("9" * 64, "shop_app", "bridge", "local"),
        ),
        (
            {"Name": "ingress", "Id": "i", "Driver": "overlay", "Scope": "swarm", "IPAM": {}},
            NetworkFacts("i", "ingress", "overlay", "swarm"),
        ),
        ({"Name": "x", "Driver": None}, NetworkFacts("", "x", "", "")),
        ({}, NetworkFacts("", "", "", "")),
    ],
    ids=["bridge", "overlay", "nulls", "empty"],
)
def test_network_facts(entry: dict[str, Any], expected: NetworkFacts) -> None:
    assert network_facts(entry) == expected
