"""The traffic book on a fake clock: counts by class, windows, percentiles within a bucket,
bounded memory, and cumulative reports turned into deltas."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import traffic as T

WEB = T.Key("web", "172.20.0.2:80")


def test_requests_by_class_and_rates_over_ten_seconds_and_a_minute() -> None:
    book = T.TrafficBook()
    for second in range(100, 160):
        for _ in range(3):
            book.add(WEB, 200, 0.010, second + 0.5, sent=100, received=50)
    book.add(WEB, 503, 0.002, 159.9)
    book.add(WEB, None, None, 159.9, connect_error=True)
    summary = book.summary(WEB, 159.95)
    assert summary is not None
    assert summary.requests == {"1xx": 0, "2xx": 180, "3xx": 0, "4xx": 0, "5xx": 1}
    assert summary.connect_errors == 1
    assert summary.rps_10s == pytest.approx(3.1) and summary.rps_1m == pytest.approx(181 / 60)
    assert (summary.bytes_sent, summary.bytes_received) == (18_000, 9_000)
    assert summary.per_second == (3,) * 59 + (4,)


def test_what_is_older_than_a_minute_drops_out() -> None:
    book = T.TrafficBook()
    book.add(WEB, 200, 0.01, 100.0)
    book.add(WEB, 500, 0.01, 130.0)
    later = book.summary(WEB, 165.0)
    assert later is not None and later.requests["2xx"] == 0 and later.requests["5xx"] == 1
    assert book.summary(WEB, 190.0) is None
    book.prune(190.0)
    assert len(book) == 0


@pytest.mark.parametrize("seconds", [0.0003, 0.0012, 0.015, 0.2, 3.0, 20.0])
def test_a_percentile_is_within_a_bucket_of_the_truth(seconds: float) -> None:
    book = T.TrafficBook()
    for _ in range(100):
        book.add(WEB, 200, seconds, 10.0)
    summary = book.summary(WEB, 10.0)
    assert summary is not None and summary.p50_ms is not None
    if seconds > T.BASE:
        assert abs(math.log(summary.p50_ms / 1000 / seconds)) <= math.log(2) / 2


def test_percentiles_split_by_rank() -> None:
    book = T.TrafficBook()
    for i in range(100):
        book.add(WEB, 200, 0.001 if i < 90 else 1.0, 10.0)
    summary = book.summary(WEB, 10.0)
    assert summary is not None and summary.p50_ms is not None and summary.p99_ms is not None
    assert summary.p50_ms < 1.2 and 700 < summary.p99_ms < 1200
    assert summary.p95_ms == summary.p99_ms


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=50))
def test_every_time_has_a_bucket(times: list[float]) -> None:
    for t in times:
        assert 0 <= T.bucket(t) < T.BUCKETS


def test_memory_does_not_grow_with_requests() -> None:
    book = T.TrafficBook()
    for i in range(50_000):
        book.add(WEB, 200, 0.001 * (i % 1000), 100 + i / 1000)
    ring = book._rings[WEB]
    assert len(ring.counts) == T.WINDOW and len(ring.histograms) == T.SLOTS


def test_cumulative_reports_become_deltas_and_a_restart_starts_again() -> None:
    feed = T.Cumulative()
    first = [1] * T.VECTOR
    assert feed.delta("lb", WEB, first) == first
    assert feed.delta("lb", WEB, first) is None
    assert feed.delta("lb", WEB, [3] * T.VECTOR) == [2] * T.VECTOR
    assert feed.delta("lb", WEB, [1] * T.VECTOR) == [1] * T.VECTOR  # nginx restarted
    assert feed.delta("lb", WEB, [1, 2]) is None
    feed.forget(["other"])
    assert feed.delta("lb", WEB, [1] * T.VECTOR) == [1] * T.VECTOR


def v(n: int) -> list[int]:
    return [n] * T.VECTOR


API = T.Key("api", "")


def test_a_restarted_controller_takes_a_workers_first_report_as_its_baseline() -> None:
    feed = T.Cumulative()
    assert feed.report("lb/7", 5000, [(WEB, v(90_000)), (API, v(3))], 100.0) == []
    assert feed.report("lb/7", 5001, [(WEB, v(90_004))], 101.0) == [(WEB, v(4))]
    # an idle key comes with the next full send: from before too
    assert feed.report("lb/7", 5002, [(T.Key("old", ""), v(500))], 109.0) == []
    # after that, a key first seen was made since: all of it is new
    new = T.Key("new", "")
    assert feed.report("lb/7", 5003, [(new, v(2))], 100.0 + T.WARMUP) == [(new, v(2))]


def test_a_worker_heard_from_its_first_datagram_counts_whole() -> None:
    """A reload's new workers (new pids) start at seq 1: all they hold is new."""
    feed = T.Cumulative()
    assert feed.report("lb/8", 1, [(WEB, v(3))], 100.0) == [(WEB, v(3))]
    assert feed.report("lb/8", 2, [(API, v(1))], 101.0) == [(API, v(1))]


