"""compose/stack.yml deployed with `docker stack deploy` on the private single-node swarm, with
the offline images (as `make demo` gives the Compose stack): the controller on the manager
manages the nginx service's task, a request through nginx's published port reaches each of the
3 replicas, and `docker stack rm` leaves only the state volume, which the README's command
removes too."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import httpx

from images.build import ensure_images
from tests.support.lab import Http, wait_until
from tests.support.swarm import PrivateSwarm

STACK_FILE = Path(__file__).resolve().parents[2] / "compose" / "stack.yml"
HTTP_PORT, API_PORT = 8080, 8081
"""Published in the private engine's own network namespace, where no other port is."""


def test_the_stack_file_deploys_serves_every_replica_and_stack_rm_leaves_nothing(
    private_swarm: PrivateSwarm,
) -> None:
    swarm = private_swarm
    client = swarm.client
    images = ensure_images(client, controller=True)
    assert images.controller is not None
    stack = f"cpt{secrets.token_hex(3)}"
    token = secrets.token_hex(16)
    environment = {
        **os.environ,
        "DOCKER_HOST": swarm.engine.url,
        "DOCKER_SOCKET": swarm.engine.url.removeprefix("unix://"),
        "CONTROLPLANE_API_TOKEN": token,
        "CONTROLPLANE_IMAGE": images.controller,
        "NGINX_IMAGE": images.nginx_lua,
        "BACKEND_IMAGE": images.backend,
        "CP_NETWORK": f"{stack}_app",
        "CP_HTTP_PORT": str(HTTP_PORT),
        "CP_API_PORT": str(API_PORT),
    }

    def docker(*args: str) -> None:
        done = subprocess.run(
            ["docker", *args], env=environment, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def running(service: str) -> dict[str, str]:
        """Task container name -> task ID, of the tasks that run and are meant to."""
        tasks = client.api.tasks(filters={"service": f"{stack}_{service}"})
        return {
            f"{stack}_{service}.{t['Slot']}.{t['ID']}": t["ID"]
            for t in tasks
            if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
        }

    def ours() -> list[str]:
        label = f"com.docker.stack.namespace={stack}"
        return [
            *(f"service {s.name}" for s in client.services.list(filters={"label": label})),
            # the plain listing: the SDK's inspects each, racing with their removal
            *(f"container {c['Names'][0]}" for c in client.api.containers(all=True)),
            *(f"network {n.name}" for n in client.networks.list(filters={"label": label})),
        ]

    docker("stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), stack)
    try:
        web = wait_until(
            lambda: len(running("web")) == 3 and running("web"), timeout=120, what="3 web tasks"
        )
        wait_until(lambda: len(running("nginx")) == 1, timeout=60, what="the nginx task")
        with swarm.engine.entered():
            http = Http(HTTP_PORT)
            try:
                wait_until(
                    lambda: http.settled("web", web), timeout=90, what="nginx serving the 3 tasks"
                )
            finally:
                http.close()
            reply = httpx.get(
                f"http://127.0.0.1:{API_PORT}/api/v1/nginx",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ).json()
        [managed] = reply["nginx"]
        assert managed["name"].startswith(f"{stack}_nginx.1.") and managed["current"]
        assert managed["dataplane"] == "dynamic" and reply["remote"] == []
    finally:
        docker("stack", "rm", stack)
    wait_until(lambda: not ours(), timeout=90, what="nothing of the stack left")
    [volume] = [
        v.name
        for v in client.volumes.list(filters={"label": f"com.docker.stack.namespace={stack}"})
    ]
    assert volume == f"{stack}_state"
    docker("volume", "rm", volume)
