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

dockerd's attach frames are read by docker-py's own `frames_iter_no_tty`. Its reads poll
with no timeout (docker.utils.socket.read), so no deadline can be passed to them: a deadline
is kept by shutting the connection down (`abort`, from a watchdog thread), which ends a read
or a send in progress; that is also how the deployer ends a deploy that passed its deadline.
A request that misses its deadline thus ends the session, as it must: its late reply would
be taken for the next request's.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import docker
from docker.utils.socket import frames_iter_no_tty

from controlplane import nginx_workers
from controlplane.errors import DeployError

OPEN_TIMEOUT = 5.0
STEP_TIMEOUT = 30.0
"""Long enough for `nginx -t` of a config with tens of thousands of servers (~0.3 s here)."""
MAX_REPLY = 1 << 20
"""nginx -t says a few lines; a shell that prints more is not one to keep talking to."""
MAX_FILE = 64 << 20
"""The most `read` takes back: a config rendered for tens of thousands of services."""
LAST_WORDS = 0.5
"""How long a failed request waits for what the shell or the engine printed before it ended."""


class NoShell(DeployError):
    """The container has no usable /bin/sh (or no nginx, cat on its PATH, or may not write
    the config's directory): use the engine until it restarts. Other errors of opening one (a
    container restarting) are DeployError."""


def printable(text: str) -> str:
    """What a container printed, safe for a log line or an API reply."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


def staging_path(path: str) -> str:
    """Beside the file, so that mv replaces it in one rename; a dot file, so that an include
    of `*` or `*.conf` never reads a half-written one."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.controlplane-new")


class Watchdog:
    """Calls `expire` once the deadline armed last passes, unless disarmed first; one thread
    per session, woken only when a deadline comes earlier than the one it sleeps towards."""

    def __init__(self, expire: Callable[[], None]) -> None:
        self._expire = expire
        self._due: float | None = None
        self._waking = math.inf
        self._stopped = False
        self._changed = threading.Condition(threading.Lock())
        threading.Thread(target=self._watch, name="nginx-shell-watchdog", daemon=True).start()

    def arm(self, seconds: float) -> None:
        with self._changed:
            self._due = time.monotonic() + seconds
            if self._due < self._waking:
                self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._due = None

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while not self._stopped:
                now = time.monotonic()
                if self._due is not None and self._due <= now:
                    break
                self._waking = math.inf if self._due is None else self._due
                self._changed.wait(None if self._due is None else self._due - now)
            else:
                return
        self._expire()


