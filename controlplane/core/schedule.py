"""When a reconcile pass runs: the loop's timing as a pure policy.

Each input (an event, an operator's ticket, the event stream's return, a pass's outcome) comes
with the time it happened, and `Schedule.next(now)` says what to do: run a pass now, or wait
until a deadline. Nothing here reads a clock or starts a thread, so a test plays a scenario out
at exact times; the loop (controlplane.reconciler.ControlLoop) only reads its queue and clock
and does what this says.

- The first pass runs at once. An event after a quiet stream (`quiet_window` since the last
  one arrived) starts a pass at once; the events that follow are coalesced: their pass runs
  once the stream has been quiet for `quiet_window`, never later than `max_wait` after the
  first of them. An event the controller does not watch costs nothing: no pass, no wait.
- Coalescing is for nginx that reload: when the last pass found none (every managed nginx
  takes changes without a reload), each event's pass runs at once, and what comes during a
  pass joins the next one.
- A ticket (an operator waiting, through the API) ends the wait for quiet, and its pass holds
  nothing back.
- Other passes hold new backends back during a scale-out (core.batching); a held batch goes out
  at its due time unless a pass takes it earlier. A failed pass releases the hold.
- A resync (everything inspected again) runs every `resync_interval`, counted from the end of
  the last one, even while events keep coming: it is what repairs a missed event.
- While a Swarm service converges (a task on its way to running or to a stop, a rolling
  update), a pass lists it again when the last one asks (Outcome.poll_at): a task on another
  node changes state without an event on this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from controlplane.core.batching import (
    BatchPolicy,
    Held,
    adds_backends,
    due,
    hold,
    removes_backends,
)
from controlplane.core.model import Topology

Ticket = TypeVar("Ticket")
Event = TypeVar("Event")

START = "start"
RESTORED = "stream-restored"
HELD = "held new backends"
RESYNC = "periodic resync"
RETRY = "retry an nginx that failed"
POLL = "a swarm service converging"


@dataclass(frozen=True)
class Timing:
    quiet_window: float
    """Seconds of quiet that end a burst of events, and that make the next event go at once."""
    max_wait: float
    """Seconds a burst's first event waits at most."""
    resync_interval: float
    batching: BatchPolicy


@dataclass(frozen=True)
class Holding:
    """What a pass needs to decide whether its change waits for a scale-out to end, as of the
    time the pass was decided on (core.batching.hold)."""

    now: float
    last_added: float
    held: Held | None
    policy: BatchPolicy

    def decide(self, current: Topology, wanted: Topology) -> Held | None:
        """The batch to keep holding instead of applying `wanted`, or None to apply it."""
        return hold(current, wanted, self.now, self.last_added, self.held, self.policy)


@dataclass(frozen=True)
class Run(Generic[Ticket, Event]):
    """Run a pass now."""

    reason: str
    tickets: tuple[Ticket, ...] = ()
    """The operators waiting for this pass."""
    trigger: Event | None = None
    """The event that opened the burst this pass answers."""
    resync: bool = False
    """Inspect everything again first."""
    holding: Holding | None = None
    """None: the pass holds nothing back (someone is waiting for it)."""


@dataclass(frozen=True)
class Wait:
    """No pass is due before `until`, unless an input comes first."""

    until: float


@dataclass(frozen=True)
class Outcome:
    """What a pass that went through did, as far as timing is concerned."""

    held: Held | None = None
    """The scale-out batch it holds back (Holding.decide)."""
    added: bool = False
    """It applied backends that add capacity."""
    removed: bool = False
    """It applied the loss of a backend that was up."""
    retry_at: float = math.inf
    """When a deploy or push that failed in it is due again (core.served.failed)."""
    reloads: bool = True
    """Some managed nginx reloads for a change: events are coalesced for it."""
    poll_at: float = math.inf
    """When a Swarm service it found converging is listed again."""

    @classmethod
    def of(
        cls,
        before: Topology | None,
        after: Topology,
        held: Held | None = None,
        retry_at: float = math.inf,
        reloads: bool = True,
        poll_at: float = math.inf,
    ) -> Outcome:
        """`before`: what the pass started from, None for the first pass, which finds every
        backend at once: that is no scale-out."""
        if before is None:
            return cls(held, retry_at=retry_at, reloads=reloads, poll_at=poll_at)
        return cls(
            held,
            adds_backends(before, after),
            removes_backends(before, after),
            retry_at,
            reloads,
            poll_at,
        )


@dataclass(frozen=True)
class Burst(Generic[Ticket, Event]):
    """The inputs one pass will answer."""

    opened: float
    last: float
    """When its latest input came: the quiet window runs from there."""
    at_once: bool
    """Opened by an event after a quiet stream: no wait for quiet."""
    events: int = 0
    restored: bool = False
    tickets: tuple[Ticket, ...] = ()
    reasons: tuple[str, ...] = ()
    """The tickets' reasons."""
    trigger: Event | None = None

    def due(self, timing: Timing) -> float:
        if self.at_once or self.tickets:
            return self.opened
        return min(self.last + timing.quiet_window, self.opened + timing.max_wait)

    @property
    def reason(self) -> str:
        parts = [RESTORED] if self.restored else []
        parts.extend(dict.fromkeys(self.reasons))
        if self.events:
            parts.append(f"{self.events} event(s)")
        return " + ".join(parts)


