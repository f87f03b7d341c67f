"""Prometheus metrics: counters fed by the loop, gauges read from the snapshot at scrape time.

A registry of its own (not the library's global one), so two controllers in one process, as
in the tests, don't share counters.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from controlplane.core.health import Outcome, Result
from controlplane.core.model import BackendState
from controlplane.core.render import address
from controlplane.core.served import NginxState
from controlplane.core.traffic import CLASSES, Key, bucket, middle
from controlplane.snapshot import ReconcileReport, Snapshot
from controlplane.stats_listener import Totals

PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
UPSTREAM_BUCKETS = tuple(0.001 * 2**k for k in range(14))
"""Seconds, 1 ms doubling to 8.192 s: each is the top of one of core.traffic's buckets (a
factor of sqrt(2) apart), so what nginx reported falls below a bound exactly, with no
re-binning."""
UPSTREAM_CODES = (*CLASSES, "connect_error")


class Metrics:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        dns_outcomes: Callable[[], Mapping[str, int]] | None = None,
        nginx: Callable[[], Mapping[str, NginxState]] = dict,
        stats_datagrams: Callable[[], Mapping[str, int]] | None = None,
        upstreams: Callable[[], Mapping[Key, Totals]] | None = None,
        stats_refused: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """`nginx`: what each managed nginx runs (core.served), by container id;
        `stats_datagrams`: the stats listener's datagrams by result; `upstreams`: its running
        totals per backend and service (StatsListener.totals); `stats_refused`: the reports
        of keys its book refused, by reason (StatsListener.refused)."""
        self.registry = CollectorRegistry()
        self._reloads = Counter(
            "controlplane_nginx_reloads",
            "Config deploys to a managed nginx, by result (ok: tested and reloaded).",
            ["nginx", "result"],
            registry=self.registry,
        )
        self._pushes = Counter(
            "controlplane_nginx_pushes",
            "Backends pushed to a dynamic nginx's Lua balancer, by result (no reload).",
            ["nginx", "result"],
            registry=self.registry,
        )
        self._failures = Counter(
            "controlplane_reconcile_failures",
            "Reconcile passes that could not run (Docker unreachable, template error).",
            registry=self.registry,
        )
        self._duration = Histogram(
            "controlplane_reconcile_duration_seconds",
            "Time of one reconcile pass that changed or deployed something: list, build, "
            "render, deploy.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._event_to_apply = Histogram(
            "controlplane_event_to_apply_seconds",
            "From a Docker event to the reload (or push) that answers it.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._probes = Counter(
            "controlplane_health_probes",
            "Health probes of backends (the readiness gate's and active checks'), by result: "
            "pass or fail.",
            ["result"],
            registry=self.registry,
        )
        # bound once: a thousand probes a second each look their child up otherwise
        self._passed, self._failed = self._probes.labels("pass"), self._probes.labels("fail")
        self._probe_failures = Counter(
            "controlplane_health_probe_failures",
            "Failed health probes by reason: refused, no answer, no reply, not HTTP, status "
            "NXX (the status class), host or network unreachable, failed.",
            ["reason"],
            registry=self.registry,
        )
        self._probe_seconds = Histogram(
            "controlplane_health_probe_seconds",
            "How long a health probe took, from its connect to its result.",
            buckets=PROBE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot, dns_outcomes, nginx))
        if stats_datagrams is not None:
            self.registry.register(_StatsCollector(stats_datagrams, stats_refused or dict))
        if upstreams is not None:
            self.registry.register(_UpstreamCollector(upstreams, snapshot))

    def on_report(self, report: ReconcileReport) -> None:
        if not (report.changed or report.deployed):
            return
        self._duration.observe(sum(report.timings.values()))
        for result in report.deployed:
            counter = self._pushes if result.pushed else self._reloads
            counter.labels(result.container, "ok" if result.ok else "failed").inc()
        if report.trigger is not None and any(d.ok for d in report.deployed):
            self._event_to_apply.observe(max(0, time.time_ns() - report.trigger.time_ns) / 1e9)

    def on_failure(self, _reason: str, _error: str) -> None:
        self._failures.inc()

    def on_probe(self, result: Result, passed: bool) -> None:
        (self._passed if passed else self._failed).inc()
        self._probe_seconds.observe(result.latency)
        if not passed:
            reason = (
                f"status {(result.status or 0) // 100}xx"
                if result.outcome is Outcome.STATUS
                else result.outcome.value
            )
            self._probe_failures.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """The stats listener's datagrams and refused keys, read at scrape time."""

    def __init__(
        self,
        datagrams: Callable[[], Mapping[str, int]],
        refused: Callable[[], Mapping[str, int]],
    ) -> None:
        self._datagrams, self._refused = datagrams, refused

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "controlplane_stats_datagrams",
            "Traffic reports from nginx by result: accepted, or dropped for its size, an "
            "unknown source, an unknown kind, a wrong tag, invalid content or a decoder error.",
            labels=["result"],
        )
        for result, count in self._datagrams().items():
            family.add_metric([result], count)
        yield family
        refused = CounterMetricFamily(
            "controlplane_stats_refused_keys",
            "Reports of a service or backend the traffic book did not take: unknown (in no "
            "model of the last minute) or full (it holds as many keys as it may).",
            labels=["reason"],
        )
        for reason, count in self._refused().items():
            refused.add_metric([reason], count)
        yield refused


