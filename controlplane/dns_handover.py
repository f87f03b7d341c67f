"""Hands a DNS process's listening sockets to its successor, so the DNS port stays open while
a controller restarts (the way nginx and HAProxy reload without closing their ports).

A DNS process serving some binds listens on an abstract Unix socket named for them: per
network namespace (host or container), nothing on disk, gone with the process. A successor
for the same binds connects and says hello. The serving process agrees only once its own
controller is gone (its feed ended): two live controllers never take a port from each other.
When the successor has a zone to answer from, it asks, and gets the UDP and TCP socket of
every bind (SCM_RIGHTS). Both read them until the predecessor has stopped reading and
exits; each datagram is read by one of them, so none is lost in between.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from controlplane.errors import ControlPlaneError

log = logging.getLogger(__name__)

HELLO, AGREED, BUSY, TAKE = b"hello\n", b"agreed\n", b"busy\n", b"take\n"
Listening = list[tuple[socket.socket, socket.socket]]
"""Per bind, in the order of the binds: its UDP socket and its TCP listening socket."""


def rendezvous(binds: Sequence[object]) -> str:
    """The abstract socket's name (a leading NUL) for these binds (IP:PORT each, as str()
    tells them), in any order."""
    return "\0controlplane-dns " + " ".join(sorted(str(b) for b in binds))


class Predecessor:
    """The DNS process serving our binds, which agreed to hand them over."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self._conn = conn
        self.pid = pid

    def take(self, count: int, timeout: float = 5.0) -> Listening:
        """Its sockets, `count` binds' worth. It stops reading them once they are sent."""
        self._conn.settimeout(timeout)
        self._conn.sendall(TAKE)
        message, fds, _flags, _addr = socket.recv_fds(self._conn, 4096, 2 * count)
        self._conn.close()
        if len(fds) != 2 * count or message != b"sockets\n":
            for fd in fds:
                with contextlib.suppress(OSError):
                    socket.close(fd)
            raise ControlPlaneError(
                f"the DNS process {self.pid} handed over {len(fds)} sockets, not {2 * count}; "
                "stop it (kill it) and start the controller again"
            )
        sockets = [socket.socket(fileno=fd) for fd in fds]
        for sock in sockets:
            sock.setblocking(True)
        return [(sockets[i], sockets[i + 1]) for i in range(0, len(sockets), 2)]

    def close(self) -> None:
        self._conn.close()


def find_predecessor(binds: Sequence[object], timeout: float = 5.0) -> Predecessor | None:
    """None when no DNS process serves these binds. Raises when one does for a controller that
    still runs."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(rendezvous(binds))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    try:
        conn.sendall(HELLO)
        answer = conn.recv(64)
    except OSError:
        conn.close()
        return None  # it went away in between: no one to take over from
    pid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    peer = int.from_bytes(pid[:4], "little")
    if answer.startswith(AGREED):
        return Predecessor(conn, peer)
    conn.close()
    where = ", ".join(map(str, binds))
    raise ControlPlaneError(
        f"DNS on {where} is served by process {peer}, whose controller still runs: stop that "
        "controller first, or pick other addresses with --dns-bind"
    )


class Handover:
    """The serving side: answers successors on the rendezvous socket. `may_go()` says whether
    the sockets may be handed over now; `given()` runs once they are (stop reading them)."""

    def __init__(
        self,
        binds: Sequence[object],
        listening: Callable[[], Listening],
        may_go: Callable[[], bool],
        given: Callable[[], None],
    ) -> None:
        self._name = rendezvous(binds)
        self._listening = listening
        self._may_go = may_go
        self._given = given
        self._server: socket.socket | None = None
        self._done = threading.Event()

    def listen(self, wait: float = 5.0) -> None:
        """Binds the rendezvous name; a predecessor that just handed over may hold it for a
        moment more."""
        deadline = time.monotonic() + wait
        while True:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.bind(self._name)
                break
            except OSError:
                server.close()
                if time.monotonic() > deadline:
                    log.warning(
                        "no successor can take this DNS process's sockets over: %s is still taken",
                        self._name[1:],
                    )
                    return
                time.sleep(0.02)
        server.listen(4)
        self._server = server
        threading.Thread(target=self._accept, name="dns-handover", daemon=True).start()

    @property
    def done(self) -> threading.Event:
        return self._done

    def _accept(self) -> None:
        server = self._server
        while server is not None and not self._done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                if conn.recv(64) != HELLO:
                    return
                if not self._may_go():
                    conn.sendall(BUSY)
                    return
                conn.sendall(AGREED)
                conn.settimeout(None)  # it asks once it has a zone: its controller's first pass
                if conn.recv(64) != TAKE or self._done.is_set():
                    return
                self.close()
                fds = [s.fileno() for pair in self._listening() for s in pair]
                socket.send_fds(conn, [b"sockets\n"], fds)
            except OSError as error:
                log.warning("a successor's handover failed: %s", error)
                return
        self._done.set()
        self._given()

    def close(self) -> None:
        """Frees the name at once: shutdown() wakes the thread in accept(), which would hold
        the socket (and the name) until it returned."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
