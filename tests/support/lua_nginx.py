"""The host's nginx with lua-nginx-module running controlplane's Lua balancer the way the
dynamic data plane's rendered config embeds it, with stub upstreams in the same nginx: tests
and measurements of templates/lua/controlplane.lua that need no container.

Everything listens on 127.0.0.1 ports picked by tests.support.ports; the state's base and
delta files are written as the controller writes them (staging file, then rename).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.ports import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parents[2]
LUA_SOURCE = ROOT / "templates" / "lua" / "controlplane.lua"
MODULES = Path("/usr/lib/nginx/modules")
NEEDED_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
LUA_LIBRARIES = (
    Path("/usr/share/lua/5.1/resty/core.lua"),
    Path("/usr/share/lua/5.1/ngx/balancer.lua"),
)
INSTALL = (
    "run scripts/install-system-deps (Debian: nginx with libnginx-mod-http-lua, "
    "libnginx-mod-http-ndk, lua-resty-core, lua-resty-lrucache, lua-cjson)"
)
NO_LIVE = "controlplane: service {} has no live backend\n"
NO_SERVICE = "controlplane: no service here for host {}\n"
BAD_DATA = "controlplane: service {} has no valid routing data (nginx error log says why)\n"


def lua_nginx_binary() -> str:
    """The host's nginx when it can load lua-nginx-module; skips without it locally, fails
    under CI=true, where these tests must run."""
    found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    missing = [str(MODULES / m) for m in NEEDED_MODULES if not (MODULES / m).exists()]
    missing += [str(p) for p in LUA_LIBRARIES if not p.exists()]
    if found is None or missing:
        what = "nginx" if found is None else ", ".join(missing)
        message = f"the Lua balancer tests need nginx with lua-nginx-module; {what} missing: "
        if os.environ.get("CI") == "true":
            pytest.fail(message + INSTALL)
        pytest.skip(message + INSTALL)
    return found


@dataclass(frozen=True)
class Peer:
    """One backend as the controller lists it in a service's JSON."""

    port: int
    weight: int = 1
    down: bool = False
    backup: bool = False
    max_fails: int = 1
    fail_timeout: int = 10
    max_conns: int = 0
    host: str = LOOPBACK

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def as_json(self) -> dict[str, object]:
        return {
            "addr": self.addr,
            "host": self.host,
            "port": self.port,
            "weight": self.weight,
            "down": self.down,
            "backup": self.backup,
            "max_fails": self.max_fails,
            "fail_timeout": self.fail_timeout,
            "max_conns": self.max_conns,
            "container": f"stub-{self.port}",
        }


def service_json(
    method: str,
    peers: Sequence[Peer],
    key: str | None = None,
    consistent: bool = False,
    two: bool = False,
) -> str:
    """A service's JSON as controlplane.core.dataplane writes it."""
    return json.dumps(
        {
            "method": method,
            "key": key,
            "consistent": consistent,
            "two": two,
            "peers": [p.as_json() for p in peers],
        },
        separators=(",", ":"),
    )


def state_line(name: str, body: str, hosts: str) -> str:
    """`name TAB rev TAB hosts TAB json`, as controlplane.core.dataplane writes it."""
    return f"{name}\t{hashlib.sha256(body.encode()).hexdigest()[:16]}\t{hosts}\t{body}"


@dataclass
class StateFile:
    """The controller's two files: the base, every service, and the delta over it, every
    service touched since that base (its line, or its bare name once removed). Each write is
    a new version; a write is a delta when a base is there, as the controller's."""

    path: Path
    delta_path: Path
    version: int = 0
    services: dict[str, str] = field(default_factory=dict)
    """Each service's JSON."""
    hosts: dict[str, str] = field(default_factory=dict)
    """Host names by service (space-separated); a service not here routes by its name."""
    base: int | None = None
    """The base's version; None: the next write is a base."""
    touched: set[str] = field(default_factory=set)

    def stage(
        self, hosts: Mapping[str, str] | None = None, /, *removed: str, **services: str
    ) -> None:
        """Sets these services' JSON (keeping the others), the host names of any service in
        `hosts`, removes the `removed` ones: all for the next write."""
        self.services.update(services)
        self.hosts.update(hosts or {})
        for name in removed:
            self.services.pop(name, None)
        self.touched.update(services, hosts or {}, removed)

    def put(self, hosts: Mapping[str, str] | None = None, /, **services: str) -> float:
        """stage, then write."""
        self.stage(hosts, **services)
        return self.write()

    def remove(self, *names: str) -> float:
        self.stage(None, *names)
        return self.write()

    def line(self, name: str) -> str:
        body = self.services[name]
        return state_line(name, body, self.hosts.get(name, name))

    def write(self) -> float:
        """Writes the next version, a delta over the base or a base when there is none;
        returns time.monotonic() just after the rename."""
        return self.write_base() if self.base is None else self.write_delta()

    def write_base(self) -> float:
        self.version += 1
        self.base, self.touched = self.version, set()
        header = f"controlplane-state 3 {self.version} {len(self.services)}"
        return self.write_raw("\n".join([header, *map(self.line, self.services)]) + "\n")

    def write_delta(self) -> float:
        assert self.base is not None, "a delta goes over a base"
        self.version += 1
        lines = [self.line(n) if n in self.services else n for n in sorted(self.touched)]
        header = f"controlplane-delta 3 {self.base} {self.version} {len(lines)}"
        return self.write_raw("\n".join([header, *lines]) + "\n", delta=True)

    def write_raw(self, text: str, delta: bool = False) -> float:
        """Puts `text` in place of the base (or, `delta`, of the delta) as the controller
        does: a staging file renamed over the path."""
        path = self.delta_path if delta else self.path
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(text, encoding="utf-8")
        staging.rename(path)
        return time.monotonic()