class ShellSession:
    """A Channel (nginx_deployer) used by one deploy at a time: only `abort` may be called
    from another thread."""

    via = "shell"

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
        `note_workers`: reload notes nginx's workers, for `settle` to retire the old ones."""
        self.container_id = container_id
        self.started_at = started_at
        self._note_workers = note_workers
        self._marker = f"@@controlplane-{secrets.token_hex(8)}".encode()
        self._buffer = bytearray()
        self._ended: str | None = None
        """Why the connection was shut down, once it was."""
        self._renaming = False
        self._old_workers: frozenset[int] = frozenset()
        directory = posixpath.dirname(config_path)
        self._path_raw = config_path
        self._path = shlex.quote(config_path)
        self.staging = staging_path(config_path)
        try:
            exec_id = api.exec_create(
                container_id, ["/bin/sh"], stdin=True, stdout=True, stderr=True
            )["Id"]
            stream: Any = api.exec_start(exec_id, socket=True)
        except docker.errors.DockerException as error:
            raise DeployError(f"could not start /bin/sh in the container: {error}") from error
        self._stream = stream
        # (stream number, bytes) per frame: docker-py's stubs leave it untyped.
        self._frames = cast(Iterator[tuple[int, bytes]], frames_iter_no_tty(stream))
        # docker-py hands back its response's stream, read-only over a unix socket: requests
        # go out on a socket of our own over the same connection, which also takes shutdown.
        self._socket = socket.socket(fileno=os.dup(stream.fileno()))
        # The dup shares the stream's O_NONBLOCK: with a timeout, sendall waits for room
        # instead of failing with EAGAIN on a file larger than the socket's buffer.
        self._socket.settimeout(STEP_TIMEOUT)
        self._send = stream.sendall if isinstance(stream, socket.socket) else self._socket.sendall
        """A TLS connection's stream is its SSL socket: the bytes must go through it."""
        self._watchdog = Watchdog(lambda: self.abort("it timed out"))
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

    @property
    def alive(self) -> bool:
        """False once a request failed or the session was aborted or closed."""
        return self._ended is None

    @property
    def rename_pending(self) -> bool:
        """The rename was sent and its reply never came: a shell that stalled (a paused
        container) may still run it when it resumes."""
        return self._renaming

    @staticmethod
    def can_carry(content: bytes) -> bool:
        """A quoted here-document carries text that is empty or ends with a newline and has
        no NUL: every rendered config does."""
        return (not content or content.endswith(b"\n")) and b"\0" not in content

    def read(self) -> bytes | None:
        """The config file as it is, byte for byte; None when there is none. A link is
        refused, as the archive API refuses it: a rename would replace it by a file."""
        path = self._path
        _, kind = self.run(
            f"if [ -L {path} ]; then echo link; elif [ ! -e {path} ]; then echo none; "
            f"elif [ ! -f {path} ]; then echo other; fi",
            STEP_TIMEOUT,
        )
        if kind.strip() == "none":
            return None
        if kind.strip():
            raise DeployError(
                f"{path} in the container is a link or not a regular file: point "
                "controlplane.config_path at a regular file"
            )
        code, content = self.request(f"cat {self._path}".encode(), STEP_TIMEOUT, MAX_FILE)
        if code != 0:
            said = printable(content.decode("utf-8", "replace")).strip()
            raise DeployError(f"could not read {self._path} in the container: {said}")
        return content

    def write(self, content: bytes) -> None:
        """The whole config to a staging file, then, once the shell said it is there, mv
        over the config: two requests, so that a shell that stalls mid-file (a paused
        container) and resumes after the deploy went on through the engine never renames it."""
        self.put(self._path_raw, content, self.staging, renaming=True)

    def put(
        self, path: str, content: bytes, staging: str | None = None, renaming: bool = False
    ) -> None:
        """`content` to `path` the same way: staged beside it (`staging`), then renamed, so a
        reader never sees half a file. `renaming`: note the rename for `rename_pending`."""
        delimiter = f"CONTROLPLANE_EOF_{secrets.token_hex(12)}".encode()
        if not self.can_carry(content) or delimiter in content:
            raise DeployError("this file can't go through the shell; use the archive API")
        staging = staging or staging_path(path)
        document, rename = self.write_scripts(content, delimiter, staging, path)
        code, output = self.run(document, STEP_TIMEOUT)
        if code == 0:
            self._renaming = renaming
            code, output = self.run(rename, STEP_TIMEOUT)
            self._renaming = False
        if code != 0:
            raise DeployError(f"could not write {path} in the container: {output.strip()}")

    def write_scripts(
        self, content: bytes, delimiter: bytes, staging: str | None = None, path: str | None = None
    ) -> tuple[bytes, bytes]:
        """The staging file's here-document, and the rename as a `{ ...; }` group: a shell
        whose input ends early (a controller killed, a connection cut) still runs a command
        whose here-document was cut short, but never an incomplete group."""
        quoted_staging = shlex.quote(staging or self.staging).encode()
        quoted_path = shlex.quote(path or self._path_raw).encode()
        return (
            b"cat > %s <<'%s'\n%s%s" % (quoted_staging, delimiter, content, delimiter),
            b"{ mv -f %s %s; }" % (quoted_staging, quoted_path),
        )

    def test(self) -> tuple[int, str]:
        return self.run("nginx -t", STEP_TIMEOUT)

    def reload(self) -> None:
        """With `note_workers`, notes the workers up before the signal, for `settle`, in the
        same request."""
        listing = f"{nginx_workers.LISTING}\n" if self._note_workers else ""
        code, output = self.run(f"{listing}kill -HUP 1", STEP_TIMEOUT)
        if code != 0:
            raise DeployError(f"could not signal the nginx master (PID 1): {output.strip()}")
        if self._note_workers:
            self._old_workers = nginx_workers.workers(nginx_workers.parse(output))

    def settle(self, within: float) -> str | None:
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

    def restore(self, previous: bytes | None) -> None:
        """The file that was there before (none: an empty one)."""
        self.write(previous or b"")

    def run(self, script: str | bytes, timeout: float) -> tuple[int, str]:
        """Exit status of the script's last command, and what it printed (made printable);
        within `timeout` seconds in all."""
        code, output = self.request(
            script.encode() if isinstance(script, str) else script, timeout, MAX_REPLY
        )
        return code, printable(output.decode("utf-8", "replace"))

    def request(self, script: bytes, timeout: float, limit: int) -> tuple[int, bytes]:
        """Exit status of the script's last command, and the bytes it printed, at most
        `limit` of them; within `timeout` seconds in all. Any failure ends the session."""
        if self._ended is not None:
            raise DeployError(f"the shell in the container was closed ({self._ended})")
        self._watchdog.arm(timeout)
        try:
            self._send(script + b"\nprintf '\\n%s %s\\n' " + self._marker + b' "$?"\n')
            return self._reply(limit)
        except (OSError, ValueError, DeployError) as error:
            why = self._ended or str(error)
            said = self._last_words()
            raise DeployError(
                f"the shell in the container did not answer ({why})" + (f": {said}" if said else "")
            ) from error
        finally:
            self._watchdog.disarm()

    def abort(self, why: str = "the deploy was given up") -> None:
        """From any thread: ends the request in progress, if any, and the session (its
        stdin closes, which ends the shell in the container)."""
        if self._ended is None:
            self._ended = why
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Only from the thread that uses the session (or when none does)."""
        self.abort("closed")
        self._watchdog.stop()
        with contextlib.suppress(OSError):
            self._socket.close()
        with contextlib.suppress(OSError):
            self._stream.close()

    def _reply(self, limit: int) -> tuple[int, bytes]:
        marker = b"\n" + self._marker + b" "
        searched = 0
        while True:
            start = self._buffer.find(marker, max(0, searched - len(marker)))
            if start != -1:
                end = self._buffer.find(b"\n", start + len(marker))
                if end != -1:
                    output = bytes(self._buffer[:start])
                    code = int(self._buffer[start + len(marker) : end])
                    del self._buffer[: end + 1]
                    return code, output
                searched = start + len(marker)  # the marker's line is still coming
            else:
                searched = len(self._buffer)
            if searched > limit + len(marker):
                raise DeployError(f"the shell printed more than {limit} bytes")
            self._buffer += self._next_frame()

    def _next_frame(self) -> bytes:
        try:
            _, data = next(self._frames)
        except StopIteration:
            raise DeployError(self._ended or "the shell exited") from None
        return data

    def _last_words(self) -> str:
        """What the engine or the shell printed before the stream ended (e.g. why /bin/sh
        could not start), for the error message: LAST_WORDS seconds and one reply's worth at
        most. Ends the session first: nothing it says now can be taken for a reply."""
        self.abort(self._ended or "a request failed")
        self._watchdog.arm(LAST_WORDS)
        with contextlib.suppress(OSError, ValueError, DeployError):
            while len(self._buffer) <= MAX_REPLY:
                self._buffer += self._next_frame()
        text = self._buffer.decode("utf-8", "replace")
        return "".join(c for c in text if c.isprintable() or c == "\n").strip()[-300:]
