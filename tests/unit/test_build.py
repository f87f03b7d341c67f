"""Docker state -> topology: who serves which service, in which state, and why others don't."""

from __future__ import annotations

import random
import signal
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from controlplane.core import labels as L
from controlplane.core.build import DEFAULT_CONFIG_PATH, BuildMemo, BuildOptions, build_topology
from controlplane.core.lifecycle import StopMark
from controlplane.core.model import (
    Algorithm,
    BackendState,
    ContainerFacts,
    Method,
    NginxTarget,
    Topology,
)
from controlplane.core.observe import canonical_time
from tests.unit.builders import container, network, nginx, state

NETWORKS = (
    "bridge",
    "app",
    "back",
    network("ov", driver="overlay"),
    network("mac", driver="macvlan"),
    network("host", driver="host"),
)


WATCH_ALL = BuildOptions()


def build(
    *containers: ContainerFacts,
    options: BuildOptions = WATCH_ALL,
    stopping: Mapping[str, StopMark] | None = None,
) -> Topology:
    return build_topology(state(*containers, networks=NETWORKS), options, stopping)


def members(topology: Topology) -> dict[str, list[str]]:
    """service -> "container@network" of every backend, live or not."""
    return {s.name: [f"{b.container}@{b.network}" for b in s.backends] for s in topology.services}


def reasons(topology: Topology) -> list[tuple[str, str | None, str]]:
    return [(e.container, e.service, e.reason) for e in topology.excluded]


def t(minute: int) -> str:
    """A Created timestamp as observe gives it (nine fraction digits), `minute` minutes in."""
    return f"2024-05-01T10:{minute:02d}:00.000000001Z"


def mark(*sent: int) -> StopMark:
    return StopMark(frozenset(sent), 1.0)


# ---------------------------------------------------------------- membership


@pytest.mark.parametrize(
    ("containers", "expected"),
    [
        ([container("w1")], {"web": ["w1@app"]}),
        ([container("w1", aliases=("Web",))], {"web": ["w1@app"]}),
        ([container("w1", aliases=("web", "api"))], {"api": ["w1@app"], "web": ["w1@app"]}),
        ([container("w1", aliases=())], {}),
        ([container("w1", aliases=("w1",))], {}),
        ([container("w1", aliases=("w1", "web"))], {"web": ["w1@app"]}),
        ([container("w1", aliases=(container("w1").id,))], {}),
        ([container("db-1", aliases=("db",), id="db" + "0" * 62)], {"db": ["db-1@app"]}),
        (
            [container("w1", aliases=(container("w1").id[:8],))],
            {container("w1").id[:8]: ["w1@app"]},
        ),
        ([container("a1", aliases=(), labels={L.SERVICE: "api"})], {"api": ["a1@app"]}),
        ([container("a1", labels={L.SERVICE: "api"})], {"api": ["a1@app"], "web": ["a1@app"]}),
        ([container("w1", labels={L.SERVICE: "Web"})], {"web": ["w1@app"]}),
        ([container("w1", network="bridge")], {}),
        ([container("w1", network="ov")], {}),
        ([container("w1", network="mac")], {}),
        ([container("w1", network="unknown-net")], {}),
        ([container("w1", ip="")], {}),
        ([container("w1", ip="", ipv6="fd00::2")], {"web": ["w1@app"]}),
        ([container("w1"), container("w2", ip="172.20.0.3")], {"web": ["w1@app", "w2@app"]}),
        (
            [container("w1", more_networks={"back": "172.21.0.2"})],
            {"web": ["w1@app", "w1@back"]},
        ),
        (
            [container("w1", more_networks={"bridge": "172.17.0.2", "ov": "10.0.0.2"})],
            {"web": ["w1@app"]},
        ),
    ],
    ids=[
        "network-alias",
        "alias-lowered",
        "two-aliases-two-services",
        "only-short-id-alias",
        "container-name-alias-ignored",
        "name-alias-ignored-other-kept",
        "full-id-alias-ignored",
        "hex-alias-prefixing-the-id-is-a-service",
        "id-prefix-other-than-12-digits-is-a-service",
        "service-label-without-alias",
        "service-label-plus-alias",
        "label-and-alias-same-service-once",
        "default-bridge-not-watched",
        "overlay-not-watched",
        "macvlan-not-watched",
        "network-not-listed",
        "no-ip",
        "ipv6-only",
        "two-replicas",
        "two-watched-networks-two-backends",
        "unwatched-networks-skipped",
    ],
)
def test_membership(containers: list[ContainerFacts], expected: dict[str, list[str]]) -> None:
    topology = build(*containers)
    assert members(topology) == expected
    assert topology.excluded == ()
    assert topology.warnings == ()


