"""`udp_batch.Batch` on real loopback sockets: many datagrams per call, each reply back to
its own sender, over IPv4 and IPv6."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from controlplane.udp_batch import ADDRESS, SLOT, Batch


def bound(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


def wait_for(batch: Batch, server: socket.socket, count: int) -> list[int]:
    """Reads until `count` datagrams came (the loopback delivers them within milliseconds)."""
    lengths: list[int] = []
    deadline = time.monotonic() + 3
    while len(lengths) < count and time.monotonic() < deadline:
        lengths += batch.receive(server.fileno())
    return lengths


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def server(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    family, host = request.param
    with bound(family, host) as sock:
        yield sock


def test_nothing_waiting_is_an_empty_read(server: socket.socket) -> None:
    assert Batch(server.family, 4).receive(server.fileno()) == []


def test_one_read_takes_at_most_a_batch_and_each_reply_reaches_its_sender(
    server: socket.socket,
) -> None:
    host = server.getsockname()[0]
    clients = [bound(server.family, host) for _ in range(3)]
    try:
        for n in range(10):
            clients[n % 3].sendto(b"q%d" % n, server.getsockname())
        time.sleep(0.05)
        batch = Batch(server.family, 8)
        first = batch.receive(server.fileno())
        assert len(first) == 8  # a full batch; the other two wait for the next read
        senders = [batch.sender(i) for i in range(8)]
        assert [s[:2] for s in senders] == [clients[n % 3].getsockname()[:2] for n in range(8)]
        for i, length in enumerate(first):
            data = batch.queries[i * SLOT : i * SLOT + length].tobytes()
            reply = b"r" + data[1:] + b"!"
            batch.replies[i * SLOT : i * SLOT + len(reply)] = reply
            batch.reply_length(i, len(reply))
        batch.send(server.fileno(), 0, 8)
        assert wait_for(batch, server, 2) == [2, 2]
        for n in range(8):
            client = clients[n % 3]
            client.settimeout(2)
            assert client.recv(100) == b"r%d!" % n
    finally:
        for client in clients:
            client.close()


def test_a_datagram_longer_than_a_slot_is_cut_to_it(server: socket.socket) -> None:
    with bound(server.family, server.getsockname()[0]) as client:
        client.sendto(b"x" * (SLOT + 100), server.getsockname())
        client.sendto(b"short", server.getsockname())
        batch = Batch(server.family, 4)
        assert wait_for(batch, server, 2) == [SLOT, 5]
        assert batch.queries[SLOT : SLOT + 5].tobytes() == b"short"


def test_a_link_local_sender_keeps_its_scope() -> None:
    """The scope (interface index) of a sockaddr_in6 is in host order, the rest in network
    order: a reply forwarded later must go back out of the interface the query came in on."""
    batch = Batch(socket.AF_INET6, 2)
    sockaddr = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 5353, 0)
    sockaddr += socket.inet_pton(socket.AF_INET6, "fe80::1") + struct.pack("=I", 4)
    batch._names_view[ADDRESS : 2 * ADDRESS] = sockaddr
    assert batch.sender(1) == ("fe80::1", 5353, 0, 4)
