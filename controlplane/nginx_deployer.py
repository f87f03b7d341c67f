"""The nginx edge: copy a config into a container, test it there, reload only if it passes.

Works with any nginx image (the official one, or one without a shell): the file goes in
through the archive API (`docker cp`), the test is `nginx -t` exec'd in the container, and the
reload is SIGHUP to its PID 1. A config that fails the test is replaced by the file that was
there before, so a later restart of that nginx still starts from a good config.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import time
from dataclasses import dataclass, field

import docker
import docker.errors

from controlplane.core.model import NginxTarget
from controlplane.errors import DeployError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployResult:
    container: str
    ok: bool
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict, hash=False)
    container_id: str = ""


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


class NginxDeployer:
    def __init__(self, api: docker.APIClient) -> None:
        self._api = api
        self._good: dict[str, bytes | None] = {}

    def retain(self, container_ids: set[str]) -> None:
        """Forget the last good config of containers that no longer exist."""
        self._good = {k: v for k, v in self._good.items() if k in container_ids}

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        """Never raises for a problem of this one container: the result says what happened.

        The file that was there before is read once per container and then remembered, since
        each archive call costs tens of milliseconds on dockerd. Whatever fails after the new
        file went in (a refused test, a container restarting, a lost engine), the previous
        file is put back, so a restart of that nginx never starts from an untested file."""
        timings: dict[str, float] = {}
        previous: bytes | None = None
        written = False
        try:
            if target.container_id not in self._good:
                mark = time.perf_counter()
                self._good[target.container_id] = self._read(target)
                timings["read"] = time.perf_counter() - mark
            previous = self._good[target.container_id]
            mark = time.perf_counter()
            self._write(target, content)
            written = True
            timings["copy"] = time.perf_counter() - mark
            mark = time.perf_counter()
            code, output = self._exec(target, ["nginx", "-t"])
            timings["test"] = time.perf_counter() - mark
            if code != 0:
                self._restore(target, previous)
                lines = [ln for ln in output.strip().splitlines() if ln.strip()]
                error = "nginx -t failed, previous config kept: " + " | ".join(lines[-3:])
                log.error("nginx %s rejected the new config: %s", target.container, error)
                return DeployResult(target.container, False, error, timings, target.container_id)
            mark = time.perf_counter()
            self._api.kill(target.container_id, signal="SIGHUP")
            timings["reload"] = time.perf_counter() - mark
            self._good[target.container_id] = content
        except Exception as error:  # any failure stays this container's, never the pass's
            if written:
                self._restore(target, previous)
            message = f"could not update nginx {target.container}: {error}"
            log.error("%s", message)
            return DeployResult(target.container, False, message, timings, target.container_id)
        log.info(
            "nginx %s reloaded with the new config (copy %.0f ms, test %.0f ms)",
            target.container,
            timings["copy"] * 1000,
            timings["test"] * 1000,
        )
        return DeployResult(target.container, True, None, timings, target.container_id)

    def _restore(self, target: NginxTarget, previous: bytes | None) -> None:
        try:
            self._write(target, previous if previous is not None else b"")
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

    def _write(self, target: NginxTarget, content: bytes) -> None:
        directory, name = posixpath.split(target.config_path)
        try:
            ok = self._api.put_archive(target.container_id, directory, pack(name, content))
        except docker.errors.NotFound as error:
            raise DeployError(
                f"directory {directory} does not exist in the container: create it in the image "
                f"or set controlplane.config_path to a path in an included directory"
            ) from error
        if not ok:
            raise DeployError(f"the engine refused to copy {target.config_path} into the container")

    def _exec(self, target: NginxTarget, command: list[str]) -> tuple[int, str]:
        exec_id = self._api.exec_create(target.container_id, command)["Id"]
        output = self._api.exec_start(exec_id).decode("utf-8", "replace")
        code = self._api.exec_inspect(exec_id).get("ExitCode")
        if code is None:
            raise DeployError(f"`{' '.join(command)}` did not finish in the container")
        return int(code), output
