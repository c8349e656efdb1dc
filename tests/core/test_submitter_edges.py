"""The submitter's formation core at its edges (#19): what ``submit``,
``cancel``, ``forget`` and the timers return, action by action; each check a
certificate must pass, on both sides (member count, GPUs per member, the
price ceiling, the lease margin); the rate limit and the cap on answers to
peers still working on a decided job; the cap on manifest republishes; and
every field of ``progress``.  Built on the table-driven ``Bench`` of
``test_formation.py`` (real ``FormationNode`` cores make the offers and
certificates)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from swarm import make_advert
from test_formation import CFG, SUBMITTER, T0, Bench, _cert_obj, start

from p2pgpu.core import Identity, LocalProtocolError, PeerMisbehaved, Reason, TimerKey, TimerOwner
from p2pgpu.core._actions import (
    Cancelled,
    CancelTimer,
    Confirmed,
    Emit,
    Failed,
    MemberLost,
    Publish,
    Send,
    SetTimer,
    Subscribe,
    Unsubscribe,
)
from p2pgpu.core._advert import sign_advert
from p2pgpu.core._formation import expected_volunteers
from p2pgpu.core._formation_messages import (
    Accept,
    Cancel,
    Certificate,
    Certified,
    Confirm,
    Decline,
    Offer,
    Proposal,
    decode_message,
)
from p2pgpu.core._formation_states import SubmitterState
from p2pgpu.core._formation_submitter import Submitter, accepted_digests_max, proposals_kept_max

W = T0 + 1 + CFG.offer_window_ms  # when the offer windows close


def key(b: Bench, name: str) -> TimerKey:
    return TimerKey(TimerOwner.SUBMITTER, b.job, name)


def confirmed_bench(members: int = 1) -> tuple[Bench, Certified, Confirm, list[Offer]]:
    """A job confirmed with ``members`` members, the offers fed to the submitter too."""
    b = Bench(max(3, members), replicas=members)
    offers = start(b)
    for o in offers:
        b.s.on_message(o, T0 + 2)
    if members == 1:
        certified = b.sent(b.timer(0, "window", W), Certified)
    else:
        lead = b.timer(0, "window", W)
        prop = b.sent(lead, Proposal)
        for k in range(1, members):
            b.timer(k, "window", W)
            accept = b.sent(b.p[k].on_message(prop, W + 1), Accept)
            acts = b.p[0].on_message(accept, W + 2)
        certified = b.sent(acts, Certified)
    confirm = b.sent(b.s.on_message(certified, W + 3), Confirm)
    return b, certified, confirm, offers


# --- local calls ---------------------------------------------------------------------


def test_submit_returns_exactly_its_actions() -> None:
    b = Bench(3)
    assert b.s.submit(b.sm, T0) == [
        Subscribe(CFG.topic(b.job)), Publish(CFG.jobs_topic, b.sm.wire),
        SetTimer(key(b, "end"), T0 + CFG.formation_timeout_ms),
        SetTimer(key(b, "republish"), T0 + CFG.manifest_retry_ms)]
    p = b.s.progress(b.job)
    assert p is not None and (p.submitted_at_ms, p.deadline_ms, p.state) == (
        T0, T0 + CFG.formation_timeout_ms, SubmitterState.PUBLISHED)


def test_submit_deadline_is_the_manifest_expiry_when_sooner() -> None:
    b = Bench(3)
    s = Submitter(SUBMITTER, replace(CFG, formation_timeout_ms=10**9))
    acts = s.submit(b.sm, T0)
    assert SetTimer(key(b, "end"), b.sm.manifest.expires_at_ms) in acts
    assert s.progress(b.job).deadline_ms == b.sm.manifest.expires_at_ms  # type: ignore[union-attr]


def test_submit_sends_directly_to_the_expected_volunteers_but_itself() -> None:
    b = Bench(6)
    candidates = [n.peer_id for n in b.p] + [SUBMITTER.peer_id]
    acts = b.s.submit(b.sm, T0, candidates=candidates)
    direct = [a.peer_id for a in acts if isinstance(a, Send)]
    expected = [p for p in expected_volunteers(b.sm, candidates, CFG) if p != SUBMITTER.peer_id]
    assert direct == expected and len(direct) >= 1
    assert all(a.data == b.sm.wire for a in acts if isinstance(a, Send))
    assert isinstance(acts[0], Subscribe) and isinstance(acts[len(direct) + 1], Publish)


def test_submit_refusals() -> None:
    b = Bench(3)
    other = Submitter(Identity(bytes([201]) * 32), CFG)
    with pytest.raises(LocalProtocolError, match="this node did not sign that manifest"):
        other.submit(b.sm, T0)
    b.s.submit(b.sm, T0)
    with pytest.raises(LocalProtocolError, match="job already submitted"):
        b.s.submit(b.sm, T0)
    full = Submitter(SUBMITTER, replace(CFG, jobs_max=1))
    first = Bench(3, seed=8).sm
    full.submit(first, T0)
    with pytest.raises(LocalProtocolError, match="^1 jobs of this node are forming or running: wait for some to end$"):
        full.submit(b.sm, T0)
    full.cancel(first.job_id, T0)  # an ended job makes room: the oldest ended one is forgotten
    full.submit(b.sm, T0)
    assert list(full.jobs) == [b.job]
    one = Submitter(SUBMITTER, replace(CFG, jobs_max=2))
    one.submit(b.sm, T0)
    one.submit(Bench(3, seed=8).sm, T0)  # the second of two fits


def test_forget_drops_the_record() -> None:
    b = Bench(3)
    b.s.submit(b.sm, T0)
    b.s.forget(b.job)
    assert b.s.progress(b.job) is None and b.s.jobs == {}
    b.s.forget(b.job)  # twice is harmless
    assert b.s.submit(b.sm, T0)  # and the job may be submitted again


def test_cancel_before_a_confirm() -> None:
    b = Bench(3)
    b.s.submit(b.sm, T0)
    acts = b.s.cancel(b.job, T0 + 5, "changed my mind")
    cancel = b.sent(acts, Cancel)
    assert (cancel.reason, cancel.cancelled_at_ms, cancel.submitter) == ("changed my mind", T0 + 5, SUBMITTER.peer_id)
    assert acts == [Publish(CFG.topic(b.job), cancel.envelope.to_bytes()), CancelTimer(key(b, "end")),
                    CancelTimer(key(b, "republish")), Unsubscribe(CFG.topic(b.job)),
                    Cancelled(b.job, "changed my mind")]
    assert b.s.progress(b.job).state is SubmitterState.CANCELLED  # type: ignore[union-attr]
    assert b.s.cancel(b.job, T0 + 6) == []  # once only
    with pytest.raises(LocalProtocolError, match="no job 000000000000 was submitted here"):
        b.s.cancel("0" * 64, T0)


def test_cancel_after_a_confirm_tells_every_member() -> None:
    b, certified, _, _ = confirmed_bench(2)
    acts = b.s.cancel(b.job, W + 10)
    cancel = b.sent(acts, Cancel)
    data = cancel.envelope.to_bytes()
    assert cancel.reason == "cancelled by the submitter"
    members = certified.certificate.members
    assert acts[:1 + len(members)] == [Publish(CFG.topic(b.job), data), *[Send(m, data) for m in members]]
    assert acts[-1] == Cancelled(b.job, "cancelled by the submitter")


# --- timers ---------------------------------------------------------------------------


def test_timer_keys_are_checked() -> None:
    b = Bench(3)
    for bad in (TimerKey(TimerOwner.FORMATION, b.job, "end"), TimerKey(TimerOwner.SUBMITTER, b.job, "run"),
                TimerKey(TimerOwner.SETTLEMENT, b.job, "republish")):
        with pytest.raises(LocalProtocolError, match="not a submitter timer"):
            b.s.on_timer(bad, T0)
    for name in ("republish", "end", "forget"):
        assert b.s.on_timer(TimerKey(TimerOwner.SUBMITTER, "0" * 64, name), T0) == []  # an unknown job


def test_republish_until_the_cap() -> None:
    b = Bench(3)
    b.s.submit(b.sm, T0)
    republished = 0
    now = T0
    while True:
        now += CFG.manifest_retry_ms
        acts = b.s.on_timer(key(b, "republish"), now)
        if not acts:
            break
        assert acts == [Publish(CFG.jobs_topic, b.sm.wire), Emit("formation.manifest_republished"),
                        SetTimer(key(b, "republish"), now + CFG.manifest_retry_ms)]
        republished += 1
    assert republished == CFG.manifest_retries_max


def test_no_republish_once_enough_peers_offered() -> None:
    b = Bench(3, replicas=2)
    offers = start(b)
    b.s.on_message(offers[0], T0 + 2)
    assert b.s.on_timer(key(b, "republish"), T0 + 2_000) != []  # one offer of two needed
    b.s.on_message(offers[1], T0 + 2)
    assert b.s.on_timer(key(b, "republish"), T0 + 4_000) == []


def test_the_end_timer_before_and_at_the_deadline() -> None:
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    deadline = T0 + CFG.formation_timeout_ms
    assert b.s.on_timer(key(b, "end"), deadline - 1) == [SetTimer(key(b, "end"), deadline)]
    acts = b.s.on_timer(key(b, "end"), deadline)
    reason = "no cluster formed within 60 s: 0 matching peers with free GPUs offered, 2 needed"
    assert acts[-1] == Failed(b.job, reason)
    assert b.sent(acts, Cancel).reason == "formation timed out"
    p = b.s.progress(b.job)
    assert p is not None and (p.state, p.reason) == (SubmitterState.FAILED, reason)
    assert b.s.on_timer(key(b, "end"), deadline + 1) == []  # failed: nothing more


def test_the_failure_reason_counts_accepts_when_enough_offered() -> None:
    b = Bench(3, replicas=2)
    offers = start(b)
    for o in offers[:2]:
        b.s.on_message(o, T0 + 2)
    prop = b.sent(b.timer(0, "window", W), Proposal)
    accept = b.sent(b.p[1].on_message(prop, W + 1), Accept)
    b.s.on_message(accept, W + 2)
    acts = b.s.on_timer(key(b, "end"), T0 + CFG.formation_timeout_ms)
    assert acts[-1] == Failed(b.job, "no cluster formed within 60 s: 2 matching peers with free GPUs offered, "
                                     "2 needed; 1 accepted (the others were busy or unreachable)")


# --- certificates ------------------------------------------------------------------------


def _certified(b: Bench, members: int, gpus: int = 1, price: int = 0, lease: int = T0 + 10**6) -> Certified:
    lead = b.p[0].identity
    prop = Proposal.sign(lead, job_id=b.job, view=0, round=0, members=tuple(n.peer_id for n in b.p[:members]),
                         gpus_per_member=gpus)
    accepts = tuple(Accept.sign(n.identity, proposal=prop, lease_until_ms=lease, price_per_gpu_hour=price,
                                payout_address="") for n in b.p[:members])
    return Certified.sign(lead, Certificate(proposal=prop, accepts=accepts))


def test_a_certificate_must_fit_the_manifest_in_count_and_gpus() -> None:
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    for bad in (_certified(b, 3), _certified(b, 1), _certified(b, 2, gpus=2)):
        with pytest.raises(PeerMisbehaved) as err:
            b.s.on_message(bad, T0 + 5)
        assert (err.value.reason, err.value.detail) == (Reason.BAD_PROOF, "certificate does not fit the manifest")
    assert b.s.progress(b.job).state is SubmitterState.PUBLISHED  # type: ignore[union-attr]


def test_a_member_asking_more_than_the_ceiling_is_refused() -> None:
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    ceiling = b.sm.manifest.price_per_gpu_hour_max
    with pytest.raises(PeerMisbehaved) as err:
        b.s.on_message(_certified(b, 2, price=ceiling + 1), T0 + 5)
    assert (err.value.reason, err.value.detail) == (
        Reason.BAD_PROOF, f"{b.p[0].peer_id[:16]} asks more than the price ceiling")


def test_lease_margin_at_its_boundary() -> None:
    b = Bench(3)
    offers = start(b)
    for o in offers:
        b.s.on_message(o, T0 + 2)
    cert = b.sent(b.timer(0, "window", W), Certified)
    edge = cert.certificate.lease_until_ms - CFG.confirm_margin_ms
    assert b.s.on_message(cert, edge + 1) == [Emit("formation.certificate_refused")]
    assert b.s.progress(b.job).certificates_refused == 1  # type: ignore[union-attr]
    acts = b.s.on_message(cert, edge)
    confirm = b.sent(acts, Confirm)
    data = confirm.envelope.to_bytes()
    assert acts == [CancelTimer(key(b, "end")), CancelTimer(key(b, "republish")), Publish(CFG.topic(b.job), data),
                    Send(b.p[0].peer_id, data), Confirmed(b.job, cert.certificate, data)]
    assert confirm.confirmed_at_ms == edge


def test_every_field_of_progress() -> None:
    b, certified, _confirm, _offers = confirmed_bench(1)
    p = b.s.progress(b.job)
    assert p is not None
    assert (p.job_id, p.state, p.submitted_at_ms, p.deadline_ms, p.members_needed, p.offers, p.accepts,
            p.views_seen, p.certificates_refused, p.members, p.certificate_digest, p.confirmed_at_ms, p.reason,
            p.lost_members) == (
        b.job, SubmitterState.CONFIRMED, T0, T0 + CFG.formation_timeout_ms, 1, 3, 0, 0, 0,
        certified.certificate.members, certified.certificate.digest.hex(), W + 3, "", ())
    assert b.s.progress("0" * 64) is None


# --- answering peers still working on a decided job ---------------------------------------


def test_answers_are_rate_limited_per_peer() -> None:
    b, _, confirm, offers = confirmed_bench(1)
    late = offers[2]  # a volunteer that was not chosen asks again
    data = confirm.envelope.to_bytes()
    t = W + 100
    assert b.s.on_message(late, t) == [Send(late.peer_id, data)]
    assert b.s.on_message(late, t + CFG.accept_retry_ms // 2 - 1) == []
    assert b.s.on_message(late, t + CFG.accept_retry_ms // 2) == [Send(late.peer_id, data)]
    assert b.s.on_message(offers[1], t + 1) == [Send(offers[1].peer_id, data)]  # another peer: its own limit


def test_answers_are_capped_by_the_number_of_peers() -> None:
    cfg = replace(CFG, volunteers_max=2)
    b = Bench(3)
    s = Submitter(SUBMITTER, cfg)
    s.submit(b.sm, T0)
    s.cancel(b.job, T0 + 1)
    answered = [s.on_message(o, T0 + 2) for o in start_offers(b)]
    assert [len(a) for a in answered] == [1, 1, 0]  # the third peer is not answered: the table is full


def start_offers(b: Bench) -> list[Offer]:
    return [b.sent(node.on_manifest(b.sm, T0 + 1), Offer) for node in b.p]


def test_offers_are_capped_and_keep_the_highest_seq() -> None:
    cfg = replace(CFG, volunteers_max=2)
    b = Bench(3, replicas=3)
    s = Submitter(SUBMITTER, cfg)
    s.submit(b.sm, T0)
    offers = start_offers(b)
    for o in offers:
        assert s.on_message(o, T0 + 2) == []
    assert s.progress(b.job).offers == 2  # type: ignore[union-attr]
    assert list(s.jobs[b.job].offers) == [offers[0].peer_id, offers[1].peer_id]


def test_the_confirmed_certificate_again_is_only_answered() -> None:
    b, certified, confirm, _offers = confirmed_bench(1)
    # The same certificate again: only the answer (once per interval).
    assert b.s.on_message(certified, W + 10) == [Send(b.p[0].peer_id, confirm.envelope.to_bytes())]
    assert b.s.on_message(certified, W + 11) == []
    assert b.s.progress(b.job).certificates_refused == 0  # type: ignore[union-attr]


def test_a_decline_of_the_confirmed_cluster_is_a_member_lost_once() -> None:
    b, certified, _confirm, _ = confirmed_bench(2)
    cert = certified.certificate
    member = b.p[1]
    decline = Decline.sign(member.identity, job_id=b.job, view=cert.proposal.view, round=cert.proposal.round,
                           proposal=cert.proposal.digest, reason="lease expired and the GPUs are taken")
    assert b.s.on_message(decline, W + 10) == [MemberLost(b.job, member.peer_id,
                                                          "lease expired and the GPUs are taken")]
    assert b.s.on_message(decline, W + 11) == []  # once
    assert b.s.progress(b.job).lost_members == (member.peer_id,)  # type: ignore[union-attr]
    other_prop = Decline.sign(b.p[0].identity, job_id=b.job, view=0, round=7, proposal=b"\x01" * 32, reason="x")
    assert b.s.on_message(other_prop, W + 12) == []  # a decline of another proposal
    outsider = Decline.sign(b.p[2].identity, job_id=b.job, view=cert.proposal.view, round=cert.proposal.round,
                            proposal=cert.proposal.digest, reason="x")
    assert b.s.on_message(outsider, W + 13) == []  # not a member


def test_proposals_are_counted_by_view_and_kept_bounded() -> None:
    b = Bench(3, replicas=3)
    b.s.submit(b.sm, T0)
    lead = b.p[0].identity
    members = tuple(n.peer_id for n in b.p)
    props = [Proposal.sign(lead, job_id=b.job, view=v, round=r, members=members, gpus_per_member=1)
             for v, r in [(0, i) for i in range(proposals_kept_max)] + [(4, 0)]]
    for p in props:
        b.s.on_message(p, T0 + 5)
    job = b.s.jobs[b.job]
    assert b.s.progress(b.job).views_seen == 5  # type: ignore[union-attr]
    assert len(job.proposals) == proposals_kept_max and props[0].digest not in job.proposals
    assert props[-1].digest in job.proposals and props[1].digest in job.proposals
    b.s.on_message(props[1], T0 + 6)  # heard again: nothing changes
    assert len(job.proposals) == proposals_kept_max
    assert b.s.on_message(Proposal.sign(lead, job_id=b.job, view=1, round=0, members=members, gpus_per_member=1),
                          T0 + 7) == [] and b.s.progress(b.job).views_seen == 5  # type: ignore[union-attr]


def test_accepts_are_kept_for_a_bounded_number_of_proposals() -> None:
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    job = b.s.jobs[b.job]
    ident = b.p[1].identity
    for r in range(accepted_digests_max + 3):
        prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=r % 60000,
                             members=(b.p[0].peer_id, b.p[1].peer_id), gpus_per_member=1)
        b.s.on_message(Accept.sign(ident, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                                   payout_address=""), T0 + 5)
    assert len(job.accepted) == accepted_digests_max
    assert job.accepts == {b.p[1].peer_id: 0}


def test_the_submitter_assembles_a_certificate_from_the_accepts() -> None:
    b = Bench(3, replicas=2)
    offers = start(b)
    for o in offers:
        b.s.on_message(o, T0 + 2)
    prop, accepts = _cert_obj(b)
    assert b.s.on_message(prop, W) == []
    assert b.s.on_message(accepts[0], W + 1) == []  # one of two
    acts = b.s.on_message(accepts[1], W + 2)
    assert acts[0] == Emit("formation.assembled") and isinstance(acts[-1], Confirmed)
    assert acts[-1].certificate.proposal.digest == prop.digest


def test_an_accept_from_outside_the_proposal_is_only_answered() -> None:
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    prop, _accepts = _cert_obj(b)
    b.s.on_message(prop, W)
    stranger = Accept.sign(b.p[2].identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                           payout_address="")
    assert b.s.on_message(stranger, W + 1) == []
    assert b.p[2].peer_id not in b.s.jobs[b.job].accepted[prop.digest]


def test_an_assembled_certificate_that_does_not_fit_is_refused_without_blame() -> None:
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    ceiling = b.sm.manifest.price_per_gpu_hour_max
    lead = b.p[0].identity
    prop = Proposal.sign(lead, job_id=b.job, view=0, round=0, members=(b.p[0].peer_id, b.p[1].peer_id),
                         gpus_per_member=1)
    b.s.on_message(prop, W)
    b.s.on_message(Accept.sign(b.p[0].identity, proposal=prop, lease_until_ms=T0 + 10**6,
                               price_per_gpu_hour=ceiling + 1, payout_address=""), W + 1)
    acts = b.s.on_message(Accept.sign(b.p[1].identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                      price_per_gpu_hour=0, payout_address=""), W + 2)
    assert acts == [Emit("formation.certificate_refused")]
    assert b.s.progress(b.job).certificates_refused == 1  # type: ignore[union-attr]


def test_messages_of_other_jobs_and_echoes_are_ignored() -> None:
    b = Bench(3)
    b.s.submit(b.sm, T0)
    foreign = Bench(3, seed=9)
    assert b.s.on_message(foreign.sm, T0) == []
    offer = b.sent(foreign.p[0].on_manifest(foreign.sm, T0), Offer)
    assert b.s.on_message(offer, T0) == []
    cancel = Cancel.sign(SUBMITTER, job_id=b.job, reason="x", cancelled_at_ms=T0)
    assert b.s.on_message(decode_message(cancel.envelope.to_bytes()), T0) == []


def test_accepts_after_a_decision_are_not_counted_as_progress() -> None:
    b, certified, _, _ = confirmed_bench(2)
    before = b.s.progress(b.job).accepts  # type: ignore[union-attr]
    prop = certified.certificate.proposal
    late = Accept.sign(b.p[2].identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                       payout_address="")
    b.s.on_message(late, W + 10)
    assert b.s.progress(b.job).accepts == before  # type: ignore[union-attr]


def test_the_answer_interval_is_a_whole_half() -> None:
    cfg = replace(CFG, accept_retry_ms=501)
    b = Bench(3)
    s = Submitter(SUBMITTER, cfg)
    s.submit(b.sm, T0)
    s.cancel(b.job, T0 + 1)
    offer = start_offers(b)[0]
    assert len(s.on_message(offer, T0 + 10)) == 1
    assert s.on_message(offer, T0 + 10 + 249) == []
    assert len(s.on_message(offer, T0 + 10 + 250)) == 1  # 501 // 2


def test_the_answered_table_is_capped() -> None:
    cfg = replace(CFG, volunteers_max=2)
    b = Bench(3, replicas=3)
    s = Submitter(SUBMITTER, cfg)
    s.submit(b.sm, T0)
    s.cancel(b.job, T0 + 1)
    prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=0, members=tuple(n.peer_id for n in b.p),
                         gpus_per_member=1)
    answered = [s.on_message(Accept.sign(n.identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                         price_per_gpu_hour=0, payout_address=""), T0 + 2) for n in b.p]
    assert [len(a) for a in answered] == [1, 1, 0]
    assert len(s.on_message(Accept.sign(b.p[0].identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                        price_per_gpu_hour=0, payout_address=""), T0 + 2 + CFG.accept_retry_ms)) == 1


def test_a_price_at_the_ceiling_is_confirmed() -> None:
    b = Bench(3, replicas=2)
    for o in start(b):
        b.s.on_message(o, T0 + 2)
    ceiling = b.sm.manifest.price_per_gpu_hour_max
    acts = b.s.on_message(_certified(b, 2, price=ceiling), T0 + 5)
    assert isinstance(acts[-1], Confirmed)


def test_a_proposal_that_does_not_fit_is_never_assembled() -> None:
    for members, gpus in ((2, 2), (3, 1)):
        b = Bench(3, replicas=2)
        b.s.submit(b.sm, T0)
        prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=0,
                             members=tuple(n.peer_id for n in b.p[:members]), gpus_per_member=gpus)
        b.s.on_message(prop, W)
        acts = [b.s.on_message(Accept.sign(n.identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                           price_per_gpu_hour=0, payout_address=""), W + 1) for n in b.p[:members]]
        assert acts == [[]] * members
        assert b.s.progress(b.job).certificates_refused == 0  # type: ignore[union-attr]


def test_refusals_are_counted_one_by_one() -> None:
    b = Bench(3)
    offers = start(b)
    for o in offers:
        b.s.on_message(o, T0 + 2)
    cert = b.sent(b.timer(0, "window", W), Certified)
    late = cert.certificate.lease_until_ms
    b.s.on_message(cert, late)
    b.s.on_message(cert, late + 1)
    assert b.s.progress(b.job).certificates_refused == 2  # type: ignore[union-attr]

    # After a confirm, each other certificate is refused and counted too.
    c = Bench(3)
    for o in start(c):
        c.s.on_message(o, T0 + 2)
    lt = CFG.leader_timeout_ms
    cert0 = c.sent(c.timer(0, "window", W), Certified)
    c.timer(1, "window", W)
    c.timer(2, "window", W)
    cert1 = c.sent(c.timer(1, "view", W + lt), Certified)
    c.timer(2, "view", W + lt)
    cert2 = c.sent(c.timer(2, "view", W + 2 * lt), Certified)
    assert isinstance(c.s.on_message(cert0, W + 2 * lt)[-1], Confirmed)
    c.s.on_message(cert1, W + 2 * lt + 1)
    c.s.on_message(cert2, W + 2 * lt + 2)
    assert c.s.progress(c.job).certificates_refused == 2  # type: ignore[union-attr]


def test_every_refused_assembled_certificate_is_counted() -> None:
    """``_assemble__mutmut_30`` (``refused += 1`` to ``= 1``): two assembled
    certificates refused are two (``job status`` shows the count)."""
    b = Bench(3, replicas=2)
    b.s.submit(b.sm, T0)
    ceiling = b.sm.manifest.price_per_gpu_hour_max
    for rnd in (0, 1):
        prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=rnd,
                             members=(b.p[0].peer_id, b.p[1].peer_id), gpus_per_member=1)
        b.s.on_message(prop, W + 10 * rnd)
        b.s.on_message(Accept.sign(b.p[0].identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                   price_per_gpu_hour=ceiling + 1, payout_address=""), W + 10 * rnd + 1)
        acts = b.s.on_message(Accept.sign(b.p[1].identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                          price_per_gpu_hour=0, payout_address=""), W + 10 * rnd + 2)
        assert acts == [Emit("formation.certificate_refused")]
        assert b.s.progress(b.job).certificates_refused == rnd + 1  # type: ignore[union-attr]


def _offer_of_another_network(b: Bench, k: int) -> Offer:
    node = b.p[k]
    advert = replace(make_advert(node.identity, gpus=1, model="NVIDIA A100"), network="elsewhere")
    return Offer.sign(node.identity, job_id=b.job, seq=1, gpus_free=1, price_per_gpu_hour=1000,
                      advert=sign_advert(node.identity, advert))


def test_an_offer_whose_advert_is_of_another_network_is_ineligible_and_told_how_the_job_ended() -> None:
    """``on_message__mutmut_16``, ``_20`` (the submitter's network dropped
    from the advert check: a peer of another network would be a volunteer)
    and ``_27`` (the answer to that peer sent to nobody)."""
    b = Bench(3)
    s = Submitter(SUBMITTER, replace(CFG, network="local"), adverts=b.s.lookup)
    s.submit(b.sm, T0)
    assert s.on_message(_offer_of_another_network(b, 1), T0 + 2) == [Emit("formation.offer_ineligible")]
    assert s.progress(b.job).offers == 0  # type: ignore[union-attr]
    s.cancel(b.job, T0 + 3)
    acts = s.on_message(_offer_of_another_network(b, 2), T0 + 4)
    assert acts[0] == Emit("formation.offer_ineligible")
    assert [a.peer_id for a in acts[1:] if isinstance(a, Send)] == [b.p[2].peer_id]


def test_the_advert_of_a_peer_for_a_job_not_ours_is_the_books() -> None:
    """``advert_of__mutmut_5`` (an unknown job's record looked up anyway)."""
    b = Bench(2)
    assert b.s.advert_of("00" * 32, b.p[1].peer_id) == b.s.lookup(b.p[1].peer_id) is not None


def test_a_certificate_refused_for_short_leases_says_so() -> None:
    """``_check__mutmut_20``: the refusal's words reach ``job status``."""
    b = Bench(3)
    offers = start(b)
    for o in offers:
        b.s.on_message(o, T0 + 2)
    cert = b.sent(b.timer(0, "window", W), Certified)
    b.s.on_message(cert, cert.certificate.lease_until_ms - CFG.confirm_margin_ms + 1)
    assert b.s.progress(b.job).refusal == "leases too short"  # type: ignore[union-attr]


def test_a_members_refused_hardware_claim_counts_for_the_advert_its_offer_carried() -> None:
    """``_check__mutmut_50`` (the claim check given the book's advert only):
    a submitter with no advert book knows its volunteers by the adverts
    their offers carried, and a member whose GPU claim this node refused is
    not confirmed, whichever way its advert reached us."""
    b = Bench(1)

    def refused(advert: Any, now_ms: int) -> Any:
        return replace(advert, gpus=(), gpus_free=0)  # its GPU claim failed here

    s = Submitter(SUBMITTER, CFG, claims=refused)
    s.submit(b.sm, T0)
    for o in start(b):
        s.on_message(o, T0 + 2)
    cert = b.sent(b.timer(0, "window", W), Certified)
    assert s.on_message(cert, W + 1) == [Emit("formation.certificate_refused")]
    assert "its GPU claim failed this node's hardware challenge" in s.progress(b.job).refusal  # type: ignore[union-attr]


def test_a_decided_job_is_forgotten_a_lease_and_its_grace_after_its_deadline() -> None:
    """``forget_at_ms__mutmut_2`` (``+ lease_ms`` to ``- lease_ms``: the job
    forgotten while a volunteer may still hold a lease for it)."""
    b = Bench(1)
    b.s.submit(b.sm, T0)
    job = b.s.jobs[b.job]
    assert job.forget_at_ms(CFG) == job.deadline_ms + CFG.lease_ms + CFG.lease_grace_ms


def test_a_submitter_without_an_advert_book_refuses_members_it_never_heard_of() -> None:
    """``__init____mutmut_6`` (the default lookup answering 0 instead of
    None: a certificate naming a peer whose offer never came would raise
    instead of being refused)."""
    b = Bench(1)
    s = Submitter(SUBMITTER, CFG)
    s.submit(b.sm, T0)
    start(b)
    cert = b.sent(b.timer(0, "window", W), Certified)
    assert s.on_message(cert, W + 1) == [Emit("formation.certificate_refused")]
    assert s.progress(b.job).refusal.startswith(f"member {b.p[0].peer_id[:16]}: ")  # type: ignore[union-attr]


def test_an_ineligible_volunteer_is_answered_at_most_every_half_retry_interval() -> None:
    """``on_message__mutmut_28`` (the answer's time dropped: its rate limit
    never applied)."""
    b = Bench(3)
    s = Submitter(SUBMITTER, replace(CFG, network="local"), adverts=b.s.lookup)
    s.submit(b.sm, T0)
    s.cancel(b.job, T0 + 3)
    offer = _offer_of_another_network(b, 2)
    assert any(isinstance(a, Send) for a in s.on_message(offer, T0 + 4))
    assert s.on_message(offer, T0 + 5) == [Emit("formation.offer_ineligible")]


def test_accepts_for_a_proposal_not_seen_yet_are_kept_members_many() -> None:
    """``on_message__mutmut_76`` (``and`` to ``or``): accepts that arrive
    before their proposal are kept for at most as many peers as the job has
    members."""
    b = Bench(3)
    b.s.submit(b.sm, T0)
    prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=0, members=(b.p[0].peer_id,),
                         gpus_per_member=1)
    for n in b.p:
        b.s.on_message(Accept.sign(n.identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                                   payout_address=""), T0 + 5)
    assert len(b.s.jobs[b.job].accepted[prop.digest]) == b.sm.manifest.members == 1


