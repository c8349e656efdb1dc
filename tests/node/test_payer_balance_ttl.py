"""``payer_balance_ttl_s`` (config.toml): how long a payer's balance, looked up
on a shared ledger, is believed by the payer gate.  It was 30 s, hard-coded, so
a test of a payer funded after a refusal slept 31 s; it is now an option,
bounded (1 to 3600 s), and a value out of range stops the daemon with a
message naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from p2pgpu.core import Identity
from p2pgpu.core._formation_quota import Gate
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.gpu import Inventory
from p2pgpu.home import Config, HomeError, load_networks
from p2pgpu.node._daemon import Node, NodeOptions

T0 = 1_700_000_000_000
PAYER = "11111111111111111111111111111111"
SUBMITTER = Identity(b"\x08" * 32)
MANIFEST = sign_manifest(SUBMITTER, Manifest(
    name="ttl", submitter=SUBMITTER.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000, nonce=b"\x01" * 16,
    nodes=1, replicas=1, quorum=1, gpus_per_node=1, models=(), command=("true",), price_per_gpu_hour_max=10_000,
    payer=PAYER, duration_s_max=60, on_member_loss="fail"))


def node_with(extra: dict[str, Any]) -> Node:
    return Node(identity=Identity(b"\x07" * 32), config=Config(extra=extra), network=load_networks()["local"],
                inventory=Inventory(gpus=(), source="none", simulated=True), options=NodeOptions(listen=[]))


def gate_of(node: Node, now_ms: int) -> Any:
    checks = node.jobs.host.payer_checks
    assert checks is not None
    return checks.gate(MANIFEST, now_ms, open_lamports=0)


def test_the_payer_gate_believes_a_balance_for_the_configured_time() -> None:
    node = node_with({"payer_balance_ttl_s": 2})
    node.jobs.set_payer_check(object(), ttl_s=node.payer_balance_ttl_s)
    assert gate_of(node, T0).lookup  # never looked up: asked for
    node.jobs.host.payer_checks.resolved(PAYER, "SOL", 0, T0)  # type: ignore[union-attr]
    # Believed (an empty wallet: refused without asking the ledger) for 2 s...
    held = gate_of(node, T0 + 1_999)
    assert held.gate is Gate.REFUSE and not held.lookup
    # ...then looked up again: a payer funded meanwhile is noticed.
    assert gate_of(node, T0 + 2_000).lookup


def test_the_default_is_thirty_seconds() -> None:
    node = node_with({})
    assert node.payer_balance_ttl_s == 30


@pytest.mark.parametrize("value", [0, 3601, -5, "10", 2.5, True])
def test_a_ttl_out_of_range_stops_the_daemon_naming_the_key(value: Any) -> None:
    with pytest.raises(HomeError, match="payer_balance_ttl_s must be an integer from 1 to 3600"):
        node_with({"payer_balance_ttl_s": value})
