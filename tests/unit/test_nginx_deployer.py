"""The deploy protocol against a fake engine: a file that was not tested and loaded never stays."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import docker.errors
import pytest

from controlplane.core.model import NginxTarget
from controlplane.nginx_deployer import NginxDeployer, pack

TARGET = NginxTarget("c" * 64, "lb", "/etc/nginx/conf.d/controlplane.conf", "t0", ("app",))
GOOD, NEW = b"# good\n", b"# new\n"


class FakeApi:
    """Keeps the one file, runs `nginx -t` as told, records signals; can fail on any call."""

    def __init__(self, current: bytes | None = GOOD, test_code: int = 0) -> None:
        self.file = current
        self.test_code = test_code
        self.signals: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.writes = 0

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]

    def get_archive(self, container: str, path: str) -> tuple[Iterator[bytes], dict[str, str]]:
        self._maybe_fail("get_archive")
        if self.file is None:
            raise docker.errors.NotFound("no such file")
        return iter([pack("controlplane.conf", self.file)]), {}

    def put_archive(self, container: str, path: str, data: bytes) -> bool:
        self.writes += 1
        self._maybe_fail(f"put_archive#{self.writes}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile("controlplane.conf")
            assert member is not None
            self.file = member.read()
        return True

    def exec_create(self, container: str, command: list[str]) -> dict[str, str]:
        self._maybe_fail("exec")
        return {"Id": "exec1"}

    def exec_start(self, exec_id: str) -> bytes:
        return (
            b"nginx: [emerg] unknown directive in controlplane.conf:3\n" if self.test_code else b""
        )

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        return {"ExitCode": self.test_code}

    def kill(self, container: str, signal: str) -> None:
        self._maybe_fail("kill")
        self.signals.append(signal)


def test_a_tested_config_is_loaded() -> None:
    api = FakeApi()
    result = NginxDeployer(api, shell=False).deploy(TARGET, NEW)  # type: ignore[arg-type]
    assert result.ok and api.file == NEW and api.signals == ["SIGHUP"]


def test_a_refused_config_is_replaced_by_the_previous_one_and_not_loaded() -> None:
    api = FakeApi(test_code=1)
    result = NginxDeployer(api, shell=False).deploy(TARGET, NEW)  # type: ignore[arg-type]
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
    result = NginxDeployer(api, shell=False).deploy(TARGET, NEW)  # type: ignore[arg-type]
    assert not result.ok and "could not update nginx lb" in (result.error or "")
    assert api.file == GOOD


def test_a_failed_restore_forgets_the_file_so_the_next_deploy_reads_it_again() -> None:
    api = FakeApi(test_code=1)
    api.fail["put_archive#2"] = docker.errors.APIError("engine went away")
    deployer = NginxDeployer(api, shell=False)
    assert not deployer.deploy(TARGET, NEW).ok  # type: ignore[arg-type]
    api.file, api.test_code, api.fail = GOOD, 0, {}
    reads = []
    original = api.get_archive
    api.get_archive = lambda c, p: reads.append(p) or original(c, p)  # type: ignore[method-assign]
    assert deployer.deploy(TARGET, NEW).ok  # type: ignore[arg-type]
    assert reads == [TARGET.config_path]


def test_no_previous_file_means_an_empty_one_after_a_refusal() -> None:
    api = FakeApi(current=None, test_code=1)
    NginxDeployer(api, shell=False).deploy(TARGET, NEW)  # type: ignore[arg-type]
    assert api.file == b""


def test_an_unreadable_previous_file_stops_before_writing() -> None:
    api = FakeApi()
    api.fail["get_archive"] = KeyError("controlplane.conf")
    result = NginxDeployer(api, shell=False).deploy(TARGET, NEW)  # type: ignore[arg-type]
    assert not result.ok and api.writes == 0 and api.file == GOOD
