"""The offline nginx-lua image (images/nginx-lua) runs what the dynamic data plane needs: a
shared dict, resty.core, cjson.safe and ngx.balancer at init, and a request proxied by a
balancer_by_lua upstream; the plain nginx image refuses that config, so the two can be told
apart by `nginx -t`."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import docker
import httpx
import pytest
from docker.models.containers import Container
from docker.models.networks import Network

from images.build import OfflineImages
from tests.support.lab import Lab, wait_until

CONF_DIR = "/etc/nginx/conf.d"

LUA_CONFIG = """\
lua_shared_dict x 1m;
init_by_lua_block {
    require "resty.core"
    cjson = require "cjson.safe"
    balancer = require "ngx.balancer"
}
upstream lua_web {
    server 0.0.0.1:1;  # never used: the balancer picks the peer
    balancer_by_lua_block {
        local peer = cjson.decode(ngx.var.peer_json)
        local ok, err = balancer.set_current_peer(peer.host, peer.port)
        if not ok then
            ngx.log(ngx.ERR, "set_current_peer: ", err)
            return ngx.exit(500)
        end
    }
}
server {
    listen 80;
    server_name web;
    set $peer_json '{"host": "%(host)s", "port": 80}';
    location / {
        access_by_lua_block { ngx.shared.x:incr("hits", 1, 0) }
        proxy_pass http://lua_web;
    }
    location = /hits {
        content_by_lua_block { ngx.say(ngx.shared.x:get("hits") or 0) }
    }
}
"""


def conf_archive(config: str) -> bytes:
    """A tar of one file, lua.conf, for put_archive into conf.d."""
    buf = io.BytesIO()
    data = config.encode()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("lua.conf")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def nginx_with(lab: Lab, image: str, network: Network, config: str, **kwargs: Any) -> Container:
    """A container of ``image`` on ``network`` with ``config`` in conf.d, started."""
    client: docker.DockerClient = lab.client
    container = client.containers.create(
        image, name=lab.name("lua"), labels=lab.labels, network=str(network.name), **kwargs
    )
    assert container.put_archive(CONF_DIR, conf_archive(config))
    container.start()
    return container


def address(container: Container, network: Network) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def logs(container: Container) -> str:
    raw = container.logs()
    assert isinstance(raw, bytes)
    return raw.decode(errors="replace")


@pytest.fixture
def network(lab: Lab) -> Network:
    return lab.network()


def test_lua_image_checks_and_balances_through_lua(
    lab: Lab, images: OfflineImages, network: Network
) -> None:
    backend = lab.backend(network)
    config = LUA_CONFIG % {"host": address(backend, network)}
    nginx = nginx_with(
        lab, images.nginx_lua, network, config, ports={"80/tcp": ("127.0.0.1", None)}
    )
    checked = nginx.exec_run(["nginx", "-t"])
    assert checked.exit_code == 0, checked.output
    assert nginx.exec_run(["sh", "-c", "echo ok"]).output == b"ok\n"

    url = f"http://127.0.0.1:{lab.published_port(nginx)}"

    def reply(path: str) -> tuple[int, str] | None:
        try:
            got = httpx.get(url + path, headers={"Host": "web"}, timeout=5.0)
        except httpx.HTTPError:
            return None
        return got.status_code, got.text.strip()

    assert wait_until(lambda: reply("/any/path"), what="nginx-lua answering") == (
        200,
        backend.name,
    ), logs(nginx)[-2000:]
    assert reply("/again") == (200, backend.name)
    assert reply("/hits") == (200, "2")


def test_plain_image_refuses_the_lua_config(
    lab: Lab, images: OfflineImages, network: Network
) -> None:
    nginx = nginx_with(
        lab, images.nginx, network, LUA_CONFIG % {"host": "127.0.0.1"}, command=["nginx", "-t"]
    )
    status = nginx.wait(timeout=30)["StatusCode"]
    output = logs(nginx)
    assert status != 0, output
    assert 'unknown directive "lua_shared_dict"' in output
