"""`controlplane dns`: the DNS data plane, a process of its own that answers from the last
zone its controller fed it, so DNS outlives the controller.

`controlplane run --dns-bind` starts one and writes each new zone to its standard input, one
JSON line (`{"zone": ..., "allowed": [...]}`); it reports on its standard output, one JSON
line each: `{"ready": ...}` or `{"error": ...}` once, then `{"zone": VERSION}` as soon as it
answers from a new zone, and `{"outcomes": ...}` every second.
When the feed ends (the controller stopped, crashed or was killed) it keeps answering the
last zone for `keep` seconds, or until a successor for the same addresses takes its sockets
over (dns_handover), whichever comes first.

With `--controller URL` it is a service of its own (Compose: it outlives the controller's
container), following `GET /api/v1/dns/zone` by long poll. While the controller can't be
reached it answers the last zone for `keep` seconds, then SERVFAIL (clients move on to their
next resolver) until the controller answers again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TextIO

from controlplane.addresses import SocketAddress
from controlplane.core.dns_records import zone_from_data
from controlplane.dns_answer import Answerer
from controlplane.dns_handover import Handover, Predecessor, find_predecessor
from controlplane.dns_server import DnsServer, Forwarder
from controlplane.errors import ControlPlaneError
from controlplane.settings import IpNetwork

log = logging.getLogger(__name__)

REPORT_EVERY = 1.0
ZONE_PATH = "/api/v1/dns/zone"
FOLLOW_WAIT = 25.0  # seconds a long poll may wait at the controller for a newer zone
FOLLOW_RETRY, FOLLOW_RETRY_MAX = 0.5, 5.0


@dataclass(frozen=True)
class DnsOptions:
    binds: tuple[SocketAddress, ...]
    upstreams: tuple[SocketAddress, ...] = ()
    udp_answers: int = 0
    allow: tuple[IpNetwork, ...] | None = None
    """Who may use the upstreams; None: the networks the controller sends."""
    keep: float = 60.0
    """Seconds to answer the last zone once the feed ended (or the controller is away)."""
    controller: str | None = None
    """The controller API's URL to follow; None: zones come on standard input."""
    token: str | None = None


