"""When passes run (core.schedule), played out at exact times: each case says what happens
when, and lists the passes that follow with what each did."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from controlplane.core.batching import BatchPolicy
from controlplane.core.build import build_topology
from controlplane.core.model import ContainerFacts, Topology
from controlplane.core.schedule import (
    POLL,
    RETRY,
    Holding,
    Outcome,
    Run,
    Schedule,
    Timing,
    Wait,
)
from tests.unit.builders import container, nginx, state

TIMING = Timing(
    quiet_window=0.5, max_wait=2.0, resync_interval=60.0, batching=BatchPolicy(2.0, 10.0)
)
"""Binary fractions, so every time below is exact."""

LB, W1 = nginx("lb"), container("w1")
W2, W3, W4 = (container(f"w{i}", ip=f"172.20.0.{i}") for i in (2, 3, 4))
NEW = [container(f"n{i}", ip=f"172.20.1.{i}") for i in range(10)]


@dataclass(frozen=True)
class Event:
    """An event arrives; from then on Docker shows `shows` (None: as before)."""

    shows: tuple[ContainerFacts, ...] | None = None
    relevant: bool = True


def event(*shows: ContainerFacts) -> Event:
    return Event(shows or None)


UNWATCHED = Event(relevant=False)
TICKET = "ticket"
RESTORED = "restored"
DOWN, UP = "down", "up"
"""Docker stops answering, or answers again (no event)."""

Input = Event | str
Pass = tuple[float, str, str]
"""When it ran, its reason, and what it did: applied, same, held or failed."""


@dataclass
class World:
    """Docker and nginx as the schedule's passes see them, reduced to topologies."""

    shows: tuple[ContainerFacts, ...]
    reloads: bool = True
    """Some nginx reloads for a change (Outcome.reloads)."""
    down: bool = False
    applied: Topology | None = None
    passes: list[Pass] = field(default_factory=list)

    def run(self, now: float, action: Run[str, Event]) -> Outcome | None:
        """One pass, as Reconciler.plan decides it; None: it failed."""
        if self.down:
            self.passes.append((now, action.reason, "failed"))
            return None
        wanted, before = build_topology(state(*self.shows)), self.applied
        if before is not None and wanted != before and action.holding is not None:
            held = action.holding.decide(before, wanted)
            if held is not None:
                self.passes.append((now, action.reason, "held"))
                return Outcome(held)
        self.applied = wanted
        self.passes.append((now, action.reason, "same" if wanted == before else "applied"))
        return Outcome.of(before, wanted, reloads=self.reloads)


def play(
    inputs: Sequence[tuple[float, Input]],
    until: float,
    shows: tuple[ContainerFacts, ...] = (LB, W1),
    timing: Timing = TIMING,
    duration: float = 0.0,
    reloads: bool = True,
) -> list[Pass]:
    """What the loop does with `inputs` until `until`, each pass taking `duration`: inputs
    that came by a deadline, or during a pass, are taken first, as the loop reads its queue
    before a pass."""
    world = World(shows, reloads)
    schedule: Schedule[str, Event] = Schedule(timing)
    pending = sorted(inputs, key=lambda step: step[0])
    now = 0.0
    while True:
        after, action = schedule.next(now)
        if isinstance(action, Run) and not (pending and pending[0][0] <= now):
            assert len(world.passes) < 100, f"passes after passes at {now}: {world.passes[-3:]}"
            outcome = world.run(now, action)
            now += duration
            schedule = after.passed(now, outcome) if outcome else after.failed(now)
            continue
        at = pending[0][0] if pending else math.inf
        if isinstance(action, Wait) and min(at, action.until) > until:
            return world.passes
        if isinstance(action, Wait) and at > action.until:
            now = action.until
            continue
        _, given = pending.pop(0)
        now = max(now, at)  # one that came during a pass is taken after it
        if isinstance(given, Event):
            world.shows = given.shows or world.shows
            schedule = schedule.event(now, given, at, given.relevant)
        elif given == TICKET:
            schedule = schedule.ticket(now, given, "api")
        elif given == RESTORED:
            schedule = schedule.restored(now)
        else:
            world.down = given == DOWN


