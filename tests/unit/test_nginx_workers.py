"""Which of nginx's old workers to retire after a reload, from what /proc shows: only once
every new worker is up, never the master or a worker that is still starting."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controlplane.nginx_workers import Process, parse, retirable, workers

LISTING = """1 (nginx) S 0 1 1 0 -1 4194560 1408 0 8|nginx: master process nginx -g daemon off;
7 (nginx) S 1 1 1 0 -1 4194624 111 0 0 0|nginx: worker process
8 (nginx) S 1 1 1 0 -1 4194624 109 0 0 0|nginx: worker process
9 (nginx) S 1 1 1 0 -1 4194624 109 0 0 0|nginx: master process nginx -g daemon off;
10 (nginx) S 1 1 1 0 -1 4194624 109 0 0 0|nginx: worker process is shutting down
11 (nginx) S 1 1 1 0 -1 4194624 109 0 0 0|nginx: cache manager process
12 (my (odd) name) S 1 1 1 0|nginx: worker process
|
40 (sh) R 0 40 40 0 -1 4194560 1027 189 1 0|sh
garbage
"""


def test_a_listing_parses_whatever_the_command_name_holds() -> None:
    processes = parse(LISTING)
    assert Process(1, 0, "nginx: master process nginx -g daemon off;") in processes
    assert Process(12, 1, "nginx: worker process") in processes
    assert [p.pid for p in processes] == [1, 7, 8, 9, 10, 11, 12, 40]


def test_workers_are_the_masters_children_that_are_up_and_not_shutting_down() -> None:
    """9 is a worker still starting (it shows the master's title); 10 was told to quit."""
    assert workers(parse(LISTING)) == {7, 8, 12}


def test_old_workers_retire_only_once_as_many_new_ones_are_up() -> None:
    old = frozenset({7, 8})
    assert retirable(old, frozenset({7, 8})) is None
    assert retirable(old, frozenset({7, 8, 20})) is None
    assert retirable(old, frozenset({7, 8, 20, 21})) == {7, 8}
    assert retirable(old, frozenset({8, 20, 21})) == {8}


def test_nothing_to_retire_when_the_master_did_it_or_runs_without_workers() -> None:
    assert retirable(frozenset({7, 8}), frozenset({20, 21})) == frozenset()
    assert retirable(frozenset({7, 8}), frozenset()) == frozenset()
    assert retirable(frozenset(), frozenset()) == frozenset()


@given(st.text())
def test_any_listing_parses_without_error(text: str) -> None:
    for process in parse(text):
        assert process.pid >= 0 and process.ppid >= 0


def test_digits_that_are_not_ascii_are_not_pids() -> None:
    assert parse("\u00b2 (x) S 1|t\n1 (x) S \u0661|t\n") == ()
