"""A network namespace of a test's own, kept by a file the test owns (not `ip netns add`,
which leaves a /run/netns mount behind for good): its interfaces, routes, iptables rules and
loopback ports are invisible to the machine, and nothing in it can reach another address.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns into {what}: {os.strerror(errno)} (needs root)")


class NetworkNamespace:
    """Created at `path` (an nsfs bind mount on a file) with loopback up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        for command in (
            ["unshare", f"--net={path}", "true"],
            self.command(["ip", "link", "set", "lo", "up"]),
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise OSError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace; nsenter execs it, so its PID is the program's."""
        return ["nsenter", f"--net={self.path}", *argv]

    def entered(self) -> AbstractContextManager[None]:
        """Moves the calling thread into the namespace for the block (see `entered`)."""
        return entered(self.path)

    def remove(self) -> None:
        """Drop the namespace (it goes once no process is left in it) and its file."""
        if os.path.ismount(self.path):
            subprocess.run(["umount", str(self.path)], check=True, capture_output=True)
        self.path.unlink(missing_ok=True)


@contextmanager
def entered(path: Path) -> Iterator[None]:
    """Moves the calling thread into the network namespace at `path` (a namespace file, or a
    process's /proc/PID/ns/net) for the block: the sockets it opens and the threads and
    processes it starts live there. setns(2) moves only this thread; the rest of the process,
    and unix sockets such as an engine's, are unaffected."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        inside = os.open(path, os.O_RDONLY)
        try:
            _setns(inside, str(path))
        finally:
            os.close(inside)
        try:
            yield
        finally:
            _setns(back, "the thread's own network namespace")
    finally:
        os.close(back)
