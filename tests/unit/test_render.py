"""Topology -> nginx config text: the golden file, quoting, and what nginx itself requires.

Set UPDATE_GOLDEN=1 to rewrite tests/unit/golden/*.conf from the current output; read the
diff before committing it.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import weakref
from pathlib import Path
from typing import Any

import jinja2
import pytest

from controlplane.core import labels as L
from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.lifecycle import StopMark
from controlplane.core.model import (
    Algorithm,
    Backend,
    BackendState,
    Method,
    NginxTarget,
    Service,
    Topology,
)
from controlplane.core.render import (
    RenderCache,
    RenderOptions,
    address,
    balancing_directive,
    comment,
    make_environment,
    nginx_quote,
    render_config,
    server_lines,
    server_params,
    server_view,
    service_view,
    upstream_backends,
    zone_size,
)
from controlplane.errors import TemplateError
from controlplane.templating import load_template
from tests.support.nginx_check import nginx_t
from tests.unit.builders import container, network, nginx, state

GOLDEN = Path(__file__).parent / "golden"
HOSTILE = '1;\n}\nserver { listen 81; } # "x"'


def t(minute: int) -> str:
    return f"2024-05-01T10:{minute:02d}:00.000000001Z"


def golden_topology() -> Topology:
    """Every method, every server parameter, extra hosts, every reason to leave something out,
    every kind of warning."""
    stopping = container("api-3", aliases=("api",), ip="172.20.0.23", created=t(3), exposed=(8080,))
    containers = [
        nginx(),
        nginx("broken", ip="172.20.0.101", config_path="conf.d/x.conf"),
        # web: round_robin; web-1 also on "back", where the managed nginx is not.
        container(
            "web-1",
            created=t(1),
            more_networks={"back": "172.21.0.11"},
            labels={
                L.WEIGHT: "3",
                L.MAX_FAILS: "2",
                L.FAIL_TIMEOUT: "10s",
                L.HOSTS: "www.example.com,*.example.com",
            },
        ),
        container("web-2", ip="172.20.0.12", created=t(2), labels={L.MAX_CONNS: "100"}),
        container(
            "web-3", ip="172.20.0.13", created=t(3), labels={L.BACKUP: "true", L.MAX_FAILS: "0"}
        ),
        container("web-4", ip="172.20.0.14", created=t(4), health="unhealthy"),
        container("web-5", network="back", ip="172.21.0.15", created=t(5)),
        # api: least_conn, ports from ExposedPorts and from the label, one backend stopping.
        container(
            "api-1",
            aliases=("api",),
            ip="172.20.0.21",
            created=t(1),
            exposed=(8080,),
            labels={L.ALGORITHM: "least_conn"},
        ),
        container(
            "api-2",
            aliases=("api",),
            ip="172.20.0.22",
            created=t(2),
            exposed=(8080, 8443),
            labels={L.PORT: "8443", L.FAIL_TIMEOUT: "1m"},
        ),
        stopping,
        # cache: hash consistent; a younger container disagrees; a backup it can't have.
        container(
            "cache-1",
            aliases=("cache",),
            ip="172.20.0.31",
            created=t(1),
            exposed=(6081,),
            labels={L.ALGORITHM: "hash", L.HASH_KEY: "$request_uri", L.HASH_CONSISTENT: "true"},
        ),
        container(
            "cache-2",
            aliases=("cache",),
            ip="172.20.0.32",
            created=t(2),
            exposed=(6081,),
            labels={L.ALGORITHM: "least_conn"},
        ),
        container(
            "cache-3",
            aliases=("cache",),
            ip="172.20.0.33",
            created=t(3),
            exposed=(6081,),
            labels={L.BACKUP: "true"},
        ),
        # session: ip_hash, a host web also wants, and search's default name it can't have.
        container(
            "session-1",
            aliases=("session",),
            ip="172.20.0.41",
            created=t(1),
            labels={
                L.ALGORITHM: "ip_hash",
                L.HOSTS: "login.example.com,www.example.com,search.internal",
            },
        ),
        # search: random two.
        container(
            "search-1",
            aliases=("search",),
            ip="172.20.0.51",
            created=t(1),
            labels={L.ALGORITHM: "random", L.RANDOM_TWO: "true", L.WEIGHT: "2"},
        ),
        # A misspelt label is warned about, and the container serves with the default.
        container(
            "search-2",
            aliases=("search",),
            ip="172.20.0.52",
            created=t(2),
            labels={"controlplane.wieght": "5"},
        ),
        # v6: an IPv6-only endpoint.
        container("v6-1", aliases=("v6",), ip="", ipv6="fd00:20::71", created=t(1)),
        # reports: no live backend.
        container(
            "reports-1", aliases=("reports",), ip="172.20.0.61", created=t(1), status="paused"
        ),
        # Someone who can start containers tries to write nginx config through labels.
        container(
            "evil",
            aliases=("web", "evil\n}"),
            ip="172.20.0.66",
            created=t(6),
            labels={L.WEIGHT: HOSTILE, L.HOSTS: 'a.com"; }'},
        ),
    ]
    docker = state(*containers, networks=("bridge", "app", "back", network("mac", "macvlan")))
    options = BuildOptions(networks=frozenset({"app", "back", "mac"}))
    return build_topology(docker, options, {stopping.id: StopMark(frozenset({15}), 1.0)})


def backend(name: str, ip: str, network: str = "app", **changes: Any) -> Backend:
    fields: dict[str, Any] = {
        "container_id": name * 4,
        "container": name,
        "network": network,
        "ip": ip,
        "ipv6": "",
        "port": 80,
        "created": t(0),
        **changes,
    }
    return Backend(**fields)


ROUND_ROBIN = Algorithm()


def service(
    name: str, *backends: Backend, algorithm: Algorithm = ROUND_ROBIN, hosts: tuple[str, ...] = ()
) -> Service:
    """A hand-made service owns NAME, NAME.internal and its hosts (the builder decides that
    for real ones)."""
    return Service(
        name=name,
        networks=tuple(sorted({b.network for b in backends})),
        algorithm=algorithm,
        algorithm_source="label",
        hosts=hosts,
        backends=backends,
        names=tuple(dict.fromkeys((name, f"{name}.internal", *hosts))),
    )


def code_lines(text: str) -> list[str]:
    """The lines nginx parses: comments and blank lines dropped, trailing comments cut."""
    lines = (line.split("  #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def upstream_blocks(text: str) -> dict[str, list[str]]:
    blocks = re.findall(r"^upstream (\S+) \{\n(.*?)^\}", text, flags=re.M | re.S)
    return {name: code_lines(body) for name, body in blocks}


# ---------------------------------------------------------------- golden file


def test_golden_basic(template: jinja2.Template) -> None:
    text = render_config(golden_topology(), template)
    path = GOLDEN / "basic.conf"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_rendering_twice_is_byte_identical(template: jinja2.Template) -> None:
    first = render_config(golden_topology(), template).encode()
    assert render_config(golden_topology(), template).encode() == first


def test_hostile_label_never_reaches_nginx_syntax(template: jinja2.Template) -> None:
    text = render_config(golden_topology(), template)
    # Shown, escaped, in the comment that explains the exclusion...
    assert "controlplane.weight='1;\\n}\\nserver { listen 81; } # \"x\"'" in text
    # ...but nowhere nginx reads it.
    code = code_lines(text)
    for needle in ("listen 81", "evil", "a.com"):
        assert not [line for line in code if needle in line], needle
    assert sum(line.count("{") for line in code) == sum(line.count("}") for line in code)
    # Every comment stays on its own line: no line continues a broken-off comment.
    for line in text.splitlines():
        assert line.isascii() and line.isprintable()


def test_service_without_live_backend_returns_503(template: jinja2.Template) -> None:
    topology = Topology(
        services=(service("idle", backend("i1", "172.20.0.2", state=BackendState.PAUSED)),)
    )
    text = render_config(topology, template)
    assert "upstream" not in text
    assert "proxy_pass" not in text
    assert 'return 503 "controlplane: service idle has no live backend";' in text
    assert "# service idle: 0 of 1 containers serving, method round_robin (label)" in text


def test_render_options(template: jinja2.Template) -> None:
    topology = Topology(services=(service("web", backend("w1", "172.20.0.2"), hosts=("a.com",)),))
    text = render_config(topology, template, RenderOptions(listen_port=8080, keepalive=8))
    assert 'server_name "web" "web.internal" "a.com";' in text
    assert "listen 8080;" in text
    assert "listen 8080 default_server reuseport;" in text
    assert "keepalive 8;" in text
    shared = RenderOptions(listen_port=8080, reuseport=False)
    assert "listen 8080 default_server;" in render_config(topology, template, shared)


def test_empty_topology_renders_only_the_default_server(template: jinja2.Template) -> None:
    code = code_lines(render_config(Topology(), template))
    assert "upstream" not in " ".join(code)
    assert "listen 80 default_server reuseport;" in code


def test_template_typo_is_an_error_not_an_empty_directive() -> None:
    env = make_environment(jinja2.DictLoader({"t.j2": "keepalive {{ options.keepaliv }};"}))
    with pytest.raises(TemplateError, match=r"t\.j2 failed to render"):
        render_config(Topology(), env.get_template("t.j2"))


def server_names(text: str) -> list[str]:
    return [
        name
        for line in code_lines(text)
        if line.startswith("server_name ")
        for name in line.rstrip(";").split()[1:]
    ]


@pytest.mark.parametrize(
    ("hosts", "domain"),
    [
        ("beta.internal", "internal"),
        ("beta", "internal"),
        ("beta.svc.local", "svc.local"),
        ("beta.svc.local,beta,x.com", "svc.local"),
    ],
    ids=["name-dot-domain", "bare-name", "custom-domain", "mixed"],
)
def test_each_server_name_belongs_to_one_server_block(
    template: jinja2.Template, hosts: str, domain: str
) -> None:
    """A host label can't take another service's NAME or NAME.DOMAIN: nginx would route it to
    whichever server block comes first."""
    alpha = container("a1", aliases=("alpha",), labels={L.HOSTS: hosts})
    beta = container("b1", aliases=("beta",), ip="172.20.0.3")
    topology = build_topology(state(alpha, beta), BuildOptions(domain=domain))
    names = server_names(render_config(topology, template))
    assert len(names) == len(set(names)), names
    assert f'"beta.{domain}"' in names


def test_service_named_like_another_services_default_name(template: jinja2.Template) -> None:
    a = container("a1", aliases=("beta.internal",))
    b = container("b1", aliases=("beta",), ip="172.20.0.3")
    topology = build_topology(state(a, b))
    names = server_names(render_config(topology, template))
    assert len(names) == len(set(names)), names


# ---------------------------------------------------------------- quoting


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("web", '"web"'),
        ("*.example.com", '"*.example.com"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("a;b}{", '"a;b}{"'),
        ("", '""'),
        (8080, '"8080"'),
    ],
    ids=[
        "plain",
        "wildcard",
        "double-quote",
        "backslash",
        "syntax-inert-inside-quotes",
        "empty",
        "int",
    ],
)
def test_q_filter_quotes(value: object, quoted: str) -> None:
    assert nginx_quote(value) == quoted


@pytest.mark.parametrize(
    "value",
    ["a\nb", "a\rb", "a\tb", "a\x00b", "a\x1bb", "a\x7fb", "\n"],
    ids=["newline", "carriage-return", "tab", "nul", "escape", "delete", "only-newline"],
)
def test_q_filter_refuses_control_characters(value: str) -> None:
    with pytest.raises(TemplateError, match="control character"):
        nginx_quote(value)


def test_q_filter_refusal_stops_the_render(template: jinja2.Template) -> None:
    """A value that slipped past the grammar fails the render instead of reaching nginx."""
    topology = Topology(
        services=(service("web", backend("w1", "172.20.0.2"), hosts=("a.com\nb.com",)),)
    )
    with pytest.raises(TemplateError):
        render_config(topology, template)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain text", "plain text"),
        ("a\nb\r\nc", "a?b??c"),
        ("tab\there", "tab?here"),
        ("caf\u00e9 \u2028", "caf? ?"),
        ("{ }; # \"'", "{ }; # \"'"),
    ],
    ids=["plain", "newlines", "tab", "non-ascii-and-line-separator", "punctuation-kept"],
)
def test_comment_filter_keeps_one_printable_line(value: str, expected: str) -> None:
    assert comment(value) == expected


# ---------------------------------------------------------------- upstream pieces


@pytest.mark.parametrize(
    ("algorithm", "directive"),
    [
        (Algorithm(), None),
        (Algorithm(Method.LEAST_CONN), "least_conn"),
        (Algorithm(Method.IP_HASH), "ip_hash"),
        (Algorithm(Method.HASH, key="$request_uri"), 'hash "$request_uri"'),
        (Algorithm(Method.HASH, key="$arg_id:v1", consistent=True), 'hash "$arg_id:v1" consistent'),
        (Algorithm(Method.RANDOM), "random"),
        (Algorithm(Method.RANDOM, two=True), "random two least_conn"),
    ],
    ids=["round-robin", "least-conn", "ip-hash", "hash", "hash-consistent", "random", "random-two"],
)
def test_balancing_directive(algorithm: Algorithm, directive: str | None) -> None:
    assert balancing_directive(service("s", algorithm=algorithm)) == directive


@pytest.mark.parametrize(
    ("changes", "params"),
    [
        ({}, ()),
        ({"weight": 5}, ("weight=5",)),
        ({"max_fails": 0}, ("max_fails=0",)),
        ({"fail_timeout": "30s"}, ("fail_timeout=30s",)),
        ({"max_conns": 0}, ("max_conns=0",)),
        ({"backup": True}, ("backup",)),
        (
            {"weight": 2, "max_fails": 3, "fail_timeout": "1m", "max_conns": 9, "backup": True},
            ("weight=2", "max_fails=3", "fail_timeout=1m", "max_conns=9", "backup"),
        ),
    ],
    ids=["none", "weight", "max-fails-zero", "fail-timeout", "max-conns-zero", "backup", "all"],
)
def test_server_params(changes: dict[str, Any], params: tuple[str, ...]) -> None:
    assert server_params(backend("w1", "10.0.0.2", **changes)) == params


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        ("172.20.0.2", 80, "172.20.0.2:80"),
        ("fd00::5", 8080, "[fd00::5]:8080"),
        ("2001:db8:0:0:0:0:0:1", 80, "[2001:db8::1]:80"),
        ("::ffff:10.0.0.1", 80, "[::ffff:a00:1]:80"),
    ],
    ids=["ipv4", "ipv6-bracketed", "ipv6-compressed", "ipv4-mapped"],
)
def test_address(ip: str, port: int, expected: str) -> None:
    assert address(backend("w1", ip, port=port)) == expected


@pytest.mark.parametrize(
    ("ip", "ipv6", "expected"),
    [
        ("", "fd00::5", "[fd00::5]:80"),
        ("", "2001:db8:0:0:0:0:0:1", "[2001:db8::1]:80"),
        ("172.20.0.2", "fd00::5", "172.20.0.2:80"),
    ],
    ids=["ipv6-only", "ipv6-only-compressed", "dual-stack-uses-ipv4"],
)
def test_address_falls_back_to_ipv6(ip: str, ipv6: str, expected: str) -> None:
    assert address(backend("w1", ip, ipv6=ipv6)) == expected


def test_ipv6_only_container_renders_bracketed(template: jinja2.Template) -> None:
    """From Docker state to the server line: an endpoint with only a GlobalIPv6Address."""
    w1 = container("w1", ip="", ipv6="fd00::7", exposed=(8080,))
    text = render_config(build_topology(state(w1)), template)
    assert "server [fd00::7]:8080;  # w1" in text


def test_ipv6_backend_renders_bracketed(template: jinja2.Template) -> None:
    topology = Topology(services=(service("v6", backend("w1", "fd00::5", port=8080)),))
    assert "server [fd00::5]:8080;  # w1" in render_config(topology, template)


A_APP = backend("a", "172.20.0.2", "app")
A_BACK = backend("a", "172.21.0.2", "back")
B_BACK = backend("b", "172.21.0.3", "back")
C_DOWN = backend("c", "172.20.0.4", "app", state=BackendState.UNHEALTHY)
A_APP_DOWN = backend("a", "172.20.0.2", "app", state=BackendState.STOPPING)
A_OTHER = backend("a", "172.22.0.2", "other")


@pytest.mark.parametrize(
    ("backends", "reachable", "expected"),
    [
        ((A_APP, A_BACK), {"app"}, (A_APP,)),
        ((A_APP, A_BACK), {"back"}, (A_BACK,)),
        ((A_APP, A_BACK), {"app", "back"}, (A_APP,)),
        ((A_BACK, A_APP), {"app", "back"}, (A_BACK,)),
        ((A_APP, A_BACK), set(), (A_APP,)),
        ((A_BACK, A_APP), set(), (A_BACK,)),
        ((A_APP, A_BACK), {"other"}, ()),
        ((A_APP, A_BACK, B_BACK), {"back"}, (A_BACK, B_BACK)),
        ((A_APP, B_BACK, C_DOWN), {"app"}, (A_APP,)),
        ((A_APP, B_BACK, C_DOWN), set(), (A_APP, B_BACK)),
        ((A_APP, A_OTHER, B_BACK), {"back", "other"}, (A_OTHER, B_BACK)),
        ((A_APP_DOWN, A_BACK), {"app", "back"}, (A_BACK,)),
        ((C_DOWN,), {"app"}, ()),
        ((C_DOWN,), set(), ()),
    ],
    ids=[
        "prefer-shared-app",
        "prefer-shared-back",
        "both-shared-first-wins",
        "both-shared-first-wins-reversed",
        "no-nginx-first-network",
        "no-nginx-first-network-reversed",
        "none-shared-left-out",
        "one-per-container",
        "unreachable-container-left-out-and-not-live-dropped",
        "no-nginx-every-live-container",
        "first-allowed-network-per-container",
        "not-live-on-one-network-live-on-another",
        "nothing-live",
        "nothing-live-no-nginx",
    ],
)
def test_upstream_backends(
    backends: tuple[Backend, ...], reachable: set[str], expected: tuple[Backend, ...]
) -> None:
    assert upstream_backends(service("s", *backends), reachable) == expected


def test_nginx_networks_choose_the_server_address(template: jinja2.Template) -> None:
    proxy = NginxTarget("p" * 64, "proxy", "/etc/nginx/conf.d/x.conf", t(0), ("back",))
    topology = Topology(services=(service("s", A_APP, A_BACK),), nginx=(proxy,))
    text = render_config(topology, template)
    assert "server 172.21.0.2:80;  # a" in text
    assert "172.20.0.2" not in text


def test_container_no_managed_nginx_can_reach_is_left_out(template: jinja2.Template) -> None:
    """From Docker state: the builder warns, and the upstream leaves the container out."""
    reachable = container("w1", exposed=(8080,))
    stranded = container("w2", network="back", ip="172.21.0.3", exposed=(8080,))
    docker = state(nginx(), reachable, stranded, networks=("bridge", "app", "back"))
    text = render_config(build_topology(docker), template)
    assert "# service web: 1 of 2 containers serving" in text
    assert "# warning: w2 is on no network a managed nginx is on (back)" in text
    assert "server 172.20.0.2:8080;  # w1" in text
    assert "172.21.0.3" not in text


def test_without_a_managed_nginx_every_container_is_previewed(template: jinja2.Template) -> None:
    """`controlplane render` with no nginx yet: each container on its first network."""
    w1 = container("w1", exposed=(8080,), more_networks={"back": "172.21.0.2"})
    w2 = container("w2", network="back", ip="172.21.0.3", exposed=(8080,))
    text = render_config(build_topology(state(w1, w2, networks=("app", "back"))), template)
    assert "# service web: 2 of 2 containers serving" in text
    assert "warning" not in text
    assert code_lines(text).count("server 172.20.0.2:8080;") == 1
    assert code_lines(text).count("server 172.21.0.3:8080;") == 1
    assert "172.21.0.2" not in text


@pytest.mark.parametrize(
    ("backends", "containers", "serving"),
    [
        ((), 0, 0),
        ((A_APP,), 1, 1),
        ((A_APP, A_BACK), 1, 1),
        ((A_APP, A_BACK, B_BACK), 2, 2),
        ((A_APP, C_DOWN), 2, 1),
        ((C_DOWN,), 1, 0),
    ],
    ids=["empty", "one", "one-container-two-networks", "two", "one-down", "all-down"],
)
def test_service_view_counts_containers_not_backends(
    backends: tuple[Backend, ...], containers: int, serving: int
) -> None:
    view = service_view(service("s", *backends), (), RenderOptions())
    assert (view.containers, len(view.servers)) == (containers, serving)


@pytest.mark.parametrize(
    ("backends", "params"),
    [
        ((backend("a", "10.0.0.2", backup=True),), [()]),
        ((backend("a", "10.0.0.2", backup=True, weight=2),), [("weight=2",)]),
        (
            (backend("a", "10.0.0.2"), backend("b", "10.0.0.3", backup=True)),
            [(), ("backup",)],
        ),
        (
            (
                backend("a", "10.0.0.2", state=BackendState.STOPPING),
                backend("b", "10.0.0.3", backup=True),
            ),
            [()],
        ),
    ],
    ids=["only-backup-promoted", "promoted-keeps-weight", "mixed-kept", "primary-not-live"],
)
def test_upstream_of_backups_only_is_promoted(
    backends: tuple[Backend, ...], params: list[tuple[str, ...]]
) -> None:
    """nginx refuses an upstream whose every server is a backup."""
    view = service_view(service("s", *backends), (), RenderOptions())
    assert [s.params for s in view.servers] == params


def test_server_names_start_with_the_service_and_are_unique() -> None:
    web = container("w1", aliases=("web",), labels={L.HOSTS: "web,a.com,web.internal"})
    (s,) = build_topology(state(web)).services
    assert service_view(s, (), RenderOptions()).server_names == ("web", "web.internal", "a.com")


@pytest.mark.parametrize(
    "algorithm",
    [
        Algorithm(),
        Algorithm(Method.LEAST_CONN),
        Algorithm(Method.IP_HASH),
        Algorithm(Method.HASH, key="$uri", consistent=True),
        Algorithm(Method.RANDOM, two=True),
    ],
    ids=["round-robin", "least-conn", "ip-hash", "hash", "random-two"],
)
def test_keepalive_comes_after_the_balancing_directive(
    template: jinja2.Template, algorithm: Algorithm
) -> None:
    """nginx: a balancing directive after `keepalive` replaces keepalive's peer init."""
    topology = Topology(services=(service("s", A_APP, algorithm=algorithm),))
    (body,) = upstream_blocks(render_config(topology, template)).values()
    assert body[0] == "zone cp_s 64k;"  # the least a zone gets
    assert body[-1] == "keepalive 32;"
    directive = balancing_directive(topology.services[0])
    if directive is not None:
        assert body[1] == directive + ";"


