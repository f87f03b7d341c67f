"""Every route of the REST API and every error it can give, through Flask's test client, over
a real reconciler, loop and store (fake Docker and nginx). Every reply is checked against the
OpenAPI document by `ApiHarness.call`."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest

from controlplane.core import labels as L
from controlplane.core.dns_records import ZONE_SIGNATURE, signed_by, zone_from_data
from controlplane.errors import ApiError, ControlPlaneError, InvalidValue
from tests.unit.builders import container, nginx, state, swarm_service, task
from tests.unit.conftest import WEB, ApiHarness, HarnessFactory

WAIT = "?wait=true"


def put_algorithm(api: ApiHarness, body: object, service: str = "web", query: str = WAIT) -> Any:
    return api.call("PUT", f"/api/v1/services/{service}/algorithm{query}", json=body)


def patch_backend(
    api: ApiHarness, container_ref: str, body: object, query: str = WAIT, service: str = "web"
) -> Any:
    return api.call(
        "PATCH", f"/api/v1/services/{service}/backends/{container_ref}{query}", json=body
    )


def error_of(response: Any) -> dict[str, Any]:
    found: dict[str, Any] = response.get_json()["error"]
    return found


# ---------------------------------------------------------------- reading


def test_services_lists_web_with_its_backends(api: ApiHarness) -> None:
    reply = api.call("GET", "/api/v1/services")
    assert reply.status_code == 200
    (web,) = reply.get_json()["services"]
    assert web["name"] == "web" and web["exists"]
    assert web["algorithm"] == {
        "method": "round_robin",
        "key": None,
        "consistent": False,
        "two": False,
    }
    assert web["algorithm_source"] == "default"
    assert [(b["name"], b["ip"], b["state"]) for b in web["backends"]] == [
        ("w1", "172.20.0.2", "up"),
        ("w2", "172.20.0.3", "up"),
    ]
    assert web["hosts"] == ["web", "web.internal"]


def test_one_service_and_its_exclusions(make_api: HarnessFactory) -> None:
    api = make_api(*WEB, container("bad", ip="172.20.0.9", labels={L.WEIGHT: "0"}))
    reply = api.call("GET", "/api/v1/services/web")
    assert reply.status_code == 200
    ((excluded),) = reply.get_json()["excluded"]
    assert excluded["container"] == "bad" and excluded["reason"].startswith(f"{L.WEIGHT}='0'")
    backends = api.call("GET", "/api/v1/services").get_json()["services"][0]["backends"]
    assert "bad" not in [b["name"] for b in backends]
    problems = api.call("GET", "/api/v1/problems").get_json()
    assert [(e["container"], e["service"]) for e in problems["excluded"]] == [("bad", "web")]
    assert problems["nginx"] == []
    (event,) = [e for e in api.call("GET", "/api/v1/events").get_json()["events"]]
    assert any(c.startswith("service web: bad left out") for c in event["details"]["changes"])


def test_backends_say_whether_nginx_serves_them(make_api: HarnessFactory) -> None:
    """The API tells what the controller wants from what each nginx runs: a config nginx
    refused leaves the new backend out of nginx, and the service says which nginx and why."""
    api = make_api()
    web = api.call("GET", "/api/v1/services/web").get_json()
    assert [(b["name"], b["in_nginx"], b["served_by"]) for b in web["backends"]] == [
        ("w1", True, ["lb"]),
        ("w2", True, ["lb"]),
    ]
    (lb,) = web["nginx"]
    assert (lb["name"], lb["version"], lb["in_sync"], lb["serving"]) == ("lb", 1, True, 2)
    api.deployer.refuse = True
    api.set_state(*WEB, container("w3", ip="172.20.0.4"))
    api.call("POST", "/api/v1/resync")
    web = api.call("GET", "/api/v1/services/web").get_json()
    assert [(b["name"], b["in_nginx"]) for b in web["backends"]] == [
        ("w1", True),
        ("w2", True),
        ("w3", False),
    ]
    (lb,) = web["nginx"]
    assert (lb["version"], lb["in_sync"], lb["serving"]) == (1, False, 2)
    assert lb["failure"] == {
        "version": 2,
        "error": "nginx -t failed",
        "refused": True,
        "attempts": 1,
    }
    (listed,) = api.call("GET", "/api/v1/problems").get_json()["nginx"]
    assert listed["name"] == "lb" and listed["failure"]["version"] == 2
    (managed,) = api.call("GET", "/api/v1/nginx").get_json()["nginx"]
    assert managed["version"] == 1 and managed["failure"]["error"] == "nginx -t failed"
    refused = [
        e for e in api.call("GET", "/api/v1/events").get_json()["events"] if e["kind"] == "refused"
    ]
    assert refused[0]["summary"] == (
        "nginx lb did not take version 2 (nginx -t refused it): nginx -t failed; it keeps the "
        "config it had"
    )


@pytest.mark.parametrize("name", ["nope", "Bad..Name", "x" * 80, "web%0a"], ids=str)
def test_unknown_service_is_404(api: ApiHarness, name: str) -> None:
    reply = api.call("GET", f"/api/v1/services/{name}")
    assert reply.status_code == 404
    assert error_of(reply)["code"] == "unknown_service"


def test_config_is_the_rendered_text(api: ApiHarness) -> None:
    reply = api.call("GET", "/api/v1/config")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    assert reply.get_data(as_text=True) == api.config
    assert "upstream cp_web" in api.config


def test_nginx_shows_the_deployed_checksum(api: ApiHarness) -> None:
    reply = api.call("GET", "/api/v1/nginx").get_json()
    (lb,) = reply["nginx"]
    assert lb["name"] == "lb" and lb["current"] and lb["last_result"] == "ok"
    assert lb["checksum"] == reply["checksum"] and lb["reloads"] == 1


def test_nginx_lists_the_tasks_of_an_nginx_swarm_service_on_other_nodes(api: ApiHarness) -> None:
    elsewhere = task("edge", 1, "10.0.1.9", node="node2", container="c0ffee")
    edge = swarm_service("edge", elsewhere, labels={L.ROLE: "nginx"})
    api.source.state = replace(state(*WEB), swarm_services=(edge,), node_id="node1")
    api.call("POST", "/api/v1/resync")
    reply = api.call("GET", "/api/v1/nginx").get_json()
    assert [n["name"] for n in reply["nginx"]] == ["lb"]
    [remote] = reply["remote"]
    assert (remote["task"], remote["name"], remote["node"]) == (
        elsewhere.id,
        elsewhere.name,
        "node2",
    )
    assert "through that node's engine" in remote["reason"]


def test_nginx_shows_a_refused_config(api: ApiHarness) -> None:
    api.deployer.refuse = True
    put_algorithm(api, {"method": "least_conn"})
    (lb,) = api.call("GET", "/api/v1/nginx").get_json()["nginx"]
    assert lb["last_result"] == "failed" and lb["last_error"] == "nginx -t failed"
    assert not lb["current"] and lb["failures"] == 1
    metrics = api.call("GET", "/metrics").get_data(as_text=True)
    assert 'controlplane_nginx_reloads_total{nginx="lb",result="failed"} 1.0' in metrics


def test_events_list_changes_newest_first(api: ApiHarness) -> None:
    put_algorithm(api, {"method": "least_conn"})
    events = api.call("GET", "/api/v1/events").get_json()["events"]
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["reconcile", "override"] and kinds[-1] == "reconcile"
    assert "least_conn" in events[1]["summary"]
    assert len(api.call("GET", "/api/v1/events?limit=1").get_json()["events"]) == 1


@pytest.mark.parametrize("limit", ["0", "501", "x", "-1", "1.5", "%2B5", "1_0"])
def test_events_limit_is_checked(api: ApiHarness, limit: str) -> None:
    reply = api.call("GET", f"/api/v1/events?limit={limit}")
    assert reply.status_code == 422
    assert error_of(reply)["details"] == {"parameter": "limit"}
    assert "must be a whole number from 1 to 500" in error_of(reply)["message"]


def test_dns_records_of_live_backends(api: ApiHarness) -> None:
    reply = api.call("GET", "/api/v1/dns/records").get_json()
    a_records = {r["value"] for r in reply["records"] if r["name"] == "web.internal"}
    assert {"172.20.0.2", "172.20.0.3"} <= a_records
    assert reply["domain"] == "internal" and reply["version"] >= 1


def test_dns_zone_is_the_zone_the_dns_service_answers_from(api: ApiHarness) -> None:
    """What `controlplane dns --controller` follows: the zone whole, at once when the caller
    has another version (a restarted controller counts from 1 again), else after `timeout`."""
    reply = api.call("GET", "/api/v1/dns/zone?timeout=0").get_json()
    zone = zone_from_data(reply["zone"])
    assert zone.version == reply["version"] >= 1
    assert {r.value for r in zone.lookup("web.internal", "A") or ()} >= {"172.20.0.2"}
    assert isinstance(reply["allowed"], list)
    started = time.monotonic()
    again = api.call("GET", f"/api/v1/dns/zone?after={reply['version']}&timeout=0.2")
    assert again.get_json()["version"] == reply["version"]
    assert time.monotonic() - started >= 0.15
    bad = api.call("GET", "/api/v1/dns/zone?timeout=31")
    assert bad.status_code == 422 and "timeout" in bad.get_data(as_text=True)


def test_dns_zone_is_signed_with_the_api_token(make_api: HarnessFactory) -> None:
    """A DNS service holding the token takes only the zone the controller signed."""
    api = make_api(*WEB, token="t0k")
    reply = api.call("GET", "/api/v1/dns/zone?timeout=0")  # a read: no token needed
    assert reply.status_code == 200
    assert signed_by("t0k", reply.get_data(), reply.headers.get(ZONE_SIGNATURE))
    assert not signed_by("other", reply.get_data(), reply.headers.get(ZONE_SIGNATURE))
    assert abs(reply.get_json()["issued"] - time.time()) < 60


def test_resync_reinspects_and_reports(api: ApiHarness) -> None:
    api.set_state(*WEB, container("w3", ip="172.20.0.4"))
    reply = api.call("POST", "/api/v1/resync")
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["changed"] and body["done"] and body["reloaded"] == ["lb"]
    assert None in api.source.invalidated
    assert "172.20.0.4:80" in api.config


def test_health_and_readiness(api: ApiHarness) -> None:
    assert api.call("GET", "/healthz").get_json() == {"status": "ok"}
    assert api.call("GET", "/readyz").get_json() == {"ready": True, "reasons": []}
    api.source.unavailable = True
    api.call("POST", "/api/v1/resync")
    reply = api.call("GET", "/readyz")
    assert reply.status_code == 503
    assert reply.get_json()["reasons"] == ["the last reconcile could not reach Docker"]


def test_before_the_first_sync_reads_are_503(make_api: HarnessFactory) -> None:
    api = make_api()
    api.reconciler.snapshot = None
    reply = api.call("GET", "/api/v1/services")
    assert reply.status_code == 503 and error_of(reply)["code"] == "not_ready"


def test_metrics_name_what_operators_watch(api: ApiHarness) -> None:
    put_algorithm(api, {"method": "least_conn"})
    reply = api.call("GET", "/metrics")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    text = reply.get_data(as_text=True)
    for name in (
        'controlplane_nginx_reloads_total{nginx="lb",result="ok"} 2.0',
        'controlplane_backends{service="web",state="up"} 2.0',
        "controlplane_reconcile_duration_seconds_count",
        "controlplane_event_to_apply_seconds_count",
        "controlplane_reconcile_failures_total 0.0",
        "controlplane_snapshot_version 2.0",
        'controlplane_backend_in_nginx{backend="w1",nginx="lb",service="web"} 1.0',
        'controlplane_nginx_config_failed{nginx="lb"} 0.0',
    ):
        assert name in text
    api.deployer.refuse = True
    api.set_state(*WEB, container("w3", ip="172.20.0.4"))
    api.call("POST", "/api/v1/resync")
    text = api.call("GET", "/metrics").get_data(as_text=True)
    assert 'controlplane_backend_in_nginx{backend="w3",nginx="lb",service="web"} 0.0' in text
    assert 'controlplane_nginx_config_failed{nginx="lb"} 1.0' in text


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize(
    ("body", "directive"),
    [
        ({"method": "least_conn"}, "    least_conn;"),
        ({"method": "ip_hash"}, "    ip_hash;"),
        ({"method": "hash", "key": "$request_uri"}, '    hash "$request_uri";'),
        (
            {"method": "hash", "key": "$cookie_id", "consistent": True},
            '    hash "$cookie_id" consistent;',
        ),
        ({"method": "random"}, "    random;"),
        ({"method": "random", "two": True}, "    random two least_conn;"),
        ({"method": " LEAST_CONN "}, "    least_conn;"),
        (
            {"method": "least_conn", "key": None, "consistent": False, "two": False},
            "    least_conn;",
        ),
    ],
    ids=[
        "least_conn",
        "ip_hash",
        "hash",
        "hash-consistent",
        "random",
        "random-two",
        "case-and-space",
        "as-a-get-returns-it",
    ],
)
def test_put_algorithm_applies_and_reports(api: ApiHarness, body: object, directive: str) -> None:
    reply = put_algorithm(api, body)
    assert reply.status_code == 200
    service = reply.get_json()
    assert service["algorithm_source"] == "override"
    assert service["applied"]["done"] and service["applied"]["reloaded"] == ["lb"]
    assert service["applied"]["errors"] == []
    assert directive in api.config
    assert service["overrides"]["algorithm"] == service["algorithm"]


def test_round_robin_override_beats_a_label(make_api: HarnessFactory) -> None:
    api = make_api(nginx("lb"), container("w1", labels={L.ALGORITHM: "least_conn"}))
    assert "least_conn;" in api.config
    reply = put_algorithm(api, {"method": "round_robin"}).get_json()
    assert reply["algorithm_source"] == "override" and "least_conn;" not in api.config
    removed = api.call("DELETE", f"/api/v1/services/web/algorithm{WAIT}").get_json()
    assert removed["algorithm_source"] == "label" and "least_conn;" in api.config


def test_without_wait_the_reply_has_the_planned_version(api: ApiHarness) -> None:
    before = api.reconciler.snapshot
    assert before is not None
    reply = put_algorithm(api, {"method": "least_conn"}, query="")
    assert reply.status_code == 200
    assert reply.get_json()["applied"]["version"] == before.version + 1


def test_wait_times_out_but_the_change_is_kept(api: ApiHarness) -> None:
    api.deployer.delay = 0.5
    reply = put_algorithm(api, {"method": "least_conn"}, query="?wait=true&timeout=0.1")
    applied = reply.get_json()["applied"]
    assert reply.status_code == 200 and not applied["done"]
    assert "had not reloaded after 0.1 s" in applied["errors"][0]
    assert "web" in api.store.current.algorithms


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], None),
        ("least_conn", None),
        ({}, "method"),
        ({"method": 3}, "method"),
        ({"method": "fastest"}, "method"),
        ({"method": "least_conn", "weight": 1}, None),
        ({"method": "hash"}, "key"),
        ({"method": "hash", "key": "$nope"}, "key"),
        ({"method": "hash", "key": "request_uri"}, "key"),
        ({"method": "hash", "key": '$uri"; } server { listen 81'}, "key"),
        ({"method": "hash", "key": "$uri\n$host"}, "key"),
        ({"method": "hash", "key": "$uri", "consistent": "yes"}, "consistent"),
        ({"method": "least_conn", "key": "$uri"}, "key"),
        ({"method": "least_conn", "consistent": True}, "consistent"),
        ({"method": "hash", "key": "$uri", "two": True}, "two"),
        ({"method": "random", "two": 1}, "two"),
    ],
    ids=[
        "array",
        "string",
        "empty",
        "method-number",
        "method-unknown",
        "unknown-field",
        "hash-without-key",
        "unknown-variable",
        "no-variable",
        "injection",
        "newline",
        "consistent-string",
        "key-for-least_conn",
        "consistent-for-least_conn",
        "two-for-hash",
        "two-number",
    ],
)
def test_bad_algorithm_is_422_and_changes_nothing(
    api: ApiHarness, body: object, field: str | None
) -> None:
    before = api.config
    reply = put_algorithm(api, body)
    assert reply.status_code == 422
    error = error_of(reply)
    assert error["code"] == "invalid_value" and error["message"]
    if field:
        assert error["details"]["field"] == field
    assert api.config == before and api.store.current.algorithms == {}


def test_unknown_service_needs_create(api: ApiHarness) -> None:
    reply = put_algorithm(api, {"method": "least_conn"}, service="api")
    assert reply.status_code == 404 and "?create=true" in error_of(reply)["message"]
    created = put_algorithm(api, {"method": "least_conn"}, service="api", query="?create=true")
    assert created.status_code == 200
    assert created.get_json()["exists"] is False
    assert api.call("GET", "/api/v1/services/api").get_json()["algorithm"]["method"] == (
        "least_conn"
    )
    api.set_state(*WEB, container("a1", aliases=("api",), ip="172.20.0.8"))
    api.call("POST", "/api/v1/resync")
    shown = api.call("GET", "/api/v1/services/api").get_json()
    assert shown["exists"] and shown["algorithm_source"] == "override"
    assert "least_conn;" in api.config.split("upstream cp_api")[1]


def test_delete_algorithm_of_unknown_service_is_404(api: ApiHarness) -> None:
    assert api.call("DELETE", "/api/v1/services/api/algorithm").status_code == 404


# ---------------------------------------------------------------- backends


def test_weight_and_drain_apply_and_undo(api: ApiHarness) -> None:
    reply = patch_backend(api, "w1", {"weight": 5})
    assert reply.status_code == 200
    assert "172.20.0.2:80 weight=5;" in api.config
    backends = {b["name"]: b for b in reply.get_json()["backends"]}
    assert backends["w1"]["weight"] == 5

    drained = patch_backend(api, "w2", {"drain": True}).get_json()
    assert {b["name"]: b["state"] for b in drained["backends"]} == {"w1": "up", "w2": "draining"}
    assert "172.20.0.3:80 down;" in api.config
    records = api.call("GET", "/api/v1/dns/records").get_json()["records"]
    assert "172.20.0.3" not in {r["value"] for r in records}

    patch_backend(api, "w2", {"drain": False})
    assert "172.20.0.3:80;" in api.config
    patch_backend(api, "w1", {"weight": None})
    assert "weight=" not in api.config
    assert api.store.current.backends == {}


def test_every_backend_drained_answers_503(api: ApiHarness) -> None:
    patch_backend(api, "w1", {"drain": True})
    patch_backend(api, "w2", {"drain": True})
    assert "upstream cp_web" not in api.config and "return 503" in api.config


def test_delete_backend_removes_its_overrides(api: ApiHarness) -> None:
    patch_backend(api, "w1", {"weight": 7, "drain": True})
    reply = api.call("DELETE", f"/api/v1/services/web/backends/w1{WAIT}")
    assert reply.status_code == 200 and api.store.current.backends == {}
    assert "172.20.0.2:80;" in api.config


def test_backend_by_id_prefix(api: ApiHarness) -> None:
    w1 = container("w1")
    reply = patch_backend(api, w1.id[:8], {"weight": 3})
    assert reply.status_code == 200
    assert api.store.current.backends == {"web": {"w1": api.store.current.backends["web"]["w1"]}}


def test_unknown_backend_is_404_unless_created(api: ApiHarness) -> None:
    reply = patch_backend(api, "w9", {"drain": True})
    assert reply.status_code == 404 and error_of(reply)["code"] == "unknown_backend"
    assert error_of(reply)["details"]["backends"] == ["w1", "w2"]
    created = patch_backend(api, "w9", {"drain": True}, query="?create=true")
    assert created.status_code == 200 and "w9" in api.store.current.backends["web"]
    api.set_state(*WEB, container("w9", ip="172.20.0.9"))
    api.call("POST", "/api/v1/resync")
    assert "172.20.0.9:80 down;" in api.config


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"weight": 0},
        {"weight": 1001},
        {"weight": "5"},
        {"weight": True},
        {"weight": 1.5},
        {"drain": "yes"},
        {"drain": None},
        {"backup": True},
        [],
    ],
    ids=[
        "empty",
        "weight-0",
        "weight-1001",
        "weight-string",
        "weight-bool",
        "weight-float",
        "drain-string",
        "drain-null",
        "unknown-field",
        "array",
    ],
)
def test_bad_backend_patch_is_422(api: ApiHarness, body: object) -> None:
    before = api.config
    reply = patch_backend(api, "w1", body)
    assert reply.status_code == 422 and error_of(reply)["code"] == "invalid_value"
    assert api.config == before


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        (
            "algorithm",
            {"method": "hash", "key": "$uri", "consistent": "yes"},
            "true, false or null",
        ),
        ("algorithm", {"method": "fastest"}, "use one of round_robin, least_conn"),
        ("algorithm", {"method": "ip_hash", "two": True}, "two applies only to method random"),
        ("backends/w1", {"weight": 0}, "a whole number from 1 to 1000 or null, not 0"),
        ("backends/w1", {"drain": None}, "drain must be true or false, not null"),
        ("backends/w1", {}, "the body names no field"),
    ],
    ids=["flag", "method", "option-of-another-method", "weight", "drain", "nothing"],
)
def test_a_refused_body_says_what_is_allowed(
    api: ApiHarness, path: str, body: object, says: str
) -> None:
    reply = api.call(
        "PUT" if path == "algorithm" else "PATCH", f"/api/v1/services/web/{path}", json=body
    )
    assert reply.status_code == 422 and says in error_of(reply)["message"]


def test_bad_container_name_with_create_is_422(api: ApiHarness) -> None:
    reply = patch_backend(api, "-bad", {"drain": True}, query="?create=true")
    assert reply.status_code == 422


# ---------------------------------------------------------------- HTTP errors


def test_wrong_content_type_is_415(api: ApiHarness) -> None:
    reply = api.call(
        "PUT",
        "/api/v1/services/web/algorithm",
        data='{"method": "ip_hash"}',
        content_type="text/plain",
    )
    assert reply.status_code == 415 and error_of(reply)["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "data",
    [
        '{"method": ',
        '{"method": NaN}',
        "\xff",
        "[" * 100_000,
        '{"method": "hash", "key": Infinity}',
    ],
    ids=["truncated", "nan", "not-utf8", "deep", "infinity"],
)
def test_malformed_json_is_400(api: ApiHarness, data: str) -> None:
    reply = api.call(
        "PUT", "/api/v1/services/web/algorithm", data=data, content_type="application/json"
    )
    assert reply.status_code in (400, 413)
    assert error_of(reply)["code"] in ("malformed_json", "request_entity_too_large")


def test_body_too_large_is_413(api: ApiHarness) -> None:
    body = json.dumps({"method": "least_conn", "key": "x" * 70_000})
    reply = api.call(
        "PUT", "/api/v1/services/web/algorithm", data=body, content_type="application/json"
    )
    assert reply.status_code == 413


def test_api_errors_share_the_package_error_root() -> None:
    assert issubclass(ApiError, ControlPlaneError) and issubclass(InvalidValue, ControlPlaneError)


def test_wrong_method_is_405_with_allow(api: ApiHarness) -> None:
    reply = api.client.post("/api/v1/services")
    assert reply.status_code == 405 and "GET" in reply.headers["Allow"]
    assert error_of(reply)["code"] == "method_not_allowed"


def test_unknown_route_is_json_404(api: ApiHarness) -> None:
    reply = api.client.get("/api/v2/nothing")
    assert reply.status_code == 404 and error_of(reply)["code"] == "not_found"


@pytest.mark.parametrize("query", ["?wait=maybe", "?timeout=0", "?timeout=61", "?create=2"])
def test_bad_query_values_are_422(api: ApiHarness, query: str) -> None:
    reply = put_algorithm(api, {"method": "least_conn"}, query=query)
    assert reply.status_code == 422 and "parameter" in error_of(reply)["details"]
    assert api.store.current.algorithms == {}, "a refused request must change nothing"
    patched = patch_backend(api, "w1", {"drain": True}, query=query)
    assert patched.status_code == 422 and api.store.current.backends == {}


# ---------------------------------------------------------------- token


def test_token_guards_changes_not_reads(make_api: HarnessFactory) -> None:
    api = make_api(token="s3cret")
    assert api.call("GET", "/api/v1/services").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        reply = api.call(
            "PUT", "/api/v1/services/web/algorithm", json={"method": "ip_hash"}, headers=headers
        )
        assert reply.status_code == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.call("POST", "/api/v1/resync").status_code == 401
    ok = api.call(
        "PUT",
        "/api/v1/services/web/algorithm",
        json={"method": "ip_hash"},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert ok.status_code == 200


# ---------------------------------------------------------------- persistence


def test_overrides_survive_a_restart(make_api: HarnessFactory) -> None:
    first = make_api()
    put_algorithm(first, {"method": "hash", "key": "$request_uri", "consistent": True})
    patch_backend(first, "w2", {"drain": True, "weight": 4})
    make_api.stop()
    second = make_api()
    web = second.call("GET", "/api/v1/services/web").get_json()
    assert web["algorithm_source"] == "override"
    assert web["algorithm"]["key"] == "$request_uri"
    assert {b["name"]: (b["weight"], b["state"]) for b in web["backends"]} == {
        "w1": (1, "up"),
        "w2": (4, "draining"),
    }
    assert 'hash "$request_uri" consistent;' in second.config


def test_a_refused_change_sent_again_is_tried_again(api: ApiHarness) -> None:
    """The reply must say what nginx says now, not stay silent because it refused before."""
    api.deployer.refuse = True
    first = patch_backend(api, "w1", {"weight": 7}).get_json()["applied"]
    assert first["errors"] == ["lb: nginx -t failed"]
    again = patch_backend(api, "w1", {"weight": 7}).get_json()["applied"]
    assert again["errors"] == ["lb: nginx -t failed"] and not again["reloaded"]
    api.deployer.refuse = False
    fixed = patch_backend(api, "w1", {"weight": 7}).get_json()["applied"]
    assert fixed["errors"] == [] and fixed["reloaded"] == ["lb"]


def test_a_reply_before_the_pass_started_says_so(api: ApiHarness) -> None:
    api.deployer.delay = 0.6
    api.set_state(*WEB, container("w3", ip="172.20.0.4"))
    busy = api.loop.request("busy", False)  # a pass with a slow deploy holds the loop
    assert busy.planned.wait(2)
    reply = put_algorithm(api, {"method": "ip_hash"}, query="?timeout=0.1").get_json()
    applied = reply["applied"]
    assert not applied["done"] and "had not started" in applied["errors"][0]
    assert api.store.current.algorithms["web"].method.value == "ip_hash"


def test_least_time_is_refused_while_an_nginx_reloads(api: ApiHarness) -> None:
    reply = put_algorithm(api, {"method": "least_time"})
    assert reply.status_code == 422
    error = reply.get_json()["error"]
    assert error["code"] == "needs_dynamic_dataplane" and "lb" in error["message"]
    assert "least_time" not in api.config


def test_least_time_goes_to_a_dynamic_nginx_without_a_reload(make_api: HarnessFactory) -> None:
    api = make_api(lua=True)
    reloads = len(api.deployer.deployed)
    reply = put_algorithm(api, {"method": "least_time"})
    assert reply.status_code == 200, reply.get_json()
    assert len(api.deployer.deployed) == reloads
    assert b'"method":"least_time"' in api.deployer.pushed[-1][1]


def test_the_config_of_one_nginx_is_the_one_its_data_plane_gets(make_api: HarnessFactory) -> None:
    api = make_api(lua=True)
    whole = api.client.get("/api/v1/config")
    assert whole.status_code == 200 and "upstream cp_web" in whole.get_data(as_text=True)
    mine = api.client.get("/api/v1/config?nginx=lb")
    assert mine.status_code == 200
    text = mine.get_data(as_text=True)
    assert "balancer_by_lua_block" in text and "upstream cp_web" not in text
    assert text.encode() == api.deployer.deployed[-1][1]
    missing = api.client.get("/api/v1/config?nginx=nope")
    assert missing.status_code == 404
    assert "GET /api/v1/nginx" in missing.get_json()["error"]["message"]
    assert api.client.get("/api/v1/config?nginx=bad%20name").status_code == 422
