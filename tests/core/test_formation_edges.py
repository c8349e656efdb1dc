"""The worker's formation core at its edges (#19): the capacity ledger on
both sides of every bound, the local calls and queries, the timers no
scenario reached (the run limit, the late volunteer), the candidate rule's
groups, and the inputs a driver may get wrong.  Built on the table-driven
``Bench`` of ``test_formation.py``."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from random import Random
from typing import Any

import pytest
from swarm import make_advert, make_manifest
from test_formation import CFG, SUBMITTER, T0, Bench, start

from p2pgpu.core import Identity, LocalProtocolError, PeerMisbehaved, Reason, TimerKey, TimerOwner
from p2pgpu.core._actions import (
    CancelTimer,
    Emit,
    Publish,
    Released,
    Reserved,
    Send,
    SetTimer,
    StartJob,
    StopJob,
    Subscribe,
    Unsubscribe,
)
from p2pgpu.core._advert import sign_advert
from p2pgpu.core._formation import (
    CapacityLedger,
    FormationConfig,
    FormationNode,
    candidates_max,
    expected_volunteers,
    leader_rank,
    ranked_candidates,
)
from p2pgpu.core._formation_messages import (
    Accept,
    Cancel,
    Certified,
    Confirm,
    Decline,
    Offer,
    Proposal,
    decode_message,
)
from p2pgpu.core._formation_states import WorkerState

W = T0 + 1 + CFG.offer_window_ms


# --- the capacity ledger -------------------------------------------------------------


def test_ledger_holds_at_most_what_is_free() -> None:
    ledger = CapacityLedger(2)
    assert (ledger.free, ledger.reserved) == (2, 0)
    assert ledger.can_hold("a", 2) and not ledger.can_hold("a", 3)
    assert ledger.reserve("a", 1, 100)
    assert (ledger.free, ledger.reserved) == (1, 1)
    assert ledger.can_hold("b", 1) and not ledger.can_hold("b", 2)
    assert not ledger.reserve("b", 2, 100) and "b" not in ledger.holds
    assert ledger.reserve("b", 1, 100) and ledger.free == 0


def test_ledger_one_hold_per_job_with_the_longest_lease() -> None:
    ledger = CapacityLedger(2)
    ledger.reserve("a", 1, 100)
    assert ledger.can_hold("a", 1) and not ledger.can_hold("a", 2)  # a job's hold is what counts for it
    assert ledger.reserve("a", 1, 50) and ledger.holds["a"].lease_until_ms == 100  # never shortened
    assert ledger.reserve("a", 1, 150) and ledger.holds["a"].lease_until_ms == 150
    assert ledger.reserved == 1
    ledger.run("a")
    assert ledger.holds["a"].lease_until_ms is None
    assert ledger.reserve("a", 1, 999) and ledger.holds["a"].lease_until_ms is None  # running: no lease
    assert ledger.release("a") == 1 and ledger.release("a") == 0 and ledger.free == 2
    with pytest.raises(LocalProtocolError, match="run without a hold"):
        ledger.run("a")


# --- ranks and candidates ---------------------------------------------------------------


def test_leader_rank_is_sha256_of_the_job_and_the_peer() -> None:
    job = "ab" * 32
    assert leader_rank(job, "peer") == hashlib.sha256(bytes.fromhex(job) + b"peer").digest()


def test_candidates_are_deduplicated_ranked_and_capped() -> None:
    b = Bench(6)
    ids = [n.peer_id for n in b.p]
    ranked = ranked_candidates(b.sm, list(reversed(ids)) + ids)
    assert ranked == sorted(ids, key=lambda p: leader_rank(b.job, p))
    assert expected_volunteers(b.sm, ids, CFG) == ranked[: b.sm.manifest.members + CFG.spare_volunteers]
    many = [f"p{i}" for i in range(candidates_max + 5)]
    got = ranked_candidates(b.sm, many)
    assert len(got) == candidates_max and set(got) == set(many[:candidates_max])


def test_quiet_candidates_volunteer_in_groups() -> None:
    # 1 member + 2 spares volunteer at once; the next six wait one step, the next twelve two (#12: groups
    # double, so candidates that never offer delay the others by the log of their number).
    b = Bench(12)
    ids = [n.peer_id for n in b.p]  # already in rank order
    for k, node in enumerate(b.p):
        acts = node.on_manifest(b.sm, T0, candidates=ids)
        if k < 3:
            assert b.sent(acts, Offer).peer_id == node.peer_id
            assert node.state(b.job) is not WorkerState.SEEN
        else:
            assert acts[1:] == [Subscribe(CFG.topic(b.job)),
                                SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "late"), T0 + (1 if k < 9 else 2) * CFG.late_volunteer_ms)]
            assert node.state(b.job) is WorkerState.SEEN


def test_a_late_candidate_volunteers_unless_the_job_progresses() -> None:
    b = Bench(4)
    ids = [n.peer_id for n in b.p]
    late = b.p[3]
    late.on_manifest(b.sm, T0, candidates=ids)
    at = T0 + CFG.late_volunteer_ms
    # A proposal was seen just now: wait one leader timeout past it.
    prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=1, round=0, members=(b.p[0].peer_id,),
                         gpus_per_member=1)
    assert late.on_message(prop, at - 10) == []
    assert late.jobs[b.job].view == 1  # it would join the view in progress
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), at) == [SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "late"), at - 10 + CFG.leader_timeout_ms)]
    acts = late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), at - 10 + CFG.leader_timeout_ms)
    assert acts[0] == Emit("formation.late_volunteer") and isinstance(b.sent(acts, Offer), Offer)
    assert late.state(b.job) is WorkerState.OFFERED
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), at + 10**4) == []  # once


def test_a_late_candidate_stays_quiet_past_the_deadline() -> None:
    b = Bench(4)
    ids = [n.peer_id for n in b.p]
    late = b.p[3]
    late.on_manifest(b.sm, T0, candidates=ids)
    deadline = late.jobs[b.job].deadline_ms
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), deadline) == []
    late.jobs[b.job].quiet = True
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), deadline - 1)[0] == Emit("formation.late_volunteer")


# --- local calls and queries ---------------------------------------------------------------


def test_a_node_runs_on_its_own_advert_only() -> None:
    me, other = Identity(bytes([50]) * 32), Identity(bytes([51]) * 32)
    with pytest.raises(LocalProtocolError, match="the advert must be this node's own"):
        FormationNode(me, make_advert(other, gpus=1, model="A100"), CFG)
    node = FormationNode(me, make_advert(me, gpus=2, model="A100"), CFG)
    with pytest.raises(LocalProtocolError, match="the advert must be this node's own"):
        node.update_advert(make_advert(other, gpus=1, model="A100"), T0)


def test_update_advert_never_drops_capacity_below_what_is_held() -> None:
    me = Identity(bytes([50]) * 32)
    node = FormationNode(me, make_advert(me, gpus=2, model="A100"), CFG)
    node.ledger.reserve("a" * 64, 2, T0 + 10**6)
    node.update_advert(make_advert(me, gpus=1, model="A100"), T0)
    assert node.ledger.gpus_total == 2 and node.gpus_free == 0
    node.ledger.release("a" * 64)
    node.update_advert(make_advert(me, gpus=3, model="A100"), T0)
    assert node.ledger.gpus_total == 3 and node.gpus_free == 3


def test_queries_of_unknown_jobs() -> None:
    b = Bench(2)
    assert b.p[0].state(b.job) is None and b.p[0].certificate(b.job) is None
    assert b.p[0].leader_of(b.job, 0) is None
    assert b.p[0].finish(b.job, T0) == []
    assert b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "end"), T0) == []
    for bad in (TimerKey(TimerOwner.SUBMITTER, b.job, "end"), TimerKey(TimerOwner.FORMATION, b.job, "republish"),
                TimerKey(TimerOwner.MEMBERSHIP, b.job, "run")):
        with pytest.raises(LocalProtocolError, match="not a formation node timer"):
            b.p[0].on_timer(bad, T0)


def test_leader_of_each_view_wraps_around_the_volunteers() -> None:
    b = Bench(3)
    start(b)
    ids = [n.peer_id for n in b.p]
    assert [b.p[1].leader_of(b.job, v) for v in range(5)] == [ids[0], ids[1], ids[2], ids[0], ids[1]]


def test_on_bytes_decodes_then_handles() -> None:
    b = Bench(2)
    b.s.submit(b.sm, T0)
    assert b.summary(b.p[0].on_bytes(b.sm.wire, T0)) == ["timer end", "subscribe", "publish offer", "timer window"]
    with pytest.raises(PeerMisbehaved) as err:
        b.p[0].on_bytes(b"\x00garbage", T0)
    assert err.value.reason is Reason.MALFORMED
    other = Bench(2, seed=11)
    assert b.p[0].on_message(b.sent(other.p[0].on_manifest(other.sm, T0), Offer), T0) == [
        Emit("formation.unknown_job")]


def _running(b: Bench) -> Confirm:
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    confirm: Confirm = b.sent(b.s.on_message(cert, W + 1), Confirm)
    b.p[0].on_message(confirm, W + 2)
    assert b.p[0].state(b.job) is WorkerState.RUNNING
    return confirm


def test_the_run_limit_stops_a_job_and_forgets_it() -> None:
    b = Bench(1)
    _running(b)
    until = W + 2 + b.sm.manifest.duration_s_max * 1000 + CFG.run_grace_ms
    acts = b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "run"), until)
    # The GPUs stay held until the run ends or stop_grace_ms passes (#13).
    assert acts == [StopJob(b.job, "past duration_s_max", "time_limit"),
                    SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "stop"), until + CFG.stop_grace_ms)]
    assert b.p[0].gpus_free == 0
    assert b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "run"), until + 1) == []  # told once
    acts = b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "stop"), until + CFG.stop_grace_ms)
    assert Released(b.job, 1, "stopped, its end never reported", 1) in acts
    assert b.p[0].state(b.job) is None and b.p[0].gpus_free == 1
    assert b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "stop"), until + CFG.stop_grace_ms + 1) == []


def test_the_run_timer_of_a_job_not_running_does_nothing() -> None:
    b = Bench(1)
    start(b)
    assert b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "run"), W) == []
    assert b.p[0].state(b.job) is WorkerState.OFFERED


def test_the_end_timer_keeps_a_running_job() -> None:
    b = Bench(1)
    _running(b)
    assert b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "end"), W + 10**6) == []
    assert b.p[0].state(b.job) is WorkerState.RUNNING
    acts = b.p[0].finish(b.job, W + 10**6)
    assert Released(b.job, 1, "finished", 1) in acts and b.p[0].state(b.job) is None


def test_the_confirm_starts_the_run_timer_at_the_duration_plus_grace() -> None:
    b = Bench(1)
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    confirm = b.sent(b.s.on_message(cert, W + 1), Confirm)
    acts = b.p[0].on_message(confirm, W + 2)
    assert SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "run"), W + 2 + b.sm.manifest.duration_s_max * 1000 + CFG.run_grace_ms) in acts
    assert CancelTimer(TimerKey(TimerOwner.FORMATION, b.job, "lease")) in acts


def test_jobs_table_at_its_bound() -> None:
    cfg = replace(CFG, jobs_max=2)
    ident = Identity(bytes([9]) * 32)
    node = FormationNode(ident, make_advert(ident, gpus=1, model="A100"), cfg)
    rng = Random(5)
    a, b = (make_manifest(SUBMITTER, rng, now_ms=T0) for _ in range(2))
    node.on_manifest(a, T0)
    node.on_manifest(b, T0)  # the second of two fits
    assert len(node.jobs) == 2
    assert node.guard.ids_max == 2 * 64


def test_the_end_timer_after_the_deadline_forgets_the_job() -> None:
    b = Bench(1)
    acts = b.p[0].on_manifest(b.sm, T0)
    end = T0 + CFG.formation_timeout_ms + CFG.lease_ms + CFG.lease_grace_ms
    assert acts[0] == SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "end"), end)
    b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "end"), end)
    assert b.p[0].state(b.job) is None


# --- what each timer and message returns, field by field ------------------------------


def test_a_cancelled_quiet_candidate_never_volunteers() -> None:
    b = Bench(4)
    ids = [n.peer_id for n in b.p]
    late = b.p[3]
    late.on_manifest(b.sm, T0, candidates=ids)
    late.on_message(Cancel.sign(SUBMITTER, job_id=b.job, reason="x", cancelled_at_ms=T0), T0 + 1)
    assert late.state(b.job) is WorkerState.CLOSED
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), T0 + CFG.late_volunteer_ms) == []


def test_a_decline_from_outside_the_proposal_is_the_senders_fault() -> None:
    b = Bench(3, replicas=2)
    start(b)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    stranger = Decline.sign(b.p[2].identity, job_id=b.job, view=prop.view, round=prop.round, proposal=prop.digest,
                            reason="x")
    with pytest.raises(PeerMisbehaved) as err:
        b.p[0].on_message(stranger, W + 1)
    assert (err.value.reason, err.value.detail) == (Reason.NOT_A_MEMBER, "decline from a peer that was not proposed")
    accept = Accept.sign(b.p[2].identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                         payout_address="")
    with pytest.raises(PeerMisbehaved) as err:
        b.p[0].on_message(accept, W + 1)
    assert (err.value.reason, err.value.detail) == (Reason.NOT_A_MEMBER, "accept from a peer that was not proposed")


def test_a_certified_leader_resends_its_certificate_on_retry() -> None:
    b = Bench(1)
    start(b)
    certified = b.sent(b.timer(0, "window", W), Certified)
    assert b.p[0].state(b.job) is WorkerState.CERTIFIED
    assert b.timer(0, "retry", W + CFG.certificate_retry_ms) == [
        Send(SUBMITTER.peer_id, certified.envelope.to_bytes()),
        SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "retry"), W + CFG.certificate_retry_ms + min(CFG.accept_retry_ms,
                                                                         CFG.certificate_retry_ms))]


def test_a_lapsed_lease_is_released_field_by_field() -> None:
    b = Bench(1)
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    lapse = cert.certificate.lease_until_ms + CFG.lease_grace_ms
    assert b.timer(0, "lease", lapse - 1) == [SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "lease"), lapse)]
    assert b.timer(0, "lease", lapse) == [Released(b.job, 1, "lease expired", 1)]
    assert b.timer(0, "lease", lapse + 1) == []


def test_a_cancel_stops_the_running_job_by_its_id() -> None:
    b = Bench(1)
    _running(b)
    acts = b.p[0].on_message(Cancel.sign(SUBMITTER, job_id=b.job, reason="x", cancelled_at_ms=W), W + 3)
    assert acts == [StopJob(b.job, "cancelled"), SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "stop"),
                                                           W + 3 + CFG.stop_grace_ms)]
    assert b.p[0].gpus_free == 0  # held until the run ends
    assert b.p[0].on_message(Cancel.sign(SUBMITTER, job_id=b.job, reason="x", cancelled_at_ms=W), W + 4) == []
    assert Released(b.job, 1, "finished", 1) in b.p[0].finish(b.job, W + 10)  # the driver says it ended
    assert b.p[0].gpus_free == 1 and b.p[0].state(b.job) is None


def test_the_end_timer_closes_what_is_open_and_forgets_what_is_closed() -> None:
    b = Bench(1)
    b.p[0].on_manifest(b.sm, T0)
    end = T0 + CFG.formation_timeout_ms + CFG.lease_ms + CFG.lease_grace_ms
    acts = b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "end"), end)
    assert [a for a in acts if not isinstance(a, CancelTimer)] == [Unsubscribe(CFG.topic(b.job))]
    assert b.p[0].state(b.job) is None
    c = Bench(1, seed=12)
    c.p[0].on_manifest(c.sm, T0)
    c.p[0].on_message(Cancel.sign(SUBMITTER, job_id=c.job, reason="x", cancelled_at_ms=T0), T0 + 1)
    assert c.p[0].on_timer(TimerKey(TimerOwner.FORMATION, c.job, "end"), end) == [] and c.p[0].state(c.job) is None


@pytest.mark.parametrize("margin,offers", [(0, False), (1, True)], ids=["at its deadline", "before it"])
def test_freed_capacity_goes_to_a_passed_over_job_only_before_its_deadline(margin: int, offers: bool) -> None:
    b = Bench(1)
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    lapse = cert.certificate.lease_until_ms + CFG.lease_grace_ms
    other = make_manifest(SUBMITTER, Random(99), now_ms=lapse + margin - CFG.formation_timeout_ms)
    assert b.summary(b.p[0].on_manifest(other, W + 1)) == ["timer end"]  # no free GPU: passed over
    acts = b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "lease"), lapse)
    assert acts[0] == Released(b.job, 1, "lease expired", 1)
    assert any(isinstance(a, Publish) for a in acts) is offers


def test_the_topic_of_a_job() -> None:
    assert FormationConfig().topic("ab") == "/p2pgpu/jobs/1/ab"
    assert FormationConfig(per_job_topics=False).topic("ab") == "/p2pgpu/jobs/1"


def test_a_node_counts_its_own_gpus_not_its_adverts_free_count() -> None:
    me = Identity(bytes([60]) * 32)
    busy_advert = replace(make_advert(me, gpus=1, model="NVIDIA A100"), gpus_free=0)
    node = FormationNode(me, busy_advert, CFG)
    sm = make_manifest(SUBMITTER, Random(3), now_ms=T0)
    assert any(isinstance(a, Publish) for a in node.on_manifest(sm, T0))


def test_a_repeated_proposal_is_answered_once_per_half_retry_interval() -> None:
    b = Bench(3, replicas=2)
    start(b)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    b.p[1].on_message(prop, W + 5)
    half = CFG.accept_retry_ms // 2
    assert b.summary(b.p[1].on_message(prop, W + 5 + half - 1)) == ["timer view"]
    assert "send accept>P0" in b.summary(b.p[1].on_message(prop, W + 5 + half))


def test_an_equivocating_leader_gets_one_accept_per_view_and_round() -> None:
    b = Bench(3, replicas=2)
    start(b)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    acts = b.p[1].on_message(prop, W + 1)
    accept = b.sent(acts, Accept)
    assert Reserved(b.job, 1, accept.lease_until_ms, 0) in acts
    twin = Proposal.sign(b.p[0].identity, job_id=b.job, view=prop.view, round=prop.round,
                         members=(b.p[1].peer_id, b.p[2].peer_id), gpus_per_member=1)
    assert b.p[1].on_message(twin, W + 2) == [SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "view"), W + 2 + CFG.leader_timeout_ms),
                                              Emit("formation.proposal_superseded")]


def test_a_leader_that_accepted_another_leaders_proposal_keeps_its_gpus() -> None:
    # P1 accepted P0's view-0 proposal; P0 goes silent; P1 leads view 1 and
    # its own proposal dies.  A certificate with P1's accept of P0's proposal
    # may still be confirmed, so P1 keeps its GPU.
    b = Bench(2, replicas=2)
    start(b)
    prop0 = b.sent(b.timer(0, "window", W), Proposal)
    b.timer(1, "window", W)
    b.p[1].on_message(prop0, W + 1)
    v = W + 1 + CFG.leader_timeout_ms
    prop1 = b.sent(b.timer(1, "view", v), Proposal)
    assert prop1.leader == b.p[1].peer_id
    acts = b.timer(1, "round", v + CFG.member_timeout_ms)  # P0 silent: too few volunteers left
    assert Emit("formation.too_few_volunteers") in acts
    assert not any(isinstance(a, Released) for a in acts) and b.job in b.p[1].ledger.holds


def test_a_dead_own_proposal_releases_field_by_field() -> None:
    b = Bench(2, replicas=2)
    start(b)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    assert b.p[1].ledger.reserve("e" * 64, 1, T0 + 10**9)
    decline = b.sent(b.p[1].on_message(prop, W + 1), Decline)
    acts = b.p[0].on_message(decline, W + 2)
    assert acts == [Emit("formation.declined"), Emit("formation.too_few_volunteers"),
                    CancelTimer(TimerKey(TimerOwner.FORMATION, b.job, "lease")), Released(b.job, 1, "own proposal abandoned", 1)]


def test_a_full_volunteer_table_ignores_new_volunteers() -> None:
    cfg = replace(CFG, volunteers_max=2)
    b = Bench(3, replicas=3)
    nodes = [FormationNode(n.identity, make_advert(n.identity, gpus=1, model="NVIDIA A100"), cfg) for n in b.p]
    offers = [b.sent(n.on_manifest(b.sm, T0), Offer) for n in nodes]
    nodes[0].on_message(offers[1], T0 + 1)
    lead = nodes[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "window"), W)
    assert Emit("formation.too_few_volunteers") in lead and nodes[0].state(b.job) is WorkerState.LEADING
    assert nodes[0].on_message(offers[2], W + 1) == []  # the table is full: not heard
    assert list(nodes[0].jobs[b.job].volunteers) == [b.p[0].peer_id, b.p[1].peer_id]


def test_a_confirm_too_late_for_the_lease_is_reported_exactly() -> None:
    b = Bench(1)
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    confirm = b.sent(b.s.on_message(cert, W + 1), Confirm)
    lapse = W + CFG.lease_ms + CFG.lease_grace_ms
    b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "lease"), lapse)
    assert b.p[0].ledger.reserve("e" * 64, 1, T0 + 10**9)
    acts = b.p[0].on_message(confirm, lapse + 1)
    decline = b.sent(acts, Decline)
    assert decline.reason == "lease expired and the GPUs are taken"
    assert acts[4:6] == [Send(SUBMITTER.peer_id, decline.envelope.to_bytes()), Emit("formation.member_lost")]


def test_only_a_quiet_candidate_adopts_a_view_in_progress() -> None:
    b = Bench(2)
    node = b.p[0]
    assert node.ledger.reserve("e" * 64, 1, T0 + 10**9)  # passed over: SEEN, not quiet
    node.on_manifest(b.sm, T0)
    prop = Proposal.sign(b.p[1].identity, job_id=b.job, view=1, round=0, members=(b.p[1].peer_id,),
                         gpus_per_member=1)
    assert node.on_message(prop, T0 + 1) == []
    assert node.jobs[b.job].view == 0


def test_a_leader_stepping_down_cancels_its_round_timer() -> None:
    b = Bench(3, replicas=2)
    start(b)
    b.sent(b.timer(0, "window", W), Proposal)
    b.timer(1, "window", W)
    v = W + CFG.leader_timeout_ms
    better = Proposal.sign(b.p[1].identity, job_id=b.job, view=1, round=0,
                           members=(b.p[1].peer_id, b.p[0].peer_id), gpus_per_member=1)
    acts = b.p[0].on_message(better, v)
    assert acts[:2] == [CancelTimer(TimerKey(TimerOwner.FORMATION, b.job, "round")), Emit("formation.stepped_down")]
    assert b.p[0].state(b.job) is WorkerState.FOLLOWING


def test_progress_seen_at_time_zero_still_delays_a_late_candidate() -> None:
    b = Bench(4)
    sm = make_manifest(SUBMITTER, Random(21), now_ms=0)
    ids = sorted((n.peer_id for n in b.p), key=lambda p: leader_rank(sm.job_id, p))
    late = next(n for n in b.p if n.peer_id == ids[3])
    late.on_manifest(sm, 0, candidates=ids)
    leader = next(n for n in b.p if n.peer_id == ids[0])
    prop = Proposal.sign(leader.identity, job_id=sm.job_id, view=0, round=0, members=(ids[0],), gpus_per_member=1)
    late.on_message(prop, 0)
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, sm.job_id, "late"), 200) == [SetTimer(TimerKey(TimerOwner.FORMATION, sm.job_id, "late"), CFG.leader_timeout_ms)]


def test_a_late_candidate_without_gpus_volunteers_when_they_free() -> None:
    b = Bench(4)
    ids = [n.peer_id for n in b.p]
    late = b.p[3]
    late.on_manifest(b.sm, T0, candidates=ids)
    assert late.ledger.reserve("e" * 64, 1, T0 + 1_000)  # another job's lease, lapsing soon
    assert late.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "late"), T0 + CFG.late_volunteer_ms) == []  # no GPU now
    late.ledger.release("e" * 64)
    acts = late.update_advert(late._advert, T0 + CFG.late_volunteer_ms + 1)
    assert b.sent(acts, Offer).peer_id == late.peer_id


def test_giving_up_releases_and_says_why() -> None:
    b = Bench(1)
    start(b)
    b.sent(b.timer(0, "window", W), Certified)
    deadline = b.p[0].jobs[b.job].deadline_ms
    acts = b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "view"), deadline)
    assert acts[-1] == Emit("formation.gave_up")
    assert Released(b.job, 1, "formation gave up", 1) in acts
    assert b.p[0].state(b.job) is WorkerState.CLOSED


# -- written against the sample of 300 (seed 1) of core/_formation.py at 21b91e2 ---------------


def test_a_leader_out_of_rounds_steps_down_to_follow_and_keeps_the_decliner_out() -> None:
    """``_next_round__mutmut_5``, ``_8``, ``_9``, ``_11``, ``_12``: after
    ``rounds_max`` rounds the leader drops its proposal, follows, and says
    so; ``_on_decline__mutmut_18``: the decliner stays excluded when its same
    offer comes again, and only a newer offer lets it back."""
    b = Bench(3, replicas=2)
    b.p[0].config = replace(CFG, rounds_max=1)
    offers = start(b)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    k = next(i for i, n in enumerate(b.p) if i and n.peer_id in prop.members)
    assert b.p[k].ledger.reserve("e" * 64, 1, T0 + 10**9)  # its GPU went elsewhere: it declines
    decline = b.sent(b.p[k].on_message(prop, W + 1), Decline)
    acts = b.p[0].on_message(decline, W + 2)
    assert acts[:2] == [Emit("formation.declined"), Emit("formation.rounds_exhausted")]
    job = b.p[0].jobs[b.job]
    assert b.p[0].state(b.job) is WorkerState.FOLLOWING and job.proposal is None
    assert job.excluded == {b.p[k].peer_id: offers[k].seq}
    b.p[0].on_message(offers[k], W + 3)  # the same offer again
    assert b.p[k].peer_id in job.excluded


def test_the_confirm_reserves_at_its_time_and_hands_the_confirm_to_the_run() -> None:
    """``_on_confirm__mutmut_95`` (a lapsed lease's GPUs taken again are
    reported at the confirm's time) and ``_129`` (the CONFIRM's bytes in
    ``StartJob``: the driver stores them for a restart)."""
    b = Bench(1)
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    confirm = b.sent(b.s.on_message(cert, W + 1), Confirm)
    lapse = W + CFG.lease_ms + CFG.lease_grace_ms
    b.p[0].on_timer(TimerKey(TimerOwner.FORMATION, b.job, "lease"), lapse)  # released, the GPU still free
    acts = b.p[0].on_message(confirm, lapse + 1)
    (start_job,) = [a for a in acts if isinstance(a, StartJob)]
    assert start_job.confirm == confirm.envelope.to_bytes() and start_job.member_index == 0
    assert Reserved(b.job, 1, lapse + 1, 0) in acts


def test_a_proposal_that_does_not_fit_the_manifest_is_a_bad_schema() -> None:
    """``_on_proposal__mutmut_7`` (the refusal's reason dropped)."""
    b = Bench(2)
    start(b)
    prop = Proposal.sign(b.p[1].identity, job_id=b.job, view=0, round=0, members=(b.p[1].peer_id,),
                         gpus_per_member=2)
    with pytest.raises(PeerMisbehaved) as err:
        b.p[0].on_message(prop, W)
    assert (err.value.reason, err.value.detail) == (Reason.BAD_SCHEMA, "proposal does not fit the manifest")


def test_a_leader_of_another_network_is_not_followed() -> None:
    """``_leader_refused__mutmut_10``: the node's network is part of the
    leader's advert check (a leader whose advert is of another network is
    not followed)."""
    b = Bench(2)
    leader = b.p[1].identity
    elsewhere = replace(make_advert(leader, gpus=1, model="NVIDIA A100"), network="elsewhere")
    node = FormationNode(b.p[0].identity, make_advert(b.p[0].identity, gpus=1, model="NVIDIA A100"),
                         replace(CFG, network="local"), adverts={leader.peer_id: elsewhere}.get)
    node.on_manifest(b.sm, T0)
    prop = Proposal.sign(leader, job_id=b.job, view=0, round=0, members=(leader.peer_id,), gpus_per_member=1)
    assert node.on_message(prop, W + 10_000) == [Emit("formation.proposal_refused")]
    why = node._leader_refused(node.jobs[b.job], prop, W + 10_000)
    assert why is not None and why.startswith(f"leader {leader.peer_id[:16]}: ") and "network" in why


def test_the_advert_an_offer_carried_is_the_one_used() -> None:
    """``advert_of__mutmut_4``: with no advert book, a volunteer's advert is
    the one its offer carried."""
    b = Bench(2)
    node = FormationNode(b.p[0].identity, make_advert(b.p[0].identity, gpus=1, model="NVIDIA A100"), CFG)
    node.on_manifest(b.sm, T0)
    offer = b.sent(b.p[1].on_manifest(b.sm, T0), Offer)
    node.on_message(offer, T0 + 1)
    assert node.advert_of(b.job, b.p[1].peer_id) == offer.advert.advert
    assert node.advert_of("00" * 32, b.p[1].peer_id) is None


def test_freed_capacity_skips_a_job_past_its_deadline_and_offers_for_the_next() -> None:
    """``continue`` to ``break`` after a job past its deadline (a mutant of
    ``_capacity_freed`` outside the evening sample): a job past its deadline
    is skipped, not the end of the pass (the jobs are walked in id order;
    here the expired one comes first)."""
    ident = Identity(bytes([9]) * 32)
    node = FormationNode(ident, make_advert(ident, gpus=1, model="NVIDIA A100"), CFG)
    assert node.ledger.reserve("e" * 64, 1, T0 + 10**9)  # busy: every job is passed over
    other = make_manifest(SUBMITTER, Random(1), now_ms=T0)
    first = next(sm for sm in (make_manifest(SUBMITTER, Random(100 + i), now_ms=T0, ttl_ms=5_000) for i in range(64))
                 if sm.job_id < other.job_id)
    for sm in (first, other):
        node.on_manifest(sm, T0)
    acts = node.update_advert(make_advert(ident, gpus=2, model="NVIDIA A100"), T0 + 6_000)
    offers = [decode_message(a.data) for a in acts if isinstance(a, Publish)]
    assert [o.job_id for o in offers] == [other.job_id]


def test_a_leader_known_only_by_its_offer_is_judged_by_the_advert_it_carried() -> None:
    """``_leader_refused__mutmut_11`` (the book's advert only): with no
    advert book, the best-ranked volunteer's proposal is followed on the
    strength of the advert its offer carried."""
    b = Bench(2)
    node = FormationNode(b.p[1].identity, make_advert(b.p[1].identity, gpus=1, model="NVIDIA A100"), CFG)
    node.on_manifest(b.sm, T0)
    node.on_message(b.sent(b.p[0].on_manifest(b.sm, T0), Offer), T0 + 1)
    prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=0, members=(b.p[0].peer_id,),
                         gpus_per_member=1)
    assert node._leader_refused(node.jobs[b.job], prop, W) is None