def every(step: float, first: float, last: float, given: Input) -> list[tuple[float, Input]]:
    count = round((last - first) / step) + 1
    return [(first + i * step, given) for i in range(count)]


START: Pass = (0.0, "start", "applied")
CALM = (LB, W1)
"""What Docker shows at first in most cases."""
SCALING = (LB, W1, W2)
SCALE_OUT: list[tuple[float, Input]] = [
    (5.0, event(LB, W1, W2, W3)),
    (6.0, event(LB, W1, W2, W3, W4)),
]
HELD: list[Pass] = [START, (5.0, "1 event(s)", "applied"), (6.0, "1 event(s)", "held")]
"""From SCALING: w3 after a calm start goes at once, w4 right after it is held (due at 8.0)."""

CASES = [
    pytest.param(
        CALM,
        [(5.0, event(LB, W1, W2))],
        10.0,
        [START, (5.0, "1 event(s)", "applied")],
        id="an-event-after-quiet-goes-at-once",
    ),
    pytest.param(
        CALM,
        [(5.0, event()), *every(0.25, 5.25, 6.0, event())],
        10.0,
        [START, (5.0, "1 event(s)", "same"), (6.5, "4 event(s)", "same")],
        id="the-events-after-it-coalesce-until-quiet",
    ),
    pytest.param(
        CALM,
        every(0.25, 5.0, 9.0, event()),
        12.0,
        [
            START,
            (5.0, "1 event(s)", "same"),
            (7.25, "9 event(s)", "same"),
            (9.5, "7 event(s)", "same"),
        ],
        id="a-long-burst-is-cut-at-max-wait",
    ),
    pytest.param(
        CALM,
        [(5.0, event()), (5.25, event()), (5.5, TICKET), (10.0, TICKET)],
        12.0,
        [
            START,
            (5.0, "1 event(s)", "same"),
            (5.5, "api + 1 event(s)", "same"),
            (10.0, "api", "same"),
        ],
        id="a-ticket-does-not-wait-for-quiet",
    ),
    pytest.param(
        CALM,
        [(0.0, TICKET)],
        1.0,
        [START, (0.0, "api", "same")],
        id="the-first-pass-comes-first",
    ),
    pytest.param(
        CALM,
        [(1.0, RESTORED), (1.25, event())],
        5.0,
        [START, (1.75, "stream-restored + 1 event(s)", "same")],
        id="the-stream-back-waits-for-quiet",
    ),
    pytest.param(
        CALM,
        every(0.25, 5.0, 6.0, UNWATCHED),
        70.0,
        [START, (60.0, "periodic resync", "same")],
        id="unwatched-events-cost-no-pass",
    ),
    pytest.param(
        CALM,
        [(5.0, event()), (5.25, event()), (5.5, UNWATCHED), (5.75, UNWATCHED)],
        10.0,
        [START, (5.0, "1 event(s)", "same"), (5.75, "1 event(s)", "same")],
        id="unwatched-events-do-not-make-a-burst-wait",
    ),
    pytest.param(
        CALM,
        [(5.0, event(*CALM, W2)), (6.0, event(*CALM, W2, W3)), (7.0, event(*CALM, W2, W3, W4))],
        20.0,
        [
            START,
            (5.0, "1 event(s)", "applied"),
            (6.0, "1 event(s)", "held"),
            (7.0, "1 event(s)", "held"),
            (9.0, "held new backends", "applied"),
        ],
        id="a-scale-out-is-held-until-quiet",
    ),
    pytest.param(
        CALM,
        [(5.0 + 1.5 * i, event(*CALM, *NEW[: i + 1])) for i in range(9)],
        30.0,
        [
            START,
            (5.0, "1 event(s)", "applied"),
            *[(5.0 + 1.5 * i, "1 event(s)", "held") for i in range(1, 8)],
            (16.5, "held new backends", "applied"),
            (17.0, "1 event(s)", "held"),
            (19.0, "held new backends", "applied"),
        ],
        id="a-long-scale-out-is-cut-at-the-longest-hold",
    ),
    pytest.param(
        SCALING,
        [*SCALE_OUT, (7.75, event()), (8.0, event())],
        20.0,
        [*HELD, (7.75, "1 event(s)", "held"), (8.5, "1 event(s)", "applied")],
        id="a-burst-open-at-the-due-time-decides-the-hold",
    ),
    pytest.param(
        SCALING,
        [*SCALE_OUT, (6.5, TICKET)],
        20.0,
        [*HELD, (6.5, "api", "applied")],
        id="a-ticket-is-never-held",
    ),
    pytest.param(
        SCALING,
        [*SCALE_OUT, (7.0, event(LB, W1, W3, W4))],
        20.0,
        [*HELD, (7.0, "1 event(s)", "applied")],
        id="a-leaving-backend-ends-a-hold-at-once",
    ),
    pytest.param(
        SCALING,
        [(5.0, event(*SCALING, W3)), (6.0, event(LB, W1, W3)), (6.5, event(LB, W1, W3, W4))],
        20.0,
        [
            START,
            (5.0, "1 event(s)", "applied"),
            (6.0, "1 event(s)", "applied"),
            (6.5, "1 event(s)", "applied"),
        ],
        id="a-newcomer-right-after-a-backend-left-goes-at-once",
    ),
    pytest.param(
        SCALING,
        [*SCALE_OUT, (6.5, DOWN), (7.0, event()), (9.0, UP), (12.0, event())],
        20.0,
        [*HELD, (7.0, "1 event(s)", "failed"), (12.0, "1 event(s)", "applied")],
        id="a-failed-pass-releases-the-hold",
    ),
]


