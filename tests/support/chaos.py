"""The chaos scenarios of issue 6, shared by tests/integration/test_chaos.py (short) and
bench/chaos.py (long): each runs under bounded hey (and wrk) load through nginx and ends by
checking that the config nginx got and the DNS answers hold exactly the live backends.

The controller runs as the real console script in a subprocess, so it can be SIGKILLed and
restarted, and its memory and open files measured; the rig reads it through its API. The
dockerd restart runs on a private engine (tests/support/engine.py), never the machine's.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import docker.errors
import httpx
from dnslib import QTYPE, DNSRecord
from docker.models.containers import Container
from docker.models.networks import Network

from images.build import ensure_images
from tests.support.dns_stub import DnsLoad, dns_processes
from tests.support.engine import PrivateEngine
from tests.support.lab import DRAINING, Lab, wait_until
from tests.support.ports import free_port
from tests.support.traffic import LoadResult, Traffic

SERVICE = "web"
BAD_WEIGHT = 7
BAD_TEMPLATE = """{% include "builtin/service.conf.j2" %}
{% for server in s.servers if "weight=7" in server.params %}
this_directive_does_not_exist;
{% endfor %}
"""


@dataclass
class ScenarioResult:
    name: str
    hey: LoadResult | None = None
    wrk: LoadResult | None = None
    converge: list[float] = field(default_factory=list)
    """Seconds from each action to the config holding exactly the live backends."""
    reloads: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def max_converge(self) -> float:
        return max(self.converge, default=0.0)


class Controller:
    """`controlplane run` in a subprocess, with its API and DNS on loopback; on the engine at
    `docker_url` (default: DOCKER_HOST or the local socket)."""

    def __init__(
        self, network: str, state_dir: Path, templates: Path, docker_url: str | None = None
    ) -> None:
        self.network = network
        self.state_dir = state_dir
        self.templates = templates
        self.docker_url = docker_url
        self.api_port = free_port()
        self.dns_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30)
        self._earlier_reloads = 0
        """Reloads counted by controller processes that were killed since."""

    def start(self) -> None:
        command = [
            sys.executable, "-m", "controlplane", "run",
            "--network", self.network,
            "--api-bind", f"127.0.0.1:{self.api_port}",
            "--dns-bind", f"127.0.0.1:{self.dns_port}",
            "--state-dir", str(self.state_dir),
            "--templates", str(self.templates),
            "--resync", "10",
            "--dns-keep", "30",
            "--log-level", "warning",
        ]  # fmt: skip
        if self.docker_url:
            command += ["--docker-url", self.docker_url]
        log = open(self.state_dir / "controller.log", "ab")  # noqa: SIM115 (kept by the child)
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        process = self.process
        try:
            wait_until(
                lambda: self.ready() or process.poll() is not None,
                timeout=30,
                what="the controller's API ready",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; its log ends: {self.log_tail()}") from error
        if process.poll() is not None:
            raise AssertionError(f"the controller exited at start: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.state_dir / "controller.log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else "(no log)"

    def ready(self) -> bool:
        try:
            return self.api.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self._earlier_reloads = self.reloads()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stops the controller, and its DNS process, which would answer on for --dns-keep."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for pid in dns_processes(self.dns_port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def config(self) -> str:
        try:
            reply = self.api.get("/api/v1/config")
        except httpx.HTTPError:
            return ""
        return reply.text if reply.status_code == 200 else ""

    def applied(self) -> bool:
        """Every managed nginx runs the current config."""
        try:
            managed = self.api.get("/api/v1/nginx").json()["nginx"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return bool(managed) and all(n["current"] for n in managed)

    def reloads(self) -> int:
        """Deploys that reloaded an nginx, counted across restarts of the controller."""
        try:
            managed = self.api.get("/api/v1/nginx").json()["nginx"]
        except (httpx.HTTPError, ValueError, KeyError):
            return self._earlier_reloads
        return self._earlier_reloads + sum(int(n["reloads"]) for n in managed)

    def dns(self) -> set[str]:
        query = DNSRecord.question(f"{SERVICE}.internal", "A")
        try:
            reply = DNSRecord.parse(query.send("127.0.0.1", self.dns_port, timeout=2))
        except OSError:
            return set()
        return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}

    def memory_and_files(self) -> tuple[int, int]:
        """Resident memory (KiB) and open file descriptors of the controller process."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return rss, len(os.listdir(f"/proc/{self.pid}/fd"))


def served_ips(config: str) -> set[str]:
    """The live servers of the service's upstream in a rendered config (`down` ones not)."""
    block = re.search(rf"upstream cp_{SERVICE} \{{(.*?)\n\}}", config, re.DOTALL)
    if block is None:
        return set()
    return {
        m.group(1)
        for m in re.finditer(r"^\s+server ([0-9.]+):\d+([^;]*);", block.group(1), re.MULTILINE)
        if "down" not in m.group(2).split()
    }


