"""`make demo` / `make demo-down`: the Compose stack in compose/ with one command, offline.

up:   finds Docker and Compose, builds the images from the host's own packages when it can
      (images/build.py; cached by content) or else uses the official ones, writes compose/.env
      (images, ports, a generated API token), starts the stack with 3 backends, waits until
      nginx, the API and DNS answer, and prints what to try.
down: removes the stack's containers, network and volume, and compose/.env. The images stay:
      they are a cache shared with the tests (`docker image rm` them by name).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from images.build import ImageBuildError, compose_env, ensure_images  # noqa: E402

COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
ENV_FILE = ROOT / "compose" / ".env"
PROJECT = "controlplane-demo"
PORTS = {"CP_HTTP_PORT": 8080, "CP_API_PORT": 8081, "CP_DNS_PORT": 1053}
IMAGE_VARIABLES = ("NGINX_IMAGE", "BACKEND_IMAGE", "CONTROLPLANE_IMAGE")
"""Chosen afresh on every run, never taken from an old compose/.env."""
BACKENDS = 3
HOST_BINARIES = ("/usr/sbin/nginx", "/usr/bin/busybox", "/usr/bin/python3.11")


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


def images(client: docker.DockerClient) -> dict[str, str]:
    """Image variables: given ones win; else built offline from host packages when the host
    has them; else none (Compose's defaults: official images, the controller built)."""
    given = {k: os.environ[k] for k in IMAGE_VARIABLES if os.environ.get(k)}
    if given:
        say(f"using the images you set: {', '.join(given.values())}")
        return given
    missing = [b for b in HOST_BINARIES if not Path(b).exists()]
    if missing:
        say(
            f"{', '.join(missing)} not on this host: using the official images (nginx, "
            "traefik/whoami) and building the controller from compose/Dockerfile"
        )
        return {}
    say("building the images from this host's packages (cached by content; first time ~20 s)")
    try:
        built = ensure_images(client, lambda line: say(f"  {line}"), controller=True)
    except ImageBuildError as error:
        raise DemoError(f"an image failed to build: {error}") from error
    lines = compose_env(built).splitlines()
    return dict(line.split("=", 1) for line in lines)


def get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return reply.status, reply.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def wait(what: str, check: object, timeout: float = 90.0) -> None:
    started = time.monotonic()
    next_note = started + 5
    while not check():  # type: ignore[operator]
        now = time.monotonic()
        if now - started > timeout:
            raise DemoError(
                f"{what} did not happen within {timeout:.0f} s: see "
                f"`docker logs {PROJECT}_controlplane_1` (or `{PROJECT}-controlplane-1`)"
            )
        if now >= next_note:
            say(f"  still waiting for {what} ({now - started:.0f} s)")
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
    say(f"starting the stack ({'already running: updating' if running else 'project ' + PROJECT})")
    build = [] if "CONTROLPLANE_IMAGE" in env else ["--build"]
    compose("up", "-d", *build, "--scale", f"web={BACKENDS}", env=env)
    http, api, dns = env["CP_HTTP_PORT"], env["CP_API_PORT"], env["CP_DNS_PORT"]
    wait("the API to be ready", lambda: get(f"http://127.0.0.1:{api}/readyz")[0] == 200)
    seen: set[str] = set()

    def all_backends() -> bool:
        status, body = get(f"http://127.0.0.1:{http}/", host="web")
        if status == 200:
            seen.add(body)
        return len(seen) >= BACKENDS

    wait(f"nginx to answer from {BACKENDS} backends", all_backends)
    token = env["CONTROLPLANE_API_TOKEN"]
    compose_line = f"{' '.join(compose_command())} -p {PROJECT} -f compose/docker-compose.yml"
    print(
        f"""
controlplane demo is up: nginx on 127.0.0.1:{http}, API on 127.0.0.1:{api}, DNS on 127.0.0.1:{dns}

Try:
  curl -H 'Host: web' http://127.0.0.1:{http}/         # one of {BACKENDS} backends answers
  dig @127.0.0.1 -p {dns} +short web.internal          # their addresses, from the controller
  curl http://127.0.0.1:{api}/api/v1/services
  export CONTROLPLANE_API=http://127.0.0.1:{api} CONTROLPLANE_API_TOKEN={token}
  .venv/bin/controlplane services
  .venv/bin/controlplane algorithm web hash --key '$request_uri' --consistent
  .venv/bin/controlplane drain web {PROJECT}_web_1     # or {PROJECT}-web-1 with compose v2
  {compose_line} up -d --scale web=5
  curl http://127.0.0.1:{api}/api/v1/config            # the nginx config it rendered
  make demo-down                                       # remove it all

Settings and the token are in compose/.env.""",
        flush=True,
    )


def down() -> None:
    engine()
    env = read_env()
    env.setdefault("CONTROLPLANE_API_TOKEN", "unused")
    compose("down", "--volumes", "--remove-orphans", env=env)
    ENV_FILE.unlink(missing_ok=True)
    say("removed the containers, network and volume, and compose/.env")


def main() -> None:
    actions = {"up": up, "down": down}
    action = actions.get(sys.argv[1] if len(sys.argv) > 1 else "up")
    if action is None:
        print(f"usage: {sys.argv[0]} up|down", file=sys.stderr)
        sys.exit(2)
    try:
        action()
    except DemoError as error:
        print(f"demo: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
