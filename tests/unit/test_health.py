"""The readiness gate's policy on a fake clock: who is probed when, who is served, and why
the others are not."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from controlplane.core import health as R
from controlplane.core import labels as L
from controlplane.core import overrides as O
from controlplane.core.build import BuildMemo, build_topology
from controlplane.core.model import BackendState, ContainerFacts, HealthCheck, HealthMode, Topology
from controlplane.errors import InvalidValue
from tests.unit.builders import container, nginx, state

LB = nginx("lb")
W1 = container("w1", ip="172.20.0.2")
W2 = container("w2", ip="172.20.0.3")
POLICY = R.ReadinessPolicy(interval=0.05, jitter=0.2, silence=2.0, concurrency=256)


def topology(*containers: ContainerFacts) -> Topology:
    return build_topology(state(LB, *containers))


def candidates(built: Topology) -> list[R.Candidate]:
    return [c for service in built.services for c in R.service_candidates(service)]


def key(facts: ContainerFacts, port: int = 80) -> R.Address:
    endpoint = facts.endpoints[0]
    return R.Address(facts.id, facts.started_at, endpoint.network, endpoint.ip, port)


def states(gated: Topology) -> dict[str, BackendState]:
    return {b.container: b.state for s in gated.services for b in s.backends}


class Gate:
    """The policy driven as the gatekeeper drives it, on a fake clock."""

    def __init__(self, *containers: ContainerFacts, first: bool = False, at: float = 0.0) -> None:
        self.now = at
        self.readiness = R.Readiness()
        self.containers = containers
        self.sent: list[R.Address] = []
        self.passes: list[bool] = []
        self.observe(*containers, first=first)

    def observe(self, *containers: ContainerFacts, first: bool = False) -> Topology:
        self.containers = containers
        found = candidates(topology(*containers))
        self.readiness = R.observe(self.readiness, found, self.now, first)
        self.readiness, _ = R.advance(self.readiness, self.now)
        return self.send()

    def send(self) -> Topology:
        self.readiness, chosen = R.due(self.readiness, self.now, POLICY)
        self.sent.extend(key for key, _ in chosen)
        return self.gated

    @property
    def gated(self) -> Topology:
        return R.gate(topology(*self.containers), self.readiness)

    def answer(
        self,
        address: R.Address,
        outcome: R.Outcome | R.Result,
        draw: float = 0.5,
        check: HealthCheck | None = None,
    ) -> bool:
        """`check`: the one the probe ran (by default the backend's current one)."""
        result = outcome if isinstance(outcome, R.Result) else R.Result(outcome)
        if check is None:  # an answer for an untracked one is dropped whatever its check
            track = self.readiness.tracks.get(address)
            check = track.check if track is not None else HealthCheck()
        self.readiness, changed = R.record(
            self.readiness, address, check, result, self.now, self.now, draw, POLICY
        )
        return changed

    def at(self, now: float) -> bool:
        self.now = now
        self.readiness, changed = R.advance(self.readiness, now)
        self.send()
        return changed


def test_a_newcomer_is_probed_at_once_and_held_until_it_connects() -> None:
    gate = Gate(W1)
    assert gate.sent == [key(W1)]
    assert states(gate.gated) == {"w1": BackendState.STARTING}
    assert gate.answer(key(W1), R.Outcome.CONNECTED)
    assert states(gate.gated) == {"w1": BackendState.UP}
    assert R.next_wake(gate.readiness) == math.inf


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_a_refused_probe_is_tried_again_after_the_interval_within_the_jitter(draw: float) -> None:
    gate = Gate(W1, at=10.0)
    assert not gate.answer(key(W1), R.Outcome.REFUSED, draw)
    wake = R.next_wake(gate.readiness)
    assert 10.04 <= wake <= 10.06
    gate.at(wake - 0.001)
    assert gate.sent == [key(W1)]
    gate.at(wake)
    assert gate.sent == [key(W1), key(W1)]
    assert states(gate.gated) == {"w1": BackendState.STARTING}


def test_no_second_probe_while_one_is_in_flight() -> None:
    gate = Gate(W1)
    gate.at(5.0)
    assert gate.sent == [key(W1)]
    assert R.next_wake(gate.readiness) == 60.0  # only its start period's end


def test_it_gives_up_after_the_start_period_and_says_why() -> None:
    short = replace(W1, labels={L.HEALTH_START_PERIOD: "2s"})
    gate = Gate(short, at=100.0)
    gate.answer(key(short), R.Outcome.REFUSED)
    hold = R.report(gate.readiness, 101.2)[short.id, "app"]
    assert hold.reason == (
        "waiting for port 80 to accept a connection (since 1.2 s; last: refused)"
    )
    assert (hold.state, hold.since, hold.served, hold.fails) == ("starting", 100.0, False, 1)
    assert not gate.at(101.999)
    assert gate.at(102.0)
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}
    gave_up = R.report(gate.readiness, 103.0)[short.id, "app"]
    assert (gave_up.state, gave_up.since) == ("gave up", 102.0)
    assert gave_up.reason == (
        "never accepted a connection on port 80 within the start period (2s); it stays out "
        "until it restarts"
    )
    sent = len(gate.sent)
    gate.at(200.0)
    assert len(gate.sent) == sent and R.next_wake(gate.readiness) == math.inf


