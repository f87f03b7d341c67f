"""Health checks as operators set and see them: the API's override (PUT, GET and DELETE
.../health) over a real reconciler, loop and store, each field through its label's grammar
(a bad one refused with its name, never persisted, never a 500), the check and each backend's
health in the service view and the CLI, and each backend's transition as a log line and an
event."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck as Too
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from controlplane.activity import Activity, HealthEvents
from controlplane.api import bodies
from controlplane.api.app import create_app
from controlplane.cli_client import service_text
from controlplane.core import labels as L
from controlplane.core.health import Address, Health, Outcome, Result
from controlplane.core.model import ContainerFacts, HealthCheck, HealthMode
from controlplane.core.overrides import HEALTH_FIELDS, HealthSpec, check_health
from controlplane.errors import InvalidValue
from controlplane.gatekeeper import Gatekeeper
from controlplane.metrics import Metrics
from controlplane.reconciler import ControlLoop, Reconciler
from controlplane.settings import Settings
from controlplane.snapshot import ReconcileReport
from controlplane.store import OverrideStore
from controlplane.templating import load_template
from controlplane.wiring import api_context
from tests.unit.builders import container, nginx, state
from tests.unit.conftest import WEB, ApiHarness, HarnessFactory, served_document
from tests.unit.fakes import FakeDeployer, FakeEvents, FakeProber, FakeSource

HEALTH = "/api/v1/services/web/health"
WAIT = "?wait=true"


def put_health(api: ApiHarness, body: object, path: str = HEALTH, query: str = WAIT) -> Any:
    return api.call("PUT", path + query, json=body)


def error_of(response: Any) -> dict[str, Any]:
    found: dict[str, Any] = response.get_json()["error"]
    return found


# ---------------------------------------------------------------- the fields, in the core


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (HealthSpec(), HealthCheck(active=True)),
        (
            HealthSpec(path="/healthz"),
            HealthCheck(mode=HealthMode.HTTP, active=True, path="/healthz"),
        ),
        (
            HealthSpec(mode=" HTTP ", status="204", host="App.Example.com:8080"),
            HealthCheck(
                mode=HealthMode.HTTP, active=True, status=(204, 204), host="app.example.com:8080"
            ),
        ),
        (
            HealthSpec(mode="tcp", port=5432, interval="500ms", timeout="20ms", fails=1),
            HealthCheck(active=True, port=5432, interval_ms=500, timeout_ms=20, fails=1),
        ),
        (
            HealthSpec(interval="1m", start_period="1h"),
            HealthCheck(active=True, interval_ms=60_000, start_period=3600),
        ),
        (HealthSpec(mode="none"), HealthCheck(mode=HealthMode.NONE, active=False)),
    ],
    ids=["empty-is-tcp", "path-means-http", "http-fields", "tcp-fields", "units", "none"],
)
def test_fields_read_as_their_labels_do(spec: HealthSpec, check: HealthCheck) -> None:
    made = spec.to_check()
    assert made == check
    assert HealthSpec.of(made).to_check() == made == check_health(made)


CHECKS = st.builds(
    HealthCheck,
    mode=st.sampled_from([HealthMode.TCP, HealthMode.HTTP]),
    active=st.just(True),
    start_period=st.integers(1, L.MAX_START_PERIOD),
    path=st.sampled_from(["/", "/healthz", "/a?b=c&d=%20"]),
    port=st.none() | st.integers(1, 65535),
    host=st.none() | st.sampled_from(["app", "app.example.com:8443", "10.0.0.1"]),
    status=st.integers(100, 599).flatmap(
        lambda low: st.tuples(st.just(low), st.integers(low, 599))
    ),
    interval_ms=st.integers(*L.INTERVAL_MS),
    timeout_ms=st.integers(*L.TIMEOUT_MS),
    fails=st.integers(*L.THRESHOLD),
    passes=st.integers(*L.THRESHOLD),
)


@settings(max_examples=200)
@given(check=CHECKS)
def test_every_check_reads_back_as_the_api_shows_it(check: HealthCheck) -> None:
    if check.mode is HealthMode.TCP:  # the http fields keep their defaults
        check = replace(check, path="/", host=None, status=HealthCheck().status)
    assert HealthSpec.of(check).to_check() == check


# ---------------------------------------------------------------- set, show, reset


def test_put_get_delete_round_trip(api: ApiHarness) -> None:
    before = api.call("GET", "/api/v1/services/web").get_json()
    assert before["health"] == {
        "mode": "tcp",
        "active": False,
        "path": None,
        "port": None,
        "host": None,
        "status": None,
        "interval": None,
        "timeout": "1s",
        "fails": None,
        "passes": None,
        "start_period": "60s",
        "source": "default",
    }
    assert before["overrides"]["health"] is None
    body = {"mode": "http", "path": "/healthz", "interval": "2s", "timeout": "500ms", "fails": 1}
    reply = put_health(api, body)
    assert reply.status_code == 200, reply.get_json()
    changed = reply.get_json()
    shown = {
        "mode": "http",
        "active": True,
        "path": "/healthz",
        "port": None,
        "host": None,
        "status": "200-399",
        "interval": "2s",
        "timeout": "500ms",
        "fails": 1,
        "passes": 2,
        "start_period": "60s",
        "source": "api",
    }
    assert changed["health"] == shown and changed["applied"]["errors"] == []
    assert changed["overrides"]["health"] == {
        k: v for k, v in shown.items() if k not in ("active", "source")
    }
    assert api.call("GET", "/api/v1/services/web").get_json()["health"] == shown
    assert api.store.current.health["web"].timeout_ms == 500
    # what a reply shows of the override can be sent back as it is
    again = put_health(api, changed["overrides"]["health"])
    assert again.status_code == 200 and again.get_json()["health"] == shown
    (override, *_) = [
        e for e in api.call("GET", "/api/v1/events").get_json()["events"] if e["kind"] == "override"
    ]
    assert override["summary"] == (
        "service web: health check set to http GET /healthz on its port, status 200-399, every "
        "2s (timeout 500ms), out after 1 failing in a row, back after 2 passing; start period 60s"
    )
    removed = api.call("DELETE", HEALTH + WAIT)
    assert removed.status_code == 200 and removed.get_json()["health"] == before["health"]
    assert api.store.current.health == {}


def test_a_check_survives_a_restart(make_api: HarnessFactory) -> None:
    first = make_api()
    put_health(first, {"mode": "tcp", "port": 8080, "start_period": "2m"})
    make_api.stop()
    second = make_api()
    shown = second.call("GET", "/api/v1/services/web").get_json()["health"]
    assert (shown["source"], shown["port"], shown["start_period"]) == ("api", 8080, "120s")
    assert second.reconciler.snapshot is not None
    (web,) = second.reconciler.snapshot.topology.services
    assert web.health == HealthCheck(active=True, port=8080, start_period=120)


def test_the_override_beats_the_labels_and_hands_back_to_them(make_api: HarnessFactory) -> None:
    labels = {L.HEALTH_PATH: "/ready", L.HEALTH_FAILS: "5"}
    api = make_api(nginx("lb"), container("w1", labels=labels), container("w2", labels=labels))
    labelled = api.call("GET", "/api/v1/services/web").get_json()["health"]
    assert (labelled["source"], labelled["mode"], labelled["path"], labelled["fails"]) == (
        "label",
        "http",
        "/ready",
        5,
    )
    none = put_health(api, {"mode": "none"}).get_json()["health"]
    assert (none["source"], none["mode"], none["active"], none["path"]) == (
        "api",
        "none",
        False,
        None,
    )
    assert api.call("DELETE", HEALTH + WAIT).get_json()["health"] == labelled


def test_an_unknown_service_needs_create(api: ApiHarness) -> None:
    path = "/api/v1/services/api/health"
    missing = put_health(api, {"mode": "tcp"}, path=path)
    assert missing.status_code == 404 and "?create=true" in error_of(missing)["message"]
    assert api.call("DELETE", path).status_code == 404
    created = put_health(api, {"mode": "http"}, path=path, query="?create=true")
    assert created.status_code == 200 and created.get_json()["exists"] is False
    shown = api.call("GET", "/api/v1/services/api").get_json()
    assert (shown["exists"], shown["health"]["source"], shown["health"]["mode"]) == (
        False,
        "api",
        "http",
    )
    api.set_state(*WEB, container("a1", aliases=("api",), ip="172.20.0.8"))
    api.call("POST", "/api/v1/resync")
    assert api.call("GET", "/api/v1/services/api").get_json()["health"]["source"] == "api"
    assert api.call("DELETE", path).status_code == 200


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"mode": "udp"}, "mode", "mode='udp' is not a check"),
        ({"mode": 1}, "mode", "mode must be one of tcp, http, none or null"),
        ({"path": "healthz"}, "path", "path='healthz' is not a path"),
        ({"path": "/a b"}, "path", "is not a path"),
        ({"path": "/x\r\nHost: evil"}, "path", "is not a path"),
        ({"path": "/" + "x" * 300}, "path", "at most 256"),
        ({"port": 0}, "port", "port must be a whole number from 1 to 65535 or null, not 0"),
        ({"port": "80"}, "port", 'not "80"'),
        ({"port": 80.5}, "port", "not 80.5"),
        ({"host": "*.example.com"}, "host", "is not a host"),
        ({"host": "a;b"}, "host", "is not a host"),
        ({"host": "app:99999"}, "host", "is not a host"),
        ({"status": "200-99"}, "status", "is not a status range"),
        ({"status": "600"}, "status", "is not a status range"),
        ({"status": 200}, "status", "status must be a string or null"),
        ({"interval": "50ms"}, "interval", "from 0.1s to 3600s"),
        ({"interval": "2h"}, "interval", "from 0.1s to 3600s"),
        ({"interval": 5}, "interval", "interval must be a string or null"),
        ({"timeout": "61s"}, "timeout", "from 0.01s to 60s"),
        ({"timeout": "-1s"}, "timeout", "from 0.01s to 60s"),
        ({"fails": 0}, "fails", "fails must be a whole number from 1 to 100"),
        ({"fails": True}, "fails", "not true"),
        ({"passes": 101}, "passes", "passes must be a whole number from 1 to 100"),
        ({"start_period": "0s"}, "start_period", "from 1s to 3600s"),
        ({"start_period": "90m"}, "start_period", "from 1s to 3600s"),
        ({"mode": "none", "port": 80}, "port", "mode none checks nothing"),
        ({"mode": "tcp", "path": "/x"}, "path", "path applies only to mode http, not tcp"),
        ({"mode": "tcp", "status": "200"}, "status", "status applies only to mode http"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else None,
)
def test_every_bad_field_is_refused_with_its_name(
    api: ApiHarness, body: dict[str, object], field: str, says: str
) -> None:
    reply = put_health(api, body)
    assert reply.status_code == 422
    error = error_of(reply)
    assert error["code"] == "invalid_value" and error["details"]["field"] == field
    assert says in error["message"]
    assert api.store.current.health == {}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "the body must be a JSON object such as"),
        ({"mode": "http", "interval_ms": 2000}, "unknown field(s) 'interval_ms'"),
    ],
    ids=["array", "unknown-field"],
)
def test_a_body_of_the_wrong_shape_is_refused(api: ApiHarness, body: object, says: str) -> None:
    reply = put_health(api, body)
    assert reply.status_code == 422 and says in error_of(reply)["message"]
    assert "allowed_fields" in error_of(reply)["details"]


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> ApiHarness:
    factory = HarnessFactory(tmp_path_factory.mktemp("state"))
    yield factory()  # type: ignore[misc]
    factory.stop()


HOSTILE = st.text(max_size=40) | st.sampled_from(
    [
        "/healthz\r\nX: y",
        "/ok HTTP/1.0",
        "/%00",
        "/\u202e",
        "200-399; drop",
        "5s\n",
        " 5s ",
        "1e3ms",
        "0x10",
        "١٢٣",
        "app.example.com\x00",
        "tcp\n",
        "",
    ]
)
STRING_FIELDS = [f for f in HEALTH_FIELDS if f not in ("port", "fails", "passes")]


@settings(max_examples=300, deadline=None, suppress_health_check=[Too.function_scoped_fixture])
@given(
    field=st.sampled_from(STRING_FIELDS),
    value=HOSTILE,
    mode=st.sampled_from([None, "http", "tcp"]),
    number=st.sampled_from(["port", "fails", "passes"]),
    count=st.none()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False),
)
def test_hostile_values_never_give_a_500_and_are_never_persisted(
    shared_api: ApiHarness,
    field: str,
    value: str,
    mode: str | None,
    number: str,
    count: int | float | None,
) -> None:
    api = shared_api
    api.store.clear_health("web")
    body: dict[str, object] = {field: value, number: count}
    if mode is not None and field != "mode":
        body["mode"] = mode
    reply = api.call("PUT", HEALTH, data=json.dumps(body), content_type="application/json")
    assert reply.status_code in (200, 422), reply.get_data(as_text=True)
    kept = api.store.current.health.get("web")
    if reply.status_code == 422:
        assert kept is None
        assert error_of(reply)["details"]["field"] in body
        return
    assert kept is not None and check_health(kept) == kept
    assert L.HEALTH_PATH_RE.fullmatch(kept.path)
    assert kept.host is None or re.fullmatch(r"[a-z0-9.-]+(:[0-9]{1,5})?", kept.host)


# ---------------------------------------------------------------- the document


def _valid(api: ApiHarness, body: object) -> bool:
    doc = served_document(api.app)
    schema = {"$ref": "#/components/schemas/HealthCheck-Input", "components": doc["components"]}
    return Draft202012Validator(schema).is_valid(body)


def _accepted(body: object) -> bool:
    try:
        bodies.parse(bodies.HealthCheck, body)
    except InvalidValue:
        return False
    return True


BODIES = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from([None, "tcp", "http", "none"]),
        "path": st.sampled_from([None, "/", "/healthz"]),
        "port": st.none() | st.integers(-1, 65537) | st.booleans(),
        "host": st.sampled_from([None, "app.example.com"]),
        "status": st.sampled_from([None, "200-399", "204"]),
        "interval": st.sampled_from([None, "5s", "500ms"]),
        "timeout": st.sampled_from([None, "1s"]),
        "fails": st.none() | st.integers(-1, 102) | st.floats(0, 5),
        "passes": st.none() | st.integers(0, 101),
        "start_period": st.sampled_from([None, "60s", "2m"]),
    },
)


@settings(max_examples=300, deadline=None)
@given(body=BODIES)
def test_the_document_states_the_rules_of_a_check(
    shared_api: ApiHarness, body: dict[str, object]
) -> None:
    """Which field goes with which mode, and the bounds of the numbers: the document and the
    core agree (the strings here pass their grammar, which the document does not spell out)."""
    assert _valid(shared_api, body) == _accepted(body)


def test_the_documented_examples_are_accepted(shared_api: ApiHarness) -> None:
    schemas = served_document(shared_api.app)["components"]["schemas"]
    examples = schemas["HealthCheck-Input"]["examples"]
    assert examples
    for example in examples:
        assert _valid(shared_api, example) and _accepted(example)
    paths = served_document(shared_api.app)["paths"]["/api/v1/services/{name}/health"]
    assert set(paths) == {"put", "delete"}


# ---------------------------------------------------------------- transitions


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OK = Result(Outcome.STATUS, 200, 0.0015)
FAILING = Result(Outcome.STATUS, 500, 0.004)
CHECKED = {
    L.HEALTH: "http",
    L.HEALTH_PATH: "/healthz",
    L.HEALTH_INTERVAL: "1s",
    L.HEALTH_FAILS: "2",
    L.HEALTH_PASSES: "2",
}
W1 = container("w1", ip="172.20.0.2", labels=CHECKED)
W2 = container("w2", ip="172.20.0.3", labels=CHECKED)


class Checked:
    """A reconciler whose gate probes with a fake prober on a fake clock, with the events
    wired as in production (wiring.build_controller)."""

    def __init__(self, prober: FakeProber, *containers: ContainerFacts) -> None:
        self.clock = Clock(100.0)
        self.prober = prober
        self.source = FakeSource(state(*containers))
        self.gate = Gatekeeper(
            prober, wait=0.0, clock=self.clock, wall=lambda: 1e9, draw=lambda: 0.5, background=False
        )
        self.settings = Settings()
        self.reconciler = Reconciler(
            self.source,
            FakeDeployer(),
            load_template(),
            self.settings,
            clock=self.clock,
            gate=self.gate,
        )
        self.activity = Activity()
        events = HealthEvents(self.activity, lambda: self.reconciler.snapshot, self.source.known)
        self.reconciler.on_report.extend([events.on_report, self.activity.on_report])
        self.gate.on_transition.append(events.on_transition)
        self.reconciler.reconcile("start")

    def starts(self, facts: ContainerFacts) -> None:
        self.source.state = state(*self.source.state.containers, facts)
        self.reconciler.reconcile("start of " + facts.name)

    def ticks(self, seconds: int) -> None:
        for _ in range(seconds):
            self.clock.now += 1
            self.gate.tick()

    def health(self) -> list[str]:
        """The health events, oldest first."""
        return [e.summary for e in reversed(self.activity.entries()) if e.kind == "health"]

    def service(self) -> dict[str, Any]:
        loop = ControlLoop(self.reconciler, FakeEvents([]), self.settings, clock=self.clock)
        metrics = Metrics(lambda: self.reconciler.snapshot, nginx=lambda: self.reconciler.nginx)
        context = api_context(
            self.settings, self.reconciler, loop, OverrideStore(None), self.activity, metrics
        )
        app = create_app(context)
        events = app.test_client().get("/api/v1/events").get_json()["events"]
        assert {e["kind"] for e in events} >= {"health", "reconcile"}
        found: dict[str, Any] = app.test_client().get("/api/v1/services/web").get_json()
        return found


def test_each_transition_is_a_log_line_and_an_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.activity")
    prober = FakeProber({"172.20.0.2": OK, "172.20.0.3": OK})
    run = Checked(prober, nginx("lb"), W1)
    assert run.health() == [], "what the first pass found and passed is no news"
    run.starts(W2)
    assert run.health() == ["health: web/w2 on app: starting -> up (last: status 200)"]
    prober.answers["172.20.0.2"] = FAILING
    run.ticks(3)
    down = (
        "health: web/w1 on app: up -> down: failed 2 checks in a row (last: status 500); back "
        "in after 2 passing in a row (0 so far)"
    )
    assert run.health()[1:] == [down]
    assert down in caplog.messages
    (event,) = [e for e in run.activity.entries() if e.summary == down]
    assert event.details == {
        "container": W1.id,
        "name": "w1",
        "services": ["web"],
        "network": "app",
        "from": "up",
        "to": "down",
        "reason": down.split("up -> down: ")[1],
        "last": "status 500",
        "latency_ms": 4.0,
        "fails": 2,
        "passes": 0,
    }
    run.reconciler.reconcile("the gate moved")
    w1 = run.service()["backends"][0]
    assert (w1["name"], w1["state"], w1["health"]["state"]) == ("w1", "unhealthy", "down")
    prober.answers["172.20.0.2"] = OK
    run.ticks(3)
    assert run.health()[2:] == ["health: web/w1 on app: down -> up (last: status 200)"]


def test_the_cli_shows_the_check_and_each_backends_health() -> None:
    prober = FakeProber({"172.20.0.2": FAILING, "172.20.0.3": OK})
    run = Checked(prober, nginx("lb"), W1, W2)
    run.ticks(3)
    run.reconciler.reconcile("the gate moved")
    text = service_text(run.service())
    lines = text.splitlines()
    assert lines[2] == (
        "health: http GET /healthz on its port, status 200-399, every 1s (timeout 1s), out "
        "after 2 failing in a row, back after 2 passing; start period 60s (label)"
    )
    header, w1, w2 = (re.split(r"\s{2,}", line) for line in lines[3:6])
    assert header[-5:] == ["IN NGINX", "HEALTH", "IN A ROW", "LAST", "LATENCY"]
    assert w1[0] == "w1" and w1[-4:] == ["down", "4 failed", "status 500", "4.00ms"]
    assert w2[0] == "w2" and w2[-4:] == ["up", "4 passed", "status 200", "1.50ms"]
    column = lines[3].index("HEALTH")
    assert (lines[4][column:].split()[0], lines[5][column:].split()[0]) == ("down", "up")
    assert lines[6].startswith("w1 (app) is unhealthy: failed ")


def test_a_container_no_snapshot_names_is_told_by_id() -> None:
    activity = Activity()
    events = HealthEvents(activity, lambda: None, lambda _: None)
    key = Address("f" * 64, "2024-05-01T10:00:00Z", "app", "172.20.0.9", 80)
    down = Health("down", False, "failed 3 checks in a row (last: refused)", 1e9, True, "refused")
    events.on_transition(key, down)
    assert activity.entries() == [], "it waits for the pass that may name it"
    events.on_report(ReconcileReport("start", 1, True, ()))
    (entry,) = activity.entries()
    assert entry.summary == (
        "health: container ffffffffffff on app: up -> down: failed 3 checks in a row (last: "
        "refused)"
    )
    assert entry.details["name"] is None and entry.details["services"] == []


def test_where_a_backend_was_is_what_the_snapshot_shows_or_what_moved_since() -> None:
    prober = FakeProber({"172.20.0.2": OK, "172.20.0.3": OK})
    run = Checked(prober, nginx("lb"), W1, W2)
    prober.answers["172.20.0.2"] = FAILING
    run.ticks(3)
    prober.answers["172.20.0.2"] = OK
    run.ticks(3)  # down and back up with no pass between: the snapshot still says up
    moves = [re.match(r"health: web/w1 on app: (\w+ -> \w+)", s) for s in run.health()]
    assert [m.group(1) for m in moves if m] == ["up -> down", "down -> up"]
    run.source.state = state(nginx("lb"), W1, replace(W2, status="paused"))
    run.reconciler.reconcile("w2 paused")
    run.source.state = state(nginx("lb"), W1, W2)
    run.reconciler.reconcile("w2 unpaused")
    restarted = replace(W1, started_at="2024-05-01T11:00:00Z")
    run.source.state = state(nginx("lb"), restarted, W2)
    run.reconciler.reconcile("w1 restarted")
    assert run.health()[2:] == [
        "health: web/w2 on app: starting -> up (last: status 200)",
        "health: web/w1 on app: starting -> up (last: status 200)",
    ]
