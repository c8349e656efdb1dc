"""The explorer's time series: a bounded store of what the network looked like over time.

Some figures exist only as "now": the GPUs online are whatever signed
adverts are live at this moment, so their history must be sampled.  Others
are events with their own timestamps (a job seen at ``seen_at_ms``, a payout
paid at ``paid_ms``), so their history is counted once per event.  This
module keeps both, bounded, in the explorer process:

* :class:`GaugeSeries`: one value per label per bucket (the last sample in
  the bucket), ``buckets_max`` buckets (24 h of minutes by default), at most
  ``labels_max`` labels (the rest are summed under ``other``);
* :class:`EventCounter`: counts (and sums) per bucket of events identified
  by a key, each counted once however often it is seen again (the keys
  remembered are bounded; a key forgotten and seen again within the window is
  at worst counted twice, never lost);
* :class:`NetworkSeries`: the explorer's set of them (GPUs by model and by
  region, nodes, jobs seen and clusters formed per hour), fed once per poll.

Pure: no clock (``now_ms`` comes in), no I/O; the history starts when the
explorer does (documented), except for payouts and earnings, whose
timestamps are in the node's store and are recomputed from its rows.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

minute_ms = 60_000
hour_ms = 3_600_000
day_ms = 86_400_000
OTHER = "other"


@dataclass
class GaugeSeries:
    """The last sampled value of each label, per bucket."""

    bucket_ms: int = minute_ms
    buckets_max: int = 1440
    labels_max: int = 16
    buckets: deque[tuple[int, dict[str, float]]] = field(default_factory=deque)

    def sample(self, now_ms: int, values: Mapping[str, float]) -> None:
        start = now_ms - now_ms % self.bucket_ms
        capped = _cap_labels(values, self.labels_max)
        if self.buckets and self.buckets[-1][0] == start:
            self.buckets[-1] = (start, capped)
        elif not self.buckets or self.buckets[-1][0] < start:
            self.buckets.append((start, capped))
            while len(self.buckets) > self.buckets_max:
                self.buckets.popleft()
        # A sample older than the last bucket (a clock step back) is dropped: history is append-only.

    def labels(self) -> list[str]:
        """Every label, the largest (in the latest bucket, then overall) first."""
        total: dict[str, float] = {}
        for _, vals in self.buckets:
            for k, v in vals.items():
                total[k] = max(total.get(k, 0.0), v)
        latest = self.buckets[-1][1] if self.buckets else {}
        return sorted(total, key=lambda k: (-latest.get(k, 0.0), -total[k], k))

    def points(self, label: str, since_ms: int = 0) -> list[tuple[int, float]]:
        return [(t, vals.get(label, 0.0)) for t, vals in self.buckets if t >= since_ms]


def _cap_labels(values: Mapping[str, float], labels_max: int) -> dict[str, float]:
    items = sorted(((str(k), float(v)) for k, v in values.items()), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(items[: labels_max - 1]) if len(items) > labels_max else dict(items)
    rest = sum(v for _, v in items[labels_max - 1:]) if len(items) > labels_max else 0.0
    if rest:
        kept[OTHER] = kept.get(OTHER, 0.0) + rest
    return kept


@dataclass
class EventCounter:
    """Events per bucket, each key counted once; ``keys_max`` keys remembered."""

    bucket_ms: int = hour_ms
    buckets_max: int = 336  # two weeks of hours
    keys_max: int = 50_000
    counts: dict[int, int] = field(default_factory=dict)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def add(self, key: str, t_ms: int, now_ms: int) -> bool:
        """Count the event ``key`` at ``t_ms``; False if already counted or outside the window."""
        if key in self.seen:
            return False
        oldest = self._window_start(now_ms)
        if not oldest <= t_ms <= now_ms + self.bucket_ms:
            return False
        self.seen[key] = None
        while len(self.seen) > self.keys_max:
            self.seen.popitem(last=False)
        start = t_ms - t_ms % self.bucket_ms
        self.counts[start] = self.counts.get(start, 0) + 1
        for b in [b for b in self.counts if b < oldest]:
            del self.counts[b]
        return True

    def _window_start(self, now_ms: int) -> int:
        return now_ms - now_ms % self.bucket_ms - (self.buckets_max - 1) * self.bucket_ms

    def points(self, now_ms: int, buckets: int) -> list[tuple[int, int]]:
        """The last ``buckets`` buckets up to now, empty ones as 0."""
        end = now_ms - now_ms % self.bucket_ms
        return [(end - i * self.bucket_ms, self.counts.get(end - i * self.bucket_ms, 0))
                for i in reversed(range(min(buckets, self.buckets_max)))]


@dataclass
class NetworkSeries:
    """What the explorer remembers of the network between polls."""

    gpus_by_model: GaugeSeries = field(default_factory=GaugeSeries)
    gpus_by_region: GaugeSeries = field(default_factory=GaugeSeries)
    totals: GaugeSeries = field(default_factory=lambda: GaugeSeries(labels_max=4))
    jobs: EventCounter = field(default_factory=EventCounter)
    clusters: EventCounter = field(default_factory=EventCounter)
    started_ms: int | None = None

    def observe(self, now_ms: int, supply: Mapping[str, Any], job_rows: Iterable[Mapping[str, Any]]) -> None:
        """One poll: sample the supply, count jobs and clusters not counted before."""
        if self.started_ms is None:
            self.started_ms = now_ms
        self.gpus_by_model.sample(now_ms, {str(m.get("model")): _num(m.get("gpus")) for m in supply.get("by_model", [])})
        self.gpus_by_region.sample(now_ms, {str(r.get("region")): _num(r.get("gpus"))
                                            for r in supply.get("by_region", [])})
        self.totals.sample(now_ms, {"gpus": _num(supply.get("gpus_total")), "free": _num(supply.get("gpus_free")),
                                    "nodes": _num(supply.get("nodes"))})
        for j in job_rows:
            job_id, seen = j.get("job_id"), j.get("seen_at_ms")
            if not isinstance(job_id, str) or not isinstance(seen, int) or isinstance(seen, bool):
                continue
            self.jobs.add(job_id, seen, now_ms)
            if j.get("members") and j.get("certificate_hash"):
                # When the cluster formed is not in the row; it formed within seconds of being seen.
                self.clusters.add(job_id, seen, now_ms)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


# ---------------------------------------------------------- from stored rows


def per_bucket(rows: Iterable[Mapping[str, Any]], *, time_key: str, value_key: str | None, now_ms: int,
               bucket_ms: int = day_ms, buckets: int = 30, where: Any = None) -> list[tuple[int, int]]:
    """Sum of ``value_key`` (or a count) per bucket of ``time_key``, the last ``buckets`` up to now."""
    end = now_ms - now_ms % bucket_ms
    start = end - (buckets - 1) * bucket_ms
    sums: dict[int, int] = {}
    for r in rows:
        t = r.get(time_key)
        if not isinstance(t, int) or isinstance(t, bool) or not start <= t < end + bucket_ms:
            continue
        if where is not None and not where(r):
            continue
        v = 1 if value_key is None else r.get(value_key)
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        b = t - t % bucket_ms
        sums[b] = sums.get(b, 0) + v
    return [(start + i * bucket_ms, sums.get(start + i * bucket_ms, 0)) for i in range(buckets)]