def test_a_count_that_went_down_is_a_new_baseline_whose_counts_are_new() -> None:
    feed = T.Cumulative()
    feed.report("lb/7", 1, [(WEB, v(10))], 100.0)
    assert feed.report("lb/7", 2, [(WEB, v(3))], 101.0) == [(WEB, v(3))]
    assert feed.report("lb/7", 3, [(WEB, v(5))], 102.0) == [(WEB, v(2))]
    one_down = v(8)
    one_down[T.BYTES_SENT] = 4  # one count lower is enough (a 2^53 wrap, a forgotten key)
    assert feed.report("lb/7", 4, [(WEB, one_down)], 103.0) == [(WEB, one_down)]


def test_duplicate_and_late_datagrams_add_nothing() -> None:
    feed = T.Cumulative()
    feed.report("lb/7", 1, [(WEB, v(1)), (API, v(1))], 100.0)
    assert feed.report("lb/7", 3, [(WEB, v(5))], 102.0) == [(WEB, v(4))]
    assert feed.report("lb/7", 3, [(WEB, v(5))], 102.0) == [], "the same one again"
    late = feed.report("lb/7", 2, [(WEB, v(3)), (API, v(2))], 102.1)
    assert late == [(API, v(1))], "WEB's is older than what came; API's is not"
    assert feed.report("lb/7", 4, [(WEB, v(6)), (API, v(2))], 103.0) == [(WEB, v(1))]


def test_a_new_worker_with_a_known_pid_is_a_new_source() -> None:
    feed = T.Cumulative()
    feed.report("lb/7", 500, [(WEB, v(50))], 100.0)
    assert feed.report("lb/7", 1, [(WEB, v(2))], 200.0) == [(WEB, v(2))]
    assert feed.report("lb/7", 2, [(WEB, v(3))], 201.0) == [(WEB, v(1))]


def test_sources_are_apart_and_a_forgotten_one_starts_again() -> None:
    feed = T.Cumulative()
    feed.report("lb/7", 1, [(WEB, v(1))], 100.0)
    assert feed.report("other/7", 9, [(WEB, v(40))], 100.0) == [], "another nginx's worker"
    assert feed.report("lb/7", 2, [(WEB, v(2)), (API, [1, 2])], 101.0) == [(WEB, v(1))]
    feed.forget(["other/7"])
    assert feed.report("lb/7", 3, [(WEB, v(3))], 102.0) == [], "a baseline again"
    assert feed.report("other/7", 10, [(WEB, v(41))], 102.0) == [(WEB, v(1))]


def test_a_vector_adds_counts_and_buckets() -> None:
    book = T.TrafficBook()
    vector = [0, 5, 0, 0, 1, 2, 600, 300] + [0] * T.BUCKETS
    vector[T.COUNTS + T.bucket(0.02)] = 6
    book.add_vector(WEB, vector, 50.0)
    summary = book.summary(WEB, 50.0)
    assert summary is not None
    assert summary.requests["2xx"] == 5 and summary.connect_errors == 2
    assert summary.p50_ms is not None and 14 < summary.p50_ms < 29


# Bounded keys: the model's only, and never more than max_keys.

API_B = T.Key("api", "172.20.0.3:80")