class Rig:
    """One network, a managed nginx published on loopback, backends of service web, and the
    controller (on the lab's engine, at `docker_url`); everything is removed by `close()`
    (and by the Lab's labels)."""

    def __init__(self, lab: Lab, backends: int = 3, docker_url: str | None = None) -> None:
        self.lab = lab
        self.net: Network = lab.network("chaos")
        self.nginx: list[Container] = [lab.nginx(self.net)]
        self.backends: list[Container] = []
        self._dir = tempfile.TemporaryDirectory(prefix="controlplane-chaos-")
        root = Path(self._dir.name)
        (root / "templates").mkdir()
        (root / "templates" / "service.conf.j2").write_text(BAD_TEMPLATE)
        self.controller = Controller(str(self.net.name), root, root / "templates", docker_url)
        # backends first: the controller's first pass takes them all, where backends started
        # after it would wait out a reload nginx's scale-out hold (~2 s) in every test's setup
        for _ in range(backends):
            self.add_backend(wait=False)
        self.controller.start()
        self.converge()
        self.port = lab.published_port(self.nginx[0])
        wait_until(lambda: self.serving(self.port), what="nginx serving web")

    def close(self) -> None:
        self.controller.stop()
        self._dir.cleanup()

    def add_backend(self, wait: bool = True) -> Container:
        backend = self.lab.backend(self.net, alias=SERVICE, env=DRAINING)
        self.backends.append(backend)
        if wait:
            self.converge()
        return backend

    def remove(self, backend: Container) -> None:
        backend.remove(force=True)
        self.backends.remove(backend)

    def serving(self, port: int) -> bool:
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": SERVICE}, timeout=2)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    def live_ips(self) -> set[str]:
        """What Docker says: running, unpaused backends attached to the network."""
        ips = set()
        for backend in self.backends:
            try:
                backend.reload()
            except Exception:  # removed
                continue
            network = backend.attrs["NetworkSettings"]["Networks"].get(str(self.net.name))
            if backend.status == "running" and network and network.get("IPAddress"):
                ips.add(network["IPAddress"])
        return ips

    def exact(self) -> str | None:
        """None when config and DNS hold exactly the live backends, else what differs."""
        live = self.live_ips()
        config = served_ips(self.controller.config())
        dns = self.controller.dns()
        if config == live and dns == live and self.controller.applied():
            return None
        return f"live {sorted(live)}, config {sorted(config)}, dns {sorted(dns)}"

    def converge(self, timeout: float = 15.0) -> float:
        """Seconds until config (deployed to every nginx) and DNS hold exactly the live ones."""
        started = time.monotonic()
        wait_until(lambda: self.exact() is None, timeout=timeout, interval=0.01,
                   what="config and DNS holding exactly the live backends")  # fmt: skip
        return time.monotonic() - started

    def check_exact(self) -> None:
        difference = self.exact()
        assert difference is None, difference


@contextmanager
def private_rig(engine: PrivateEngine) -> Iterator[Rig]:
    """A rig wholly on a private engine: nginx and backends on it, the controller through its
    socket, and everything that makes or serves requests (the controller's API and DNS, hey,
    wrk, probes) in its network namespace, where its published ports are."""
    lab = Lab(engine.client, ensure_images(engine.client))
    with engine.entered():
        rig = Rig(lab, docker_url=engine.url)
        try:
            yield rig
        finally:
            rig.close()


def timed(rig: Rig, result: ScenarioResult, call: Callable[[], object]) -> None:
    """Do `call`, then record the seconds from its start until config and DNS are exact."""
    mark = time.monotonic()
    call()
    rig.converge(timeout=60)
    result.converge.append(time.monotonic() - mark)


def run(
    rig: Rig,
    name: str,
    action: Callable[[ScenarioResult], None],
    seconds: float,
    with_wrk: bool = False,
) -> ScenarioResult:
    """The action under load (hey always; wrk when asked), then the exactness check."""
    result = ScenarioResult(name)
    before = rig.controller.reloads()
    with Traffic(rig.port, SERVICE, max_seconds=seconds, with_wrk=with_wrk) as traffic:
        time.sleep(0.5)
        action(result)
        time.sleep(0.5)
    result.hey = traffic.results["hey"]
    result.wrk = traffic.results.get("wrk")
    rig.converge()
    rig.check_exact()
    result.reloads = rig.controller.reloads() - before
    return result


