"""`make demo` / `make demo-down` / `make demo-clean`: the Compose stack in compose/ with one
command, offline.

up:    finds Docker and Compose, builds the images from the host's own packages when it can
       (images/build.py; cached by content) or else uses the official ones: nginx with Lua
       (the dynamic data plane), or plain nginx with CP_DATAPLANE=reload; writes compose/.env
       (images, ports, a generated API token), starts the stack with 3 backends (or as many as
       it was scaled to), waits until the API and DNS answer and nginx has answered from every
       backend the controller serves, and prints what to try. Safe to run again at any time.
down:  removes the stack's containers, network and volume, and compose/.env. The images stay:
       they are a cache shared with the tests.
clean: down, then removes the images built from this host's packages (images/build.py labels
       and tags them) and compose/offline.env; the tests and the next demo build them again.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
from dnslib import QTYPE, DNSRecord
from docker.models.containers import Container

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from images.build import (  # noqa: E402
    IMAGE_LABELS,
    OFFLINE_ENV,
    TAG_PREFIX,
    ImageBuildError,
    compose_env,
    ensure_images,
)

COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
ENV_FILE = ROOT / "compose" / ".env"
PROJECT = "controlplane-demo"
PORTS = {"CP_HTTP_PORT": 8080, "CP_API_PORT": 8081, "CP_DNS_PORT": 1053}
IMAGE_VARIABLES = ("NGINX_IMAGE", "NGINX_PLAIN_IMAGE", "BACKEND_IMAGE", "CONTROLPLANE_IMAGE")
"""Chosen afresh on every run, never taken from an old compose/.env."""
DATAPLANES = ("dynamic", "reload")
"""CP_DATAPLANE picks the nginx image: with Lua (the default) or plain."""
PLAIN_NGINX = "nginx:1.27-alpine"
"""The official plain nginx, for CP_DATAPLANE=reload when nothing is built offline (the
stack's own default is OpenResty)."""
COMPOSE_BUILT = "controlplane:local"
"""The controller image Compose builds when the host lacks the packages for the offline one."""
BACKENDS = 3
"""The first `up` starts this many; a later one keeps what the stack was scaled to."""
HOST_FILES = (
    "/usr/sbin/nginx",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
    "/usr/bin/busybox",
    "/usr/bin/python3.11",
)


class DemoError(Exception):
    """Something outside the project stops the demo; the message says what to do."""


def say(line: str) -> None:
    print(f"demo: {line}", flush=True)


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) when the plugin is there, else docker-compose 1.29."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DemoError(
        "neither `docker compose` nor `docker-compose` is installed: install Docker's compose "
        "plugin, or on Debian `apt-get install docker-compose` (`make dev` does it as root)"
    )


