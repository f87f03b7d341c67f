"""Free loopback ports for servers the tests and benchmarks start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOWEST = 10_000


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral range starts; dockerd takes published ports from it too."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free for UDP and TCP alike (a DNS server binds both; for an HTTP
    server the UDP half costs nothing), picked below the ephemeral range: a port the kernel
    handed out could go to a client's connection or a published container port between this
    check and the server's bind (seen: "Address already in use" at a controller's start)."""
    highest = max(LOWEST + 1000, _ephemeral_start()) - 1
    for _ in range(200):
        port = random.randint(LOWEST, highest)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            try:
                udp.bind((LOOPBACK, port))
                tcp.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port for UDP and TCP in {LOWEST}-{highest}")
