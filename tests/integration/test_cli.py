"""The README's flow through the console script: `controlplane run` and `controlplane render`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lab import Http, Lab, wait_until
from tests.support.ports import free_port


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
    lab: Lab, http_for: type[Http], run_cli: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    api = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "CONTROLPLANE_API_TOKEN": "t0ken",
        "CONTROLPLANE_API": f"http://{api}",
    }
    process = subprocess.Popen(
        ["controlplane", "run", "--network", net.name, "--api-bind", api],
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "CONTROLPLANE_STATE_DIR": str(tmp_path)},
    )
    run_cli.append(process)
    backends = [lab.backend(net) for _ in range(3)]
    names = {b.name for b in backends}
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", names), what="3 backends")
    assert set(http.bodies("web", 30)) == names

    listing = subprocess.run(
        ["controlplane", "services"], capture_output=True, text=True, env=env, timeout=30
    )
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1].split()[:4] == ["web", "round_robin", "default", "3/3"]
    drained = subprocess.run(
        ["controlplane", "drain", "web", backends[1].name],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert drained.returncode == 0, drained.stderr
    assert f"nginx running it: {lb.name}" in drained.stdout
    rest = names - {backends[1].name}
    wait_until(lambda: http.only("web", rest), what="the drained one gone")
    assert (tmp_path / "overrides.sqlite3").exists()

    backends[0].stop()
    wait_until(lambda: http.only("web", rest - {backends[0].name}), what="the stopped one gone")

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
        (["run", "--api-bind", "0.0.0.0:1"], "refusing to serve the API on 0.0.0.0:1"),
        (["run", "--api-bind", "localhost:80"], "names are not allowed"),
        (["services", "--api", "http://127.0.0.1:1"], "no controlplane API answers"),
    ],
    ids=[
        "bad-network",
        "bad-domain",
        "no-docker",
        "no-templates",
        "bad-debounce",
        "open-api-no-token",
        "api-bind-name",
        "no-api",
    ],
)
def test_bad_flags_get_clear_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = (
        controlplane(*args, "--state-dir", str(tmp_path))
        if args[0] == "run"
        else (controlplane(*args))
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_corrupt_state_file_stops_the_start_and_is_kept(tmp_path: Path) -> None:
    state = tmp_path / "overrides.sqlite3"
    state.write_bytes(b"not a database" * 100)
    result = controlplane("run", "--state-dir", str(tmp_path), "--api-bind", "off")
    assert result.returncode != 0
    assert "is unreadable or corrupt" in result.stderr and "Traceback" not in result.stderr
    assert state.read_bytes() == b"not a database" * 100
