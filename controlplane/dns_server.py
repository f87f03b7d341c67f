"""The DNS edge: UDP and TCP listeners, and forwarding to upstream resolvers.

UDP is read by one plain thread per bind, up to 64 datagrams per system call: most answers
are a dict lookup, and an event loop's callback and transport around each datagram, or a
system call per datagram, cost more than that. TCP and forwarding run on an asyncio loop
(uvloop when installed) in another thread.
Every packet goes through `Answerer`; nothing a client sends can raise out of a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR, DNSRecord

from controlplane.addresses import SocketAddress
from controlplane.dns_answer import (
    DO_BIT,
    OPT,
    OUTCOMES,
    TC_BIT,
    Answerer,
    Forward,
    add_opt,
    formerr,
    outcome,
    status,
    truncated,
    udp_limit,
)
from controlplane.dns_handover import Listening
from controlplane.errors import ControlPlaneError
from controlplane.udp_batch import RECEIVE_UNSUPPORTED, SLOT, Batch

log = logging.getLogger(__name__)

TCP_IDLE_SECONDS = 10.0
TCP_MAX_CONNECTIONS = 256
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


UDP_RECEIVE_BUFFER = 1 << 20  # a burst waits in the kernel rather than being dropped there
TCP_BACKLOG = 128
BATCH_AFTER = 4  # reads in a row that found a datagram waiting: a backlog, read in batches


class _UdpReader:
    """Reads one UDP socket on a thread of its own until `stop()`. Forwarded queries go to
    the event loop, which sends their replies through the same socket (sendto is safe from
    any thread).

    Under load, datagrams are read and answered in batches (`udp_batch`), where the C
    library and the sandbox allow it. Reads never block (MSG_DONTWAIT): when nothing waits,
    the thread sleeps in poll() on the socket and a wake-up pipe, so `stop()` never touches
    the socket itself, which a successor process may be reading too (a handover)."""

    def __init__(self, server: DnsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.batch: Batch | None = None
        try:
            self.batch = Batch(sock.family)
        except ControlPlaneError as error:
            log.warning("DNS over UDP reads one datagram per call: %s", error)
        self.forwarding: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="dns-udp", daemon=True)
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        """Written for speed: no call, context manager or attribute chain on a fast reply.

        One datagram per system call while the socket's queue is short (a call of the batch
        costs more than recvfrom for one); once BATCH_AFTER reads in a row found one waiting,
        a backlog has formed and reads take up to a batch, until one finds few."""
        receive, send = self.sock.recvfrom, self.sock.sendto
        answerer, counts = self.server.answerer, self.server.counts
        idle = select.poll()
        idle.register(self.sock, select.POLLIN)
        idle.register(self._wake_read, select.POLLIN)
        streak, batch_after = 0, BATCH_AFTER if self.batch else math.inf
        while not self._stopping:
            if streak >= batch_after:
                streak = self._read_batch(idle)
                if self.batch is None:
                    batch_after = math.inf
                continue
            try:
                data, addr = receive(SLOT, socket.MSG_DONTWAIT)
                streak += 1
                fast = answerer.fast.get(data[2:])
                if fast is not None:
                    send(data[:2] + next(fast[0]), addr)
                    counts[fast[1]] += 1
                    continue
            except BlockingIOError:
                streak = 0
                idle.poll()
                continue
            except OSError:  # the ICMP error of an earlier send, or an unreachable client
                continue
            self._answer_one(data, addr)

    def _read_batch(self, idle: select.poll) -> int:
        """One batch read and answered; the streak to go on with (0: back to one at a time).
        Batches stop for good when the calls can't be made here."""
        assert self.batch is not None
        try:
            lengths = self.batch.receive(self.sock.fileno())
            if lengths:
                self._answer_batch(self.batch, lengths)
            else:
                idle.poll()
        except OSError as error:
            if error.errno in RECEIVE_UNSUPPORTED:
                log.warning("DNS over UDP reads one datagram per call from now: %s", error)
                self.batch = None
            return 0  # the next read is recvfrom's, which tells a socket's error its way
        except Exception:  # a bug must cost this batch, not the UDP server
            log.exception("a batch of DNS queries could not be answered")
            return 0
        return BATCH_AFTER if len(lengths) >= BATCH_AFTER else 0

    def _answer_one(self, data: bytes, addr: tuple[str, int]) -> None:
        result = self.server.answer(data, addr[0], udp=True)
        if type(result) is bytes:
            with contextlib.suppress(OSError):  # the client's address is unreachable
                self.sock.sendto(result, addr)
        elif isinstance(result, Forward):
            self.server.call_soon(self._forward_later, result, addr)

    def _answer_batch(self, batch: Batch, lengths: list[int]) -> None:
        """Replies ready in a row go out in one sendmmsg; one that is not (forwarded,
        dropped, or longer than a slot) ends the row."""
        fd, answer = self.sock.fileno(), self.server.answer
        queries, replies, reply_length = batch.queries, batch.replies, batch.reply_length
        fast_replies, counts = self.server.answerer.fast, self.server.counts
        row = 0
        for i, length in enumerate(lengths):
            at = i * SLOT
            fast = fast_replies.get(queries[at + 2 : at + length].tobytes())
            if fast is not None:
                body = next(fast[0])
                counts[fast[1]] += 1
                replies[at : at + 2] = queries[at : at + 2]
                replies[at + 2 : at + 2 + len(body)] = body
                reply_length(i, 2 + len(body))
                continue
            result = answer(queries[at : at + length].tobytes(), batch.sender(i)[0], udp=True)
            if type(result) is bytes and len(result) <= SLOT:
                replies[at : at + len(result)] = result
                reply_length(i, len(result))
                continue
            batch.send(fd, row, i)
            row = i + 1
            if type(result) is bytes:
                with contextlib.suppress(OSError):
                    self.sock.sendto(result, batch.sender(i))
            elif isinstance(result, Forward):
                self.server.call_soon(self._forward_later, result, batch.sender(i))
        batch.send(fd, row, len(lengths))

    def _forward_later(self, forward: Forward, addr: tuple[str, int]) -> None:
        if len(self.forwarding) < MAX_PENDING_FORWARDS:  # past that, drop: a flood
            task = asyncio.ensure_future(self._forward(forward, addr))
            self.forwarding.add(task)
            task.add_done_callback(self.forwarding.discard)

    async def _forward(self, forward: Forward, addr: tuple[str, int]) -> None:
        reply = await self.server.forward(forward)
        if len(reply) > udp_limit(forward.request):  # an upstream's TCP answer, or its cache
            reply = truncated(forward.request, aa=False, ra=True)
        if not self._stopping:
            with contextlib.suppress(OSError):
                self.sock.sendto(reply, addr)

    def stop(self) -> None:
        """Ends the thread after the datagram in hand, if any; the socket stays as it was."""
        self._stopping = True
        os.write(self._wake_write, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        os.close(self._wake_read)
        os.close(self._wake_write)


def bind_sockets(binds: Sequence[SocketAddress]) -> Listening:
    """A UDP and a listening TCP socket on each bind; a taken address raises ControlPlaneError
    with what to do."""
    made: Listening = []
    try:
        for bind in binds:
            family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            made.append((udp, tcp))
            with contextlib.suppress(OSError):  # a smaller buffer only costs bursts
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((bind.host, bind.port))
                tcp.bind((bind.host, bind.port))
                tcp.listen(TCP_BACKLOG)
            except OSError as error:
                raise ControlPlaneError(
                    f"the DNS server could not listen on {bind}: {error.strerror or error}; "
                    "pick a free address with --dns-bind (ports below 1024 need root)"
                ) from error
    except BaseException:
        for pair in made:
            for sock in pair:
                sock.close()
        raise
    return made


class DnsServer:
    """Listens on every endpoint over UDP and TCP; `start()` returns once they are bound.
    `sockets`: already bound ones (a predecessor's), else it binds its own."""

    def __init__(
        self,
        binds: Sequence[SocketAddress],
        answerer: Answerer,
        forwarder: Forwarder | None,
        sockets: Listening | None = None,
    ) -> None:
        self._binds = list(binds)
        self._sockets = sockets
        self.answerer = answerer
        self._forwarder = forwarder
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connections = 0
        self._listeners: list[asyncio.Server] = []
        self._readers: list[_UdpReader] = []
        self.counts = [0] * len(OUTCOMES)
        """Queries by outcome since the start (a plain list on the hot path: a metrics
        library's labelled counter would cost more than the answer)."""

    def answer(self, data: bytes, client: str, udp: bool) -> bytes | Forward | None:
        """Never raises: a bug on an odd packet costs that packet, not the server."""
        try:
            result = self.answerer.answer(data, client, udp)
        except Exception:
            log.exception("DNS query from %s could not be answered", client)
            result = formerr(data)
        self.counts[outcome(result)] += 1
        return result

    def outcomes(self) -> dict[str, int]:
        """Queries by how they were answered, since the start."""
        return dict(zip(OUTCOMES, self.counts, strict=True))

    def call_soon(self, callback: Callable[..., None], *args: object) -> None:
        """Runs `callback` on the event loop's thread (from a UDP reader)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closing: the query goes unanswered
                loop.call_soon_threadsafe(callback, *args)

    async def forward(self, forward: Forward) -> bytes:
        if self._forwarder is None:
            return status(forward.request, RCODE.REFUSED)
        try:
            return await self._forwarder.resolve(forward.request)
        except Exception:
            log.exception("forwarding %s failed", forward.request.q.qname)
            return status(forward.request, RCODE.SERVFAIL, ra=True)

    @property
    def listening(self) -> Listening:
        """Its sockets (for a successor to take over)."""
        return list(self._sockets or ())

    def start(self) -> None:
        if self._sockets is None:
            self._sockets = bind_sockets(self._binds)
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
            self.stop()
            raise ControlPlaneError(
                f"the DNS server could not serve TCP on {', '.join(map(str, self._binds))}: "
                f"{failure[0]}"
            ) from failure[0]
        self._readers = [_UdpReader(self, udp) for udp, _tcp in self._sockets]
        for reader in self._readers:
            reader.start()
        for bind in self._binds:
            log.info("DNS listening on %s (UDP and TCP)", bind)

    async def _listen(self) -> None:
        for _udp, tcp in self._sockets or ():
            self._listeners.append(await asyncio.start_server(self._tcp, sock=tcp))

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
        for reader in self._readers:
            reader.stop()
        self._readers = []
        loop = self._loop
        if loop is not None and loop.is_running():
            closing = asyncio.run_coroutine_threadsafe(self._close(), loop)
            with contextlib.suppress(Exception):  # stopping anyway: a stuck close can't hold it
                closing.result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        for udp, tcp in self._sockets or ():  # ours; a successor holds its own copies
            udp.close()
            tcp.close()

    async def _close(self) -> None:
        """Stops listening and ends every handler and forward still running, so no task is
        left pending in a closed loop (its garbage, collected later anywhere, would log)."""
        for server in self._listeners:
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
