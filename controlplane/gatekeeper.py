"""The readiness gate's edge: keeps the policy's state (core.health) between passes, sends
the probes it asks for (controlplane.prober), and wakes the control loop when an answer lets a
backend in or out.

A pass probes its newcomers itself and waits a moment (`wait`, a few tens of milliseconds) for
their answers, so a backend that already listens joins in the pass that found it: no second
pass on the everyday path. The rest are probed by a thread of this object, and an answer that
changes what is served calls `on_change` (the loop then runs a pass at once).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from controlplane.core import health as R
from controlplane.core.model import HealthCheck, Topology
from controlplane.prober import Prober

log = logging.getLogger(__name__)

REFILL = 0.01
"""Seconds the probe thread waits for room when as many probes as allowed are under way."""
GRANULE = 0.01
"""Seconds the probe thread sleeps at least between two rounds: each round scans every
tracked backend, and a thousand checked every second would otherwise wake it a thousand
times a second, to send one probe each time."""


class Gatekeeper:
    def __init__(
        self,
        prober: Prober,
        wait: float,
        policy: R.ReadinessPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        background: bool = True,
    ) -> None:
        """`wait`: seconds a pass waits at most for its newcomers' first answers. `clock` is
        the policy's (monotonic seconds), `wall` the API's; `background` False leaves the
        later probes to whoever calls `tick` (tests, on a fake clock)."""
        self._prober = prober
        self._wait = wait
        self._policy = policy or R.ReadinessPolicy()
        self._clock = clock
        self._wall = wall
        self._draw = draw
        self._background = background
        self._changed = threading.Condition()
        self._state = R.Readiness()
        self._memo = R.CandidateMemo()
        self._awaited: set[R.Address] = set()
        """Probes sent by the pass under way, which waits for them itself."""
        self._thread: threading.Thread | None = None
        self._planned = math.inf
        """When the probe thread means to wake next: an answer wakes it only if it moves that
        earlier, so a storm of answers does not make it scan every backend for each."""
        self._closed = False
        self.on_change: list[Callable[[], None]] = []
        """Called when an answer or a start period's end changed what the gate lets in."""
        self.on_probe: list[Callable[[R.Result, bool], None]] = []
        """Called with each probe's result and whether it passed (metrics)."""
        self.on_transition: list[Callable[[R.Address, R.Health], None]] = []
        """Called when a backend's health state changes (events, logs)."""

    def admit(self, topology: Topology, first: bool) -> Topology:
        """The topology as the gate lets it through. Tracks what it holds (newcomers; in the
        controller's `first` pass, what nginx may already serve), probes what is due, and
        waits up to `wait` for the answers of the probes it sent."""
        found, same = self._memo.candidates(topology)
        with self._changed:
            now = self._clock()
            state = self._state if same and not first else R.observe(self._state, found, now, first)
            ended, _ = R.advance(state, now)
            moved = R.moved(state, ended)
            self._state, chosen = R.due(ended, now, self._policy)
            # the pass waits for newcomers' first answers only, not for the re-probes of
            # ones already held (a silent one would cost every pass the whole wait)
            self._awaited = {k for k, _ in chosen if self._state.tracks[k].probes == 0}
        self._send(chosen, now)
        deadline = time.monotonic() + self._wait
        with self._changed:
            while self._awaited and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            self._awaited = set()
            gated = R.gate(topology, self._state)
            if self._background and R.next_wake(self._state) < math.inf:
                self._start()
            self._changed.notify_all()
        self._moved(moved)
        return gated

    def tick(self) -> float:
        """Sends the probes due now and ends the start periods that are over; returns when
        the next is due (math.inf: nothing to do until a pass brings a newcomer)."""
        with self._changed:
            now = self._clock()
            before = self._state
            self._state, ended = R.advance(before, now)
            moved = R.moved(before, self._state)
            self._state, chosen = R.due(self._state, now, self._policy)
            wake = R.next_wake(self._state)
        if ended:
            self._notify()
        self._moved(moved)
        self._send(chosen, now)
        return wake

    def health(self) -> Mapping[tuple[str, str], R.Health]:
        """By (container id, network): each tracked backend's health, times in epoch
        seconds."""
        with self._changed:
            now, wall = self._clock(), self._wall()
            found = R.report(self._state, now)
        return {key: self._walled(h, now, wall) for key, h in found.items()}

    @staticmethod
    def _walled(health: R.Health, now: float, wall: float) -> R.Health:
        return replace(
            health,
            since=wall - (now - health.since),
            last_at=None if health.last_at is None else wall - (now - health.last_at),
        )

    def close(self) -> None:
        with self._changed:
            self._closed = True
            thread, self._thread = self._thread, None
            self._changed.notify_all()
        if thread is not None:
            thread.join(timeout=5)
        self._prober.close()

    def _send(self, chosen: Sequence[tuple[R.Address, HealthCheck]], sent: float) -> None:
        for key, check in chosen:
            self._prober.probe(key, check, lambda k, result: self._done(k, result, sent))

    def _done(self, key: R.Address, result: R.Result, sent: float) -> None:
        with self._changed:
            before = self._state.reach(key.network).unreachable
            was = self._state.tracks.get(key)
            self._state, changed = R.record(
                self._state, key, result, sent, self._clock(), self._draw(), self._policy
            )
            after = self._state.reach(key.network).unreachable
            in_pass = key in self._awaited
            self._awaited.discard(key)
            track = self._state.tracks.get(key)
            if in_pass or (track is not None and track.next_at < self._planned):
                self._changed.notify_all()
            moved = track is not None and was is not None and track.phase is not was.phase
        if track is not None:
            for probed in self.on_probe:
                probed(result, R.passed(track.check, result))
        if moved:
            self._moved([key])
        if after is not None and before is None:
            log.warning(
                "network %s: the controller cannot reach its backends (%s); new backends on it "
                "get traffic without waiting for their port",
                key.network,
                after,
            )
        elif before is not None and after is None:
            log.info("network %s: the controller reaches its backends again", key.network)
        if changed and not in_pass:
            self._notify()

    def _moved(self, keys: Sequence[R.Address]) -> None:
        """Tells `on_transition` each backend's new health."""
        if not keys or not self.on_transition:
            return
        with self._changed:
            now, wall = self._clock(), self._wall()
            found = [
                (key, R.health_of(self._state, key, track, now))
                for key in keys
                if (track := self._state.tracks.get(key)) is not None
            ]
        for key, health in found:
            for callback in self.on_transition:
                callback(key, self._walled(health, now, wall))

    def _notify(self) -> None:
        for callback in self.on_change:
            callback()

    def _start(self) -> None:
        """Under `_changed`: the thread that sends the later probes, once."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.tick()
            with self._changed:
                if self._closed:
                    return
                # Read again under the lock: an answer since the tick may have moved it.
                wake = R.next_wake(self._state)
                left = wake - self._clock()
                if left <= 0:  # due, but as many probes as allowed are under way: let some end
                    self._changed.wait(REFILL)
                else:
                    self._planned = wake
                    self._changed.wait(None if wake == math.inf else max(left, GRANULE))
                    self._planned = math.inf
