"""Which changes a scale-out may hold back, and for how long."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.core import labels as L
from controlplane.core.batching import (
    BatchPolicy,
    Held,
    adds_backends,
    due,
    hold,
    only_adds_capacity,
    removes_backends,
)
from controlplane.core.build import build_topology
from controlplane.core.model import BackendOverride, ContainerFacts, Overrides, Topology
from tests.unit.builders import container, nginx, state

LB = nginx("lb")
W1 = container("w1", ip="172.20.0.2")
W2 = container("w2", ip="172.20.0.3")
W3 = container("w3", ip="172.20.0.4")
POLICY = BatchPolicy(quiet=1.0, longest=10.0)


def topology(*containers: ContainerFacts, overrides: Overrides | None = None) -> Topology:
    return build_topology(state(*containers), overrides=overrides)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((LB, W1), (LB, W1, W2), True),
        ((LB, W1), (LB, W1, W2, W3), True),
        ((LB, W1), (LB, W1), False),
        ((LB,), (LB, W1), False),
        ((LB, W1, W2), (LB, W1), False),
        ((LB, W1, W2), (LB, W1, W3), False),
        ((LB, W1), (LB, W1, container("a1", aliases=("api",), ip="172.20.0.9")), False),
        ((LB, W1), (LB, nginx("lb2", ip="172.20.0.99"), W1, W2), False),
        ((LB, W1), (LB, W1, container("w2", ip="172.20.0.3", labels={L.WEIGHT: "x"})), False),
        (
            (LB, W1),
            (LB, W1, container("w2", ip="172.20.0.3", labels={L.ALGORITHM: "least_conn"})),
            False,
        ),
    ],
    ids=[
        "one-more",
        "two-more",
        "nothing",
        "first-backend",
        "one-left",
        "one-swapped",
        "new-service",
        "new-nginx",
        "excluded-newcomer",
        "method-changes",
    ],
)
def test_only_new_live_backends_of_a_serving_service_are_capacity(
    before: tuple[ContainerFacts, ...], after: tuple[ContainerFacts, ...], expected: bool
) -> None:
    assert only_adds_capacity(topology(*before), topology(*after)) is expected


def test_a_newcomer_that_is_drained_is_not_capacity() -> None:
    drained = Overrides(backends={"web": {"w2": BackendOverride(drain=True)}})
    assert not only_adds_capacity(topology(LB, W1), topology(LB, W1, W2, overrides=drained))


def test_a_state_change_of_an_old_backend_is_not_capacity() -> None:
    weighted = Overrides(backends={"web": {"w1": BackendOverride(weight=5)}})
    assert not only_adds_capacity(topology(LB, W1), topology(LB, W1, W2, overrides=weighted))


ONE, TWO, THREE = topology(LB, W1), topology(LB, W1, W2), topology(LB, W1, W2, W3)


def test_after_a_calm_second_a_new_backend_goes_at_once() -> None:
    assert hold(ONE, TWO, now=100.0, last_added=99.0, held=None, policy=POLICY) is None


def test_soon_after_backends_were_added_new_ones_are_held_until_docker_is_quiet() -> None:
    held = hold(ONE, TWO, now=100.0, last_added=99.5, held=None, policy=POLICY)
    assert held == Held(100.0, 100.0, TWO) and due(held, POLICY) == 101.0
    again = hold(ONE, THREE, now=100.6, last_added=99.5, held=held, policy=POLICY)
    assert again == Held(100.0, 100.6, THREE) and due(again, POLICY) == pytest.approx(101.6)
    assert hold(ONE, THREE, now=101.6, last_added=99.5, held=again, policy=POLICY) is None


def test_a_long_scale_out_is_cut_at_the_longest_hold() -> None:
    held = Held(100.0, 109.5, THREE)
    assert due(held, POLICY) == 110.0
    assert hold(ONE, THREE, now=110.0, last_added=99.5, held=held, policy=POLICY) is None


@pytest.mark.parametrize(
    "after", [topology(LB), topology(LB, W2), topology(LB, W1, nginx("lb2", ip="172.20.0.99"))]
)
def test_anything_but_capacity_ends_a_hold(after: Topology) -> None:
    held = Held(100.0, 100.0, TWO)
    assert hold(ONE, after, now=100.1, last_added=99.9, held=held, policy=POLICY) is None


def test_a_longest_hold_of_zero_holds_nothing() -> None:
    off = replace(POLICY, longest=0.0)
    assert hold(ONE, TWO, now=100.0, last_added=100.0, held=None, policy=off) is None


def test_fifty_starts_at_dockerds_pace_cost_three_applied_changes() -> None:
    """dockerd here starts about 4.4 containers a second: 50 take ~11.5 s."""
    names = [container(f"b{i}", ip=f"172.20.1.{i}") for i in range(50)]
    current, held, last_added, applied = topology(LB, W1), None, 0.0, 0
    for i in range(1, 51):
        now = 100.0 + i / 4.4
        while held is not None and due(held, POLICY) <= now:
            flushed = due(held, POLICY)
            current, held, last_added, applied = held.topology, None, flushed, applied + 1
        wanted = topology(LB, W1, *names[:i])
        held = hold(current, wanted, now, last_added, held, POLICY)
        if held is None:
            current, last_added, applied = wanted, now, applied + 1
    assert held is not None
    assert applied + 1 == 3


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((LB, W1), (LB, W1, W2), True),
        ((LB,), (LB, W1), True),
        ((LB, W1, W2), (LB, W1), False),
        ((LB, W1), (LB, W1), False),
        ((LB, W1, W2), (LB, W1, W3), True),
    ],
    ids=["one-more", "first", "one-left", "nothing", "one-swapped"],
)
def test_adds_backends(
    before: tuple[ContainerFacts, ...], after: tuple[ContainerFacts, ...], expected: bool
) -> None:
    assert adds_backends(topology(*before), topology(*after)) is expected


def test_health_checked_newcomers_and_their_first_pass_are_capacity() -> None:
    starting = container("w2", ip="172.20.0.3", health="starting")
    healthy = container("w2", ip="172.20.0.3", health="healthy")
    assert only_adds_capacity(topology(LB, W1), topology(LB, W1, starting))
    assert only_adds_capacity(topology(LB, W1, starting), topology(LB, W1, healthy))
    assert adds_backends(topology(LB, W1, starting), topology(LB, W1, healthy))
    assert not adds_backends(topology(LB, W1), topology(LB, W1, starting))
    sick = container("w2", ip="172.20.0.3", health="unhealthy")
    assert not only_adds_capacity(topology(LB, W1, sick), topology(LB, W1, healthy))


def test_a_service_nginx_cannot_reach_yet_does_not_serve() -> None:
    far = container("w1", network="far", ip="172.30.0.2")
    near = container("w2", ip="172.20.0.3")

    def on_both(*containers: ContainerFacts) -> Topology:
        return build_topology(state(*containers, networks=("bridge", "app", "far")))

    assert not only_adds_capacity(on_both(LB, far), on_both(LB, far, near))


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((LB, W1, W2), (LB, W1), True),
        ((LB, W1, W2), (LB, W1, W3), True),
        ((LB, W1, W2), (LB, W1, container("w2", ip="172.20.0.3", status="paused")), True),
        ((LB, W1, W2), (LB, W1, container("w2", ip="172.20.0.3", health="unhealthy")), True),
        ((LB, W1), (LB, W1, W2), False),
        ((LB, W1, container("w2", ip="172.20.0.3", health="starting")), (LB, W1), False),
        ((LB, W1), (LB, W1), False),
    ],
    ids=["one-left", "one-swapped", "paused", "unhealthy", "one-more", "never-up-left", "nothing"],
)
def test_removes_backends(
    before: tuple[ContainerFacts, ...], after: tuple[ContainerFacts, ...], expected: bool
) -> None:
    assert removes_backends(topology(*before), topology(*after)) is expected
