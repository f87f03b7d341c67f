"""Many UDP datagrams per system call: Linux's recvmmsg(2) and sendmmsg(2), through ctypes.

Python's socket module has no binding for them and no maintained package offers one, so this
is the one place that declares the C structures. Under load a DNS reader spends more on a
system call's entry and exit than on answering; reading and sending up to `size` datagrams
per call is what puts the DNS process ahead of dnsmasq, which makes one call per datagram.

Every buffer is allocated once: datagram i is read into `queries[i * SLOT:]` with its sender
in slot i of the address table, and its reply written into `replies[i * SLOT:]` goes back to
that same address. The caller only touches memoryviews; nothing here allocates per datagram.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from controlplane.errors import ControlPlaneError

SLOT = 4096  # bytes per datagram, read or sent: a longer query is cut (so FORMERR)
ADDRESS = 28  # sizeof(struct sockaddr_in6), which holds a sockaddr_in too
_V4 = struct.Struct("!2xH4s")  # sockaddr_in: family (host order, skipped), port, address
_V6 = struct.Struct("!2xHI16s")  # sockaddr_in6: family, port, flow info, address, then
_SCOPE = struct.Struct("=I")  # the scope (interface index), in host order unlike the rest
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP})
"""Errors that say the call itself can't be made here (a sandbox's filter, an old kernel)."""
RECEIVE_UNSUPPORTED = UNSUPPORTED | {errno.EPERM}
"""The same for recvmmsg, and EPERM: no firewall refuses a receive, so it is a sandbox's
filter (Docker's seccomp profile answers a blocked call with it)."""


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_Iovec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint))


_HEADER_WORDS = ctypes.sizeof(_Mmsghdr) // 4
_LEN_WORD = _Mmsghdr.len.offset // 4  # where the kernel writes each datagram's length
_IOV_WORDS = ctypes.sizeof(_Iovec) // ctypes.sizeof(ctypes.c_ulong)


class Batch:
    """The buffers and headers of up to `size` datagrams on one socket of `family`.

    Not thread-safe: one reader thread owns a batch."""

    def __init__(self, family: socket.AddressFamily, size: int = 64) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            self._recvmmsg = libc.recvmmsg
            self._sendmmsg = libc.sendmmsg
        except AttributeError as error:
            raise ControlPlaneError(
                "this C library has no recvmmsg/sendmmsg, which the DNS server needs: "
                "run controlplane on Linux (glibc 2.14+ or musl)"
            ) from error
        self.size = size
        self._family = family
        self._in = (ctypes.c_char * (size * SLOT))()
        self._out = (ctypes.c_char * (size * SLOT))()
        self._names = (ctypes.c_char * (size * ADDRESS))()
        self._read = (_Mmsghdr * size)()
        self._send = (_Mmsghdr * size)()
        self._read_iov = (_Iovec * size)()
        self._send_iov = (_Iovec * size)()
        # A sender's address is always of the socket's family, so its size never changes:
        # the lengths the kernel writes back need no reset before the next read.
        namelen = ADDRESS if family == socket.AF_INET6 else 16
        for i in range(size):
            name = ctypes.addressof(self._names) + i * ADDRESS
            self._read_iov[i].base = ctypes.addressof(self._in) + i * SLOT
            self._read_iov[i].len = SLOT
            self._send_iov[i].base = ctypes.addressof(self._out) + i * SLOT
            for header, iov in ((self._read, self._read_iov), (self._send, self._send_iov)):
                header[i].hdr.name = name
                header[i].hdr.namelen = namelen
                header[i].hdr.iov = ctypes.pointer(iov[i])
                header[i].hdr.iovlen = 1
        self.queries = memoryview(self._in).cast("B")
        """Datagram i's bytes are `queries[i * SLOT : i * SLOT + lengths[i]]`."""
        self.replies = memoryview(self._out).cast("B")
        """Write reply i at `replies[i * SLOT:]`, then `reply_length(i, n)`."""
        self._lengths = memoryview(self._read).cast("B").cast("I")[_LEN_WORD::_HEADER_WORDS]
        # iov_len is a size_t, an unsigned long ("L") on Linux
        self._reply_sizes = memoryview(self._send_iov).cast("B").cast("L")
        self._names_view = memoryview(self._names).cast("B")
        # Pointers made once: a call without argtypes converts ints and these cheaply.
        self._read_at = ctypes.c_void_p(ctypes.addressof(self._read))
        self._send_from = [
            ctypes.c_void_p(ctypes.addressof(self._send) + i * ctypes.sizeof(_Mmsghdr))
            for i in range(size)
        ]

    def receive(self, fd: int) -> list[int]:
        """The lengths of the datagrams waiting on `fd`, read without blocking (at most
        `size`); empty when none waits. OSError for any other failure (an ICMP error of an
        earlier send is told this way on some sockets)."""
        count = self._recvmmsg(fd, self._read_at, self.size, socket.MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return []
            raise OSError(code, os.strerror(code))
        return self._lengths[:count].tolist()

    def reply_length(self, i: int, length: int) -> None:
        self._reply_sizes[i * _IOV_WORDS + 1] = length

    def send(self, fd: int, start: int, stop: int) -> None:
        """Sends replies start..stop-1 to their senders; one that fails is skipped (a client
        that went away is nothing to retry). OSError when sendmmsg can't be made at all."""
        while start < stop:
            sent = self._sendmmsg(fd, self._send_from[start], stop - start, 0)
            if sent > 0:
                start += sent
                continue
            code = ctypes.get_errno()
            if code in UNSUPPORTED:
                raise OSError(code, os.strerror(code))
            if code != errno.EINTR:
                start += 1

    def sender(self, i: int) -> tuple[str, int] | tuple[str, int, int, int]:
        """Datagram i's sender, as `socket.recvfrom` would give it."""
        view = self._names_view
        if self._family == socket.AF_INET6:
            port, flow, address = _V6.unpack_from(view, i * ADDRESS)
            (scope,) = _SCOPE.unpack_from(view, i * ADDRESS + _V6.size)
            return socket.inet_ntop(socket.AF_INET6, address), port, flow, scope
        port, address = _V4.unpack_from(view, i * ADDRESS)
        return socket.inet_ntop(socket.AF_INET, address), port