@pytest.mark.parametrize(("shows", "inputs", "until", "expected"), CASES)
def test_when_passes_run(
    shows: tuple[ContainerFacts, ...],
    inputs: list[tuple[float, Input]],
    until: float,
    expected: list[Pass],
) -> None:
    assert play(inputs, until, shows) == expected


def test_a_resync_is_due_an_interval_after_the_last_one_ended() -> None:
    """Passes take a second here; an event's pass does not move the resync."""
    passes = play([(30.0, event())], 130.0, duration=1.0)
    assert passes == [
        START,
        (30.0, "1 event(s)", "same"),
        (61.0, "periodic resync", "same"),
        (122.0, "periodic resync", "same"),
    ]


def test_a_resync_runs_while_events_keep_coming() -> None:
    """It waits for the open burst's pass (at most max_wait), then runs right after it."""
    timing = replace(TIMING, resync_interval=4.0)
    passes = play(every(0.25, 1.0, 12.0, event()), 13.0, timing=timing)
    assert [(at, reason) for at, reason, _ in passes] == [
        (0.0, "start"),
        (1.0, "1 event(s)"),
        (3.25, "9 event(s)"),
        (5.5, "9 event(s)"),
        (5.5, "periodic resync"),
        (7.75, "9 event(s)"),
        (10.0, "9 event(s)"),
        (10.0, "periodic resync"),
        (12.25, "8 event(s)"),
    ]


def test_without_an_nginx_that_reloads_every_event_goes_at_once() -> None:
    """Nothing to coalesce for (the dynamic data plane takes a change without a reload): the
    pass starts when the loop is free, and what came during a pass joins the next one."""
    spaced = play(every(0.25, 5.0, 6.0, event()), 10.0, reloads=False, duration=0.125)
    assert [(at, reason) for at, reason, _ in spaced] == [
        (0.0, "start"),
        *[(5.0 + 0.25 * i, "1 event(s)") for i in range(5)],
    ]
    dense = play(every(0.0625, 5.0, 5.5, event()), 10.0, reloads=False, duration=0.125)
    assert [(at, reason) for at, reason, _ in dense] == [
        (0.0, "start"),
        (5.0, "1 event(s)"),
        (5.125, "2 event(s)"),
        (5.25, "2 event(s)"),
        (5.375, "2 event(s)"),
        (5.5, "2 event(s)"),
    ]
    assert play(every(0.25, 5.0, 6.0, event()), 10.0, duration=0.125)[1:] == [
        (5.0, "1 event(s)", "same"),
        (6.5, "4 event(s)", "same"),
    ], "an nginx that reloads still gets its events coalesced"


