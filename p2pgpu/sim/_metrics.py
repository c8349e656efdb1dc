"""What a run measures, and how it is written: JSON, CSV and PNG plots.

Counters are flat lists and histograms are dicts of integer milliseconds, so
recording a delivery costs a few dictionary operations even at 100,000
nodes.  Percentiles are read from the histograms at the end.  Plots use
matplotlib's Agg backend (no display), imported only when plots are written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._gossip import Msg
    from ._world import World


def hist_pct(hist: dict[int, int], p: float) -> float | None:
    total = sum(hist.values())
    if total == 0:
        return None
    rank = p / 100 * total
    seen = 0
    for k in sorted(hist):
        seen += hist[k]
        if seen >= rank:
            return float(k)
    return float(max(hist))


def pct(vals: list[float], p: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class Metrics:
    def __init__(self, world: World) -> None:
        self.world = world
        self.latency_ms: dict[str, dict[int, int]] = {}
        self.deliveries = 0
        self.rejections: dict[str, int] = {}
        self.series: list[dict[str, Any]] = []
        self._last_deliveries = 0
        self._last_bytes = 0
        #: (msg, nodes up when it was published) for honest adverts, for the delivery ratio
        self.tracked: list[tuple[Msg, int]] = []

    def on_delivery(self, node: int, msg: Msg) -> None:
        self.deliveries += 1
        h = self.latency_ms.get(msg.topic)
        if h is None:
            h = self.latency_ms[msg.topic] = {}
        ms = (self.world.engine.now_us - msg.t0_us) // 1000
        h[ms] = h.get(ms, 0) + 1

    def track(self, msg: Msg) -> None:
        self.tracked.append((msg, self._live))

    @property
    def _live(self) -> int:
        return self.world.net.live

    def sample(self) -> None:
        w = self.world
        b = sum(w.net.bytes_out)
        books = [len(w.nodes[i].book.adverts) for i in w.book_nodes if w.nodes[i].book is not None]  # type: ignore[union-attr]
        self.series.append({
            "t_s": w.engine.now_us // 1_000_000,
            "live_nodes": self._live,
            "deliveries": self.deliveries - self._last_deliveries,
            "bytes_out": b - self._last_bytes,
            "book_adverts_mean": round(sum(books) / len(books), 1) if books else 0,
            "jobs_running": w.jobs.running_count(),
            "violations": len(w.checker.violations),
        })
        self._last_deliveries = self.deliveries
        self._last_bytes = b

    def summary(self) -> dict[str, Any]:
        w = self.world
        n = w.n
        adv = self.latency_ms.get("/p2pgpu/adverts/1", {})
        ratios = [min(1.0, (m.delivered - 1) / max(1, live - 1)) for m, live in self.tracked
                  if m.t0_us < w.quiet_us]
        eng = w.engine
        sim_s = eng.now_us / 1e6
        wall = getattr(w, "wall_s", 0.0) or 1e-9
        out: dict[str, Any] = {
            "scenario": w.scenario.run.name,
            "nodes": n,
            "sim_s": round(sim_s, 3),
            "wall_s": round(wall, 3),
            "speed_x_real_time": round(sim_s / wall, 2),
            "events": eng.events_run,
            "events_per_s": int(eng.events_run / wall),
            "adverts_published": len(self.tracked),
            "advert_propagation_ms_p50": hist_pct(adv, 50),
            "advert_propagation_ms_p90": hist_pct(adv, 90),
            "advert_propagation_ms_p99": hist_pct(adv, 99),
            "advert_delivery_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None,
            "duplicates_per_node_mean": round(sum(w.gossip.dups) / n, 2),
            "bytes_out_per_node_mean": int(sum(w.net.bytes_out) / n),
            "bytes_in_per_node_mean": int(sum(w.net.bytes_in) / n),
            "bytes_out_per_node_max": max(w.net.bytes_out),
            "messages_dropped": dict(w.net.dropped),
            "iwant_served": w.gossip.iwant_served,
            "advert_rejections": dict(sorted(self.rejections.items())),
            "churn_departures": w.churn.departures,
            "churn_state_losses": w.churn.state_losses,
        }
        if w.kad is not None:
            out.update(w.kad.stats())
        out.update(w.jobs.stats())
        adversaries: dict[str, int] = {}
        for a in w.adversaries:  # every [[adversary]] section counts, two of one kind included
            adversaries[a.kind] = adversaries.get(a.kind, 0) + len(a.nodes)
        out["adversaries"] = adversaries
        out["start_without_reserved"] = w.checker.start_without_reserved
        out["overpaid_to_adversaries_lamports"] = w.checker.overpaid_lamports
        out["invariant_violations"] = len(w.checker.violations)
        out["invariants_checked"] = w.checker.checks
        if w.checker.violations:
            out["first_violation"] = w.checker.violations[0]
        return out

    # -- writing ------------------------------------------------------------------------------
    def write(self, out_dir: Path, summary: dict[str, Any], *, plots: bool = True) -> list[str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        doc = {"summary": summary, "series": self.series,
               "latency_ms_histograms": {t: {str(k): v for k, v in sorted(h.items())}
                                         for t, h in sorted(self.latency_ms.items())},
               "dht_lookups": self._lookups(), "formation_latency_ms": self.world.jobs.formation_ms}
        (out_dir / "metrics.json").write_text(json.dumps(doc, indent=1, default=str))
        written.append("metrics.json")
        with open(out_dir / "summary.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["metric", "value"])
            for k, v in summary.items():
                wr.writerow([k, json.dumps(v) if isinstance(v, (dict, list)) else v])
        written.append("summary.csv")
        if self.series:
            with open(out_dir / "series.csv", "w", newline="") as f:
                wr2 = csv.DictWriter(f, fieldnames=list(self.series[0]))
                wr2.writeheader()
                wr2.writerows(self.series)
            written.append("series.csv")
        if plots:
            written += self._plots(out_dir)
        return written

    def _lookups(self) -> list[dict[str, Any]]:
        kad = self.world.kad
        if kad is None:
            return []
        return [{"hops": lk.hops, "latency_ms": (lk.finished_us - lk.started_us) / 1000, "found": lk.found,
                 "rpcs": lk.rpcs, "timeouts": lk.timeouts} for lk in kad.finished]

    def _plots(self, out_dir: Path) -> list[str]:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        name = self.world.scenario.run.name
        fig, ax = plt.subplots(figsize=(6, 4))
        for topic, h in sorted(self.latency_ms.items()):
            xs = sorted(h)
            total = sum(h.values())
            acc, ys = 0, []
            for x in xs:
                acc += h[x]
                ys.append(acc / total)
            ax.plot(xs, ys, label=topic)
        ax.set_xlabel("propagation latency (ms)")
        ax.set_ylabel("share of deliveries")
        ax.set_title(f"{name}: propagation CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "propagation_cdf.png", dpi=100)
        plt.close(fig)
        written.append("propagation_cdf.png")
        if self.series:
            fig, ax1 = plt.subplots(figsize=(6, 4))
            t = [r["t_s"] for r in self.series]
            ax1.plot(t, [r["live_nodes"] for r in self.series], color="tab:blue", label="live nodes")
            ax1.set_xlabel("simulated time (s)")
            ax1.set_ylabel("live nodes", color="tab:blue")
            ax2 = ax1.twinx()
            ax2.plot(t, [r["deliveries"] for r in self.series], color="tab:orange", label="deliveries/s")
            ax2.set_ylabel("deliveries per second", color="tab:orange")
            ax1.set_title(f"{name}: network over time")
            fig.tight_layout()
            fig.savefig(out_dir / "timeseries.png", dpi=100)
            plt.close(fig)
            written.append("timeseries.png")
        lookups = self._lookups()
        if lookups:
            fig, ax = plt.subplots(figsize=(6, 4))
            hops = [lk["hops"] for lk in lookups]
            ax.hist(hops, bins=range(max(hops) + 2), align="left", rwidth=0.8)
            ax.set_xlabel("lookup hops")
            ax.set_ylabel("lookups")
            ax.set_title(f"{name}: Kademlia lookup hops")
            fig.tight_layout()
            fig.savefig(out_dir / "dht_hops.png", dpi=100)
            plt.close(fig)
            written.append("dht_hops.png")
        fms = self.world.jobs.formation_ms
        if fms:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(fms, bins=30)
            ax.set_xlabel("formation latency (ms)")
            ax.set_ylabel("jobs")
            ax.set_title(f"{name}: cluster formation latency")
            fig.tight_layout()
            fig.savefig(out_dir / "formation_latency.png", dpi=100)
            plt.close(fig)
            written.append("formation_latency.png")
        return written
