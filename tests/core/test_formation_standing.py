"""A leader proposes its members by standing (#16): peers in good standing
(no record, or one that is not negative) first, then a negative record, then
those the job is worth too much for; rank order within a tier (so newcomers
are not starved), and nobody eligible is ever left out."""

from __future__ import annotations

from typing import Any

from test_formation import CFG, T0, Bench, start

import p2pgpu.core._formation_rules as rules
from p2pgpu.core._formation_messages import Proposal
from p2pgpu.core._formation_rules import job_value, member_tier
from p2pgpu.core._reputation import job_value_base


def proposed(b: Bench) -> tuple[str, ...]:
    start(b)
    lead = b.timer(0, "window", T0 + 1 + CFG.offer_window_ms)
    members: tuple[str, ...] = b.sent(lead, Proposal).members
    return tuple(b.names[m] for m in members)


def test_without_records_the_rank_order_stands() -> None:
    assert proposed(Bench(4, nodes=3)) == ("P0", "P1", "P2")


def test_a_leader_puts_penalised_peers_last_and_keeps_rank_order_among_the_rest() -> None:
    b = Bench(4, nodes=3)
    scores = {b.p[1].peer_id: -500, b.p[3].peer_id: 2_000}  # P2: no record
    b.p[0].standing = scores.get
    assert proposed(b) == ("P0", "P2", "P3")  # a newcomer is not starved by a proven peer


def test_a_job_too_valuable_for_a_new_identity_goes_to_a_peer_with_a_record(monkeypatch: Any) -> None:
    b = Bench(4, nodes=2)
    # A base just below this job's value: P1 and P2 (new) may not be offered
    # it before P3, whose record of 1 lamport lifts its limit to the value.
    monkeypatch.setattr(rules, "job_value_base", job_value(b.sm) - 2)
    b.p[0].standing = {b.p[3].peer_id: 1}.get
    assert proposed(b) == ("P0", "P3")


def test_penalised_peers_are_still_chosen_when_nobody_else_volunteers() -> None:
    b = Bench(3, nodes=3)
    b.p[0].standing = {b.p[1].peer_id: -500, b.p[2].peer_id: -1}.get
    assert proposed(b) == ("P0", "P1", "P2")


def test_member_tiers() -> None:
    small = job_value_base // 2
    assert [member_tier(s, small) for s in (5, None, 0, -5)] == [0, 0, 0, 1]
    big = job_value_base * 3
    assert member_tier(None, big) == 2  # a new identity gets small jobs first
    assert member_tier(job_value_base, big) == 0  # a record of 0.01 SOL earns jobs up to 0.03 SOL
    assert member_tier(job_value_base // 4, big) == 2


def test_job_value_is_the_member_ceiling() -> None:
    b = Bench(2)
    m = b.sm.manifest
    assert job_value(b.sm) == m.price_per_gpu_hour_max * m.gpus_per_node * m.duration_s_max // 3600
