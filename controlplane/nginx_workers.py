"""nginx's worker processes as /proc shows them in its container, and which old ones to
retire after a reload.

On SIGHUP the nginx master (PID 1 in its container) starts workers with the new config, then
sleeps 100 ms "to allow new processes to start" before telling the old workers to quit. Until
then the old workers keep accepting connections and route them by the old config: a backend
that was just stopped still gets requests, a new one gets none from them. The new workers are
up ~10 ms after the signal, so the controller tells the old ones to quit (SIGQUIT, the
master's own graceful shutdown signal) as soon as every new worker is up: what the master
does 100 ms later, done as soon as it is safe. Connections the old workers hold finish as
they would; the listening sockets stay open in the master, so none waits unanswered.
"""

from __future__ import annotations

from dataclasses import dataclass

LISTING = (
    "if [ -r /proc/1/task/1/children ]; then read -r c < /proc/1/task/1/children; "
    "else c=$(cd /proc && echo [0-9]*); fi; "
    "for p in $c; do s= t=; read -r s < /proc/$p/stat; read -r t < /proc/$p/cmdline; "
    'printf \'%s|%s\\n\' "$s" "$t"; done 2>/dev/null; :'
)
"""A POSIX sh script printing the stat line and title of the master's children (of every
process where the kernel has no `children` file), with no process started per entry. `read`
drops NUL bytes (busybox sh, dash and bash alike), and nginx pads its title with them, so a
worker's title reads whole; `read` returns non-zero there (no trailing newline), hence the
`;` rather than `&&`. A process gone mid-loop prints an empty line. ~1 ms in the container."""
MASTER = 1
WORKER_TITLE = "nginx: worker process"
"""The title a worker sets once it is set up and accepting (until then it shows the master's);
an old worker told to quit shows "nginx: worker process is shutting down"."""


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    title: str


def parse(listing: str) -> tuple[Process, ...]:
    """Lines of LISTING's output; lines that don't parse (a process gone mid-read) are skipped.
    The command name in a stat line is in parentheses and may hold spaces or parentheses
    itself, so the fields after it are found from its last ")"."""
    processes = []
    for line in listing.splitlines():
        stat, _, title = line.partition("|")
        head, _, tail = stat.rpartition(")")
        fields = tail.split()
        pid = head.split("(", 1)[0].strip()
        if len(fields) < 2 or not _number(pid) or not _number(fields[1]):
            continue
        processes.append(Process(int(pid), int(fields[1]), title))
    return tuple(processes)


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def workers(processes: tuple[Process, ...]) -> frozenset[int]:
    """PIDs of the master's workers that are up and not shutting down."""
    return frozenset(p.pid for p in processes if p.ppid == MASTER and p.title == WORKER_TITLE)


def retirable(before: frozenset[int], now: frozenset[int]) -> frozenset[int] | None:
    """Old workers to tell to quit; empty when none is left to tell (the master told them
    itself, or it runs without workers); None while new workers are still starting."""
    old = before & now
    if not old:
        return frozenset()
    if len(now - before) >= len(before):
        return old
    return None
