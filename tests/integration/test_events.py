"""Event handling: bursts are coalesced, and managed nginx containers get the config."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

from tests.integration.conftest import ControllerFactory
from tests.support.lab import Http, Lab, wait_until


def test_burst_of_50_starts_is_coalesced(lab: Lab, start_controller: ControllerFactory) -> None:
    """A reconcile waits for 50 ms of quiet but at most 1 s after a burst's first event, so a
    burst costs about one reload per second it lasts. dockerd 20.10 on 2 cores needs ~13 s
    for 50 concurrent starts, so the bound is on that rate, and far below one per start."""
    net = lab.network()
    lab.nginx(net)
    controller = start_controller(net.name)
    created = [lab.backend(net, start=False) for _ in range(50)]
    before = controller.reloads()
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=25) as pool:
        list(pool.map(lambda c: c.start(), created))
    span = time.monotonic() - began
    wait_until(
        lambda: all(f"# {c.name}" in controller.config for c in created),
        what="all 50 in the config",
    )
    time.sleep(1.5)  # let any trailing reconcile of the burst happen before counting
    reloads = controller.reloads() - before
    assert 1 <= reloads <= max(3, math.ceil(span) + 2), f"{reloads} reloads in {span:.1f} s"


def test_new_and_restarted_nginx_get_the_config(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    first = lab.nginx(net)
    web = lab.backend(net)
    start_controller(net.name)
    wait_until(lambda: http_for(lab.published_port(first)).status("web") == 200, what="first lb")

    second = lab.nginx(net)
    http = http_for(lab.published_port(second))
    started = time.monotonic()
    wait_until(lambda: http.only("web", {web.name}, probes=5), interval=0.01, what="second nginx")
    assert time.monotonic() - started < 2.0

    first.restart()
    http = http_for(lab.published_port(first))
    wait_until(lambda: http.status("web") is not None, what="the restarted nginx")
    assert http.bodies("web", 5) == {web.name: 5}, "a restarted nginx serves the config at once"