def test_backend_carries_the_endpoint_and_labels() -> None:
    c = container(
        "w1",
        ip="172.20.0.9",
        ipv6="fd00::9",
        created=t(5),
        labels={
            L.WEIGHT: "4",
            L.MAX_FAILS: "2",
            L.FAIL_TIMEOUT: "10s",
            L.MAX_CONNS: "50",
            L.PORT: "8080",
        },
    )
    (backend,) = build(c).services[0].backends
    assert (backend.container_id, backend.container, backend.network) == (c.id, "w1", "app")
    assert (backend.ip, backend.ipv6, backend.port, backend.created) == (
        "172.20.0.9",
        "fd00::9",
        8080,
        t(5),
    )
    assert (backend.weight, backend.max_fails, backend.fail_timeout, backend.max_conns) == (
        4,
        2,
        "10s",
        50,
    )
    assert (backend.state, backend.backup) == (BackendState.UP, False)


@pytest.mark.parametrize(
    ("containers", "services"),
    [
        ([container("w1")], ("web",)),
        ([container("w1"), container("w2", status="exited")], ("web",)),
        ([container("w1", status="exited")], ()),
        ([container("w1", status="created")], ()),
        ([container("w1", status="restarting")], ()),
        ([container("w1", status="dead")], ()),
        ([container("w1", status="removing")], ()),
        ([container("w1", status="exited", labels={L.PORT: "nope"})], ()),
    ],
    ids=[
        "running",
        "exited-sibling-ignored",
        "exited",
        "created",
        "restarting",
        "dead",
        "removing",
        "exited-with-bad-label-not-reported",
    ],
)
def test_only_running_and_paused_containers_count(
    containers: list[ContainerFacts], services: tuple[str, ...]
) -> None:
    topology = build(*containers)
    assert tuple(s.name for s in topology.services) == services
    assert topology.excluded == ()


# ---------------------------------------------------------------- watched networks


@pytest.mark.parametrize(
    ("watch", "expected", "warnings"),
    [
        (None, {"web": ["w1@app", "w1@back"]}, []),
        ({"app"}, {"web": ["w1@app"]}, []),
        ({"app", "back"}, {"web": ["w1@app", "w1@back"]}, []),
        ({"gone"}, {}, ["network 'gone' does not exist (yet)"]),
        ({"ov"}, {"web": ["w1@ov"]}, []),
        ({"bridge"}, {}, ["network 'bridge' has driver bridge, neither a user-defined bridge"]),
        (
            {"app", "gone", "mac"},
            {"web": ["w1@app"]},
            ["network 'gone' does not exist", "network 'mac' has driver macvlan"],
        ),
        (set(), {}, []),
    ],
    ids=[
        "all-user-bridges",
        "one",
        "both",
        "missing",
        "overlay",
        "default-bridge",
        "mixed-sorted-warnings",
        "empty-set-watches-nothing",
    ],
)
def test_build_options_networks(
    watch: set[str] | None, expected: dict[str, list[str]], warnings: list[str]
) -> None:
    c = container("w1", more_networks={"back": "172.21.0.2", "ov": "10.0.0.2"})
    options = BuildOptions(networks=None if watch is None else frozenset(watch))
    topology = build(c, options=options)
    assert members(topology) == expected
    assert len(topology.warnings) == len(warnings)
    for warning, start in zip(topology.warnings, warnings, strict=True):
        assert warning.startswith(start)


# ---------------------------------------------------------------- port


@pytest.mark.parametrize(
    ("labels", "exposed", "port"),
    [
        ({}, (), 80),
        ({}, (8080,), 8080),
        ({L.PORT: "9000"}, (), 9000),
        ({L.PORT: "9000"}, (8080,), 9000),
        ({L.PORT: "9000"}, (8080, 8443), 9000),
    ],
    ids=["default-80", "single-exposed", "label", "label-beats-exposed", "label-settles-several"],
)
def test_port(labels: dict[str, str], exposed: tuple[int, ...], port: int) -> None:
    (backend,) = build(container("w1", labels=labels, exposed=exposed)).services[0].backends
    assert backend.port == port


def test_several_exposed_ports_exclude_the_container() -> None:
    topology = build(container("w1", exposed=(8080, 8443)), container("w2", ip="172.20.0.3"))
    assert members(topology) == {"web": ["w2@app"]}
    ((name, service, reason),) = reasons(topology)
    assert (name, service) == ("w1", "web")
    assert "8080, 8443" in reason
    assert L.PORT in reason


# ---------------------------------------------------------------- bad input stays local


