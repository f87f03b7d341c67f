"""The backend test image's /health (images/backend): what a test sets with HEALTH at start or
`docker exec CONTAINER /health.sh MODE` is what a client meets there, while every other path
answers as before, a hung /health holds no other request up and a stop still ends it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from docker.models.containers import Container
from docker.models.networks import Network

from tests.support.lab import Lab, wait_until

MODES = "ok, hang, close or an HTTP status 100 to 599"


def ip_of(container: Container, network: Network) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def get(ip: str, path: str = "/health", timeout: float = 5.0) -> tuple[int, str]:
    response = httpx.get(f"http://{ip}{path}", headers={"Connection": "close"}, timeout=timeout)
    return response.status_code, response.text.strip()


def answer(ip: str, path: str = "/health") -> tuple[int, str] | None:
    """For polling: None while the server does not accept connections."""
    try:
        return get(ip, path, timeout=2.0)
    except httpx.HTTPError:
        return None


def run(backend: Container, *command: str) -> tuple[int, str]:
    """`docker exec CONTAINER COMMAND...`: its exit code and output."""
    code, output = backend.exec_run(list(command))
    assert isinstance(code, int) and isinstance(output, bytes)
    return code, output.decode().strip()


def set_health(backend: Container, *args: str) -> tuple[int, str]:
    """What a test runs: `docker exec CONTAINER /health.sh MODE`."""
    return run(backend, "/health.sh", *args)


@contextlib.contextmanager
def request(ip: str, path: str = "/health") -> Iterator[socket.socket]:
    """A raw request left open, to see what comes back or that nothing does."""
    sock = socket.create_connection((ip, 80), timeout=5.0)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n".encode())
        yield sock
    finally:
        sock.close()


def hung_replies(backend: Container) -> int:
    """/reply.sh processes waiting on a hung /health (busybox ps shows their `timeout`)."""
    return run(backend, "ps")[1].count("timeout 600 cat")


@pytest.fixture
def net(lab: Lab) -> Network:
    return lab.network()


def serving(lab: Lab, net: Network, env: dict[str, str] | None = None) -> tuple[Container, str]:
    """A backend that answers (its name looked up once, so later replies are immediate)."""
    backend = lab.backend(net, env={"STOP_DELAY": "1", **(env or {})})
    ip = ip_of(backend, net)
    assert wait_until(lambda: answer(ip, "/"), what="the backend serving") == (200, backend.name)
    return backend, ip


def test_health_answers_the_mode_a_test_sets_and_other_paths_as_before(
    lab: Lab, net: Network
) -> None:
    backend, ip = serving(lab, net)
    assert get(ip) == (200, "ok")
    assert get(ip, "/health?x=1&ms=3000") == (200, "ok")
    for path in ("/healthz", "/health/x", "/x/health"):
        assert get(ip, path) == (200, backend.name), path

    assert set_health(backend, "500") == (0, "")
    assert get(ip) == (500, "health 500")
    assert get(ip, "/") == (200, backend.name)
    assert set_health(backend, "599") == (0, "")
    assert get(ip) == (599, "health 599")
    assert set_health(backend, "204") == (0, "")
    assert get(ip) == (204, "")
    assert set_health(backend, "ok") == (0, "")
    assert get(ip) == (200, "ok")
    head = httpx.head(f"http://{ip}/health", timeout=5.0)
    assert (head.status_code, head.content) == (200, b"")

    for bad in (["600"], ["sick"], ["500", "x"], []):
        code, output = set_health(backend, *bad)
        assert code == 2 and f"must be {MODES}, not '{' '.join(bad)}'" in output, bad
    assert get(ip) == (200, "ok"), "a refused mode changed it"

    assert run(backend, "sh", "-c", "echo 503 > /run/health") == (0, "")
    assert get(ip) == (503, "health 503")
    for garbage in ("hang\\nok\\n", "5\\0000\\n", "500 \\n", "OK\\n", "", "1234567890"):
        assert run(backend, "sh", "-c", f"printf '{garbage}' > /run/health") == (0, "")
        assert get(ip) == (500, "bad /run/health"), garbage


def test_a_hung_health_holds_no_other_request_up_and_ends_with_the_client(
    lab: Lab, net: Network
) -> None:
    backend, ip = serving(lab, net)
    assert set_health(backend, "hang") == (0, "")
    with request(ip) as hung:
        with pytest.raises(httpx.ReadTimeout):
            get(ip, timeout=1.0)
        started = time.monotonic()
        assert get(ip, "/") == (200, backend.name)
        assert time.monotonic() - started < 1.0, "/ waited for the hung /health"
        hung.settimeout(0.2)
        with pytest.raises(TimeoutError):
            hung.recv(1024)
        assert hung_replies(backend) >= 1
    wait_until(lambda: hung_replies(backend) == 0, timeout=5, what="the hung replies to end")


def test_close_closes_without_a_status_line(lab: Lab, net: Network) -> None:
    backend, ip = serving(lab, net)
    assert set_health(backend, "close") == (0, "")
    with request(ip) as closed:
        assert closed.recv(1024) == b""
    with pytest.raises(httpx.RemoteProtocolError):
        get(ip)
    assert get(ip, "/") == (200, backend.name)


def test_a_stop_drains_health_too_and_ends_a_hung_one_and_a_start_resets_it(
    lab: Lab, net: Network
) -> None:
    backend, ip = serving(lab, net)
    assert set_health(backend, "hang") == (0, "")
    with request(ip) as hung:
        wait_until(lambda: hung_replies(backend) == 1, timeout=5, what="the hung reply")
        stopping = threading.Thread(target=backend.stop, kwargs={"timeout": 10})
        started = time.monotonic()
        stopping.start()
        try:
            wait_until(lambda: answer(ip) == (503, "draining"), timeout=5, what="a 503 drain")
        finally:
            stopping.join()
        assert time.monotonic() - started < 5, "the hung reply held the stop up"
        with contextlib.suppress(ConnectionResetError):
            assert hung.recv(1024) == b""
    backend.reload()
    assert backend.attrs["State"]["ExitCode"] == 0
    backend.start()
    ip = ip_of(backend, net)
    assert wait_until(lambda: answer(ip), what="the backend back") == (200, "ok")


def test_health_at_start_comes_from_the_env_and_again_at_each_start(lab: Lab, net: Network) -> None:
    backend, ip = serving(lab, net, {"HEALTH": "503"})
    assert get(ip) == (503, "health 503")
    assert set_health(backend, "ok") == (0, "")
    assert get(ip) == (200, "ok")
    backend.restart(timeout=10)
    ip = ip_of(backend, net)
    assert wait_until(lambda: answer(ip), what="the backend back") == (503, "health 503")


def test_a_bad_health_env_stops_the_container_with_the_reason(lab: Lab, net: Network) -> None:
    backend = lab.backend(net, env={"HEALTH": "sick"})

    def exited() -> bool:
        backend.reload()
        return backend.status == "exited"

    wait_until(exited, timeout=10, what="the container to exit")
    assert backend.attrs["State"]["ExitCode"] == 2
    logs = backend.logs().decode()
    assert f"backend: HEALTH must be {MODES}, not 'sick'" in logs