@dataclass(frozen=True)
class Reply:
    status: int
    body: str
    upstream: str
    """Every address nginx tried, in order (its $upstream_addr)."""
    worker: str
    content_type: str


# nginx config pieces, filled with %-formatting (nginx and Lua use both $ and braces)
MAIN = """\
load_module %(modules)s/ndk_http_module.so;
load_module %(modules)s/ngx_http_lua_module.so;
%(user)s
worker_processes %(workers)d;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log %(level)s;
events { worker_connections 1024; }
http {
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    access_log off;
    map $http_upgrade $cp_connection_upgrade {
        default upgrade;
        "" "";
    }
    lua_shared_dict controlplane 8m;
    lua_shared_dict controlplane_routes 8m;
    init_by_lua_block {
controlplane = (function()
%(source)s
end)()
controlplane.configure({state_path = "%(state)s", delta_path = "%(delta)s", poll = %(poll)s,
    dict = "controlplane", routes = "controlplane_routes"})
    }
    init_worker_by_lua_block { controlplane.init_worker() }
%(routed)s
%(blocks)s
}
"""
ROUTED = """\
    upstream cp_dynamic {
        server 0.0.0.1:1;  # a placeholder: the Lua balancer picks each server
        balancer_by_lua_block { controlplane.balance() }
        keepalive 32;
    }
    server {
        listen %(front)s default_server reuseport;
        server_name _;
        location / {
            access_by_lua_block { controlplane.route() }
            proxy_pass http://cp_dynamic;
%(proxy)s
            log_by_lua_block { controlplane.record() }
        }
    }"""
"""The rendered config's one server: the Host header picks the service."""
STUB = """\
    server {
        listen %(listen)s;
        location / {
%(answer)s
        }
    }"""
STUB_LUA = """\
            content_by_lua_block {
                local port = ngx.var.server_port
                if ngx.var.arg_fail == port or ngx.var.arg_fail == "all" then
                    return ngx.exit(502)
                end
                if ngx.var.arg_slow == port then
                    ngx.sleep(tonumber(ngx.var.arg_ms or "100") / 1000)
                end
                ngx.print(port)
            }"""
STUB_PLAIN = "            return 200 $server_port;"
PROXY = """\
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $cp_connection_upgrade;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 16;
            proxy_next_upstream_timeout 10s;
            add_header X-Upstream $upstream_addr always;
            add_header X-Worker $pid always;"""
"""The rendered config's proxy settings (so upstream connections are kept alive as there),
and which backends and worker served the request."""
NATIVE = """\
    upstream native_%(name)s {
%(balancing)s%(servers)s        keepalive 32;
    }
    server {
        listen %(front)s;
        server_name "native-%(name)s";
        location / {
            proxy_pass http://native_%(name)s;
%(proxy)s
        }
    }"""