class _UpstreamCollector(Collector):
    """What nginx reported of its requests to backends, as counters that only grow: the stats
    listener's running totals, read at scrape time. A backend is labelled with its container's
    name (the snapshot's, by service and address; an address no backend has any more keeps
    the address)."""

    def __init__(
        self,
        totals: Callable[[], Mapping[Key, Totals]],
        snapshot: Callable[[], Snapshot | None],
    ) -> None:
        self._totals = totals
        self._snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        totals = self._totals()
        requests = CounterMetricFamily(
            "controlplane_upstream_requests",
            "Tries at each backend that nginx reported, by the status class of the backend's "
            "reply, or connect_error (refused, timed out, unreachable): a request retried "
            "elsewhere counts at each backend it tried.",
            labels=["service", "backend", "code"],
        )
        seconds = HistogramMetricFamily(
            "controlplane_upstream_response_seconds",
            "Each request's time in its service's backends (all its tries), as nginx reported "
            "it; the sum is estimated from each bucket's middle (within 19%).",
            labels=["service"],
        )
        names = self._names()
        tries: dict[tuple[str, str], list[int]] = {}
        for key, total in totals.items():
            if key.backend == "":
                seconds.add_metric([key.service], *_histogram(total.buckets))
                continue
            label = names.get(key, key.backend)
            # a container on two networks is two addresses, one label: summed
            counts = tries.setdefault((key.service, label), [0] * len(UPSTREAM_CODES))
            for i, n in enumerate((*total.requests, total.connect_errors)):
                counts[i] += n
        for (service, backend), counts in tries.items():
            for code, n in zip(UPSTREAM_CODES, counts, strict=True):
                requests.add_metric([service, backend, code], n)
        yield requests
        yield seconds

    def _names(self) -> dict[Key, str]:
        """Each backend's container name, by its key."""
        snapshot = self._snapshot()
        if snapshot is None:
            return {}
        return {
            Key(service.name, address(b)): b.container
            for service in snapshot.topology.services
            for b in service.backends
        }


_TOPS = tuple(bucket(bound) for bound in UPSTREAM_BUCKETS)
"""The core.traffic bucket each bound is the top of."""


def _histogram(buckets: Sequence[int]) -> tuple[list[tuple[str, float]], float]:
    """core.traffic's buckets as Prometheus's cumulative ones, and their estimated sum."""
    cumulative, seen, top = [], 0, 0
    for bound, last in zip(UPSTREAM_BUCKETS, _TOPS, strict=True):
        seen += sum(buckets[top : last + 1])
        top = last + 1
        cumulative.append((str(bound), float(seen)))
    cumulative.append(("+Inf", float(sum(buckets))))
    return cumulative, sum(middle(i) * n for i, n in enumerate(buckets))


