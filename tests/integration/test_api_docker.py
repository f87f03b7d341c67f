"""The API against real Docker and nginx: a method switched through the API changes what
nginx does, survives a restart of the controller, and a drained backend gets no requests."""

from __future__ import annotations

from pathlib import Path

import httpx
from docker.models.containers import Container

from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import Http, Lab, wait_until

PATHS = [f"/?key={i}" for i in range(24)]


def owners(http: Http) -> dict[str, str]:
    return {path: http.get("web", path).text.strip() for path in PATHS}


def pinned(http: Http) -> dict[str, str] | None:
    """Each key's backend, once two samples agree (the old workers have left)."""
    first = owners(http)
    return first if owners(http) == first else None


def start(factory: ControllerFactory, network: str, state_dir: Path) -> RunningController:
    return factory(network, api_bind="127.0.0.1:0", state_dir=state_dir)


def test_switch_method_restart_and_drain(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], tmp_path: Path
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    backends: list[Container] = [lab.backend(net) for _ in range(3)]
    names = {b.name for b in backends}
    controller = start(start_controller, str(net.name), tmp_path)
    http = http_for(lab.published_port(lb))
    api = httpx.Client(base_url=controller.api_url, timeout=30)
    wait_until(lambda: http.settled("web", names), what="round robin over the three")
    assert len(set(owners(http).values())) > 1, "round robin sends one path everywhere"

    reply = api.put(
        "/api/v1/services/web/algorithm?wait=true",
        json={"method": "hash", "key": "$request_uri", "consistent": True},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["applied"]["reloaded"] == [lb.name] and body["applied"]["errors"] == []
    mapping = wait_until(lambda: pinned(http), what="each key pinned to one backend")
    assert set(mapping.values()) == names, "24 keys should spread over the three backends"

    controller.stop()
    again = start(start_controller, str(net.name), tmp_path)
    api = httpx.Client(base_url=again.api_url, timeout=30)
    web = api.get("/api/v1/services/web").json()
    assert web["algorithm_source"] == "override"
    assert web["algorithm"] == {
        "method": "hash",
        "key": "$request_uri",
        "consistent": True,
        "two": False,
    }
    assert 'hash "$request_uri" consistent;' in again.config
    assert owners(http) == mapping, "a restarted controller must not move keys"

    drained = backends[0]
    reply = api.patch(
        f"/api/v1/services/web/backends/{drained.name}?wait=true", json={"drain": True}
    )
    assert reply.status_code == 200, reply.text
    states = {b["name"]: b["state"] for b in reply.json()["backends"]}
    assert states[drained.name] == "draining"
    wait_until(lambda: http.only("web", names - {drained.name}), what="no request to the drained")
    moved = owners(http)
    assert drained.name not in moved.values()
    assert all(moved[p] == mapping[p] for p in PATHS if mapping[p] != drained.name), (
        "draining with consistent hash must keep the other backends' keys"
    )
    records = api.get("/api/v1/dns/records").json()["records"]
    drained_ip = drained.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    assert drained_ip not in {r["value"] for r in records}

    api.patch(f"/api/v1/services/web/backends/{drained.name}?wait=true", json={"drain": False})
    wait_until(lambda: drained.name in owners(http).values(), what="the undrained back")


def test_a_rejected_template_is_visible_in_the_api(
    lab: Lab, start_controller: ControllerFactory, tmp_path: Path
) -> None:
    """nginx -t refuses a config the template made invalid: the API reports it per nginx,
    and the metrics count it."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "service.conf.j2").write_text(
        "upstream {{ s.upstream }} { {{ s.balancing or '' }} no_such_directive; }\n"
    )
    net = lab.network()
    lb = lab.nginx(net)
    lab.backend(net)
    controller = start_controller(
        str(net.name), api_bind="127.0.0.1:0", state_dir=tmp_path / "state", templates_dir=templates
    )
    api = httpx.Client(base_url=controller.api_url, timeout=30)
    reply = api.put("/api/v1/services/web/algorithm?wait=true", json={"method": "least_conn"})
    assert reply.status_code == 200
    assert reply.json()["applied"]["errors"], "nginx -t must have refused the config"
    (status,) = api.get("/api/v1/nginx").json()["nginx"]
    assert status["name"] == lb.name and status["last_result"] == "failed"
    assert status["last_error"].startswith("nginx -t failed, previous config kept")
    metrics = api.get("/metrics").text
    assert f'controlplane_nginx_reloads_total{{nginx="{lb.name}",result="failed"}}' in metrics
