"""The network view: the whole network as this node sees it, over time; pure.

Built from what the node sees and can prove (docs/explorer.md):

* **GPUs online** by model and by region: the live signed adverts, sampled
  at every poll into :class:`~p2pgpu.explorer._series.NetworkSeries`;
* **jobs per hour** and **clusters formed per hour**: every manifest the node
  saw on the jobs topic (``network.jobs``), whoever submitted it, and the
  clusters whose confirmation it saw, each counted once;
* **payouts per day** and **top earners**: payouts settled by a ledger
  transaction (``paid``, with its signature) that this node made or
  received, by ``paid_ms``, from the node's store;
* **this operator's earnings** per day: what the node was paid (and, in the
  local mode only, what it still expects).

Amounts are summed in one currency (SOL, in lamports): rows in another
currency are counted but not added to the SOL figures.  Every plot is an SVG
from ``_plots.py``, named in :data:`PLOTS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _plots
from ._series import NetworkSeries, day_ms, hour_ms, per_bucket

#: The plots ``/plots/<name>.svg`` serves, in page order.
PLOTS = ("gpus_by_model", "gpus_by_region", "jobs_per_hour", "payouts_per_day", "top_earners", "earnings")
#: How far back each plot looks.
supply_window_ms = 24 * hour_ms
jobs_hours = 24
payout_days = 30
top_earners_max = 10


def _is_sol(r: Mapping[str, Any]) -> bool:
    return str(r.get("currency") or "SOL") == "SOL"


def top_earners(pay_rows: list[dict[str, Any]], nodes: list[dict[str, Any]], self_id: str | None) -> list[dict[str, Any]]:
    """Workers by amount paid to them in SOL (paid rows only), largest first."""
    by_peer = {n.get("peer_id"): n for n in nodes}
    sums: dict[str, dict[str, Any]] = {}
    for r in pay_rows:
        if not r.get("paid") or not _is_sol(r):
            continue
        worker = r.get("worker") if r.get("side") == "owed" else self_id
        if not isinstance(worker, str) or not worker:
            continue
        e = sums.setdefault(worker, {"worker": worker, "amount": 0, "payouts": 0,
                                     "payout_address": r.get("payout_address")})
        amount = r.get("amount")
        e["amount"] += amount if isinstance(amount, int) and not isinstance(amount, bool) else 0
        e["payouts"] += 1
    out = []
    for e in sorted(sums.values(), key=lambda e: (-e["amount"], e["worker"]))[:top_earners_max]:
        node = by_peer.get(e["worker"]) or {}
        out.append({**e, "self": e["worker"] == self_id, "region": node.get("region"),
                    "gpus": [f"{g.get('count')}x {g.get('model')}" for g in node.get("gpus") or []]})
    return out


def network_view(series: NetworkSeries, views: Mapping[str, Any], earnings: list[dict[str, Any]] | None,
                 *, now_ms: int, public: bool) -> dict[str, Any]:
    """The ``network`` panel of the API (and the data of every plot)."""
    sup = views["supply"]
    pay_rows = list(views["payouts"]["rows"])
    paid = [r for r in pay_rows if r.get("paid") and _is_sol(r)]
    jobs = series.jobs.points(now_ms, jobs_hours)
    clusters = dict(series.clusters.points(now_ms, jobs_hours))
    amounts = per_bucket(paid, time_key="paid_ms", value_key="amount", now_ms=now_ms, buckets=payout_days)
    counts = dict(per_bucket(paid, time_key="paid_ms", value_key=None, now_ms=now_ms, buckets=payout_days))
    mine = [r for r in earnings or [] if _is_sol(r)]
    earned = per_bucket(mine, time_key="paid_ms", value_key="amount", now_ms=now_ms, buckets=payout_days,
                        where=lambda r: r.get("status") == "paid")
    expected = per_bucket(mine, time_key="created_ms", value_key="amount", now_ms=now_ms, buckets=payout_days,
                          where=lambda r: r.get("status") != "paid")
    return {
        "available": True,
        "since_ms": series.started_ms,
        "gpus_online": {"total": sup["gpus_total"], "free": sup["gpus_free"], "nodes": sup["nodes"],
                        "by_model": [{"model": m["model"], "gpus": m["gpus"]} for m in sup["by_model"]],
                        "by_region": [{"region": r["region"], "gpus": r["gpus"]} for r in sup["by_region"]]},
        "jobs_per_hour": [{"t_ms": t, "jobs": n, "clusters": clusters.get(t, 0)} for t, n in jobs],
        "jobs_seen_24h": sum(n for _, n in jobs),
        "clusters_24h": sum(clusters.values()),
        "payouts_per_day": [{"t_ms": t, "amount": a, "count": counts.get(t, 0)} for t, a in amounts],
        "paid_30d": sum(a for _, a in amounts),
        "top_earners": top_earners(pay_rows, views["nodes"]["rows"], views["summary"].get("peer_id")),
        "earnings": [{"t_ms": t, "paid": a, **({} if public else {"expected": e})}
                     for (t, a), (_, e) in zip(earned, expected, strict=True)],
        "currency": "SOL",
        "plots": list(PLOTS),
    }


def plot_svg(name: str, net: Mapping[str, Any], series: NetworkSeries, *, now_ms: int) -> str:
    """One plot of the network view, as SVG; ``KeyError`` for an unknown name."""
    if name == "gpus_by_model":
        s = series.gpus_by_model
        return _plots.line_chart("GPUs online by model (24 h)", [(k, s.points(k)) for k in s.labels()],
                                 now_ms=now_ms, window_ms=supply_window_ms)
    if name == "gpus_by_region":
        s = series.gpus_by_region
        return _plots.line_chart("GPUs online by region (24 h)", [(k, s.points(k)) for k in s.labels()],
                                 now_ms=now_ms, window_ms=supply_window_ms)
    if name == "jobs_per_hour":
        return _plots.bar_chart("Jobs seen per hour (24 h)", [(p["t_ms"], p["jobs"]) for p in net["jobs_per_hour"]],
                                bucket_ms=hour_ms, empty="no job seen yet")
    if name == "payouts_per_day":
        pts = [(p["t_ms"], float(p["amount"])) for p in net["payouts_per_day"]]
        div, unit = _plots.lamport_scale(max((v for _, v in pts), default=0))
        return _plots.bar_chart(f"Payouts per day (30 days, {unit})", [(t, v / div) for t, v in pts],
                                bucket_ms=day_ms, fmt=_unit_fmt(unit), empty="no payout settled yet",
                                integer=unit == "lamports")
    if name == "top_earners":
        rows = [(e["worker"][:8] + "… " + (e.get("region") or ""), float(e["amount"])) for e in net["top_earners"]]
        return _plots.hbar_chart("Top earners (paid)", rows, fmt=_plots.fmt_lamports, empty="nobody paid yet")
    if name == "earnings":
        pts = net["earnings"]
        lines: list[tuple[str, list[tuple[int, float]]]] = [("paid", _cumulative([(p["t_ms"], p["paid"]) for p in pts]))]
        if pts and "expected" in pts[0]:
            lines.append(("expected", _cumulative([(p["t_ms"], p["expected"]) for p in pts])))
        top = max((v for _, line in lines for _, v in line), default=0)
        if not top:
            lines = []
        div, unit = _plots.lamport_scale(top)
        lines = [(label, [(t, v / div) for t, v in line]) for label, line in lines]
        return _plots.line_chart(f"This operator's earnings (cumulative, 30 days, {unit})", lines, now_ms=now_ms,
                                 window_ms=payout_days * day_ms, fmt=_unit_fmt(unit), empty="nothing earned yet",
                                 integer=unit == "lamports")
    raise KeyError(name)


def _unit_fmt(unit: str) -> _plots.Fmt:
    return lambda v: f"{_plots.compact(v)} {unit}"


def _cumulative(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    total = 0.0
    out = []
    for t, v in points:
        total += v
        out.append((t, total))
    return out
