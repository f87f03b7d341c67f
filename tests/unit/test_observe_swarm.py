"""Swarm service and task JSON -> owned facts. The fixtures are dockerd 20.10's own answers,
taken from a private swarm (tests/support/swarm.py) while `web` was scaled from 3 to 1: one
task running with its desired state already `shutdown`, its replacement on the way."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from controlplane.core.model import SwarmServiceFacts, TaskAddress, TaskFacts
from controlplane.core.observe import swarm_service_facts, task_facts

FIXTURES = Path(__file__).parent / "fixtures"
SERVICE: dict[str, Any] = json.loads((FIXTURES / "swarm_service.json").read_text())
TASKS: list[dict[str, Any]] = json.loads((FIXTURES / "swarm_tasks.json").read_text())
NETWORK_ID = "whn7czbxelxokzepnttno29bj"
NODE = "ox1odrmie8y44mo66jzxlqj4c"


def test_a_real_service_and_its_tasks() -> None:
    assert swarm_service_facts(SERVICE, TASKS) == SwarmServiceFacts(
        id="t3lmmd4ny036vbp97v8pv108h",
        name="web",
        created="2026-12-01T02:51:35.802508615Z",
        labels={
            "com.example.team": "shop",
            "controlplane.algorithm": "least_conn",
            "controlplane.port": "80",
            "controlplane.weight": "2",
        },
        networks=(NETWORK_ID,),
        endpoint_mode="vip",
        virtual_ips=(TaskAddress(NETWORK_ID, "", "10.0.1.2"),),
        replicas=1,
        updating=True,
        tasks=(
            TaskFacts(
                id="p1q6hrgfgaj1yw1h86jsut1ql",
                name="web.1.p1q6hrgfgaj1yw1h86jsut1ql",
                node=NODE,
                state="running",
                desired_state="shutdown",
                created="2026-12-01T02:51:35.803629633Z",
                addresses=(TaskAddress(NETWORK_ID, "shop-ov", "10.0.1.3"),),
                container_id="ad2365491efecc329b185131d925a8f039f860feed7d547217de60bcd109d9cb",
            ),
            TaskFacts(
                id="wx431hdts8n9vywyy0uld7hqv",
                name="web.1.wx431hdts8n9vywyy0uld7hqv",
                node=NODE,
                state="ready",
                desired_state="ready",
                created="2026-12-01T02:51:37.511384984Z",
                addresses=(TaskAddress(NETWORK_ID, "shop-ov", "10.0.1.7"),),
            ),
        ),
    )


def test_the_container_labels_of_the_task_template_win_over_the_services() -> None:
    facts = swarm_service_facts(SERVICE, [])
    assert facts.labels["controlplane.port"] == "80"  # the service says 8080


def _task(**changes: Any) -> dict[str, Any]:
    task = copy.deepcopy(TASKS[0])
    status = changes.pop("State", None)
    if status is not None:
        task["Status"]["State"] = status
    task.update(changes)
    return task


@pytest.mark.parametrize(
    ("state", "desired", "kept", "moving"),
    [
        ("running", "running", True, False),
        ("starting", "running", True, True),
        ("pending", "running", True, True),
        ("running", "shutdown", True, True),
        ("ready", "ready", True, True),
        ("shutdown", "shutdown", False, False),
        ("complete", "shutdown", False, False),
        ("failed", "shutdown", False, False),
        ("rejected", "shutdown", False, False),
        ("failed", "running", True, False),
    ],
    ids=lambda v: str(v),
)
def test_history_is_left_out_and_moving_tasks_are_told(
    state: str, desired: str, kept: bool, moving: bool
) -> None:
    task = _task(State=state, DesiredState=desired)
    assert task_facts(task, "web").moving is moving
    assert bool(swarm_service_facts(SERVICE, [task]).tasks) is kept


def test_a_service_converges_while_a_task_moves_an_update_runs_or_replicas_are_missing() -> None:
    settled = copy.deepcopy(SERVICE)
    del settled["UpdateStatus"]
    running = _task(State="running", DesiredState="running")
    assert not swarm_service_facts(settled, [running]).converging
    assert swarm_service_facts(SERVICE, [running]).converging  # UpdateStatus: updating
    assert swarm_service_facts(
        settled, [_task(State="starting", DesiredState="running")]
    ).converging
    assert swarm_service_facts(settled, []).converging  # 1 replica wanted, none there
    settled["UpdateStatus"] = {"State": "completed"}
    assert not swarm_service_facts(settled, [running]).converging


def test_global_mode_dnsrr_ipv6_and_a_node_named_task() -> None:
    service = copy.deepcopy(SERVICE)
    service["Spec"]["Mode"] = {"Global": {}}
    service["Endpoint"] = {"Spec": {"Mode": "dnsrr"}}
    task = _task(Slot=0, DesiredState="running")
    task["NetworksAttachments"][0]["Addresses"] = ["10.0.1.9/24", "fd00::9/64", "", None]
    facts = swarm_service_facts(service, [task])
    assert (facts.replicas, facts.endpoint_mode, facts.virtual_ips) == (None, "dnsrr", ())
    assert facts.tasks[0].name == f"web.{NODE}.{task['ID']}"
    assert facts.tasks[0].addresses == (
        TaskAddress(NETWORK_ID, "shop-ov", "10.0.1.9"),
        TaskAddress(NETWORK_ID, "shop-ov", "", "fd00::9"),
    )


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"Spec": None, "Endpoint": None, "UpdateStatus": None},
        {"Spec": {"Labels": None, "TaskTemplate": {"ContainerSpec": None, "Networks": None}}},
        {"Spec": {"Mode": {"Replicated": {"Replicas": "3"}}}, "Endpoint": {"VirtualIPs": None}},
    ],
    ids=["empty", "nulls", "null-parts", "odd-types"],
)
def test_nulls_and_gaps_give_empty_values(broken: dict[str, Any]) -> None:
    tasks = [
        {"DesiredState": "running"},
        {"DesiredState": "running", "Status": None, "NetworksAttachments": None},
    ]
    facts = swarm_service_facts(broken, tasks)
    assert (facts.name, dict(facts.labels), facts.networks, facts.replicas) == ("", {}, (), None)
    assert facts.endpoint_mode == "vip"
    assert [t.addresses for t in facts.tasks] == [(), ()]