def test_what_a_pass_is_told() -> None:
    """The event that opened the burst is its trigger; a ticket's pass holds nothing back; a
    resync inspects everything again."""
    opener, later = event(), event()
    schedule: Schedule[str, Event] = Schedule(TIMING)
    schedule, start = schedule.next(0.0)
    assert isinstance(start, Run) and start.reason == "start" and not start.resync
    schedule = schedule.passed(0.0, Outcome())
    schedule = schedule.event(5.0, opener, 5.0, True).event(5.0, later, 5.0, True)
    _, run = schedule.next(5.0)
    assert isinstance(run, Run)
    assert (run.reason, run.trigger, run.tickets, run.resync) == ("2 event(s)", opener, (), False)
    assert run.holding == Holding(5.0, -math.inf, None, TIMING.batching)
    schedule = schedule.ticket(5.25, "first", "api").ticket(5.25, "second", "api")
    assert schedule.tickets == ("first", "second")
    schedule, run = schedule.next(5.25)
    assert run == Run("api + 2 event(s)", ("first", "second"), opener, holding=None)
    assert schedule.tickets == ()
    schedule = schedule.passed(5.5, Outcome())
    assert schedule.next(5.5)[1] == Wait(60.0)
    schedule, run = schedule.next(60.0)
    assert isinstance(run, Run) and run.reason == "periodic resync" and run.resync


def test_the_first_pass_is_no_scale_out() -> None:
    before, after = (build_topology(state(*shown)) for shown in ((LB, W1), (LB, W1, W2)))
    assert Outcome.of(None, after) == Outcome()
    assert Outcome.of(before, after) == Outcome(added=True)
    assert Outcome.of(after, before) == Outcome(removed=True)


def test_a_failed_deploy_wakes_the_loop_when_it_is_due_again() -> None:
    """Without it, a push that failed would wait for the next event or resync."""
    schedule: Schedule[str, str] = Schedule(TIMING)
    schedule, run = schedule.next(100.0)
    assert isinstance(run, Run)
    schedule = schedule.passed(100.0, Outcome(retry_at=105.0))
    assert schedule.next(101.0)[1] == Wait(105.0)
    schedule, run = schedule.next(105.0)
    assert isinstance(run, Run) and run.reason == RETRY
    schedule = schedule.passed(105.5, Outcome())
    assert schedule.next(106.0)[1] == Wait(160.0)


def test_a_converging_swarm_service_is_listed_again_until_it_settles() -> None:
    """Its tasks on other nodes change state without an event here."""
    schedule: Schedule[str, str] = Schedule(TIMING)
    schedule, _ = schedule.next(100.0)
    schedule = schedule.passed(100.0, Outcome.of(None, Topology(), poll_at=100.5))
    assert schedule.next(100.2)[1] == Wait(100.5)
    schedule, run = schedule.next(100.5)
    assert isinstance(run, Run) and run.reason == POLL and not run.resync
    schedule = schedule.passed(100.6, Outcome(poll_at=101.1))
    schedule, run = schedule.next(101.1)
    assert isinstance(run, Run) and run.reason == POLL
    schedule = schedule.passed(101.2, Outcome())  # settled
    assert schedule.next(101.3)[1] == Wait(160.0)


def test_the_gate_letting_a_backend_in_is_a_pass_as_for_an_event() -> None:
    """At once while no nginx reloads; else after the quiet window, so that backends getting
    ready together cost one reload."""
    schedule: Schedule[str, str] = Schedule(TIMING)
    schedule, _ = schedule.next(0.0)
    _, run = schedule.passed(0.0, Outcome(reloads=False)).prompt(5.0, "ready").next(5.0)
    assert isinstance(run, Run) and run.reason == "ready"
    reload = schedule.passed(0.0, Outcome()).prompt(5.0, "ready")
    assert reload.next(5.0)[1] == Wait(5.0 + TIMING.quiet_window)
