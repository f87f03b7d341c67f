"""The DNS edge: UDP and TCP listeners, and forwarding to upstream resolvers.

Runs its own asyncio loop (uvloop when installed) in a thread of `controlplane run`. Every
packet goes through `Answerer`; nothing a client sends can raise out of a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from dnslib import QTYPE, RCODE, RR, DNSRecord

from controlplane.addresses import SocketAddress
from controlplane.dns_answer import (
    BADVERS,
    DO_BIT,
    OPT,
    TC_BIT,
    Answerer,
    Forward,
    add_opt,
    extended_rcode,
    formerr,
    status,
    truncated,
    udp_limit,
)
from controlplane.errors import ControlPlaneError

log = logging.getLogger(__name__)

TCP_IDLE_SECONDS = 10.0
TCP_MAX_CONNECTIONS = 256
# Indexes 0-15 are the reply's RCODE; then what got no reply of ours; then BADVERS (16).
OUTCOMES = (
    "noerror",
    "formerr",
    "servfail",
    "nxdomain",
    "notimp",
    "refused",
    *(f"rcode{n}" for n in range(6, 16)),
    "forwarded",
    "dropped",
    "badvers",
)
FORWARDED, DROPPED, BAD_VERSION = 16, 17, 18
FORWARD_CACHE_ENTRIES = 10_000
FORWARD_MAX_TTL = 300
MAX_PENDING_FORWARDS = 1_000


@dataclass
class _Stored:
    """An upstream's reply, told again with its TTLs counted down, and with the header bits
    and EDNS0 of the client asking now (not of the one whose query filled it)."""

    stored_at: float
    expires: float
    reply: DNSRecord
    records: list[RR]
    ttls: list[int]
    additional: list[RR]
    """The reply's additional records but its OPT."""
    aged_by: int = -1
    packed: dict[tuple[int, int, int], bytes] = field(default_factory=dict)

    def aged(self, now: float, request: DNSRecord) -> bytes:
        """TTLs less the whole seconds begun since it was stored: never above what is left.
        Re-encoded once per second of age at most, for each kind of client (RD, CD, OPT)."""
        age = math.ceil(now - self.stored_at)
        if age != self.aged_by:
            for rr, ttl in zip(self.records, self.ttls, strict=True):
                rr.ttl = max(0, ttl - age)
            self.packed, self.aged_by = {}, age
        opts = [rr.ttl & DO_BIT for rr in request.ar if rr.rtype == OPT]
        kind = (request.header.rd, request.header.cd, opts[0] + 1 if opts else 0)
        packed = self.packed.get(kind)
        if packed is None:
            self.reply.header.rd, self.reply.header.cd = request.header.rd, request.header.cd
            self.reply.ar = list(self.additional)
            add_opt(self.reply, request)
            packed = self.packed[kind] = bytes(self.reply.pack())
        return packed


class Forwarder:
    """Asks the upstreams in order, each with a timeout, and keeps answers for their TTL. A
    truncated reply is asked again over TCP (the client may be on TCP, or use it next)."""

    def __init__(
        self,
        upstreams: Sequence[SocketAddress],
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstreams = list(upstreams)
        self._timeout = timeout
        self._clock = clock
        self._cache: OrderedDict[tuple[str, int, int], _Stored] = OrderedDict()

    async def resolve(self, request: DNSRecord) -> bytes:
        q = request.q
        key = (str(q.qname), int(q.qtype), int(q.qclass))  # exact case: the reply echoes it
        cached = self._cache.get(key)
        ident: bytes = int(request.header.id).to_bytes(2, "big")
        now = self._clock()
        if cached is not None and cached.expires > now:
            return ident + cached.aged(now, request)[2:]
        query = bytearray(request.pack())
        query[:2] = secrets.randbelow(65536).to_bytes(2, "big")  # not the client's guessable ID
        for upstream in self._upstreams:
            try:
                reply = await asyncio.wait_for(_ask(upstream, bytes(query)), self._timeout)
            except (OSError, TimeoutError):
                log.debug("upstream %s did not answer %s", upstream, q.qname)
                continue
            if reply[2] & TC_BIT:
                try:
                    reply = await asyncio.wait_for(_ask_tcp(upstream, bytes(query)), self._timeout)
                except (OSError, TimeoutError, asyncio.IncompleteReadError):
                    log.debug("upstream %s did not answer %s over TCP", upstream, q.qname)
            stored = self._remember(key, reply, request)
            return ident + (reply if stored is None else stored)[2:]
        return status(request, RCODE.SERVFAIL, ra=True)

    def _remember(
        self, key: tuple[str, int, int], reply: bytes, request: DNSRecord
    ) -> bytes | None:
        """Kept for the smallest TTL (5 min at most), and told from the first time with our
        EDNS0; truncated or failed replies are not kept but relayed as they came."""
        try:
            parsed = DNSRecord.parse(reply)
        except Exception:
            return None
        ttls = [rr.ttl for rr in parsed.rr] or [
            rr.ttl for rr in parsed.auth if rr.rtype == QTYPE.SOA
        ]
        if (
            parsed.header.tc
            or not ttls
            or parsed.header.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN)
        ):
            return None
        now = self._clock()
        records = [rr for rr in (*parsed.rr, *parsed.auth, *parsed.ar) if rr.rtype != OPT]
        expires = now + min(min(ttls), FORWARD_MAX_TTL)
        additional = [rr for rr in parsed.ar if rr.rtype != OPT]
        stored = _Stored(now, expires, parsed, records, [rr.ttl for rr in records], additional)
        try:
            told = stored.aged(now, request)
        except Exception:  # dnslib reads some records it can't write back: not kept
            return None
        self._cache[key] = stored
        self._cache.move_to_end(key)
        while len(self._cache) > FORWARD_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return told