class _SnapshotCollector(Collector):
    """Gauges read at scrape time, from the snapshot and what each nginx runs."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        dns_outcomes: Callable[[], Mapping[str, int]] | None,
        nginx: Callable[[], Mapping[str, NginxState]],
    ) -> None:
        self._snapshot = snapshot
        self._dns_outcomes = dns_outcomes
        self._nginx = nginx

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._snapshot()
        backends = GaugeMetricFamily(
            "controlplane_backends",
            "Backends (container x network) per service, by state; only up ones get traffic.",
            labels=["service", "state"],
        )
        version = GaugeMetricFamily(
            "controlplane_snapshot_version", "Version of the model the controller holds."
        )
        excluded = GaugeMetricFamily(
            "controlplane_excluded", "Containers or aliases left out, each with a reason."
        )
        up = GaugeMetricFamily(
            "controlplane_backend_up",
            "1 when the controller serves the backend (running, ready, checks passing, not "
            "draining), 0 when it holds it out.",
            labels=["service", "backend"],
        )
        if snapshot is not None:
            for service in snapshot.topology.services:
                states = Tally(b.state for b in service.backends)
                for state in BackendState:
                    backends.add_metric([service.name, state.value], states.get(state, 0))
                serving: dict[str, int] = {}
                for b in service.backends:
                    serving[b.container] = serving.get(b.container, 0) or int(
                        b.state is BackendState.UP
                    )
                for name, value in serving.items():
                    up.add_metric([service.name, name], value)
            version.add_metric([], snapshot.version)
            excluded.add_metric([], len(snapshot.topology.excluded))
        yield backends
        yield up
        yield version
        yield excluded
        yield from self._served(snapshot)
        if self._dns_outcomes is not None:
            queries = CounterMetricFamily(
                "controlplane_dns_queries",
                "DNS queries by result: the reply's RCODE, forwarded or dropped.",
                labels=["result"],
            )
            for result, count in self._dns_outcomes().items():
                if count or not result.startswith("rcode"):
                    queries.add_metric([result], count)
            yield queries

    def _served(self, snapshot: Snapshot | None) -> Iterator[GaugeMetricFamily]:
        in_nginx = GaugeMetricFamily(
            "controlplane_backend_in_nginx",
            "1 when the config this nginx runs sends the backend requests, 0 when it does not "
            "(a backend the controller wants but nginx refused, or one taken out).",
            labels=["service", "backend", "nginx"],
        )
        failed = GaugeMetricFamily(
            "controlplane_nginx_config_failed",
            "1 while this nginx refused (or did not get) the current config and runs an older "
            "one; the API's /api/v1/nginx says why.",
            labels=["nginx"],
        )
        dataplane = GaugeMetricFamily(
            "controlplane_nginx_dataplane",
            "1 for the data plane this nginx runs: dynamic (backends pushed to its Lua "
            "balancer, no reload) or reload (rendered into its config).",
            labels=["nginx", "dataplane"],
        )
        states = self._nginx()
        if snapshot is not None:
            running = [
                states[t.container_id] for t in snapshot.topology.nginx if t.container_id in states
            ]
            for state in running:
                failed.add_metric([state.container], 1 if state.failure else 0)
                if state.mode is not None:
                    dataplane.add_metric([state.container, state.mode.mode.value], 1)
                if state.serves is None:
                    continue
                for service in snapshot.topology.services:
                    serves = state.serves.get(service.name, frozenset())
                    for container_id, name in {
                        b.container_id: b.container for b in service.backends
                    }.items():
                        in_nginx.add_metric(
                            [service.name, name, state.container],
                            1 if container_id in serves else 0,
                        )
        yield in_nginx
        yield failed
        yield dataplane