def test_an_offer_whose_advert_is_of_another_network_is_no_volunteer() -> None:
    """``_on_offer__mutmut_20`` (the node's network dropped from the offer's
    advert check)."""
    b = Bench(2)
    node = FormationNode(b.p[0].identity, make_advert(b.p[0].identity, gpus=1, model="NVIDIA A100"),
                         replace(CFG, network="local"))
    node.on_manifest(b.sm, T0)
    other = b.p[1].identity
    elsewhere = replace(make_advert(other, gpus=1, model="NVIDIA A100"), network="elsewhere")
    offer = Offer.sign(other, job_id=b.job, seq=1, gpus_free=1, price_per_gpu_hour=1000,
                       advert=sign_advert(other, elsewhere))
    assert node.on_message(offer, T0 + 1) == [Emit("formation.offer_ineligible")]
    assert other.peer_id not in node.jobs[b.job].volunteers


def test_a_proposal_goes_on_the_jobs_own_topic() -> None:
    """``_propose__mutmut_40`` (the topic of job ``None``)."""
    b = Bench(2, replicas=2)
    start(b)
    acts = b.timer(0, "window", W)
    topics = [a.topic for a in acts if isinstance(a, Publish) and isinstance(decode_message(a.data), Proposal)]
    assert topics == [CFG.topic(b.job)]