@pytest.mark.parametrize(
    ("labels", "named"),
    [
        ({L.PORT: "http"}, [L.PORT]),
        ({L.WEIGHT: "0"}, [L.WEIGHT]),
        ({L.FAIL_TIMEOUT: "100ms"}, [L.FAIL_TIMEOUT]),
        ({L.SERVICE: "bad name"}, [L.SERVICE]),
        ({L.HOSTS: "a..b"}, [L.HOSTS]),
        ({L.ALGORITHM: "fair"}, [L.ALGORITHM]),
        ({L.HASH_KEY: "$uri; deny all"}, [L.HASH_KEY]),
        ({L.ENABLE: "perhaps"}, [L.ENABLE]),
        ({L.PORT: "0", L.ALGORITHM: "x"}, [L.PORT, L.ALGORITHM]),
        ({L.WEIGHT: "-1", L.BACKUP: "maybe"}, [L.WEIGHT, L.BACKUP]),
    ],
    ids=[
        "port",
        "weight",
        "fail-timeout",
        "service",
        "hosts",
        "algorithm",
        "hash-key-injection",
        "enable",
        "backend-and-service-errors-together",
        "two-backend-labels",
    ],
)
def test_bad_label_excludes_only_that_container(labels: dict[str, str], named: list[str]) -> None:
    bad = container("bad", ip="172.20.0.9", labels=labels)
    topology = build(container("w1"), bad, container("w2", ip="172.20.0.3"))
    assert members(topology) == {"web": ["w1@app", "w2@app"]}
    ((name, service, reason),) = reasons(topology)
    assert (name, service) == ("bad", "web")  # shown under the service it would join
    for label in named:
        assert label in reason


def test_exclusion_names_bad_backend_and_service_labels_together() -> None:
    topology = build(container("w1", labels={L.PORT: "0", L.WEIGHT: "x", L.HOSTS: "a..b"}))
    ((_, _, reason),) = reasons(topology)
    backend_errors, service_errors = reason.rsplit("; ", 1)
    assert L.PORT in backend_errors and L.WEIGHT in backend_errors
    assert L.HOSTS in service_errors


def test_invalid_alias_excludes_that_alias_only() -> None:
    c = container("w1", aliases=("web", "bad alias", "-x"))
    topology = build(c)
    assert members(topology) == {"web": ["w1@app"]}
    assert [(e.container, e.service) for e in topology.excluded] == [
        ("w1", "bad alias"),
        ("w1", "-x"),
    ]
    assert all("network alias" in e.reason for e in topology.excluded)


def test_invalid_alias_reported_once_per_container_even_on_two_networks() -> None:
    c = container("w1", aliases=("bad alias",), more_networks={"back": "172.21.0.2"})
    assert [(e.container, e.service) for e in build(c).excluded] == [("w1", "bad alias")]


@pytest.mark.parametrize("value", ["false", "0", "no", "off"])
def test_enable_false_excludes(value: str) -> None:
    topology = build(container("w1", labels={L.ENABLE: value}))
    assert members(topology) == {}
    assert reasons(topology) == [("w1", "web", f"opted out with {L.ENABLE}=false")]


def test_container_outside_any_service_is_silent_even_with_bad_labels() -> None:
    topology = build(container("other", aliases=(), labels={L.PORT: "bad"}))
    assert (topology.services, topology.excluded, topology.warnings) == ((), (), ())


NO_WATCHED = f"has {L.SERVICE} but is on no watched network"


@pytest.mark.parametrize(
    ("c", "watch", "reason"),
    [
        (
            container("a1", aliases=(), network="bridge", labels={L.SERVICE: "api"}),
            None,
            f"{NO_WATCHED} (it is on bridge)",
        ),
        (
            container(
                "a1", network="ov", more_networks={"mac": "1.2.3.4"}, labels={L.SERVICE: "api"}
            ),
            None,
            f"{NO_WATCHED} (it is on mac, ov)",
        ),
        (
            replace(container("a1", labels={L.SERVICE: "api"}), endpoints=()),
            None,
            f"{NO_WATCHED} (it is on no network)",
        ),
        (container("a1", network="app", labels={L.SERVICE: "api"}), frozenset({"back"}), None),
        (
            container("a1", network="bridge", labels={L.SERVICE: "bad name"}),
            None,
            f"{NO_WATCHED} (it is on bridge)",
        ),
        (container("a1", network="bridge"), None, None),
        (container("a1", aliases=("api", "bad alias"), network="ov"), None, None),
        (container("a1", network="bridge", labels={L.SERVICE: "api"}, status="exited"), None, None),
    ],
    ids=[
        "service-label-on-default-bridge",
        "service-label-on-overlay-and-macvlan",
        "service-label-on-no-network-at-all",
        "with-network-a-container-elsewhere-is-another-controllers",
        "invalid-service-label-still-reported-as-unreachable",
        "aliases-only-stays-silent",
        "bad-alias-on-unwatched-network-stays-silent",
        "not-running-stays-silent",
    ],
)
def test_service_label_on_no_watched_network_is_reported(
    c: ContainerFacts, watch: frozenset[str] | None, reason: str | None
) -> None:
    """Asking for a service by label and getting nothing is reported; a network alias is not
    a request to controlplane (every Compose service has one), so it stays silent."""
    topology = build(c, options=BuildOptions(networks=watch))
    assert topology.services == ()
    expected = [] if reason is None else [("a1", None, reason)]
    assert reasons(topology) == expected


# ---------------------------------------------------------------- backend state


