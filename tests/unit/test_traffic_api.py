"""Traffic figures as the API and the metrics show them (issue 17): each service's and
backend's `traffic` from the stats listener's book, read once per request and null where
nothing was reported; Prometheus counters and a histogram from the listener's running
totals, with each backend named by its container."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.addresses import SocketAddress
from controlplane.api.app import create_app
from controlplane.api.http import ApiContext
from controlplane.core.traffic import BUCKETS, COUNTS, VECTOR, Key, Summary, bucket
from controlplane.metrics import UPSTREAM_BUCKETS, Metrics
from controlplane.stats_listener import HOUSEKEEPING, TOTALS_TTL, Decoded, StatsListener
from tests.unit.builders import container, nginx, state
from tests.unit.conftest import WEB, ApiHarness, HarnessFactory

TAG = "abcdefghijklmnop1234"
W1, W2 = "172.20.0.2:80", "172.20.0.3:80"
NGINX_IP = "172.20.0.100"


def summary(two_xx: int, p50: float | None = 1.19) -> Summary:
    return Summary(
        rps_10s=two_xx / 10,
        rps_1m=two_xx / 60,
        requests={"1xx": 0, "2xx": two_xx, "3xx": 0, "4xx": 1, "5xx": 2},
        connect_errors=3,
        p50_ms=p50,
        p95_ms=None if p50 is None else 4.7568,
        p99_ms=None if p50 is None else 9.5137,
        bytes_sent=1000,
        bytes_received=200,
        per_second=(0,) * 59 + (two_xx,),
    )


class FakeTraffic:
    """ApiContext.traffic over fixed figures; records each call's keys."""

    def __init__(self, figures: Mapping[Key, Summary]) -> None:
        self.figures = figures
        self.calls: list[list[Key]] = []

    def __call__(self, keys: Iterable[Key]) -> Mapping[Key, Summary]:
        asked = list(keys)
        self.calls.append(asked)
        return {k: self.figures[k] for k in asked if k in self.figures}


def with_traffic(api: ApiHarness, traffic: FakeTraffic) -> ApiHarness:
    """The same harness, its app's context given `traffic`."""
    context: ApiContext = api.app.extensions["controlplane"]
    app = create_app(replace(context, traffic=traffic))
    return replace(api, app=app, client=app.test_client())


FIGURES = {Key("web", ""): summary(50), Key("web", W1): summary(30), Key("web", W2): summary(20)}


def test_a_service_and_each_backend_show_their_figures(api: ApiHarness) -> None:
    traffic = FakeTraffic(FIGURES)
    got = with_traffic(api, traffic).call("GET", "/api/v1/services/web").get_json()
    assert traffic.calls == [[Key("web", ""), Key("web", W1), Key("web", W2)]]
    assert got["traffic"] == {
        "rps_10s": 5.0,
        "rps_1m": 0.833,
        "requests": {"1xx": 0, "2xx": 50, "3xx": 0, "4xx": 1, "5xx": 2},
        "connect_errors": 3,
        "p50_ms": 1.19,
        "p95_ms": 4.757,
        "p99_ms": 9.514,
        "bytes_sent": 1000,
        "bytes_received": 200,
        "per_second": [0] * 59 + [50],
    }
    by_name = {b["name"]: b["traffic"] for b in got["backends"]}
    assert by_name["w1"]["requests"]["2xx"] == 30 and by_name["w2"]["requests"]["2xx"] == 20


def test_the_list_asks_once_for_every_service_and_leaves_backends_out(
    make_api: HarnessFactory,
) -> None:
    api = make_api(*WEB, container("a1", aliases=("api",), ip="172.20.0.9"))
    traffic = FakeTraffic(FIGURES)
    got = with_traffic(api, traffic).call("GET", "/api/v1/services").get_json()
    assert traffic.calls == [[Key("api", ""), Key("web", "")]]
    by_name = {s["name"]: s for s in got["services"]}
    assert by_name["web"]["traffic"]["requests"]["2xx"] == 50
    assert by_name["api"]["traffic"] is None
    assert all(b["traffic"] is None for s in got["services"] for b in s["backends"])


def test_null_where_nothing_was_reported_and_when_stats_are_off(api: ApiHarness) -> None:
    quiet = with_traffic(api, FakeTraffic({Key("web", W1): summary(3, p50=None)}))
    got = quiet.call("GET", "/api/v1/services/web").get_json()
    assert got["traffic"] is None
    by_name = {b["name"]: b["traffic"] for b in got["backends"]}
    assert by_name["w2"] is None
    assert by_name["w1"]["p50_ms"] is None and by_name["w1"]["p99_ms"] is None
    off = api.call("GET", "/api/v1/services/web").get_json()  # the default: no listener
    assert off["traffic"] is None and all(b["traffic"] is None for b in off["backends"])


