"""The simulator hands its signature verifier to the cores; it never swaps
the core's global ``verify_signature`` at run time (#13).

The run's memoised verifier (``sim/_crypto.py``) used to replace the name
``p2pgpu.core._envelope.verify_signature`` for the length of a run, so any
other code running meanwhile (another world, a test, a node in the same
process) checked signatures through the simulator's cache.  Here that global
raises if anything calls it: a whole run (adverts into books and validators,
formation, proofs, co-signatures, heartbeats) must verify only through the
verifier it was given, and still verify for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pgpu.core import _envelope
from p2pgpu.sim import load_scenario, run_scenario

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "smoke.toml"


def _global_check_called(public_key: bytes, message: bytes, signature: bytes) -> None:
    raise AssertionError("the simulator called the core's global verify_signature")


@pytest.mark.parametrize("mode", ["cached", "every"])
def test_a_run_verifies_only_through_the_verifier_it_hands_the_cores(monkeypatch: pytest.MonkeyPatch,
                                                                      mode: str) -> None:
    monkeypatch.setattr(_envelope, "verify_signature", _global_check_called)
    scenario = load_scenario(SMOKE, {"adverts.verify": mode})
    result = run_scenario(scenario, 3, plots=False, tracing=False)
    assert result.ok, result.violations
    assert _envelope.verify_signature is _global_check_called  # nothing swapped it
    s = result.summary
    assert s["signature_verifies_real"] > 100  # real checks happened, through the run's verifier
    if mode == "cached":
        assert s["signature_verifies_cached"] > 0
    else:
        assert s["signature_verifies_cached"] == 0
    assert s["jobs_completed"] > 0