@pytest.mark.parametrize(
    ("kwargs", "mark", "expected"),
    [
        ({}, None, BackendState.UP),
        ({"health": "healthy"}, None, BackendState.UP),
        ({"status": "paused"}, None, BackendState.PAUSED),
        ({"health": "unhealthy"}, None, BackendState.UNHEALTHY),
        ({"health": "starting"}, None, BackendState.STARTING),
        ({}, mark(15), BackendState.STOPPING),
        ({}, mark(9), BackendState.STOPPING),
        ({}, mark(1), BackendState.UP),
        ({"stop_signal": "SIGHUP"}, mark(1), BackendState.STOPPING),
        ({"stop_signal": "SIGWINCH"}, mark(signal.SIGWINCH.value), BackendState.STOPPING),
        ({"status": "paused", "health": "unhealthy"}, None, BackendState.PAUSED),
        ({"health": "unhealthy"}, mark(15), BackendState.STOPPING),
        ({}, mark(1, 15), BackendState.STOPPING),
        (
            {"stop_signal": "SIGRTMIN+3"},
            mark(int(signal.SIGRTMIN) + 3),
            BackendState.STOPPING,
        ),
        ({}, mark(int(signal.SIGRTMIN) + 3), BackendState.UP),
    ],
    ids=[
        "up",
        "healthy",
        "paused",
        "unhealthy",
        "health-starting",
        "stopping-term",
        "stopping-kill",
        "hup-reload-not-stopping",
        "hup-stop-signal",
        "winch-stop-signal",
        "paused-before-unhealthy",
        "stopping-first",
        "term-then-hup-still-stopping",
        "realtime-stop-signal",
        "realtime-signal-not-the-stop-signal",
    ],
)
def test_backend_state(
    kwargs: dict[str, Any], mark: StopMark | None, expected: BackendState
) -> None:
    c = container("w1", **kwargs)
    stopping = {c.id: mark} if mark else {}
    (service,) = build(c, stopping=stopping).services
    assert [b.state for b in service.backends] == [expected]
    live = expected is BackendState.UP
    assert [b.container for b in service.live_backends] == (["w1"] if live else [])


def test_stop_mark_of_another_container_is_ignored() -> None:
    c = container("w1")
    (service,) = build(c, stopping={"f" * 64: mark(15)}).services
    assert service.backends[0].state is BackendState.UP


# ---------------------------------------------------------------- managed nginx


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (nginx(), [("proxy", DEFAULT_CONFIG_PATH, ("app",))]),
        (
            nginx(config_path="/etc/nginx/conf.d/lb.conf"),
            [("proxy", "/etc/nginx/conf.d/lb.conf", ("app",))],
        ),
        (
            nginx(more_networks={"bridge": "172.17.0.5", "back": "172.21.0.5"}),
            [("proxy", DEFAULT_CONFIG_PATH, ("app", "back", "bridge"))],
        ),
        (nginx(status="exited"), []),
        (nginx(network="bridge"), []),
        (nginx(network="ov"), [("proxy", DEFAULT_CONFIG_PATH, ("ov",))]),
        (nginx(network="bridge", status="paused", config_path="bad"), []),
    ],
    ids=[
        "default-path",
        "config-path-label",
        "all-its-networks",
        "exited-ignored",
        "only-on-default-bridge-not-ours",
        "on-an-overlay-it-watches-it",
        "not-ours-so-not-even-excluded",
    ],
)
def test_nginx_target(
    target: ContainerFacts, expected: list[tuple[str, str, tuple[str, ...]]]
) -> None:
    topology = build(target)
    assert [(n.container, n.config_path, n.networks) for n in topology.nginx] == expected
    assert topology.services == ()
    assert topology.excluded == ()


def test_nginx_outside_the_watched_networks_is_not_managed() -> None:
    topology = build(nginx(), options=BuildOptions(networks=frozenset({"back"})))
    assert (topology.nginx, topology.excluded) == ((), ())


def test_nginx_target_fields() -> None:
    target = nginx()
    assert build(target).nginx == (
        NginxTarget(
            container_id=target.id,
            container="proxy",
            config_path=DEFAULT_CONFIG_PATH,
            started_at=target.started_at,
            networks=("app",),
        ),
    )


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (nginx(config_path="conf.d/x.conf"), L.CONFIG_PATH),
        (nginx(config_path="/etc/nginx/../passwd.conf"), L.CONFIG_PATH),
        (nginx(config_path="/etc/nginx/x.conf\nuser root;"), L.CONFIG_PATH),
        (nginx(config_path="/etc/nginx/nginx.conf"), "main config"),
        (nginx(status="paused"), "paused"),
    ],
    ids=["relative", "dotdot", "newline", "main-nginx-conf", "paused"],
)
def test_nginx_target_excluded(target: ContainerFacts, reason: str) -> None:
    topology = build(target, container("w1"))
    assert topology.nginx == ()
    assert members(topology) == {"web": ["w1@app"]}
    ((name, service, text),) = reasons(topology)
    assert (name, service) == ("proxy", None)
    assert reason in text
    assert "\n" not in text


