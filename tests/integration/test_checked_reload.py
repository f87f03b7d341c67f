"""A config nginx rejects is never loaded; bad labels exclude one container, not the config."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from docker.models.containers import Container

from tests.integration.conftest import ControllerFactory
from tests.support.lab import Http, Lab, wait_until

# Breaks the config (an unknown directive) only while a service named "broken" exists.
BREAKING_TEMPLATE = """\
{% include "builtin/controlplane.conf.j2" %}
{% if services | selectattr("name", "equalto", "broken") | list %}
this_is_not_an_nginx_directive on;
{% endif %}
"""


def config_in(container: Container, path: str = "/etc/nginx/conf.d/controlplane.conf") -> str:
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile(path.rsplit("/", 1)[1])
        assert member is not None
        return member.read().decode()


def test_rejected_config_is_never_loaded(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http], tmp_path: Path
) -> None:
    (tmp_path / "controlplane.conf.j2").write_text(BREAKING_TEMPLATE)
    net = lab.network()
    lb = lab.nginx(net)
    web = lab.backend(net)
    controller = start_controller(net.name, templates_dir=tmp_path)
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", {web.name}), what="web")
    good = config_in(lb)

    lab.backend(net, alias="broken")
    failed = wait_until(
        lambda: [d for r in controller.reports for d in r.deployed if not d.ok],
        what="nginx -t to reject the config",
    )
    assert "this_is_not_an_nginx_directive" in (failed[0].error or "")
    assert config_in(lb) == good, "the rejected file was left in place"
    assert http.bodies("web", 30) == {web.name: 30}, "traffic must keep flowing on the old config"

    lb.restart()
    http = http_for(lab.published_port(lb))  # a restart publishes on a new random port
    wait_until(lambda: http.status("web") == 200, what="nginx back after restart")
    assert http.bodies("web", 10) == {web.name: 10}, "a restart must start from the good file"

    for container in lab.client.containers.list(filters={"label": "controlplane.test=1"}):
        if container.name.startswith(f"cpt-{lab.run_id}-broken"):
            container.remove(force=True)
    second = lab.backend(net)
    names = {web.name, second.name}
    wait_until(
        lambda: http.settled("web", names),
        what="the next good change to apply",
    )


def test_bad_labels_exclude_only_their_container(
    lab: Lab, start_controller: ControllerFactory, http_for: type[Http]
) -> None:
    net = lab.network()
    lb = lab.nginx(net)
    good = lab.backend(net)
    lab.backend(net, labels={"controlplane.weight": "5;\n} server { listen 81; "})
    lab.backend(net, labels={"controlplane.algorithm": "hash", "controlplane.hash_key": "$foo"})
    lab.backend(net, labels={"controlplane.port": "99999"})
    controller = start_controller(net.name)
    http = http_for(lab.published_port(lb))
    wait_until(lambda: http.settled("web", {good.name}), what="web")
    config = controller.config
    assert config.count("# excluded: ") == 3
    assert all(line.startswith("# ") for line in config.splitlines() if "listen 81" in line)
    assert "controlplane.weight='5;\\n} server { listen 81; ' must be a whole number" in config
    assert "unknown variable '$foo'" in config
    assert "controlplane.port='99999' must be a whole number from 1 to 65535" in config
