"""The explorer's views as tables: raw daemon answers in, JSON API documents out."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from p2pgpu.explorer import Collector, Raw, build_views
from p2pgpu.explorer._metrics import registry_for, render
from p2pgpu.explorer._views import clean_raw, clusters, job_states, payouts, supply


def advert(peer: str, region: str, gpus: list[tuple[str, int, int]], free: int, price: int = 100) -> dict[str, Any]:
    return {"peer_id": peer, "region": region, "gpus_free": free, "price": price, "currency": "SOL",
            "gpus": [{"model": m, "memory_mb": mb, "count": n} for m, mb, n in gpus], "simulated": True}


MARKET = [
    advert("A", "eu", [("H100", 81559, 8)], 6, price=300),
    advert("B", "us", [("H100", 81559, 4), ("L4", 23034, 1)], 5, price=200),
    advert("C", "eu", [("H100", 81559, 2)], 0, price=100),
]


def test_supply_by_model_and_region() -> None:
    s = supply(MARKET)
    assert [(r["model"], r["region"], r["gpus"], r["nodes"]) for r in s["rows"]] == [
        ("H100", "eu", 10, 2), ("H100", "us", 4, 1), ("L4", "us", 1, 1)]
    assert s["rows"][0]["price_min"] == 100 and s["rows"][0]["price_max"] == 300
    assert [(m["model"], m["gpus"], m["regions"]) for m in s["by_model"]] == [
        ("H100", 14, {"eu": 10, "us": 4}), ("L4", 1, {"us": 1})]
    assert [(r["region"], r["gpus"]) for r in s["by_region"]] == [("eu", 10), ("us", 5)]
    assert (s["gpus_total"], s["gpus_free"], s["nodes"]) == (15, 11, 3)
    assert supply([])["gpus_total"] == 0 and supply([{"gpus": ["junk", {"model": "X"}]}])["gpus_total"] == 1


JOBS = [
    {"job_id": "j1", "state": "confirmed", "name": "hello", "timings": {"seen_at_ms": 1, "formation_ms": 90},
     "cluster": {"members": ["A"], "certificate_hash": "aa" * 32}},
    {"job_id": "j2", "state": "forming", "timings": {"seen_at_ms": 2}, "cluster": {"members": [],
                                                                                   "certificate_hash": ""}},
    {"job_id": "j3", "state": "failed"},
]


def test_clusters_are_certified_jobs_only() -> None:
    assert [(c["job_id"], c["members"], c["formation_ms"]) for c in clusters(JOBS)] == [("j1", ["A"], 90)]
    assert job_states(JOBS, None) == {"confirmed": 1, "failed": 1, "forming": 1}
    assert job_states(None, {"jobs": {"running": 2}}) == {"running": 2}
    assert job_states(None, None) == {}


def test_paid_needs_a_transaction() -> None:
    rows = payouts(
        [{"proof_hash": "p1", "status": "paid", "tx_signature": "SIG", "amount": 5, "currency": "SOL"},
         {"proof_hash": "p2", "status": "owed", "tx_signature": None, "amount": 7},
         {"proof_hash": "p3", "status": "paid", "tx_signature": None, "amount": 9}],
        [{"proof_hash": "p1", "status": "paid", "tx_signature": "SIG"},
         {"proof_hash": "p4", "status": "paid", "tx_signature": "SIG2", "amount": 3}])
    assert [(r["proof_hash"], r["side"], r["paid"]) for r in rows] == [
        ("p1", "owed", True), ("p2", "owed", False), ("p3", "owed", False), ("p4", "earned", True)]


def test_missing_methods_leave_panels_unavailable() -> None:
    v = build_views(Raw(status={"peer_id": "A", "peers": 2, "jobs": {}}, market=MARKET, missing=["proofs"]),
                    now_ms=5, version=1)
    assert v["supply"]["available"] and v["nodes"]["available"]
    assert v["proofs"] == {"available": False, "missing_methods": ["proofs"], "rows": []}
    assert v["jobs"]["available"] is False and v["summary"]["gpus_total"] == 15
    assert [n["self"] for n in v["nodes"]["rows"]] == [True, False, False]
    down = build_views(Raw(errors={"status": "no daemon"}), now_ms=5, version=2)
    assert down["daemon_up"] is False and down["summary"]["nodes"] == 0 and down["errors"] == {"status": "no daemon"}


def test_summary_totals_only_paid_amounts() -> None:
    raw = Raw(status={"peer_id": "A"}, market=[], jobs=JOBS, proofs=[{"proof_hash": "p1"}, {"proof_hash": "p2"}],
              payouts=[{"proof_hash": "p1", "status": "paid", "tx_signature": "S", "amount": 5, "currency": "SOL",
                        "job_id": "j1"},
                       {"proof_hash": "p2", "status": "owed", "amount": 7, "currency": "SOL", "job_id": "j1"}])
    v = build_views(raw, now_ms=0, version=0)
    assert v["summary"]["paid_total"] == {"SOL": 5} and v["summary"]["payouts_paid"] == 1
    assert [(p["proof_hash"], p["paid"], p["tx_signature"]) for p in v["proofs"]["rows"]] == [
        ("p1", True, "S"), ("p2", False, None)]
    assert v["summary"]["clusters"] == 1 and v["summary"]["jobs"]["confirmed"] == 1
    assert [(j["job_id"], j["payouts_paid"], j["payouts_total"]) for j in v["jobs"]["rows"]] == [
        ("j2", 0, 0), ("j1", 1, 2), ("j3", 0, 0)]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
KEYS = ["peer_id", "region", "gpus", "gpus_free", "price", "currency", "model", "memory_mb", "count", "job_id",
        "state", "cluster", "members", "certificate_hash", "timings", "seen_at_ms", "formation_ms", "proof_hash",
        "status", "tx_signature", "amount", "proofs", "payouts", "latency_ms", "rejections", "jobs"]
ROW = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=8)
ROWS = st.none() | st.lists(ROW, max_size=4)


@settings(max_examples=300, deadline=None)
@given(status=st.none() | ROW, peers=ROWS, market=ROWS, jobs=ROWS, proofs=ROWS, pays=ROWS, earnings=ROWS)
def test_any_daemon_answer_gives_views_never_an_exception(status: Any, peers: Any, market: Any, jobs: Any,
                                                          proofs: Any, pays: Any, earnings: Any) -> None:
    """Whatever shapes a daemon answers with, the views are built (unknown shapes become empty or None)."""
    raw = Raw(status=status, peers=peers, market=market, jobs=jobs, proofs=proofs, payouts=pays, earnings=earnings)
    v = build_views(raw, now_ms=0, version=0)
    json.dumps(v)
    assert v["summary"]["gpus_total"] >= 0


@settings(max_examples=200, deadline=None)
@given(status=st.none() | ROW, peers=ROWS, market=ROWS, jobs=ROWS, pays=ROWS)
def test_any_daemon_answer_gives_parseable_metrics(status: Any, peers: Any, market: Any, jobs: Any,
                                                   pays: Any) -> None:
    collector = Collector(None, now_ms=lambda: 0)  # type: ignore[arg-type]  # never polled here
    collector.raw = clean_raw(Raw(status=status, peers=peers, market=market, jobs=jobs, payouts=pays))
    collector.views = build_views(collector.raw, now_ms=0, version=1)
    text = render(registry_for(collector)).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"p2pgpu_up", "p2pgpu_supply_gpus", "p2pgpu_jobs"} <= names
