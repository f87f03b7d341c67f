"""Swarm services -> services: their running tasks' addresses on the watched overlay networks,
with the same label grammar and exclusion reasons as containers."""

from __future__ import annotations

from dataclasses import replace

from builders import container, network, nginx, swarm_service, task
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import labels as L
from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.dns_records import build_zone
from controlplane.core.model import (
    BackendState,
    ContainerFacts,
    DataPlane,
    DockerState,
    Method,
    SwarmServiceFacts,
    Topology,
)
from controlplane.core.render import render_config
from controlplane.templating import load_template

NETWORKS = (
    network("bridge"),
    network("app"),
    network("ov", "overlay"),
    network("other", "overlay"),
)
LB = nginx(network="ov", ip="10.0.1.100")
WATCH_ALL = BuildOptions()


def build(
    *services: SwarmServiceFacts,
    containers: tuple[ContainerFacts, ...] = (LB,),
    options: BuildOptions = WATCH_ALL,
) -> Topology:
    state = DockerState(containers=containers, networks=NETWORKS, swarm_services=services)
    return build_topology(state, options)


def servers(topology: Topology) -> dict[str, list[tuple[str, str, BackendState]]]:
    return {
        s.name: [(b.container, f"{b.ip}@{b.network}", b.state) for b in s.backends]
        for s in topology.services
    }


UP, STOPPING = BackendState.UP, BackendState.STOPPING
W1, W2, W3 = task("web", 1, "10.0.1.3"), task("web", 2, "10.0.1.4"), task("web", 3, "10.0.1.5")


def test_running_tasks_on_the_overlay_of_a_managed_nginx_are_the_backends_not_the_vip() -> None:
    topology = build(swarm_service("web", W1, W2, W3))
    assert servers(topology) == {
        "web": [(t.name, f"{t.addresses[0].ip}@ov", UP) for t in (W1, W2, W3)]
    }
    assert [n.name for n in topology.networks] == ["app", "ov"]
    assert [n.container for n in topology.nginx] == ["proxy"]
    assert topology.services[0].names == ("web", "web.internal")


def test_nginx_and_dns_serve_the_live_tasks_from_the_same_model() -> None:
    leaving = task("web", 2, "10.0.1.4", desired="shutdown")
    topology = build(swarm_service("web", W1, leaving, W3, labels={L.PORT: "8080"}))
    config = render_config(topology, load_template())
    assert "server 10.0.1.3:8080" in config and "server 10.0.1.5:8080" in config
    assert "server 10.0.1.4:8080" not in config
    assert "10.0.1.2" not in config  # the VIP
    zone = build_zone(topology, "internal", 5, 1)
    a = zone.lookup("web.internal", "A")
    srv = zone.lookup("_web._tcp.internal", "SRV")
    assert a is not None and srv is not None
    assert sorted(str(r.value) for r in a) == ["10.0.1.3", "10.0.1.5"]
    assert sorted(r.value.port for r in srv if not isinstance(r.value, str)) == [8080, 8080]


def test_an_overlay_no_managed_nginx_is_on_is_not_watched_unless_named() -> None:
    service = swarm_service("web", task("web", 1, "10.0.2.3", network="other"), networks=("other",))
    assert build(service).services == ()
    named = build(service, options=BuildOptions(networks=frozenset({"other"})))
    assert list(servers(named)) == ["web"]


def test_a_task_desired_shutdown_is_drained_and_one_not_running_yet_is_left_out() -> None:
    leaving = task("web", 2, "10.0.1.4", desired="shutdown")
    coming = task("web", 4, "10.0.1.6", state="starting")
    topology = build(swarm_service("web", W1, leaving, coming))
    assert servers(topology)["web"] == [
        (W1.name, "10.0.1.3@ov", UP),
        (leaving.name, "10.0.1.4@ov", STOPPING),
    ]
    assert [b.ip for b in topology.services[0].live_backends] == ["10.0.1.3"]


def test_labels_of_the_spec_name_port_method_and_weight() -> None:
    labels = {L.SERVICE: "shop", L.PORT: "8080", L.ALGORITHM: "least_conn", L.WEIGHT: "3"}
    topology = build(swarm_service("web", W1, W2, labels=labels))
    [shop] = topology.services
    assert (shop.name, shop.algorithm.method, shop.algorithm_source) == (
        "shop",
        Method.LEAST_CONN,
        "label",
    )
    assert {(b.port, b.weight) for b in shop.backends} == {(8080, 3)}


def test_endpoint_vip_gives_one_server_the_vip() -> None:
    topology = build(swarm_service("web", W1, W2, labels={L.ENDPOINT: "vip"}))
    assert servers(topology) == {"web": [("web", "10.0.1.2@ov", UP)]}


def test_bad_labels_exclude_the_service_with_the_reason() -> None:
    cases = [
        ({L.PORT: "http"}, "web", f"{L.PORT}='http'"),
        ({L.ENABLE: "false"}, "web", f"opted out with {L.ENABLE}=false"),
        ({L.ENDPOINT: "dns"}, None, f"{L.ENDPOINT}='dns' is not an endpoint"),
        ({L.SERVICE: "Bad Name"}, "web", f"{L.SERVICE} 'Bad Name' is not a valid name"),
    ]
    for labels, service, reason in cases:
        topology = build(swarm_service("web", W1, labels=labels))
        assert topology.services == (), labels
        [excluded] = topology.excluded
        assert (excluded.container, excluded.service) == ("web", service), labels
        assert reason in excluded.reason, labels