def test_nginx_with_an_alias_is_not_a_backend() -> None:
    target = container("proxy", aliases=("web",), labels={L.ROLE: "nginx", L.PORT: "x"})
    topology = build(target)
    assert [n.container for n in topology.nginx] == ["proxy"]
    assert topology.services == ()
    assert topology.excluded == ()


# ---------------------------------------------------------------- service-wide settings


@pytest.mark.parametrize(
    ("labels", "algorithm", "source"),
    [
        ({}, Algorithm(), "default"),
        ({L.ALGORITHM: "least_conn"}, Algorithm(Method.LEAST_CONN), "label"),
        ({L.ALGORITHM: "ip_hash"}, Algorithm(Method.IP_HASH), "label"),
        ({L.ALGORITHM: "random"}, Algorithm(Method.RANDOM), "label"),
        (
            {L.ALGORITHM: "random", L.RANDOM_TWO: "true"},
            Algorithm(Method.RANDOM, two=True),
            "label",
        ),
        (
            {L.ALGORITHM: "hash", L.HASH_KEY: "$request_uri"},
            Algorithm(Method.HASH, key="$request_uri"),
            "label",
        ),
        (
            {L.ALGORITHM: "hash", L.HASH_KEY: "$cookie_id", L.HASH_CONSISTENT: "yes"},
            Algorithm(Method.HASH, key="$cookie_id", consistent=True),
            "label",
        ),
        (
            {
                L.ALGORITHM: "least_conn",
                L.HASH_KEY: "$uri",
                L.HASH_CONSISTENT: "1",
                L.RANDOM_TWO: "1",
            },
            Algorithm(Method.LEAST_CONN),
            "label",
        ),
        ({L.HASH_KEY: "$uri"}, Algorithm(), "default"),
    ],
    ids=[
        "default-round-robin",
        "least-conn",
        "ip-hash",
        "random",
        "random-two",
        "hash",
        "hash-consistent",
        "unrelated-settings-dropped",
        "key-without-method",
    ],
)
def test_algorithm(labels: dict[str, str], algorithm: Algorithm, source: str) -> None:
    (service,) = build(container("w1", labels=labels)).services
    assert (service.algorithm, service.algorithm_source, service.warnings) == (
        algorithm,
        source,
        (),
    )


@pytest.mark.parametrize(
    "labels",
    [{L.ALGORITHM: "hash"}, {L.ALGORITHM: "hash", L.HASH_CONSISTENT: "true"}],
    ids=["hash", "hash-consistent"],
)
def test_hash_without_key_warns_and_falls_back_to_round_robin(labels: dict[str, str]) -> None:
    (service,) = build(container("w1", labels=labels)).services
    assert (service.algorithm, service.algorithm_source) == (Algorithm(), "default")
    (warning,) = service.warnings
    assert L.HASH_KEY in warning
    assert "round_robin" in warning


def test_oldest_container_wins_and_the_conflict_names_both() -> None:
    """Created decides, not the listing order or the name."""
    old = container("z-old", created=t(1), labels={L.ALGORITHM: "least_conn", L.HOSTS: "a.com"})
    new = container("a-new", ip="172.20.0.3", created=t(2), labels={L.ALGORITHM: "ip_hash"})
    silent = container("m-silent", ip="172.20.0.4", created=t(0))
    (service,) = build(new, silent, old).services
    assert service.algorithm == Algorithm(Method.LEAST_CONN)
    assert service.hosts == ("a.com",)
    assert [b.container for b in service.backends] == ["m-silent", "z-old", "a-new"]
    assert service.warnings == (
        f"{L.ALGORITHM}: a-new says ip_hash but z-old (older) says least_conn; using least_conn",
    )


def test_agreeing_containers_do_not_warn() -> None:
    labels = {L.ALGORITHM: "LEAST_CONN", L.HOSTS: "b.com,a.com"}
    a = container("a", created=t(1), labels=labels)
    b = container("b", ip="172.20.0.3", created=t(2), labels={L.ALGORITHM: "least_conn"})
    (service,) = build(a, b).services
    assert service.warnings == ()


def test_one_container_on_two_networks_does_not_conflict_with_itself() -> None:
    c = container("w1", labels={L.ALGORITHM: "ip_hash"}, more_networks={"back": "172.21.0.2"})
    (service,) = build(c).services
    assert service.warnings == ()
    assert service.networks == ("app", "back")


def test_conflict_on_hosts_is_reported_once() -> None:
    a = container("a", created=t(1), labels={L.HOSTS: "a.com"})
    b = container("b", ip="172.20.0.3", created=t(2), labels={L.HOSTS: "b.com,c.com"})
    c = container("c", ip="172.20.0.4", created=t(3), labels={L.HOSTS: "b.com,c.com"})
    (service,) = build(a, b, c).services
    assert service.warnings == (
        f"{L.HOSTS}: b says b.com,c.com but a (older) says a.com; using a.com",
        f"{L.HOSTS}: c says b.com,c.com but a (older) says a.com; using a.com",
    )


