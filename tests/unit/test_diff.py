"""What changed between two topologies, as operators read it in events and logs."""

from __future__ import annotations

import pytest

from controlplane.core import labels as L
from controlplane.core.build import build_topology
from controlplane.core.diff import describe_changes
from controlplane.core.model import Algorithm, BackendOverride, ContainerFacts, Method, Overrides
from tests.unit.builders import container, nginx, state

W1 = container("w1", ip="172.20.0.2")
W2 = container("w2", ip="172.20.0.3")
LB = nginx("lb")


def changes(
    before: tuple[ContainerFacts, ...],
    after: tuple[ContainerFacts, ...],
    overrides: Overrides | None = None,
) -> tuple[str, ...]:
    return describe_changes(
        build_topology(state(*before)), build_topology(state(*after), overrides=overrides)
    )


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ((LB, W1), (LB, W1), ()),
        ((LB, W1), (LB, W1, W2), ("service web: + w2 (172.20.0.3:80, up)",)),
        ((LB, W1, W2), (LB, W1), ("service web: - w2",)),
        (
            (LB,),
            (LB, W1),
            ("service web appeared with 1 live backend(s), method round_robin",),
        ),
        ((LB, W1), (LB,), ("service web gone",)),
        (
            (LB, W1),
            (LB, container("w1", ip="172.20.0.2", status="paused")),
            ("service web: w1 up -> paused",),
        ),
        ((W1,), (LB, W1), ("nginx lb now managed",)),
        (
            (LB, W1),
            (LB, container("w1", ip="172.20.0.2", labels={L.ALGORITHM: "least_conn"})),
            ("service web: method round_robin -> least_conn (label)",),
        ),
    ],
    ids=["same", "joined", "left", "new-service", "service-gone", "paused", "nginx", "method"],
)
def test_describe_changes(
    before: tuple[ContainerFacts, ...], after: tuple[ContainerFacts, ...], expected: tuple[str, ...]
) -> None:
    assert changes(before, after) == expected


def test_overrides_show_as_changes() -> None:
    chosen = Overrides(
        algorithms={"web": Algorithm(Method.HASH, "$request_uri", consistent=True)},
        backends={"web": {"w1": BackendOverride(weight=4, drain=True)}},
    )
    assert changes((LB, W1), (LB, W1), chosen) == (
        "service web: method round_robin -> hash $request_uri consistent (override)",
        "service web: w1 up -> draining",
        "service web: w1 weight 1 -> 4",
    )


def test_a_container_left_out_and_let_in_again_is_a_change() -> None:
    bad = container("w2", ip="172.20.0.3", labels={L.WEIGHT: "abc"})
    (left_out,) = changes((LB, W1), (LB, W1, bad))
    assert left_out.startswith(f"service web: w2 left out: {L.WEIGHT}='abc' must be")
    assert changes((LB, W1, bad), (LB, W1, W2)) == (
        "service web: + w2 (172.20.0.3:80, up)",
        "service web: w2 no longer left out",
    )
    worse = container("w2", ip="172.20.0.3", labels={L.WEIGHT: "0"})
    (reason,) = changes((LB, W1, bad), (LB, W1, worse))
    assert reason.startswith(f"service web: w2 left out: {L.WEIGHT}='0'")