async def _ask_tcp(upstream: SocketAddress, query: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    try:
        writer.write(len(query).to_bytes(2, "big") + query)
        await writer.drain()
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = await reader.readexactly(size)
            if reply[:2] == query[:2]:
                return reply
    finally:
        writer.close()


async def _ask(upstream: SocketAddress, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()

    class Once(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not future.done() and data[:2] == query[:2]:
                future.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not future.done():
                future.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(
        Once, remote_addr=(upstream.host, upstream.port)
    )
    try:
        transport.sendto(query)
        return await future
    finally:
        transport.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.forwarding: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's isn't a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        result = self.server.answer(data, addr[0], udp=True)
        if isinstance(result, Forward):
            if len(self.forwarding) < MAX_PENDING_FORWARDS:  # past that, drop: a flood
                task = asyncio.ensure_future(self._forward(result, addr))
                self.forwarding.add(task)
                task.add_done_callback(self.forwarding.discard)
        elif result is not None and self.transport is not None:
            self.transport.sendto(result, addr)

    async def _forward(self, forward: Forward, addr: tuple[str, int]) -> None:
        reply = await self.server.forward(forward)
        if len(reply) > udp_limit(forward.request):  # an upstream's TCP answer, or its cache
            reply = truncated(forward.request, aa=False, ra=True)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class DnsServer:
    """Listens on every endpoint over UDP and TCP; `start()` returns once they are bound."""

    def __init__(
        self, binds: Sequence[SocketAddress], answerer: Answerer, forwarder: Forwarder | None
    ) -> None:
        self._binds = list(binds)
        self._answerer = answerer
        self._forwarder = forwarder
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connections = 0
        self._listeners: list[tuple[asyncio.BaseTransport, asyncio.Server]] = []
        self._outcomes = [0] * len(OUTCOMES)

    def answer(self, data: bytes, client: str, udp: bool) -> bytes | Forward | None:
        """Never raises: a bug on an odd packet costs that packet, not the server."""
        try:
            result = self._answerer.answer(data, client, udp)
        except Exception:
            log.exception("DNS query from %s could not be answered", client)
            result = formerr(data)
        if result is None:
            self._outcomes[DROPPED] += 1
        elif isinstance(result, Forward):
            self._outcomes[FORWARDED] += 1
        elif (rcode := result[3] & 0x0F) or result[7] or result[6]:  # an error, or answers
            self._outcomes[rcode] += 1
        else:  # NOERROR without answers: a NODATA, a TC, or BADVERS (its high bits in the OPT)
            self._outcomes[BAD_VERSION if extended_rcode(result) == BADVERS else 0] += 1
        return result

    def outcomes(self) -> dict[str, int]:
        """Queries by how they were answered, since the start (a plain list on the hot path:
        a metrics library's labelled counter would cost more than the answer)."""
        return dict(zip(OUTCOMES, self._outcomes, strict=True))

    async def forward(self, forward: Forward) -> bytes:
        if self._forwarder is None:
            return status(forward.request, RCODE.REFUSED)
        try:
            return await self._forwarder.resolve(forward.request)
        except Exception:
            log.exception("forwarding %s failed", forward.request.q.qname)
            return status(forward.request, RCODE.SERVFAIL, ra=True)

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = _new_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as error:
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="dns", daemon=True)
        self._thread.start()
        ready.wait(timeout=10)
        if failure:
            raise ControlPlaneError(
                f"the DNS server could not listen on {', '.join(map(str, self._binds))}: "
                f"{failure[0]}; pick a free address with --dns-bind (ports below 1024 need root)"
            ) from failure[0]

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for bind in self._binds:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(bind.host, bind.port)
            )
            server = await asyncio.start_server(self._tcp, bind.host, bind.port)
            self._listeners.append((transport, server))
            log.info("DNS listening on %s (UDP and TCP)", bind)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = str(writer.get_extra_info("peername", ("?", 0))[0])
        if self._connections >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        try:
            while True:
                size = int.from_bytes(
                    await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_SECONDS), "big"
                )
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_SECONDS)
                result = self.answer(data, client, udp=False)
                if isinstance(result, Forward):
                    result = await self.forward(result)
                if result is None:
                    break
                writer.write(len(result).to_bytes(2, "big") + result)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._connections -= 1
            writer.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            closing = asyncio.run_coroutine_threadsafe(self._close(), loop)
            with contextlib.suppress(Exception):  # stopping anyway: a stuck close can't hold it
                closing.result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def _close(self) -> None:
        """Stops listening and ends every handler and forward still running, so no task is
        left pending in a closed loop (its garbage, collected later anywhere, would log)."""
        for transport, server in self._listeners:
            transport.close()
            server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the transports' close callbacks


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
