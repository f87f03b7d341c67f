"""The nginx edge: put a config into a container, test it there, reload only if it passes.

Two ways in. A shell kept open in the container (nginx_shell) costs what nginx -t and the
reload cost. The engine's own calls work with any image, even one without a shell: the file
goes in through the archive API (`docker cp`), the test is `nginx -t` exec'd in the container,
and the reload is SIGHUP to its PID 1, at ~180 ms of engine calls per deploy on dockerd 20.10.
Either way, a config that fails the test is replaced by the file that was there before, so a
later restart of that nginx still starts from a good config.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import docker
import docker.errors

from controlplane.core.model import NginxTarget
from controlplane.errors import DeployError
from controlplane.nginx_shell import NoShell, ShellSession, printable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployResult:
    container: str
    ok: bool
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict, hash=False)
    container_id: str = ""
    via: str = ""
    """"shell" or "engine" (Via): how the config went in."""
    refused: bool = False
    """nginx -t said no: the same text will fail again (else the way in failed)."""


def pack(name: str, content: bytes) -> bytes:
    """A one-file tar archive, as the archive API wants it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def unpack(archive: bytes, name: str) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.extractfile(name)
            if member is None:
                raise DeployError(f"{name} in the container is not a regular file")
            return member.read()
    except (KeyError, tarfile.TarError) as error:
        raise DeployError(
            f"{name} in the container is a link or unreadable ({error}): point "
            "controlplane.config_path at a regular file"
        ) from error


Via = Literal["shell", "engine"]


class ShellFailed(DeployError):
    """The shell kept in a container failed during a deploy; the engine takes over."""


class Channel(Protocol):
    """How the config file gets into one nginx container, is tested there and loaded."""

    def write(self, content: bytes) -> None: ...

    def test(self) -> tuple[int, str]: ...

    def reload(self) -> None: ...


class EngineChannel:
    """The engine's archive, exec and kill calls: any image, one engine round trip each."""

    def __init__(self, api: docker.APIClient, target: NginxTarget) -> None:
        self._api = api
        self._id = target.container_id
        self._path = target.config_path

    def write(self, content: bytes) -> None:
        directory, name = posixpath.split(self._path)
        try:
            ok = self._api.put_archive(self._id, directory, pack(name, content))
        except docker.errors.NotFound as error:
            raise DeployError(
                f"directory {directory} does not exist in the container: create it in the image "
                f"or set controlplane.config_path to a path in an included directory"
            ) from error
        if not ok:
            raise DeployError(f"the engine refused to copy {self._path} into the container")

    def test(self) -> tuple[int, str]:
        exec_id = self._api.exec_create(self._id, ["nginx", "-t"])["Id"]
        output = self._api.exec_start(exec_id).decode("utf-8", "replace")
        code = self._api.exec_inspect(exec_id).get("ExitCode")
        if code is None:
            raise DeployError("`nginx -t` did not finish in the container")
        return int(code), output

    def reload(self) -> None:
        self._api.kill(self._id, signal="SIGHUP")


