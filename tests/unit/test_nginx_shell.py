"""The shell way into an nginx container, against a local /bin/sh framed like dockerd's attach
stream: files arrive byte for byte, whatever they hold; replies end only at the real marker;
a missing shell or nginx is told apart from a working one; closing ends the shell."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket as sockets
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import docker.errors
import pytest

from controlplane.core.model import NginxTarget
from controlplane.errors import DeployError
from controlplane.nginx_deployer import NginxDeployer, pack
from controlplane.nginx_shell import NoShell, ShellSession

FAKE_NGINX = """#!/bin/sh
# nginx -t: refuses a config holding the word "bogus", like an unknown directive.
if grep -q bogus "$CONFIG"; then
  echo 'nginx: [emerg] unknown directive "bogus" in controlplane.conf:1' >&2
  exit 1
fi
echo 'nginx: configuration file test is successful' >&2
"""

LARGE = b"# " + b"y" * 1_000_000 + b"\n" + b"    server 10.0.0.1:80 max_fails=0;\n" * 8_000
"""A config of ~1.3 MB, one line of it 1 MB long."""


class LocalShellEngine:
    """exec_create/exec_start(socket=True) run `command` here; archive calls read and write
    the same file. The shell's `kill` is a function that records its arguments: this one
    must never signal this machine's PID 1."""

    def __init__(self, tmp: Path, command: list[str] | None = None, nginx: bool = True) -> None:
        self.config = tmp / "controlplane.conf"
        self.command = command or ["/bin/sh"]
        self.bin = tmp / "bin"
        self.bin.mkdir()
        if nginx:
            (self.bin / "nginx").write_text(FAKE_NGINX)
            (self.bin / "nginx").chmod(0o755)
        self.signals = tmp / "signals"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.exec_fails = False
        self.test_code = 0

    def exec_create(self, container: str, cmd: list[str], **_: object) -> dict[str, str]:
        if self.exec_fails and cmd == ["/bin/sh"]:
            raise docker.errors.APIError("409 Conflict: container is restarting")
        return {"Id": "exec"}

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "CONFIG": str(self.config),
            "SIGNALS": str(self.signals),
        }

    def exec_start(self, exec_id: str, socket: bool = False) -> object:
        if not socket:  # the engine's `nginx -t`
            if self.exec_fails:
                raise docker.errors.APIError("409 Conflict: container is restarting")
            test = subprocess.run(["nginx", "-t"], capture_output=True, env=self.env())
            self.test_code = test.returncode
            return test.stdout + test.stderr
        ours, theirs = sockets.socketpair()
        env = self.env()
        process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.processes.append(process)
        assert process.stdin and process.stdout and process.stderr
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(b'kill() { echo "$*" >> "$SIGNALS"; }\n')
            process.stdin.flush()
        threading.Thread(target=_feed, args=(theirs, process.stdin), daemon=True).start()
        lock = threading.Lock()
        for number, pipe in ((1, process.stdout), (2, process.stderr)):
            threading.Thread(target=_frame, args=(pipe, theirs, number, lock), daemon=True).start()
        # What docker-py hands back over a unix socket: its response's read-only stream,
        # whose close ends the connection.
        stream = ours.makefile("rb", buffering=0)
        ours.close()
        return stream

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        return {"ExitCode": self.test_code}

    def kill(self, container: str, signal: str) -> None:
        with self.signals.open("a") as signals:
            signals.write(f"engine {signal}\n")

    def get_archive(self, container: str, path: str) -> tuple[Iterator[bytes], dict[str, str]]:
        if not self.config.exists():
            raise docker.errors.NotFound("no such file")
        return iter([pack(self.config.name, self.config.read_bytes())]), {}

    def put_archive(self, container: str, path: str, data: bytes) -> bool:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for info in tar.getmembers():
                member = tar.extractfile(info)
                assert member is not None and "/" not in info.name
                (self.config.parent / info.name).write_bytes(member.read())
        return True