def test_a_restart_is_a_newcomer_again() -> None:
    short = replace(W1, labels={L.HEALTH_START_PERIOD: "1s"})
    gate = Gate(short)
    gate.at(1.0)
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}
    restarted = replace(short, started_at="2024-05-01T10:05:00Z")
    assert states(gate.observe(restarted)) == {"w1": BackendState.STARTING}
    assert list(gate.readiness.tracks) == [key(restarted)]
    assert gate.sent[-1] == key(restarted)


def test_a_paused_backend_is_new_again_once_unpaused() -> None:
    gate = Gate(W1)
    gate.answer(key(W1), R.Outcome.CONNECTED)
    gate.observe(replace(W1, status="paused"))
    assert gate.readiness.tracks == {}
    assert states(gate.observe(W1)) == {"w1": BackendState.STARTING}


def test_health_none_serves_at_once_and_tracks_nothing() -> None:
    off = replace(W1, labels={L.HEALTH: "none"})
    gate = Gate(off, W2)  # service-wide: w2 says nothing, w1's label is the service's
    assert gate.sent == []
    assert candidates(topology(off, W2)) == []
    assert states(gate.gated) == {"w1": BackendState.UP, "w2": BackendState.UP}


def test_docker_health_still_applies_and_the_gate_adds_to_it() -> None:
    unhealthy = replace(W1, health="unhealthy")
    gate = Gate(unhealthy, W2)
    gate.answer(key(unhealthy), R.Outcome.CONNECTED)
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY, "w2": BackendState.STARTING}


def test_what_the_first_pass_finds_stays_served_while_it_is_probed() -> None:
    w3 = container("w3", ip="172.20.0.4")
    gate = Gate(W1, W2, w3, first=True)
    assert sorted(gate.sent) == sorted([key(W1), key(W2), key(w3)])
    assert set(states(gate.gated).values()) == {BackendState.UP}
    assert not gate.answer(key(W1), R.Outcome.CONNECTED)
    assert not gate.answer(key(W2), R.Outcome.TIMEOUT)
    assert gate.answer(key(w3), R.Outcome.REFUSED)  # its port is closed: out
    assert states(gate.gated) == {
        "w1": BackendState.UP,
        "w2": BackendState.UP,
        "w3": BackendState.STARTING,
    }
    gate.at(0.1)
    assert gate.answer(key(W2), R.Outcome.REFUSED)
    assert states(gate.gated)["w2"] is BackendState.STARTING
    gate.at(0.2)
    assert gate.answer(key(W2), R.Outcome.CONNECTED)
    assert states(gate.gated)["w2"] is BackendState.UP


def test_an_incumbent_that_never_answers_stays_served_after_its_start_period() -> None:
    gate = Gate(W1, first=True)
    gate.answer(key(W1), R.Outcome.TIMEOUT)  # the network answered another probe before
    gate.readiness = replace(gate.readiness, networks={"app": R.Reach(answered=True)})
    assert not gate.at(60.0)
    assert gate.readiness.tracks[key(W1)].phase is R.Phase.READY
    assert states(gate.gated) == {"w1": BackendState.UP}


def test_later_passes_keep_what_was_found_and_add_newcomers_as_pending() -> None:
    gate = Gate(W1, first=True)
    gate.answer(key(W1), R.Outcome.CONNECTED)
    assert states(gate.observe(W1, W2)) == {"w1": BackendState.UP, "w2": BackendState.STARTING}


def test_a_network_without_a_route_is_not_gated_and_warned_about() -> None:
    gate = Gate(W1)
    assert gate.answer(key(W1), R.Outcome.NETWORK_UNREACHABLE)
    gated = gate.gated
    assert states(gated) == {"w1": BackendState.UP}
    assert any("network app: the controller cannot reach" in w for w in gated.warnings)
    assert states(gate.observe(W1, W2)) == {"w1": BackendState.UP, "w2": BackendState.UP}
    assert not gate.answer(key(W2), R.Outcome.TIMEOUT)
    assert gate.readiness.tracks[key(W2)].phase is R.Phase.READY


