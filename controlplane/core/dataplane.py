"""The dynamic data plane's half in the core: which mode each nginx runs, and the state its
Lua balancer (templates/lua/controlplane.lua) reads from the files the controller writes.

The state file is text: a header line, then one line per service, `name TAB rev TAB hosts
TAB json` (hosts: the host names that route to it, space-separated). `rev` is a digest of the
json, so the Lua loader copies only the services whose rev changed into its shared dict and
workers decode only those; a line is cached here by the Service's
identity for the same reason as render.RenderCache: one changed service costs one line.

Beside it, the delta file: the lines of every service touched since that state file (the
base) was written, or a removed service's bare name. It is cumulative, so the loader needs
only the base and the latest delta, and one changed service costs a write of its own line,
not of the whole state; a delta that would outgrow a quarter of its base is written as a new
base instead (`next_push`).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from controlplane.core.model import Backend, BackendState, DataPlane, Service
from controlplane.core.render import address, upstream_backends

STATE_FORMAT = "controlplane-state 3"
DELTA_FORMAT = "controlplane-delta 3"
REBASE_RATIO = 0.25
"""A delta larger than this share of its base is written as a new base."""
NGINX_MAX_FAILS = 1
NGINX_FAIL_TIMEOUT = 10
"""nginx's defaults for a server without max_fails / fail_timeout, which the Lua side keeps."""
_UNIT_SECONDS = MappingProxyType({"s": 1, "m": 60, "h": 3600})


def state_path(config_path: str) -> str:
    """Where the state goes: beside the config, named so nginx's `include *.conf` skips it."""
    return posixpath.splitext(config_path)[0] + ".state"


def delta_path(config_path: str) -> str:
    """Where the deltas over the state go, beside it."""
    return posixpath.splitext(config_path)[0] + ".delta"


def seconds(duration: str | None) -> int:
    """A label duration (labels.parse_duration's grammar: 10, 10s, 2m, 1h) in seconds."""
    if duration is None:
        return NGINX_FAIL_TIMEOUT
    unit = duration[-1]
    if unit in _UNIT_SECONDS:
        return int(duration[:-1]) * _UNIT_SECONDS[unit]
    return int(duration)


def _peer(backend: Backend) -> dict[str, object]:
    host = address(backend).rpartition(":")[0].strip("[]")
    return {
        "addr": address(backend),
        "host": host,
        "port": backend.port,
        "weight": backend.weight,
        "down": backend.state is BackendState.DRAINING,
        "backup": backend.backup,
        "max_fails": NGINX_MAX_FAILS if backend.max_fails is None else backend.max_fails,
        "fail_timeout": seconds(backend.fail_timeout),
        "max_conns": backend.max_conns or 0,
        "container": backend.container,
    }


def service_line(service: Service, reachable: frozenset[str]) -> str:
    """`name TAB rev TAB hosts TAB json` for one service: its host names (the Lua side
    routes by Host), then its method and the backends the reload mode would render, drained
    ones kept but down, so hash rings keep every other key where it was."""
    backends = upstream_backends(service, reachable)
    if backends and all(b.backup for b in backends):
        backends = tuple(b._replace(backup=False) for b in backends)
    algorithm = service.algorithm
    body = json.dumps(
        {
            "method": algorithm.method.value,
            "key": algorithm.key,
            "consistent": algorithm.consistent,
            "two": algorithm.two,
            "peers": [_peer(b) for b in backends],
        },
        separators=(",", ":"),
        ensure_ascii=True,
    )
    rev = hashlib.sha256(body.encode()).hexdigest()[:16]
    hosts = " ".join(service.names or (service.name,))
    return f"{service.name}\t{rev}\t{hosts}\t{body}"


class StateCache:
    """Each service's line from the last state, found by the Service's identity (the
    builder hands over the same Service for an unchanged one); starts afresh when the
    reachable networks change."""

    def __init__(self) -> None:
        self._reachable: frozenset[str] | None = None
        self._entries: dict[int, tuple[Service, str]] = {}

    def lines(self, services: Iterable[Service], reachable: frozenset[str]) -> tuple[str, ...]:
        last = self._entries if reachable == self._reachable else {}
        entries: dict[int, tuple[Service, str]] = {}
        for service in services:
            entry = last.get(id(service))
            if entry is None:
                entry = (service, service_line(service, reachable))
            entries[id(service)] = entry
        self._reachable, self._entries = reachable, entries
        return tuple(line for _, line in entries.values())


