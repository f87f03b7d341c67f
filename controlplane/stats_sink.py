"""Where the managed nginx send their traffic reports (issue 17): the controller's address as
they reach it, with the listener's port and this run's tag, as one StatsSink for every
rendered config (one text for all nginx of a data plane).

In a container, the controller is reached at its own address on a network it shares with
the nginx; on the host (as in the tests), at a gateway of the nginx's networks: Docker gives
that address to the network's bridge on the host, so a datagram to it is delivered to a
listener bound there, with the nginx's own address as its source. A network picked is the one
most managed nginx are on; the choice is made by `choose` from plain facts, and `SinkFinder`
gathers those from Docker. `--stats-address` skips it all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import docker
import docker.errors

from controlplane.core.model import NginxTarget
from controlplane.core.render import StatsSink

log = logging.getLogger(__name__)

TAG_ALPHABET = string.ascii_letters + string.digits
TAG_LENGTH = 24
_MOUNT_ROOT_RE = re.compile(r"/containers/([0-9a-f]{64})/(?:resolv\.conf|hostname|hosts)")
_MOUNT_POINTS = frozenset({"/etc/resolv.conf", "/etc/hostname", "/etc/hosts"})
_CGROUP_RE = re.compile(r"(?:/docker/|/docker-)([0-9a-f]{64})(?:\.scope)?")


def new_tag() -> str:
    """This run's secret: nginx may only use [A-Za-z0-9_] in a syslog tag, 32 at most."""
    return "".join(secrets.choice(TAG_ALPHABET) for _ in range(TAG_LENGTH))


MEMORY_FILE = "stats-listener"
MEMORY_RE = re.compile(r"([0-9]{1,5}) ([A-Za-z0-9]{16,32})\n?")


def remembered(state_dir: Path | None) -> tuple[int, str] | None:
    """The port and tag the last run gave nginx, from the state directory: bound and used
    again, a controller restart leaves nginx's config as it is (no reload for it). None
    without a state directory, or when the file is absent or not ours."""
    if state_dir is None:
        return None
    try:
        text = (state_dir / MEMORY_FILE).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    match = MEMORY_RE.fullmatch(text)
    if match is None or not 0 < int(match.group(1)) < 65536:
        return None
    return int(match.group(1)), match.group(2)


def remember(state_dir: Path | None, port: int, tag: str) -> None:
    """Keeps this run's port and tag for the next (readable by the controller's user only:
    the tag is what nginx proves itself with). Losing it costs one reload, nothing more."""
    if state_dir is None:
        return
    path = state_dir / MEMORY_FILE
    fresh = path.with_name(path.name + ".new")
    try:
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(f"{port} {tag}\n")
        os.replace(fresh, path)
    except OSError as error:
        log.warning(
            "could not keep the stats listener's port in %s (%s): a restart will reload "
            "nginx once for its new port",
            state_dir,
            error,
        )


def own_container_id(mountinfo: str, cgroup: str) -> str | None:
    """The id of the container this process runs in, None on a host. The files Docker binds
    into every container (/etc/hostname, hosts, resolv.conf) come from its directory named by
    the id, whatever the cgroup version; the cgroup path names it too, under cgroup v1."""
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and fields[4] in _MOUNT_POINTS:
            match = _MOUNT_ROOT_RE.search(fields[3])
            if match:
                return match.group(1)
    for line in cgroup.splitlines():
        match = _CGROUP_RE.search(line.rsplit(":", 1)[-1])
        if match:
            return match.group(1)
    return None


@dataclass(frozen=True)
class NetworkInfo:
    """What the choice needs of one Docker network."""

    driver: str
    gateway: str | None
    """Its IPv4 gateway: the bridge's address on the host, for a bridge network."""
    internal: bool = False


def network_info(inspect: Mapping[str, Any]) -> NetworkInfo:
    """From `docker network inspect`. A network made with --subnet but no --gateway has no
    Gateway in its IPAM config, yet its bridge has the subnet's first address (Docker's
    default IPAM, checked on dockerd 20.10), so that is its gateway."""
    driver = str(inspect.get("Driver") or "")
    gateway = None
    for config in (inspect.get("IPAM") or {}).get("Config") or ():
        try:
            subnet = ipaddress.ip_network(str(config.get("Subnet") or ""), strict=False)
            given = config.get("Gateway")
            if subnet.version != 4:
                continue
            if given:
                gateway = str(ipaddress.IPv4Address(given))
            elif driver == "bridge" and subnet.num_addresses > 2:
                gateway = str(subnet.network_address + 1)
        except ValueError:
            continue
        break
    return NetworkInfo(driver, gateway, bool(inspect.get("Internal")))


class Choice(NamedTuple):
    host: str | None
    """None: no address a managed nginx can reach (`reason` says why)."""
    network: str | None
    unreached: tuple[str, ...]
    """Managed nginx that can't reach `host` (their reports are lost)."""
    reason: str