def test_a_network_that_never_answers_is_unreachable_after_the_silence() -> None:
    gate = Gate(W1)
    gate.now = 1.0
    assert not gate.answer(key(W1), R.Outcome.TIMEOUT)
    gate.at(1.05)
    gate.now = 2.0
    assert gate.readiness.reach("app").unreachable is None
    assert not gate.answer(key(W1), R.Outcome.HOST_UNREACHABLE)
    gate.at(2.05)
    gate.now = 3.0
    assert gate.answer(key(W1), R.Outcome.TIMEOUT)  # sent at 2.05, silent since 0.0
    assert states(gate.gated) == {"w1": BackendState.UP}


def test_an_answer_makes_a_network_reachable_again() -> None:
    gate = Gate(W1)
    gate.answer(key(W1), R.Outcome.NETWORK_UNREACHABLE)
    gate.observe(W1, W2)
    assert gate.answer(key(W2), R.Outcome.REFUSED)
    assert gate.readiness.reach("app") == R.Reach(answered=True)
    assert not any("cannot reach" in w for w in gate.gated.warnings)
    assert states(gate.gated) == {"w1": BackendState.UP, "w2": BackendState.STARTING}


def test_timeouts_on_a_network_that_answered_hold_only_that_backend() -> None:
    gate = Gate(W1, W2)
    gate.answer(key(W1), R.Outcome.CONNECTED)
    for second in range(1, 6):
        gate.now = float(second)
        gate.answer(key(W2), R.Outcome.TIMEOUT)
        gate.send()
    assert gate.readiness.reach("app").unreachable is None
    assert states(gate.gated) == {"w1": BackendState.UP, "w2": BackendState.STARTING}


def test_probes_in_flight_are_bounded() -> None:
    many = [container(f"n{i}", ip=f"172.20.1.{i}") for i in range(5)]
    readiness = R.observe(R.Readiness(), candidates(topology(*many)), 0.0, False)
    readiness, first = R.due(readiness, 0.0, replace(POLICY, concurrency=2))
    readiness, none = R.due(readiness, 0.0, replace(POLICY, concurrency=2))
    assert len(first) == 2 and none == []
    readiness, _ = R.record(
        readiness, *first[0], R.Result(R.Outcome.REFUSED), 0.0, 0.0, 0.5, POLICY
    )
    _, more = R.due(readiness, 0.0, replace(POLICY, concurrency=2))
    assert len(more) == 1 and more[0] not in first


def test_an_unchanged_service_stays_the_same_object() -> None:
    built = topology(W1)
    readiness = R.observe(R.Readiness(), candidates(built), 0.0, True)
    assert R.gate(built, readiness) is built


def test_a_backend_on_two_networks_is_probed_on_each() -> None:
    both = container("w1", ip="172.20.0.2", more_networks={"db": "172.21.0.2"})
    found = candidates(build_topology(state(LB, both, networks=("bridge", "app", "db"))))
    assert sorted(c.address.network for c in found) == ["app", "db"]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, (HealthMode.TCP, 60)),
        ({L.HEALTH: "TCP"}, (HealthMode.TCP, 60)),
        ({L.HEALTH: "none"}, (HealthMode.NONE, 60)),
        ({L.HEALTH_START_PERIOD: "2m"}, (HealthMode.TCP, 120)),
        ({L.HEALTH_START_PERIOD: "1h"}, (HealthMode.TCP, 3600)),
    ],
    ids=["default", "tcp", "none", "minutes", "an-hour"],
)
def test_health_labels(labels: dict[str, str], expected: tuple[HealthMode, int]) -> None:
    (service,) = topology(replace(W1, labels=labels)).services
    assert (service.health.mode, service.health.start_period) == expected