@dataclass(frozen=True)
class Schedule(Generic[Ticket, Event]):
    """What the loop knows about time; each method returns a new Schedule."""

    timing: Timing
    started: bool = False
    """The first pass has been decided on."""
    burst: Burst[Ticket, Event] | None = None
    last_event: float = -math.inf
    """Arrival of the latest event that concerns the controller."""
    resync_at: float = math.inf
    retry_at: float = math.inf
    """A pass then tries again an nginx whose deploy or push failed; without it, a failed
    push would wait for the next event or resync."""
    poll_at: float = math.inf
    """A pass then lists a converging Swarm service again (Outcome.poll_at)."""
    held: Held | None = None
    last_added: float = -math.inf
    """When a pass last applied backends that add capacity (core.batching.hold)."""
    restarts_resync: bool = False
    """The pass under way is the first or a resync: the next resync is due an interval after
    it ends."""
    coalesce: bool = True
    """The last pass found an nginx that reloads (Outcome.reloads)."""

    @property
    def tickets(self) -> tuple[Ticket, ...]:
        """The tickets waiting for a pass."""
        return self.burst.tickets if self.burst is not None else ()

    def event(
        self, now: float, event: Event, arrived: float, relevant: bool
    ) -> Schedule[Ticket, Event]:
        """An event taken at `now` that arrived at `arrived`; `relevant`: whether it concerns
        this controller (Reconciler.handle_event)."""
        if not relevant:
            return self
        quiet = arrived - self.last_event >= self.timing.quiet_window
        burst = self.burst or Burst(now, now, at_once=quiet or not self.coalesce, trigger=event)
        return replace(
            self,
            burst=replace(burst, last=now, events=burst.events + 1),
            last_event=max(self.last_event, arrived),
        )

    def ticket(self, now: float, ticket: Ticket, reason: str) -> Schedule[Ticket, Event]:
        burst = self._joined(now)
        return replace(
            self,
            burst=replace(
                burst, tickets=(*burst.tickets, ticket), reasons=(*burst.reasons, reason)
            ),
        )

    def restored(self, now: float) -> Schedule[Ticket, Event]:
        """The event stream is back: events may have been missed, so a resync pass is due once
        the stream has been quiet."""
        return replace(self, burst=replace(self._joined(now), restored=True))

    def prompt(self, now: float, reason: str) -> Schedule[Ticket, Event]:
        """Something the controller checks itself changed (the readiness gate let a backend
        in or out): a pass is due as for an event, at once unless an nginx reloads (then
        after the quiet window, so that backends getting ready together cost one reload)."""
        burst = self._joined(now)
        at_once = burst.at_once or not self.coalesce
        return replace(
            self, burst=replace(burst, at_once=at_once, reasons=(*burst.reasons, reason))
        )

    def _joined(self, now: float) -> Burst[Ticket, Event]:
        if self.burst is None:
            return Burst(now, now, at_once=False)
        return replace(self.burst, last=now)

    def next(self, now: float) -> tuple[Schedule[Ticket, Event], Run[Ticket, Event] | Wait]:
        """The next action, and the Schedule to keep if the loop takes it: with a Run, the
        loop first takes whatever input is already waiting (which may change the answer)."""
        if not self.started:
            return replace(self, started=True, restarts_resync=True), Run(
                START, holding=self._holding(now)
            )
        burst = self.burst
        if burst is not None:
            # Its pass comes first: it decides on a due hold too, and the resync comes after.
            until = burst.due(self.timing)
            if now < until:
                return self, Wait(until)
            return replace(self, burst=None, restarts_resync=False), Run(
                burst.reason,
                burst.tickets,
                burst.trigger,
                holding=None if burst.tickets else self._holding(now),
            )
        held_due = math.inf if self.held is None else due(self.held, self.timing.batching)
        if now >= held_due:
            return replace(self, restarts_resync=False), Run(HELD, holding=self._holding(now))
        if now >= self.resync_at:
            return replace(self, restarts_resync=True), Run(
                RESYNC, resync=True, holding=self._holding(now)
            )
        if now >= self.retry_at:
            return replace(self, retry_at=math.inf, restarts_resync=False), Run(
                RETRY, holding=self._holding(now)
            )
        if now >= self.poll_at:
            return replace(self, poll_at=math.inf, restarts_resync=False), Run(
                POLL, holding=self._holding(now)
            )
        return self, Wait(min(self.resync_at, held_due, self.retry_at, self.poll_at))

    def _holding(self, now: float) -> Holding:
        return Holding(now, self.last_added, self.held, self.timing.batching)

    def passed(self, now: float, outcome: Outcome) -> Schedule[Ticket, Event]:
        """The pass decided on last ended at `now` with `outcome`. A removal means a
        replacement, not a scale-out: the next newcomer goes at once."""
        if outcome.removed:
            last_added = -math.inf
        elif outcome.added:
            last_added = now
        else:
            last_added = self.last_added
        return replace(
            self._ended(now),
            held=outcome.held,
            last_added=last_added,
            retry_at=outcome.retry_at,
            poll_at=outcome.poll_at,
            coalesce=outcome.reloads,
        )

    def failed(self, now: float) -> Schedule[Ticket, Event]:
        """The pass decided on last failed at `now`. It releases the hold: the next pass (an
        event, a resync) finds the change again; kept, its due time would start a failing
        pass after another at once."""
        return replace(self._ended(now), held=None)

    def _ended(self, now: float) -> Schedule[Ticket, Event]:
        if not self.restarts_resync:
            return self
        return replace(self, resync_at=now + self.timing.resync_interval, restarts_resync=False)
