"""The simulator's defaults are the node's settings, so they cannot drift apart.

The shipped ``gossipsub-1k.toml`` once published with flood publishing (the
simulator's default then) while the node publishes to its mesh only, and so
reported propagation faster than the node would have (#13).  These tests
read the node's own constants (its GossipSub stack, its formation and
membership settings) and compare them with the scenario defaults.
"""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

from p2pgpu.core._member import DEFAULT_MEMBER
from p2pgpu.sim._jobs import sim_config
from p2pgpu.sim._scenario import GossipSection, JobSection

ROOT = Path(__file__).resolve().parents[2]


def node_gossip() -> dict[str, object]:
    """What the node's GossipSub runs with: its StackConfig, and py-libp2p's
    own defaults for what the node does not set."""
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    from p2pgpu.node._stack import StackConfig

    cfg = StackConfig()
    gs = inspect.signature(GossipSub.__init__).parameters
    ps = inspect.signature(Pubsub.__init__).parameters
    return {"D": cfg.mesh_degree, "D_lo": cfg.mesh_degree_low, "D_hi": cfg.mesh_degree_high,
            "D_lazy": cfg.mesh_degree,  # py-libp2p gossips to D peers
            "heartbeat_ms": cfg.heartbeat_interval_s * 1000.0,
            "history_length": gs["gossip_history"].default, "history_gossip": gs["gossip_window"].default,
            "seen_ttl_s": float(ps["seen_ttl"].default) if "seen_ttl" in ps else 120.0,
            # py-libp2p 0.8.1 has no flood publishing: a publish goes to the mesh (or fanout)
            "flood_publish": False}


def test_gossip_defaults_are_the_nodes() -> None:
    sim = GossipSection()
    for key, value in node_gossip().items():
        assert getattr(sim, key) == value, f"gossipsub.{key}: simulator {getattr(sim, key)}, node {value}"


def test_formation_and_membership_defaults_are_the_nodes() -> None:
    from p2pgpu.node._jobs import NODE_FORMATION

    sim = sim_config(JobSection())
    for key in ("offer_window_ms", "leader_timeout_ms", "member_timeout_ms", "lease_ms", "lease_grace_ms",
                "formation_timeout_ms", "spare_volunteers", "late_volunteer_ms", "quiet_steps_max", "per_job_topics",
                "confirm_margin_ms", "accept_retry_ms", "certificate_retry_ms", "jobs_topic"):
        assert getattr(sim.formation, key) == getattr(NODE_FORMATION, key), key
    assert sim.member == DEFAULT_MEMBER
    # Pay as you go: the workers' grace is the node's (config.toml payment_grace_s unset).
    from p2pgpu.core._installments import DEFAULT_INSTALLMENTS

    assert sim.installments == DEFAULT_INSTALLMENTS


def test_the_shipped_gossipsub_scenario_runs_the_nodes_settings() -> None:
    doc = tomllib.loads((ROOT / "simulations" / "gossipsub-1k.toml").read_text())
    node = node_gossip()
    for key, value in doc.get("gossipsub", {}).items():
        assert key not in node or value == node[key], f"gossipsub-1k.toml sets {key} = {value}, the node {node[key]}"
