"""A shell kept open in a managed nginx container, the fast way in for a deploy.

Each engine call costs tens of milliseconds on dockerd 20.10 (a copy ~80 ms, an exec ~75 ms,
a signal ~20 ms), far more than nginx needs to test and reload a config. One `docker exec -i
/bin/sh` opened per container and kept open turns those calls into lines on its stdin: writing
the file, `nginx -t` and `kill -HUP 1` then cost what they cost inside the container. Images
without /bin/sh (distroless nginx) can't open one; the deployer then uses the engine's archive
and exec calls instead.

The protocol is plain sh: each request is a short script followed by a line printing a
marker and `$?`, and the reply is everything the shell printed before that marker (stderr is
merged into stdout first, so the two can't arrive out of order). The marker holds a random
token, so no output of nginx can end a reply early. The container is trusted to run nginx, not
to behave: a reply has a deadline and a size limit, and its text is made printable.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
import shlex
import socket
import struct
import time
from typing import Any

import docker

from controlplane import nginx_workers
from controlplane.errors import DeployError

HEADER = struct.Struct(">BxxxL")
"""A frame of a non-TTY attach stream: stream number (1 stdout, 2 stderr), then length."""
OPEN_TIMEOUT = 5.0
STEP_TIMEOUT = 30.0
"""Long enough for `nginx -t` of a config with tens of thousands of servers (~0.3 s here)."""
MAX_REPLY = 1 << 20
"""nginx -t says a few lines; a shell that prints more is not one to keep talking to."""


class NoShell(DeployError):
    """The container has no usable /bin/sh (or no nginx, cat on its PATH, or may not write
    the config's directory): use the engine until it restarts. Other errors of opening one (a
    container restarting) are DeployError."""


def printable(text: str) -> str:
    """What a container printed, safe for a log line or an API reply."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