def _feed(source: sockets.socket, sink: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.write(chunk)
            sink.flush()
        sink.close()


def _frame(pipe: IO[bytes], sink: sockets.socket, number: int, lock: threading.Lock) -> None:
    with contextlib.suppress(OSError):
        while chunk := os.read(pipe.fileno(), 65536):
            with lock:
                sink.sendall(struct.pack(">BxxxL", number, len(chunk)) + chunk)
    if number == 1:  # the engine ends the stream when the process ends
        with contextlib.suppress(OSError):
            sink.shutdown(sockets.SHUT_RDWR)
        sink.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[LocalShellEngine]:
    made = LocalShellEngine(tmp_path)
    yield made
    for process in made.processes:
        process.kill()
        process.wait()


def session(engine: LocalShellEngine) -> ShellSession:
    return ShellSession(engine, "c" * 64, "t0", str(engine.config))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    [
        b"upstream web { server 10.0.0.2:80; }\n",
        b"$(touch /tmp/pwned) `id` ${HOME} \\ 'quoted' \"double\"\nEOF\n'EOF'\n",
        "caf\u00e9 \u2014 not ascii\n".encode(),
        b"# " + b"x" * 200_000 + b"\n" + b"line\n" * 20_000,
        LARGE,
    ],
    ids=["config", "shell-syntax", "utf-8", "300-kB-line", "1.3-MB"],
)
def test_a_file_arrives_byte_for_byte(engine: LocalShellEngine, content: bytes) -> None:
    shell = session(engine)
    shell.write(content)
    assert engine.config.read_bytes() == content
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"no final newline", b"nul \0 and \xff bytes\n\n", b"@@controlplane-0 0\n", LARGE],
    ids=["empty", "no-final-newline", "binary", "marker-like", "1.3-MB"],
)
def test_a_file_is_read_byte_for_byte(engine: LocalShellEngine, content: bytes) -> None:
    shell = session(engine)
    assert shell.read() is None
    engine.config.write_bytes(content)
    assert shell.read() == content
    assert shell.run("echo next", 5) == (0, "next\n")


def test_the_test_reports_nginx_code_and_output(engine: LocalShellEngine) -> None:
    shell = session(engine)
    shell.write(b"fine\n")
    assert shell.test() == (0, "nginx: configuration file test is successful\n")
    shell.write(b"bogus;\n")
    code, output = shell.test()
    assert code == 1 and 'unknown directive "bogus"' in output


def test_stderr_comes_in_order_within_its_reply(engine: LocalShellEngine) -> None:
    shell = session(engine)
    assert shell.run("echo out; echo err >&2; echo more", 5) == (0, "out\nerr\nmore\n")


def test_a_flood_of_output_ends_the_session_not_the_controller(tmp_path: Path) -> None:
    engine = LocalShellEngine(tmp_path, command=["/bin/sh", "-c", "yes"])
    with pytest.raises(NoShell, match="more than"):
        session(engine)


def test_a_shell_that_never_answers_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("controlplane.nginx_shell.OPEN_TIMEOUT", 0.3)
    engine = LocalShellEngine(tmp_path, command=["sleep", "5"])
    with pytest.raises(NoShell, match=r"timed out|in time"):
        session(engine)


def test_the_file_goes_in_by_rename_and_leaves_no_staging_file(
    engine: LocalShellEngine,
) -> None:
    engine.config.write_bytes(b"# old\n")
    before = engine.config.stat().st_ino
    session(engine).write(b"# new\n")
    assert engine.config.read_bytes() == b"# new\n"
    assert engine.config.stat().st_ino != before
    assert sorted(p.name for p in engine.config.parent.iterdir()) == [
        "bin",
        "controlplane.conf",
    ]


SHELLS = [sh for sh in (["/bin/sh"], ["dash"], ["busybox", "sh"], ["bash"]) if shutil.which(sh[0])]


@pytest.mark.parametrize("shell", SHELLS, ids=[" ".join(sh) for sh in SHELLS])
def test_a_write_cut_anywhere_leaves_the_config_as_it_was(
    engine: LocalShellEngine, shell: list[str]
) -> None:
    """The shell's input ends at every point of the two requests, as when the controller is
    killed mid-write: the config is either the old file or, once the request is whole, the
    new one; never a part of it."""
    document, rename = session(engine).write_scripts(
        b"upstream a {\n    server 10.0.0.2:80;\n}\n", b"EOF_X"
    )
    script = document + b"\n" + rename
    for cut in range(len(script) + 1):
        engine.config.write_bytes(b"# old\n")
        subprocess.run(shell, input=script[:cut], capture_output=True, check=False)
        expected = (
            b"# old\n" if cut < len(script) else b"upstream a {\n    server 10.0.0.2:80;\n}\n"
        )
        assert engine.config.read_bytes() == expected, (cut, script[:cut])


