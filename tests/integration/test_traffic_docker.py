"""Traffic figures end to end through the controller, on both data planes: requests sent
through nginx show up per backend and per service, as the clients counted them."""

from __future__ import annotations

import time

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
    net = lab.network()
    lb = lab.nginx(net)
    backends = [lab.backend(net), lab.backend(net)]
    controller = start_controller(net.name, api_bind="127.0.0.1:0")
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
