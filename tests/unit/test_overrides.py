"""Operator overrides in the pure core: they beat labels, drain keeps a server marked down,
and only what passed the grammar gets in (through the API's models, which call the core)."""

from __future__ import annotations

import signal

import jinja2
import pytest

from controlplane.api import bodies
from controlplane.core import labels as L
from controlplane.core.build import build_topology
from controlplane.core.dns_records import build_zone
from controlplane.core.lifecycle import StopMark
from controlplane.core.model import (
    Algorithm,
    BackendOverride,
    BackendState,
    Method,
    Overrides,
    Service,
)
from controlplane.core.overrides import BackendPatch, check_algorithm
from controlplane.core.render import render_config
from controlplane.errors import InvalidValue
from tests.unit.builders import container, nginx, state

WEB = state(nginx("lb"), container("w1", ip="172.20.0.2"), container("w2", ip="172.20.0.3"))


def web(overrides: Overrides, stopping: dict[str, StopMark] | None = None) -> Service:
    (service,) = build_topology(WEB, stopping=stopping, overrides=overrides).services
    return service


def test_algorithm_override_beats_labels() -> None:
    labelled = state(nginx("lb"), container("w1", labels={L.ALGORITHM: "ip_hash"}))
    chosen = Overrides(algorithms={"web": Algorithm(Method.LEAST_CONN)})
    (service,) = build_topology(labelled, overrides=chosen).services
    assert service.algorithm == Algorithm(Method.LEAST_CONN)
    assert service.algorithm_source == "override"


def test_override_silences_a_broken_label_combination() -> None:
    broken = state(nginx("lb"), container("w1", labels={L.ALGORITHM: "hash"}))
    (plain,) = build_topology(broken).services
    assert any("needs" in w for w in plain.warnings)
    chosen = Overrides(algorithms={"web": Algorithm(Method.RANDOM, two=True)})
    (service,) = build_topology(broken, overrides=chosen).services
    assert not any("needs" in w for w in service.warnings)


def test_hash_override_leaves_backups_out_with_a_reason() -> None:
    with_backup = state(
        nginx("lb"), container("w1"), container("w2", ip="172.20.0.3", labels={L.BACKUP: "1"})
    )
    chosen = Overrides(algorithms={"web": Algorithm(Method.HASH, "$uri")})
    topology = build_topology(with_backup, overrides=chosen)
    assert [b.container for b in topology.services[0].backends] == ["w1"]
    assert [e.container for e in topology.excluded] == ["w2"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (BackendOverride(weight=7), (7, BackendState.UP)),
        (BackendOverride(drain=True), (1, BackendState.DRAINING)),
        (BackendOverride(weight=3, drain=True), (3, BackendState.DRAINING)),
    ],
    ids=["weight", "drain", "both"],
)
def test_backend_override(override: BackendOverride, expected: tuple[int, BackendState]) -> None:
    service = web(Overrides(backends={"web": {"w2": override}}))
    by_name = {b.container: (b.weight, b.state) for b in service.backends}
    assert by_name == {"w1": (1, BackendState.UP), "w2": expected}


def test_stopping_beats_drain() -> None:
    w2 = container("w2", ip="172.20.0.3")
    service = web(
        Overrides(backends={"web": {"w2": BackendOverride(drain=True)}}),
        {w2.id: StopMark(frozenset({signal.SIGTERM}), 0.0)},
    )
    assert {b.container: b.state for b in service.backends}["w2"] is BackendState.STOPPING


def test_override_for_another_service_changes_nothing() -> None:
    assert web(Overrides(backends={"api": {"w1": BackendOverride(drain=True)}})) == web(Overrides())


def test_drained_server_is_marked_down_and_left_out_of_dns(template: jinja2.Template) -> None:
    chosen = Overrides(backends={"web": {"w2": BackendOverride(drain=True)}})
    topology = build_topology(WEB, overrides=chosen)
    config = render_config(topology, template)
    assert "server 172.20.0.3:80 down;" in config
    assert "# service web: 1 of 2 containers serving" in config
    zone = build_zone(topology, "internal", 5, 1)
    assert [r.value for r in zone.records["web.internal"]["A"]] == ["172.20.0.2"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"method": "ip_hash"}, Algorithm(Method.IP_HASH)),
        ({"method": "hash", "key": " $uri "}, Algorithm(Method.HASH, "$uri")),
        ({"method": "random", "two": True, "key": ""}, Algorithm(Method.RANDOM, two=True)),
    ],
    ids=["ip_hash", "key-stripped", "empty-key-is-none"],
)
def test_parse_algorithm(body: object, expected: Algorithm) -> None:
    assert bodies.parse(bodies.Algorithm, body).to_core() == expected


@pytest.mark.parametrize(
    ("algorithm", "field"),
    [
        (Algorithm(Method.HASH), "key"),
        (Algorithm(Method.HASH, "$nope"), "key"),
        (Algorithm(Method.LEAST_CONN, "$uri"), "key"),
        (Algorithm(Method.IP_HASH, consistent=True), "consistent"),
        (Algorithm(Method.HASH, "$uri", two=True), "two"),
    ],
    ids=["hash-without-key", "bad-key", "key-for-least_conn", "consistent-for-ip_hash", "two"],
)
def test_check_algorithm_names_the_option_that_breaks_a_rule(
    algorithm: Algorithm, field: str
) -> None:
    """The rules hold wherever an algorithm comes from: the API or the state file."""
    with pytest.raises(InvalidValue) as caught:
        check_algorithm(algorithm)
    assert caught.value.details["field"] == field


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"weight": 5}, BackendPatch(weight=5)),
        ({"weight": None}, BackendPatch(clear_weight=True)),
        ({"drain": False}, BackendPatch(drain=False)),
        ({"weight": 1000, "drain": True}, BackendPatch(weight=1000, drain=True)),
    ],
    ids=["weight", "weight-null", "undrain", "both"],
)
def test_parse_backend_patch(body: object, expected: BackendPatch) -> None:
    assert bodies.parse(bodies.BackendPatch, body).to_core() == expected


@pytest.mark.parametrize(
    ("patch", "current", "expected"),
    [
        (BackendPatch(weight=5), BackendOverride(drain=True), BackendOverride(5, True)),
        (BackendPatch(clear_weight=True), BackendOverride(5, True), BackendOverride(None, True)),
        (BackendPatch(drain=False), BackendOverride(5, True), BackendOverride(5, False)),
    ],
    ids=["weight-keeps-drain", "clear-weight", "undrain-keeps-weight"],
)
def test_patch_applies_only_what_it_names(
    patch: BackendPatch, current: BackendOverride, expected: BackendOverride
) -> None:
    assert patch.apply(current) == expected


def test_errors_name_the_field() -> None:
    with pytest.raises(InvalidValue) as caught:
        bodies.parse(bodies.Algorithm, {"method": "fastest"})
    assert caught.value.details["field"] == "method"
    assert "round_robin" in str(caught.value)
