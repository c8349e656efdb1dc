"""One home for protocol limits (``core/_limits.py``): every module that checks
a shared limit reads it from there, so no two of them can drift apart."""

from __future__ import annotations

import importlib

import pytest

from p2pgpu.core import _limits as limits

#: (module, its name for the limit, the shared limit)
ALIASES = [
    ("_advert", "clock_skew_ms_max", "clock_skew_ms_max"),
    ("_manifest", "clock_skew_ms_max", "clock_skew_ms_max"),
    ("_membership", "clock_skew_ms_max", "clock_skew_ms_max"),
    ("_challenge", "clock_skew_ms_max", "clock_skew_ms_max"),
    ("_advert", "gpus_max", "gpus_per_node_max"),
    ("_formation_messages", "gpus_max", "gpus_per_node_max"),
    ("_proof", "gpus_max", "gpus_per_node_max"),
    ("_manifest", "gpus_per_node_max", "gpus_per_node_max"),
    ("_manifest", "members_max", "members_per_cluster_max"),
    ("_membership", "members_max", "members_per_cluster_max"),
    ("_manifest", "replicas_max", "replicas_max"),
    ("_matching", "nodes_max", "nodes_per_job_max"),
    ("_proof", "peer_id_len_max", "peer_id_len_max"),
    ("_challenge", "peer_id_len_max", "peer_id_len_max"),
    ("_receipt", "peer_id_len_max", "peer_id_len_max"),
]


@pytest.mark.parametrize("module,name,shared", ALIASES)
def test_each_module_reads_the_shared_limit(module: str, name: str, shared: str) -> None:
    mod = importlib.import_module(f"p2pgpu.core.{module}")
    assert getattr(mod, name) == getattr(limits, shared)


def test_formation_tolerates_the_shared_clock_skew() -> None:
    from p2pgpu.core import FormationConfig

    assert FormationConfig().clock_skew_ms == limits.clock_skew_ms_max


def test_a_cluster_holds_every_member_a_job_may_ask_for() -> None:
    assert limits.members_per_cluster_max >= limits.nodes_per_job_max
    assert limits.members_per_cluster_max <= limits.nodes_per_job_max * limits.replicas_max
