"""The nginx edge: put a config into a container, test it there, reload only if it passes.

Two ways in, each a Channel. A shell kept open in the container (nginx_shell) costs what
nginx -t and the reload cost. The engine's own calls work with any image, even one without a
shell: the file goes in through the archive API (`docker cp`), the test is `nginx -t` exec'd
in the container, and the reload is SIGHUP to its PID 1, at ~180 ms of engine calls per
deploy on dockerd 20.10. Either way, a config that fails the test is replaced by the file that
was there before, so a later restart of that nginx still starts from a good config.

Every nginx of a pass is deployed to at once, each within its own deadline: one that stalls
(a paused container, a shell that stopped answering) is given up at its deadline, with the
file put back, and holds neither the others nor the pass longer than that.
"""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import docker
import docker.errors

from controlplane.core.dataplane import delta_path, state_path
from controlplane.core.model import NginxTarget
from controlplane.errors import DeployError
from controlplane.nginx_shell import NoShell, ShellSession, printable, staging_path

log = logging.getLogger(__name__)

DEADLINE = 10.0
"""Seconds one nginx's deploy may take, opening a shell included: well above what a deploy
through the engine takes on a loaded host, or `nginx -t` of tens of thousands of servers."""
STEPS = {
    "open": "opening a shell",
    "read": "reading the current file",
    "copy": "writing the file",
    "test": "nginx -t",
    "reload": "the reload",
    "retire": "retiring the old workers",
    "push": "writing the data plane's state",
    "probe": "trying a config that needs Lua",
}
"""Each step's timing name, and what it is called in a message."""

T = TypeVar("T")


@dataclass(frozen=True)
class DeployResult:
    container: str
    ok: bool
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict, hash=False)
    container_id: str = ""
    via: str = ""
    """"shell" or "engine": how the config went in."""
    refused: bool = False
    """nginx -t said no: the same text will fail again (else the way in failed)."""
    pushed: bool = False
    """The dynamic data plane's state went in (no reload), not a config."""


