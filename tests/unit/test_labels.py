"""The label grammar: every value that may reach an nginx config is accepted or refused here."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import labels as L
from controlplane.core.model import Algorithm, Method
from controlplane.errors import ControlPlaneError, InvalidValue

# ---------------------------------------------------------------- parse_name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("web", "web"),
        ("Web", "web"),
        ("  api  ", "api"),
        ("a", "a"),
        ("0", "0"),
        ("my-svc_2.v1", "my-svc_2.v1"),
        ("a" * 63, "a" * 63),
        ("web\n", "web"),
    ],
    ids=[
        "plain",
        "upper-lowered",
        "padded",
        "one-letter",
        "one-digit",
        "all-chars",
        "63-long",
        "trailing-newline-stripped",
    ],
)
def test_parse_name_accepts(value: str, expected: str) -> None:
    assert L.parse_name(value, "network alias") == expected


@pytest.mark.parametrize(
    "value",
    ["", " ", "-web", "_web", ".web", "a" * 64, "we b", "we;b", "we}b", "w\neb", "wéb"],
    ids=[
        "empty",
        "blank",
        "leading-dash",
        "leading-underscore",
        "leading-dot",
        "64-long",
        "space",
        "semicolon",
        "brace",
        "newline",
        "non-ascii",
    ],
)
def test_parse_name_rejects(value: str) -> None:
    with pytest.raises(InvalidValue, match="network alias"):
        L.parse_name(value, "network alias")


# ---------------------------------------------------------------- parse_bool


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
    ],
    ids=["true", "TRUE", "yes-padded", "1", "on", "false", "False", "0", "no", "off"],
)
def test_parse_bool_accepts(value: str, expected: bool) -> None:
    assert L.parse_bool(value, L.BACKUP) is expected


@pytest.mark.parametrize(
    "value",
    ["", "y", "2", "truee", "enabled", "t rue"],
    ids=["empty", "y", "2", "typo", "word", "space"],
)
def test_parse_bool_rejects(value: str) -> None:
    with pytest.raises(InvalidValue, match=re.escape(L.BACKUP)):
        L.parse_bool(value, L.BACKUP)


# ---------------------------------------------------------------- parse_int


@pytest.mark.parametrize(
    ("value", "low", "high", "expected"),
    [
        ("1", 1, 65535, 1),
        ("65535", 1, 65535, 65535),
        (" 8080 ", 1, 65535, 8080),
        ("0", 0, 1000, 0),
        ("007", 1, 10, 7),
    ],
    ids=["low-bound", "high-bound", "padded", "zero-allowed", "leading-zeros"],
)
def test_parse_int_accepts(value: str, low: int, high: int, expected: int) -> None:
    assert L.parse_int(value, L.PORT, low, high) == expected


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("0", 1, 65535),
        ("65536", 1, 65535),
        ("-1", 0, 10),
        ("+1", 0, 10),
        ("1.5", 0, 10),
        ("1e3", 0, 10000),
        ("", 0, 10),
        ("12345678", 0, 99_999_999),
        ("٣", 0, 10),
        ("1_000", 0, 10000),
        ("80;", 1, 65535),
    ],
    ids=[
        "below-low",
        "above-high",
        "negative",
        "plus-sign",
        "fraction",
        "exponent",
        "empty",
        "more-than-7-digits",
        "arabic-digit",
        "underscore",
        "semicolon",
    ],
)
def test_parse_int_rejects(value: str, low: int, high: int) -> None:
    with pytest.raises(InvalidValue, match=rf"{re.escape(L.PORT)}=.*from {low} to {high}"):
        L.parse_int(value, L.PORT, low, high)


# ---------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10", "10"),
        ("10s", "10s"),
        ("2m", "2m"),
        ("1h", "1h"),
        (" 30s ", "30s"),
        ("0", "0"),
        ("24h", "24h"),
        ("1440m", "1440m"),
        ("86400", "86400"),
    ],
    ids=["bare-seconds", "s", "m", "h", "padded", "zero", "24h", "1440m", "86400"],
)
def test_parse_duration_accepts(value: str, expected: str) -> None:
    assert L.parse_duration(value, L.FAIL_TIMEOUT) == expected


@pytest.mark.parametrize(
    "value",
    [
        *("", "s", "500ms", "1.5s", "10S", "1d", "1w", "-1s", "25h", "86401", "1441m"),
        *("1m30s", "10 s", "1234567s", "10s;"),
    ],
    ids=[
        "empty",
        "unit-only",
        "milliseconds",
        "fraction",
        "upper-unit",
        "days",
        "weeks",
        "negative",
        "over-a-day-h",
        "over-a-day-s",
        "over-a-day-m",
        "compound",
        "space",
        "seven-digits",
        "semicolon",
    ],
)
def test_parse_duration_rejects(value: str) -> None:
    with pytest.raises(InvalidValue, match=re.escape(L.FAIL_TIMEOUT)):
        L.parse_duration(value, L.FAIL_TIMEOUT)


# ---------------------------------------------------------------- parse_hash_key


@pytest.mark.parametrize(
    "value",
    [
        "$request_uri",
        "$remote_addr",
        "$binary_remote_addr",
        "$http_x_user",
        "$cookie_id",
        "$arg_id",
        "$request_uri:v1",
        "v1:$uri",
        "$uri$args",
        "$host/$uri,$arg_page=1",
        "$http_x_user-$remote_addr",
        "$http_X_Forwarded_For",
        "$arg_page2",
        "$cookie_SESSION_ID",
        "$request_uri.V1",
        "$request_uri-V1",
    ],
    ids=[
        "request_uri",
        "remote_addr",
        "binary_remote_addr",
        "http-prefix",
        "cookie-prefix",
        "arg-prefix",
        "literal-suffix",
        "literal-prefix",
        "two-variables",
        "mixed-literals",
        "dash-separator",
        "http-suffix-with-uppercase",
        "arg-suffix-with-digit",
        "cookie-suffix-uppercase",
        "uppercase-after-a-dot-is-literal",
        "uppercase-after-a-dash-is-literal",
    ],
)
def test_parse_hash_key_accepts(value: str) -> None:
    assert L.parse_hash_key(value) == value


def unknown(variable: str) -> str:
    """The complaint about one variable, which the message quotes with show()."""
    return re.escape(f"uses unknown variable {L.show(variable)} ")


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("$request_uri;", "character not allowed"),
        ("$request_uri; return 200", "character not allowed"),
        ("$uri $args", "character not allowed"),
        ('"$uri"', "character not allowed"),
        ("'$uri'", "character not allowed"),
        ("$uri}", "character not allowed"),
        ("{$uri", "character not allowed"),
        ("$uri\n$args", "character not allowed"),
        ("$uri\\", "character not allowed"),
        ("$uri#", "character not allowed"),
        ("${uri}", unknown("$")),
        ("$1", unknown("$1")),
        ("$Request_uri", unknown("$Request_uri")),
        ("$request_uriV1", unknown("$request_uriV1")),
        ("$remote_addrX", unknown("$remote_addrX")),
        ("v1:$uri2", unknown("$uri2")),
        ("$foo", unknown("$foo")),
        ("$request_uri_x", unknown("$request_uri_x")),
        ("$cookie", unknown("$cookie")),
        ("$http_", unknown("$http_")),
        ("$cookie_", unknown("$cookie_")),
        ("$arg_", unknown("$arg_")),
        ("$HTTP_x", unknown("$HTTP_x")),
        ("$", unknown("$")),
        ("$uri$", unknown("$")),
        ("v1", "at least one nginx variable"),
        ("", "at least one nginx variable"),
        ("$uri:" + "x" * 200, "at most 200"),
    ],
    ids=[
        "semicolon",
        "injection",
        "space",
        "double-quotes",
        "single-quotes",
        "close-brace",
        "open-brace",
        "newline",
        "backslash",
        "hash-sign",
        "braced-variable",
        "regex-capture",
        "uppercase-variable",
        "uppercase-glued-to-uri",
        "uppercase-glued-to-addr",
        "digit-glued-to-uri",
        "unknown-variable",
        "unknown-suffixed-variable",
        "bare-cookie-is-no-nginx-variable",
        "bare-http-prefix",
        "bare-cookie-prefix",
        "bare-arg-prefix",
        "uppercase-prefix",
        "lone-dollar",
        "trailing-dollar",
        "literal-only",
        "empty",
        "too-long",
    ],
)
def test_parse_hash_key_rejects(value: str, complaint: str) -> None:
    with pytest.raises(InvalidValue, match=complaint):
        L.parse_hash_key(value)


# ---------------------------------------------------------------- parse_hosts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("shop.example.com", ("shop.example.com",)),
        ("a.com,b.com", ("a.com", "b.com")),
        (" a.com , b.com ,", ("a.com", "b.com")),
        ("*.example.com", ("*.example.com",)),
        ("Shop.Example.COM", ("shop.example.com",)),
        ("shop.example.com.", ("shop.example.com",)),
        ("a.com,A.com,a.com.", ("a.com",)),
        ("localhost", ("localhost",)),
        ("x-1.y-2", ("x-1.y-2",)),
        ("", ()),
        (",,", ()),
    ],
    ids=[
        "one",
        "two",
        "padded-trailing-comma",
        "wildcard",
        "lowered",
        "trailing-dot",
        "deduplicated",
        "single-label",
        "dashes-inside",
        "empty",
        "only-commas",
    ],
)
def test_parse_hosts_accepts(value: str, expected: tuple[str, ...]) -> None:
    assert L.parse_hosts(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "a..b",
        "-a.com",
        "a-.com",
        "a b",
        "exa$mple.com",
        "shop.example.com;",
        "a.com}",
        "*",
        "*.*.com",
        "shop.*.com",
        "sh*p.com",
        "a_b.com",
        "a.com\nb.com",
        ("a" * 64) + ".com",
        ".".join(["abcdefgh"] * 29),
        "ex\u00e4mple.com",
        "good.com,bad..com",
    ],
    ids=[
        "empty-label",
        "leading-dash",
        "trailing-dash",
        "space",
        "dollar",
        "semicolon",
        "brace",
        "star-only",
        "double-wildcard",
        "inner-wildcard",
        "partial-wildcard",
        "underscore",
        "newline",
        "64-char-label",
        "over-253",
        "non-ascii",
        "one-bad-among-good",
    ],
)
def test_parse_hosts_rejects(value: str) -> None:
    with pytest.raises(InvalidValue, match=re.escape(L.HOSTS)):
        L.parse_hosts(value)


# ---------------------------------------------------------------- parse_method


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("round_robin", Method.ROUND_ROBIN),
        ("least_conn", Method.LEAST_CONN),
        ("ip_hash", Method.IP_HASH),
        ("hash", Method.HASH),
        ("random", Method.RANDOM),
        (" Least_Conn ", Method.LEAST_CONN),
    ],
    ids=["round_robin", "least_conn", "ip_hash", "hash", "random", "case-and-padding"],
)
def test_parse_method_accepts(value: str, expected: Method) -> None:
    assert L.parse_method(value) is expected


@pytest.mark.parametrize(
    "value",
    ["", "roundrobin", "least-conn", "random two", "hash $uri", "fair"],
    ids=["empty", "no-underscore", "dash", "with-param", "hash-with-key", "unknown"],
)
def test_parse_method_rejects(value: str) -> None:
    with pytest.raises(InvalidValue, match="use one of round_robin, least_conn"):
        L.parse_method(value)


# ---------------------------------------------------------------- parse_config_path


@pytest.mark.parametrize(
    "value",
    [
        "/etc/nginx/conf.d/controlplane.conf",
        "/x.conf",
        "/etc/nginx/conf.d/cp-2_a.b.conf",
        "/etc/nginx/.hidden/x.conf",
    ],
    ids=["default", "root", "dots-dashes", "hidden-dir"],
)
def test_parse_config_path_accepts(value: str) -> None:
    assert L.parse_config_path(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "controlplane.conf",
        "etc/nginx/x.conf",
        "/etc/nginx/../x.conf",
        "/../x.conf",
        "/etc/./x.conf",
        "/etc/nginx/x.txt",
        "/etc/nginx/x.conf.bak",
        "/etc/nginx/.conf",
        "/etc/nginx/",
        "/etc//x.conf",
        "/etc/nginx/x\n.conf",
        "/etc/nginx/a b.conf",
        "/etc/nginx/x;.conf",
        "/etc/nginx/nginx.conf",
        " /etc/nginx/nginx.conf ",
    ],
    ids=[
        "empty",
        "relative-bare",
        "relative",
        "dotdot",
        "leading-dotdot",
        "dot",
        "wrong-extension",
        "suffix-after-conf",
        "no-stem",
        "directory",
        "double-slash",
        "newline",
        "space",
        "semicolon",
        "main-nginx-conf",
        "main-nginx-conf-padded",
    ],
)
def test_parse_config_path_rejects(value: str) -> None:
    with pytest.raises(InvalidValue, match=re.escape(L.CONFIG_PATH)):
        L.parse_config_path(value)


def test_parse_config_path_says_why_nginx_conf_is_refused() -> None:
    with pytest.raises(InvalidValue, match="would replace nginx's main config"):
        L.parse_config_path("/etc/nginx/nginx.conf")


# ---------------------------------------------------------------- whole label sets


def test_parse_backend_labels_defaults_when_absent() -> None:
    assert L.parse_backend_labels({}) == L.BackendLabels()
    assert L.parse_service_labels({"unrelated": "x"}) == L.ServiceLabels()


def test_parse_backend_labels_reads_every_label() -> None:
    labels = {
        L.ENABLE: "true",
        L.SERVICE: "API",
        L.PORT: "8080",
        L.WEIGHT: "5",
        L.BACKUP: "yes",
        L.MAX_FAILS: "3",
        L.FAIL_TIMEOUT: "30s",
        L.MAX_CONNS: "100",
    }
    assert L.parse_backend_labels(labels) == L.BackendLabels(
        enabled=True,
        service="api",
        port=8080,
        weight=5,
        backup=True,
        max_fails=3,
        fail_timeout="30s",
        max_conns=100,
    )


def test_parse_service_labels_reads_every_label() -> None:
    labels = {
        L.ALGORITHM: "hash",
        L.HASH_KEY: "$request_uri",
        L.HASH_CONSISTENT: "on",
        L.RANDOM_TWO: "off",
        L.HOSTS: "a.com,b.com",
    }
    assert L.parse_service_labels(labels) == L.ServiceLabels(
        method=Method.HASH,
        hash_key="$request_uri",
        consistent=True,
        two=False,
        hosts=("a.com", "b.com"),
    )


def test_parse_backend_labels_reports_every_bad_label_at_once() -> None:
    bad = {
        L.ENABLE: "maybe",
        L.SERVICE: "-x",
        L.PORT: "0",
        L.WEIGHT: "heavy",
        L.BACKUP: "2",
        L.MAX_FAILS: "-1",
        L.FAIL_TIMEOUT: "5ms",
        L.MAX_CONNS: "1e9",
    }
    with pytest.raises(InvalidValue) as caught:
        L.parse_backend_labels(bad)
    message = str(caught.value)
    for label in bad:
        assert label in message
    assert message.count("; ") >= len(bad) - 1


def test_parse_service_labels_reports_every_bad_label_at_once() -> None:
    bad = {
        L.ALGORITHM: "fair",
        L.HASH_KEY: "$foo",
        L.HASH_CONSISTENT: "sure",
        L.RANDOM_TWO: "2",
        L.HOSTS: "a..b",
    }
    with pytest.raises(InvalidValue) as caught:
        L.parse_service_labels(bad)
    for label in bad:
        assert label in str(caught.value)


def test_rejected_value_is_shown_escaped_and_truncated() -> None:
    with pytest.raises(InvalidValue) as caught:
        L.parse_int("1\n}" + "x" * 200, L.WEIGHT, 1, 1000)
    message = str(caught.value)
    assert "\n" not in message
    assert "\\n}" in message
    assert "x" * 81 not in message


def test_algorithm_problem_only_for_hash_without_key() -> None:
    assert L.algorithm_problem(Algorithm(Method.HASH)) is not None
    assert L.algorithm_problem(Algorithm(Method.HASH, key="$uri")) is None
    assert L.algorithm_problem(Algorithm(Method.RANDOM, two=True)) is None


# ---------------------------------------------------------------- properties over any input

# What nginx would read as syntax, a second token, or a comment.
NGINX_META = re.compile(r"[\s;{}\"'\\#]")


@settings(max_examples=300, deadline=None, database=None)
@given(st.text())
def test_parsers_refuse_or_return_nginx_inert_text(value: str) -> None:
    """Whatever a label holds, a parser raises InvalidValue or returns text nginx reads as one
    plain token; no other exception escapes."""
    parsers: list[Callable[[str], str]] = [
        lambda v: L.parse_name(v, L.SERVICE),
        lambda v: L.parse_duration(v, L.FAIL_TIMEOUT),
        L.parse_hash_key,
        lambda v: ",".join(L.parse_hosts(v)),
        lambda v: L.parse_config_path(v),
        lambda v: L.parse_method(v).value,
    ]
    for parse in parsers:
        try:
            result = parse(value)
        except ControlPlaneError as error:
            assert isinstance(error, InvalidValue)
            continue
        assert not NGINX_META.search(result), (value, result)
        assert result.isascii()
