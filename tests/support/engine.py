"""A Docker engine of the suite's own, for the tests that restart one: a test must never stop,
restart or reconfigure the machine's engine.

`PrivateEngine` runs its own containerd and dockerd with every path of their own: socket,
data roots, exec root, pidfile, config file, cgroup parent, and a network namespace, so its
bridges, iptables rules, routes and published loopback ports are that namespace's and cannot
meet the machine's. Its own containerd, because dockerd 20.10 started without --containerd
uses /run/containerd/containerd.sock whenever that file exists (a system containerd), and
would then share the machine's containerd. What is still common to both engines is read-only
or unique per engine: /etc/docker/key.json (the engine ID) and the shim sockets containerd
1.6 names by hash under /run/containerd/s.

Whatever must reach its published ports runs in `entered()` (the rig's controller, hey, wrk
and probes do); the controller talks to it through its socket (`url`). A run killed before
its cleanup can leave the directories /tmp/cp-test-engine-<id> and /run/cp-eng-<id> and the
cgroups /sys/fs/cgroup/*/cp-test-engine-<id>: stop the processes whose command lines name
those directories, unmount what is mounted under them, then remove them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import docker
import docker.constants
import docker.errors

from tests.support.lab import remove_network, wait_until
from tests.support.netns import NetworkNamespace

LIVE_RESTORE = ("--live-restore", "--userland-proxy=false")
"""The machine engine's flags (scripts/start-dockerd): containers survive a restart of
dockerd, and published ports (iptables, no docker-proxy) keep forwarding meanwhile. A swarm
test passes flags without --live-restore, which swarm mode refuses."""
TOOLS = {
    "dockerd": "docker.io",
    "containerd": "containerd",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "umount": "mount",
    "ip": "iproute2",
}
"""What a private engine runs, and the Debian package each comes in."""
PREDEFINED_NETWORKS = {"bridge", "host", "none"}


class EngineUnavailable(RuntimeError):
    """This machine can't run a private engine; the message says why and what to do."""


