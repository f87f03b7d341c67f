"""Traffic figures from a real reload-mode nginx: the rendered stats log sends one syslog
datagram per request to a listener in this process, on the test network's gateway (where the
controller on a host is reached), and the book's counts per backend are the clients' own,
exactly; refused connects are counted as nginx itself logged them; the operator's access log
is still written. Sampled (--stats-sample), nginx sends one in N of the fast answers, each
standing for N, and every error. Rendered and deployed with the controller's own parts,
without its loop."""

from __future__ import annotations

import io
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest
from docker.models.containers import Container
from docker.models.networks import Network
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.addresses import SocketAddress
from controlplane.core import labels as L
from controlplane.core.build import BuildOptions, build_topology
from controlplane.core.model import DockerState, NetworkFacts, Topology
from controlplane.core.render import RenderOptions, StatsSink, render_config
from controlplane.core.traffic import Key
from controlplane.docker_source import DockerSource
from controlplane.nginx_deployer import NginxDeployer
from controlplane.stats_listener import StatsListener
from controlplane.stats_sink import SinkFinder, new_tag
from controlplane.templating import load_template
from tests.integration.test_checked_reload import config_in
from tests.integration.test_label_fuzz import ALIAS, LABELS, container
from tests.support.lab import Http, Lab, wait_until
from tests.support.nginx_check import nginx_binary, nginx_t

MAIN_CONFIG = "/etc/nginx/nginx.conf"
OPERATOR_LOG = "/var/log/nginx/access.log"