def compose(*args: str, env: dict[str, str]) -> None:
    command = [*compose_command(), "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]
    done = subprocess.run(command, env={**os.environ, **env})
    if done.returncode != 0:
        raise DemoError(f"`{' '.join(command)}` failed (exit {done.returncode}); see above")


def engine() -> docker.DockerClient:
    try:
        client = docker.from_env(version="auto")
        client.ping()
    except Exception as error:
        raise DemoError(
            f"no Docker engine answers ({error}): start Docker first (on Debian, as root, "
            "`make dev` installs and starts it)"
        ) from error
    return client


def read_env() -> dict[str, str]:
    if not ENV_FILE.exists():
        return {}
    pairs = (line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def ours(client: docker.DockerClient) -> bool:
    """Whether the demo stack already runs (then its ports are taken by itself)."""
    label = f"com.docker.compose.project={PROJECT}"
    return bool(client.containers.list(filters={"label": label}))


def web_containers(client: docker.DockerClient, stopped: bool = False) -> list[Container]:
    labels = [f"com.docker.compose.project={PROJECT}", "com.docker.compose.service=web"]
    found: list[Container] = client.containers.list(all=stopped, filters={"label": labels})
    return sorted(found, key=lambda c: str(c.name))


def check_ports(env: dict[str, str]) -> None:
    for variable in PORTS:
        port = int(env[variable])
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as error:
                    raise DemoError(
                        f"port {port} on 127.0.0.1 is taken ({error.strerror}): free it, or "
                        f"choose another with `make demo {variable}=<port>`"
                    ) from None


def dataplane() -> str:
    chosen = os.environ.get("CP_DATAPLANE") or DATAPLANES[0]
    if chosen not in DATAPLANES:
        raise DemoError(
            f"CP_DATAPLANE={chosen!r} is not a data plane: use `dynamic` (the default: nginx "
            "with Lua, which gets backend changes without a reload) or `reload` (plain nginx, "
            "reloaded on every change)"
        )
    return chosen


def images(client: docker.DockerClient) -> dict[str, str]:
    """Image variables: given ones win; else built offline from host packages when the host
    has them; else none (Compose's defaults: official images, the controller built). The
    nginx image is the one with Lua unless CP_DATAPLANE=reload picks the plain one."""
    plane = dataplane()
    given = {k: os.environ[k] for k in IMAGE_VARIABLES if os.environ.get(k)}
    if given:
        say(f"using the images you set: {', '.join(given.values())}")
        chosen = given
    elif missing := [f for f in HOST_FILES if not Path(f).exists()]:
        say(
            f"{', '.join(missing)} not on this host: using the official images (OpenResty, "
            f"or {PLAIN_NGINX} with CP_DATAPLANE=reload, and traefik/whoami) and building "
            "the controller from compose/Dockerfile"
        )
        chosen = {}
    else:
        say("building the images from this host's packages (cached by content; first time ~20 s)")
        try:
            built = ensure_images(client, lambda line: say(f"  {line}"), controller=True)
        except ImageBuildError as error:
            raise DemoError(f"an image failed to build: {error}") from error
        lines = compose_env(built).splitlines()
        chosen = dict(line.split("=", 1) for line in lines)
    if "NGINX_IMAGE" in given:
        if os.environ.get("CP_DATAPLANE"):
            say(
                "NGINX_IMAGE is set, so CP_DATAPLANE is not used: the controller picks the "
                "data plane by what that nginx can do (label controlplane.dataplane=auto)"
            )
        return chosen
    if plane == "reload":
        chosen["NGINX_IMAGE"] = chosen.get("NGINX_PLAIN_IMAGE", PLAIN_NGINX)
    nginx = chosen.get("NGINX_IMAGE", "the stack's default, OpenResty")
    say(f"{plane} data plane: nginx image {nginx}")
    return chosen


def get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return reply.status, reply.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def replier(body: str) -> str:
    """Who answered: the offline backend's reply is its container name; traefik/whoami's has a
    `Hostname:` line (the container's short ID)."""
    for line in body.splitlines():
        if line.startswith("Hostname:"):
            return line.removeprefix("Hostname:").strip()
    return body


def dns_answers(port: str, name: str) -> list[str]:
    try:
        reply = DNSRecord.question(name).send("127.0.0.1", int(port), timeout=1)
    except OSError:
        return []
    return [str(r.rdata) for r in DNSRecord.parse(reply).rr if r.rtype == QTYPE.A]


class Backends:
    """Whether nginx has answered from every backend the controller serves. The controller's
    view is the measure: a backend drained with the CLI gets no requests, and a new one may be
    held for a few seconds (a scale-out is applied in one batch)."""

    def __init__(self, client: docker.DockerClient, http: str, api: str) -> None:
        self.client, self.http, self.api = client, http, api
        self.heard: set[str] = set()
        self.serving: dict[str, str] = {}
        """Short container ID -> name, of the backends the controller serves."""
        self.missing: list[str] = []
        """Running web containers the controller does not list yet."""
        self.requests = 0
        self.strangers = 0
        """Replies naming no backend: an image of your own, which says something else."""

    def check(self) -> bool:
        running = {str(c.name) for c in web_containers(self.client)}
        status, body = get(f"http://127.0.0.1:{self.api}/api/v1/services/web")
        backends = json.loads(body)["backends"] if status == 200 else []
        self.missing = sorted(running - {b["name"] for b in backends})
        self.serving = {
            b["container"][:12]: b["name"]
            for b in backends
            if b["state"] == "up" and not b.get("backup")
        }
        for _ in range(2 * len(self.serving)):
            # A new path each time: with a hash on $request_uri one path meets one backend.
            self.requests += 1
            status, body = get(f"http://127.0.0.1:{self.http}/demo/{self.requests}", "web")
            if status == 200:
                self.heard.add(replier(body))
                known = {*self.serving, *self.serving.values()}
                self.strangers += replier(body) not in known
        unheard = [n for i, n in self.serving.items() if not {i, n} & self.heard]
        # When no reply names its backend, replies from nginx are all there is to wait for.
        anonymous = self.strangers >= 2 * len(self.serving) and len(unheard) == len(self.serving)
        return bool(self.serving) and not self.missing and (not unheard or anonymous)

    def detail(self) -> str:
        if not web_containers(self.client):
            return "no web container runs"
        if self.missing:
            return f"the controller does not list {', '.join(self.missing)}"
        if not self.serving:
            return "the controller serves no backend of web: undrain one with the CLI"
        unheard = [n for i, n in self.serving.items() if not {i, n} & self.heard]
        return f"no reply through nginx from {', '.join(unheard)}"


def wait(
    what: str,
    check: Callable[[], bool],
    timeout: float = 90.0,
    detail: Callable[[], str] | None = None,
) -> None:
    started = time.monotonic()
    next_note = started + 5
    while not check():
        now = time.monotonic()
        if now - started > timeout:
            why = f" ({detail()})" if detail else ""
            raise DemoError(
                f"{what} did not happen within {timeout:.0f} s{why}: see "
                f"`docker logs {PROJECT}_controlplane_1` (or `{PROJECT}-controlplane-1`)"
            )
        if now >= next_note:
            why = f": {detail()}" if detail else ""
            say(f"  still waiting for {what} ({now - started:.0f} s{why})")
            next_note = now + 5
        time.sleep(0.2)


def up() -> None:
    client = engine()
    compose_command()
    saved = {k: v for k, v in read_env().items() if k not in IMAGE_VARIABLES}
    env = {**{k: str(v) for k, v in PORTS.items()}, **saved}
    env.update({k: os.environ[k] for k in PORTS if os.environ.get(k)})
    running = ours(client)
    if not running:
        check_ports(env)
    env.update(images(client))
    env.setdefault("CONTROLPLANE_API_TOKEN", secrets.token_hex(16))
    ENV_FILE.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
    ENV_FILE.chmod(0o600)
    # Stopped containers count: `up` starts them again rather than scaling down.
    scale = len(web_containers(client, stopped=True)) or BACKENDS
    say(f"starting the stack ({'already running: updating' if running else 'project ' + PROJECT})")
    build = [] if "CONTROLPLANE_IMAGE" in env else ["--build"]
    compose("up", "-d", *build, "--scale", f"web={scale}", env=env)
    http, api, dns = env["CP_HTTP_PORT"], env["CP_API_PORT"], env["CP_DNS_PORT"]
    wait("the API to be ready", lambda: get(f"http://127.0.0.1:{api}/readyz")[0] == 200)
    backends = Backends(client, http, api)
    wait("nginx to answer from every backend", backends.check, detail=backends.detail)
    wait("DNS to answer web.internal", lambda: bool(dns_answers(dns, "web.internal")))
    names = sorted(backends.serving.values())
    backend_image = env.get("BACKEND_IMAGE", "")
    if backend_image.startswith(f"{TAG_PREFIX}/"):
        reply = "a backend answers with its container name; repeat it to meet the others"
        sicken = f"docker exec {names[0]} /health.sh 500"
        heal = f"docker exec {names[0]} /health.sh ok"
    else:
        reply = (
            "traefik/whoami answers with its hostname (the short container ID), and more"
            if not backend_image
            else f"one of the backends ({backend_image}) answers"
        )
        sicken = f"curl -X POST -d 500 -H 'Host: web' http://127.0.0.1:{http}/health"
        heal = "the same with -d 200 (through nginx: it reaches a backend still in)"
    token = env["CONTROLPLANE_API_TOKEN"]
    compose_line = f"{' '.join(compose_command())} -p {PROJECT} -f compose/docker-compose.yml"
    more = scale + 2
    scaling = (
        "each new backend serves once it starts, and nginx does not reload (its Lua balancer\n"
        f"      # gets them pushed): `docker logs {PROJECT}_nginx_1` shows no new 'reconfiguring'"
        if dataplane() == "dynamic"
        else "the first new backend serves at once; the next, started right after it, are held"
        "\n      # and join in one reload once no new one has come for 2 s (10 s at most)"
    )
    print(
        f"""
controlplane demo is up: nginx on 127.0.0.1:{http}, API on 127.0.0.1:{api}, DNS on 127.0.0.1:{dns}
{len(names)} backends serve web: {", ".join(names)}

Try:
  curl -H 'Host: web' http://127.0.0.1:{http}/any/path
      # {reply}
  dig @127.0.0.1 -p {dns} +short web.internal          # their addresses, from the controller
  curl http://127.0.0.1:{api}/api/v1/services
  open http://127.0.0.1:{api}/ in a browser      # the dashboard: services, backends, traffic, live
  export CONTROLPLANE_API=http://127.0.0.1:{api} CONTROLPLANE_API_TOKEN={token}
  .venv/bin/controlplane services
  .venv/bin/controlplane top                          # traffic per service, refreshed each second
  .venv/bin/controlplane algorithm web hash --key '$request_uri' --consistent
      # now each path always meets the same backend; try a few paths, each twice
  {sicken}
      # its health check (GET /health every 2 s) fails: out of nginx and DNS within ~5 s,
      # `.venv/bin/controlplane services web` says why; `{heal}` brings it back
  .venv/bin/controlplane drain web {names[0]}
      # it gets no new requests; `.venv/bin/controlplane undrain web {names[0]}` brings it back
  {compose_line} up -d --scale web={more}
      # {scaling}
  curl http://127.0.0.1:{api}/api/v1/config            # the nginx config it rendered
  make demo-down      # remove it all; `make demo-clean` also removes the images it built

Settings and the token are in compose/.env. `make demo` again keeps the stack as it is.""",
        flush=True,
    )


def down() -> None:
    engine()
    env = read_env()
    env.setdefault("CONTROLPLANE_API_TOKEN", "unused")
    compose("down", "--volumes", "--remove-orphans", env=env)
    ENV_FILE.unlink(missing_ok=True)
    say("removed the containers, network and volume, and compose/.env")


def remove_images(
    client: docker.DockerClient, labels: dict[str, str], prefix: str
) -> tuple[list[str], list[str]]:
    """Untag every image that carries all `labels` and a tag under `prefix/` (an image that
    has other tags too keeps them, and stays). Without force: an image that a container still
    uses stays. Returns the tags removed and, for those kept, why."""
    removed: list[str] = []
    kept: list[str] = []
    wanted = [f"{key}={value}" for key, value in labels.items()]
    for image in client.images.list(filters={"label": wanted}):
        for tag in sorted(t for t in image.tags if t.startswith(f"{prefix}/")):
            try:
                client.images.remove(tag)
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.APIError as error:
                kept.append(f"{tag} ({error.explanation or error})")
            else:
                removed.append(tag)
    return removed, kept


def clean() -> None:
    down()
    client = engine()
    removed, kept = remove_images(client, IMAGE_LABELS, TAG_PREFIX)
    if OFFLINE_ENV.exists():
        OFFLINE_ENV.unlink()
        say(f"removed {OFFLINE_ENV.relative_to(ROOT)} (`make images` wrote it)")
    if removed:
        say(f"removed {len(removed)} image(s) built from this host's packages:")
        for tag in removed:
            say(f"  {tag}")
    else:
        say(f"no image built from this host's packages ({TAG_PREFIX}/*) was left")
    if kept:
        say(f"kept {len(kept)} that containers still use (remove those containers first):")
        for line in kept:
            say(f"  {line}")
    say("images pulled from a registry (nginx, traefik/whoami, python) stay, like any other")
    if client.images.list(name=COMPOSE_BUILT):
        say(
            f"{COMPOSE_BUILT} (built by Compose from compose/Dockerfile) stays too: "
            f"`docker image rm {COMPOSE_BUILT}`"
        )


def main() -> None:
    actions = {"up": up, "down": down, "clean": clean}
    action = actions.get(sys.argv[1] if len(sys.argv) > 1 else "up")
    if action is None:
        print(f"usage: {sys.argv[0]} up|down|clean", file=sys.stderr)
        sys.exit(2)
    try:
        action()
    except DemoError as error:
        print(f"demo: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
