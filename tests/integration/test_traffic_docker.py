"""Traffic figures end to end through the controller, on both data planes: requests sent
through nginx show up per backend and per service, as the clients counted them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from controlplane.core.traffic import Key
from tests.integration.conftest import ControllerFactory, RunningController
from tests.support.lab import BOTH_DATAPLANES, Http, Lab, wait_until

pytestmark = BOTH_DATAPLANES


def figures(controller: RunningController, *keys: Key) -> dict[Key, int]:
    stats = controller.controller.stats
    assert stats is not None
    found = stats.summaries(keys)
    return {key: sum(s.requests.values()) for key, s in found.items()}


def test_requests_through_nginx_are_counted_per_backend_and_service(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    """Exactly, with --stats-sample 1 (the dynamic data plane counts every request anyway)."""
    net = lab.network()
    lb = lab.nginx(net)
    backends = [lab.backend(net), lab.backend(net)]
    controller = start_controller(net.name, api_bind="127.0.0.1:0", stats_sample=1)
    http = http_for(lab.published_port(lb))
    names = {str(b.name) for b in backends}
    wait_until(lambda: http.settled("web", names), what="both served")
    time.sleep(1.5)  # what settling sent is reported by then (the Lua sends every second)
    addresses = {}
    for backend in backends:
        backend.reload()
        ip = backend.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        addresses[str(backend.name)] = Key("web", f"{ip}:80")
    service = Key("web", "")
    before = figures(controller, service, *addresses.values())
    sent = http.bodies("web", 300)
    assert sum(sent.values()) == 300

    def counted() -> bool:
        now = figures(controller, service, *addresses.values())
        return now.get(service, 0) - before.get(service, 0) == 300

    wait_until(counted, timeout=10, what="the 300 requests in the figures")
    after = figures(controller, service, *addresses.values())
    for name, key in addresses.items():
        assert after.get(key, 0) - before.get(key, 0) == sent[name], name


def test_a_controller_restart_keeps_the_stats_port_and_tag(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], tmp_path: Path
) -> None:
    """The listener's port and tag are in nginx's config: with a state directory the next
    run binds the same port with the same tag, so it renders the same config for nginx, and
    the figures go on coming."""
    net = lab.network()
    lb = lab.nginx(net)
    backend = lab.backend(net)
    first = start_controller(net.name, state_dir=tmp_path, api_bind="127.0.0.1:0", stats_sample=1)
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", {str(backend.name)}), what="served")
    before = rendered(first)
    first.stop()
    again = start_controller(net.name, state_dir=tmp_path, api_bind="127.0.0.1:0", stats_sample=1)
    wait_until(lambda: bool(again.reports), what="its first pass")
    assert rendered(again) == before
    stats = again.controller.stats
    assert stats is not None and stats.tag not in before, "the API shows the stats tag"
    service = Key("web", "")
    http.bodies("web", 20)
    wait_until(lambda: figures(again, service).get(service, 0) >= 20, what="figures again")


def rendered(controller: RunningController) -> str:
    """The config the controller gives the managed nginx, as the API shows it."""
    (managed,) = httpx.get(f"{controller.api_url}/api/v1/nginx", timeout=10).json()["nginx"]
    wait_until(
        lambda: (
            httpx.get(
                f"{controller.api_url}/api/v1/config", params={"nginx": managed["name"]}, timeout=10
            ).status_code
            == 200
        ),
        what="its config",
    )
    reply = httpx.get(
        f"{controller.api_url}/api/v1/config", params={"nginx": managed["name"]}, timeout=10
    )
    return reply.text
