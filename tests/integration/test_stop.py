"""Stopping or killing a backend under load through nginx costs no request."""

from __future__ import annotations

import time

import pytest
from docker.models.containers import Container

from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import BOTH_DATAPLANES, Http, Lab, wait_until
from tests.support.load import Load

pytestmark = BOTH_DATAPLANES


def serving_three(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], stop_delay: str
) -> tuple[RunningController, int, list[Container]]:
    """Three backends of web behind a managed nginx, all served: (controller, port, backends)."""
    net = lab.network()
    lb = lab.nginx(net)
    backends = [lab.backend(net, env={"STOP_DELAY": stop_delay}) for _ in range(3)]
    controller = start_controller(net.name)
    port = lab.published_port(lb)
    http = http_for(port)
    wait_until(lambda: http.settled("web", {b.name for b in backends}), what="all served")
    return controller, port, backends


@pytest.mark.parametrize("stop_delay", ["0", "2"], ids=["exits-at-once", "503-for-2s"])
def test_docker_stop_under_load_fails_nothing(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], stop_delay: str
) -> None:
    controller, port, backends = serving_three(lab, start_controller, http_for, stop_delay)

    victim = backends[0]
    with Load(port, "web", max_seconds=30) as load:
        time.sleep(0.5)
        stopped_at = time.monotonic()
        victim.stop(timeout=10)
        time.sleep(0.5)
    assert len(load.responses) > 50
    assert load.failures == [], f"{len(load.failures)} of {len(load.responses)} failed"
    last = load.last_from(victim.name)
    assert last is not None and last - stopped_at < 1.0, "nginx kept routing to the stopping one"
    wait_until(lambda: f"# {victim.name}" not in controller.config, what="the model without it")


def test_docker_kill_under_load_fails_no_idempotent_request(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    controller, port, backends = serving_three(lab, start_controller, http_for, "0")

    victim = backends[0]
    with Load(port, "web", max_seconds=30) as load:
        time.sleep(0.5)
        killed_at = time.monotonic()
        victim.kill()
        wait_until(lambda: f"# {victim.name}" not in controller.config, timeout=5, interval=0.005)
        out_after = time.monotonic() - killed_at
        time.sleep(0.5)
    assert out_after < 1.0, f"the killed backend left the config after {out_after:.2f} s"
    assert load.failures == [], f"{len(load.failures)} of {len(load.responses)} failed"