def test_a_strangers_accept_takes_no_members_place() -> None:
    """In a one-member job, a stranger's accept arriving first does not take
    the only place: the member's accept still completes the certificate."""
    b = Bench(3)
    for o in start(b):
        b.s.on_message(o, T0 + 2)
    prop = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=0, members=(b.p[0].peer_id,),
                         gpus_per_member=1)
    b.s.on_message(prop, W)
    stranger = Accept.sign(b.p[2].identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                           payout_address="")
    b.s.on_message(stranger, W + 1)
    acts = b.s.on_message(Accept.sign(b.p[0].identity, proposal=prop, lease_until_ms=T0 + 10**6,
                                      price_per_gpu_hour=0, payout_address=""), W + 2)
    assert Emit("formation.assembled") in acts


def test_an_accept_of_a_tracked_proposal_counts_when_the_accepts_table_is_full() -> None:
    """``on_message__mutmut_53``, ``_54`` (the proposal of an accept not
    looked up among the tracked ones): once accepts of
    ``accepted_digests_max`` proposals are held, an accept of a proposal
    already tracked is still kept, and here it completes the certificate.
    Looked up as unknown, it was dropped as if it opened a new entry, and the
    job waited for the leader's ``Certified``."""
    b = Bench(3, replicas=2)
    for o in start(b):
        b.s.on_message(o, T0 + 2)
    prop, accepts = _cert_obj(b)
    b.s.on_message(prop, W)
    assert b.s.on_message(accepts[0], W + 1) == []  # one of two: the proposal is now tracked
    job = b.s.jobs[b.job]
    for r in range(1, accepted_digests_max):  # fill the table with accepts of other proposals
        other = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=r,
                              members=(b.p[0].peer_id, b.p[2].peer_id), gpus_per_member=1)
        b.s.on_message(Accept.sign(b.p[2].identity, proposal=other, lease_until_ms=T0 + 10**6,
                                   price_per_gpu_hour=0, payout_address=""), W + 2)
    assert len(job.accepted) == accepted_digests_max and prop.digest in job.accepted
    acts = b.s.on_message(accepts[1], W + 3)
    assert acts[0] == Emit("formation.assembled") and isinstance(acts[-1], Confirmed)
    assert acts[-1].certificate.proposal.digest == prop.digest
    assert job.state is SubmitterState.CONFIRMED


