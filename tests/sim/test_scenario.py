"""Scenario files: every shipped one loads; mistakes name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.sim import ScenarioError, load_scenario, scenario_from_obj

SIMS = Path(__file__).resolve().parents[2] / "simulations"


@pytest.mark.parametrize("path", sorted(SIMS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path: Path) -> None:
    s = load_scenario(path)
    assert s.run.nodes >= 1 and s.run.name


def test_required_scenarios_are_shipped() -> None:
    names = {p.name for p in SIMS.glob("*.toml")}
    assert {"smoke.toml", "gossipsub-1k.toml", "churn.toml", "partition-heal.toml", "adversarial.toml"} <= names
    g = load_scenario(SIMS / "gossipsub-1k.toml")
    # The node's GossipSub (mesh degree 6, mesh-only publishing), not the v1.1 paper's D 8 with flooding.
    assert (g.run.nodes, g.gossipsub.D, g.gossipsub.flood_publish, g.network.link_ms, g.network.jitter_pct,
            g.gossipsub.heartbeat_ms) == (1000, 6, False, 25.0, 10.0, 1000.0)


@pytest.mark.parametrize(("obj", "where"), [
    ({"run": {"nodez": 3}}, "run.nodez"),
    ({"run": {"nodes": "many"}}, "run.nodes"),
    ({"run": {"nodes": True}}, "run.nodes"),
    ({"network": {"loss_pct": 140}}, "network.loss_pct"),
    ({"gossipsub": {"D": 3, "D_lo": 6}}, "gossipsub.D"),
    ({"runn": {}}, "runn"),
    ({"partition": [{"at_s": 5, "heal_s": 1}]}, "partition[0]"),
])
def test_mistakes_name_the_key(obj: dict, where: str) -> None:
    with pytest.raises(ScenarioError, match=where.replace("[", r"\[").replace("]", r"\]")):
        scenario_from_obj(obj)


def test_overrides(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text("[run]\nnodes = 10\n")
    assert load_scenario(p, {"run.nodes": 20, "churn.fraction": 0.5}).run.nodes == 20
    with pytest.raises(ScenarioError, match="not valid TOML"):
        p.write_text("[run\n")
        load_scenario(p)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(-3, 70), max_size=3))
_section = st.dictionaries(st.sampled_from(["nodes", "duration_s", "D", "loss_pct", "kind", "at_s", "heal_s",
                                            "split", "fraction", "session", "refresh_s", "ttl_s", "nodes_choices",
                                            "latency", "books", "x"]), _leaf, max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["run", "network", "gossipsub", "churn", "jobs", "adverts", "partition",
                                        "adversary", "other"]),
                       st.one_of(_section, st.lists(_section, max_size=2), _leaf), max_size=4))
def test_any_scenario_table_is_a_scenario_or_a_scenario_error(obj: dict) -> None:
    """We either build a checked Scenario or raise ScenarioError, never anything else."""
    try:
        s = scenario_from_obj(obj)
    except ScenarioError:
        return
    assert s.run.nodes >= 1


def test_public_api() -> None:
    from p2pgpu import sim

    assert sorted(sim.__all__) == ["ADVERSARY_KINDS", "Adversary", "Engine", "RunResult", "Scenario",
                                   "ScenarioError", "SimulationStopped", "SweepResult", "load_scenario",
                                   "run_scenario", "scenario_from_obj", "sweep"]
    assert all(hasattr(sim, name) for name in sim.__all__)
