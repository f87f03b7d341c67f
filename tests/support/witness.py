"""Proof that a test left the machine's Docker engine alone: the daemon's identity and a
container that is no test's, compared before and after.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def serving_pid(socket_path: str) -> int:
    """The PID of the process that listens on a unix socket (SO_PEERCRED): the daemon itself,
    found without matching process names."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", credentials)
    return int(pid)


@dataclass(frozen=True)
class Daemon:
    """What changes when a daemon is stopped, restarted or started with other flags."""

    pid: int
    command_line: str
    started: int
    """Clock ticks after boot (/proc/<pid>/stat field 22): a new process, a new value."""
    engine_id: str

    @classmethod
    def read(cls, client: docker.DockerClient) -> Daemon:
        url = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        if not url.startswith("unix://"):
            raise RuntimeError(
                f"the machine's engine is at {url}: the witness reads its dockerd process "
                "through a local unix socket; unset DOCKER_HOST or point it at one"
            )
        pid = serving_pid(url.removeprefix("unix://"))
        proc = Path(f"/proc/{pid}")
        stat = (proc / "stat").read_text()
        return cls(
            pid=pid,
            command_line=(proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip(),
            started=int(stat.rsplit(")", 1)[1].split()[19]),
            engine_id=str(client.info()["ID"]),
        )


class MachineEngineWitness:
    """The machine's dockerd as found, and a sentinel container of nobody's test (no
    controlplane.test label, so no sweep removes it) running on it. `changes()` lists what
    differs since; `remove()` removes the sentinel."""

    def __init__(self, client: docker.DockerClient, image: str) -> None:
        self.client = client
        self.daemon = Daemon.read(client)
        self.sentinel: Container = client.containers.run(
            image, name=f"cp-foreign-{secrets.token_hex(4)}", detach=True
        )
        self.sentinel.reload()
        self.started_at = self.sentinel.attrs["State"]["StartedAt"]

    def changes(self) -> list[str]:
        found = []
        now = Daemon.read(self.client)
        if now != self.daemon:
            found.append(f"the machine's dockerd was {self.daemon}, is {now}")
        self.sentinel.reload()
        state = self.sentinel.attrs["State"]
        if state["Status"] != "running" or state["StartedAt"] != self.started_at:
            found.append(
                f"sentinel {self.sentinel.name}: was running since {self.started_at}, is "
                f"{state['Status']} since {state['StartedAt']}"
            )
        return found

    def remove(self) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.sentinel.remove(force=True)
