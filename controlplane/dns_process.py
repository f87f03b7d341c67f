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
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from typing import TextIO

from controlplane.addresses import SocketAddress
from controlplane.core.dns_records import MAX_ZONE_AGE, ZONE_SIGNATURE, signed_by, zone_from_data
from controlplane.dns_answer import Answerer
from controlplane.dns_handover import Handover, Predecessor, find_predecessor
from controlplane.dns_server import DnsServer, Forwarder
from controlplane.errors import ControlPlaneError
from controlplane.settings import IpNetwork

log = logging.getLogger(__name__)

REPORT_EVERY = 1.0
ZONE_PATH = "/api/v1/dns/zone"
MAX_ZONE_BYTES = 64 * 1024 * 1024  # a reply past this is no zone of ours
FOLLOW_WAIT = 25.0  # seconds a long poll may wait at the controller for a newer zone
FOLLOW_RETRY, FOLLOW_RETRY_MAX = 0.5, 5.0


@dataclass(frozen=True)
class DnsOptions:
    binds: tuple[SocketAddress, ...]
    upstreams: tuple[SocketAddress, ...] = ()
    udp_answers: int = 0
    forward_private_reverse: bool = False
    allow: tuple[IpNetwork, ...] | None = None
    """Who may use the upstreams; None: the networks the controller sends."""
    keep: float = 60.0
    """Seconds to answer the last zone once the feed ended (or the controller is away)."""
    controller: str | None = None
    """The controller API's URL to follow; None: zones come on standard input."""
    token: str | None = None
    """The controller's API token: only zone replies signed with it are taken."""


class _Report:
    """Writes report lines; once the reader is gone (the controller died) it stops trying.
    None: nobody reads them (--controller: standard output is the container's log)."""

    def __init__(self, out: TextIO | None) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.gone = out is None

    def send(self, **message: object) -> None:
        if self.gone or self._out is None:
            return
        with self._lock:
            try:
                self._out.write(json.dumps(message) + "\n")
                self._out.flush()
            except (OSError, ValueError):  # a broken pipe, or closed
                self.gone = True