def together(calls: Iterable[Callable[[], object]]) -> None:
    """Run the calls on threads at once, as a burst of docker commands would."""
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def scale(rig: Rig, cycles: int) -> Callable[[ScenarioResult], None]:
    def action(result: ScenarioResult) -> None:
        for _ in range(cycles):
            added: list[Container] = []

            def grow(added: list[Container] = added) -> None:
                added.extend(rig.add_backend(wait=False) for _ in range(4))

            def shrink(added: list[Container] = added) -> None:
                together(backend.stop for backend in added)

            timed(rig, result, grow)
            timed(rig, result, shrink)
            for backend in added:
                rig.remove(backend)

    return action


def lifecycle(rig: Rig) -> Callable[[ScenarioResult], None]:
    """stop/start, restart, pause/unpause, network disconnect/connect, one backend at a time
    (three others keep serving)."""

    def action(result: ScenarioResult) -> None:
        target = rig.add_backend()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("stop", lambda: target.stop(timeout=10)),
            ("start", target.start),
            ("restart", lambda: target.restart(timeout=10)),
            ("pause", target.pause),
            ("unpause", target.unpause),
            ("disconnect", lambda: rig.net.disconnect(target)),
            ("connect", lambda: rig.net.connect(target, aliases=[SERVICE])),
        ]
        for step, call in steps:
            timed(rig, result, call)
            result.notes.append(f"{step} ok")

    return action


def kill(rig: Rig, rounds: int = 1) -> Callable[[ScenarioResult], None]:
    """SIGKILL a backend: nginx retries idempotent requests elsewhere. Notes how long until
    the dead backend is out of the rendered config, and until nginx reloaded without it."""

    def gone(ip: str) -> bool:
        return ip not in served_ips(rig.controller.config())

    def action(result: ScenarioResult) -> None:
        rendered = []
        for _ in range(rounds):
            target = rig.add_backend()
            ip = target.attrs["NetworkSettings"]["Networks"][str(rig.net.name)]["IPAddress"]
            mark = time.monotonic()
            target.kill()
            wait_until(partial(gone, ip), interval=0.005, what="the killed one out of the config")
            rendered.append(time.monotonic() - mark)
            rig.converge()
            result.converge.append(time.monotonic() - mark)
            rig.remove(target)
        ordered = sorted(rendered)
        result.notes.append(
            f"killed backend out of the rendered config: median {ordered[len(ordered) // 2]:.3f} s,"
            f" max {ordered[-1]:.3f} s; out of nginx and DNS (converge): max "
            f"{result.max_converge:.3f} s ({rounds} kills)"
        )

    return action


def rolling(rig: Rig, rounds: int) -> Callable[[ScenarioResult], None]:
    def action(result: ScenarioResult) -> None:
        for _ in range(rounds):
            old = rig.backends[0]
            timed(rig, result, lambda: rig.add_backend(wait=False))
            timed(rig, result, partial(old.stop, timeout=10))
            rig.remove(old)

    return action


def nginx_restart_and_second(rig: Rig) -> Callable[[ScenarioResult], None]:
    """Restart the managed nginx: from its first answer it serves the current config. Start a
    second: it serves within a second, and requests through it don't fail."""

    def action(result: ScenarioResult) -> None:
        first = rig.nginx[0]
        live = {b.name for b in rig.backends if b.status == "running"}
        first.restart(timeout=10)
        port = rig.lab.published_port(first)
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(answers) < 50:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": SERVICE}, timeout=2)
            except httpx.HTTPError:
                continue  # not listening yet
            answers.append((reply.status_code, reply.text.strip()))
        wrong = [a for a in answers if a[0] != 200 or a[1] not in live]
        result.notes.append(f"restarted nginx: {len(answers)} answers, {len(wrong)} wrong")
        assert not wrong, f"the restarted nginx answered {wrong[:3]}"
        rig.port = port  # the published port may change with a restart

        second = rig.lab.nginx(rig.net)
        rig.nginx.append(second)
        mark = time.monotonic()
        second_port = rig.lab.published_port(second)
        wait_until(lambda: rig.serving(second_port), timeout=10, interval=0.01,
                   what="the second nginx serving")  # fmt: skip
        result.converge.append(time.monotonic() - mark)
        with Traffic(second_port, SERVICE, max_seconds=3, with_wrk=False) as traffic:
            time.sleep(2)
        result.notes.append(
            f"second nginx: {traffic.hey.requests} requests, {traffic.hey.failed} failed"
        )
        assert traffic.hey.failed == 0, traffic.hey.detail

    return action


