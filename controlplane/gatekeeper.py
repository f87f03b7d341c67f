"""The readiness gate's edge: keeps the policy's state (core.health) between passes, sends
the probes it asks for (controlplane.prober), and wakes the control loop when an answer lets a
backend in or out.

A pass probes its newcomers itself and waits a moment (`wait`, a few tens of milliseconds) for
their answers, so a backend that already listens joins in the pass that found it: no second
pass on the everyday path. The rest are probed by a thread of this object, and an answer that
changes what is served calls `on_change` (the loop then runs a pass at once).
"""

from __future__ import annotations

import functools
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

GRANULE = 0.01
"""Seconds the probe thread rests at least between two rounds while a newcomer is held. A
round records the answers that came since the last and sends what is due, scanning every
tracked backend: a thousand checked every second would otherwise wake it a thousand times a
second, for one probe each."""
STEADY_GRANULE = 0.03
"""The same while no newcomer is held: active checks' answers wait a little longer to be
recorded (their bound is the interval times `fails`), and the scans are a third as many. A
pass that brings newcomers ends the rest."""


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
        self._answers: list[R.Answer] = []
        """Answers the probe thread records in its next round."""
        self._dirty = False
        """A pass or an answer it waited for changed the state since the probe thread's
        last round: the wake that round computed may be late."""
        self._starting = False
        """The last round saw a newcomer held: the next comes after GRANULE, not
        STEADY_GRANULE (written by the probe thread only)."""
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
            moved = R.moved(self._state, ended)  # a check turned off, a start period over
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
            if self._background and (chosen or R.next_wake(self._state) < math.inf):
                self._start()
            self._dirty = True  # the probe thread's next wake may have moved
            self._changed.notify_all()
        self._moved(moved)
        return gated

    def tick(self) -> float:
        """Records the answers that came since the last round, sends the probes due now and
        ends the start periods that are over; returns when the next is due (math.inf: nothing
        to do until a pass brings a newcomer)."""
        with self._changed:
            answers, self._answers = self._answers, []
        if answers:
            self._settle(answers, in_pass=False)
        with self._changed:
            self._dirty = False
            now = self._clock()
            before = self._state
            self._state, chosen, ended, wake, self._starting = R.step(before, now, self._policy)
            moved = R.moved(before, self._state) if ended else []
        self._send(chosen, now)  # first: they are marked in flight, and a callback may fail
        if ended:
            self._notify()
        self._moved(moved)
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
            self._prober.probe(key, check, functools.partial(self._done, sent=sent, check=check))

    def _done(self, key: R.Address, result: R.Result, sent: float, check: HealthCheck) -> None:
        """A probe's answer: recorded at once when a pass waits for it (or no thread runs
        the rounds), else in the probe thread's next round; with the check it ran, so one
        that changed since drops it."""
        answer = (key, result, sent, self._draw(), check)
        with self._changed:
            in_pass = key in self._awaited
            if self._background and not in_pass:
                self._answers.append(answer)
                self._start()  # only the probe thread records these
                if len(self._answers) == 1:
                    self._changed.notify_all()
                return
        self._settle([answer], in_pass)

    def _settle(self, answers: Sequence[R.Answer], in_pass: bool) -> None:
        """Records answers; tells the metrics, the transitions, and the loop when what is
        served changed (unless a pass waits for them: it reads them itself)."""
        with self._changed:
            # the pass may have stopped waiting since: then the loop must hear of it
            in_pass = in_pass and all(key in self._awaited for key, *_ in answers)
            before = self._state
            self._state, changed = R.record_many(before, answers, self._clock(), self._policy)
            for key, *_, check in answers:
                # a pass waits on for the answer to a check it changed
                if (track := before.tracks.get(key)) is None or R.judged(track, check):
                    self._awaited.discard(key)
            if in_pass:
                self._dirty = True
                self._changed.notify_all()
            after = self._state
        for key, result, *_, check in answers:
            if key in after.tracks:  # judged by the check it ran, changed since or not
                _call(self.on_probe, result, R.passed(check, result))
        networks = {key.network for key, *_ in answers}
        flipped = any(before.reach(n).unreachable != after.reach(n).unreachable for n in networks)
        if flipped:  # a network the controller cannot reach lets its held backends in
            self._moved(R.moved(before, after))
        else:
            self._moved(
                [
                    key
                    for key, *_ in answers
                    if (was := before.tracks.get(key)) is not None
                    and (now := after.tracks.get(key)) is not None
                    and was.phase is not now.phase
                ]
            )
        self._said_reach(before, after, networks)
        if changed and not in_pass:
            self._notify()

    @staticmethod
    def _said_reach(before: R.Readiness, after: R.Readiness, networks: set[str]) -> None:
        for network in sorted(networks):
            was, now = before.reach(network).unreachable, after.reach(network).unreachable
            if now is not None and was is None:
                log.warning(
                    "network %s: the controller cannot reach its backends (%s); their health "
                    "is not checked: they get traffic without waiting for a check",
                    network,
                    now,
                )
            elif was is not None and now is None:
                log.info("network %s: the controller reaches its backends again", network)

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
            _call(self.on_transition, key, self._walled(health, now, wall))

    def _notify(self) -> None:
        _call(self.on_change)

    def _start(self) -> None:
        """Under `_changed`: the thread that sends the later probes, once."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """Rounds, at most one per GRANULE: the answers and due probes of that time gather
        and go in one round."""
        while True:
            try:
                wake = self.tick()
            except Exception:  # a bug must not stop the checks: the next round tries again
                log.exception("a round of health probes failed; please report")
                wake = self._clock() + GRANULE
            began = time.monotonic()
            with self._changed:
                while not self._closed:
                    # a pass since the round may have brought newcomers: rest as for them
                    held = self._starting or self._dirty
                    left = began + (GRANULE if held else STEADY_GRANULE) - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                if self._closed:
                    return
                left = wake - self._clock()
                if not self._answers and not self._dirty and left > 0:
                    # woken early by an answer, or by a pass that brought newcomers
                    self._changed.wait(None if wake == math.inf else left)
                if self._closed:
                    return


def _call(callbacks: Sequence[Callable[..., None]], *args: object) -> None:
    """Each callback, whatever the others do: one that fails is logged, not spread."""
    for callback in callbacks:
        try:
            callback(*args)
        except Exception:
            log.exception("a health callback (%r) failed; please report", callback)