def test_a_backend_is_keyed_by_its_address_as_nginx_names_it_once_per_network(
    make_api: HarnessFactory,
) -> None:
    six = container("w6", ip="", ipv6="fd00::6")
    two = container("w7", ip="172.20.0.7", more_networks={"db": "172.21.0.7"})
    api = make_api(nginx("lb"), six, two)
    api.source.state = state(nginx("lb"), six, two, networks=("bridge", "app", "db"))
    api.call("POST", "/api/v1/resync")
    keys = [Key("web", "[fd00::6]:80"), Key("web", "172.20.0.7:80"), Key("web", "172.21.0.7:80")]
    traffic = FakeTraffic({k: summary(i + 1) for i, k in enumerate(keys)})
    got = with_traffic(api, traffic).call("GET", "/api/v1/services/web").get_json()
    assert sorted(traffic.calls[0]) == sorted([Key("web", ""), *keys])
    shown = {(b["name"], b["network"]): b["traffic"]["requests"]["2xx"] for b in got["backends"]}
    assert shown == {("w6", "app"): 1, ("w7", "app"): 2, ("w7", "db"): 3}


def test_a_change_replies_with_the_figures_too(api: ApiHarness) -> None:
    traffic = FakeTraffic(FIGURES)
    got = with_traffic(api, traffic).call(
        "PATCH",
        "/api/v1/services/web/backends/w1",
        json={"weight": 3},
    )
    assert got.status_code == 200
    assert got.get_json()["traffic"]["requests"]["2xx"] == 50


def test_a_service_kept_only_by_overrides_shows_what_its_last_minute_holds(
    api: ApiHarness,
) -> None:
    traffic = FakeTraffic({Key("gone", ""): summary(7)})
    harness = with_traffic(api, traffic)
    created = harness.call(
        "PUT", "/api/v1/services/gone/algorithm?create=true", json={"method": "least_conn"}
    )
    assert created.status_code == 200
    got = harness.call("GET", "/api/v1/services/gone").get_json()
    assert got["exists"] is False and got["traffic"]["requests"]["2xx"] == 7


# --- the metrics, from a real listener fed what nginx sends ---------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def line(addrs: str, statuses: str, times: str, connects: str, status: int) -> bytes:
    return (
        f"<190>Dec  1 00:17:00 {TAG}: "
        f"cps2|1|web|{addrs}|{statuses}|{times}|{connects}|{status}|9|67"
    ).encode()


def lua(data: bytes, tag: str) -> Decoded | None:
    """A stand-in for the Lua decoder: `cp-stats TAG PID SEQ N` is, cumulatively, N 2xx at w2
    and at the service, each taking 3 ms."""
    parts = data.split(b" ")
    if len(parts) != 5 or parts[1].decode() != tag:
        return None
    n = int(parts[4])
    vector = [0] * VECTOR
    vector[1] = n
    vector[COUNTS + bucket(0.003)] = n
    return parts[2].decode(), int(parts[3]), [(Key("web", W2), vector), (Key("web", ""), vector)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stats(clock: Clock) -> Iterable[StatsListener]:
    listener = StatsListener(
        SocketAddress("127.0.0.1", 0), TAG, lambda: [NGINX_IP], {b"cp-stats ": lua}, clock
    )
    yield listener
    listener.close()


Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Each sample's value by its name and sorted labels."""


def scrape(metrics: Metrics) -> Scraped:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("controlplane_upstream")
        for s in family.samples
    }


def requests(found: Scraped, backend: str) -> dict[str, float]:
    return {
        dict(labels)["code"]: value
        for (name, labels), value in found.items()
        if name == "controlplane_upstream_requests_total" and dict(labels)["backend"] == backend
    }


def test_counters_by_backend_container_and_class(api: ApiHarness, stats: StatsListener) -> None:
    metrics = Metrics(lambda: api.reconciler.snapshot, upstreams=stats.totals)
    for _ in range(3):
        stats.received(line(W1, "200", "0.004", "0.001", 200), NGINX_IP)
    stats.received(line(W1, "404", "0.002", "0.001", 404), NGINX_IP)
    stats.received(line(f"{W1}, {W2}", "502, 503", "0.000, 0.010", "-, 0.001", 503), NGINX_IP)
    stats.received(line("10.9.9.9:80", "200", "0.004", "0.001", 200), NGINX_IP)
    stats.received(f"cp-stats {TAG} 7 1 5".encode(), NGINX_IP)
    stats.received(f"cp-stats {TAG} 7 2 8".encode(), NGINX_IP)  # cumulative: 3 more
    found = scrape(metrics)
    zero = {"1xx": 0.0, "2xx": 0.0, "3xx": 0.0, "4xx": 0.0, "5xx": 0.0, "connect_error": 0.0}
    assert requests(found, "w1") == {**zero, "2xx": 3.0, "4xx": 1.0, "connect_error": 1.0}
    assert requests(found, "w2") == {**zero, "2xx": 8.0, "5xx": 1.0}
    # an address no backend has keeps its address
    assert requests(found, "10.9.9.9:80") == {**zero, "2xx": 1.0}
    assert not any(dict(labels).get("backend") == "" for _, labels in found)