@pytest.mark.parametrize(
    ("label", "value", "says"),
    [
        (L.HEALTH, "https", "is not a check: use tcp"),
        (L.HEALTH, "tcp;", "is not a check: use tcp"),
        (L.HEALTH_START_PERIOD, "0", "from 1s to 3600s"),
        (L.HEALTH_START_PERIOD, "2h", "from 1s to 3600s"),
        (L.HEALTH_START_PERIOD, "1.5s", "from 1s to 3600s"),
        (L.HEALTH_START_PERIOD, "1d", "from 1s to 3600s"),
    ],
    ids=["unknown", "junk", "zero", "too-long", "fraction", "unknown-unit"],
)
def test_a_bad_health_label_excludes_the_container(label: str, value: str, says: str) -> None:
    with pytest.raises(InvalidValue, match=says):
        L.parse_service_labels({label: value})
    built = topology(replace(W1, labels={label: value}), W2)
    assert [e.container for e in built.excluded] == ["w1"]
    assert says in built.excluded[0].reason


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (
            {L.HEALTH: "tcp", L.HEALTH_PATH: "/x"},
            f"{L.HEALTH_PATH} applies only to {L.HEALTH}=http, not tcp: leave it out, or "
            f"choose {L.HEALTH}=http",
        ),
        ({L.HEALTH: "TCP", L.HEALTH_HOST: "a.example"}, f"{L.HEALTH_HOST} applies only to"),
        ({L.HEALTH: "tcp", L.HEALTH_STATUS: "204"}, f"{L.HEALTH_STATUS} applies only to"),
        (
            {L.HEALTH: "none", L.HEALTH_FAILS: "5"},
            f"{L.HEALTH}=none checks nothing, so {L.HEALTH_FAILS} does not apply: leave it "
            f"out, or choose {L.HEALTH}=tcp or http",
        ),
        ({L.HEALTH: "none", L.HEALTH_PATH: "/x"}, f"so {L.HEALTH_PATH} does not apply"),
        ({L.HEALTH: "none", L.HEALTH_START_PERIOD: "2m"}, f"so {L.HEALTH_START_PERIOD} does"),
    ],
    ids=["tcp-path", "tcp-host", "tcp-status", "none-fails", "none-path", "none-start-period"],
)
def test_a_field_the_check_mode_does_not_use_excludes_the_container(
    labels: dict[str, str], says: str
) -> None:
    with pytest.raises(InvalidValue, match=says.replace(".", r"\.").replace("?", r"\?")):
        L.parse_service_labels(labels)
    built = topology(replace(W1, labels=labels), W2)
    assert [e.container for e in built.excluded] == ["w1"]
    assert says in built.excluded[0].reason
    assert [b.container for s in built.services for b in s.backends] == ["w2"]


@pytest.mark.parametrize("mode", [None, "tcp", "http", "none", "TCP"])
@pytest.mark.parametrize("field", [*O.HEALTH_FIELDS][1:])
def test_labels_and_the_api_take_and_refuse_the_same_combinations(
    mode: str | None, field: str
) -> None:
    value = {"path": "/x", "host": "a.example", "status": "204", "interval": "2s"}.get(field)
    value = value or {"timeout": "2s", "start_period": "30s"}.get(field, "5")
    labels = {L.HEALTH_LABELS[field]: value} | ({L.HEALTH: mode} if mode else {})
    try:
        L.parse_service_labels(labels)
        by_labels = None
    except InvalidValue as error:
        by_labels = str(error)
    try:
        O.HealthSpec(mode=mode, **{field: value}).to_check()  # type: ignore[arg-type]
        by_api = None
    except InvalidValue as error:
        by_api = str(error)
    assert (by_labels is None) == (by_api is None), (by_labels, by_api)


def test_containers_that_disagree_keep_the_older_mode_and_drop_what_it_does_not_use() -> None:
    older = replace(W1, labels={L.HEALTH: "tcp"}, created="2024-05-01T09:00:00Z")
    (service,) = topology(older, replace(W2, labels={L.HEALTH_PATH: "/x"})).services
    assert service.health == HealthCheck(active=True)
    assert service.warnings == (
        f"{L.HEALTH_PATH} applies only to {L.HEALTH}=http, not tcp: leave it out, or choose "
        f"{L.HEALTH}=http; the containers disagree, so it is ignored until they agree",
    )


def test_the_oldest_container_sets_the_check_and_a_disagreement_is_warned() -> None:
    older = replace(W1, labels={L.HEALTH: "none"}, created="2024-05-01T09:00:00Z")
    (service,) = topology(older, replace(W2, labels={L.HEALTH: "tcp"})).services
    assert service.health.mode is HealthMode.NONE
    assert service.warnings == (f"{L.HEALTH}: w2 says tcp but w1 (older) says none; using none",)


