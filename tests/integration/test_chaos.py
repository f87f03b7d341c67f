"""Zero downtime under churn and faults (issue 6), CI-sized: each scenario runs under hey's
load through nginx and ends with config and DNS holding exactly the live backends. The long
version with a table is bench/chaos.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import chaos
from tests.support.chaos import Rig, ScenarioResult
from tests.support.engine import PrivateEngine
from tests.support.lab import BOTH_DATAPLANES, Lab
from tests.support.witness import MachineEngineWitness

SECONDS = 60


@pytest.fixture
def rig(lab: Lab) -> Iterator[Rig]:
    built = Rig(lab)
    yield built
    built.close()


def no_failures(result: ScenarioResult) -> None:
    assert result.hey is not None and result.hey.requests > 0
    assert result.hey.failed == 0, f"{result.name}: {result.hey.detail}"


@BOTH_DATAPLANES
def test_scale_up_and_down(rig: Rig) -> None:
    no_failures(chaos.run(rig, "scale 1<->5", chaos.scale(rig, cycles=3), SECONDS))


@BOTH_DATAPLANES
def test_stop_restart_pause_disconnect(rig: Rig) -> None:
    no_failures(chaos.run(rig, "lifecycle", chaos.lifecycle(rig), SECONDS))


@BOTH_DATAPLANES
def test_sigkill_of_a_backend(rig: Rig) -> None:
    result = chaos.run(rig, "kill", chaos.kill(rig), SECONDS)
    no_failures(result)
    assert result.max_converge < 5, "bench/chaos.py measures the 1 s figure; this is a bound"


@BOTH_DATAPLANES
def test_rolling_replacement(rig: Rig) -> None:
    no_failures(chaos.run(rig, "rolling", chaos.rolling(rig, rounds=3), SECONDS))


@BOTH_DATAPLANES
def test_nginx_restart_and_a_second_nginx(rig: Rig) -> None:
    chaos.run(rig, "nginx", chaos.nginx_restart_and_second(rig), SECONDS)


@BOTH_DATAPLANES
def test_controller_sigkill_during_churn(rig: Rig) -> None:
    no_failures(chaos.run(rig, "controller kill", chaos.controller_kill(rig), SECONDS))


def test_dockerd_restart(
    private_engine: PrivateEngine, machine_witness: MachineEngineWitness
) -> None:
    """On an engine of the test's own, run as scripts/start-dockerd runs the machine's: with
    the userland proxy (dockerd's default) published ports would close while dockerd
    restarts; without it, not a request fails. The machine's engine is left as it was."""
    with chaos.private_rig(private_engine) as rig:
        result = chaos.run(
            rig, "dockerd restart", chaos.dockerd_restart(rig, private_engine), SECONDS
        )
    no_failures(result)
    assert machine_witness.changes() == []


@BOTH_DATAPLANES
def test_event_storm(rig: Rig) -> None:
    result = chaos.run(rig, "storm", chaos.storm(rig, count=30), SECONDS)
    bound = 0 if rig.lab.dataplane == "dynamic" else 12
    assert result.reloads <= bound, f"{result.reloads} reloads for a storm of 30 containers"


@BOTH_DATAPLANES
def test_storm_of_backends_that_listen_late(rig: Rig) -> None:
    """Issue 16's storm: 50 backends that listen 1 s after their start, served once they do
    (the readiness gate), then stopped, draining for a second: no request fails."""
    no_failures(
        chaos.run(
            rig, "late storm", chaos.storm(rig, count=50, drain=True, listen_ms=1000), SECONDS
        )
    )


def test_rejected_change(rig: Rig) -> None:
    """Reload mode: its template breaks the config of a backend of weight 7; on the dynamic
    data plane a weight is pushed, not rendered (test_lua_balancer covers bad pushed data)."""
    no_failures(chaos.run(rig, "rejected", chaos.rejected(rig), SECONDS))


def test_no_leak_over_1000_events(rig: Rig) -> None:
    (rss_early, fds_early), (rss_late, fds_late) = chaos.leak(rig, events=1000)
    assert fds_late - fds_early <= 4, (fds_early, fds_late)
    assert rss_late - rss_early <= 8 * 1024, f"RSS {rss_early} -> {rss_late} KiB"
