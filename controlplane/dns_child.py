"""The controller's side of the DNS data plane: starts `controlplane dns` (dns_process) as a
process of its own and feeds it each new zone, so DNS keeps answering when this process
stops, crashes or is killed, and a restarted controller's DNS process takes the port over.

Zones are written by a thread of their own, latest first, and `applied()` waits, bounded,
until the DNS process answers from one: a pass is done when DNS is, and a slow or stuck DNS
process delays it by that bound at most. A DNS process that dies is started again at once
and given the latest zone (then after 1 s, 2 s, ... up to 30 s while it keeps failing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence

from controlplane.addresses import SocketAddress
from controlplane.core.dns_records import Zone, zone_data
from controlplane.errors import ControlPlaneError
from controlplane.settings import IpNetwork

log = logging.getLogger(__name__)

READY_TIMEOUT = 20.0
_Zone = tuple[Zone | None, list[str]]
"""A zone to send, with the CIDRs that may use the forwarder."""
RESPAWN_FIRST, RESPAWN_MAX = 1.0, 30.0


class DnsChild:
    """The DNS process of this controller, and what it was last told."""

    def __init__(
        self,
        binds: Sequence[SocketAddress],
        upstreams: Sequence[SocketAddress],
        udp_answers: int,
        allow: Sequence[IpNetwork] | None,
        keep: float,
        command: Sequence[str] = (sys.executable, "-m", "controlplane", "dns"),
        forward_private_reverse: bool = False,
    ) -> None:
        self._argv = [
            *command,
            *(f"--bind={b}" for b in binds),
            *(f"--upstream={u}" for u in upstreams),
            f"--udp-answers={udp_answers}",
            *(["--forward-private-reverse"] if forward_private_reverse else []),
            *(f"--allow={n}" for n in allow or ()),
            f"--keep={keep:g}",
            f"--log-level={logging.getLevelName(logging.getLogger().level).lower()}",
        ]
        self._binds = list(binds)
        self._keep = keep
        self._process: subprocess.Popen[str] | None = None
        self._latest: _Zone | None = None
        self._sent: _Zone | None = None
        """The zone last written to the current process (by identity)."""
        self._wake = threading.Condition()
        self._closing = False
        self._outcomes: dict[str, int] = {}
        self._applied: int | None = None
        self._applied_changed = threading.Condition()
        self._writer: threading.Thread | None = None
        self._respawn_after = 0.0
        self.pid: int | None = None

    def start(self) -> None:
        """Returns once the DNS process listens (or will take over from its predecessor);
        raises ControlPlaneError with its reason when it can't."""
        self._spawn()
        self._writer = threading.Thread(target=self._write, name="dns-feed", daemon=True)
        self._writer.start()
        where = ", ".join(map(str, self._binds))
        log.info("DNS on %s served by process %s (UDP and TCP)", where, self.pid)

    def _spawn(self) -> None:
        process = subprocess.Popen(
            self._argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's ^C or a process-group kill is not its end
        )
        assert process.stdout is not None
        out = process.stdout
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(out.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT)
        try:
            message = json.loads(first[0]) if first and first[0] else {}
        except ValueError:
            message = {"error": f"the DNS process said {first[0][:200]!r} where it reports"}
        if not isinstance(message, dict) or "ready" not in message:
            process.kill()
            process.wait()
            raise ControlPlaneError(
                str(
                    message.get("error")
                    or "the DNS process did not start; run with --log-level debug to see why"
                )
            )
        with self._applied_changed:
            self._applied = None
        self._process = process
        self.pid = process.pid
        self._sent = None
        threading.Thread(
            target=self._read_reports, args=(process,), name="dns-reports", daemon=True
        ).start()

    def publish(self, zone: Zone | None, allowed: Iterable[str]) -> None:
        """Queues `zone` for the DNS process, with the CIDRs that may use its forwarder; only
        the latest queued is sent. Encoding is the writer's: a pass only hands it over."""
        with self._wake:
            self._latest = (zone, list(allowed))
            self._wake.notify()

    def _write(self) -> None:
        while True:
            with self._wake:
                while not self._closing and (self._latest is None or self._latest is self._sent):
                    self._wake.wait()
                if self._closing:
                    return
                latest = self._latest
            assert latest is not None
            zone, allowed = latest
            line = json.dumps(
                {"zone": zone_data(zone) if zone else None, "allowed": allowed},
                separators=(",", ":"),
            )
            if not self._send(latest, line):
                with self._wake:  # failing to start again: wait, then try again
                    self._wake.wait_for(lambda: self._closing, self._respawn_after)

    def _send(self, latest: _Zone, line: str) -> bool:
        """False when no DNS process could be started to take it."""
        process = self._process
        if process is None or process.poll() is not None:
            log.error("the DNS process exited (%s): starting another", self._exit(process))
            try:
                self._spawn()
            except ControlPlaneError as error:
                self._respawn_after = min(max(self._respawn_after * 2, RESPAWN_FIRST), RESPAWN_MAX)
                log.error("DNS is not served: %s; trying again in %gs", error, self._respawn_after)
                return False
            self._respawn_after = 0.0
            process = self._process
        assert process is not None and process.stdin is not None
        try:
            process.stdin.write(line + "\n")
            process.stdin.flush()
            self._sent = latest
        except (BrokenPipeError, ValueError):
            log.error("the DNS process stopped reading its zones: starting another")
            process.kill()
        return True

    @staticmethod
    def _exit(process: subprocess.Popen[str] | None) -> str:
        return "never started" if process is None else f"exit code {process.returncode}"

    def _read_reports(self, process: subprocess.Popen[str]) -> None:
        """Until the process ends; then the writer starts another and sends it the latest."""
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            outcomes = message.get("outcomes")
            if isinstance(outcomes, dict):
                self._outcomes = {str(k): int(v) for k, v in outcomes.items()}
            if isinstance(message.get("zone"), int):
                with self._applied_changed:
                    self._applied = message["zone"]
                    self._applied_changed.notify_all()
        process.wait()
        with self._applied_changed:
            self._applied_changed.notify_all()  # nobody waits on a dead process
        with self._wake:
            if not self._closing and process is self._process:
                self._sent = None
                self._wake.notify()

    def applied(self, version: int, timeout: float) -> bool:
        """Waits until the DNS process answers from zone `version` (or a later one); False
        at once when it has exited."""
        process = self._process
        with self._applied_changed:
            return self._applied_changed.wait_for(
                lambda: (
                    (self._applied is not None and self._applied >= version)
                    or process is None
                    or process.poll() is not None
                ),
                timeout,
            ) and (self._applied is not None and self._applied >= version)

    def outcomes(self) -> dict[str, int]:
        """Queries by outcome, as the DNS process last reported (each second)."""
        return dict(self._outcomes)

    def close(self) -> None:
        """Ends the feed: the DNS process answers the last zone for --dns-keep seconds, unless
        a new controller takes over first; with 0, it stops now and this waits for it."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._writer is not None:
            self._writer.join(timeout=5)
        process = self._process
        if process is None:
            return
        if self._writer is not None and self._writer.is_alive():
            log.error("the DNS process does not read its zones: stopping it")
            process.kill()  # its pipe is full: closing it would wait on the stuck write
        if process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        if self._keep == 0:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif process.poll() is None:
            log.info(
                "DNS (process %s) keeps answering the last zone for %gs (--dns-keep), or "
                "until a new controller takes it over",
                process.pid,
                self._keep,
            )