@pytest.mark.parametrize(
    ("older", "younger"),
    [
        ("2024-05-01T10:00:00.1Z", "2024-05-01T10:00:00.12Z"),
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00.000000001Z"),
        ("2024-05-01T10:00:00.9Z", "2024-05-01T10:00:01Z"),
    ],
    ids=["trimmed-zeros", "no-fraction", "next-second"],
)
def test_oldest_wins_within_the_same_second(older: str, younger: str) -> None:
    """Docker trims trailing zeros of the nanoseconds (RFC3339Nano); observe pads them back,
    so the builder's text order is the time order."""
    old = container("b", created=canonical_time(older), labels={L.ALGORITHM: "least_conn"})
    young = container(
        "a", ip="172.20.0.3", created=canonical_time(younger), labels={L.ALGORITHM: "ip_hash"}
    )
    (service,) = build(young, old).services
    assert service.algorithm.method is Method.LEAST_CONN
    assert [b.container for b in service.backends] == ["b", "a"]


# ---------------------------------------------------------------- backup


@pytest.mark.parametrize(
    ("method", "kept"),
    [
        ({}, True),
        ({L.ALGORITHM: "least_conn"}, True),
        ({L.ALGORITHM: "hash"}, True),
        ({L.ALGORITHM: "hash", L.HASH_KEY: "$uri"}, False),
        ({L.ALGORITHM: "ip_hash"}, False),
        ({L.ALGORITHM: "random"}, False),
        ({L.ALGORITHM: "random", L.RANDOM_TWO: "true"}, False),
    ],
    ids=[
        "round-robin",
        "least-conn",
        "hash-without-key-falls-back",
        "hash",
        "ip-hash",
        "random",
        "random-two",
    ],
)
def test_backup_with_a_method_nginx_refuses(method: dict[str, str], kept: bool) -> None:
    primary = container("p", created=t(1), labels=method)
    backup = container(
        "b",
        ip="172.20.0.3",
        created=t(2),
        labels={L.BACKUP: "true"},
        more_networks={"back": "1.2.3.4"},
    )
    topology = build(primary, backup)
    (service,) = topology.services
    if kept:
        assert [(b.container, b.backup) for b in service.backends] == [
            ("p", False),
            ("b", True),
            ("b", True),
        ]
        assert topology.excluded == ()
    else:
        assert [b.container for b in service.backends] == ["p"]
        # One exclusion, though the backup sits on two networks.
        ((name, svc, reason),) = reasons(topology)
        assert (name, svc) == ("b", "web")
        assert L.BACKUP in reason and service.algorithm.method.value in reason


@pytest.mark.parametrize(
    ("others", "warns"),
    [
        ([], True),
        ([container("p", ip="172.20.0.3")], False),
        ([container("p", ip="172.20.0.3", health="unhealthy")], True),
        ([container("b2", ip="172.20.0.3", labels={L.BACKUP: "1"})], True),
    ],
    ids=["only-backup", "with-primary", "primary-not-live", "two-backups"],
)
def test_all_live_backends_backup_warns(others: list[ContainerFacts], warns: bool) -> None:
    backup = container("b", labels={L.BACKUP: "true"})
    (service,) = build(backup, *others).services
    assert any("every live backend" in w for w in service.warnings) is warns


# ---------------------------------------------------------------- hosts


def test_host_claimed_by_two_services_goes_to_the_first_by_name() -> None:
    a = container("a1", aliases=("alpha",), labels={L.HOSTS: "shop.com,a.com"})
    b = container("b1", aliases=("beta",), ip="172.20.0.3", labels={L.HOSTS: "shop.com,b.com"})
    topology = build(b, a)
    assert {s.name: s.hosts for s in topology.services} == {
        "alpha": ("shop.com", "a.com"),
        "beta": ("b.com",),
    }
    assert topology.warnings == (
        "host shop.com of service beta already routes to service alpha: ignored for beta",
    )


def test_host_naming_another_service_stays_with_that_service() -> None:
    a = container("a1", aliases=("alpha",), labels={L.HOSTS: "beta,alpha,x.com"})
    b = container("b1", aliases=("beta",), ip="172.20.0.3")
    topology = build(a, b)
    assert {s.name: s.hosts for s in topology.services} == {"alpha": ("alpha", "x.com"), "beta": ()}
    assert topology.warnings == (
        "host beta of service alpha already routes to service beta: ignored for alpha",
    )