def test_the_histogram_is_per_service_with_exact_bounds(
    api: ApiHarness, stats: StatsListener
) -> None:
    metrics = Metrics(lambda: api.reconciler.snapshot, upstreams=stats.totals)
    for took in ("0.001", "0.004", "0.004", "0.100", "9.000"):
        stats.received(line(W1, "200", took, "0.001", 200), NGINX_IP)
    stats.received(line(W1, "-", "-", "-", 499), NGINX_IP)  # the client left: no time
    stats.received(f"cp-stats {TAG} 7 1 2".encode(), NGINX_IP)  # 2 at 3 ms
    found = scrape(metrics)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in found.items()
        if name == "controlplane_upstream_response_seconds_bucket"
    }
    assert buckets["0.001"] == 1
    assert buckets["0.002"] == 1
    assert buckets["0.004"] == 5  # 3 ms is in (2.83, 4] ms
    assert buckets["0.128"] == 6
    assert buckets["8.192"] == 6
    assert buckets["+Inf"] == 7
    assert len(buckets) == len(UPSTREAM_BUCKETS) + 1
    service = (("service", "web"),)
    assert found["controlplane_upstream_response_seconds_count", service] == 7
    assert 9.0 < found["controlplane_upstream_response_seconds_sum", service] < 12.0


def test_a_container_on_two_networks_is_one_series(
    make_api: HarnessFactory, stats: StatsListener
) -> None:
    two = container("w7", ip="172.20.0.7", more_networks={"db": "172.21.0.7"})
    api = make_api(nginx("lb"), two)
    api.source.state = state(nginx("lb"), two, networks=("bridge", "app", "db"))
    api.call("POST", "/api/v1/resync")
    metrics = Metrics(lambda: api.reconciler.snapshot, upstreams=stats.totals)
    stats.received(line("172.20.0.7:80", "200", "0.004", "0.001", 200), NGINX_IP)
    stats.received(line("172.21.0.7:80", "200", "0.004", "0.001", 200), NGINX_IP)
    assert requests(scrape(metrics), "w7")["2xx"] == 2


def test_totals_outlive_the_minute_and_are_forgotten_after_ten(
    api: ApiHarness, stats: StatsListener, clock: Clock
) -> None:
    metrics = Metrics(lambda: api.reconciler.snapshot, upstreams=stats.totals)
    stats.received(line(W1, "200", "0.004", "0.001", 200), NGINX_IP)
    clock.now += 120
    stats.housekeep()
    assert stats.summary(Key("web", W1)) is None  # the book's minute is over
    stats.received(line(W2, "200", "0.004", "0.001", 200), NGINX_IP)
    assert requests(scrape(metrics), "w1")["2xx"] == 1  # a counter only grows
    clock.now += TOTALS_TTL - 120 + HOUSEKEEPING
    stats.housekeep()
    assert requests(scrape(metrics), "w1") == {}
    assert requests(scrape(metrics), "w2")["2xx"] == 1
    clock.now += 200
    stats.housekeep()
    assert stats.totals() == {}


def test_totals_count_what_the_book_counts(stats: StatsListener) -> None:
    stats.received(line(f"{W1}, {W2}", "502, 200", "0.000, 0.004", "-, 0.001", 200), NGINX_IP)
    totals = stats.totals()
    whole, w1, w2 = totals[Key("web", "")], totals[Key("web", W1)], totals[Key("web", W2)]
    assert (whole.requests, whole.connect_errors) == ((0, 1, 0, 0, 0), 1)
    assert (w1.requests, w1.connect_errors, w1.buckets) == ((0, 0, 0, 0, 0), 1, ())
    assert (w2.requests, w2.connect_errors) == ((0, 1, 0, 0, 0), 0)
    assert len(whole.buckets) == BUCKETS and sum(whole.buckets) == 1
    book = stats.summary(Key("web", ""))
    assert book is not None and book.connect_errors == whole.connect_errors


def test_no_listener_no_upstream_metrics(api: ApiHarness) -> None:
    assert "controlplane_upstream" not in api.metrics.exposition().decode()


def test_keys_outside_the_model_are_refused_and_counted(
    api: ApiHarness, stats: StatsListener
) -> None:
    """Once told the model's keys, the book takes no made-up service; the metrics count it."""
    metrics = Metrics(
        lambda: api.reconciler.snapshot,
        stats_datagrams=stats.datagrams,
        stats_refused=stats.refused,
    )
    stats.retain([Key("web", ""), Key("web", W1)])
    stats.received(line(W1, "200", "0.004", "0.001", 200), NGINX_IP)
    made_up = line(W1, "200", "0.004", "0.001", 200).replace(b"|web|", b"|made-up|")
    stats.received(made_up, NGINX_IP)
    assert stats.summary(Key("made-up", "")) is None
    assert stats.summary(Key("web", "")) is not None
    text = metrics.exposition().decode()
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "controlplane_stats_refused_keys"
    ]
    refused = {s.labels["reason"]: s.value for s in family.samples}
    assert refused["unknown"] >= 1 and refused.get("full", 0) == 0
