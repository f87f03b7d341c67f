"""A shell kept open in a managed nginx container, the fast way in for a deploy.

Each engine call costs tens of milliseconds on dockerd 20.10 (a copy ~80 ms, an exec ~75 ms,
a signal ~20 ms), far more than nginx needs to test and reload a config. One `docker exec -i
/bin/sh` opened per container and kept open turns those calls into lines on its stdin: writing
the file, `nginx -t` and `kill -HUP 1` then cost what they cost inside the container. Images
without /bin/sh (distroless nginx) can't open one; the deployer then uses the engine's archive
and exec calls instead.

The protocol is plain sh: each request is a short script followed by a line printing a
marker and `$?`, and the reply is everything the shell printed before that marker. The marker
holds a random token, so no output of nginx can end a reply early.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
import shlex
import socket
import struct
from typing import Any

import docker

from controlplane.errors import DeployError

HEADER = struct.Struct(">BxxxL")
"""A frame of a non-TTY attach stream: stream number (1 stdout, 2 stderr), then length."""
OPEN_TIMEOUT = 5.0
STEP_TIMEOUT = 30.0
"""Long enough for `nginx -t` of a config with tens of thousands of servers (~0.3 s here)."""


class NoShell(DeployError):
    """The container has no usable /bin/sh (or no nginx, cat on its PATH): use the engine
    until it restarts. Other errors of opening one (a container restarting) are DeployError."""


class ShellSession:
    """Not thread-safe: the deployer uses one session per container, from one pass at a time."""

    def __init__(
        self, api: docker.APIClient, container_id: str, started_at: str, config_path: str
    ) -> None:
        """Checks what a deploy needs (nginx and cat on the PATH, and that the container's
        user may write `config_path`) before any deploy relies on it."""
        self.container_id = container_id
        self.started_at = started_at
        self._marker = f"@@controlplane-{secrets.token_hex(8)}"
        self._buffer = b""
        self._frames = b""
        try:
            exec_id = api.exec_create(
                container_id, ["/bin/sh"], stdin=True, stdout=True, stderr=True
            )["Id"]
            stream: Any = api.exec_start(exec_id, socket=True)
        except docker.errors.DockerException as error:
            raise DeployError(f"could not start /bin/sh in the container: {error}") from error
        self._socket: socket.socket = getattr(stream, "_sock", stream)
        self._keep = stream
        path = shlex.quote(config_path)
        directory = shlex.quote(posixpath.dirname(config_path))
        try:
            code, output = self.run("command -v nginx && command -v cat", OPEN_TIMEOUT)
            if code == 0:
                writable, _ = self.run(
                    f"if [ -e {path} ]; then [ -w {path} ]; else [ -w {directory} ]; fi",
                    OPEN_TIMEOUT,
                )
        except DeployError as error:
            self.close()
            raise NoShell(f"/bin/sh did not answer in the container ({error})") from error
        if code != 0:
            self.close()
            raise NoShell(f"nginx or cat is not on the PATH of /bin/sh: {output.strip()}")
        if writable != 0:
            self.close()
            raise NoShell(f"the container's user may not write {config_path}")

    @staticmethod
    def can_carry(content: bytes) -> bool:
        """A quoted here-document carries text that ends with a newline and has no NUL:
        every rendered config does."""
        return content.endswith(b"\n") and b"\0" not in content

    def write(self, path: str, content: bytes) -> None:
        delimiter = f"CONTROLPLANE_EOF_{secrets.token_hex(12)}".encode()
        if not self.can_carry(content) or delimiter in content:
            raise DeployError("this file can't go through the shell; use the archive API")
        script = b"cat > %s <<'%s'\n%s%s" % (
            shlex.quote(path).encode(),
            delimiter,
            content,
            delimiter,
        )
        code, output = self.run(script, STEP_TIMEOUT)
        if code != 0:
            raise DeployError(f"could not write {path} in the container: {output.strip()}")

    def test(self) -> tuple[int, str]:
        return self.run("nginx -t 2>&1", STEP_TIMEOUT)

    def reload(self) -> None:
        code, output = self.run("kill -HUP 1", STEP_TIMEOUT)
        if code != 0:
            raise DeployError(f"could not signal the nginx master (PID 1): {output.strip()}")

    def run(self, script: str | bytes, timeout: float) -> tuple[int, str]:
        """Exit status of the script's last command, and what it printed (stdout and stderr)."""
        body = script.encode() if isinstance(script, str) else script
        request = body + f"\nprintf '\\n%s %s\\n' {self._marker} \"$?\"\n".encode()
        try:
            self._socket.settimeout(timeout)
            self._socket.sendall(request)
            return self._reply()
        except (OSError, ValueError, DeployError) as error:
            said = self._last_words()
            raise DeployError(
                f"the shell in the container went away ({error})" + (f": {said}" if said else "")
            ) from error

    def close(self) -> None:
        """Shutting the connection closes the shell's stdin, which ends it in the container.
        (A plain close would not: the stream object docker-py returned shares the socket.)"""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._keep.close()
        with contextlib.suppress(OSError):
            self._socket.close()

    def _reply(self) -> tuple[int, str]:
        marker = b"\n" + self._marker.encode() + b" "
        while True:
            start = self._buffer.find(marker)
            if start != -1:
                end = self._buffer.find(b"\n", start + 1)
                if end != -1:
                    output = self._buffer[:start].decode("utf-8", "replace")
                    code = self._buffer[start + len(marker) : end]
                    self._buffer = self._buffer[end + 1 :]
                    return int(code), output
            self._read_frame()

    def _read_frame(self) -> None:
        while len(self._frames) < HEADER.size:
            self._receive()
        _, size = HEADER.unpack_from(self._frames)
        while len(self._frames) < HEADER.size + size:
            self._receive()
        self._buffer += self._frames[HEADER.size : HEADER.size + size]
        self._frames = self._frames[HEADER.size + size :]

    def _last_words(self) -> str:
        """What the engine or the shell printed before the stream ended (e.g. why /bin/sh
        could not start), for the error message."""
        with contextlib.suppress(OSError, ValueError, DeployError):
            self._socket.settimeout(0.5)
            while True:
                self._read_frame()
        text = (self._buffer + self._frames).decode("utf-8", "replace")
        return "".join(c for c in text if c.isprintable() or c == "\n").strip()[-300:]

    def _receive(self) -> None:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise DeployError("the shell exited")
        self._frames += chunk