def choose(
    own: Mapping[str, str] | None,
    nginx: Mapping[str, Sequence[str]],
    networks: Mapping[str, NetworkInfo],
) -> Choice:
    """`own`: the controller's IPv4 address on each of its networks, None (or empty: host
    networking) when it is not in a container; `nginx`: each managed nginx's networks, by
    name; `networks`: what is known of those networks."""
    on: dict[str, list[str]] = {}
    for name, joined in sorted(nginx.items()):
        for network in joined:
            on.setdefault(network, []).append(name)
    if own:
        candidates = [n for n in on if own.get(n)]
        if not candidates:
            return Choice(
                None,
                None,
                tuple(sorted(nginx)),
                "the controller's container shares no network with a managed nginx; connect "
                "it to one of theirs, or set --stats-address to where they can reach it",
            )
        best = min(candidates, key=lambda n: (-len(on[n]), n))
        unreached = tuple(sorted(set(nginx) - set(on[best])))
        return Choice(own[best], best, unreached, f"its address on network {best}")

    def bridge(name: str) -> NetworkInfo | None:
        info = networks.get(name)
        return info if info is not None and info.driver == "bridge" and info.gateway else None

    candidates = [n for n in on if bridge(n)]
    if not candidates:
        return Choice(
            None,
            None,
            tuple(sorted(nginx)),
            "no managed nginx is on a bridge network with a gateway on this host; set "
            "--stats-address to an address of this host they can reach",
        )
    best = min(candidates, key=lambda n: (-len(on[n]), n))
    gateway = networks[best].gateway

    def reaches(joined: Sequence[str]) -> bool:
        """On the network, or routed to this host through any bridge that is not internal."""
        return best in joined or any(
            (info := bridge(n)) is not None and not info.internal for n in joined
        )

    unreached = tuple(sorted(name for name, joined in nginx.items() if not reaches(joined)))
    return Choice(gateway, best, unreached, f"the gateway of network {best}")


class SinkFinder:
    """`sink(targets)` for each pass: looked up in Docker only when the nginx's networks
    change (or after `invalidate`), so a pass costs nothing here otherwise."""

    def __init__(
        self,
        api: docker.APIClient,
        port: int,
        tag: str,
        address: str | None = None,
        proc: Path = Path("/proc/self"),
    ) -> None:
        """`address`: --stats-address, used as it is; `proc`: where to read mountinfo and
        cgroup (a test's directory)."""
        self._api = api
        self._port = port
        self._tag = tag
        self._address = address
        self._proc = proc
        self._last: tuple[frozenset[tuple[str, tuple[str, ...]]], StatsSink | None] | None = None

    def invalidate(self) -> None:
        self._last = None

    def sink(self, targets: Iterable[NginxTarget]) -> StatsSink | None:
        if self._address is not None:
            return StatsSink(self._address, self._port, self._tag)
        nginx = {t.container: tuple(t.networks) for t in targets}
        facts = frozenset(nginx.items())
        if self._last is not None and self._last[0] == facts:
            return self._last[1]
        try:
            choice = choose(self._own(), nginx, self._networks(nginx))
        except docker.errors.DockerException as error:
            log.warning("could not find where nginx should send traffic figures: %s", error)
            return self._last[1] if self._last is not None else None
        if choice.host is None:
            if nginx:
                log.warning("no traffic figures from nginx: %s", choice.reason)
            sink = None
        else:
            log.info(
                "nginx sends traffic figures to %s:%d, %s", choice.host, self._port, choice.reason
            )
            if choice.unreached:
                log.warning(
                    "nginx %s can't reach %s (%s): no traffic figures from them; connect them "
                    "to network %s, or set --stats-address",
                    ", ".join(choice.unreached),
                    choice.host,
                    choice.reason,
                    choice.network,
                )
            sink = StatsSink(choice.host, self._port, self._tag)
        self._last = (facts, sink)
        return sink

    def _own(self) -> dict[str, str] | None:
        """The controller's address on each of its networks, None when it is not a container
        of this engine."""
        try:
            container_id = own_container_id(
                (self._proc / "mountinfo").read_text(encoding="utf-8", errors="replace"),
                (self._proc / "cgroup").read_text(encoding="utf-8", errors="replace"),
            )
        except OSError:
            return None
        if container_id is None:
            return None
        try:
            inspect = self._api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        attached = (inspect.get("NetworkSettings") or {}).get("Networks") or {}
        return {
            name: str(endpoint.get("IPAddress"))
            for name, endpoint in attached.items()
            if endpoint and endpoint.get("IPAddress")
        }

    def _networks(self, nginx: Mapping[str, Sequence[str]]) -> dict[str, NetworkInfo]:
        found = {}
        for name in sorted({n for joined in nginx.values() for n in joined}):
            try:
                found[name] = network_info(self._api.inspect_network(name))
            except docker.errors.NotFound:
                continue
        return found