def test_the_candidate_memo_reads_only_changed_services_and_says_when_none_changed() -> None:
    memo = R.CandidateMemo()
    built = BuildMemo()
    first = build_topology(state(LB, W1, W2), memo=built)
    found, same = memo.candidates(first)
    assert [c.address for c in found] == [key(W1), key(W2)] and not same
    assert memo.candidates(build_topology(state(LB, W1, W2), memo=built)) == (found, True)
    restarted = replace(W2, started_at="2024-05-01T10:05:00Z")
    found, same = memo.candidates(build_topology(state(LB, W1, restarted), memo=built))
    assert [c.address for c in found] == [key(W1), key(restarted)] and not same


# Active checks: labels make the check go on after a backend is in.

HTTP = {
    L.HEALTH_PATH: "/health",
    L.HEALTH_INTERVAL: "1s",
    L.HEALTH_FAILS: "3",
    L.HEALTH_PASSES: "2",
}


def ok(status: int = 200) -> R.Result:
    return R.Result(R.Outcome.STATUS, status, 0.002)


def checked(labels: dict[str, str] = HTTP, at: float = 0.0) -> tuple[Gate, ContainerFacts]:
    """One backend with an active check, in after its first passing probe at `at`."""
    facts = replace(W1, labels=labels)
    gate = Gate(facts, at=at)
    assert gate.answer(key(facts), ok())
    return gate, facts


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, HealthCheck()),
        ({L.HEALTH: "tcp"}, HealthCheck(active=True)),
        ({L.HEALTH: "http"}, HealthCheck(HealthMode.HTTP, active=True)),
        ({L.HEALTH_PATH: "/ready?x=1"}, HealthCheck(HealthMode.HTTP, True, path="/ready?x=1")),
        (
            {L.HEALTH_HOST: "App.Example.com:8080"},
            HealthCheck(HealthMode.HTTP, True, host="app.example.com:8080"),
        ),
        ({L.HEALTH_STATUS: "204"}, HealthCheck(HealthMode.HTTP, True, status=(204, 204))),
        ({L.HEALTH_INTERVAL: "250ms"}, HealthCheck(active=True, interval_ms=250)),
        (
            {L.HEALTH_TIMEOUT: "2s", L.HEALTH_PORT: "9000"},
            HealthCheck(active=True, timeout_ms=2000, port=9000),
        ),
        (
            {L.HEALTH_FAILS: "1", L.HEALTH_PASSES: "100", L.HEALTH_INTERVAL: "1m"},
            HealthCheck(active=True, fails=1, passes=100, interval_ms=60_000),
        ),
    ],
    ids=[
        "none",
        "tcp",
        "http",
        "path",
        "host",
        "status",
        "interval",
        "port",
        "bounds",
    ],
)
def test_active_check_labels(labels: dict[str, str], expected: HealthCheck) -> None:
    (service,) = topology(replace(W1, labels=labels)).services
    assert service.health == expected
    assert service.health_source == ("label" if labels else "default")


@pytest.mark.parametrize(
    ("label", "value", "says"),
    [
        (L.HEALTH_PATH, "health", "is not a path"),
        (L.HEALTH_PATH, "/a b", "is not a path"),
        (L.HEALTH_PATH, "/x\r\nHost: evil", "is not a path"),
        (L.HEALTH_PATH, "/" + "a" * 256, "is not a path"),
        (L.HEALTH_PORT, "0", "from 1 to 65535"),
        (L.HEALTH_HOST, "*.example.com", "is not a host"),
        (L.HEALTH_HOST, "a b", "is not a host"),
        (L.HEALTH_HOST, "app:0", "is not a host"),
        (L.HEALTH_HOST, "app:123456", "is not a host"),
        (L.HEALTH_STATUS, "399-200", "is not a status range"),
        (L.HEALTH_STATUS, "600", "is not a status range"),
        (L.HEALTH_STATUS, "2xx", "is not a status range"),
        (L.HEALTH_INTERVAL, "50ms", "from 0.1s to 3600s"),
        (L.HEALTH_INTERVAL, "2h", "from 0.1s to 3600s"),
        (L.HEALTH_INTERVAL, "1.5s", "from 0.1s to 3600s"),
        (L.HEALTH_TIMEOUT, "2m", "from 0.01s to 60s"),
        (L.HEALTH_FAILS, "0", "from 1 to 100"),
        (L.HEALTH_PASSES, "101", "from 1 to 100"),
    ],
)
def test_a_bad_check_label_excludes_the_container_with_its_reason(
    label: str, value: str, says: str
) -> None:
    with pytest.raises(InvalidValue, match=says):
        L.parse_service_labels({label: value})
    built = topology(replace(W1, labels={label: value}), W2)
    assert [e.container for e in built.excluded] == ["w1"]
    assert says in built.excluded[0].reason


