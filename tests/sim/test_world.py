"""Runs of small worlds: the models do what they claim, the checkers catch breakage."""

from __future__ import annotations

from typing import Any

import pytest

from p2pgpu.sim import ScenarioError, run_scenario, scenario_from_obj


def _run(obj: dict[str, Any], seed: int = 1, **kw: Any) -> Any:
    return run_scenario(scenario_from_obj(obj), seed, **kw)


def test_static_network_delivers_every_advert_to_every_node() -> None:
    r = _run({"run": {"nodes": 60, "duration_s": 30, "settle_s": 5}, "network": {"latency": "uniform"},
              "adverts": {"refresh_s": 10, "ttl_s": 30, "books": "all"}})
    s = r.summary
    assert r.ok
    assert s["advert_delivery_ratio"] == 1.0
    assert s["advert_propagation_ms_p50"] >= 25  # at least one 25 ms hop
    assert s["signature_verifies_real"] < s["signature_verifies_cached"]
    # every node's real AdvertBook holds every other node's advert
    w = r.world
    assert all(len(w.nodes[i].book.adverts) == 60 for i in range(60))


def test_partition_splits_then_heals() -> None:
    base = {"run": {"nodes": 80, "duration_s": 70, "settle_s": 5},
            "adverts": {"refresh_s": 8, "ttl_s": 24}, "network": {"detect_ms": 1000, "discovery_s": 2}}
    whole = _run(base).summary["advert_delivery_ratio"]
    cut = _run({**base, "partition": [{"at_s": 10, "heal_s": 40, "split": "fraction:0.5"}]})
    series = cut.summary
    assert series["messages_dropped"]["partition"] > 0
    assert series["advert_delivery_ratio"] < whole
    # after healing, adverts published late reach everyone again
    late = [m for m, _ in cut.world.metrics.tracked if m.t0_us > 55_000_000 and m.t0_us < 64_000_000]
    assert late and all(m.delivered == 80 for m in late)


def test_kademlia_lookups_find_their_target_in_few_hops() -> None:
    r = _run({"run": {"nodes": 2000, "duration_s": 20, "settle_s": 2}, "kademlia": {"lookups_per_s": 5},
              "adverts": {"real_fraction": 0.0, "publish": False}})
    s = r.summary
    assert s["dht_lookups"] >= 50
    assert s["dht_success_ratio"] == 1.0
    assert 1 <= s["dht_hops_mean"] <= 4
    assert s["dht_latency_ms_p50"] > 0


def test_churn_and_state_loss_happen() -> None:
    r = _run({"run": {"nodes": 50, "duration_s": 60, "settle_s": 5},
              "churn": {"fraction": 0.5, "session_mean_s": 10, "downtime_mean_s": 5, "state_loss_pct": 100}})
    assert r.ok
    assert r.summary["churn_departures"] > 10
    assert r.summary["churn_state_losses"] == r.summary["churn_departures"]


def test_jobs_form_run_and_are_paid() -> None:
    r = _run({"run": {"nodes": 40, "duration_s": 60, "settle_s": 15},
              "jobs": {"submitters": 2, "rate_per_s": 0.5, "duration_s": 5, "nodes_choices": [1, 2]}})
    s = r.summary
    assert r.ok
    assert s["jobs_completed"] >= 5
    assert s["payouts"] >= s["jobs_completed"]
    assert s["owed_unpaid_lamports"] == 0


_CONTENDED = {"run": {"nodes": 12, "duration_s": 60, "settle_s": 15},
              "adverts": {"gpu_catalog": [{"model": "NVIDIA GeForce RTX 4090", "memory_mb": 24564,
                                           "compute_capability": "8.9", "count": [1], "price": 400000}]},
              "jobs": {"submitters": 3, "rate_per_s": 3.0, "duration_s": 8, "nodes_choices": [2, 3]}}


def test_honest_run_of_the_contended_world_is_clean() -> None:
    assert _run(_CONTENDED).ok


@pytest.mark.parametrize(("mutation", "invariant"), [("overcommit", "capacity"), ("double_pay", "paid-once")])
def test_a_deliberately_broken_invariant_is_caught(mutation: str, invariant: str) -> None:
    r = _run(_CONTENDED, mutation=mutation)
    assert r.violations, f"mutation {mutation} went unnoticed"
    assert r.violations[0]["invariant"] == invariant
    assert "stopped" in r.summary  # the run stops at the first violation


def test_adversaries_have_effects() -> None:
    r = _run({"run": {"nodes": 60, "duration_s": 60, "settle_s": 15},
              "jobs": {"submitters": 3, "rate_per_s": 1.0, "duration_s": 5},
              "adversary": [{"kind": "advert_spam", "count": 1, "params": {"rate_per_s": 5.0, "valid": False}},
                            {"kind": "inflate_gpu_seconds", "fraction": 0.2},
                            {"kind": "silent_leader", "fraction": 0.3},
                            {"kind": "lying_leader", "count": 1}]})
    s = r.summary
    assert r.ok
    assert s["advert_rejections"].get("BAD_SIGNATURE", 0) > 0
    assert s["proofs_rejected"] > 0
    assert s["formation_emitted"].get("formation.view_change", 0) > 0  # silent leaders were replaced
    assert s["jobs_formed"] > 0
    assert [a["kind"] for a in s["adversaries_inactive"]] == ["lying_leader"]


def test_unknown_adversary_is_refused() -> None:
    with pytest.raises(ScenarioError, match="unknown 'x'"):
        _run({"run": {"nodes": 5, "duration_s": 5, "settle_s": 1}, "adversary": [{"kind": "x"}]})


@pytest.mark.parametrize(("nodes", "faults"), [(1, {"OVER_WINDOW"}), (2, {"OVER_WINDOW", "OVER_OBSERVED"})])
def test_duration_inflation_is_caught_for_every_cluster_size(nodes: int, faults: set[str]) -> None:
    """A member that claims it started earlier is refused: by the submitter's
    own window (confirmation to the proof's arrival) whatever the cluster
    size, and by the other members' co-signatures.  One-member clusters used
    to pay the lie (#12.3: nothing but co-signers bounded a claim)."""
    r = _run({"run": {"nodes": 30, "duration_s": 120, "settle_s": 20}, "adverts": {"refresh_s": 60, "ttl_s": 180},
              "jobs": {"submitters": 2, "rate_per_s": 0.3, "duration_s": 30, "nodes_choices": [nodes]},
              "adversary": [{"kind": "inflate_gpu_seconds", "fraction": 0.5,
                             "params": {"mode": "duration", "factor": 3.0}}]})
    s = r.summary
    assert r.ok
    assert s["jobs_formed"] > 3
    assert set(s["proof_faults"]) <= faults and sum(s["proof_faults"].values()) > 0, s["proof_faults"]
    assert s["overpaid_to_adversaries_lamports"] == 0
