"""The deploy protocol against a fake engine: a file that was not tested and loaded never stays,
and one nginx that stalls holds neither the others nor the pass past its deadline."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Callable, Iterator

import docker.errors
import pytest

from controlplane.core.model import NginxTarget
from controlplane.nginx_deployer import DeployResult, NginxDeployer, pack

TARGET = NginxTarget("c" * 64, "lb", "/etc/nginx/conf.d/controlplane.conf", "t0", ("app",))
GOOD, NEW = b"# good\n", b"# new\n"


def target(name: str) -> NginxTarget:
    return NginxTarget(name * 64, name, TARGET.config_path, "t0", ("app",))


class FakeApi:
    """Keeps one file per container, runs `nginx -t` as told, records signals; can fail on
    any call, or stall in it until released."""

    def __init__(self, current: bytes | None = GOOD, test_code: int = 0) -> None:
        self.files: dict[str, bytes | None] = {}
        self.current = current
        self.test_code = test_code
        self.signals: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.stall: dict[tuple[str, str], threading.Event] = {}
        self.writes = 0

    @property
    def file(self) -> bytes | None:
        return self.files.get(TARGET.container_id, self.current)

    @file.setter
    def file(self, content: bytes | None) -> None:
        self.files[TARGET.container_id] = content

    def _call(self, call: str, container: str) -> None:
        if (call, container) in self.stall:
            self.stall[call, container].wait(timeout=30)
        if call in self.fail:
            raise self.fail[call]

    def get_archive(self, container: str, path: str) -> tuple[Iterator[bytes], dict[str, str]]:
        self._call("get_archive", container)
        content = self.files.get(container, self.current)
        if content is None:
            raise docker.errors.NotFound("no such file")
        return iter([pack("controlplane.conf", content)]), {}

    def put_archive(self, container: str, path: str, data: bytes) -> bool:
        self.writes += 1
        self._call(f"put_archive#{self.writes}", container)
        self._call("put_archive", container)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile("controlplane.conf")
            assert member is not None
            self.files[container] = member.read()
        return True

    def exec_create(self, container: str, command: list[str]) -> dict[str, str]:
        self._call("exec", container)
        return {"Id": container}

    def exec_start(self, exec_id: str) -> bytes:
        self._call("exec_start", exec_id)
        return (
            b"nginx: [emerg] unknown directive in controlplane.conf:3\n" if self.test_code else b""
        )

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        return {"ExitCode": self.test_code}

    def kill(self, container: str, signal: str) -> None:
        self._call("kill", container)
        self.signals.append((container, signal))


def deployer(api: FakeApi, deadline: float = 10.0) -> NginxDeployer:
    return NginxDeployer(api, shell=False, deadline=deadline)  # type: ignore[arg-type]


def test_a_tested_config_is_loaded() -> None:
    api = FakeApi()
    result = deployer(api).deploy(TARGET, NEW)
    assert result.ok and api.file == NEW and api.signals == [(TARGET.container_id, "SIGHUP")]


def test_a_refused_config_is_replaced_by_the_previous_one_and_not_loaded() -> None:
    api = FakeApi(test_code=1)
    result = deployer(api).deploy(TARGET, NEW)
    assert not result.ok and "unknown directive" in (result.error or "")
    assert api.file == GOOD and api.signals == []


@pytest.mark.parametrize(
    "failing",
    ["exec", "kill"],
    ids=["container-restarting-during-test", "signal-fails"],
)
def test_any_failure_after_the_copy_puts_the_previous_file_back(failing: str) -> None:
    api = FakeApi()
    api.fail[failing] = docker.errors.APIError("409 Conflict: container is restarting")
    result = deployer(api).deploy(TARGET, NEW)
    assert not result.ok and "could not update nginx lb" in (result.error or "")
    assert api.file == GOOD


def test_a_failed_restore_forgets_the_file_so_the_next_deploy_reads_it_again() -> None:
    api = FakeApi(test_code=1)
    api.fail["put_archive#2"] = docker.errors.APIError("engine went away")
    nginx = deployer(api)
    assert not nginx.deploy(TARGET, NEW).ok
    api.file, api.test_code, api.fail = GOOD, 0, {}
    reads = []
    original = api.get_archive
    api.get_archive = lambda c, p: reads.append(p) or original(c, p)  # type: ignore[method-assign]
    assert nginx.deploy(TARGET, NEW).ok
    assert reads == [TARGET.config_path]


def test_no_previous_file_means_an_empty_one_after_a_refusal() -> None:
    api = FakeApi(current=None, test_code=1)
    deployer(api).deploy(TARGET, NEW)
    assert api.file == b""


def test_an_unreadable_previous_file_stops_before_writing() -> None:
    api = FakeApi()
    api.fail["get_archive"] = KeyError("controlplane.conf")
    result = deployer(api).deploy(TARGET, NEW)
    assert not result.ok and api.writes == 0 and api.file == GOOD


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_one_stalled_nginx_does_not_delay_the_others_results() -> None:
    """b's `nginx -t` hangs (a paused container): a and c are heard in their own time, b at
    its deadline as given up; once b's test returns, the deploy goes no further than putting
    the previous file back."""
    api = FakeApi()
    a, b, c = target("a"), target("b"), target("c")
    release = api.stall["exec_start", b.container_id] = threading.Event()
    heard: dict[str, float] = {}
    began = time.monotonic()

    def note(result: DeployResult) -> None:
        heard[result.container] = time.monotonic() - began

    results = deployer(api, deadline=2.0).deploy_all([a, b, c], NEW, on_result=note)
    took = time.monotonic() - began
    assert [r.container for r in results] == ["a", "b", "c"]
    assert results[0].ok and results[2].ok and not results[1].ok
    assert "within 2 s (it was at: nginx -t)" in (results[1].error or "")
    assert not results[1].refused
    # a and c before b's deadline; b at it (the upper bounds leave room for a loaded machine)
    assert max(heard["a"], heard["c"]) < 2.0 <= heard["b"] < 3.5 and took < 3.5, heard
    assert api.files[b.container_id] == NEW  # the test still runs

    release.set()
    wait_for(lambda: api.files[b.container_id] == GOOD, "b's previous file put back")
    assert (b.container_id, "SIGHUP") not in api.signals
    assert api.files[a.container_id] == api.files[c.container_id] == NEW


def test_a_write_that_lands_after_the_deadline_is_undone() -> None:
    api = FakeApi()
    release = api.stall["put_archive", TARGET.container_id] = threading.Event()
    nginx = deployer(api, deadline=0.3)
    assert not nginx.deploy(TARGET, NEW).ok
    assert api.file == GOOD
    release.set()
    wait_for(lambda: api.writes == 2 and api.file == GOOD, "the previous file put back")
    assert api.signals == []


def test_the_next_deploy_waits_for_a_given_up_one_within_its_own_deadline() -> None:
    """The stalled deploy still holds b when the next pass comes: b waits for it, never beside
    it, and is given up again; a goes on."""
    api = FakeApi()
    a, b = target("a"), target("b")
    release = api.stall["exec_start", b.container_id] = threading.Event()
    nginx = deployer(api, deadline=0.3)
    assert [r.ok for r in nginx.deploy_all([a, b], NEW)] == [True, False]
    second = nginx.deploy_all([a, b], b"# newer\n")
    assert second[0].ok and not second[1].ok
    assert "waiting for its previous deploy to end" in (second[1].error or "")
    release.set()
    wait_for(lambda: api.files[b.container_id] == GOOD, "b's previous file put back")
    del api.stall["exec_start", b.container_id]
    assert nginx.deploy(b, b"# newer\n").ok and api.files[b.container_id] == b"# newer\n"
