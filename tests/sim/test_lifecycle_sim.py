"""The simulator runs the node's whole job lifecycle (#13): membership over
the modelled links, settlement, the new invariants, and the bugs its own
copy of the lifecycle hid."""

from __future__ import annotations

from typing import Any

import pytest

from p2pgpu.sim import run_scenario, scenario_from_obj


def _run(obj: dict[str, Any], seed: int = 1, **kw: Any) -> Any:
    return run_scenario(scenario_from_obj(obj), seed, plots=False, **kw)


SKEWED = {"run": {"nodes": 40, "duration_s": 20, "settle_s": 5},
          "adverts": {"refresh_s": 5, "ttl_s": 30, "books": "all"}, "churn": {"clock_skew_ms": 30_000}}


def test_clocks_start_at_a_wall_clock_epoch_so_no_honest_advert_is_refused() -> None:
    """Node clocks started at 0 ms: a node skewed back signed a negative
    ``issued_at_ms``, every peer refused it as BAD_SCHEMA and penalised the
    honest nodes that forwarded it.  ``start_epoch_ms = 0`` still shows it."""
    old = _run({**SKEWED, "run": {**SKEWED["run"], "start_epoch_ms": 0}}, seed=3)
    assert old.summary["advert_rejections"].get("BAD_SCHEMA", 0) > 0
    assert old.violations and old.violations[0]["invariant"] == "penalised-honest"
    now = _run(SKEWED, seed=3)
    assert now.ok and "BAD_SCHEMA" not in now.summary["advert_rejections"]
    assert now.world.node_now_ms(0) > 1_700_000_000_000


CHURN = {"run": {"nodes": 120, "duration_s": 150, "settle_s": 30},
         "adverts": {"refresh_s": 30, "ttl_s": 90},
         "churn": {"fraction": 0.3, "session": "exponential", "session_mean_s": 60, "downtime_mean_s": 30},
         "jobs": {"submitters": 3, "rate_per_s": 0.5, "duration_s": 20, "nodes_choices": [2, 4]}}


def test_under_churn_members_lost_is_what_the_churn_model_took_down() -> None:
    """``members_lost`` was 0 under 30 % churn: membership never ran.  Now each
    member that went down mid-run while another member still ran is
    reported lost by the others, and nobody else is."""
    r = _run(CHURN, seed=2)
    s = r.summary
    assert r.ok, r.violations
    expected = r.world.checker.lost_expected
    assert s["members_lost"] > 0 and s["members_down_while_running"] >= s["members_lost"]
    assert sorted(r.world.jobs.lost_pairs) == sorted(expected)
    assert s["formation_emitted"].get("membership_members_lost", 0) >= s["members_lost"]


def test_two_sections_of_one_adversary_kind_are_both_counted() -> None:
    r = _run({"run": {"nodes": 30, "duration_s": 10, "settle_s": 2},
              "adversary": [{"kind": "never_accept", "count": 2}, {"kind": "never_accept", "count": 3}]})
    assert r.summary["adversaries"] == {"never_accept": 5}


JOBS = {"run": {"nodes": 30, "duration_s": 90, "settle_s": 20}, "adverts": {"refresh_s": 60, "ttl_s": 180},
        "jobs": {"submitters": 2, "rate_per_s": 0.3, "duration_s": 7, "nodes_choices": [2]}}


@pytest.mark.parametrize(("mutation", "extra", "invariant"), [
    # A driver that stamps a member's start after its setup under-claims: the
    # member is owed less than its time served.
    ("late_start_stamp", {}, "owed-time"),
    # The 5 s absolute tolerance of #13 pays an inflater beyond what was observed.
    ("absolute_tolerance", {"adversary": [{"kind": "inflate_gpu_seconds", "fraction": 0.5,
                                           "params": {"mode": "duration", "factor": 1.4}}]}, "over-observed"),
])
def test_the_new_invariants_catch_what_they_guard(mutation: str, extra: dict[str, Any], invariant: str) -> None:
    honest = _run({**JOBS, **extra})
    assert honest.ok, honest.violations
    broken = _run({**JOBS, **extra}, mutation=mutation)
    assert broken.violations and broken.violations[0]["invariant"] == invariant, broken.violations[:1]


def test_honest_members_are_owed_their_time_in_failed_jobs_too() -> None:
    """In the simulator 15 % of honest member-jobs (all in failed jobs) went
    unpaid and no invariant noticed.  Every job here fails (a member of each
    is taken down mid-run): the survivors are owed exactly their time."""
    r = _run({**CHURN, "churn": {**CHURN["churn"], "fraction": 0.6, "session_mean_s": 20}}, seed=5)
    s = r.summary
    assert r.ok, r.violations
    assert s["jobs_failed"] > 0 and s["owed_unpaid_lamports"] == 0
    failed = [j for j in r.world.jobs.jobs.values() if j.settled is not None and not j.settled.succeeded]
    owed = [ln for j in failed for ln in j.settled.lines if ln.payable]
    assert owed, "survivors of failed jobs are owed their time"