def test_fails_in_a_row_take_a_backend_out_and_passes_in_a_row_bring_it_back() -> None:
    gate, facts = checked(at=10.0)
    tracked = gate.readiness.tracks[key(facts)]
    assert tracked.phase is R.Phase.READY and 9.8 <= tracked.next_at <= 11.0
    probes = len(gate.sent)
    for second, result in ((11, ok(500)), (12, R.Result(R.Outcome.NO_REPLY))):
        gate.at(float(second))
        assert len(gate.sent) == probes + 1
        probes += 1
        assert not gate.answer(key(facts), result)
    gate.at(13.0)
    assert gate.answer(key(facts), ok(503))  # the third failure in a row
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}
    down = R.report(gate.readiness, 13.5)[facts.id, "app"]
    assert (down.state, down.served, down.fails, down.last) == ("down", False, 3, "status 503")
    assert down.reason == (
        "failed 3 checks in a row (last: status 503); back in after 2 passing in a row (0 so far)"
    )
    gate.at(14.0)
    assert not gate.answer(key(facts), ok())
    gate.at(15.0)
    assert not gate.answer(key(facts), R.Result(R.Outcome.REFUSED))  # a failure resets passes
    gate.at(16.0)
    assert not gate.answer(key(facts), ok())
    gate.at(17.0)
    assert gate.answer(key(facts), ok(204))
    assert states(gate.gated) == {"w1": BackendState.UP}


def test_a_pass_between_failures_starts_the_count_again() -> None:
    gate, facts = checked()
    for second, result in enumerate((ok(500), ok(500), ok(), ok(500), ok(500)), start=1):
        gate.at(float(second))
        gate.answer(key(facts), result)
    assert states(gate.gated) == {"w1": BackendState.UP}
    assert gate.readiness.tracks[key(facts)].fails == 2


@pytest.mark.parametrize("took", [0.1, 0.9, 1.7])
def test_probes_keep_their_interval_whatever_a_probe_takes(took: float) -> None:
    """A probe is due one interval after the last was due, so a hung backend whose probes
    time out is still out within interval x fails + timeout."""
    gate, facts = checked()
    due_at = gate.readiness.tracks[key(facts)].next_at
    for _ in range(3):
        gate.at(due_at)
        gate.now = due_at + took
        gate.answer(key(facts), R.Result(R.Outcome.NO_REPLY))
        after = gate.readiness.tracks[key(facts)].next_at
        assert after == max(due_at + 1.0, due_at + took)
        due_at = after
    assert gate.readiness.tracks[key(facts)].phase is R.Phase.DOWN


def test_the_status_range_decides_and_a_redirect_is_a_status_like_any_other() -> None:
    gate, facts = checked({**HTTP, L.HEALTH_STATUS: "200-299", L.HEALTH_FAILS: "1"})
    gate.at(1.0)
    assert gate.answer(key(facts), ok(302))
    assert gate.readiness.tracks[key(facts)].phase is R.Phase.DOWN


def test_a_tcp_check_passes_on_a_connect_and_an_http_check_does_not() -> None:
    tcp = HealthCheck(active=True)
    http = HealthCheck(HealthMode.HTTP, active=True)
    connected = R.Result(R.Outcome.CONNECTED)
    assert R.passed(tcp, connected) and not R.passed(http, connected)
    assert R.passed(http, ok(399)) and not R.passed(http, ok(400))
    assert not R.passed(tcp, R.Result(R.Outcome.REFUSED))


def test_without_an_active_check_a_ready_backend_is_not_probed_again() -> None:
    gate = Gate(W1)
    gate.answer(key(W1), R.Outcome.CONNECTED)
    gate.at(1000.0)
    assert gate.sent == [key(W1)] and R.next_wake(gate.readiness) == math.inf


def test_a_newcomer_that_never_passes_an_active_check_is_down_and_checked_on() -> None:
    facts = replace(W1, labels={**HTTP, L.HEALTH_START_PERIOD: "2s"})
    gate = Gate(facts)
    gate.answer(key(facts), ok(500))
    assert gate.at(2.0)
    down = R.report(gate.readiness, 2.0)[facts.id, "app"]
    assert down.state == "down"
    assert down.reason is not None and down.reason.startswith(
        "passed no check of GET /health on port 80 within the start period"
    )
    for second in (3.0, 4.0):
        gate.at(second)
        gate.answer(key(facts), ok())
    assert states(gate.gated) == {"w1": BackendState.UP}


