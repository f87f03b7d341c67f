"""The readiness gate with real Docker and nginx, on both data planes: a backend gets traffic
once its port accepts a connection, not before; `controlplane.health=none` serves it at once;
one that never listens stays out with the reason; a controller restart costs no request."""

from __future__ import annotations

import time

import httpx
from docker.models.containers import Container
from docker.models.networks import Network

from controlplane.core import labels as L
from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import BOTH_DATAPLANES, Http, Lab, wait_until
from tests.support.load import Load
from tests.support.served import served_names

pytestmark = BOTH_DATAPLANES

LATE = {"LISTEN_DELAY_MS": "1500"}
"""Backend env: its server listens 1.5 s after the container starts."""


def served(controller: RunningController, service: str = "web") -> frozenset[str]:
    return served_names(controller.controller.reconciler.snapshot, service)


def backend_view(controller: RunningController, service: str, name: str) -> dict[str, object]:
    reply = httpx.get(f"{controller.api_url}/api/v1/services/{service}", timeout=10).json()
    found: dict[str, object] = next(b for b in reply["backends"] if b["name"] == name)
    return found


def refused_connects(nginx: Container, ip: str) -> int:
    """The connects nginx tried to `ip` that were refused: requests it sent too early."""
    lines = nginx.logs(stdout=True, stderr=True).decode("utf-8", "replace").splitlines()
    return sum(1 for line in lines if "Connection refused" in line and f"//{ip}:" in line)


def ip_of(container: Container, network: Network) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def one_served(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], **labels: str
) -> tuple[Network, Container, RunningController, int]:
    """web served by one backend behind a managed nginx: (network, nginx, controller, port)."""
    net = lab.network()
    lb = lab.nginx(net)
    first = lab.backend(net, labels=labels)
    controller = start_controller(net.name, api_bind="127.0.0.1:0")
    port = lab.published_port(lb)
    wait_until(lambda: http_for(port).settled("web", {first.name}), what="the first backend")
    return net, lb, controller, port


def test_a_backend_that_listens_late_gets_no_request_before_and_no_client_sees_an_error(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net, lb, controller, port = one_served(lab, start_controller, http_for)
    with Load(port, "web", max_seconds=30) as load:
        time.sleep(0.3)
        late = lab.backend(net, env=LATE)
        started = time.monotonic()
        ip = ip_of(late, net)
        view = wait_until(
            lambda: (v := backend_view(controller, "web", late.name))["state"] == "starting" and v,
            timeout=1,
            interval=0.01,
            what="the newcomer held",
        )
        assert str(view["reason"]).startswith("waiting for port 80 to accept a connection")
        assert view["since"] and view["in_nginx"] is False
        wait_until(lambda: late.name in served(controller), timeout=10, interval=0.005)
        joined = time.monotonic() - started
        wait_until(lambda: load.last_from(late.name), timeout=10, what="a request it answered")
        time.sleep(0.3)
    assert 1.3 < joined < 4.0, f"served {joined:.2f} s after its start"
    assert load.failures == [], f"{len(load.failures)} of {len(load.responses)} failed"
    assert refused_connects(lb, ip) == 0, "nginx sent it requests before it listened"
    assert backend_view(controller, "web", late.name)["reason"] is None


def test_health_none_serves_a_new_backend_at_once(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    none = {L.HEALTH: "none"}
    net, _, controller, _ = one_served(lab, start_controller, http_for, **none)
    late = lab.backend(net, env=LATE, labels=none)
    started = time.monotonic()
    wait_until(lambda: late.name in served(controller), timeout=5, interval=0.005)
    assert time.monotonic() - started < 1.0, "it waited for its port"
    assert backend_view(controller, "web", late.name)["state"] == "up"


def test_a_backend_that_never_listens_stays_out_with_the_reason(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net, _, controller, port = one_served(lab, start_controller, http_for)
    # Its server listens on 80, the label sends nginx to 81: that port never accepts.
    deaf = lab.backend(net, alias="deaf", labels={L.PORT: "81", L.HEALTH_START_PERIOD: "2s"})
    view = wait_until(
        lambda: (v := backend_view(controller, "deaf", deaf.name))["state"] == "starting" and v,
        timeout=5,
        what="it held",
    )
    assert str(view["reason"]).startswith("waiting for port 81 to accept a connection")
    view = wait_until(
        lambda: (v := backend_view(controller, "deaf", deaf.name))["state"] == "unhealthy" and v,
        timeout=6,
        what="it given up",
    )
    assert view["reason"] == (
        "never accepted a connection on port 81 within the start period (2s); it stays out "
        "until it restarts"
    )
    assert served(controller, "deaf") == frozenset()
    assert http_for(port).status("deaf") != 200


def test_a_controller_restart_keeps_serving_what_was_served(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    backends = {lab.backend(net).name for _ in range(3)}
    first = start_controller(net.name)
    port = lab.published_port(lb)
    http = http_for(port)
    wait_until(lambda: http.settled("web", backends), what="all served")
    with Load(port, "web", max_seconds=30) as load:
        time.sleep(0.3)
        first.stop()
        time.sleep(0.3)
        again = start_controller(net.name)
        assert served(again) == backends, "its first pass held back what nginx served"
        wait_until(lambda: again.reports and again.reports[0].deployed, what="its first deploy")
        time.sleep(1.0)
    assert served(again) == backends
    assert load.failures == [], f"{len(load.failures)} of {len(load.responses)} failed"
    assert set(load.by_backend()) == backends
