"""The backend test image (images/backend) as a user meets it in the demo: any path answers
with the container's name, a stopped then started container serves again, and LISTEN_DELAY_MS
keeps its port closed for a while after the start."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from docker.models.containers import Container

from tests.support.lab import Lab, wait_until


def get(lab: Lab, backend: Container, path: str) -> httpx.Response:
    url = f"http://127.0.0.1:{lab.published_port(backend)}{path}"
    return httpx.get(url, headers={"Connection": "close"}, timeout=10.0)


def answer(lab: Lab, backend: Container, path: str = "/") -> tuple[int, str] | None:
    """For polling: None while the server does not accept connections yet."""
    try:
        response = get(lab, backend, path)
    except httpx.HTTPError:
        return None
    return response.status_code, response.text.strip()


@pytest.fixture
def backend(lab: Lab) -> Container:
    net = lab.network()
    # A hostname other than the name: the reply must come from Docker's DNS, not from it.
    return lab.backend(
        net, hostname="not-the-name", ports={"80/tcp": ("127.0.0.1", None)}, env={"STOP_DELAY": "1"}
    )


def test_any_path_answers_with_the_container_name(lab: Lab, backend: Container) -> None:
    wait_until(lambda: answer(lab, backend), what="the backend accepting connections")
    for path in ("/", "/any/path", "/a/b.txt?x=1&y=2", "/cgi-bin/slow", "/%24%28id%29?$(id)"):
        assert answer(lab, backend, path) == (200, backend.name), path
    started = time.monotonic()
    assert answer(lab, backend, "/cgi-bin/slow?ms=300") == (200, backend.name)
    assert answer(lab, backend, "/any?key=1&ms=0200") == (200, backend.name)
    assert time.monotonic() - started >= 0.5
    assert answer(lab, backend, "/x?ms=1e3") == (400, "ms must be digits")
    assert answer(lab, backend, "/x?ms=*") == (400, "ms must be digits")
    head = httpx.head(f"http://127.0.0.1:{lab.published_port(backend)}/p", timeout=10.0)
    assert head.status_code == 200 and head.content == b""
    posted = httpx.post(
        f"http://127.0.0.1:{lab.published_port(backend)}/form", content=b"x" * 100_000, timeout=10.0
    )
    assert (posted.status_code, posted.text.strip()) == (200, backend.name)


def test_stop_drains_and_start_serves_again(lab: Lab, backend: Container) -> None:
    wait_until(lambda: answer(lab, backend), what="the backend accepting connections")
    stopping = threading.Thread(target=backend.stop, kwargs={"timeout": 10})
    stopping.start()
    try:
        wait_until(
            lambda: answer(lab, backend, "/any") == (503, "draining"),
            timeout=5,
            what="503 while draining",
        )
    finally:
        stopping.join()
    backend.start()
    # A new start publishes a new port; the draining marker of the last stop must be gone.
    assert wait_until(lambda: answer(lab, backend, "/any"), what="the backend back") == (
        200,
        backend.name,
    )
    renamed = f"{backend.name}-renamed"
    backend.rename(renamed)
    backend.restart(timeout=10)
    wait_until(lambda: answer(lab, backend) == (200, renamed), what="the new name after a restart")


def accepts(ip: str) -> bool:
    try:
        socket.create_connection((ip, 80), timeout=1.0).close()
    except OSError:
        return False
    return True


def test_listen_delay_keeps_the_port_closed_for_that_long_and_a_stop_ends_it(lab: Lab) -> None:
    net = lab.network()
    backend = lab.backend(net, env={"LISTEN_DELAY_MS": "1500"}, start=False)
    backend.start()
    started = time.monotonic()
    backend.reload()
    ip = backend.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    assert not accepts(ip)
    wait_until(lambda: accepts(ip), timeout=10, interval=0.01, what="the delayed listen")
    assert time.monotonic() - started >= 1.4

    late = lab.backend(net, env={"LISTEN_DELAY_MS": "600000"})
    stopping = time.monotonic()
    late.stop(timeout=10)
    assert time.monotonic() - stopping < 5, "the stop signal did not end the delay"
    late.reload()
    assert late.attrs["State"]["ExitCode"] == 0