def test_an_incumbent_failing_its_check_is_down_at_once() -> None:
    """The last controller may have had it out: it is not let back in for `fails` probes."""
    facts = replace(W1, labels={**HTTP, L.HEALTH_FAILS: "3"})
    gate = Gate(facts, first=True)
    assert states(gate.gated) == {"w1": BackendState.UP}
    assert gate.answer(key(facts), ok(500))
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}
    down = R.report(gate.readiness, 0.0)[facts.id, "app"]
    assert down.reason == (
        "failed its first check since the controller started (last: status 500); back in "
        "after 2 passing in a row (0 so far)"
    )
    for second in (1.0, 2.0):
        gate.at(second)
        gate.answer(key(facts), ok())
    assert states(gate.gated) == {"w1": BackendState.UP}


def test_silence_on_an_unreachable_network_is_no_failure() -> None:
    gate, facts = checked()
    gate.readiness = replace(
        gate.readiness, networks={"app": R.Reach(unreachable="the controller has no route")}
    )
    for second in range(1, 6):
        gate.at(float(second))
        gate.answer(key(facts), R.Result(R.Outcome.TIMEOUT))
    assert states(gate.gated) == {"w1": BackendState.UP}
    assert gate.readiness.tracks[key(facts)].fails == 0


def test_a_down_backend_is_let_in_when_its_network_turns_unreachable() -> None:
    gate, facts = checked({**HTTP, L.HEALTH_FAILS: "1"})
    gate.at(1.0)
    gate.answer(key(facts), ok(500))
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}
    gate.at(2.0)
    assert gate.answer(key(facts), R.Result(R.Outcome.NETWORK_UNREACHABLE))
    assert states(gate.gated) == {"w1": BackendState.UP}
    assert R.report(gate.readiness, 2.0)[facts.id, "app"].state == "up"


def test_turning_the_check_off_lets_a_down_backend_back_in_at_once() -> None:
    gate, facts = checked({**HTTP, L.HEALTH_FAILS: "1"})
    gate.at(1.0)
    gate.answer(key(facts), ok(500))
    plain = replace(facts, labels={})
    assert states(gate.observe(plain)) == {"w1": BackendState.UP}
    assert R.next_wake(gate.readiness) == math.inf


def test_a_changed_check_is_probed_at_once_with_fresh_counts() -> None:
    gate, facts = checked({**HTTP, L.HEALTH_FAILS: "3"})
    gate.at(1.0)
    gate.answer(key(facts), ok(500))
    sent = len(gate.sent)
    gate.observe(replace(facts, labels={**HTTP, L.HEALTH_PATH: "/other"}))
    assert len(gate.sent) == sent + 1
    track = gate.readiness.tracks[key(facts)]
    assert (track.fails, track.check.path) == (0, "/other")


def test_backends_let_in_together_spread_their_probes() -> None:
    facts = [replace(container(f"w{i}", ip=f"172.20.0.{i + 2}"), labels=HTTP) for i in range(20)]
    gate = Gate(*facts)
    for i, f in enumerate(facts):
        gate.answer(key(f), ok(), draw=i / 20)
    due = sorted(gate.readiness.tracks[key(f)].next_at for f in facts)
    assert due[0] >= 0.8 and due[-1] <= 1.0 and len(set(due)) == 20


def test_moved_names_only_the_backends_whose_phase_changed() -> None:
    gate, facts = checked({**HTTP, L.HEALTH_FAILS: "1"})
    before = gate.readiness
    gate.at(1.0)
    assert R.moved(before, gate.readiness) == []
    before = gate.readiness
    gate.answer(key(facts), ok(500))
    assert R.moved(before, gate.readiness) == [key(facts)]
    assert R.moved(gate.readiness, gate.readiness) == []


@pytest.mark.parametrize("seed", range(30))
def test_a_round_in_one_scan_is_advance_due_and_next_wake(seed: int) -> None:
    """`step` is the probe thread's round: the same as the three functions it stands for."""
    draw = random.Random(seed)
    checks = [HealthCheck(), HealthCheck(HealthMode.HTTP, active=True, start_period=5)]
    tracks = {}
    for i in range(40):
        check = draw.choice(checks)
        tracks[R.Address(f"c{i}", "s", "app", f"10.0.0.{i}", 80)] = R.Track(
            draw.choice(list(R.Phase)),
            draw.uniform(0, 10),
            0.0,
            check,
            next_at=draw.choice([math.inf, draw.uniform(0, 20)]),
            probing=draw.random() < 0.2,
        )
    readiness = R.Readiness(tracks)
    policy = replace(POLICY, concurrency=draw.choice([3, 256]))
    now = draw.uniform(0, 20)
    ended, changed = R.advance(readiness, now)
    after, chosen = R.due(ended, now, policy)
    stepped = R.step(readiness, now, policy)
    assert stepped.readiness.tracks == after.tracks and stepped.chosen == chosen
    assert stepped.ended == changed
    wake = R.next_wake(after)
    left = len([t for t in after.tracks.values() if t.probing]) >= policy.concurrency
    assert stepped.wake == wake or (left and stepped.wake == now)
    assert stepped.starting == any(t.phase in R.STARTING for t in after.tracks.values())


