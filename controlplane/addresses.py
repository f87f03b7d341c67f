"""Addresses to listen on or send to: literal IP:PORT only, never a name, so that neither the
resolver nor the API needs DNS to find where to listen or whom to ask."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from controlplane.errors import ControlPlaneError


@dataclass(frozen=True)
class SocketAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ADDRESS_RE = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?)\](:(?P<p6>[0-9]{1,5}))?"
    r"|(?P<v4>[0-9.]+)(:(?P<p4>[0-9]{1,5}))?"
    r"|(?P<bare6>[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9_.-]+)?)"
)


def parse_address(value: str, default_port: int, any_port: bool = False) -> SocketAddress:
    """IP, IP:PORT or [IPv6]:PORT; `any_port` allows port 0 (the kernel picks one)."""
    match = ADDRESS_RE.fullmatch(value.strip())
    host = port = None
    if match:
        host = match.group("v6") or match.group("v4") or match.group("bare6")
        port = match.group("p6") or match.group("p4")
    try:
        ipaddress.ip_address(host or "")
        number = int(port) if port else default_port
    except ValueError:
        number = -1
    if host is None or not (0 if any_port else 1) <= number < 65536:
        raise ControlPlaneError(
            f"{value!r} is not IP:PORT (e.g. 127.0.0.1:5353 or [::1]:53); names are not allowed"
        )
    return SocketAddress(host, number)


def is_loopback(address: SocketAddress) -> bool:
    return ipaddress.ip_address(address.host.split("%")[0]).is_loopback