def test_keepalive_is_last_in_every_golden_upstream(template: jinja2.Template) -> None:
    blocks = upstream_blocks(render_config(golden_topology(), template))
    assert sorted(blocks) == ["cp_api", "cp_cache", "cp_search", "cp_session", "cp_v6", "cp_web"]
    for name, body in blocks.items():
        assert body[-1] == "keepalive 32;", name
        assert sum(line.startswith("keepalive") for line in body) == 1, name


# ---------------------------------------------------------------- nginx -t


def test_nginx_accepts_the_golden_config(tmp_path: Path) -> None:
    result = nginx_t(tmp_path, (GOLDEN / "basic.conf").read_text(encoding="utf-8"))
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "variable", [*sorted(L.HASH_VARIABLES), "http_x_user", "cookie_id", "arg_id"]
)
def test_nginx_knows_every_hash_variable_the_grammar_allows(
    tmp_path: Path, template: jinja2.Template, variable: str
) -> None:
    key = L.parse_hash_key(f"${variable}:v1")
    topology = Topology(
        services=(service("s", A_APP, algorithm=Algorithm(Method.HASH, key=key, consistent=True)),)
    )
    result = nginx_t(tmp_path, render_config(topology, template))
    assert result.returncode == 0, result.stderr


def counting_template() -> jinja2.Template:
    """Each service block shows how many blocks were rendered before it: a block taken from
    the cache shows its old number."""
    env = make_environment(
        jinja2.DictLoader(
            {
                "main.j2": "{% for b in service_blocks %}{{ b }}{% endfor %}",
                "service.conf.j2": "{{ s.name }}={{ count() }} ",
            }
        )
    )
    env.globals["count"] = itertools.count().__next__
    return env.get_template("main.j2")


