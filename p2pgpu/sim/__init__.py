"""The network simulator: the second driver of the pure cores in ``p2pgpu.core``.

A deterministic discrete-event world (virtual time, one seed, seeded
tie-breaking) of simulated nodes that run the real advert, manifest, matching
and payout cores over modelled GossipSub, Kademlia and links with faults,
adversaries and invariant checkers.  See ``docs/simulation.md`` and
``simulations/README.md``.  This file names the public API.
"""

from ._adversary import KINDS as ADVERSARY_KINDS
from ._adversary import Adversary
from ._engine import Engine, SimulationStopped
from ._run import RunResult, run_scenario
from ._scenario import Scenario, ScenarioError, load_scenario, scenario_from_obj
from ._sweep import SweepResult, sweep

__all__ = [
    "ADVERSARY_KINDS",
    "Adversary",
    "Engine",
    "RunResult",
    "Scenario",
    "ScenarioError",
    "SimulationStopped",
    "SweepResult",
    "load_scenario",
    "run_scenario",
    "scenario_from_obj",
    "sweep",
]