class _Report:
    """Writes report lines; once the reader is gone (the controller died) it stops trying."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.gone = False

    def send(self, **message: object) -> None:
        if self.gone:
            return
        with self._lock:
            try:
                self._out.write(json.dumps(message) + "\n")
                self._out.flush()
            except (OSError, ValueError):  # a broken pipe, or closed
                self.gone = True


class DnsProcess:
    def __init__(self, options: DnsOptions, feed: TextIO, report: TextIO) -> None:
        self.options = options
        self._feed = feed
        self._report = _Report(report)
        self._networks: list[IpNetwork] = list(options.allow or ())
        self.answerer = Answerer(
            lambda: self._networks,
            forwarding=bool(options.upstreams),
            udp_answers=options.udp_answers,
        )
        self._server: DnsServer | None = None
        self._handover: Handover | None = None
        self._predecessor: Predecessor | None = None
        self._orphaned = threading.Event()
        self._stopped = threading.Event()

    def run(self) -> int:
        """Serves until handed over or `keep` seconds after the feed ended; the exit code."""
        try:
            self._start()
        except ControlPlaneError as error:
            self._report.send(error=str(error))
            return 1
        threading.Thread(target=self._report_outcomes, name="dns-report", daemon=True).start()
        if self.options.controller is not None:
            self._follow(self.options.controller)
            return 0
        self._read_feed()
        self._orphaned.set()
        if self._server is None:
            log.info("the controller went away before its first zone: nothing to serve")
            if self._predecessor is not None:
                self._predecessor.close()
            return 0
        if self.options.keep > 0:
            log.info(
                "the controller is gone: DNS keeps answering its last zone (version %s) for "
                "%ss, or until a new controller takes over",
                self.answerer.zone.version if self.answerer.zone else "none",
                self.options.keep,
            )
        assert self._handover is not None
        self._handover.done.wait(self.options.keep)
        self._stop()
        return 0

    def _start(self) -> None:
        self._predecessor = find_predecessor(self.options.binds)
        if self._predecessor is None:
            self._serve(None)
            self._report.send(ready={"pid": os.getpid(), "took_over": None})
        else:
            log.info(
                "taking DNS over from process %s once the first zone comes", self._predecessor.pid
            )
            self._report.send(ready={"pid": os.getpid(), "took_over": self._predecessor.pid})

    def _serve(self, predecessor: Predecessor | None) -> None:
        sockets = None if predecessor is None else predecessor.take(len(self.options.binds))
        forwarder = Forwarder(self.options.upstreams) if self.options.upstreams else None
        server = DnsServer(self.options.binds, self.answerer, forwarder, sockets)
        server.start()
        self._server = server
        handover = Handover(
            self.options.binds, lambda: server.listening, self._orphaned.is_set, self._given
        )
        handover.listen()
        self._handover = handover
        if predecessor is not None:
            log.info("took DNS over from process %s", predecessor.pid)

    def _given(self) -> None:
        log.info("a new controller's DNS process took the sockets over: stopping")

    def _read_feed(self) -> None:
        for line in self._feed:
            try:
                message = json.loads(line)
            except ValueError as error:
                self._unusable(error)
                continue
            if not self._apply(message):
                return

    def _apply(self, message: object) -> bool:
        """Answers from the message's zone from now on; False when serving failed to start."""
        try:
            assert isinstance(message, dict), "not an object"
            zone = zone_from_data(message["zone"]) if message.get("zone") else None
            allowed = [ipaddress.ip_network(n, strict=False) for n in message["allowed"]]
        except (ValueError, KeyError, TypeError, AssertionError) as error:
            self._unusable(error)
            return True
        if self.options.allow is None:
            self._networks = allowed
        self.answerer.use(zone)
        self._report.send(zone=zone.version if zone else None)
        if self._server is None and zone is not None:
            try:
                self._serve(self._predecessor)
            except ControlPlaneError as error:
                log.error("%s", error)
                self._report.send(error=str(error))
                return False
        return True

    @staticmethod
    def _unusable(error: Exception) -> None:
        log.error(
            "the controller sent a zone that can't be used (%s): still answering the last "
            "one; this is a bug, please report it",
            error,
        )

    def _follow(self, url: str) -> None:
        """Long-polls the controller for each newer zone, for good (urllib, as the CLI
        client: one GET needs no HTTP library in the image)."""
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        version, contact, delay, away = -1, time.monotonic(), FOLLOW_RETRY, False
        while not self._stopped.is_set():
            query = urllib.parse.urlencode({"after": version, "timeout": FOLLOW_WAIT})
            request = urllib.request.Request(
                f"{url.rstrip('/')}{ZONE_PATH}?{query}", headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=FOLLOW_WAIT + 10) as reply:
                    message = json.loads(reply.read())
                version = int(message["version"])
            except (OSError, ValueError, KeyError, TypeError) as error:  # URLError is an OSError
                if not away:
                    log.warning(
                        "the controller at %s does not answer (%s): answering the last zone "
                        "for %gs (--keep)",
                        url,
                        error,
                        self.options.keep,
                    )
                    away = True
                if self.answerer.zone is not None and time.monotonic() - contact > (
                    self.options.keep
                ):
                    log.error(
                        "no word from the controller for %gs: SERVFAIL until it answers",
                        self.options.keep,
                    )
                    self.answerer.use(None)
                self._stopped.wait(delay)
                delay = min(delay * 2, FOLLOW_RETRY_MAX)
                continue
            if away:
                log.info("the controller at %s answers again", url)
            contact, delay, away = time.monotonic(), FOLLOW_RETRY, False
            if not self._apply(message):
                return

    def _report_outcomes(self) -> None:
        while not self._stopped.wait(REPORT_EVERY):
            server = self._server
            if server is not None:
                self._report.send(outcomes=server.outcomes())
            if self._report.gone:
                return

    def _stop(self) -> None:
        self._stopped.set()
        if self._handover is not None:
            self._handover.close()
        if self._server is not None:
            self._server.stop()


def serve(options: DnsOptions, feed: TextIO, report: TextIO) -> int:
    return DnsProcess(options, feed, report).run()