def test_the_render_cache_renders_an_unchanged_service_once() -> None:
    """Found by identity: the same Service is not rendered again; an equal one built anew
    is; other options or networks render every service again."""
    template = counting_template()
    web, api = service("web", backend("w1", "10.0.0.2")), service("api", backend("a1", "10.0.0.3"))
    cache = RenderCache()
    assert render_config(Topology(services=(web, api)), template, cache=cache) == "web=0 api=1 "
    assert render_config(Topology(services=(web, api)), template, cache=cache) == "web=0 api=1 "
    rebuilt = service("api", backend("a1", "10.0.0.3"))
    assert render_config(Topology(services=(web, rebuilt)), template, cache=cache) == "web=0 api=2 "
    other = RenderOptions(keepalive=8)
    assert (
        render_config(Topology(services=(web, rebuilt)), template, other, cache) == "web=3 api=4 "
    )
    proxy = NginxTarget("p" * 64, "proxy", "/etc/nginx/conf.d/x.conf", t(0), ("app",))
    moved = Topology(services=(web, rebuilt), nginx=(proxy,))
    assert render_config(moved, template, other, cache) == "web=5 api=6 "


def test_the_render_cache_keeps_only_the_last_renders_services() -> None:
    """A service gone from the topology is let go, so no other object can take its id while
    an entry for it is kept, and the cache does not grow with every change."""
    template = counting_template()
    web, api = service("web", backend("w1", "10.0.0.2")), service("api", backend("a1", "10.0.0.3"))
    gone = weakref.ref(api)
    cache = RenderCache()
    render_config(Topology(services=(web, api)), template, cache=cache)
    render_config(Topology(services=(web,)), template, cache=cache)
    del api
    gc.collect()
    assert gone() is None


