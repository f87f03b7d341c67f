"""Property: whatever the labels say, the rendered config passes `nginx -t`, and a value
that is not valid never reaches it outside a comment."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.core import labels as L
from controlplane.core.build import build_topology
from controlplane.core.dataplane import StateCache, state_text
from controlplane.core.model import ContainerFacts, DockerState, Endpoint, NetworkFacts
from controlplane.core.render import RenderOptions, render_config
from controlplane.templating import load_template
from tests.support.nginx_check import nginx_binary, nginx_t

NASTY = st.sampled_from(
    ["", " ", ";", "}", "{", "\n", "\r\n", '"', "'", "\\", "$", "${x}", "#", "\x00", "\t", "é"]
)
PLAUSIBLE = st.sampled_from(
    [
        "1",
        "0",
        "5",
        "1000",
        "1001",
        "-1",
        "65535",
        "99999",
        "10s",
        "2m",
        "1h",
        "25h",
        "10ms",
        "true",
        "false",
        "yes",
        "maybe",
        "round_robin",
        "least_conn",
        "ip_hash",
        "hash",
        "random",
        "$request_uri",
        "$remote_addr",
        "$http_x_user",
        "$cookie_id",
        "$arg_id",
        "$request_uriV1",
        "$request_uri:v1",
        "$foo",
        "shop.example.com",
        "*.example.com",
        "a..b",
        "web",
        "Web",
        "/etc/nginx/conf.d/x.conf",
        "../x.conf",
        "/health",
        "/a b",
        "200-399",
        "500ms",
        "http",
        "tcp",
        "none",
    ]
)
VALUE = st.one_of(
    PLAUSIBLE,
    st.text(max_size=20),
    st.builds(lambda a, b, c: a + b + c, PLAUSIBLE, NASTY, PLAUSIBLE),
)
LABEL_NAMES = sorted(L.KNOWN_LABELS - {L.ROLE, L.CONFIG_PATH})
LABELS = st.dictionaries(st.sampled_from(LABEL_NAMES), VALUE, max_size=6)
ALIAS = st.one_of(st.just("web"), st.just("api"), VALUE)


def container(index: int, labels: dict[str, str], alias: str) -> ContainerFacts:
    cid = f"{index:02d}" * 32
    return ContainerFacts(
        id=cid,
        name=f"c{index}",
        created=f"2026-01-01T00:00:{index:02d}.000000000Z",
        status="running",
        health=None,
        started_at="2026-01-01T00:00:00.000000000Z",
        labels=labels,
        exposed_tcp_ports=(),
        endpoints=(Endpoint("app", f"172.20.0.{index + 2}", "", (alias, cid[:12])),),
        stop_signal=None,
    )


@pytest.fixture(scope="module")
def template() -> jinja2.Template:
    nginx_binary()
    return load_template()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(LABELS, ALIAS), min_size=1, max_size=4))
def test_any_labels_give_a_config_nginx_accepts(
    template: jinja2.Template, backends: list[tuple[dict[str, str], str]]
) -> None:
    containers = tuple(container(i, labels, alias) for i, (labels, alias) in enumerate(backends))
    state = DockerState(
        containers=containers, networks=(NetworkFacts("n", "app", "bridge", "local"),)
    )
    config = render_config(build_topology(state), template, RenderOptions(listen_port=18080))
    with tempfile.TemporaryDirectory() as directory:
        result = nginx_t(Path(directory), config)
    assert result.returncode == 0, f"{result.stderr}\n{config}"
    for line in config.splitlines():
        assert "\x00" not in line and "\r" not in line


LUA_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
LUA_HOST = re.compile(r"(\*\.)?[a-z0-9][a-z0-9._-]*")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(LABELS, ALIAS, st.text(max_size=12)), min_size=1, max_size=4))
def test_any_labels_and_names_give_state_lines_the_lua_loader_takes(
    backends: list[tuple[dict[str, str], str, str]],
) -> None:
    """The dynamic data plane's twin of the property above: every state line has the four
    fields the Lua loader parses, with a name, rev and hosts of its grammar, and JSON on one
    line, whatever the labels and container names hold."""
    containers = tuple(
        replace(container(i, labels, alias), name=f"c{i}{name}")
        for i, (labels, alias, name) in enumerate(backends)
    )
    state = DockerState(
        containers=containers, networks=(NetworkFacts("n", "app", "bridge", "local"),)
    )
    topology = build_topology(state)
    text = state_text(1, StateCache().lines(topology.services, frozenset({"app"})))
    header, *lines = text.split("\n")[:-1]
    assert header == f"controlplane-state 3 1 {len(lines)}"
    for line in lines:
        name, rev, hosts, body = line.split("\t")
        assert len(name) <= 63 and LUA_NAME.fullmatch(name), line
        assert re.fullmatch(r"[0-9a-f]{16}", rev), line
        assert all(len(h) <= 253 and LUA_HOST.fullmatch(h) for h in hosts.split(" ")), line
        data = json.loads(body)
        assert set(data) == {"method", "key", "consistent", "two", "peers"}
        assert body.isascii() and body.isprintable()