def test_output_that_looks_like_a_marker_does_not_end_a_reply(engine: LocalShellEngine) -> None:
    shell = session(engine)
    code, output = shell.run("echo '@@controlplane-0000 0'; printf 'no newline'", 5)
    assert code == 0 and output == "@@controlplane-0000 0\nno newline"


def test_a_file_the_shell_cannot_carry_is_refused_before_sending(
    engine: LocalShellEngine,
) -> None:
    shell = session(engine)
    for content in (b"no final newline", b"nul \0 byte\n"):
        assert not ShellSession.can_carry(content)
        with pytest.raises(DeployError, match="archive API"):
            shell.write(content)
    assert shell.run("true", 5) == (0, "")


def test_no_nginx_on_the_path_means_no_shell(tmp_path: Path) -> None:
    engine = LocalShellEngine(tmp_path, nginx=False)
    with pytest.raises(NoShell, match="not on the PATH"):
        session(engine)


def test_a_config_path_the_containers_user_cannot_write_means_no_shell(
    engine: LocalShellEngine,
) -> None:
    engine.config = Path("/nonexistent/controlplane.conf")
    with pytest.raises(NoShell, match="may not write in /nonexistent"):
        session(engine)


def test_a_shell_that_exits_at_once_means_no_shell(tmp_path: Path) -> None:
    engine = LocalShellEngine(tmp_path, command=["/bin/sh", "-c", "echo 'stat /bin/sh: no such'"])
    with pytest.raises(NoShell, match="no such"):
        session(engine)


def test_an_exec_the_engine_refuses_is_an_error_but_not_no_shell(
    engine: LocalShellEngine,
) -> None:
    engine.exec_fails = True
    with pytest.raises(DeployError) as raised:
        session(engine)
    assert not isinstance(raised.value, NoShell)


def test_closing_ends_the_shell(engine: LocalShellEngine) -> None:
    session(engine).close()
    assert engine.processes[0].wait(timeout=5) == 0


def test_a_shell_that_died_is_an_error_not_a_hang(engine: LocalShellEngine) -> None:
    shell = session(engine)
    engine.processes[0].kill()
    with pytest.raises(DeployError, match="shell"):
        shell.run("true", 5)


def test_a_config_path_that_is_a_link_is_not_read(engine: LocalShellEngine) -> None:
    target = engine.config.parent / "elsewhere.conf"
    target.write_bytes(b"# elsewhere\n")
    engine.config.symlink_to(target)
    with pytest.raises(DeployError, match="is a link or not a regular file"):
        session(engine).read()


def test_an_abort_from_another_thread_ends_a_request_at_once(engine: LocalShellEngine) -> None:
    shell = session(engine)
    threading.Timer(0.2, shell.abort).start()
    began = time.monotonic()
    with pytest.raises(DeployError, match="given up"):
        shell.run("sleep 5", 30)
    assert time.monotonic() - began < 2
    assert not shell.alive
    assert engine.processes[0].wait(timeout=10) is not None


def test_a_send_the_shell_does_not_take_ends_at_its_deadline(engine: LocalShellEngine) -> None:
    """A shell busy with something else reads no input: the request's bytes fill the pipes
    and the send blocks, until the deadline shuts the connection."""
    shell = session(engine)
    began = time.monotonic()
    with pytest.raises(DeployError, match="timed out"):
        shell.run(b"sleep 5\n: '" + LARGE.replace(b"'", b"") + b"'", 0.5)
    assert time.monotonic() - began < 2.5


TARGET = NginxTarget("c" * 64, "lb", "", "t0", ("app",))


def test_the_deployer_goes_through_the_shell_and_restores_a_refused_file(
    engine: LocalShellEngine,
) -> None:
    target = NginxTarget("c" * 64, "lb", str(engine.config), "t0", ("app",))
    deployer = NginxDeployer(engine)  # type: ignore[arg-type]
    ok = deployer.deploy(target, b"# new\n")
    assert ok.ok and ok.via == "shell" and {"open", "copy", "test", "reload"} <= set(ok.timings)
    assert engine.config.read_bytes() == b"# new\n"
    assert engine.signals.read_text() == "-HUP 1\n"
    refused = deployer.deploy(target, b"bogus;\n")
    assert not refused.ok and 'unknown directive "bogus"' in (refused.error or "")
    assert engine.config.read_bytes() == b"# new\n"
    assert engine.signals.read_text() == "-HUP 1\n"
    assert len(engine.processes) == 1