def test_once_given_the_models_keys_the_book_refuses_any_other_and_counts_it() -> None:
    book = T.TrafficBook()
    book.add(T.Key("junk", "10.9.9.9:1"), 200, 0.01, 10.0)  # no model yet: taken
    book.retain([WEB, API], 10.0)
    book.add(WEB, 200, 0.01, 11.0)
    book.add(T.Key("made-up", ""), 200, 0.01, 11.0)
    book.add_vector(T.Key("web", "10.0.0.1:80"), v(1), 11.0)
    assert book.refused() == {"unknown": 2, "full": 0}
    assert book.admits(WEB) and not book.admits(T.Key("made-up", ""))
    assert book.summary(T.Key("made-up", ""), 11.0) is None
    assert book.summary(WEB, 11.0) is not None


def test_a_key_that_left_the_model_keeps_its_figures_and_reports_for_a_minute() -> None:
    book = T.TrafficBook()
    book.retain([WEB, API, API_B], 0.0)
    book.add(API_B, 200, 0.01, 5.0)
    book.retain([WEB, API], 10.0)  # api's backend is gone
    book.add(API_B, 502, 0.01, 12.0)  # an old worker's last counts still come in
    summary = book.summary(API_B, 30.0)
    assert summary is not None and summary.requests["5xx"] == 1
    book.prune(69.0)
    assert book.summary(API_B, 69.0) is not None, "still within the minute after it left"
    book.prune(70.0)
    assert book.summary(API_B, 70.0) is None and len(book) == 0
    book.add(API_B, 200, 0.01, 71.0)
    assert book.refused()["unknown"] == 1 and len(book) == 0


def test_a_key_that_comes_back_is_kept_again() -> None:
    book = T.TrafficBook()
    book.retain([API_B], 0.0)
    book.add(API_B, 200, 0.01, 1.0)
    book.retain([], 2.0)
    book.retain([API_B], 3.0)
    book.prune(100.0 - T.WINDOW + 1)
    assert book.summary(API_B, 30.0) is not None
    book.add(API_B, 200, 0.01, 200.0)
    assert book.refused()["unknown"] == 0


def test_keys_before_the_first_model_that_it_lacks_go_after_a_minute() -> None:
    book = T.TrafficBook()
    junk = T.Key("junk", "")
    book.add(junk, 200, 0.01, 5.0)
    book.retain([WEB], 10.0)
    assert book.summary(junk, 20.0) is not None
    book.add(junk, 200, 0.01, 65.0)  # taken within its minute
    book.prune(70.0)
    assert book.summary(junk, 70.0) is None and len(book) == 0


def test_the_cap_refuses_new_keys_and_counts_them_whatever_the_model() -> None:
    book = T.TrafficBook(max_keys=3)
    keys = [T.Key(f"s{i}", "") for i in range(5)]
    for key in keys:
        book.add(key, 200, 0.01, 1.0)
    assert len(book) == 3 and book.refused() == {"unknown": 0, "full": 2}
    book.add(keys[0], 200, 0.01, 2.0)  # a key it holds still takes reports
    book.retain(keys, 2.0)
    book.add_vector(keys[4], v(1), 2.0)
    assert len(book) == 3 and book.refused() == {"unknown": 0, "full": 3}
    book.prune(2.0 + T.WINDOW)
    book.add(keys[4], 200, 0.01, 2.0 + T.WINDOW)
    assert len(book) == 1, "room again once the old ones went"


def test_memory_stays_bounded_whatever_keys_a_sender_makes_up() -> None:
    book = T.TrafficBook(max_keys=50)
    feed = T.Cumulative(max_keys=50)
    book.retain([WEB], 0.0)
    for i in range(2000):
        key = T.Key(f"s{i}", f"10.0.{i // 250}.{i % 250}:80")
        for k, added in feed.report("lb/7", i + 1, [(key, v(1)), (WEB, v(i + 1))], float(i)):
            book.add_vector(k, added, float(i))
    assert len(book) == 1 and book.refused()["unknown"] == 49
    assert len(feed._sources["lb/7"].keys) == 50
    summary = book.summary(WEB, 1999.0)
    assert summary is not None and summary.requests["2xx"] == 60