def test_a_leader_proposes_no_volunteer_whose_claim_it_refused_even_known_only_by_its_offer() -> None:
    """``_choose_members__mutmut_38`` (the claim check given the book's
    advert only): with no advert book, a volunteer's carried advert is the
    one whose claim is judged."""
    b = Bench(2, replicas=2)

    def refused(advert: Any, now_ms: int) -> Any:
        return replace(advert, gpus=(), gpus_free=0)  # its GPU claim failed here

    lead = b.p[0]
    node = FormationNode(lead.identity, make_advert(lead.identity, gpus=1, model="NVIDIA A100"), CFG, claims=refused)
    node.on_manifest(b.sm, T0)
    node.on_message(b.sent(b.p[1].on_manifest(b.sm, T0), Offer), T0 + 1)
    acts = node.on_timer(TimerKey(TimerOwner.FORMATION, b.job, "window"), W)
    assert Emit("formation.too_few_volunteers") in acts
    assert not any(isinstance(a, Publish) and isinstance(decode_message(a.data), Proposal) for a in acts)


# --- the last survivors of the evening sample ----------------------------------------------


@pytest.mark.parametrize("late_ms", [0, CFG.lease_ms])
def test_a_certified_leader_waits_for_the_confirm_until_the_lease_less_the_margin(late_ms: int) -> None:
    """``_on_accept__mutmut_46`` (``- confirm_margin_ms`` to ``+``): the
    leader waits for the CONFIRM until the certificate's lease less the
    margin the submitter requires (a later CONFIRM cannot come: the
    submitter refuses shorter leases), and at least a leader timeout."""
    b = Bench(3, replicas=2)
    start(b)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    k = next(i for i, n in enumerate(b.p) if i and n.peer_id in prop.members)
    b.timer(k, "window", W)
    accept = b.sent(b.p[k].on_message(prop, W + 1), Accept)
    now = W + 2 + late_ms
    acts = b.p[0].on_message(accept, now)
    lease = b.p[0].jobs[b.job].certified.certificate.lease_until_ms  # type: ignore[union-attr]
    views = [a for a in acts if isinstance(a, SetTimer) and a.key.name == "view"]
    expected = lease - CFG.confirm_margin_ms if not late_ms else now + CFG.leader_timeout_ms
    assert expected == max(lease - CFG.confirm_margin_ms, now + CFG.leader_timeout_ms)
    assert views == [SetTimer(TimerKey(TimerOwner.FORMATION, b.job, "view"), expected)]