# --- survivors of the sample of 300 at a4f05dc ---------------------------------------------


def test_the_accepts_counted_are_capped_at_volunteers_max() -> None:
    """``on_message__mutmut_51`` (``<`` to ``<=``): the table of who
    accepted (its size is ``progress().accepts``) holds at most
    ``volunteers_max`` peers, not one more."""
    b = Bench(3, replicas=2)
    b.s.config = replace(CFG, volunteers_max=2)
    b.s.submit(b.sm, T0)
    prop, _accepts = _cert_obj(b)
    for n in b.p:
        b.s.on_message(Accept.sign(n.identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                                   payout_address=""), T0 + 5)
    assert list(b.s.jobs[b.job].accepts) == [b.p[0].peer_id, b.p[1].peer_id]
    assert b.s.progress(b.job).accepts == 2  # type: ignore[union-attr]


def test_progress_of_a_job_without_a_certificate() -> None:
    """``progress__mutmut_45``: no certificate, no digest (``""``), no members."""
    b = Bench(3)
    b.s.submit(b.sm, T0)
    p = b.s.progress(b.job)
    assert p is not None and (p.state, p.members, p.certificate_digest, p.confirmed_at_ms) == (
        SubmitterState.PUBLISHED, (), "", None)


def test_a_restored_confirmed_job_is_known_field_by_field() -> None:
    """``restore_confirmed__mutmut_11``, ``_31``, ``_37``: a job restored as
    confirmed keeps its manifest, its confirmation time and its forget timer
    (without the timer, a restarted submitter kept the job for ever)."""
    b, certified, confirm, _offers = confirmed_bench(1)
    again = Submitter(SUBMITTER, CFG, adverts=b.s.lookup)
    acts = again.restore_confirmed(b.sm, certified.certificate, W + 3)
    m = b.sm.manifest
    deadline = min(m.expires_at_ms, m.created_at_ms + CFG.formation_timeout_ms)
    assert acts == [SetTimer(key(b, "forget"), deadline + CFG.lease_ms + CFG.lease_grace_ms)]
    p = again.progress(b.job)
    assert p is not None
    assert (p.state, p.members_needed, p.members, p.certificate_digest, p.confirmed_at_ms, p.deadline_ms) == (
        SubmitterState.CONFIRMED, 1, certified.certificate.members, certified.certificate.digest.hex(), W + 3,
        deadline)
    assert again.jobs[b.job].confirm.envelope.to_bytes() == confirm.envelope.to_bytes()  # type: ignore[union-attr]


def test_a_job_resumed_past_its_deadline_cancels_saying_the_submitter_restarted() -> None:
    """``resume__mutmut_46``, ``_47``: the CANCEL that frees the volunteers
    says why, in words a member's log shows."""
    b = Bench(3)
    s = Submitter(SUBMITTER, CFG, adverts=b.s.lookup)
    acts = s.resume(b.sm, T0, T0 + CFG.formation_timeout_ms)
    cancel = b.sent(acts, Cancel)
    assert cancel.reason == "the submitter restarted" and cancel.job_id == b.job
    assert isinstance(acts[-1], Failed) and s.progress(b.job).state is SubmitterState.FAILED  # type: ignore[union-attr]