def state_text(version: int, lines: Sequence[str]) -> str:
    """The whole file; the header's count lets the loader tell a torn file from a whole one."""
    return "\n".join([f"{STATE_FORMAT} {version} {len(lines)}", *lines]) + "\n"


@dataclass(frozen=True)
class Pushed:
    """What one nginx was given: the base's version and size, each service's line as of the
    last push, and the services touched since the base (which every delta lists)."""

    base: int
    base_size: int
    lines: Mapping[str, str]
    touched: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Push:
    """One file to write: the base (`delta` False) or a delta, and what the nginx has after."""

    delta: bool
    text: str
    after: Pushed


def _by_name(lines: Sequence[str]) -> dict[str, str]:
    return {line.partition("\t")[0]: line for line in lines}


def next_push(last: Pushed | None, version: int, lines: Sequence[str]) -> Push | None:
    """What brings an nginx that was given `last` (None: nothing yet, as after its start) to
    `lines` at `version`; None when it has them already, so nothing is written."""
    current = _by_name(lines)
    if last is not None:
        changed = {n for n, line in current.items() if last.lines.get(n) != line}
        changed.update(n for n in last.lines if n not in current)
        if not changed:
            return None
        touched = last.touched | changed
        body = [current.get(name, name) for name in sorted(touched)]
        text = "\n".join([f"{DELTA_FORMAT} {last.base} {version} {len(body)}", *body]) + "\n"
        if len(text) <= last.base_size * REBASE_RATIO:
            return Push(True, text, Pushed(last.base, last.base_size, current, touched))
    text = state_text(version, lines)
    return Push(False, text, Pushed(version, len(text), current))


@dataclass(frozen=True)
class ModeChoice:
    """The data plane one nginx runs in, and why, in words an operator can act on."""

    mode: DataPlane
    why: str


PROBE_CONFIG = (
    "# controlplane: does this nginx have lua-nginx-module? (the file that was here goes back\n"
    "# at once)\n"
    "lua_shared_dict controlplane_probe 64k;\n"
    'init_by_lua_block { require "cjson.safe" require "ngx.balancer" }\n'
)
"""Put in place of the config and tested with `nginx -t`: what the dynamic config needs."""


NO_LUA_SIGNS = (
    'unknown directive "lua_shared_dict"',
    'unknown directive "init_by_lua_block"',
    "module 'cjson.safe' not found",
    "module 'ngx.balancer' not found",
    '"init_by_lua_block" directive is duplicate',
)
"""What nginx -t says of the probe when this nginx can't run the dynamic config: no module,
no cjson or resty.core, or a main config with an init_by_lua of its own."""


def probe_verdict(took: bool, said: str) -> bool | None:
    """Whether the probe shows Lua (True), shows none (False), or failed for another reason
    (None: a broken main config, say, which tells nothing; it is asked again)."""
    if took:
        return True
    if any(sign in said for sign in NO_LUA_SIGNS):
        return False
    return None


def choose(requested: DataPlane, source: str, lua: bool | None, probe_said: str = "") -> ModeChoice:
    """`requested`: the nginx's label or the controller's default (`source` says which);
    `lua`: whether that nginx took a config that needs lua-nginx-module (None: not probed)."""
    if requested is DataPlane.RELOAD:
        return ModeChoice(DataPlane.RELOAD, f"{source} asks for it")
    if requested is DataPlane.DYNAMIC:
        return ModeChoice(DataPlane.DYNAMIC, f"{source} asks for it")
    if lua:
        return ModeChoice(DataPlane.DYNAMIC, f"{source}, and this nginx has lua-nginx-module")
    detail = f" (nginx -t said: {probe_said})" if probe_said else ""
    return ModeChoice(
        DataPlane.RELOAD,
        f"{source}, and this nginx has no lua-nginx-module{detail}: every change of backends "
        "is a reload; run OpenResty or nginx with lua-nginx-module for none",
    )
