"""Pay as you go in the simulator (#16): the hosts run the installments core,
the submitter's payer pays each interval with a notice, and the workers of a
submitter that never pays stop within one interval plus the claim delay and
the grace (the ``unpaid-exposure`` invariant)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pgpu.sim import load_scenario, run_scenario, scenario_from_obj

SCENARIO = Path(__file__).resolve().parents[2] / "simulations" / "pay-as-you-go.toml"
SMALL: dict[str, Any] = {
    "run": {"nodes": 30, "duration_s": 120, "settle_s": 30},
    "jobs": {"submitters": 3, "rate_per_s": 0.3, "duration_s": 50, "nodes_choices": [1, 2], "interval_s": 10,
             "payment_grace_s": 15},
    "adversary": [{"kind": "never_pay", "count": 1}],
}


def _run(obj: dict[str, Any], seed: int = 7, **kw: Any) -> Any:
    return run_scenario(scenario_from_obj(obj), seed, plots=False, **kw)


def test_workers_of_a_submitter_that_never_pays_stop_within_the_bound() -> None:
    r = _run(SMALL)
    s = r.summary
    assert r.ok, r.violations
    assert s["installments_paid"] > 0 and s["installments_owed"] > s["installments_paid"]
    assert s["unpaid_stops"] > 0
    assert 0 < s["unpaid_exposure_ms_max"] <= s["unpaid_exposure_bound_ms"] == 10_000 + 2_000 + 15_000
    assert s["jobs_completed"] > 0  # honest submitters' jobs run to the end, paid as they go


def test_the_exposure_invariant_catches_a_member_that_waits_past_its_grace() -> None:
    broken = _run(SMALL, mutation="late_unpaid_stop")
    assert broken.violations and broken.violations[0]["invariant"] == "unpaid-exposure", broken.violations[:1]


def test_without_an_interval_nothing_is_paid_as_it_goes() -> None:
    r = _run({**SMALL, "jobs": {**SMALL["jobs"], "interval_s": 0}})
    assert r.ok, r.violations
    assert "installments_owed" not in r.summary and r.summary["jobs_completed"] > 0


def test_the_shipped_scenario_parses_and_pays_as_it_goes() -> None:
    sc = load_scenario(SCENARIO)
    assert sc.jobs.interval_s == 10 and sc.jobs.payment_grace_s == 15


def test_no_member_of_an_honest_submitter_stops_for_want_of_payment() -> None:
    """Found by this scenario: seed 2, a member whose part ended sent no more
    co-signatures, so its peer's later intervals were never observed nor paid;
    seed 5, a submitter serving its own job never told itself it had paid.
    Both stopped honest members after the grace."""
    for seed in (2, 5):
        r = run_scenario(load_scenario(SCENARIO), seed, plots=False)
        assert r.ok, r.violations
        flow = r.world.jobs
        stops = list(flow.payg.exposure_ms)
        honest = [(jid, m) for jid, m in stops if r.world.nodes[flow.jobs[jid].submitter].adversary is None]
        assert stops and honest == [], honest