@pytest.mark.parametrize(
    ("hosts", "domain", "kept", "taken_from_alpha"),
    [
        ("beta.internal,x.com", "internal", ("x.com",), ["beta.internal"]),
        ("beta.svc.local", "svc.local", (), ["beta.svc.local"]),
        ("beta.internal", "svc.local", ("beta.internal",), []),
        ("alpha.internal,alpha", "internal", ("alpha.internal", "alpha"), []),
        ("beta,beta.internal", "internal", (), ["beta", "beta.internal"]),
    ],
    ids=[
        "name-dot-domain-stays-with-its-service",
        "custom-domain",
        "other-domain-is-just-a-host",
        "own-names-kept",
        "bare-name-and-name-dot-domain",
    ],
)
def test_every_service_owns_name_and_name_dot_domain(
    hosts: str, domain: str, kept: tuple[str, ...], taken_from_alpha: list[str]
) -> None:
    """alpha sorts first, so without the reservation its label would win beta's names."""
    a = container("a1", aliases=("alpha",), labels={L.HOSTS: hosts})
    b = container("b1", aliases=("beta",), ip="172.20.0.3")
    topology = build(a, b, options=BuildOptions(domain=domain))
    assert {s.name: s.hosts for s in topology.services} == {"alpha": kept, "beta": ()}
    assert topology.warnings == tuple(
        f"host {host} of service alpha already routes to service beta: ignored for alpha"
        for host in taken_from_alpha
    )


def test_build_options_default_domain_is_internal() -> None:
    assert BuildOptions().domain == "internal"


# ---------------------------------------------------------------- label typos


@pytest.mark.parametrize(
    ("c", "warnings"),
    [
        (
            container("w1", labels={"controlplane.wieght": "3"}),
            ["container w1: unknown label 'controlplane.wieght' is ignored (a typo?)"],
        ),
        (
            container("w1", labels={"controlplane.b": "1", "controlplane.a": "1"}),
            [
                "container w1: unknown label 'controlplane.a' is ignored (a typo?)",
                "container w1: unknown label 'controlplane.b' is ignored (a typo?)",
            ],
        ),
        (
            container("w1", aliases=(), labels={"controlplane.servce": "api"}),
            ["container w1: unknown label 'controlplane.servce' is ignored (a typo?)"],
        ),
        (
            container("p1", aliases=(), labels={L.ROLE: "proxy"}),
            [f"container p1: {L.ROLE}='proxy' is ignored (the only role is nginx)"],
        ),
        (
            container("p1", aliases=(), labels={L.ROLE: "Nginx"}),
            [f"container p1: {L.ROLE}='Nginx' is ignored (the only role is nginx)"],
        ),
        (
            container("w1", labels={"controlplane.x\n}": "1"}),
            ["container w1: unknown label 'controlplane.x\\n}' is ignored (a typo?)"],
        ),
        (
            container(
                "w1",
                labels={label: "" for label in L.KNOWN_LABELS if label not in (L.ROLE, L.ENDPOINT)},
            ),
            [],
        ),
        (
            container("w1", labels={L.ENDPOINT: "vip"}),
            [f"container w1: {L.ENDPOINT} is ignored (it is for Swarm services)"],
        ),
        (container("w1", labels={"com.example.controlplane.x": "1", "controlplanex": "1"}), []),
        (container("w1", labels={"controlplane.wieght": "3"}, status="exited"), []),
    ],
    ids=[
        "misspelt-label",
        "several-sorted",
        "misspelt-service-label-alone",
        "unknown-role",
        "role-is-case-sensitive",
        "label-name-shown-escaped",
        "every-known-label-is-quiet",
        "endpoint-is-for-swarm-services",
        "other-prefixes-are-not-ours",
        "stopped-container-not-checked",
    ],
)
def test_unknown_controlplane_labels_and_roles_warn(c: ContainerFacts, warnings: list[str]) -> None:
    assert list(build(c).warnings) == warnings


def test_label_typo_of_a_managed_nginx_warns() -> None:
    proxy = replace(nginx(), labels={L.ROLE: "nginx", "controlplane.config-path": "/x.conf"})
    topology = build(proxy)
    assert [n.container for n in topology.nginx] == ["proxy"]
    assert topology.warnings == (
        "container proxy: unknown label 'controlplane.config-path' is ignored (a typo?)",
    )


# ---------------------------------------------------------------- reachability


def unreachable(container: str, networks: str) -> str:
    return (
        f"{container} is on no network a managed nginx is on ({networks}): nginx can't reach "
        "it, so it gets no traffic; connect the nginx to one of them"
    )


@pytest.mark.parametrize(
    ("proxies", "backends", "warnings"),
    [
        ([nginx()], [container("w1")], []),
        ([nginx()], [container("w1", network="back")], [unreachable("w1", "back")]),
        ([nginx()], [container("w1", network="back", more_networks={"app": "1.2.3.4"})], []),
        ([nginx(network="back")], [container("w1")], [unreachable("w1", "app")]),
        ([nginx(), nginx("p2", network="back", ip="172.21.0.100")], [container("w1")], []),
        ([], [container("w1", network="back")], []),
        ([nginx(config_path="bad")], [container("w1", network="back")], []),
        (
            [nginx()],
            [
                container("w1", network="back"),
                container("w2", network="back", ip="172.21.0.3", health="unhealthy"),
            ],
            [unreachable("w1", "back"), unreachable("w2", "back")],
        ),
        (
            [nginx(network="bridge", more_networks={"app": "172.20.0.100"})],
            [container("w1", network="back", more_networks={"bridge": "172.17.0.3"})],
            [unreachable("w1", "back")],
        ),
    ],
    ids=[
        "shared-network",
        "only-on-another-network",
        "one-shared-network-is-enough",
        "nginx-elsewhere",
        "any-managed-nginx-counts",
        "no-managed-nginx-no-warning",
        "excluded-nginx-is-not-managed",
        "one-warning-per-container-live-or-not",
        "unwatched-shared-network-does-not-count",
    ],
)
def test_backend_no_managed_nginx_can_reach_is_warned(
    proxies: list[ContainerFacts], backends: list[ContainerFacts], warnings: list[str]
) -> None:
    topology = build(*proxies, *backends)
    (service,) = topology.services
    assert list(service.warnings) == warnings
    assert topology.warnings == ()


