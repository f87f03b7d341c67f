"""Hands a DNS process's listening sockets to its successor, so the DNS port stays open while
a controller restarts (the way nginx and HAProxy reload without closing their ports).

A DNS process serving some binds listens on an abstract Unix socket named for them: per
network namespace (host or container), nothing on disk, gone with the process. A successor
for the same binds connects and says hello. The serving process agrees only once its own
controller is gone (its feed ended), to one successor at a time, and only to a process of its
own user (or root), as the successor only takes sockets from one: two live controllers never
take a port from each other, and no other user's process can take it or pose as the serving
one. When the successor has a zone to answer from, it asks, gets the UDP and TCP socket of
every bind (SCM_RIGHTS), checks they are bound where it was told to listen, and both read
them until the predecessor has stopped reading and exits: each datagram is read by one of
them, so none is lost in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

from controlplane.errors import ControlPlaneError

log = logging.getLogger(__name__)

HELLO, AGREED, BUSY, CLAIMED, TAKE = b"hello\n", b"agreed\n", b"busy\n", b"claimed\n", b"take\n"
SOCKETS = b"sockets\n"
Listening = list[tuple[socket.socket, socket.socket]]
"""Per bind, in the order of the binds: its UDP socket and its TCP listening socket."""


def rendezvous(binds: Sequence[object]) -> str:
    """The abstract socket's name (a leading NUL) for these binds (IP:PORT each, as str()
    tells them), in any order."""
    return "\0controlplane-dns " + " ".join(sorted(str(b) for b in binds))


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The other end's pid and uid (SO_PEERCRED: the kernel's word, not the peer's)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def _trusted(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class Predecessor:
    """The DNS process serving our binds, which agreed to hand them over."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self._conn = conn
        self.pid = pid

    def take(self, binds: Sequence[object], timeout: float = 5.0) -> Listening | None:
        """Its sockets, one UDP and one TCP per bind, checked to be bound there; None when it
        is gone or sends anything else (then bind afresh). It stops reading them once sent."""
        fds: list[int] = []
        try:
            self._conn.settimeout(timeout)
            self._conn.sendall(TAKE)
            message, fds, _flags, _addr = socket.recv_fds(self._conn, 64, 2 * len(binds))
        except OSError as error:
            log.warning("process %s did not hand its DNS sockets over (%s)", self.pid, error)
            message = b""
        finally:
            self._conn.close()
        sockets = [socket.socket(fileno=fd) for fd in fds]
        pairs = [(sockets[i], sockets[i + 1]) for i in range(0, len(sockets) - 1, 2)]
        wanted = [str(b) for b in binds]
        if (
            message == SOCKETS
            and len(sockets) == 2 * len(binds)
            and all(u.type == socket.SOCK_DGRAM and t.type == socket.SOCK_STREAM for u, t in pairs)
            and [_where(u) for u, _ in pairs] == wanted
            and [_where(t) for _, t in pairs] == wanted
        ):
            return pairs
        for sock in sockets:
            sock.close()
        if message:
            log.warning(
                "process %s handed over sockets other than %s: binding afresh",
                self.pid,
                ", ".join(wanted),
            )
        return None

    def close(self) -> None:
        self._conn.close()


def find_predecessor(binds: Sequence[object], timeout: float = 5.0) -> Predecessor | None:
    """None when no DNS process (of ours) serves these binds. Raises ControlPlaneError, saying
    what to do, when one does for a controller that still runs, or when another user's
    process holds the name."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    where = ", ".join(map(str, binds))
    try:
        conn.connect(rendezvous(binds))
        pid, uid = _peer(conn)
        if not _trusted(uid):
            raise ControlPlaneError(
                f"process {pid} of user {uid} claims to serve DNS on {where}; only a DNS "
                "process of this user or root is taken over: stop it, or pick other "
                "addresses with --dns-bind"
            )
        conn.sendall(HELLO)
        answer = conn.recv(64)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    except OSError:
        conn.close()
        return None  # it went away in between: no one to take over from
    except ControlPlaneError:
        conn.close()
        raise
    if answer.startswith(AGREED):
        return Predecessor(conn, pid)
    conn.close()
    if answer.startswith(CLAIMED):
        raise ControlPlaneError(
            f"another controller is taking DNS on {where} over from process {pid} right now: "
            "run one controller per DNS address"
        )
    if not answer:
        return None  # it went away in between
    raise ControlPlaneError(
        f"DNS on {where} is served by process {pid}, whose controller still runs: stop that "
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
        self._claim = threading.Lock()
        """Held from a successor's hello to its take (or its going away): one at a time."""

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
                        "no successor can take this DNS process's sockets over: %s is taken",
                        self._name[1:],
                    )
                    return
                time.sleep(0.02)
        server.listen(4)
        self._server = server
        threading.Thread(
            target=self._accept, args=(server,), name="dns-handover", daemon=True
        ).start()

    @property
    def done(self) -> threading.Event:
        return self._done

    def _accept(self, server: socket.socket) -> None:
        while not self._done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                pid, uid = _peer(conn)
                if not _trusted(uid) or conn.recv(64) != HELLO:
                    log.warning("process %s (user %s) asked for the DNS sockets: refused", pid, uid)
                    return
                if not self._may_go():
                    conn.sendall(BUSY)
                    return
                if not self._claim.acquire(blocking=False):
                    conn.sendall(CLAIMED)
                    return
                try:
                    self._hand_over(conn)
                finally:
                    self._claim.release()
            except OSError as error:
                log.warning("a successor's handover failed: %s", error)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.sendall(AGREED)
        conn.settimeout(None)  # it asks once it has a zone: its controller's first pass
        if conn.recv(64) != TAKE or self._done.is_set():
            return
        fds = [s.fileno() for pair in self._listening() for s in pair]
        socket.send_fds(conn, [SOCKETS], fds)
        self._done.set()
        self.close()
        self._given()

    def close(self) -> None:
        """Frees the name at once: shutdown() wakes the thread in accept(), which would hold
        the socket (and the name) until it returned."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