def test_a_backend_that_gave_up_is_checked_again_by_a_new_active_check() -> None:
    short = replace(W1, labels={L.HEALTH_START_PERIOD: "2s"})
    gate = Gate(short)
    gate.answer(key(short), R.Outcome.REFUSED)
    gate.at(2.0)
    assert gate.readiness.tracks[key(short)].phase is R.Phase.GAVE_UP
    checked_now = replace(short, labels={**short.labels, L.HEALTH: "tcp", L.HEALTH_PASSES: "1"})
    sent = len(gate.sent)
    gate.observe(checked_now)
    assert len(gate.sent) == sent + 1  # probed at once
    assert gate.answer(key(short), R.Outcome.CONNECTED)
    assert states(gate.gated) == {"w1": BackendState.UP}


# A probe in flight when its check changed (API PUT, labels): its answer is dropped.


def test_an_answer_to_a_check_changed_since_neither_passes_nor_fails() -> None:
    gate, facts = checked({**HTTP, L.HEALTH_FAILS: "1"})
    gate.at(2.0)  # its next probe goes out, GET /health
    before = gate.readiness.tracks[key(facts)]
    assert gate.sent == [key(facts)] * 2 and before.probing
    ready = replace(facts, labels={**HTTP, L.HEALTH_FAILS: "1", L.HEALTH_PATH: "/ready"})
    gate.observe(ready)  # changed while in flight: the new check is probed at once
    assert gate.sent == [key(facts)] * 3
    assert not gate.answer(key(facts), ok(500), check=before.check)
    track = gate.readiness.tracks[key(facts)]
    assert (track.phase, track.fails, track.passes, track.probing) == (R.Phase.READY, 0, 0, True)
    assert track.probes == before.probes and track.last == before.last
    assert states(gate.gated) == {"w1": BackendState.UP}
    assert gate.answer(key(facts), ok(500))  # the new check's answer counts: fails=1
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}


def test_a_tcp_connect_is_not_taken_for_a_passing_http_check_nor_for_a_failing_one() -> None:
    facts = replace(W1, labels={L.HEALTH: "tcp", L.HEALTH_INTERVAL: "1s", L.HEALTH_FAILS: "1"})
    gate = Gate(facts)
    assert gate.answer(key(facts), R.Outcome.CONNECTED)
    gate.at(2.0)
    tcp = gate.readiness.tracks[key(facts)].check
    gate.observe(replace(facts, labels={L.HEALTH_PATH: "/health", L.HEALTH_FAILS: "1"}))
    assert not gate.answer(key(facts), R.Outcome.CONNECTED, check=tcp)  # not a failed GET
    assert states(gate.gated) == {"w1": BackendState.UP}
    gate.at(2.1)
    assert gate.sent == [key(facts)] * 3, "the GET alone is in flight"


def test_a_newcomer_whose_check_changed_while_probed_is_probed_again_not_stuck() -> None:
    gate = Gate(W1)
    first = gate.readiness.tracks[key(W1)].check
    gate.now = 0.01
    gate.observe(replace(W1, labels={L.HEALTH_PATH: "/health"}))
    assert gate.sent == [key(W1)] * 2
    assert not gate.answer(key(W1), R.Outcome.CONNECTED, check=first)
    assert states(gate.gated) == {"w1": BackendState.STARTING}
    assert gate.answer(key(W1), ok())
    assert states(gate.gated) == {"w1": BackendState.UP}


def test_a_check_changed_and_changed_back_takes_the_answer_it_ran() -> None:
    """An answer is judged by the check it ran, not by when it was sent."""
    gate, facts = checked({**HTTP, L.HEALTH_FAILS: "1"})
    gate.at(2.0)
    old = gate.readiness.tracks[key(facts)].check
    gate.observe(replace(facts, labels={**HTTP, L.HEALTH_PATH: "/other"}))
    gate.observe(facts)
    assert gate.answer(key(facts), ok(500), check=old)
    assert states(gate.gated) == {"w1": BackendState.UNHEALTHY}