# ---------------------------------------------------------------- determinism


def rich_state_containers() -> list[ContainerFacts]:
    return [
        nginx(more_networks={"back": "172.21.0.100"}),
        container("w1", created=t(1), labels={L.ALGORITHM: "least_conn", L.HOSTS: "x.com"}),
        container("w2", ip="172.20.0.3", created=t(2), labels={L.ALGORITHM: "ip_hash"}),
        container("w3", ip="172.20.0.4", created=t(2), labels={L.BACKUP: "true"}),
        container("w4", ip="172.20.0.5", created=t(3), health="unhealthy"),
        container("a1", aliases=("api", "bad alias"), ip="172.20.0.6", created=t(1)),
        container("a2", aliases=("api",), ip="172.20.0.7", more_networks={"back": "172.21.0.7"}),
        container("c1", aliases=("cache",), ip="172.20.0.8", labels={L.HOSTS: "x.com"}),
        container("bad", ip="172.20.0.9", labels={L.PORT: "0", L.WEIGHT: "x"}),
        container("gone", status="exited"),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_same_input_in_any_order_gives_the_same_topology(seed: int) -> None:
    containers = rich_state_containers()
    marks = {c.id: mark(15) for c in containers if c.name == "w2"}
    expected = build(*containers, stopping=marks)
    random.Random(seed).shuffle(containers)
    assert build(*containers, stopping=marks) == expected


def test_rich_state_summary() -> None:
    topology = build(*rich_state_containers())
    assert members(topology) == {
        "api": ["a2@app", "a2@back", "a1@app"],
        "cache": ["c1@app"],
        "web": ["w1@app", "w2@app", "w3@app", "w4@app"],
    }
    # In Created order, like everything else the builder reports.
    assert [(e.container, e.service) for e in topology.excluded] == [
        ("bad", "web"),
        ("a1", "bad alias"),
    ]
    assert topology.warnings == (
        "host x.com of service web already routes to service cache: ignored for web",
    )


# ---------------------------------------------------------------- the memo


def churned(containers: list[ContainerFacts], rng: random.Random, step: int) -> None:
    """One change as Docker could make it: a container gone, back with a new ID, relabelled,
    unhealthy, or paused."""
    i = rng.randrange(len(containers))
    c = containers[i]
    change = rng.randrange(5)
    if change == 0 and len(containers) > 2:
        del containers[i]
    elif change == 1:
        containers[i] = replace(c, id=f"{step:064x}", started_at=t(step % 60))
    elif change == 2:
        containers[i] = replace(c, labels={**c.labels, L.WEIGHT: str(1 + step % 5)})
    elif change == 3:
        containers[i] = replace(c, health="unhealthy" if c.health is None else None)
    else:
        containers[i] = replace(c, status="paused" if c.status == "running" else "running")


@pytest.mark.parametrize("seed", range(5))
def test_a_memo_never_changes_the_answer(seed: int) -> None:
    rng = random.Random(seed)
    containers = rich_state_containers()
    memo = BuildMemo()
    for step in range(40):
        marks = {c.id: mark(15) for c in containers if rng.random() < 0.1}
        docker = state(*containers, networks=NETWORKS)
        assert build_topology(docker, WATCH_ALL, marks, memo=memo) == build_topology(
            docker, WATCH_ALL, marks
        )
        churned(containers, rng, step)


def test_the_memo_holds_what_is_running_not_what_ran() -> None:
    memo = BuildMemo()
    for generation in range(50):
        replicas = [
            container(f"w{generation}-{i}", ip=f"172.20.{generation}.{i}", created=t(i))
            for i in range(3)
        ]
        build_topology(state(nginx(), *replicas, networks=NETWORKS), memo=memo)
    assert len(memo) == 3 + 1  # three containers (the nginx is not memoised), one service


def test_with_a_memo_an_unchanged_service_is_the_same_object() -> None:
    """RenderCache finds a service's block by identity."""
    web = container("w1", labels={L.ALGORITHM: "least_conn"})
    api = container("a1", aliases=("api",), ip="172.20.0.3")
    memo = BuildMemo()
    before = build_topology(state(web, api), memo=memo)
    after = build_topology(state(web, replace(api, health="unhealthy")), memo=memo)
    assert after.services[1] is before.services[1]
    assert after.services[0] is not before.services[0]
