"""The two ways into a real nginx: the shell kept open in it, and the engine's calls for an
image without a shell. Both serve the same; the shell leaves nothing behind in the container,
whether the controller stops or is killed, and retires nginx's old workers early. A paused
nginx is given up at its deadline and holds no other."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
from docker.models.containers import Container
from docker.models.networks import Network

from controlplane.core.build import DEFAULT_CONFIG_PATH
from controlplane.core.model import NginxTarget
from controlplane.nginx_deployer import DeployResult, NginxDeployer
from tests.integration.conftest import ControllerFactory, RunningController
from tests.integration.test_checked_reload import config_in
from tests.support.lab import Http, Lab, wait_until


def shells(nginx: Container) -> list[str]:
    """Processes in the container started as /bin/sh (ours; nginx itself starts none)."""
    return [p[-1] for p in nginx.top(ps_args="-o pid,args")["Processes"] if "/bin/sh" in p[-1]]


def two_deploys(
    lab: Lab, net: Network, lb: Container, controller: RunningController, http: Http
) -> list[DeployResult]:
    """A backend, then a second one, each served; what the controller's deploys said."""
    first = lab.backend(net)
    wait_until(lambda: http.settled("web", {first.name}), what="web")
    second = lab.backend(net)
    wait_until(lambda: http.settled("web", {first.name, second.name}), what="both")
    return [d for r in controller.reports for d in r.deployed]


def test_deploys_go_through_one_shell_that_ends_with_the_controller(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    controller = start_controller(net.name)
    http = http_for(lab.published_port(lb))
    deployed = two_deploys(lab, net, lb, controller, http)
    assert len(deployed) >= 2 and all(d.ok and d.via == "shell" for d in deployed), deployed
    assert "open" in deployed[0].timings and "open" not in deployed[-1].timings
    assert len(shells(lb)) == 1

    controller.stop()
    wait_until(lambda: not shells(lb), timeout=5, what="the shell to end with the controller")
    assert http.status("web") == 200


def test_an_nginx_without_a_shell_is_served_through_the_engine(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    lb.exec_run(["/bin/busybox", "rm", "/bin/sh"])  # as in a distroless nginx image
    controller = start_controller(net.name)
    deployed = two_deploys(lab, net, lb, controller, http_for(lab.published_port(lb)))
    assert len(deployed) >= 2 and all(d.ok and d.via == "engine" for d in deployed), deployed


def test_a_killed_controller_leaves_no_shell_in_nginx(lab: Lab, http_for: type[Http]) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    web = lab.backend(net)
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "run", "--network", net.name, "--api-bind", "off"],
        stderr=subprocess.DEVNULL,
    )
    try:
        http = http_for(lab.published_port(lb))
        wait_until(lambda: http.settled("web", {web.name}), timeout=20, what="web")
        assert len(shells(lb)) == 1
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    wait_until(lambda: not shells(lb), timeout=5, what="the shell to end with its controller")


def generation(number: int) -> bytes:
    return (
        "server {\n    listen 80 default_server reuseport;\n"
        f'    location / {{ return 200 "generation {number}\\n"; }}\n}}\n'
    ).encode()


def target_of(nginx: Container, net: Network) -> NginxTarget:
    nginx.reload()
    return NginxTarget(
        nginx.id, nginx.name, DEFAULT_CONFIG_PATH, nginx.attrs["State"]["StartedAt"], (net.name,)
    )


def test_after_a_deploy_returns_only_new_workers_take_connections(lab: Lab) -> None:
    """nginx itself lets its old workers accept for 100 ms after a reload; through the shell
    they are told to quit once the new ones are up, before the deploy returns."""
    net = lab.network()
    lb = lab.nginx(net)
    target = target_of(lb, net)
    deployer = NginxDeployer(lab.client.api)
    url = f"http://127.0.0.1:{lab.published_port(lb)}/"
    try:
        with httpx.Client(headers={"Connection": "close"}, timeout=5) as client:
            for number in range(1, 8):
                result = deployer.deploy(target, generation(number))
                assert result.ok and result.via == "shell" and "retire" in result.timings, result
                time.sleep(0.01)
                served = {client.get(url).text.strip() for _ in range(20)}
                assert served == {f"generation {number}"}, (number, result.timings)
    finally:
        deployer.close()

    def workers() -> list[str]:
        processes = lb.top(ps_args="-o pid,args")["Processes"]
        return [p[-1] for p in processes if p[-1].strip() == "nginx: worker process"]

    wait_until(lambda: len(workers()) == 2, timeout=5, what="two workers, the old ones gone")


def test_a_paused_nginx_is_given_up_at_its_deadline_and_keeps_its_good_config(
    lab: Lab, http_for: type[Http]
) -> None:
    net = lab.network()
    paused, serving = lab.nginx(net), lab.nginx(net)
    targets = [target_of(paused, net), target_of(serving, net)]
    deployer = NginxDeployer(lab.client.api, deadline=3.0)
    try:
        assert all(r.ok and r.via == "shell" for r in deployer.deploy_all(targets, generation(1)))
        paused.pause()
        try:
            began = time.monotonic()
            heard: dict[str, float] = {}
            results = deployer.deploy_all(
                targets,
                generation(2),
                on_result=lambda r: heard.setdefault(r.container, time.monotonic() - began),
            )
        finally:
            paused.unpause()
        assert results[1].ok and not results[0].ok, results
        assert "did not finish its deploy within 3 s" in (results[0].error or "")
        assert heard[serving.name] < 2.0 and 3.0 <= heard[paused.name] < 4.5, heard
        assert config_in(paused, DEFAULT_CONFIG_PATH) == generation(1).decode()
        assert http_for(lab.published_port(paused)).bodies("any", 5) == {"generation 1": 5}
        assert http_for(lab.published_port(serving)).bodies("any", 5) == {"generation 2": 5}

        again = deployer.deploy_all(targets, generation(3))
        assert all(r.ok and r.via == "shell" for r in again), again
        assert "open" in again[0].timings and "open" not in again[1].timings
        wait_until(lambda: len(shells(paused)) == 1, timeout=5, what="the stalled shell to end")
    finally:
        deployer.close()
