"""Scaling a service: nginx serves exactly the live set after each step."""

from __future__ import annotations

from tests.integration.conftest import ControllerFactory
from tests.support.fleet import Coverage, name_backends, remove_all, run_backends
from tests.support.lab import Http, Lab, wait_until


def test_scale_up_and_down(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    start_controller(net.name)
    http = http_for(lab.published_port(lb))
    backends = [lab.backend(net)]
    for step in (3, 1, 3, 0, 2):
        while len(backends) < step:
            backends.append(lab.backend(net))
        while len(backends) > step:
            backends.pop().remove(force=True)
        names = {b.name for b in backends}
        if names:
            wait_until(
                lambda names=names: http.settled("web", names),
                what=f"nginx to serve exactly {sorted(names)}",
            )
            assert set(http.bodies("web", 60)) == names
        else:
            wait_until(lambda: http.status("web") == 404, what="web to be gone (404)")


def test_service_with_no_live_backend_answers_503(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    backend = lab.backend(net)
    start_controller(net.name)
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.serves("web", {backend.name}), what="web served")
    backend.pause()
    wait_until(lambda: http.status("web") == 503, what="503 while the only backend is paused")
    assert "no live backend" in http.get("web").text
    backend.unpause()
    wait_until(lambda: http.serves("web", {backend.name}), what="web served again after unpause")


def test_100_backends_in_one_service_are_all_served(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    """Far past the ~55 servers a fixed 64k upstream zone holds: nginx must take every
    config on the way up and route to each backend, as its responses show."""
    net = lab.network()
    lb = lab.nginx(net)
    running = start_controller(net.name)
    names = name_backends(lab, {"web": 100})
    try:
        run_backends(lab, net, names)
        coverage = Coverage(lab.published_port(lb), names, max_seconds=90)
        try:
            all_served = coverage.wait(60)
        finally:
            coverage.stop()
        refused = [d.error for r in running.reports for d in r.deployed if not d.ok]
        assert not refused, f"{len(refused)} deploys refused, the first: {refused[0]}"
        assert all_served, f"{coverage.served} of 100 backends answered within 60 s"
        # A client that opens a connection a request sees them all too, and no error.
        assert set(http_for(lab.published_port(lb)).bodies("web", 300)) == names["web"]
    finally:
        running.stop()
        remove_all(lab)