def test_vip_on_a_dnsrr_service_is_excluded_and_typos_warn() -> None:
    topology = build(
        swarm_service("web", W1, labels={L.ENDPOINT: "vip"}, endpoint_mode="dnsrr"),
        swarm_service("api", task("api", 1, "10.0.1.9"), labels={"controlplane.wieght": "2"}),
    )
    assert [e.reason for e in topology.excluded] == [
        f"{L.ENDPOINT}=vip, but its endpoint mode is dnsrr, which has no virtual IP: drop the "
        "label (its tasks are served) or use --endpoint-mode vip"
    ]
    assert topology.warnings == (
        "swarm service api: unknown label 'controlplane.wieght' is ignored (a typo?)",
    )


def test_a_service_label_off_the_watched_networks_is_told() -> None:
    topology = build(swarm_service("web", W1, labels={L.SERVICE: "web"}, networks=("other",)))
    assert [(e.container, e.reason) for e in topology.excluded] == [
        ("web", f"has {L.SERVICE} but is on no watched network (it is on other)")
    ]


def test_task_containers_are_served_through_their_service_and_join_containers_by_name() -> None:
    swarm_task = container(
        W1.name,
        aliases=(),
        network="ov",
        ip="10.0.1.3",
        labels={"com.docker.swarm.service.id": "x", L.SERVICE: "web"},
    )
    plain = container("web-local", aliases=("web",), network="ov", ip="10.0.1.50")
    topology = build(swarm_service("web", W1), containers=(LB, swarm_task, plain))
    assert {b.container for b in topology.services[0].backends} == {W1.name, "web-local"}
    without_manager = DockerState(containers=(LB, swarm_task), networks=NETWORKS)
    assert [b.container for b in build_topology(without_manager).services[0].backends] == [W1.name]


def _nginx_service(
    *, here: int, elsewhere: int, **labels: str
) -> tuple[SwarmServiceFacts, tuple[ContainerFacts, ...]]:
    """An nginx Swarm service with tasks on this node (node1, with their containers) and on
    another (node2)."""
    containers = tuple(
        container(
            f"lb.{slot}.x",
            aliases=(),
            network="ov",
            ip=f"10.0.1.{100 + slot}",
            labels={"com.docker.swarm.service.id": "lb"},
        )
        for slot in range(1, here + 1)
    )
    tasks = [
        task("lb", slot, f"10.0.1.{100 + slot}", container=c.id)
        for slot, c in enumerate(containers, 1)
    ]
    tasks += [
        task("lb", slot, f"10.0.1.{100 + slot}", node="node2", container="elsewhere")
        for slot in range(here + 1, here + elsewhere + 1)
    ]
    return swarm_service("lb", *tasks, labels={L.ROLE: "nginx", **labels}), containers


def test_an_nginx_service_manages_its_tasks_here_and_lists_those_on_other_nodes() -> None:
    lb, local = _nginx_service(here=1, elsewhere=2, **{L.DATAPLANE: "dynamic"})
    state = DockerState(
        containers=local,
        networks=NETWORKS,
        swarm_services=(lb, swarm_service("web", W1)),
        node_id="node1",
    )
    topology = build_topology(state)
    [target] = topology.nginx
    assert (target.container_id, target.networks) == (local[0].id, ("ov",))
    assert target.dataplane is DataPlane.DYNAMIC  # from the service's labels
    assert servers(topology) == {"web": [(W1.name, "10.0.1.3@ov", UP)]}  # ov is watched
    assert [(r.task, r.node) for r in topology.remote_nginx] == [
        (t.name, "node2") for t in lb.tasks[1:]
    ]
    assert "not on this controller's node node1" in topology.remote_nginx[0].reason
    assert "run a controller there" in topology.remote_nginx[0].reason


def test_an_nginx_task_labelled_on_its_container_is_managed_once_and_stopping_ones_not() -> None:
    lb, local = _nginx_service(here=2, elsewhere=0)
    first, second = local
    first = replace(first, labels={**first.labels, L.ROLE: "nginx"})
    leaving = replace(lb.tasks[1], desired_state="shutdown")
    lb = replace(lb, tasks=(lb.tasks[0], leaving))
    state = DockerState(
        containers=(first, second), networks=NETWORKS, swarm_services=(lb,), node_id="node1"
    )
    topology = build_topology(state)
    assert [t.container_id for t in topology.nginx] == [first.id]
    assert topology.services == () and topology.remote_nginx == ()


def test_without_a_manager_an_nginx_task_is_a_container_like_any() -> None:
    _, local = _nginx_service(here=1, elsewhere=0)
    labelled = replace(local[0], labels={**local[0].labels, L.ROLE: "nginx"})
    state = DockerState(containers=(labelled,), networks=NETWORKS)
    assert [t.container_id for t in build_topology(state).nginx] == [labelled.id]


LABEL_NAMES = sorted(L.KNOWN_LABELS - {L.ROLE, L.CONFIG_PATH})


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*LABEL_NAMES, "controlplane.x"]), st.text(max_size=40), max_size=6
    ),
    st.text(max_size=30),
)
def test_hostile_labels_and_names_give_a_service_or_a_reason(
    labels: dict[str, str], name: str
) -> None:
    topology = build(swarm_service(name, task(name, 1, "10.0.1.3"), labels=labels))
    if topology.services:
        [service] = topology.services
        assert L.NAME_RE.fullmatch(service.name)
        assert all(b.ip == "10.0.1.3" and 1 <= b.port <= 65535 for b in service.backends)
    else:
        assert topology.excluded, labels
        assert all(e.reason and e.container == name for e in topology.excluded)
