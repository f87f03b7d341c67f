"""The API as a contract: the OpenAPI document names exactly the routes the app serves, it
accepts exactly the bodies the API's models accept, and no body or path a client can send makes
it answer 500 or write a broken config."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from controlplane.api import bodies
from controlplane.api.openapi import document
from controlplane.core.model import Method
from controlplane.errors import InvalidValue
from tests.unit.conftest import ApiHarness, HarnessFactory, served_document

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def test_document_is_valid_openapi_json_schema(api: ApiHarness) -> None:
    doc = document(api.app)
    assert doc["openapi"].startswith("3.1")
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_every_route_is_documented_and_every_documented_route_exists(api: ApiHarness) -> None:
    served = {
        (re.sub(r"<(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in api.app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in IGNORED_METHODS
    }
    documented = {
        (path, method)
        for path, item in document(api.app)["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == documented


def test_the_document_is_served(api: ApiHarness) -> None:
    assert api.call("GET", "/api/v1/openapi.json").get_json() == document(api.app)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["hash", "least_conn", "random", "$request_uri", "$uri;", '"', "\n"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["method", "key", "consistent", "two", "weight", "drain", "x"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)
DIRECTIVE_RE = re.compile(
    r'    (least_conn|ip_hash|random|random two least_conn|hash "\$[a-z_]+[^"\n;{}]*"'
    r"( consistent)?);"
)


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> ApiHarness:
    factory = HarnessFactory(tmp_path_factory.mktemp("state"))
    yield factory()  # type: ignore[misc]
    factory.stop()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=JSON,
    path=st.sampled_from(["/api/v1/services/web/algorithm", "/api/v1/services/web/backends/w1"]),
    name=st.sampled_from(["web", "w1", "x" * 64, "a%2Fb", "%00", "web.internal", "..."]),
)
def test_no_body_gives_a_500_or_a_broken_config(
    shared_api: ApiHarness, body: object, path: str, name: str
) -> None:
    api = shared_api
    method = "PUT" if path.endswith("algorithm") else "PATCH"
    target = path.replace("/web/", f"/{name}/") if name != "w1" else path
    reply = api.call(method, target, data=json.dumps(body), content_type="application/json")
    assert reply.status_code in (200, 404, 422), reply.get_data(as_text=True)
    for line in api.config.splitlines():
        if line.startswith("    ") and not line.startswith("     ") and line.endswith(";"):
            words = line.split()
            if words[0] in ("least_conn", "ip_hash", "random", "hash"):
                assert DIRECTIVE_RE.fullmatch(line), line


def test_a_crash_in_a_route_is_a_json_500(make_api: HarnessFactory) -> None:
    api = make_api()

    def broken() -> None:
        raise RuntimeError("boom")

    api.activity.entries = broken  # type: ignore[method-assign]
    reply = api.client.get("/api/v1/events")
    assert reply.status_code == 500
    assert reply.get_json()["error"]["code"] == "internal"


def _valid(api: ApiHarness, component: str, body: object) -> bool:
    """Does the served document allow `body` as this component?"""
    doc = served_document(api.app)
    schema = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    return Draft202012Validator(schema).is_valid(body)


def _accepted(model: type[BaseModel], body: object) -> bool:
    try:
        bodies.parse(model, body)
    except InvalidValue:
        return False
    return True


ALGORITHMS = st.fixed_dictionaries(
    {"method": st.sampled_from([m.value for m in Method])},
    optional={
        "key": st.sampled_from([None, "", "$request_uri", "$cookie_id"]),
        "consistent": st.sampled_from([None, False, True]),
        "two": st.sampled_from([None, False, True]),
    },
)
PATCHES = st.fixed_dictionaries(
    {},
    optional={
        "weight": st.none() | st.integers(-2, 1002) | st.booleans() | st.floats(0, 5),
        "drain": st.none() | st.booleans() | st.integers(0, 1),
        "backup": st.booleans(),
    },
)


@settings(max_examples=200, deadline=None)
@given(body=ALGORITHMS)
def test_the_document_states_the_rules_of_the_algorithm(
    shared_api: ApiHarness, body: dict[str, object]
) -> None:
    """Which option goes with which method: the document's rules and the core's agree (the
    keys here pass the hash-key grammar, which the document does not spell out)."""
    assert _valid(shared_api, "Algorithm-Input", body) == _accepted(bodies.Algorithm, body)


@settings(max_examples=200, deadline=None)
@given(body=PATCHES)
def test_the_document_states_the_backend_patch(
    shared_api: ApiHarness, body: dict[str, object]
) -> None:
    assert _valid(shared_api, "BackendPatch", body) == _accepted(bodies.BackendPatch, body)


@pytest.mark.parametrize(
    ("component", "model"),
    [("Algorithm-Input", bodies.Algorithm), ("BackendPatch", bodies.BackendPatch)],
)
def test_the_documented_examples_are_accepted(
    shared_api: ApiHarness, component: str, model: type[BaseModel]
) -> None:
    examples = served_document(shared_api.app)["components"]["schemas"][component]["examples"]
    assert examples
    for example in examples:
        assert _valid(shared_api, component, example) and _accepted(model, example)