class LuaNginx:
    """One nginx: upstream servers on `stub_ports` answering their own port, the rendered
    config's one server, where the Host header picks the service (its name, unless the state
    gives it other host names), and optional native upstreams (`native`: name -> (balancing
    directive or "", peers)) for comparison, reached as native-<name>. `extra`: more server
    blocks, where %(front)s and %(proxy)s stand for the front's address and the proxy
    settings; `lua_source`: another version of the balancer's source; `poll`: the loader's
    interval, seconds."""

    def __init__(
        self,
        directory: Path,
        stub_ports: Sequence[int],
        native: Mapping[str, tuple[str, Sequence[Peer]]] | None = None,
        plain_stubs: bool = False,
        error_level: str = "info",
        workers: int = 2,
        extra: Sequence[str] = (),
        lua_source: str | None = None,
        poll: float = 0.005,
    ) -> None:
        self.directory = directory
        self.binary = lua_nginx_binary()
        self.stub_ports = list(stub_ports)
        self.port = free_port()
        self.state = StateFile(
            directory / "controlplane.conf.state", directory / "controlplane.conf.delta"
        )
        self.config = directory / "nginx.conf"
        blocks = [
            STUB
            % {"listen": f"{LOOPBACK}:{port}", "answer": STUB_PLAIN if plain_stubs else STUB_LUA}
            for port in self.stub_ports
        ]
        blocks += [self._native(name, *how) for name, how in (native or {}).items()]
        self.config.write_text(
            MAIN
            % {
                "modules": MODULES,
                # as root the workers would be nobody, who can't read a test's tmp dir
                "user": "user root;" if os.geteuid() == 0 else "",
                "workers": workers,
                "poll": poll,
                "dir": self.directory,
                "level": error_level,
                "source": lua_source or LUA_SOURCE.read_text(encoding="utf-8"),
                "state": self.state.path,
                "delta": self.state.delta_path,
                "routed": ROUTED % {"front": self.front, "proxy": PROXY},
                "blocks": "\n".join(
                    [*blocks, *(e % {"front": self.front, "proxy": PROXY} for e in extra)]
                ),
            },
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def front(self) -> str:
        """Where the services are reached (listen's address:port)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def error_log_path(self) -> Path:
        return self.directory / "error.log"  # as MAIN names it

    def _native(self, name: str, directive: str, peers: Sequence[Peer]) -> str:
        servers = "".join(
            f"        server {p.addr} weight={p.weight}{' down' if p.down else ''};\n"
            for p in peers
        )
        balancing = f"        {directive};\n" if directive else ""
        return NATIVE % {
            "name": name,
            "front": self.front,
            "proxy": PROXY,
            "balancing": balancing,
            "servers": servers,
        }

    def start(self) -> None:
        """Starts nginx in the foreground of a child process and waits until it answers."""
        stderr = self.directory / "stderr.log"  # a file: a pipe nobody reads could fill up
        with stderr.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    *(self.binary, "-p", str(self.directory), "-c", str(self.config)),
                    *("-e", str(self.error_log_path), "-g", "daemon off;"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited at start ({self.process.returncode}): "
                    f"{stderr.read_text(errors='replace')[-2000:]}\n{self.error_log()[-2000:]}"
                )
            try:
                self.get("-")
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"nginx did not answer on port {self.port} in 10 s"
                    ) from error
                time.sleep(0.02)

    def reload(self) -> None:
        """SIGHUP, as the reload mode does: new workers, the shared dict kept."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Stops this nginx (its master; the workers follow); idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def error_log(self, since: int = 0) -> str:
        """The error log from byte `since` on (see log_size)."""
        try:
            with self.error_log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.error_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def put(self, hosts: Mapping[str, str] | None = None, /, **services: str) -> float:
        """Writes the state with these services' JSON (and hosts) changed, as a delta when a
        base is there, and waits until the loader applied it; returns time.monotonic() just
        after the rename."""
        self.state.stage(hosts, **services)
        return self.write()

    def remove(self, *names: str) -> None:
        self.state.stage(None, *names)
        self.write()

    def write(self, base: bool = False) -> float:
        """Writes what the state has staged (`base`: as a new base) and waits until the
        loader applied it; returns time.monotonic() just after the rename."""
        since = self.log_size()
        renamed = self.state.write_base() if base else self.state.write()
        self.wait_applied(since)
        return renamed

    def wait_applied(self, since: int, timeout: float = 5.0) -> None:
        """Until the loader logs (at info, after byte `since`) that it applied the state's
        last version, a base or a delta."""
        wanted = f"controlplane: state version {self.state.version} applied"
        deadline = time.monotonic() + timeout
        while wanted not in self.error_log(since):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"state version {self.state.version} not applied in {timeout} s"
                )
            time.sleep(0.005)

    def get(
        self,
        service: str,
        path: str = "/",
        connection: http.client.HTTPConnection | None = None,
    ) -> Reply:
        """One request to `service` (its name as Host), on a fresh connection unless one
        is given."""
        conn = connection or http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": service})
            response = conn.getresponse()
            body = response.read().decode("utf-8", errors="replace")
            return Reply(
                response.status,
                body,
                response.getheader("X-Upstream", ""),
                response.getheader("X-Worker", ""),
                response.getheader("Content-Type", ""),
            )
        finally:
            if connection is None:
                conn.close()

    def connection(self) -> http.client.HTTPConnection:
        """A keep-alive connection for many requests in a row (one worker serves it)."""
        return http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
