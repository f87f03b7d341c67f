"""The dynamic data plane's core (state lines, mode choice) and how the reconciler uses it:
a dynamic nginx gets the state pushed and a config that does not change with its backends."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from controlplane.core import labels as L
from controlplane.core.build import build_topology
from controlplane.core.dataplane import (
    StateCache,
    choose,
    delta_path,
    next_push,
    probe_verdict,
    service_line,
    state_path,
    state_text,
)
from controlplane.core.model import BackendState, DataPlane, Method
from controlplane.core.render import RenderOptions, render_config
from controlplane.reconciler import Reconciler
from controlplane.settings import Settings
from controlplane.templating import load_template
from tests.unit.builders import container, nginx, state
from tests.unit.fakes import FakeDeployer, FakeSource

W1 = container("w1", ip="172.20.0.2", labels={L.WEIGHT: "3", L.FAIL_TIMEOUT: "2m"})
W2 = container("w2", ip="172.20.0.3")


def lines_of(*containers: object) -> dict[str, tuple[str, str, dict[str, object]]]:
    """Service name -> (rev, hosts, json) of each state line."""
    topology = build_topology(state(nginx(), *containers))  # type: ignore[arg-type]
    lines = StateCache().lines(topology.services, frozenset({"app"}))
    parsed = {}
    for line in lines:
        name, rev, hosts, body = line.split("\t")
        parsed[name] = (rev, hosts, json.loads(body))
    return parsed


def test_a_service_line_holds_its_method_and_peers_with_nginx_defaults() -> None:
    rev, _, body = lines_of(W1, W2)["web"]
    assert len(rev) == 16 and body["method"] == "round_robin"
    peers = {p["addr"]: p for p in body["peers"]}  # type: ignore[attr-defined]
    assert peers["172.20.0.2:80"] == {
        "addr": "172.20.0.2:80",
        "host": "172.20.0.2",
        "port": 80,
        "weight": 3,
        "down": False,
        "backup": False,
        "max_fails": 1,
        "fail_timeout": 120,
        "max_conns": 0,
        "container": "w1",
    }


def test_rev_changes_with_the_service_only() -> None:
    other = container("o1", aliases=("other",), ip="172.20.0.9")
    before = lines_of(W1, other)
    after = lines_of(W1, W2, other)
    assert before["other"][0] == after["other"][0]
    assert before["web"][0] != after["web"][0]


def test_a_drained_backend_stays_down_so_hash_rings_keep_the_other_keys() -> None:
    topology = build_topology(state(nginx(), W1, W2))
    web = topology.services[0]
    drained = replace(
        web,
        backends=tuple(
            b._replace(state=BackendState.DRAINING) if b.container == "w2" else b
            for b in web.backends
        ),
    )
    body = json.loads(service_line(drained, frozenset({"app"})).split("\t")[3])
    assert [(p["container"], p["down"]) for p in body["peers"]] == [("w1", False), ("w2", True)]


def test_the_state_file_counts_its_lines_and_sits_beside_the_config() -> None:
    assert (
        state_text(7, ["a\tr\ta\t{}", "b\tr\tb\t{}"]).splitlines()[0] == "controlplane-state 3 7 2"
    )
    assert (
        state_path("/etc/nginx/conf.d/controlplane.conf") == "/etc/nginx/conf.d/controlplane.state"
    )


def line(name: str, rev: str = "r") -> str:
    return f"{name}\t{rev}\t{name}\t{{}}"


BIG = [line(f"s{i:03}") for i in range(100)]


def test_a_start_gets_the_whole_state_then_deltas_over_it() -> None:
    first = next_push(None, 10, BIG)
    assert first is not None and not first.delta and first.text == state_text(10, BIG)
    assert next_push(first.after, 11, BIG) is None, "nothing changed: nothing written"
    changed = [*BIG[:5], line("s005", "x"), *BIG[6:]]
    second = next_push(first.after, 11, changed)
    assert second is not None and second.delta
    assert second.text == f"controlplane-delta 3 10 11 1\n{line('s005', 'x')}\n"
    assert delta_path("/etc/nginx/conf.d/cp.conf") == "/etc/nginx/conf.d/cp.delta"


def test_a_delta_lists_every_service_touched_since_its_base() -> None:
    """Cumulative: the loader needs only the base and the last delta, so a service changed
    back to its base line is still listed (the loader applied the change in between)."""
    first = next_push(None, 10, BIG)
    assert first is not None
    removed_and_added = [line("new"), *BIG[1:5], line("s005", "x"), *BIG[6:]]
    second = next_push(first.after, 11, removed_and_added)
    assert second is not None and second.delta
    assert second.text.splitlines() == [
        "controlplane-delta 3 10 11 3",
        line("new"),
        "s000",
        line("s005", "x"),
    ]
    back = [*BIG[:5], line("new"), *BIG[5:]]
    third = next_push(second.after, 12, back)
    assert third is not None and third.delta
    assert third.text.splitlines() == [
        "controlplane-delta 3 10 12 3",
        line("new"),
        BIG[0],
        BIG[5],
    ]


def test_a_delta_past_a_quarter_of_its_base_is_a_new_base() -> None:
    first = next_push(None, 10, BIG)
    assert first is not None
    most = [line(f"s{i:03}", "x") if i < 30 else BIG[i] for i in range(100)]
    second = next_push(first.after, 11, most)
    assert second is not None and not second.delta and second.after.base == 11
    assert second.after.touched == frozenset()
    small = next_push(None, 1, [line("a")])
    assert small is not None
    again = next_push(small.after, 2, [line("a", "x")])
    assert again is not None and not again.delta, "a tiny state is cheaper written whole"


def test_the_mode_says_why() -> None:
    assert choose(DataPlane.AUTO, "--dataplane auto", True).mode is DataPlane.DYNAMIC
    plain = choose(DataPlane.AUTO, "--dataplane auto", False, 'unknown directive "lua_shared_dict"')
    assert plain.mode is DataPlane.RELOAD and "lua_shared_dict" in plain.why
    assert choose(DataPlane.RELOAD, "its label", True).mode is DataPlane.RELOAD


def test_the_dynamic_config_does_not_change_with_backends_or_services() -> None:
    template = load_template()
    options = RenderOptions(dynamic=True, state_path="/etc/nginx/conf.d/controlplane.state")
    other = container("o1", aliases=("other",), ip="172.20.0.9", labels={L.HOSTS: "a.example"})
    one = render_config(build_topology(state(nginx(), W1)), template, options)
    two = render_config(build_topology(state(nginx(), W1, W2, other)), template, options)
    assert one == two
    assert "172.20.0.2" not in one and "web" not in one and "controlplane.route()" in one
    assert "lua_shared_dict controlplane 4096k;" in one
    assert "lua_shared_dict controlplane_routes 4096k;" in one


def test_a_service_line_names_the_hosts_the_lua_side_routes() -> None:
    other = container("o1", aliases=("other",), ip="172.20.0.9", labels={L.HOSTS: "*.example.com"})
    _, hosts, _ = lines_of(W1, other)["other"]
    assert hosts == "other other.internal *.example.com"


def test_least_time_on_a_reload_nginx_answers_503_saying_why() -> None:
    timed = container("t1", labels={L.ALGORITHM: "least_time"})
    text = render_config(build_topology(state(nginx(), timed)), load_template())
    assert "upstream cp_web" not in text
    assert "uses least_time, which only the dynamic data plane has" in text
    assert build_topology(state(nginx(), timed)).services[0].algorithm.method is Method.LEAST_TIME


def make_dynamic(
    *containers: object, lua: bool = True
) -> tuple[FakeSource, FakeDeployer, Reconciler]:
    source = FakeSource(state(*containers))  # type: ignore[arg-type]
    deployer = FakeDeployer()
    deployer.lua = lua
    return source, deployer, Reconciler(source, deployer, load_template(), Settings())


def test_an_auto_nginx_with_lua_gets_state_pushes_and_one_config() -> None:
    source, deployer, reconciler = make_dynamic(nginx("lb"), W1)
    reconciler.reconcile("start")
    assert deployer.probed == ["lb"]
    assert len(deployer.pushed) == 1 and len(deployer.deployed) == 1
    assert b"balancer_by_lua_block" in deployer.deployed[0][1]
    mode = reconciler.nginx[nginx("lb").id].mode
    assert mode is not None and mode.mode is DataPlane.DYNAMIC

    source.state = state(nginx("lb"), W1, W2)
    reconciler.reconcile("event")
    assert len(deployer.pushed) == 2 and len(deployer.deployed) == 1  # no new config: no reload
    assert b"172.20.0.3:80" in deployer.pushed[-1][1]
    assert deployer.probed == ["lb"]  # once per container start


def test_a_dynamic_nginx_gets_deltas_and_a_restarted_one_the_whole_state() -> None:
    others = [container(f"o{i}", aliases=(f"svc{i}",), ip=f"172.20.1.{i}") for i in range(20)]
    source, deployer, reconciler = make_dynamic(nginx("lb"), W1, *others)
    reconciler.reconcile("start")
    assert [delta for _, _, delta in deployer.pushed] == [False]
    source.state = state(nginx("lb"), W1, W2, *others)
    reconciler.reconcile("event")
    _, text, delta = deployer.pushed[-1]
    assert delta and text.startswith(b"controlplane-delta 3 ") and text.count(b"\n") == 2
    assert b"172.20.0.3:80" in text
    source.state = replace(source.state)  # a pass that changes no service writes nothing
    reconciler.reconcile("resync")
    assert len(deployer.pushed) == 2
    restarted = replace(nginx("lb"), started_at="2026-01-01T00:00:01Z")
    source.state = state(restarted, W1, W2, *others)
    reconciler.reconcile("event")
    assert [delta for _, _, delta in deployer.pushed] == [False, True, False]


def test_an_auto_nginx_without_lua_reloads_as_before() -> None:
    source, deployer, reconciler = make_dynamic(nginx("lb"), W1, lua=False)
    reconciler.reconcile("start")
    source.state = state(nginx("lb"), W1, W2)
    reconciler.reconcile("event")
    assert deployer.pushed == [] and len(deployer.deployed) == 2
    mode = reconciler.nginx[nginx("lb").id].mode
    assert mode is not None and mode.mode is DataPlane.RELOAD and "lua" in mode.why


def test_the_label_wins_over_the_flag_and_needs_no_probe() -> None:
    labelled = replace(nginx("lb"), labels={L.ROLE: "nginx", L.DATAPLANE: "reload"})
    _, deployer, reconciler = make_dynamic(labelled, W1)
    reconciler.reconcile("start")
    assert deployer.probed == [] and deployer.pushed == []


def test_the_dynamic_config_waits_for_its_state_to_go_in_first() -> None:
    """Without its state a dynamic nginx would route nothing: no config before a push took."""
    _, deployer, reconciler = make_dynamic(nginx("lb"), W1)
    deployer.push_fails = True
    reconciler.reconcile("start")
    assert deployer.deployed == []
    state_of = reconciler.nginx[nginx("lb").id]
    assert state_of.failure is not None and "could not push" in state_of.failure.error
    assert state_of.version is None
    deployer.push_fails = False
    reconciler.retry_refused()
    reconciler.reconcile("api")
    assert len(deployer.deployed) == 1 and reconciler.nginx[nginx("lb").id].version == 1


@pytest.mark.parametrize(
    ("took", "said", "verdict"),
    [
        (True, "", True),
        (False, 'unknown directive "lua_shared_dict" in /etc/nginx/conf.d/x.conf:3', False),
        (False, '"init_by_lua_block" directive is duplicate in /etc/nginx/conf.d/x.conf:4', False),
        (False, 'open() "/etc/nginx/mime.types" failed (2: No such file or directory)', None),
    ],
    ids=["lua", "no-module", "own-init-by-lua", "something-else"],
)
def test_only_what_the_probe_says_of_lua_settles_the_mode(
    took: bool, said: str, verdict: bool | None
) -> None:
    assert probe_verdict(took, said) is verdict


def test_a_dynamic_nginx_runs_a_snapshot_once_its_push_took_and_only_then() -> None:
    """`current` (the API's `reloaded`): a failed push leaves the nginx out, a later pass that
    pushes it puts it in, and a pass with nothing left to send still names it."""
    source, deployer, reconciler = make_dynamic(nginx("lb"), W1)
    assert reconciler.reconcile("start").current == ("lb",)
    deployer.push_fails = True
    source.state = state(nginx("lb"), W1, W2)
    assert reconciler.reconcile("event").current == ()
    deployer.push_fails = False
    reconciler.retry_refused()
    assert reconciler.reconcile("api").current == ("lb",)
    again = reconciler.reconcile("api")
    assert again.deployed == () and again.current == ("lb",)


def test_a_failed_push_is_due_again_after_its_wait() -> None:
    _, deployer, reconciler = make_dynamic(nginx("lb"), W1)
    deployer.push_fails = True
    reconciler.reconcile("start")
    failure = reconciler.nginx[nginx("lb").id].failure
    assert failure is not None and reconciler.retry_at() == failure.retry_at


def test_a_reload_nginx_is_not_said_to_serve_a_least_time_service() -> None:
    """Its config answers 503 for one (the reload data plane has no least_time)."""
    timed = container("t1", labels={L.ALGORITHM: "least_time"})
    for lua, served in ((False, frozenset()), (True, frozenset({timed.id}))):
        _, _, reconciler = make_dynamic(nginx("lb"), timed, lua=lua)
        reconciler.reconcile("start")
        serves = reconciler.nginx[nginx("lb").id].serves
        assert serves is not None and serves["web"] == served


def test_after_a_failed_push_the_next_one_is_the_whole_state() -> None:
    """A push reported failed may have landed (its reply lost after the rename): a delta over
    what the controller believes would leave the nginx on another state."""
    others = [container(f"o{i}", aliases=(f"svc{i}",), ip=f"172.20.1.{i}") for i in range(20)]
    source, deployer, reconciler = make_dynamic(nginx("lb"), W1, *others)
    reconciler.reconcile("start")
    deployer.push_fails = True
    source.state = state(nginx("lb"), W1, W2, *others)
    reconciler.reconcile("event")
    deployer.push_fails = False
    reconciler.retry_refused()
    reconciler.reconcile("retry")
    assert [delta for _, _, delta in deployer.pushed] == [False, True, False]
