"""What each nginx runs against what is wanted, and the waits before a refused config goes
again: pure, with time passed in."""

from __future__ import annotations

from controlplane.core.build import build_topology
from controlplane.core.served import (
    FAILED_RETRY,
    REFUSED_RETRY,
    NginxState,
    deploy_due,
    failed,
    serving,
)
from tests.unit.builders import container, nginx, state


def test_serving_follows_the_upstream_rule() -> None:
    """Up backends only; one server per container on a network nginx reaches."""
    up, paused = container("w1"), container("w2", ip="172.20.0.3", status="paused")
    topology = build_topology(state(nginx("lb"), up, paused))
    assert serving(topology) == {"web": frozenset({up.id})}


def test_refusals_wait_longer_each_time_up_to_an_hour() -> None:
    first, longest = REFUSED_RETRY
    waits = []
    failure = None
    for _ in range(10):
        failure = failed(failure, "abc", 3, "nginx -t failed", True, 0.0)
        waits.append(failure.retry_at)
    assert waits[:3] == [first, 2 * first, 4 * first]
    assert waits[-1] == longest and failure is not None and failure.attempts == 10


def test_a_new_text_starts_from_the_first_wait() -> None:
    refused = failed(None, "abc", 3, "x", True, 0.0)
    refused = failed(refused, "abc", 3, "x", True, 0.0)
    again = failed(refused, "def", 4, "x", True, 10.0)
    assert again.attempts == 1 and again.retry_at == 10.0 + REFUSED_RETRY[0]


def test_a_failed_way_in_is_retried_sooner() -> None:
    assert failed(None, "abc", 3, "engine gone", False, 0.0).retry_at == FAILED_RETRY[0]


def test_deploy_due() -> None:
    failure = failed(None, "abc", 3, "x", True, 0.0)
    assert not deploy_due("abc", "abc", None, 0.0)
    assert deploy_due("abc", None, None, 0.0)
    assert not deploy_due("abc", None, failure, 59.0)
    assert deploy_due("abc", None, failure, 60.0)
    assert deploy_due("def", None, failure, 1.0)


def test_in_sync_is_unknown_before_any_deploy() -> None:
    wanted = {"web": frozenset({"a"})}
    assert NginxState("lb", "id").in_sync("web", wanted) is None
    assert NginxState("lb", "id", 1, {"web": frozenset({"a"})}).in_sync("web", wanted)
    assert NginxState("lb", "id", 1, {}).in_sync("web", wanted) is False
    assert NginxState("lb", "id", 1, {}).in_sync("gone", wanted)
