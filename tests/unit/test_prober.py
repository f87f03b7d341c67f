"""The probes on real sockets, against servers on loopback that answer as a backend might:
well, badly, never, or too much."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import labels as L
from controlplane.core.health import Address, Outcome, Result
from controlplane.core.model import HealthCheck, HealthMode
from controlplane.errors import InvalidValue
from controlplane.prober import READ_AT_MOST, SocketProber, request, status_of

Reply = Callable[[socket.socket, bytes], None]


class Server:
    """Accepts on loopback; each connection gets `reply(conn, request)` on its own thread."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(3)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                self.reply(conn, data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def prober() -> Iterator[SocketProber]:
    p = SocketProber()
    yield p
    p.close()


def probe(prober: SocketProber, port: int, check: HealthCheck) -> Result:
    done = threading.Event()
    results: list[Result] = []

    def record(_: Address, result: Result) -> None:
        results.append(result)
        done.set()

    prober.probe(Address("c", "s", "n", "127.0.0.1", port), check, record)
    assert done.wait(5)
    return results[0]


HTTP = HealthCheck(HealthMode.HTTP, active=True, path="/health", timeout_ms=300)


def answering(head: bytes) -> Reply:
    return lambda conn, _: conn.sendall(head)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", 503),
        (b"HTTP/1.1 301 Moved\r\nLocation: http://elsewhere/\r\n\r\n", 301),
        (b"HTTP/1.1 204\r\n\r\n", 204),
    ],
)
def test_an_http_probe_reads_the_status_line(
    prober: SocketProber, head: bytes, status: int
) -> None:
    server = Server(answering(head))
    try:
        result = probe(prober, server.port, HTTP)
        assert (result.outcome, result.status) == (Outcome.STATUS, status)
        assert 0 < result.latency < 1
        assert len(server.requests) == 1  # a redirect is not followed
    finally:
        server.close()


def test_the_request_is_one_get_with_the_path_and_host() -> None:
    address = Address("c", "s", "n", "10.0.0.2", 8080)
    assert request(address, HTTP) == (
        b"GET /health HTTP/1.1\r\nHost: 10.0.0.2:8080\r\nUser-Agent: controlplane-health\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )
    named = HealthCheck(HealthMode.HTTP, host="app.example.com", port=80, path="/a?b=c")
    assert request(address._replace(host="fd00::2"), named).startswith(
        b"GET /a?b=c HTTP/1.1\r\nHost: app.example.com\r\n"
    )
    v6 = request(address._replace(host="fd00::2", port=80), HTTP)
    assert b"Host: [fd00::2]\r\n" in v6


def test_a_backend_that_accepts_and_never_answers_is_no_reply_within_the_timeout(
    prober: SocketProber,
) -> None:
    release = threading.Event()
    server = Server(lambda conn, _: release.wait(5))
    try:
        started = time.monotonic()
        result = probe(prober, server.port, HTTP)
        assert result.outcome is Outcome.NO_REPLY
        assert 0.25 < time.monotonic() - started < 1.5
    finally:
        release.set()
        server.close()


@pytest.mark.parametrize(
    "reply",
    [
        lambda conn, _: None,  # closes without a word
        answering(b"SSH-2.0-OpenSSH_9.2\r\n"),
        answering(b"HTTP/2 200\r\n\r\n"),
        answering(b"HTTP/1.1 700 Odd\r\n\r\n"),
        answering(b"X" * (READ_AT_MOST * 4)),  # no line end within what is read
    ],
    ids=["closed", "not-http", "http2-text", "status-out-of-range", "endless-line"],
)
def test_anything_but_a_status_line_is_not_http(prober: SocketProber, reply: Reply) -> None:
    server = Server(reply)
    try:
        assert probe(prober, server.port, HTTP).outcome is Outcome.BAD_REPLY
    finally:
        server.close()


def test_a_tcp_check_connects_on_the_check_port_and_sends_nothing(prober: SocketProber) -> None:
    server = Server(answering(b""))
    try:
        check = HealthCheck(port=server.port)
        result = probe(prober, 1, check)  # the backend's own port is ignored
        assert result.outcome is Outcome.CONNECTED
    finally:
        server.close()


def test_a_closed_port_is_refused(prober: SocketProber) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert probe(prober, port, HTTP).outcome is Outcome.REFUSED


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 404\r\n", 404),
        (b"HTTP/1.1 200OK\r\n", None),
        (b"http/1.1 200 OK\r\n", None),
        (b"HTTP/1.1 99 x\r\n", None),
    ],
)
def test_status_of(head: bytes, status: int | None) -> None:
    assert status_of(head) == status


HOSTILE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["/health", "/a b", "/x\r\nX: y", "app.example.com", "a:80", "/%0d%0a"]),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(["/", "/ok", "app", "x.io:"]),
        st.sampled_from(["\r\n", "\n", " ", "\x00", "é", "\t", "HTTP/1.1"]),
    ),
)


@settings(max_examples=500, deadline=None)
@given(path=HOSTILE, host=HOSTILE, status=HOSTILE)
def test_hostile_check_labels_never_shape_the_request(path: str, host: str, status: str) -> None:
    """Whatever the labels say, a check that passes the grammar writes one request line and
    three headers, all printable ASCII; a value that fails it excludes the container."""
    labels = {L.HEALTH_PATH: path, L.HEALTH_HOST: host, L.HEALTH_STATUS: status}
    try:
        parsed = L.parse_service_labels(labels)
    except InvalidValue:
        return
    check = HealthCheck(
        HealthMode.HTTP,
        active=True,
        path=parsed.health_path or "/",
        host=parsed.health_host,
        status=parsed.health_status or (200, 399),
    )
    lines = request(Address("c", "s", "n", "10.0.0.2", 80), check).split(b"\r\n")
    assert lines[-2:] == [b"", b""] and len(lines) == 7
    method, target, version = lines[0].split(b" ")
    assert (method, version) == (b"GET", b"HTTP/1.1") and target.startswith(b"/")
    assert all(0x20 <= byte < 0x7F for line in lines for byte in line)
    assert [line.split(b":")[0] for line in lines[1:5]] == [
        b"Host",
        b"User-Agent",
        b"Accept",
        b"Connection",
    ]
