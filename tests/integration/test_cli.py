"""The README's flow through the console script: `controlplane run` and `controlplane render`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.lab import Http, Lab, wait_until


@pytest.fixture
def run_cli() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def controlplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args], capture_output=True, text=True, timeout=60
    )


def test_run_serves_scaled_service_and_stops_cleanly(
    lab: Lab, http_for: type[Http], run_cli: list[subprocess.Popen[str]]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    process = subprocess.Popen(
        ["controlplane", "run", "--network", net.name],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    run_cli.append(process)
    backends = [lab.backend(net) for _ in range(3)]
    names = {b.name for b in backends}
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", names), what="3 backends")
    assert set(http.bodies("web", 30)) == names

    backends[0].stop()
    wait_until(lambda: http.only("web", names - {backends[0].name}), what="the stopped one gone")

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    _, stderr = process.communicate()
    assert "reconciled" in stderr


def test_render_prints_the_config_and_changes_nothing(lab: Lab) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    web = lab.backend(net, labels={"controlplane.algorithm": "least_conn"})
    result = controlplane("render", "--network", net.name)
    assert result.returncode == 0, result.stderr
    assert "least_conn;" in result.stdout
    assert f"# {web.name}" in result.stdout
    exit_code, output = lb.exec_run(["nginx", "-T"])
    assert exit_code == 0
    assert "controlplane.conf" not in output.decode(), "render must not deploy"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["render", "--network", "Not A Name"], "is not a Docker network name"),
        (["render", "--domain", "bad domain"], "is not a DNS domain"),
        (["render", "--docker-url", "tcp://127.0.0.1:1"], "cannot reach the Docker engine"),
        (["render", "--templates", "/nonexistent"], "does not exist"),
        (["run", "--debounce", "-1"], "-1"),
    ],
    ids=["bad-network", "bad-domain", "no-docker", "no-templates", "bad-debounce"],
)
def test_bad_flags_get_clear_errors(args: list[str], message: str) -> None:
    result = controlplane(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