def _require() -> None:
    if os.geteuid() != 0:
        raise EngineUnavailable(
            "a private Docker engine needs root (a network namespace, dockerd, mounts): "
            "run the tests that restart an engine as root, as CI does"
        )
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if not shutil.which(tool)]
    if missing:
        raise EngineUnavailable(
            f"a private Docker engine needs {', '.join(missing)}: run `make dev`, or install "
            "those Debian packages"
        )


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to this process only, SIGKILL if it outlives `timeout`; reaps it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _mounts() -> list[Path]:
    """Mount points of this mount namespace (dockerd runs in it, so its mounts are here)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [Path(line.split()[4]) for line in lines]


class PrivateEngine:
    """containerd and dockerd of the suite's own, started here and removed by `close()`.
    `flags` are dockerd's flags beyond the paths."""

    def __init__(self, flags: Sequence[str] = LIVE_RESTORE) -> None:
        _require()
        token = secrets.token_hex(4)
        self.name = f"cp-test-engine-{token}"
        self.flags = tuple(flags)
        self.dir = Path(tempfile.gettempdir()) / self.name
        self.exec_root = Path(f"/run/cp-eng-{token}")
        """dockerd's, with containerd's state under it as dockerd lays out a containerd of its
        own; short, in /run like theirs: the unix sockets under it need paths of < 108 bytes."""
        self.data_root = self.dir / "docker"
        self.url = f"unix://{self.dir}/docker.sock"
        self._containerd_socket = self.exec_root / "containerd" / "containerd.sock"
        self._containerd: subprocess.Popen[bytes] | None = None
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._probe = docker.APIClient(
            base_url=self.url, version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=2
        )
        """For readiness: /_ping is not versioned, and a version given keeps the constructor
        from asking an engine that is not up yet."""
        self._client: docker.DockerClient | None = None
        self._netns: NetworkNamespace | None = None
        self._closed = False
        self.dir.mkdir(mode=0o700)
        self.exec_root.mkdir(mode=0o700)
        try:
            self._write_configs()
            try:
                self._netns = NetworkNamespace(self.dir / "netns")
            except OSError as error:
                raise EngineUnavailable(
                    f"cannot create a network namespace ({error}): run as root with "
                    "CAP_SYS_ADMIN (on the host, or in a privileged container)"
                ) from error
            self._start_containerd()
            self.start()
            self._client = docker.DockerClient(base_url=self.url, version="auto", timeout=60)
        except BaseException:
            self.close()
            raise

    @property
    def client(self) -> docker.DockerClient:
        assert self._client is not None, "the private engine is closed"
        return self._client

    @property
    def pid(self) -> int:
        """dockerd's PID (nsenter execs it, so it is the process this class started)."""
        assert self._dockerd is not None, "dockerd is not started"
        return self._dockerd.pid

    @property
    def netns(self) -> NetworkNamespace:
        assert self._netns is not None, "the private engine has no network namespace"
        return self._netns

    def entered(self) -> AbstractContextManager[None]:
        """The block runs in the engine's network namespace (see NetworkNamespace.entered)."""
        return self.netns.entered()

    def _write_configs(self) -> None:
        # without --config-file, dockerd would read the machine's /etc/docker/daemon.json
        (self.dir / "daemon.json").write_text("{}\n")
        (self.dir / "containerd.toml").write_text(
            "version = 2\n"
            f'root = "{self.dir / "containerd"}"\n'
            f'state = "{self.exec_root / "containerd"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\naddress = "{self._containerd_socket}"\n'
            # its default is the machine's /opt/containerd
            f'[plugins."io.containerd.internal.v1.opt"]\npath = "{self.dir / "containerd-opt"}"\n'
        )

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{name}.log", "ab") as log:
            # a session of its own: a Ctrl-C at the terminal is for pytest, whose cleanup
            # then stops the engine in order
            return subprocess.Popen(
                self.netns.command(argv), stdout=log, stderr=log, start_new_session=True
            )

    def _log_tail(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else "(no log)"

    def _start_containerd(self) -> None:
        config = f"--config={self.dir / 'containerd.toml'}"
        process = self._containerd = self._spawn("containerd", ["containerd", config])
        self._await("containerd", process, self._containerd_socket.exists)

    def _await(
        self, name: str, process: subprocess.Popen[bytes], ready: Callable[[], bool]
    ) -> None:
        try:
            wait_until(lambda: ready() or process.poll() is not None, timeout=60,
                       interval=0.05, what=f"the private {name} ready")  # fmt: skip
        except AssertionError as error:
            raise RuntimeError(f"{error}; its log ends: {self._log_tail(name)}") from error
        if process.poll() is not None:
            raise RuntimeError(
                f"the private {name} exited with {process.returncode} at start; its log "
                f"({self.dir / name}.log) ends: {self._log_tail(name)}"
            )

    def start(self) -> None:
        """Start dockerd (again after `stop()`, with the same directories: live-restore
        keeps the containers) and wait until it answers."""
        argv = [
            "dockerd",
            f"--host={self.url}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.dir / 'dockerd.pid'}",
            f"--containerd={self._containerd_socket}",
            f"--config-file={self.dir / 'daemon.json'}",
            f"--cgroup-parent=/{self.name}",
            *self.flags,
        ]
        process = self._dockerd = self._spawn("dockerd", argv)
        self._await("dockerd", process, self._answers)

    def _answers(self) -> bool:
        try:
            return bool(self._probe.ping())
        except (docker.errors.DockerException, OSError):  # requests' errors are OSErrors
            return False

    def stop(self) -> None:
        """SIGTERM to this engine's dockerd (its PID only) and wait until it exited."""
        assert self._dockerd is not None, "dockerd is not started"
        _stop(self._dockerd, timeout=60)

    def close(self) -> None:
        """Remove every container and network, stop dockerd and containerd by PID, and
        remove the namespace, mounts, cgroups and directories; raises if anything is left.
        Safe to call twice, and after a failed start."""
        if self._closed:
            return
        self._closed = True
        stopped = self._dockerd is not None and self._dockerd.poll() is not None
        if stopped and self._client is not None:
            with contextlib.suppress(RuntimeError):
                self.start()  # stopped by a test that failed: containers go through it
        try:
            if self._dockerd is not None and self._answers() and self._client is not None:
                self._remove_resources(self._client)
        finally:  # an engine that failed to remove something still goes, with the rest
            self._shut_down()

    def _shut_down(self) -> None:
        """dockerd and containerd stopped by PID, then everything of theirs removed."""
        for client in (self._client, self._probe):
            if client is not None:
                client.close()
        self._client = None
        for process in (self._dockerd, self._containerd):
            if process is not None:
                _stop(process, timeout=60)
        self._kill_strays()
        if self._netns is not None:
            self._netns.remove()
        self._unmount()
        for cgroup in self._cgroups():
            for cgroup_dir, _, _ in os.walk(cgroup, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(cgroup_dir)
        for directory in (self.dir, self.exec_root):
            shutil.rmtree(directory, ignore_errors=True)
        left = self.leftovers()
        if left:
            raise RuntimeError(
                f"the private engine {self.name} left {'; '.join(left)}: stop, unmount and "
                "remove them by hand (see tests/support/engine.py)"
            )

    def _remove_resources(self, client: docker.DockerClient) -> None:
        for container in client.containers.list(all=True):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as error:
                # 409 "removal already in progress" (swarm leave removes its tasks' own)
                if error.status_code != 409:
                    raise
        for network in client.networks.list():
            if network.name not in PREDEFINED_NETWORKS:
                remove_network(network)

    def _processes(self) -> dict[int, str]:
        """Processes of this engine still running: those whose command line names its
        directories (dockerd, containerd, shims; a controller pointed at its socket), and
        those in its cgroups (containers)."""
        marks = (str(self.dir).encode(), str(self.exec_root).encode())
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes()
                if any(mark in command for mark in marks):
                    found[int(entry.name)] = command.replace(b"\0", b" ").decode()[:120]
        for cgroup in self._cgroups():
            for directory, _, _ in os.walk(cgroup):
                with contextlib.suppress(OSError):
                    for pid in (Path(directory) / "cgroup.procs").read_text().split():
                        found.setdefault(int(pid), f"in cgroup {directory}")
        return found

    def _kill_strays(self) -> None:
        """SIGKILL what outlived dockerd and containerd: started by them, so this engine's."""
        strays = self._processes()
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while strays and time.monotonic() < deadline:
            time.sleep(0.05)
            strays = self._processes()

    def _cgroups(self) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        return [path for path in [root / self.name, *root.glob(f"*/{self.name}")] if path.is_dir()]

    def _owned(self, path: Path) -> bool:
        return path.is_relative_to(self.dir) or path.is_relative_to(self.exec_root)

    def _unmount(self) -> None:
        """What dockerd left mounted under its directories: with live-restore it leaves the
        data root's bind mount and a live container's mounts in place when it stops."""
        for mount in sorted(filter(self._owned, _mounts()), key=lambda p: -len(p.parts)):
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)

    def leftovers(self) -> list[str]:
        """What of this engine still exists: processes, mounts, cgroups, directories."""
        left = [f"process {pid} ({what})" for pid, what in self._processes().items()]
        left += [f"mount {mount}" for mount in _mounts() if self._owned(mount)]
        left += [f"cgroup {cgroup}" for cgroup in self._cgroups()]
        left += [f"directory {d}" for d in (self.dir, self.exec_root) if d.exists()]
        return left