def controller_kill(rig: Rig, dns_rate: int = 2000) -> Callable[[ScenarioResult], None]:
    """SIGKILL the controller during churn, start it again: nginx serves throughout, DNS
    answers throughout (dnsperf at `dns_rate` q/s: no query lost), the new controller
    rebuilds its model and keeps the persisted override."""

    def action(result: ScenarioResult) -> None:
        api = rig.controller.api
        name = rig.backends[0].name
        reply = api.patch(
            f"/api/v1/services/{SERVICE}/backends/{name}?wait=true", json={"weight": 3}
        )
        assert reply.status_code == 200, reply.text
        churn = [rig.add_backend(wait=False) for _ in range(2)]
        rig.converge()
        load = DnsLoad(rig.controller.dns_port, dns_rate, seconds=10)
        time.sleep(1)
        rig.controller.kill()
        churn[0].stop(timeout=10)
        rig.add_backend(wait=False)
        timed(rig, result, rig.controller.start)
        dns = load.outcome()
        result.notes.append(
            f"DNS: {dns.lost} of {dns.sent} queries lost through the kill and restart; "
            f"answers {dns.codes}"
        )
        assert dns.sent > dns_rate * 5 and dns.lost == 0, result.notes[-1]
        # each one right, none SERVFAIL
        assert dns.codes == {"NOERROR": dns.sent - dns.lost}, result.notes[-1]
        assert len(dns_processes(rig.controller.dns_port)) == 1, "the old DNS process is left"
        web = api.get(f"/api/v1/services/{SERVICE}").json()
        weights = {b["name"]: b["weight"] for b in web["backends"]}
        assert weights[name] == 3, f"the override was lost: {weights}"
        result.notes.append("override kept after SIGKILL")

    return action


def dockerd_restart(rig: Rig, engine: PrivateEngine) -> Callable[[ScenarioResult], None]:
    """Restart the rig's private dockerd (live-restore keeps containers): the controller
    reconnects, resyncs, and ends with exactly the live backends, including one started just
    after."""
    assert rig.lab.client is engine.client, "a dockerd restart runs on a private_rig(engine)"

    def action(result: ScenarioResult) -> None:
        engine.stop()

        def start_and_add() -> None:
            engine.start()
            rig.add_backend(wait=False)

        timed(rig, result, start_and_add)

    return action


def storm(
    rig: Rig, count: int, drain: bool = False, listen_ms: int = 0
) -> Callable[[ScenarioResult], None]:
    """`count` containers started and stopped within a few seconds; with `drain`, they keep
    serving for a second after SIGTERM (like real apps), else they exit at once. With
    `listen_ms`, each listens that long after its start (an app warming up), and they are
    stopped a second after that, once they serve."""

    def action(result: ScenarioResult) -> None:
        env = dict(DRAINING) if drain else {}
        if listen_ms:
            env["LISTEN_DELAY_MS"] = str(listen_ms)
        created = [
            rig.lab.backend(rig.net, alias=SERVICE, start=False, env=env) for _ in range(count)
        ]
        rig.backends.extend(created)

        def start_and_stop() -> None:
            together(c.start for c in created)
            if listen_ms:
                time.sleep(listen_ms / 1000 + 1.0)
            together(partial(c.stop, timeout=5) for c in created)

        timed(rig, result, start_and_stop)
        for container in created:
            rig.remove(container)

    return action


def rejected(rig: Rig) -> Callable[[ScenarioResult], None]:
    """A change nginx refuses (the rig's template breaks on weight 7): nginx keeps the
    previous config, the error shows in the API and metrics, the next good change applies."""

    def action(result: ScenarioResult) -> None:
        api = rig.controller.api
        name = rig.backends[0].name
        path = f"/api/v1/services/{SERVICE}/backends/{name}?wait=true"
        reply = api.patch(path, json={"weight": BAD_WEIGHT}).json()
        assert reply["applied"]["errors"], "nginx should have refused the config"
        managed = api.get("/api/v1/nginx").json()["nginx"]
        assert any(n["last_result"] == "failed" for n in managed)
        metrics = api.get("/metrics").text
        assert 'result="failed"' in metrics
        result.notes.append("refused: " + managed[0]["last_error"][:80])
        good = api.patch(path, json={"weight": 2}).json()
        assert good["applied"]["errors"] == [] and good["applied"]["reloaded"]
        result.converge.append(rig.converge())

    return action


def leak(rig: Rig, events: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(RSS KiB, open fds) of the controller after `events // 10` and after `events` Docker
    events (pause/unpause of one backend makes two)."""
    target = rig.backends[0]

    def cycle(n: int) -> None:
        for _ in range(n // 2):
            for call in (target.pause, target.unpause):
                try:
                    call()
                except docker.errors.APIError as error:
                    # dockerd can answer a pause or an unpause before the freezer changed:
                    # "already paused" (409), "is not paused" or runc's "cannot resume a
                    # running process" (500) on the next call; the cycle goes on
                    said = str(error.explanation)
                    if error.status_code != 409 and not (
                        "paused" in said or "cannot resume a running process" in said
                    ):
                        raise

    cycle(events // 10)
    rig.converge()
    early = rig.controller.memory_and_files()
    cycle(events - events // 10)
    rig.converge()
    return early, rig.controller.memory_and_files()