def test_cached_blocks_render_as_fresh_ones(template: jinja2.Template) -> None:
    topology = golden_topology()
    cache = RenderCache()
    first = render_config(topology, template, cache=cache)
    assert render_config(topology, template, cache=cache) == first
    assert render_config(topology, template) == first


@pytest.mark.parametrize(
    ("one", "directive", "note"),
    [
        (backend("web-1", "10.0.0.2"), "10.0.0.2:80", "web-1"),
        (backend("web-1", "10.0.0.2", weight=3), "10.0.0.2:80 weight=3", "web-1"),
        (
            backend("w", "", ipv6="fd00::2", state=BackendState.DRAINING, max_conns=5),
            "[fd00::2]:80 max_conns=5 down",
            "w",
        ),
        (backend("caf\u00e9 a#b\nc", "10.0.0.2", backup=True), "10.0.0.2:80 backup", "caf? a#b?c"),
    ],
    ids=["plain", "weight", "ipv6-params-draining", "name-made-safe-for-a-comment"],
)
def test_server_view_and_its_line(one: Backend, directive: str, note: str) -> None:
    view = server_view(one)
    assert (view.address, view.params) == (address(one), server_params(one))
    assert (view.container, view.directive, view.note) == (one.container, directive, note)
    assert server_lines((one,)) == f"    server {view.directive};  # {view.note}"


