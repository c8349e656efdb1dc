"""Prometheus metrics for operators, derived from the collector's latest poll.

A custom collector (``prometheus_client``'s ``Collector`` protocol) turns the
daemon's own figures into metric families at scrape time: the daemon already
counts (``status``'s ``counters`` and ``rejections`` maps), so the explorer
re-exports those counters as they are rather than keeping a second count that
could drift.  Counters are monotonic because the daemon's are (they reset only
when the daemon restarts, which Prometheus' ``rate()`` handles).  Names:

* ``p2pgpu_up``: 1 when the daemon answered the last poll;
* ``p2pgpu_peers``, ``p2pgpu_adverts_known``, ``p2pgpu_gpus``, ``p2pgpu_gpus_free``,
  ``p2pgpu_uptime_seconds``: gauges from ``status``;
* ``p2pgpu_supply_gpus{model,region}``, ``p2pgpu_supply_nodes``: the market;
* ``p2pgpu_advert_rejections_total{reason}``: adverts refused, by reason;
* ``p2pgpu_node_events_total{event}``: every other daemon counter
  (``dht:...``, stream errors, work counters);
* ``p2pgpu_jobs{state}``, ``p2pgpu_clusters``, ``p2pgpu_proofs``;
* ``p2pgpu_payouts{side,status}``, ``p2pgpu_paid_amount_total{currency}``;
* latencies: ``p2pgpu_peer_latency_ms{peer}`` (ping), the histogram
  ``p2pgpu_cluster_formation_seconds`` (submit to confirm, per job), and
  ``p2pgpu_explorer_control_call_seconds{method}`` (the last call of each
  control method the explorer made);
* ``p2pgpu_explorer_polls_total``, ``p2pgpu_explorer_call_errors_total{method}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ._collect import Collector
from ._views import _int

#: Label values kept per family (peers, models, reasons...): a scrape stays small.
label_values_max = 256
#: Buckets of the formation-time histogram, in seconds.
formation_buckets_s = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ExplorerMetrics:
    """``registry.register(ExplorerMetrics(collector))``: reads the collector at each scrape."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        c = self.collector
        raw = c.raw
        status = raw.status or {}
        views = c.views

        yield _gauge("p2pgpu_up", "1 when the node daemon answered the explorer's last poll",
                     1 if raw.status is not None else 0)
        for key, name, doc in (
            ("peers", "p2pgpu_peers", "connected libp2p peers"),
            ("adverts_known", "p2pgpu_adverts_known", "live signed adverts this node knows"),
            ("gpus", "p2pgpu_gpus", "GPUs of this node"),
            ("gpus_free", "p2pgpu_gpus_free", "GPUs of this node not promised to a job"),
            ("uptime_s", "p2pgpu_uptime_seconds", "seconds since the daemon started"),
        ):
            if isinstance(status.get(key), (int, float)):
                yield _gauge(name, doc, status[key])

        sup = GaugeMetricFamily("p2pgpu_supply_gpus", "GPUs advertised in the market, by model and region",
                                labels=["model", "region"])
        for row in views["supply"]["rows"][:label_values_max]:
            sup.add_metric([row["model"], row["region"]], row["gpus"])
        yield sup
        yield _gauge("p2pgpu_supply_nodes", "nodes advertising in the market", views["supply"]["nodes"])

        rej = CounterMetricFamily("p2pgpu_advert_rejections", "adverts refused, by reason", labels=["reason"])
        for reason, n in sorted((status.get("rejections") or {}).items())[:label_values_max]:
            rej.add_metric([str(reason)], _int(n))
        yield rej
        ev = CounterMetricFamily("p2pgpu_node_events", "the daemon's own counters", labels=["event"])
        for event, n in sorted((status.get("counters") or {}).items())[:label_values_max]:
            ev.add_metric([str(event)], _int(n))
        yield ev

        jobs = GaugeMetricFamily("p2pgpu_jobs", "jobs this node submitted or worked on, by state", labels=["state"])
        for state, n in views["summary"]["jobs"].items():
            jobs.add_metric([state], n)
        yield jobs
        yield _gauge("p2pgpu_clusters", "clusters formed (certified jobs) this node knows",
                     len(views["clusters"]["rows"]))
        yield _gauge("p2pgpu_proofs", "signed work proofs this node holds", len(views["proofs"]["rows"]))

        pay = GaugeMetricFamily("p2pgpu_payouts", "payout rows, by side (owed/earned) and status",
                                labels=["side", "status"])
        counts: dict[tuple[str, str], int] = {}
        for p in views["payouts"]["rows"]:
            side_status = (str(p["side"]), str(p.get("status")))
            counts[side_status] = counts.get(side_status, 0) + 1
        for side_status, n in sorted(counts.items()):
            pay.add_metric(list(side_status), n)
        yield pay
        paid = CounterMetricFamily("p2pgpu_paid_amount", "amount paid in confirmed ledger transactions",
                                   labels=["currency"])
        for cur, total in views["summary"]["paid_total"].items():
            paid.add_metric([cur], total)
        yield paid

        lat = GaugeMetricFamily("p2pgpu_peer_latency_ms", "ping round trip to each connected peer", labels=["peer"])
        for p in (raw.peers or [])[:label_values_max]:
            if isinstance(p.get("latency_ms"), (int, float)):
                lat.add_metric([str(p.get("peer_id"))], p["latency_ms"])
        yield lat
        yield _formation_histogram(views["jobs"]["rows"])
        call = GaugeMetricFamily("p2pgpu_explorer_control_call_seconds",
                                 "duration of the explorer's last control call, by method", labels=["method"])
        for method, s in sorted(c.latency_s.items()):
            call.add_metric([method], s)
        yield call
        yield CounterMetricFamily("p2pgpu_explorer_polls", "polls of the daemon by the explorer", value=c.polls)
        err = CounterMetricFamily("p2pgpu_explorer_call_errors", "failed control calls, by method",
                                  labels=["method"])
        for method, n in sorted(c.call_errors.items()):
            err.add_metric([method], n)
        yield err


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _formation_histogram(job_rows: list[dict[str, Any]]) -> HistogramMetricFamily:
    times_s = [j["formation_ms"] / 1000 for j in job_rows
               if isinstance(j.get("formation_ms"), (int, float)) and j["formation_ms"] >= 0]
    buckets: list[tuple[str, float]] = []
    for le in formation_buckets_s:
        buckets.append((repr(le), sum(1 for t in times_s if t <= le)))
    buckets.append(("+Inf", len(times_s)))
    h = HistogramMetricFamily("p2pgpu_cluster_formation_seconds",
                              "time from submitting a job to confirming its cluster (jobs this node submitted)")
    h.add_metric([], buckets, sum_value=sum(times_s))
    return h


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExplorerMetrics(collector))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
