"""NATs in the simulator (``p2pgpu/sim/_nat.py``, issue #14): private nodes are
reached through relays, hole punching works only between port-keeping NATs,
relay capacity bounds relayed connections, a run stays reproducible, and
bad settings are refused."""

from __future__ import annotations

from typing import Any

import pytest

from p2pgpu.sim import ScenarioError, run_scenario, scenario_from_obj


def _run(seed: int = 4, **network: Any) -> dict[str, Any]:
    s = scenario_from_obj({
        "run": {"nodes": 80, "duration_s": 30, "settle_s": 5},
        "network": {"latency": "regions", "peers_target": 8, **network},
        "adverts": {"refresh_s": 10, "ttl_s": 40, "observers": 20},
        "jobs": {"submitters": 3, "rate_per_s": 0.5, "duration_s": 3, "nodes_choices": [1, 2]},
    })
    return run_scenario(s, seed, plots=False, tracing=True).summary


def test_no_nat_is_the_network_as_before() -> None:
    assert "nat" not in _run()


def test_private_nodes_are_reached_through_relays_and_some_punch() -> None:
    d = _run(nat_pct=70, nat_symmetric_pct=30, punch_success_pct=70)
    nat = d["nat"]
    assert 0.55 * 80 <= nat["nodes_private"] <= 0.85 * 80
    assert nat["relayed"] > 0 and nat["punched"] > 0 and nat["direct"] > 0
    assert nat["messages_relayed"] > 0
    assert nat["relay_circuits_busiest"] <= 64
    assert d["advert_delivery_ratio"] > 0.9  # gossip still reaches (almost) everyone
    assert d["formation_success_ratio"] > 0.5


def test_symmetric_nats_never_punch() -> None:
    nat = _run(nat_pct=70, nat_symmetric_pct=100, punch_success_pct=100)["nat"]
    assert nat["punched"] == 0 and nat["relayed"] > 0


def test_relay_capacity_bounds_relayed_connections() -> None:
    nat = _run(nat_pct=70, nat_symmetric_pct=100, relay_circuits_max=0)["nat"]
    assert nat["relayed"] == 0 and nat["relayed_open"] == 0
    assert nat["refused_relay_full"] > 0


def test_a_nat_run_replays_exactly() -> None:
    a = _run(seed=9, nat_pct=70)
    b = _run(seed=9, nat_pct=70)
    assert a["trace_hash"] == b["trace_hash"] and a["nat"] == b["nat"]


@pytest.mark.parametrize(("key", "value"), [("nat_pct", 101), ("nat_symmetric_pct", -1),
                                            ("punch_success_pct", 200), ("relays_per_private", 0),
                                            ("relay_circuits_max", -5)])
def test_bad_nat_settings_are_refused(key: str, value: float) -> None:
    with pytest.raises(ScenarioError, match=key):
        scenario_from_obj({"network": {key: value}})