class NginxDeployer:
    """The reconciler calls `deploy` from a thread pool, one call per container per pass, and
    `retain` and `close` only between passes: each container's entries are touched by one
    thread at a time. The session map alone is shared across those threads, under a lock."""

    def __init__(self, api: docker.APIClient, shell: bool = True, retire: bool = True) -> None:
        """`shell`: go in through a shell kept open in each container when it has one.
        `retire`: through a shell, retire nginx's old workers as soon as the new ones are up
        (nginx_workers)."""
        self._api = api
        self._shell = shell
        self._retire = retire
        self._good: dict[str, bytes | None] = {}
        self._sessions: dict[str, ShellSession] = {}
        self._no_shell: dict[str, str] = {}
        """Container id -> the start (started_at) in which it could not open a shell."""
        self._lock = threading.Lock()

    def retain(self, container_ids: set[str]) -> None:
        """Forget what is known of containers that no longer exist, and close their shells."""
        self._good = {k: v for k, v in self._good.items() if k in container_ids}
        self._no_shell = {k: v for k, v in self._no_shell.items() if k in container_ids}
        with self._lock:
            gone = [k for k in self._sessions if k not in container_ids]
            closing = [self._sessions.pop(k) for k in gone]
        for session in closing:
            session.close()

    def close(self) -> None:
        self.retain(set())

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        """Never raises for a problem of this one container: the result says what happened.

        Through the container's shell when it has one; when the shell fails on the way (it
        died, stalled, or said something unexpected), through the engine, in the same call."""
        timings: dict[str, float] = {}
        session = self._session(target, content, timings) if self._shell else None
        if session is not None:
            try:
                return self._attempt(target, content, session, "shell", timings)
            except ShellFailed:
                self._drop_session(target.container_id)
        return self._attempt(target, content, EngineChannel(self._api, target), "engine", timings)

    def _attempt(
        self,
        target: NginxTarget,
        content: bytes,
        channel: Channel,
        via: Via,
        timings: dict[str, float],
    ) -> DeployResult:
        """Raises ShellFailed when the shell failed on the way (the file put back).

        The file that was there before is read once per container and then remembered, since
        each archive call costs tens of milliseconds on dockerd. Whatever fails once the new
        file may have gone in (a refused test, a container restarting, a lost engine, a shell
        gone), the previous file is put back through the engine, so a restart of that nginx
        never starts from an untested file."""
        previous: bytes | None = None
        written = False
        try:
            if target.container_id not in self._good:
                mark = time.perf_counter()
                self._good[target.container_id] = self._read(target)
                timings["read"] = time.perf_counter() - mark
            previous = self._good[target.container_id]
            mark = time.perf_counter()
            written = True
            channel.write(content)
            timings["copy"] = time.perf_counter() - mark
            mark = time.perf_counter()
            code, output = channel.test()
            timings["test"] = time.perf_counter() - mark
            if code != 0:
                self._restore(target, previous)
                lines = [ln for ln in printable(output).strip().splitlines() if ln.strip()]
                error = "nginx -t failed, previous config kept: " + " | ".join(lines[-3:])
                log.error("nginx %s rejected the new config: %s", target.container, error)
                return DeployResult(
                    target.container, False, error, timings, target.container_id, via, True
                )
            mark = time.perf_counter()
            channel.reload()
            timings["reload"] = time.perf_counter() - mark
            self._good[target.container_id] = content
        except Exception as error:  # any failure stays this container's, never the pass's
            if written:
                self._restore(target, previous)
            if via == "shell":
                log.warning(
                    "nginx %s: the shell failed (%s); deploying through the engine",
                    target.container,
                    error,
                )
                raise ShellFailed(str(error)) from error
            message = f"could not update nginx {target.container}: {error}"
            log.error("%s", message)
            return DeployResult(target.container, False, message, timings, target.container_id, via)
        if self._retire and isinstance(channel, ShellSession):
            mark = time.perf_counter()
            self._retire_old_workers(target, channel, within=max(0.5, 3 * timings["test"]))
            timings["retire"] = time.perf_counter() - mark
        log.info(
            "nginx %s reloaded with the new config via the %s (copy %.1f ms, test %.1f ms)",
            target.container,
            via,
            timings["copy"] * 1000,
            timings["test"] * 1000,
        )
        return DeployResult(target.container, True, None, timings, target.container_id, via)

    def _retire_old_workers(
        self, target: NginxTarget, session: ShellSession, within: float
    ) -> None:
        """The new config is loaded whatever happens here: a failure only leaves the old
        workers to the master, 100 ms after the reload. `within`: the master starts the new
        workers once it has read the config, which takes about what `nginx -t` took."""
        try:
            problem = session.retire_old_workers(within)
        except DeployError as error:
            self._drop_session(target.container_id)
            problem = f"{error}; the next deploy opens a new shell"
        if problem:
            log.warning(
                "nginx %s: could not retire its old workers early: %s; nginx retires them "
                "itself 100 ms after its new workers start",
                target.container,
                problem,
            )

    def _session(
        self, target: NginxTarget, content: bytes, timings: dict[str, float]
    ) -> ShellSession | None:
        """The container's open shell, opened now if need be; None: use the engine."""
        if not ShellSession.can_carry(content):
            return None
        if self._no_shell.get(target.container_id) == target.started_at:
            return None
        with self._lock:
            session = self._sessions.get(target.container_id)
        if session is not None and session.started_at == target.started_at:
            return session
        self._drop_session(target.container_id)
        mark = time.perf_counter()
        try:
            session = ShellSession(
                self._api,
                target.container_id,
                target.started_at,
                target.config_path,
                note_workers=self._retire,
            )
        except NoShell as error:
            self._no_shell[target.container_id] = target.started_at
            log.info(
                "nginx %s: %s; its configs go in through the engine's archive and exec "
                "calls instead (~180 ms more per deploy)",
                target.container,
                error,
            )
            return None
        except DeployError as error:
            log.warning(
                "nginx %s: %s; this deploy goes through the engine", target.container, error
            )
            return None
        timings["open"] = time.perf_counter() - mark
        with self._lock:
            self._sessions[target.container_id] = session
        return session

    def _drop_session(self, container_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(container_id, None)
        if session is not None:
            session.close()

    def _restore(self, target: NginxTarget, previous: bytes | None) -> None:
        """Through the engine: the one way in that works whatever state a shell is in."""
        try:
            EngineChannel(self._api, target).write(previous if previous is not None else b"")
        except Exception as error:
            self._good.pop(target.container_id, None)  # unknown now: read it again next time
            log.error(
                "could not put the previous config back into nginx %s (%s): the untested file "
                "stays there until the next deploy",
                target.container,
                error,
            )

    def _read(self, target: NginxTarget) -> bytes | None:
        try:
            stream, _ = self._api.get_archive(target.container_id, target.config_path)
        except docker.errors.NotFound:
            return None
        return unpack(b"".join(stream), posixpath.basename(target.config_path))