def test_a_shell_that_dies_between_deploys_hands_over_to_the_engine(
    engine: LocalShellEngine,
) -> None:
    target = NginxTarget("c" * 64, "lb", str(engine.config), "t0", ("app",))
    deployer = NginxDeployer(engine)  # type: ignore[arg-type]
    assert deployer.deploy(target, b"# one\n").via == "shell"
    engine.processes[0].kill()
    result = deployer.deploy(target, b"# two\n")
    assert result.ok and result.via == "engine", result.error
    assert engine.config.read_bytes() == b"# two\n"
    assert engine.signals.read_text() == "-HUP 1\nengine SIGHUP\n"
    assert deployer.deploy(target, b"# three\n").via == "shell"
    assert len(engine.processes) == 2


def test_the_deployer_remembers_a_container_without_a_shell(tmp_path: Path) -> None:
    engine = LocalShellEngine(tmp_path, command=["/bin/false"])
    target = NginxTarget("c" * 64, "lb", str(engine.config), "t0", ("app",))
    deployer = NginxDeployer(engine)  # type: ignore[arg-type]
    for _ in range(2):
        result = deployer.deploy(target, b"# new\n")
        assert result.ok and result.via == "engine"
    assert len(engine.processes) == 1


@pytest.mark.parametrize(
    ("outcome", "kept"),
    [
        (DeployError("the shell did not answer in time"), False),
        ("worker 7 refused the signal", True),
    ],
    ids=["shell-failed", "worker-refused"],
)
def test_retiring_old_workers_never_fails_a_deploy(
    engine: LocalShellEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    outcome: Exception | str,
    kept: bool,
) -> None:
    """The reload happened: a retire that fails is a warning; a shell that failed in it is
    replaced at the next deploy, one that only met a refusal is kept."""

    def retire(self: ShellSession, within: float) -> str | None:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(ShellSession, "settle", retire)
    target = NginxTarget("c" * 64, "lb", str(engine.config), "t0", ("app",))
    deployer = NginxDeployer(engine)  # type: ignore[arg-type]
    result = deployer.deploy(target, b"# new\n")
    assert result.ok and result.via == "shell" and "retire" in result.timings
    assert engine.config.read_bytes() == b"# new\n"
    assert "could not retire its old workers early" in caplog.text
    assert deployer.deploy(target, b"# newer\n").via == "shell"
    assert len(engine.processes) == (1 if kept else 2)


def test_a_shell_stalled_mid_deploy_is_given_up_and_its_late_rename_changes_nothing(
    engine: LocalShellEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused container: the shell took the rename request but runs it only once it
    resumes, long after the deploy was given up and the previous file put back."""
    target = NginxTarget("c" * 64, "lb", str(engine.config), "t0", ("app",))
    deployer = NginxDeployer(engine, deadline=1.0)  # type: ignore[arg-type]
    assert deployer.deploy(target, b"# one\n").via == "shell"
    request = ShellSession.request
    stalled: list[subprocess.Popen[bytes]] = []

    def pause_before_the_rename(
        self: ShellSession, script: bytes, timeout: float, limit: int
    ) -> tuple[int, bytes]:
        if script.startswith(b"{ mv") and not stalled:
            stalled.append(engine.processes[-1])
            stalled[0].send_signal(signal.SIGSTOP)
        return request(self, script, timeout, limit)

    monkeypatch.setattr(ShellSession, "request", pause_before_the_rename)
    began = time.monotonic()
    result = deployer.deploy(target, b"# two\n")
    assert time.monotonic() - began < 1.5
    assert not result.ok and "within 1 s (it was at: writing the file)" in (result.error or "")
    staging = engine.config.parent / ".controlplane.conf.controlplane-new"
    wait = time.monotonic() + 5
    while staging.read_bytes() != b"# one\n" and time.monotonic() < wait:
        time.sleep(0.01)
    assert engine.config.read_bytes() == b"# one\n" == staging.read_bytes()

    stalled[0].send_signal(signal.SIGCONT)
    assert stalled[0].wait(timeout=5) == 0
    assert engine.config.read_bytes() == b"# one\n" and not staging.exists()
    assert engine.signals.read_text() == "-HUP 1\n"
    assert deployer.deploy(target, b"# three\n").via == "shell"
    assert engine.config.read_bytes() == b"# three\n" and len(engine.processes) == 2