def test_a_leader_short_of_volunteers_ignores_an_offer_heard_again() -> None:
    """``_note_volunteer__mutmut_7`` (``seq >`` to ``>=``): the same offer
    heard again (its topic copy after the direct one) is no new volunteer; a
    leader waiting for enough volunteers does not try to propose again."""
    b = Bench(3, replicas=3)
    offers = [b.sent(n.on_manifest(b.sm, T0), Offer) for n in b.p]
    assert b.p[0].on_message(offers[1], T0 + 1) == []
    lead = b.timer(0, "window", W)
    assert Emit("formation.too_few_volunteers") in lead and b.p[0].state(b.job) is WorkerState.LEADING
    assert b.p[0].on_message(offers[1], W + 1) == []  # the same offer again: nothing new
    assert b.p[0].jobs[b.job].volunteers == {b.p[0].peer_id: offers[0].seq, b.p[1].peer_id: offers[1].seq}
    acts = b.p[0].on_message(offers[2], W + 2)  # a new volunteer: now it proposes
    assert set(b.sent(acts, Proposal).members) == {n.peer_id for n in b.p}


def test_a_member_accepts_a_rightful_leader_whose_rank_was_not_memoised() -> None:
    """``_preference__mutmut_7`` (the leader's rank computed without the
    leader): with its volunteer table and its rank memo full, a member still
    ranks (and accepts) the proposal of a rightful leader it holds no rank
    of, instead of failing on it."""
    b = Bench(3)
    member = b.p[1]
    member.config = replace(CFG, volunteers_max=1)  # the memo holds volunteers_max + 1 ranks
    member.on_manifest(b.sm, T0)
    job = member.jobs[b.job]
    worse = Proposal.sign(b.p[2].identity, job_id=b.job, view=0, round=0, members=(member.peer_id,),
                          gpus_per_member=1)
    assert member.on_message(worse, T0 + 2) == [Emit("formation.proposal_refused")]  # ranks after us
    assert list(job.volunteers) == [member.peer_id] and len(job.ranks) == 2  # both full now
    prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=0, members=(member.peer_id,),
                         gpus_per_member=1)
    acts = member.on_message(prop, T0 + 3)
    assert b.p[0].peer_id not in job.ranks and b.p[0].peer_id not in job.volunteers
    assert b.sent(acts, Accept).proposal == prop.digest
    assert member.state(b.job) is WorkerState.FOLLOWING