class DnsProcess:
    """One DNS process: its server, its feed (a pipe, or the controller's API), its handover
    to a successor, and how long it answers on alone."""

    def __init__(self, options: DnsOptions, feed: TextIO, report: TextIO | None) -> None:
        self.options = options
        self._feed = feed
        self._report = _Report(report)
        self._networks: list[IpNetwork] = list(options.allow or ())
        self.answerer = Answerer(
            lambda: self._networks,
            forwarding=bool(options.upstreams),
            udp_answers=options.udp_answers,
            forward_private_reverse=options.forward_private_reverse,
        )
        self._server: DnsServer | None = None
        self._handover: Handover | None = None
        self._predecessor: Predecessor | None = None
        self._orphaned = threading.Event()
        self._stopped = threading.Event()

    def run(self) -> int:
        """Serves until handed over, `keep` seconds after the feed ended, or SIGTERM (which
        `Stopped` brings here out of any blocking read); the exit code."""
        try:
            try:
                self._start()
            except ControlPlaneError as error:
                log.error("%s", error)
                self._report.send(error=str(error))
                return 1
            return self._serve_until_done()
        except Stopped:
            self._stop()
            return 0

    def _serve_until_done(self) -> int:
        threading.Thread(target=self._report_outcomes, name="dns-report", daemon=True).start()
        if self.options.controller is not None:
            served = self._follow(self.options.controller)
            self._stop()
            return 0 if served else 1
        if not self._read_feed():
            self._stop()
            return 1
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
        """Serves on the predecessor's sockets, or binds its own when there is none (or it
        went away before handing them over: its --dns-keep ran out first)."""
        sockets = None if predecessor is None else predecessor.take(self.options.binds)
        forwarder = Forwarder(self.options.upstreams) if self.options.upstreams else None
        server = DnsServer(self.options.binds, self.answerer, forwarder, sockets)
        server.start()
        self._server = server
        handover = Handover(
            self.options.binds, lambda: server.listening, self._orphaned.is_set, self._given
        )
        handover.listen()
        self._handover = handover
        if predecessor is not None and sockets is not None:
            log.info("took DNS over from process %s", predecessor.pid)

    def _given(self) -> None:
        log.info("a new controller's DNS process took the sockets over: stopping")

    def _read_feed(self) -> bool:
        """Until the feed ends; False when serving could not start."""
        for line in self._feed:
            try:
                message = json.loads(line)
            except ValueError as error:
                self._unusable(error)
                continue
            if self._apply(message) is None:
                return False
        return True

    def _apply(self, message: object) -> bool | None:
        """Answers from the message's zone from now on: True; False when the zone can't be
        used (the last one stays); None when serving failed to start."""
        try:
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
            zone = zone_from_data(message["zone"]) if message.get("zone") else None
            allowed = [ipaddress.ip_network(n, strict=False) for n in message["allowed"]]
        except (ValueError, KeyError, TypeError) as error:
            self._unusable(error)
            return False
        if self.options.allow is None:
            self._networks = allowed
        if zone is None or zone != self.answerer.zone:  # the same again keeps its replies
            self.answerer.use(zone)
        if self._server is None and zone is not None:
            try:
                self._serve(self._predecessor)
            except ControlPlaneError as error:
                log.error("%s", error)
                self._report.send(error=str(error))
                return None
        self._report.send(zone=zone.version if zone else None)  # answered from now on
        return True

    @staticmethod
    def _unusable(error: Exception) -> None:
        log.error(
            "the controller sent a zone that can't be used (%s): still answering the last "
            "one; run the same controlplane version as the controller",
            error,
        )

    def _follow(self, url: str) -> bool:
        """Long-polls the controller for each newer zone until stopped (urllib, as the CLI
        client: one GET needs no HTTP library in the image); False when serving could not
        start. `keep` counts from the last zone applied. The token is never sent (the read
        needs none, and the network may be listened to): it only checks the signature."""
        version, contact, delay = -1, time.monotonic(), FOLLOW_RETRY
        away: str | None = None  # what went wrong since the last zone, as logged
        while not self._stopped.is_set():
            query = urllib.parse.urlencode({"after": version, "timeout": FOLLOW_WAIT})
            request = urllib.request.Request(f"{url.rstrip('/')}{ZONE_PATH}?{query}")
            applied: bool | None = False
            unchanged, asked = False, time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=FOLLOW_WAIT + 10) as reply:
                    body = reply.read(MAX_ZONE_BYTES + 1)
                    signature = reply.headers.get(ZONE_SIGNATURE)
                message = json.loads(body)
                problem = self._untrusted(body, signature, message)
                if not problem:
                    # the same zone back before the wait ran out: its long polls are full
                    unchanged = int(message["version"]) == version and (
                        time.monotonic() - asked < FOLLOW_WAIT / 2
                    )
                    version = int(message["version"])
                    applied = self._apply(message)
                    problem = "a zone that can't be used"  # read only when it was not
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code}" + (
                    ": check --controller and the API token" if 400 <= error.code < 500 else ""
                )
            except (OSError, HTTPException, ValueError, KeyError, TypeError) as error:
                problem = str(error) or type(error).__name__
            if applied is None:
                return False
            if applied:
                if away:
                    log.info("the controller at %s answers again", url)
                contact, delay, away = time.monotonic(), FOLLOW_RETRY, None
                if unchanged:  # ask again later, not in a loop
                    self._stopped.wait(FOLLOW_RETRY)
                continue
            version = -1  # asked again at once when it answers: its versions may restart
            if problem != away:  # each new kind of trouble once
                log.warning(
                    "no zone from the controller at %s (%s): answering the last one for %gs "
                    "(--keep)",
                    url,
                    problem,
                    self.options.keep,
                )
                away = problem
            if self.answerer.zone is not None and time.monotonic() - contact > self.options.keep:
                log.error(
                    "no zone from the controller for %gs: SERVFAIL until it answers",
                    self.options.keep,
                )
                self.answerer.use(None)
            self._stopped.wait(delay)
            delay = min(delay * 2, FOLLOW_RETRY_MAX)
        return True

    def _untrusted(self, body: bytes, signature: str | None, message: object) -> str:
        """Why a zone reply is not taken (empty: it is). With the API token, only a reply the
        controller signed with it, issued in the last minute."""
        token = self.options.token
        if token is None:
            return ""
        if not signed_by(token, body, signature):
            return "the reply is not signed with the API token: give this the controller's"
        issued = message.get("issued") if isinstance(message, dict) else None
        if not isinstance(issued, int | float) or abs(time.time() - issued) > MAX_ZONE_AGE:
            return f"the reply was issued more than {MAX_ZONE_AGE:g}s ago: check both clocks"
        return ""

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


class Stopped(Exception):
    """SIGTERM: raised by its handler in the main thread, wherever that thread waits."""


def _stopped(_signum: int, _frame: object) -> None:
    raise Stopped


def serve(options: DnsOptions, feed: TextIO, report: TextIO | None) -> int:
    """Runs a DNS process until it is done; SIGTERM stops it at once (Compose's stop)."""
    signal.signal(signal.SIGTERM, _stopped)
    if options.controller is not None:  # a service of its own: ^C too
        signal.signal(signal.SIGINT, _stopped)
    return DnsProcess(options, feed, report).run()