CUSTOM_MAIN = """\
{% include "builtin/controlplane.conf.j2" %}
{% for s in services %}
# {{ s.name }}: zone {{ s.zone_size }}, {{ s.backends|length }} backends
{% endfor %}
"""
CUSTOM_SERVICE = """\
{% include "builtin/service.conf.j2" %}
{% for v in s.servers %}
#view {{ ([v.address] + v.params|list)|join(" ") == v.directive }} {{ v.container|comment }}
#view    server {{ v.directive }};  # {{ v.note }}
{% endfor %}
"""


def test_custom_templates_get_the_documented_variables(tmp_path: Path) -> None:
    """A custom template that lays the servers out itself from `s.servers` writes the lines
    the shipped one prints from `s.server_lines`; one that includes the shipped one gets its
    text unchanged."""
    (tmp_path / "controlplane.conf.j2").write_text(CUSTOM_MAIN, encoding="utf-8")
    (tmp_path / "service.conf.j2").write_text(CUSTOM_SERVICE, encoding="utf-8")
    topology = golden_topology()
    text = render_config(topology, load_template(tmp_path))
    shipped = render_config(topology, load_template())
    views = [line.removeprefix("#view") for line in text.splitlines() if line.startswith("#view")]
    assert views[1::2] == [line for line in shipped.splitlines() if line.startswith("    server ")]
    assert all(line.startswith(" True ") for line in views[::2])
    assert "# web: zone 64k, 3 backends" in text
    for line in shipped.splitlines():
        assert line in text


