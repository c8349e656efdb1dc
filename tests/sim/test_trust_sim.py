"""The trust adversaries in the simulator (#16): GPU liars refused by the
submitters' hardware challenges (the core's ``make_challenge``, ``judge`` and
``ClaimBook``, sim/_trust.py), receipt forgers whose receipts reputation
refuses (the core's receipts and ``compute_reputation``, sim/_receipts.py),
and the workers' exposure to a submitter that never pays (sim/_payg.py), in
one run of ``simulations/trust.toml``'s kind.

Each check fails when the adversary goes undetected: the mutation
``challenge_blind`` (a challenger that records every answer as passed)
leaves every liar believed, ``forgery_blind`` (a verifier that believes every
cited payment) lets the forgers gain, and the checks say so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pgpu.sim import load_scenario, run_scenario, scenario_from_obj

SCENARIO = Path(__file__).resolve().parents[2] / "simulations" / "trust.toml"
SMALL: dict[str, Any] = {
    "run": {"nodes": 40, "duration_s": 120, "settle_s": 30},
    "jobs": {"submitters": 3, "rate_per_s": 0.4, "duration_s": 40, "nodes_choices": [1, 2], "interval_s": 10,
             "payment_grace_s": 15, "challenge_every_s": 5},
    "adversary": [{"kind": "gpu_liar", "count": 3}, {"kind": "fake_capability", "count": 1},
                  {"kind": "never_pay", "count": 1}, {"kind": "receipt_forger", "count": 2}],
}


def _run(obj: dict[str, Any], seed: int = 7, **kw: Any) -> Any:
    return run_scenario(scenario_from_obj(obj), seed, plots=False, **kw)


def _detected(s: dict[str, Any]) -> None:
    """What a run that catches its liars shows."""
    assert s["gpu_liars"] == 4 and s["gpu_liars_refused"] == s["gpu_liars"], s
    assert s["challenge_outcomes"].get("late", 0) >= s["gpu_liars"]
    # Refused within the run, and nobody honest refused.
    assert 0 < s["gpu_liar_first_refusal_s_max"] < 120 and s["honest_claims_refused"] == 0


@pytest.fixture(scope="module")
def honest_run() -> Any:
    return _run(SMALL)


def test_gpu_liars_are_refused_and_honest_claims_pass(honest_run: Any) -> None:
    r = honest_run
    assert r.ok, r.violations
    _detected(r.summary)
    assert r.summary["challenge_outcomes"]["passed"] > 0


def test_a_blind_challenger_lets_every_liar_through() -> None:
    """The detection check above fails when challenges do not look."""
    r = _run(SMALL, mutation="challenge_blind")
    s = r.summary
    assert s["gpu_liars_refused"] == 0 and "late" not in s["challenge_outcomes"]
    with pytest.raises(AssertionError):
        _detected(s)


def test_a_refused_liar_is_out_of_its_submitters_candidates(honest_run: Any) -> None:
    """After the refusal the submitter's matching no longer sees the liar's
    GPUs: it is not among the candidates of that submitter's later jobs."""
    w = honest_run.world
    ch = w.jobs.challenges
    liars = [i for a in w.adversaries if a.lies_about_gpu for i in a.nodes]
    refused_pairs = [(s, i) for s in w.jobs.submitters for i in liars if ch.refused(s, i)]
    assert refused_pairs
    for s, i in refused_pairs:
        adv = w.nodes[i].advert
        assert adv is not None
        (seen,) = ch.view(s, [adv])
        assert seen.gpus == () and seen.gpus_free == 0


#: Many liars among few nodes: before #16.1 a refused liar won jobs in every
#: seed of this (its submitter refused its claim, but it volunteered on its own
#: rank and the leader and the submitter took it).
LIARS: dict[str, Any] = {**SMALL, "run": {**SMALL["run"], "nodes": 30},
                         "adversary": [{**SMALL["adversary"][0], "count": 8}, *SMALL["adversary"][1:]]}


def _liars_win_nothing_after_refusal(runs: list[Any]) -> None:
    for r in runs:
        assert r.ok, r.violations
        assert r.summary["gpu_liar_jobs_after_refusal"] == 0, r.summary
    # Not vacuous: liars were refused, and won jobs until then.
    assert sum(r.summary["gpu_liars_refused"] for r in runs) > 0
    assert sum(r.summary["gpu_liar_jobs_before_refusal"] for r in runs) > 0


def test_a_refused_gpu_liar_wins_no_job_after_its_refusal() -> None:
    """#16.1: the submitter's verdicts reach its formation cores
    (``Host(claims=)``): it confirms no certificate naming a liar it refused,
    and proposes none when it leads."""
    _liars_win_nothing_after_refusal([_run(LIARS, seed) for seed in (1, 2, 3)])


def test_formation_blind_to_verdicts_lets_refused_liars_win() -> None:
    """The check above fails when the cores get no verdicts (mutation
    ``claims_ignored``: formation as it was before #16.1)."""
    runs = [_run(LIARS, seed, mutation="claims_ignored") for seed in (1, 2, 3)]
    assert sum(r.summary["gpu_liar_jobs_after_refusal"] for r in runs) > 0
    with pytest.raises(AssertionError):
        _liars_win_nothing_after_refusal(runs)


def test_workers_exposure_to_a_never_paying_submitter_is_bounded(honest_run: Any) -> None:
    s = honest_run.summary
    assert s["unpaid_stops"] > 0 and 0 < s["unpaid_exposure_ms_max"] <= s["unpaid_exposure_bound_ms"]


def test_without_challenges_nothing_is_challenged() -> None:
    r = _run({**SMALL, "jobs": {**SMALL["jobs"], "challenge_every_s": 0}})
    assert r.ok and "challenges_issued" not in r.summary


def test_the_shipped_scenario_parses() -> None:
    sc = load_scenario(SCENARIO)
    assert sc.jobs.challenge_every_s == 5 and {a.kind for a in sc.adversary} >= {"gpu_liar", "never_pay"}


def _forgeries_refused(s: dict[str, Any]) -> None:
    assert s["receipts_signed"] > 0 and s["paid_peers_with_a_score"] > 0, s
    # 2 forgers x (an invented payment, a borrowed one, a backdated one naming the
    # victim's address in its own accept (#16.2), a tampered receipt)
    assert s["receipts_forged"] == 8 and s["receipts_forged_refused"] == 8, s
    assert s["forger_score_gain_lamports"] == 0, s


def test_forged_receipts_are_refused_and_move_no_score(honest_run: Any) -> None:
    _forgeries_refused(honest_run.summary)


def test_a_verifier_that_believes_receipts_lets_forgers_gain() -> None:
    s = _run(SMALL, mutation="forgery_blind").summary
    assert s["forger_score_gain_lamports"] > 0
    with pytest.raises(AssertionError):
        _forgeries_refused(s)