def pack(name: str, content: bytes, also: str | None = None) -> bytes:
    """A tar archive of one file, as the archive API wants it; `also`: a second name for the
    same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in (name, also) if also else (name,):
            info = tarfile.TarInfo(member)
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


class Channel(Protocol):
    """How one deploy gets a config into one nginx, has it tested there and loaded.

    The steps raise DeployError when the way in fails; `abort` may come from another thread at
    the deploy's deadline, after which every step but `restore` fails. A channel that holds a
    connection (the shell) is kept by the deployer across deploys and closed by it.

    The dynamic data plane's state goes in through `put`, the same way in as the config:
    only who may exec into the container can change its routing."""

    @property
    def via(self) -> str:
        """The way the last step went, for DeployResult."""
        ...

    def read(self) -> bytes | None:
        """The config as it is in the container now; None when there is none."""
        ...

    def write(self, content: bytes) -> None: ...

    def test(self) -> tuple[int, str]:
        """nginx -t: its exit status and what it said."""
        ...

    def reload(self) -> None: ...

    def settle(self, within: float) -> str | None:
        """After the reload, within `within` seconds: only the new config serves once it
        returns (nginx's old workers retired). Returns what kept it from that, for a warning;
        nginx gets there by itself 100 ms after its new workers start."""
        ...

    def restore(self, previous: bytes | None) -> None:
        """Puts back the file that was there before (None: there was none: an empty file)."""
        ...

    def abort(self) -> None: ...

    def put(self, path: str, content: bytes) -> None:
        """Any other file, whole: a reader sees the old one or the new one."""
        ...


class EngineChannel:
    """The engine's archive, exec and kill calls: any image, one engine round trip each. A call
    in progress can't be interrupted: `abort` refuses the steps after it."""

    via = "engine"

    def __init__(self, api: docker.APIClient, target: NginxTarget) -> None:
        self._api = api
        self._id = target.container_id
        self._path = target.config_path
        self._aborted = False

    def read(self) -> bytes | None:
        self._check()
        try:
            stream, _ = self._api.get_archive(self._id, self._path)
        except docker.errors.NotFound:
            return None
        return unpack(b"".join(stream), posixpath.basename(self._path))

    def write(self, content: bytes) -> None:
        self._check()
        self._put(content)

    def test(self) -> tuple[int, str]:
        self._check()
        exec_id = self._api.exec_create(self._id, ["nginx", "-t"])["Id"]
        output = self._api.exec_start(exec_id).decode("utf-8", "replace")
        code = self._api.exec_inspect(exec_id).get("ExitCode")
        if code is None:
            raise DeployError("`nginx -t` did not finish in the container")
        return int(code), output

    def reload(self) -> None:
        self._check()
        self._api.kill(self._id, signal="SIGHUP")

    def settle(self, within: float) -> str | None:
        return None

    def restore(self, previous: bytes | None, also: str | None = None) -> None:
        """`also`: a name beside the file to put the same bytes under."""
        self._put(previous or b"", also)

    def abort(self) -> None:
        self._aborted = True

    def put(self, path: str, content: bytes) -> None:
        """`content` to `path`, staged beside it then renamed by an exec'd `mv`, so that a
        reader never sees half a file; written in place where the image has no mv (the
        dynamic data plane's loader refuses a torn file whole)."""
        self._check()
        directory, name = posixpath.split(path)
        # not the shell's staging file: a shell given up mid-write may still be writing it
        staging = staging_path(path) + "-engine"
        try:
            if not self._api.put_archive(
                self._id, directory, pack(posixpath.basename(staging), content)
            ):
                raise DeployError(f"the engine refused to copy {path} into the container")
            exec_id = self._api.exec_create(self._id, ["mv", "-f", staging, path])["Id"]
            said = self._api.exec_start(exec_id).decode("utf-8", "replace")
            code = self._api.exec_inspect(exec_id).get("ExitCode")
            if code in (126, 127):  # no mv in the image
                if not self._api.put_archive(self._id, directory, pack(name, content)):
                    raise DeployError(f"the engine refused to copy {path} into the container")
                return
        except docker.errors.NotFound as error:
            raise DeployError(f"could not write {path} in the container: {error}") from error
        if code != 0:
            raise DeployError(f"could not rename {staging} to {path}: {printable(said).strip()}")

    def _check(self) -> None:
        if self._aborted:
            raise DeployError("the deploy was given up at its deadline")

    def _put(self, content: bytes, also: str | None = None) -> None:
        directory, name = posixpath.split(self._path)
        try:
            ok = self._api.put_archive(self._id, directory, pack(name, content, also))
        except docker.errors.NotFound as error:
            raise DeployError(
                f"directory {directory} does not exist in the container: create it in the image "
                f"or set controlplane.config_path to a path in an included directory"
            ) from error
        if not ok:
            raise DeployError(f"the engine refused to copy {self._path} into the container")


class ShellFirst:
    """The container's shell, and the engine once the shell fails mid-deploy (it died,
    stalled, or said something unexpected): the engine writes the file again and carries on
    from the step the shell failed in, in the same deploy. Restores go through the engine,
    the one way in that works whatever state the shell is in."""

    def __init__(self, shell: ShellSession, engine: EngineChannel, container: str) -> None:
        self._shell = shell
        self._engine = engine
        self._container = container
        self._content: bytes | None = None
        self._failed = False
        self._aborted = False

    @property
    def via(self) -> str:
        return self._engine.via if self._failed else self._shell.via

    def read(self) -> bytes | None:
        return self._step(lambda channel: channel.read())

    def write(self, content: bytes) -> None:
        self._step(lambda channel: channel.write(content))
        self._content = content

    def test(self) -> tuple[int, str]:
        return self._step(lambda channel: channel.test())

    def reload(self) -> None:
        self._step(lambda channel: channel.reload())

    def settle(self, within: float) -> str | None:
        """A shell that fails here is not replaced by the engine: the config is loaded."""
        if self._failed:
            return self._engine.settle(within)
        try:
            return self._shell.settle(within)
        except DeployError as error:
            self._shell.abort("it failed retiring the old workers")
            return f"{error}; the next deploy opens a new shell"

    def restore(self, previous: bytes | None) -> None:
        """A shell that stalled with the rename sent (a paused container) may run it once it
        resumes: the staging file then holds the previous file too."""
        staging = posixpath.basename(self._shell.staging) if self._shell.rename_pending else None
        self._engine.restore(previous, also=staging)

    def abort(self) -> None:
        self._aborted = True
        self._shell.abort()
        self._engine.abort()

    def put(self, path: str, content: bytes) -> None:
        self._step(lambda channel: channel.put(path, content))

    def _step(self, step: Callable[[Channel], T]) -> T:
        if not self._failed:
            try:
                return step(self._shell)
            except Exception as error:
                if self._aborted:
                    raise
                self._failed = True
                self._shell.abort("it failed during a deploy")
                log.warning(
                    "nginx %s: the shell failed (%s); deploying through the engine",
                    self._container,
                    error,
                )
                if self._content is not None:
                    self._engine.write(self._content)
        return step(self._engine)


@dataclass(eq=False)
class NginxLink:
    """What the deployer keeps of one nginx container between deploys; used by one deploy at
    a time (`busy`): one given up at its deadline may still be putting the file back when the
    next pass comes."""

    busy: threading.Lock = field(default_factory=threading.Lock)
    known: bool = False
    good: bytes | None = None
    """When known: the file last tested and loaded, or the one found before (None: no file).
    Read once, then remembered: a read through the engine costs tens of milliseconds."""
    shell: ShellSession | None = None
    no_shell: str | None = None
    """The start (started_at) in which it could not open a shell: the engine until it restarts."""
    gone: bool = False
    """The container left, or the deployer closed, while a deploy still used the link."""

    def drop_shell(self) -> None:
        if self.shell is not None:
            self.shell.close()
            self.shell = None

    def discard(self) -> None:
        if self.busy.acquire(blocking=False):
            try:
                self.drop_shell()
            finally:
                self.busy.release()
        else:
            self.gone = True  # the deploy using it closes its shell once it ends
            shell = self.shell
            if shell is not None:
                shell.abort("the container is gone or the controller stops")


class Attempt:
    """One nginx's deploy as its deadline sees it: the worker thread's result if it came in
    time, else given up, its channel aborted."""

    def __init__(self, target: NginxTarget) -> None:
        self.target = target
        self.timings: dict[str, float] = {}
        self.step = "waiting for its previous deploy to end"
        self.result: DeployResult | None = None
        self._channel: Channel | None = None
        self._given_up = False
        self._lock = threading.Lock()

    @property
    def given_up(self) -> bool:
        return self._given_up

    def use(self, channel: Channel) -> bool:
        """False once given up: the deploy must not start."""
        with self._lock:
            self._channel = channel
            return not self._given_up

    def finish(self, result: DeployResult) -> None:
        with self._lock:
            if not self._given_up:
                self.result = result

    def give_up(self) -> DeployResult | None:
        """The result if it came meanwhile; else aborts the channel, and returns None."""
        with self._lock:
            if self.result is not None:
                return self.result
            self._given_up = True
            channel = self._channel
        if channel is not None:
            channel.abort()
        return None


Operation = Callable[[NginxLink, Channel, Attempt, float], DeployResult]
"""One nginx's part of a deploy_all, push_all or probe_all: its link, the way in, the
attempt its deadline watches, and that deadline."""


class NginxDeployer:
    """`deploy_all` runs each nginx's deploy in a thread of its own; `retain` and `close` come
    between passes. The map of links is shared by those, under a lock; a link's own fields
    are used by the thread holding its `busy` lock."""

    def __init__(
        self,
        api: docker.APIClient,
        shell: bool = True,
        retire: bool = True,
        deadline: float = DEADLINE,
    ) -> None:
        """`shell`: go in through a shell kept open in each container when it has one.
        `retire`: through a shell, retire nginx's old workers as soon as the new ones are up
        (nginx_workers). `deadline`: seconds each nginx's deploy may take."""
        self._api = api
        self._shell = shell
        self._retire = retire
        self._deadline = deadline
        self._links: dict[str, NginxLink] = {}
        self._lock = threading.Lock()

    def retain(self, container_ids: set[str]) -> None:
        """Forget what is known of containers that no longer exist, and close their shells."""
        with self._lock:
            gone = [self._links.pop(k) for k in list(self._links) if k not in container_ids]
        for link in gone:
            link.discard()

    def close(self) -> None:
        self.retain(set())

    def deploy(self, target: NginxTarget, content: bytes) -> DeployResult:
        return self.deploy_all((target,), content)[0]

    def deploy_all(
        self,
        targets: Sequence[NginxTarget],
        content: bytes,
        on_result: Callable[[DeployResult], object] | None = None,
    ) -> tuple[DeployResult, ...]:
        """Deploys to every target at once and returns their results in the targets' order,
        each within the deadline: one that did not finish by then is given up (a failure
        that says so; its shell is closed and the file put back). `on_result` hears each
        result as it comes, in this thread. Never raises for a problem of one container."""

        def deploy(
            link: NginxLink, channel: Channel, attempt: Attempt, deadline: float
        ) -> DeployResult:
            return self._attempt(link, channel, content, attempt, deadline)

        return self._each(targets, content, deploy, on_result)

    def push_all(
        self, targets: Sequence[NginxTarget], state: bytes, delta: bool = False
    ) -> tuple[DeployResult, ...]:
        """The dynamic data plane's state file, or a delta over it (core.dataplane), into
        every target, beside its config, within the same deadlines; its Lua loader picks it
        up within its poll."""

        def push(
            link: NginxLink, channel: Channel, attempt: Attempt, deadline: float
        ) -> DeployResult:
            target = attempt.target
            path = (delta_path if delta else state_path)(target.config_path)
            with self._step(attempt, "push"):
                channel.put(path, state)
            return DeployResult(
                target.container,
                True,
                None,
                attempt.timings,
                target.container_id,
                channel.via,
                pushed=True,
            )

        return self._each(targets, state, push)

    def probe_all(self, targets: Sequence[NginxTarget], probe: bytes) -> tuple[DeployResult, ...]:
        """Whether each target's nginx takes `probe` in place of its config (`nginx -t`),
        the file that was there put back either way: ok means it does; else `error` holds
        what nginx said."""

        def try_probe(
            link: NginxLink, channel: Channel, attempt: Attempt, deadline: float
        ) -> DeployResult:
            target = attempt.target
            if not link.known:
                with self._step(attempt, "read"):
                    link.good = channel.read()
                link.known = True
            try:
                with self._step(attempt, "probe"):
                    channel.write(probe)
                    code, output = channel.test()
            finally:
                self._restore(link, target, channel, link.good)
            lines = [ln for ln in printable(output).strip().splitlines() if ln.strip()]
            said = None if code == 0 else " | ".join(lines[-2:])
            return DeployResult(
                target.container,
                code == 0,
                said,
                attempt.timings,
                target.container_id,
                channel.via,
                refused=code != 0,
            )

        return self._each(targets, probe, try_probe)

    def _each(
        self,
        targets: Sequence[NginxTarget],
        content: bytes,
        operation: Operation,
        on_result: Callable[[DeployResult], object] | None = None,
    ) -> tuple[DeployResult, ...]:
        """`operation` on every target at once, each in a thread of its own within the
        deadline; `content`: what goes in, which decides whether the shell can carry it."""
        deadline = time.monotonic() + self._deadline
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        attempts = [Attempt(target) for target in targets]
        for index, attempt in enumerate(attempts):
            link = self._link(attempt.target.container_id)
            threading.Thread(
                target=self._work,
                args=(index, attempt, link, content, operation, deadline, finished),
                name=f"deploy-{attempt.target.container}",
                daemon=True,
            ).start()
        results: dict[int, DeployResult] = {}
        while len(results) < len(attempts):
            try:
                index = finished.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            results[index] = self._heard(attempts[index].result, attempts[index], on_result)
        for index, attempt in enumerate(attempts):
            if index not in results:
                results[index] = self._heard(attempt.give_up(), attempt, on_result)
        return tuple(results[index] for index in range(len(attempts)))

    def _heard(
        self,
        result: DeployResult | None,
        attempt: Attempt,
        on_result: Callable[[DeployResult], object] | None,
    ) -> DeployResult:
        if result is None:
            result = self._given_up(attempt)
            log.error("%s", result.error)
        if on_result is not None:
            on_result(result)
        return result

    def _given_up(self, attempt: Attempt) -> DeployResult:
        target = attempt.target
        kept = (
            "it keeps the backends it had"
            if attempt.step == "push"
            else "the file that was there before goes back"
        )
        message = (
            f"nginx {target.container} did not finish its deploy within {self._deadline:g} s "
            f"(it was at: {STEPS.get(attempt.step, attempt.step)}), so it was given up: "
            f"{kept}, its shell is closed, and the next pass tries again. Is the container "
            "paused, or its host overloaded?"
        )
        return DeployResult(
            target.container, False, message, dict(attempt.timings), target.container_id
        )

    def _link(self, container_id: str) -> NginxLink:
        with self._lock:
            return self._links.setdefault(container_id, NginxLink())

    def _work(
        self,
        index: int,
        attempt: Attempt,
        link: NginxLink,
        content: bytes,
        operation: Operation,
        deadline: float,
        finished: queue.SimpleQueue[int],
    ) -> None:
        attempt.finish(self._run(attempt, link, content, operation, deadline))
        finished.put(index)

    def _run(
        self,
        attempt: Attempt,
        link: NginxLink,
        content: bytes,
        operation: Operation,
        deadline: float,
    ) -> DeployResult:
        target = attempt.target
        if not link.busy.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return self._given_up(attempt)
        try:
            channel = self._channel(link, target, content, attempt)
            if not attempt.use(channel):
                return self._given_up(attempt)
            return operation(link, channel, attempt, deadline)
        except Exception as error:  # a result, whatever happens: the pass waits for it
            log.exception("deploying to nginx %s crashed; please report", target.container)
            message = f"could not update nginx {target.container}: {error}"
            return DeployResult(target.container, False, message, {}, target.container_id)
        finally:
            if link.shell is not None and (link.gone or not link.shell.alive):
                link.drop_shell()
            link.busy.release()

    def _channel(
        self, link: NginxLink, target: NginxTarget, content: bytes, attempt: Attempt
    ) -> Channel:
        """The container's open shell (opened now if need be) backed by the engine, or the
        engine alone."""
        engine = EngineChannel(self._api, target)
        if (
            not self._shell
            or not ShellSession.can_carry(content)
            or link.no_shell == target.started_at
        ):
            return engine
        if link.shell is not None and link.shell.started_at != target.started_at:
            link.drop_shell()
        if link.shell is None:
            try:
                with self._step(attempt, "open"):
                    link.shell = ShellSession(
                        self._api,
                        target.container_id,
                        target.started_at,
                        target.config_path,
                        note_workers=self._retire,
                    )
            except NoShell as error:
                link.no_shell = target.started_at
                log.info(
                    "nginx %s: %s; its configs go in through the engine's archive and exec "
                    "calls instead (~180 ms more per deploy)",
                    target.container,
                    error,
                )
                return engine
            except DeployError as error:
                log.warning(
                    "nginx %s: %s; this deploy goes through the engine", target.container, error
                )
                return engine
        return ShellFirst(link.shell, engine, target.container)

    def _attempt(
        self,
        link: NginxLink,
        channel: Channel,
        content: bytes,
        attempt: Attempt,
        deadline: float,
    ) -> DeployResult:
        """Whatever fails once the new file may have gone in (a refused test, a container
        restarting, a lost engine, a shell gone, the deadline), the previous file is put
        back, so a restart of that nginx never starts from an untested file."""
        target, timings = attempt.target, attempt.timings
        previous: bytes | None = None
        written = False
        try:
            if not link.known:
                with self._step(attempt, "read"):
                    link.good = channel.read()
                link.known = True
            previous = link.good
            written = True
            with self._step(attempt, "copy"):
                channel.write(content)
            with self._step(attempt, "test"):
                code, output = channel.test()
            if code != 0:
                self._restore(link, target, channel, previous)
                lines = [ln for ln in printable(output).strip().splitlines() if ln.strip()]
                error = "nginx -t failed, previous config kept: " + " | ".join(lines[-3:])
                log.error("nginx %s rejected the new config: %s", target.container, error)
                return DeployResult(
                    target.container, False, error, timings, target.container_id, channel.via, True
                )
            with self._step(attempt, "reload"):
                channel.reload()
            link.good = content
        except Exception as error:  # any failure stays this container's, never the pass's
            if written:
                self._restore(link, target, channel, previous)
            message = f"could not update nginx {target.container}: {error}"
            if attempt.given_up:  # its failure was told at the deadline
                log.info("nginx %s: the deploy given up at its deadline ended", target.container)
            else:
                log.error("%s", message)
            return DeployResult(
                target.container, False, message, timings, target.container_id, channel.via
            )
        if self._retire:
            # The master starts the new workers once it has read the config, which takes
            # about what `nginx -t` took; half the time left stays for the deadline.
            within = min(max(0.5, 3 * timings["test"]), (deadline - time.monotonic()) / 2)
            with self._step(attempt, "retire"):
                problem = channel.settle(within)
            if problem:
                log.warning(
                    "nginx %s: could not retire its old workers early: %s; nginx retires them "
                    "itself 100 ms after its new workers start",
                    target.container,
                    problem,
                )
        log.info(
            "nginx %s reloaded with the new config via the %s (copy %.1f ms, test %.1f ms)",
            target.container,
            channel.via,
            timings["copy"] * 1000,
            timings["test"] * 1000,
        )
        return DeployResult(target.container, True, None, timings, target.container_id, channel.via)

    @staticmethod
    @contextlib.contextmanager
    def _step(attempt: Attempt, name: str) -> Iterator[None]:
        attempt.step = name
        mark = time.perf_counter()
        yield
        attempt.timings[name] = time.perf_counter() - mark

    @staticmethod
    def _restore(
        link: NginxLink, target: NginxTarget, channel: Channel, previous: bytes | None
    ) -> None:
        try:
            channel.restore(previous)
        except Exception as error:
            link.known = False  # unknown now: read it again next time
            log.error(
                "could not put the previous config back into nginx %s (%s): the untested file "
                "stays there until the next deploy",
                target.container,
                error,
            )