# ---------------------------------------------------------------- sizes nginx must accept


def _many(count: int, v6: bool = False) -> tuple[Backend, ...]:
    if v6:
        return tuple(
            backend(f"b{i}", "", ipv6=f"fd00:ffff:ffff:ffff:ffff:ffff:{i // 65536:x}:{i % 65536:x}",
                    port=65535, weight=1000, max_fails=10, fail_timeout="100s")
            for i in range(count)
        )  # fmt: skip
    return tuple(backend(f"b{i}", f"172.20.{i // 256}.{i % 256}") for i in range(count))


@pytest.mark.parametrize(
    ("count", "v6"), [(56, False), (150, False), (1000, False), (1000, True), (5000, False)]
)
def test_one_service_of_many_backends_fits_its_zone(
    tmp_path: Path, template: jinja2.Template, count: int, v6: bool
) -> None:
    """A fixed `zone 64k` held ~55 servers: past that nginx refused every config."""
    topology = Topology(services=(service("web", *_many(count, v6)),))
    result = nginx_t(tmp_path, render_config(topology, template))
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr, result.stderr


def test_many_services_with_long_names_fit_the_names_hash(
    tmp_path: Path, template: jinja2.Template
) -> None:
    """nginx's default bucket (64 bytes) refuses a name of ~55 characters, and 2,000 names
    outgrow its default table (a warning, then a slow hash)."""
    long = "x" * 50
    services = tuple(
        service(f"s{i:04d}-{long}", backend(f"b{i}", f"172.20.{i // 256}.{i % 256}"))
        for i in range(1000)
    )
    hosts = ("a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".example",)
    web = service("web", backend("w", "172.21.0.2"), hosts=hosts)
    result = nginx_t(tmp_path, render_config(Topology(services=(*services, web)), template))
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr, result.stderr


def test_names_hash_can_be_left_to_the_main_config(template: jinja2.Template) -> None:
    topology = Topology(services=(service("web", A_APP),))
    assert "server_names_hash_bucket_size" in render_config(topology, template)
    off = render_config(topology, template, RenderOptions(names_hash=False))
    assert "server_names_hash" not in off


@pytest.mark.parametrize(
    ("servers", "size"), [(0, "64k"), (1, "64k"), (55, "104k"), (1000, "1284k")]
)
def test_zone_size_grows_with_the_servers(servers: int, size: str) -> None:
    assert zone_size(servers) == size


def test_upstream_header_is_opt_in(tmp_path: Path, template: jinja2.Template) -> None:
    topology = Topology(services=(service("web", A_APP),))
    assert "X-Controlplane-Upstream" not in render_config(topology, template)
    text = render_config(topology, template, RenderOptions(upstream_header=True))
    assert "add_header X-Controlplane-Upstream $upstream_addr always;" in text
    result = nginx_t(tmp_path, text)
    assert result.returncode == 0, result.stderr