class ShellSession:
    """Not thread-safe: the deployer uses one session per container, from one pass at a time."""

    def __init__(
        self,
        api: docker.APIClient,
        container_id: str,
        started_at: str,
        config_path: str,
        note_workers: bool = False,
    ) -> None:
        """Checks what a deploy needs (nginx, cat and mv on the PATH, and that the container's
        user may write the config's directory) before any deploy relies on it.
        `note_workers`: reload notes nginx's workers, for retire_old_workers."""
        self.container_id = container_id
        self._note_workers = note_workers
        self.started_at = started_at
        self._marker = f"@@controlplane-{secrets.token_hex(8)}"
        self._buffer = b""
        self._frames = b""
        self._deadline = 0.0
        self._old_workers: frozenset[int] = frozenset()
        directory = posixpath.dirname(config_path)
        self._path = shlex.quote(config_path)
        self._staging = shlex.quote(
            posixpath.join(directory, f".{posixpath.basename(config_path)}.controlplane-new")
        )
        """Beside the file, so that mv replaces it in one rename; a dot file, so that an
        include of `*` or `*.conf` never reads a half-written one."""
        try:
            exec_id = api.exec_create(
                container_id, ["/bin/sh"], stdin=True, stdout=True, stderr=True
            )["Id"]
            stream: Any = api.exec_start(exec_id, socket=True)
        except docker.errors.DockerException as error:
            raise DeployError(f"could not start /bin/sh in the container: {error}") from error
        # docker-py hands back its response's socket (a SocketIO over a unix socket); the
        # socket itself is what takes timeouts and shutdown.
        self._socket: socket.socket = getattr(stream, "_sock", stream)
        self._keep = stream
        writable = 1
        try:
            code, output = self.run(
                "exec 2>&1; command -v nginx && command -v cat && command -v mv", OPEN_TIMEOUT
            )
            if code == 0:
                writable, _ = self.run(f"[ -w {shlex.quote(directory)} ]", OPEN_TIMEOUT)
        except DeployError as error:
            self.close()
            raise NoShell(f"/bin/sh did not answer in the container ({error})") from error
        if code != 0:
            self.close()
            raise NoShell(f"nginx, cat or mv is not on the PATH of /bin/sh: {output.strip()}")
        if writable != 0:
            self.close()
            raise NoShell(f"the container's user may not write in {directory}")

    @staticmethod
    def can_carry(content: bytes) -> bool:
        """A quoted here-document carries text that ends with a newline and has no NUL:
        every rendered config does."""
        return content.endswith(b"\n") and b"\0" not in content

    def write(self, content: bytes) -> None:
        """The whole file to a staging file, then, once the shell said it is there, mv over
        the config: two requests, so that a shell that stalls mid-file (a paused container)
        and resumes after the deploy went on through the engine never renames it."""
        delimiter = f"CONTROLPLANE_EOF_{secrets.token_hex(12)}".encode()
        if not self.can_carry(content) or delimiter in content:
            raise DeployError("this file can't go through the shell; use the archive API")
        document, rename = self.write_scripts(content, delimiter)
        code, output = self.run(document, STEP_TIMEOUT)
        if code == 0:
            code, output = self.run(rename, STEP_TIMEOUT)
        if code != 0:
            raise DeployError(f"could not write {self._path} in the container: {output.strip()}")

    def write_scripts(self, content: bytes, delimiter: bytes) -> tuple[bytes, bytes]:
        """The staging file's here-document, and the rename as a `{ ...; }` group: a shell
        whose input ends early (a controller killed, a connection cut) still runs a command
        whose here-document was cut short, but never an incomplete group."""
        staging, path = self._staging.encode(), self._path.encode()
        return (
            b"cat > %s <<'%s'\n%s%s" % (staging, delimiter, content, delimiter),
            b"{ mv -f %s %s; }" % (staging, path),
        )

    def test(self) -> tuple[int, str]:
        return self.run("nginx -t", STEP_TIMEOUT)

    def reload(self) -> None:
        """With `note_workers`, notes the workers up before the signal, for
        retire_old_workers, in the same request."""
        listing = f"{nginx_workers.LISTING}\n" if self._note_workers else ""
        code, output = self.run(f"{listing}kill -HUP 1", STEP_TIMEOUT)
        if code != 0:
            raise DeployError(f"could not signal the nginx master (PID 1): {output.strip()}")
        if self._note_workers:
            self._old_workers = nginx_workers.workers(nginx_workers.parse(output))

    def retire_old_workers(self, within: float) -> str | None:
        """After reload: once every new worker is up, tells the old ones to quit (see
        nginx_workers). Returns what kept it from doing so, for a warning: a worker that
        refused the signal, or no new worker after `within` seconds (the master retires the
        old ones itself once its new workers are up). Raises DeployError when the shell
        fails or stalls: it can't be trusted with another request."""
        if not self._old_workers:
            return None
        deadline = time.monotonic() + within
        pause = 0.001
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(pause, left))
            pause = min(pause * 1.2, 0.02)
            _, output = self.run(nginx_workers.LISTING, max(left, 0.1))
            now = nginx_workers.workers(nginx_workers.parse(output))
            old = nginx_workers.retirable(self._old_workers, now)
            if old is None:
                continue
            if not old:
                return None
            # A worker that quit meanwhile (the master's own signal came first) is fine.
            pids = " ".join(str(pid) for pid in sorted(old))
            _, output = self.run(
                f"for p in {pids}; do kill -QUIT $p 2>/dev/null || [ ! -d /proc/$p ] || "
                'echo "worker $p refused the signal"; done',
                max(left, 0.5),
            )
            return output.strip() or None
        return (
            f"no new worker was up {within:.1f} s after the reload: nginx is slow to load the "
            "config, or refused it (its error log says why; the old config then still serves)"
        )

    def run(self, script: str | bytes, timeout: float) -> tuple[int, str]:
        """Exit status of the script's last command, and what it printed; within `timeout`
        seconds in all."""
        body = script.encode() if isinstance(script, str) else script
        request = body + f"\nprintf '\\n%s %s\\n' {self._marker} \"$?\"\n".encode()
        self._deadline = time.monotonic() + timeout
        try:
            self._socket.settimeout(timeout)
            self._socket.sendall(request)
            return self._reply()
        except (OSError, ValueError, DeployError) as error:
            said = self._last_words()
            raise DeployError(
                f"the shell in the container did not answer ({error})"
                + (f": {said}" if said else "")
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
        searched = 0
        while True:
            start = self._buffer.find(marker, max(0, searched - len(marker)))
            if start != -1:
                end = self._buffer.find(b"\n", start + 1)
                if end != -1:
                    output = printable(self._buffer[:start].decode("utf-8", "replace"))
                    code = self._buffer[start + len(marker) : end]
                    self._buffer = self._buffer[end + 1 :]
                    return int(code), output
            searched = len(self._buffer)
            self._read_frame()

    def _last_words(self) -> str:
        """What the engine or the shell printed before the stream ended (e.g. why /bin/sh
        could not start), for the error message: half a second and one reply's worth at most."""
        self._deadline = time.monotonic() + 0.5
        with contextlib.suppress(OSError, ValueError, DeployError):
            while True:
                self._read_frame()
        text = (self._buffer + self._frames).decode("utf-8", "replace")
        return "".join(c for c in text if c.isprintable() or c == "\n").strip()[-300:]

    def _read_frame(self) -> None:
        while len(self._frames) < HEADER.size:
            self._receive()
        _, size = HEADER.unpack_from(self._frames)
        if len(self._buffer) + size > MAX_REPLY:
            raise DeployError(f"the shell printed more than {MAX_REPLY} bytes")
        while len(self._frames) < HEADER.size + size:
            self._receive()
        self._buffer += self._frames[HEADER.size : HEADER.size + size]
        self._frames = self._frames[HEADER.size + size :]

    def _receive(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeployError("the shell did not answer in time")
        self._socket.settimeout(left)
        chunk = self._socket.recv(65536)
        if not chunk:
            raise DeployError("the shell exited")
        self._frames += chunk
