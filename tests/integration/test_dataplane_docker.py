"""The dynamic data plane with real Docker and nginx: endpoint changes without a reload,
counted from nginx's own log; the mode each nginx runs and why; a restarted nginx serving
at once; no way in for other containers; least_time steering away from a slow backend."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from docker.models.containers import Container
from docker.models.networks import Network

from controlplane.core.model import NginxTarget
from controlplane.nginx_deployer import NginxDeployer
from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import Http, Lab, wait_until

DYNAMIC = pytest.mark.parametrize("lab", ["dynamic"], indirect=True)


def api(url: str, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, timeout=10.0)


@dataclass
class Served:
    """A managed nginx serving service web from one backend, and the controller behind it."""

    net: Network
    lb: Container
    backend: Container
    controller: RunningController
    http: Http


def one_backend_served(
    lab: Lab,
    start_controller: ControllerFactory,
    http_for: type[Http],
    nginx_labels: dict[str, str] | None = None,
) -> Served:
    net = lab.network()
    lb = lab.nginx(net, labels=nginx_labels)
    backend = lab.backend(net)
    controller = start_controller(net.name, api_bind="127.0.0.1:0")
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", {backend.name}), what="the first backend")
    return Served(net, lb, backend, controller, http)


@DYNAMIC
def test_scale_drain_weight_and_method_changes_cost_no_reload(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    served = one_backend_served(lab, start_controller, http_for)
    net, lb, first, controller, http = (
        served.net,
        served.lb,
        served.backend,
        served.controller,
        served.http,
    )
    reloads = lab.reloads(lb)
    assert reloads == 1, "the dynamic config goes in once, with one reload"

    more = [lab.backend(net) for _ in range(3)]
    names = {first.name, *(b.name for b in more)}
    wait_until(lambda: http.settled("web", names), what="four backends")
    more[0].stop(timeout=1)
    wait_until(lambda: http.settled("web", names - {more[0].name}), what="one stopped")
    url = controller.api_url
    assert api(url, "PUT", "/api/v1/services/web/algorithm?wait=true", {"method": "least_time"})
    drained = api(
        url, "PATCH", f"/api/v1/services/web/backends/{more[1].name}?wait=true", {"drain": True}
    )
    assert drained.status_code == 200, drained.text
    wait_until(
        lambda: http.settled("web", names - {more[0].name, more[1].name}), what="one drained"
    )
    weighted = api(
        url, "PATCH", f"/api/v1/services/web/backends/{first.name}?wait=true", {"weight": 5}
    )
    assert weighted.status_code == 200, weighted.text
    hashed = {"method": "hash", "key": "$arg_u", "consistent": True}
    assert api(url, "PUT", "/api/v1/services/web/algorithm?wait=true", hashed).status_code == 200
    wait_until(
        lambda: len({http.get("web", "/?u=7").text for _ in range(10)}) == 1,
        what="hash by ?u= sticking",
    )
    assert lab.reloads(lb) == reloads, "no endpoint, weight or method change reloaded nginx"
    listed = api(url, "GET", "/api/v1/nginx").json()["nginx"][0]
    assert listed["dataplane"] == "dynamic" and listed["pushes"] >= 5
    assert "controlplane.dataplane=dynamic" in listed["dataplane_reason"]


@pytest.mark.parametrize("lab", ["reload", "dynamic"], indirect=True)
def test_auto_picks_the_data_plane_the_image_can_run(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    served = one_backend_served(lab, start_controller, http_for, {"controlplane.dataplane": "auto"})
    controller = served.controller
    listed = api(controller.api_url, "GET", "/api/v1/nginx").json()["nginx"][0]
    assert listed["dataplane"] == lab.dataplane
    assert ("has lua" if lab.dataplane == "dynamic" else "has no lua") in listed["dataplane_reason"]
    # a reload nginx's traffic reports are sampled (the default 10); a dynamic one counts all
    assert listed["stats_sample"] == (10 if lab.dataplane == "reload" else None)
    services = api(controller.api_url, "GET", "/api/v1/services/web").json()
    assert services["nginx"][0]["dataplane"] == lab.dataplane
    assert services["nginx"][0]["stats_sample"] == listed["stats_sample"]


@DYNAMIC
def test_a_restarted_nginx_serves_the_right_set_at_once(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    backends = [lab.backend(net) for _ in range(2)]
    start_controller(net.name)
    port = lab.published_port(lb)
    http = http_for(port)
    names = {b.name for b in backends}
    wait_until(lambda: http.settled("web", names), what="both backends")
    lb.restart(timeout=1)
    http = http_for(lab.published_port(lb))
    # The state file is in the container's own layer: the Lua loader reads it at start.
    first = wait_until(lambda: http.status("web"), what="nginx back", interval=0.01)
    assert first == 200
    assert set(http.bodies("web", 20)) == names


@DYNAMIC
def test_other_containers_on_the_network_have_no_way_to_change_routing(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    """The state goes in through the engine (exec), so nginx listens on its public port
    only: there is no push endpoint to reach, with or without a token."""
    served = one_backend_served(lab, start_controller, http_for)
    net, lb, backend, http = served.net, served.lb, served.backend, served.http
    code, output = lb.exec_run(["netstat", "-ltn"])
    assert code == 0, output
    listening = {line.split()[3] for line in output.decode().splitlines() if line.startswith("tcp")}
    # Docker's embedded DNS listens on 127.0.0.11 in every container on a user network.
    ports = {a.rsplit(":", 1)[1] for a in listening if not a.startswith("127.0.0.11:")}
    assert ports == {"80"}, listening
    lb.reload()
    address = lb.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    intruder = lab.backend(net, alias=None)
    for port in (8080, 9090, 10246, 18080):
        code, _ = intruder.exec_run(["nc", "-z", "-w", "1", address, str(port)])
        assert code != 0, f"nginx answers on port {port}"
    assert set(http.bodies("web", 10)) == {backend.name}


@DYNAMIC
def test_least_time_steers_away_from_a_slow_backend(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    labels = {"controlplane.algorithm": "least_time"}
    fast = [lab.backend(net, labels=labels) for _ in range(2)]
    slow = lab.backend(net, labels=labels, env={"DELAY_MS": "150"})
    start_controller(net.name)
    http = http_for(lab.published_port(lb))
    names = {b.name for b in [*fast, slow]}
    wait_until(lambda: http.serves("web", names, probes=30), what="three backends")
    http.bodies("web", 30)  # warm the averages up
    seen: Counter[str] = http.bodies("web", 100)
    assert seen[slow.name] <= 10, seen


@DYNAMIC
def test_new_services_and_host_names_need_no_reload_either(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    """One server routes every Host through the Lua side's host map: a service appearing,
    gaining a host name (wildcards as server_name's) or going costs no reload."""
    served = one_backend_served(lab, start_controller, http_for)
    net, lb, web, http = served.net, served.lb, served.backend, served.http
    reloads = lab.reloads(lb)
    api_backend = lab.backend(net, alias="api", labels={"controlplane.hosts": "*.api.example"})
    wait_until(lambda: http.settled("api", {api_backend.name}), what="the new service")
    assert set(http.bodies("v1.eu.api.example", 5)) == {api_backend.name}
    assert set(http.bodies("api.internal", 5)) == {api_backend.name}
    missing = http.get("nothing.example")
    assert missing.status_code == 404
    assert missing.text == "controlplane: no service here for host nothing.example\n"
    api_backend.remove(force=True)
    wait_until(lambda: http.status("api") == 404, what="the service gone")
    assert set(http.bodies("web", 5)) == {web.name}
    assert lab.reloads(lb) == reloads


@DYNAMIC
def test_a_large_state_goes_whole_through_the_shell(lab: Lab) -> None:
    """1,000 services x 10 backends make a ~2 MB state: more than a socket's buffer, so the
    shell's writes must wait for room, never fall back to the engine or tear the file."""
    net = lab.network()
    lb = lab.nginx(net)
    deployer = NginxDeployer(lab.client.api)
    target = NginxTarget(
        lb.id, lb.name, "/etc/nginx/conf.d/controlplane.conf", lb.attrs["State"]["StartedAt"], ()
    )
    content = b"".join(b"line %07d %s\n" % (i, b"x" * 180) for i in range(10_000))
    try:
        (result,) = deployer.push_all([target], content)
    finally:
        deployer.close()
    assert result.ok and result.via == "shell", result.error
    code, written = lb.exec_run(["cat", "/etc/nginx/conf.d/controlplane.state"])
    assert code == 0 and written == content