def with_operator_log(nginx: Container) -> None:
    """The test image discards nginx's own access log; an operator's nginx.conf, like the
    official image's, logs to a file, which must go on being written beside ours."""
    main = config_in(nginx, MAIN_CONFIG)
    assert "    access_log /dev/null;\n" in main
    main = main.replace("    access_log /dev/null;\n", f"    access_log {OPERATOR_LOG};\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = main.encode()
        info = tarfile.TarInfo("nginx.conf")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert nginx.put_archive("/etc/nginx", buffer.getvalue())


def topology_of(lab: Lab, net: Network) -> Topology:
    state = DockerSource(lab.client.api, frozenset({str(net.name)})).snapshot()
    return build_topology(state, BuildOptions(networks=frozenset({str(net.name)})))


class Deployed:
    """A listener on the test network's gateway, and configs deployed into `nginx` with the
    controller's deployer: `deploy(False)` to route without stats, `deploy()` with them."""

    def __init__(self, lab: Lab, net: Network, nginx: Container) -> None:
        self.lab, self.net = lab, net
        self.tag = new_tag()
        net.reload()
        self.gateway = net.attrs["IPAM"]["Config"][0]["Gateway"]
        nginx.reload()
        ips = [e["IPAddress"] for e in nginx.attrs["NetworkSettings"]["Networks"].values()]
        self.listener = StatsListener(SocketAddress(self.gateway, 0), self.tag, lambda: ips)
        self.listener.start()
        self.deployer = NginxDeployer(lab.client.api)

    def deploy(self, stats: bool = True, sample: int = 1) -> None:
        topology = topology_of(self.lab, self.net)
        sink = None
        if stats:
            finder = SinkFinder(self.lab.client.api, self.listener.port, self.tag)
            sink = finder.sink(topology.nginx)
            assert sink == StatsSink(self.gateway, self.listener.port, self.tag)
        options = RenderOptions(stats=sink, stats_sample=sample)
        config = render_config(topology, load_template(), options)
        result = self.deployer.deploy(topology.nginx[0], config.encode())
        assert result.ok, result

    def close(self) -> None:
        self.deployer.close()
        self.listener.close()


@pytest.fixture
def deployed_for(lab: Lab) -> Iterator[type[Deployed]]:
    made: list[Deployed] = []

    class Tracked(Deployed):
        def __init__(self, lab: Lab, net: Network, nginx: Container) -> None:
            super().__init__(lab, net, nginx)
            made.append(self)

    yield Tracked
    for one in made:
        one.close()


def address_of(backend: Container, net: Network, port: int = 80) -> str:
    backend.reload()
    return f"{backend.attrs['NetworkSettings']['Networks'][net.name]['IPAddress']}:{port}"


def operator_lines(nginx: Container) -> int:
    result = nginx.exec_run(["/bin/busybox", "wc", "-l", OPERATOR_LOG])
    assert result.exit_code == 0 and isinstance(result.output, bytes), result.output
    return int(result.output.split()[0])


def dropped(listener: StatsListener) -> dict[str, int]:
    return {k: n for k, n in listener.datagrams().items() if k != "accepted" and n}


def test_per_backend_counts_match_the_clients_and_the_operator_log_is_kept(
    lab: Lab, http_for: type[Http], deployed_for: type[Deployed]
) -> None:
    net = lab.network()
    lb = lab.nginx(net, labels={L.DATAPLANE: "reload"})
    backends = [lab.backend(net), lab.backend(net)]
    names = {str(b.name) for b in backends}
    with_operator_log(lb)
    stats = deployed_for(lab, net, lb)
    http = http_for(lab.published_port(lb))
    stats.deploy(stats=False)
    wait_until(lambda: http.settled("web", names), what="both backends")
    stats.deploy()
    logged = operator_lines(lb)

    served = http.bodies("web", 300)
    assert sum(served.values()) == 300 and set(served) == names, served

    listener = stats.listener
    wait_until(lambda: listener.datagrams()["accepted"] >= 300, what="a datagram per request")
    assert listener.datagrams()["accepted"] == 300 and not dropped(listener), listener.datagrams()
    whole = listener.summary(Key("web", ""))
    assert whole is not None and whole.requests["2xx"] == 300 and whole.connect_errors == 0
    assert whole.bytes_sent > 0 and whole.bytes_received > 0
    for backend in backends:
        figures = listener.summary(Key("web", address_of(backend, net)))
        assert figures is not None, backend.name
        assert figures.requests["2xx"] == served[str(backend.name)], (backend.name, served)
        assert figures.connect_errors == 0 and figures.p50_ms is not None
    assert operator_lines(lb) - logged == 300, "the operator's access log lost lines"


def test_refused_connects_are_counted_as_nginx_logged_them(
    lab: Lab, http_for: type[Http], deployed_for: type[Deployed]
) -> None:
    """A backend whose port label is wrong refuses nginx: each refusal nginx logs is a
    connect error at that backend in the book, and the request counts once, as the 200 the
    other backend gave."""
    net = lab.network()
    lb = lab.nginx(net, labels={L.DATAPLANE: "reload"})
    good = lab.backend(net)
    deaf = lab.backend(net, labels={L.PORT: "81"})
    with_operator_log(lb)
    stats = deployed_for(lab, net, lb)
    stats.deploy()
    http = http_for(lab.published_port(lb))
    served = http.bodies("web", 60)
    assert served == {good.name: 60}, served

    listener = stats.listener
    wait_until(lambda: listener.datagrams()["accepted"] >= 60, what="a datagram per request")
    refusals = len(re.findall(r"connect\(\) failed \(111: Connection refused\)", logs(lb)))
    assert refusals >= 1 and not dropped(listener)
    refused = listener.summary(Key("web", address_of(deaf, net, 81)))
    assert refused is not None and refused.connect_errors == refusals
    assert sum(refused.requests.values()) == 0 and refused.bytes_sent == 0
    whole = listener.summary(Key("web", ""))
    assert whole is not None and whole.requests["2xx"] == 60 and whole.connect_errors == refusals


def test_sampled_answers_stand_for_n_and_every_error_is_sent(
    lab: Lab, http_for: type[Http], deployed_for: type[Deployed]
) -> None:
    """One in ten of the fast 200s comes as a datagram of weight 10; each 500 comes alone."""
    net = lab.network()
    lb = lab.nginx(net, labels={L.DATAPLANE: "reload"})
    backend = lab.backend(net, env={"HEALTH": "500"})
    stats = deployed_for(lab, net, lb)
    stats.deploy(sample=10)
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", {str(backend.name)}), what="the backend")
    time.sleep(0.3)  # what settling sent is in the book by then (read every 20 ms)
    listener = stats.listener
    settled = listener.datagrams()["accepted"]
    before = listener.summary(Key("web", ""))
    done = sum(before.requests.values()) if before is not None else 0

    served = http.bodies("web", 2000)
    assert served == {backend.name: 2000}, served
    failed = [http.get("web", "/health").status_code for _ in range(50)]
    assert failed == [500] * 50

    # 200 of the 2,000 expected (sd 13); each 500 is sent
    wait_until(lambda: listener.datagrams()["accepted"] - settled >= 50 + 150, what="datagrams")
    time.sleep(0.5)
    sent = listener.datagrams()["accepted"] - settled
    assert 50 + 150 <= sent <= 50 + 250 and not dropped(listener), listener.datagrams()
    whole = listener.summary(Key("web", ""))
    assert whole is not None and whole.requests["5xx"] == 50
    answered = whole.requests["2xx"] - done
    assert answered % 10 == 0 and 1500 <= answered <= 2500, answered
    assert whole.p50_ms is not None


def test_a_service_named_0_is_counted(
    lab: Lab, http_for: type[Http], deployed_for: type[Deployed]
) -> None:
    """nginx takes "0" for false in `if=`: the log's condition is a flag of its own."""
    net = lab.network()
    lb = lab.nginx(net, labels={L.DATAPLANE: "reload"})
    backend = lab.backend(net, alias="0")
    stats = deployed_for(lab, net, lb)
    stats.deploy()
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("0", {str(backend.name)}), what="the backend")
    time.sleep(0.3)  # what settling sent is in the book by then (read every 20 ms)
    counted = stats.listener.summary(Key("0", ""))
    done = sum(counted.requests.values()) if counted is not None else 0
    assert http.bodies("0", 20) == {backend.name: 20}

    def all_in() -> bool:
        figures = stats.listener.summary(Key("0", ""))
        return figures is not None and figures.requests["2xx"] - done == 20

    wait_until(all_in, what="the 20 requests counted")


def logs(nginx: Container) -> str:
    return nginx.logs(stdout=True, stderr=True).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def template() -> jinja2.Template:
    nginx_binary()
    return load_template()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(LABELS, ALIAS), min_size=1, max_size=4), st.sampled_from([1, 10]))
def test_any_labels_with_stats_give_a_config_nginx_accepts(
    template: jinja2.Template, backends: list[tuple[dict[str, str], str]], sample: int
) -> None:
    """The label fuzz's property, with the stats log on."""
    containers = tuple(container(i, labels, alias) for i, (labels, alias) in enumerate(backends))
    state = DockerState(
        containers=containers, networks=(NetworkFacts("n", "app", "bridge", "local"),)
    )
    sink = StatsSink("172.20.0.1", 5514, "T" * 24)
    options = RenderOptions(listen_port=18080, stats=sink, stats_sample=sample)
    config = render_config(build_topology(state), template, options)
    with tempfile.TemporaryDirectory() as directory:
        result = nginx_t(Path(directory), config)
    assert result.returncode == 0, f"{result.stderr}\n{config}"
