"""Where nginx sends its traffic reports: the controller's own container found from /proc,
the address chosen from plain facts (in a container: its address on a shared network; on
the host: a bridge's gateway), and the edge asking Docker only when the nginx change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker.errors
import pytest

from controlplane.core.model import NginxTarget
from controlplane.core.render import STATS_TAG_RE, StatsSink
from controlplane.stats_sink import (
    MEMORY_FILE,
    NetworkInfo,
    SinkFinder,
    choose,
    network_info,
    new_tag,
    own_container_id,
    remember,
    remembered,
)

CID = "384b61e3d3bf60044b6aa01bbd132648ee31f7ae33a57068893dceceb48aef52"
MOUNTINFO = f"""\
73 49 0:39 / / rw,relatime master:2 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X
78 77 0:46 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755
90 73 254:0 /var/lib/docker/containers/{CID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw
91 73 254:0 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw
"""
CGROUP_V1 = f"4:memory:/docker/{CID}\n0::/docker/{CID}\n"
HOST_CGROUP = "9:name=systemd:/\n0::/init.scope\n"


@pytest.mark.parametrize(
    ("mountinfo", "cgroup", "expected"),
    [
        (MOUNTINFO, "0::/\n", CID),
        ("", CGROUP_V1, CID),
        ("", f"0::/system.slice/docker-{CID}.scope\n", CID),
        (
            # another container's directory bound elsewhere is not ours
            f"90 73 254:0 /var/lib/docker/containers/{CID}/hostname /mnt/x rw - ext4 /dev/vda rw\n",
            HOST_CGROUP,
            None,
        ),
        ("", HOST_CGROUP, None),
        ("garbage\n\n", "x", None),
    ],
    ids=["mountinfo-cgroup-v2", "cgroup-v1", "systemd-scope", "bound-elsewhere", "host", "garbage"],
)
def test_own_container_id(mountinfo: str, cgroup: str, expected: str | None) -> None:
    assert own_container_id(mountinfo, cgroup) == expected


@pytest.mark.parametrize(
    ("inspect", "expected"),
    [
        (
            {
                "Driver": "bridge",
                "IPAM": {"Config": [{"Subnet": "192.168.224.0/20", "Gateway": "192.168.224.1"}]},
            },
            NetworkInfo("bridge", "192.168.224.1"),
        ),
        (
            {"Driver": "bridge", "IPAM": {"Config": [{"Subnet": "10.77.0.0/24"}]}},
            NetworkInfo("bridge", "10.77.0.1"),
        ),
        (
            {
                "Driver": "bridge",
                "Internal": True,
                "IPAM": {
                    "Config": [
                        {"Subnet": "fd00::/64", "Gateway": "fd00::1"},
                        {"Subnet": "172.30.0.0/16", "Gateway": "172.30.0.1"},
                    ]
                },
            },
            NetworkInfo("bridge", "172.30.0.1", internal=True),
        ),
        (
            {"Driver": "macvlan", "IPAM": {"Config": [{"Subnet": "10.1.0.0/24"}]}},
            NetworkInfo("macvlan", None),
        ),
        ({"Driver": "bridge", "IPAM": {"Config": None}}, NetworkInfo("bridge", None)),
        ({"Driver": "bridge", "IPAM": {"Config": [{"Subnet": "x"}]}}, NetworkInfo("bridge", None)),
    ],
    ids=["gateway", "subnet-only", "ipv6-first-internal", "macvlan", "no-config", "garbage"],
)
def test_network_info(inspect: dict[str, Any], expected: NetworkInfo) -> None:
    assert network_info(inspect) == expected


BRIDGES = {
    "front": NetworkInfo("bridge", "172.20.0.1"),
    "back": NetworkInfo("bridge", "172.21.0.1"),
    "sealed": NetworkInfo("bridge", "172.22.0.1", internal=True),
    "lan": NetworkInfo("macvlan", None),
}


@pytest.mark.parametrize(
    ("own", "nginx", "host", "unreached"),
    [
        (None, {"lb1": ["front"]}, "172.20.0.1", ()),
        (None, {"lb1": ["front"], "lb2": ["back"], "lb3": ["back", "front"]}, "172.21.0.1", ()),
        (None, {"lb1": ["front"], "lb2": ["sealed"]}, "172.20.0.1", ("lb2",)),
        (None, {"lb1": ["lan"]}, None, ("lb1",)),
        ({}, {"lb1": ["front"]}, "172.20.0.1", ()),
        ({"front": "172.20.0.9", "back": "172.21.0.9"}, {"lb1": ["back"]}, "172.21.0.9", ()),
        ({"front": "172.20.0.9"}, {"lb1": ["front"], "lb2": ["back"]}, "172.20.0.9", ("lb2",)),
        ({"other": "10.0.0.9"}, {"lb1": ["front"]}, None, ("lb1",)),
        (None, {}, None, ()),
    ],
    ids=[
        "host-gateway",
        "host-most-nginx",
        "host-internal-unreached",
        "host-no-bridge",
        "host-networking",
        "container-shared",
        "container-partly",
        "container-none-shared",
        "no-nginx",
    ],
)
def test_choose(
    own: dict[str, str] | None,
    nginx: dict[str, list[str]],
    host: str | None,
    unreached: tuple[str, ...],
) -> None:
    choice = choose(own, nginx, BRIDGES)
    assert (choice.host, choice.unreached) == (host, unreached), choice.reason
    if host is None and nginx:
        assert "--stats-address" in choice.reason


def test_tags_are_fresh_and_fit_nginx() -> None:
    tags = {new_tag() for _ in range(20)}
    assert len(tags) == 20 and all(STATS_TAG_RE.fullmatch(t) for t in tags)


class FakeApi:
    def __init__(self, containers: dict[str, dict[str, Any]], networks: dict[str, dict[str, Any]]):
        self.containers, self.networks, self.calls = containers, networks, 0

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.calls += 1
        if container_id not in self.containers:
            raise docker.errors.NotFound("no such container")
        return self.containers[container_id]

    def inspect_network(self, name: str) -> dict[str, Any]:
        self.calls += 1
        if name not in self.networks:
            raise docker.errors.NotFound("no such network")
        return self.networks[name]


def target(name: str, *networks: str) -> NginxTarget:
    return NginxTarget(f"id-{name}", name, "/etc/nginx/conf.d/controlplane.conf", "t", networks)


FRONT = {
    "Driver": "bridge",
    "IPAM": {"Config": [{"Subnet": "172.20.0.0/16", "Gateway": "172.20.0.1"}]},
}


def proc(tmp_path: Path, mountinfo: str) -> Path:
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text("0::/\n")
    return tmp_path


def test_on_the_host_nginx_sends_to_the_gateway_and_docker_is_asked_once(tmp_path: Path) -> None:
    api = FakeApi({}, {"front": FRONT})
    finder = SinkFinder(api, 5514, "T" * 20, proc=proc(tmp_path, ""))  # type: ignore[arg-type]
    targets = [target("lb1", "front")]
    assert finder.sink(targets) == StatsSink("172.20.0.1", 5514, "T" * 20)
    calls = api.calls
    assert finder.sink(targets) == StatsSink("172.20.0.1", 5514, "T" * 20)
    assert api.calls == calls
    finder.invalidate()
    finder.sink(targets)
    assert api.calls > calls
    assert finder.sink([target("lb1", "gone")]) is None


def test_in_a_container_nginx_sends_to_its_address(tmp_path: Path) -> None:
    own = {"NetworkSettings": {"Networks": {"front": {"IPAddress": "172.20.0.9"}}}}
    api = FakeApi({CID: own}, {"front": FRONT})
    finder = SinkFinder(api, 5514, "T" * 20, proc=proc(tmp_path, MOUNTINFO))  # type: ignore[arg-type]
    assert finder.sink([target("lb1", "front")]) == StatsSink("172.20.0.9", 5514, "T" * 20)


def test_a_container_of_another_engine_is_on_a_host_here(tmp_path: Path) -> None:
    api = FakeApi({}, {"front": FRONT})
    finder = SinkFinder(api, 5514, "T" * 20, proc=proc(tmp_path, MOUNTINFO))  # type: ignore[arg-type]
    assert finder.sink([target("lb1", "front")]) == StatsSink("172.20.0.1", 5514, "T" * 20)


def test_stats_address_is_taken_as_it_is(tmp_path: Path) -> None:
    api = FakeApi({}, {})
    finder = SinkFinder(api, 5514, "T" * 20, address="10.1.2.3", proc=tmp_path)  # type: ignore[arg-type]
    assert finder.sink([target("lb1", "front")]) == StatsSink("10.1.2.3", 5514, "T" * 20)
    assert api.calls == 0


def test_the_port_and_tag_are_kept_for_the_next_run(tmp_path: Path) -> None:
    """A restarted controller binds the same port with the same tag, so nginx's config is
    unchanged (no reload for it); a file that is not ours is ignored."""
    assert remembered(tmp_path) is None
    remember(tmp_path, 40123, "a" * 24)
    assert remembered(tmp_path) == (40123, "a" * 24)
    assert (tmp_path / MEMORY_FILE).stat().st_mode & 0o777 == 0o600
    for junk in ("", "70000 " + "a" * 24, "80 short", "80 " + "a" * 24 + " more", "\xff"):
        (tmp_path / MEMORY_FILE).write_text(junk, encoding="latin-1")
        assert remembered(tmp_path) is None
    assert remembered(None) is None
    remember(None, 1, "b" * 24)  # no state directory: nothing kept