def test_freed_capacity_skips_a_submitter_at_its_quota_and_offers_for_the_next_submitters_job() -> None:
    """``_capacity_freed__mutmut_16`` (``continue`` to ``break`` after a
    submitter already offered ``holds_per_submitter_max`` jobs in this pass):
    that submitter's next job is skipped, not the end of the pass: another
    submitter's job, later in id order, still gets its offer."""
    ident = Identity(bytes([9]) * 32)
    node = FormationNode(ident, make_advert(ident, gpus=1, model="NVIDIA A100"), CFG)
    assert node.ledger.reserve("e" * 64, 1, T0 + 10**9)  # busy: every job is passed over
    other_submitter = Identity(bytes([201]) * 32)
    last = make_manifest(other_submitter, Random(1), now_ms=T0)
    floods = sorted((sm for sm in (make_manifest(SUBMITTER, Random(100 + i), now_ms=T0) for i in range(64))
                     if sm.job_id < last.job_id), key=lambda sm: sm.job_id)[:2]
    assert len(floods) == 2 and CFG.holds_per_submitter_max == 1
    for sm in (*floods, last):
        node.on_manifest(sm, T0)
    acts = node.update_advert(make_advert(ident, gpus=2, model="NVIDIA A100"), T0 + 1_000)
    offers = [decode_message(a.data) for a in acts if isinstance(a, Publish)]
    assert [o.job_id for o in offers if isinstance(o, Offer)] == [floods[0].job_id, last.job_id]
