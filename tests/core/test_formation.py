"""Cluster formation, table-driven: one event in, the exact actions out.

Peers are named by their rank for the job (``P0`` leads view 0, ``P1`` view
1, ...), the submitter is ``S``.  Each scenario is a table of steps: which core
gets which event, and the summary of the actions it must return (``send
accept>P0`` is a Send of an ACCEPT to P0, ``timer view`` a SetTimer of the view
timer, ...).  The decoders get Hypothesis at the end.
"""

from __future__ import annotations

from dataclasses import replace
from random import Random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import Identity, Kind, LocalProtocolError, PeerMisbehaved, Reason, TimerKey, TimerOwner, seal
from p2pgpu.core._actions import (
    Action,
    CancelTimer,
    Emit,
    MemberLost,
    Publish,
    Released,
    Send,
    SetTimer,
    StartJob,
)
from p2pgpu.core._formation import FormationConfig, FormationNode, leader_rank
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
from p2pgpu.core._formation_states import (
    SUBMITTER_TRANSITIONS,
    WORKER_TRANSITIONS,
    SubmitterState,
    WorkerState,
    advance,
)
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._manifest import SignedManifest


def fkey(job_id: str, name: str) -> TimerKey:
    """A formation timer's key."""
    return TimerKey(TimerOwner.FORMATION, job_id, name)

try:
    from .swarm import Swarm, make_advert, make_manifest
except ImportError:  # tests/core is not a package: pytest put this directory on sys.path
    from swarm import Swarm, make_advert, make_manifest  # type: ignore[no-redef]

CFG = FormationConfig()
T0 = 1_000_000
SUBMITTER = Identity(bytes([200]) * 32)


class Bench:
    """A submitter, one job, and ``n`` worker nodes named by rank."""

    def __init__(self, n: int = 3, *, nodes: int = 1, replicas: int = 1, gpus: int = 1, seed: int = 7) -> None:
        self.sm: SignedManifest = make_manifest(SUBMITTER, Random(seed), now_ms=T0, nodes=nodes, replicas=replicas)
        self.job = self.sm.job_id
        ids = sorted((Identity(bytes([i + 1]) * 32) for i in range(n)),
                     key=lambda i: leader_rank(self.job, i.peer_id))
        # Every advert book knows every worker (as a node's does once gossip settled).
        adverts = {i.peer_id: make_advert(i, gpus=gpus, model="NVIDIA A100") for i in ids}
        self.p = [FormationNode(i, adverts[i.peer_id], CFG, adverts=adverts.get) for i in ids]
        self.s = Submitter(SUBMITTER, CFG, adverts=adverts.get)
        self.names = {node.peer_id: f"P{k}" for k, node in enumerate(self.p)} | {SUBMITTER.peer_id: "S"}

    def summary(self, actions: list[Action]) -> list[str]:
        out = []
        for a in actions:
            if isinstance(a, Send):
                out.append(f"send {type(decode_message(a.data)).__name__.lower()}>{self.names[a.peer_id]}")
            elif isinstance(a, Publish):
                out.append(f"publish {type(decode_message(a.data)).__name__.lower()}")
            elif isinstance(a, SetTimer):
                out.append(f"timer {a.key.name}")
            elif isinstance(a, CancelTimer):
                out.append(f"cancel {a.key.name}")
            elif isinstance(a, Emit):
                out.append(f"emit {a.metric.split('.')[-1]}")
            elif isinstance(a, Released):
                out.append(f"released ({a.reason})")
            else:
                out.append(type(a).__name__.lower())
        return out

    def sent(self, actions: list[Action], kind: type) -> Any:
        """The one message of ``kind`` among the actions."""
        found = [decode_message(a.data) for a in actions if isinstance(a, (Send, Publish))
                 and isinstance(decode_message(a.data), kind)]
        assert found, f"no {kind.__name__} in {self.summary(actions)}"
        return found[0]

    def timer(self, k: int, name: str, now_ms: int) -> list[Action]:
        return self.p[k].on_timer(fkey(self.job, name), now_ms)


def start(b: Bench) -> list[Offer]:
    """Submit, let every node see the manifest and every offer."""
    b.s.submit(b.sm, T0)
    offers = [b.sent(node.on_manifest(b.sm, T0 + 1), Offer) for node in b.p]
    for node in b.p:
        for o in offers:
            node.on_message(o, T0 + 2)
    return offers


MANIFEST_IN = ["timer end", "subscribe", "publish offer", "timer window"]
def leads(*members: str) -> list[str]:
    """A leader proposes: on the topic, and directly to the other members and
    the submitter; it accepts its own proposal and tells the submitter."""
    return ["cancel round", "timer view", "publish proposal", *[f"send proposal>{m}" for m in (*members, "S")],
            "timer round", "timer view", "reserved", "timer lease", "send accept>S"]


def follows(leader: str = "P0") -> list[str]:
    """A follower starts a view and hands its offer to the view's leader."""
    return ["cancel round", "timer view", f"send offer>{leader}"]


ACCEPTS = ["timer view", "reserved", "timer lease", "timer retry", "send accept>P0", "send accept>S"]
CERTIFIES = ["cancel round", "send certified>S", "timer retry", "timer view", "emit certified"]
CONFIRMS_P0_P1 = ["cancel end", "cancel republish", "publish confirm", "send confirm>P0", "send confirm>P1",
                  "confirmed"]
STARTS = ["cancel window", "cancel view", "cancel round", "cancel retry", "cancel lease", "timer run", "startjob"]


def test_normal_formation() -> None:
    b = Bench(3, nodes=2)
    assert b.summary(b.s.submit(b.sm, T0)) == ["subscribe", "publish signedmanifest", "timer end", "timer republish"]
    offers = []
    for node in b.p:
        acts = node.on_manifest(b.sm, T0 + 1)
        assert b.summary(acts) == MANIFEST_IN
        assert node.state(b.job) is WorkerState.OFFERED
        offers.append(b.sent(acts, Offer))
    assert all(b.s.on_message(o, T0 + 2) == [] for o in offers)
    for node in b.p:
        assert all(node.on_message(o, T0 + 2) == [] for o in offers)
    w = T0 + 1 + CFG.offer_window_ms
    lead = b.timer(0, "window", w)
    assert b.summary(lead) == leads("P1")
    prop = b.sent(lead, Proposal)
    assert (prop.view, prop.round, prop.leader, prop.members) == (0, 0, b.p[0].peer_id,
                                                                   (b.p[0].peer_id, b.p[1].peer_id))
    assert b.summary(b.timer(1, "window", w)) == follows()
    assert b.summary(b.timer(2, "window", w)) == follows()
    steps = [
        (b.p[1], prop, ACCEPTS),
        (b.p[2], prop, ["timer view"]),
    ]
    for node, msg, expected in steps:
        acts = node.on_message(msg, w + 5)
        assert b.summary(acts) == expected
    # The same proposal again at once (the topic's copy of the direct one) is not answered twice ...
    assert b.summary(b.p[1].on_message(prop, w + 6)) == ["timer view"]
    # ... a repeat later gets the same accept back.
    accept = b.sent(b.p[1].on_message(prop, w + 5 + CFG.accept_retry_ms // 2), Accept)
    assert accept.proposal == prop.digest and accept.gpus == 1
    assert b.s.on_message(accept, w + 6) == []  # progress only
    cert_acts = b.p[0].on_message(accept, w + 6)
    assert b.summary(cert_acts) == CERTIFIES
    certified = b.sent(cert_acts, Certified)
    assert b.p[0].state(b.job) is WorkerState.CERTIFIED
    confirm_acts = b.s.on_message(certified, w + 7)
    assert b.summary(confirm_acts) == CONFIRMS_P0_P1
    confirm = b.sent(confirm_acts, Confirm)
    assert b.s.progress(b.job).state is SubmitterState.CONFIRMED  # type: ignore[union-attr]
    for k in (0, 1):
        acts = b.p[k].on_message(confirm, w + 8)
        assert b.summary(acts) == STARTS
        start_job = next(a for a in acts if isinstance(a, StartJob))
        assert start_job.member_index == k and start_job.certificate.digest == certified.certificate.digest
        assert b.p[k].state(b.job) is WorkerState.RUNNING and b.p[k].gpus_free == 0
        assert b.p[k].certificate(b.job) == certified.certificate
    assert b.summary(b.p[2].on_message(confirm, w + 8)) == [
        "cancel window", "cancel view", "cancel round", "cancel retry",
        "cancel window", "cancel view", "cancel round", "cancel retry", "cancel lease", "cancel run", "cancel late",
        "cancel stop", "unsubscribe"]
    assert b.p[2].state(b.job) is WorkerState.CLOSED and b.p[2].gpus_free == 1
    # Finishing frees the GPUs.
    assert b.summary(b.p[1].finish(b.job, w + 5000))[-2:] == ["unsubscribe", "released (finished)"]
    assert b.p[1].gpus_free == 1 and b.p[1].state(b.job) is None


def test_leader_silent_next_in_rank_takes_over_with_a_higher_view() -> None:
    b = Bench(3)
    b.s.submit(b.sm, T0)
    offers = [b.sent(node.on_manifest(b.sm, T0), Offer) for node in b.p]
    for node in b.p[1:]:  # P0 crashed after offering: it never speaks again
        for o in offers:
            node.on_message(o, T0 + 1)
    w = T0 + CFG.offer_window_ms
    assert b.summary(b.timer(1, "window", w)) == follows()
    assert b.summary(b.timer(2, "window", w)) == follows()
    v = w + CFG.leader_timeout_ms
    lead = b.timer(1, "view", v)
    assert b.summary(lead) == ["emit view_change", "send offer>S"] + leads() + [
        "cancel round", "send certified>S", "timer retry", "timer view",
        "emit certified"]
    prop = b.sent(lead, Proposal)
    assert (prop.view, prop.leader, prop.members) == (1, b.p[1].peer_id, (b.p[1].peer_id,))
    assert b.summary(b.timer(2, "view", v)) == ["emit view_change", "send offer>S"] + follows("P1")
    assert b.summary(b.p[2].on_message(prop, v + 1)) == ["timer view"]
    confirm_acts = b.s.on_message(b.sent(lead, Certified), v + 2)
    assert "confirmed" in b.summary(confirm_acts)


def test_member_refuses_and_is_replaced() -> None:
    b = Bench(3, replicas=2)
    start(b)
    assert b.p[1].ledger.reserve("e" * 64, 1, T0 + 10**9)  # P1's only GPU is taken by another job
    w = T0 + 1 + CFG.offer_window_ms
    prop0 = b.sent(b.timer(0, "window", w), Proposal)
    assert prop0.members == (b.p[0].peer_id, b.p[1].peer_id)
    refuse = b.p[1].on_message(prop0, w + 1)
    assert b.summary(refuse) == ["cancel window", "timer view", "send decline>P0", "emit decline_sent"]
    decline = b.sent(refuse, Decline)
    assert decline.reason == "no free capacity"
    again = b.p[0].on_message(decline, w + 2)
    assert b.summary(again) == ["emit declined", "publish proposal", "send proposal>P2", "send proposal>S",
                                "timer round", "timer view", "reserved", "timer lease", "send accept>S"]
    prop1 = b.sent(again, Proposal)
    assert (prop1.view, prop1.round, prop1.members) == (0, 1, (b.p[0].peer_id, b.p[2].peer_id))
    accept = b.sent(b.p[2].on_message(prop1, w + 3), Accept)
    assert b.summary(b.p[0].on_message(accept, w + 4)) == CERTIFIES
    assert b.p[1].ledger.holds.keys() == {"e" * 64}  # P1 promised nothing more


def test_member_silent_is_replaced_after_member_timeout() -> None:
    b = Bench(3, replicas=2)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    prop0 = b.sent(b.timer(0, "window", w), Proposal)
    # P1 never answers.
    again = b.timer(0, "round", w + CFG.member_timeout_ms)
    assert b.summary(again) == ["emit member_silent", "publish proposal", "send proposal>P2", "send proposal>S",
                                "timer round", "timer view", "reserved", "timer lease", "send accept>S"]
    prop1 = b.sent(again, Proposal)
    assert prop1.round == 1 and b.p[1].peer_id not in prop1.members
    # P1's accept of the old proposal arrives late: it counts for nothing.
    late = b.sent(b.p[1].on_message(prop0, w + 200), Accept)
    assert b.summary(b.p[0].on_message(late, w + 201)) == ["emit accept_stale"]
    # P1 sees the newer proposal that leaves it out: it keeps its lease until a confirm or expiry.
    assert b.summary(b.p[1].on_message(prop1, w + 202)) == ["timer view"]
    accept = b.sent(b.p[2].on_message(prop1, w + 203), Accept)
    certified = b.sent(b.p[0].on_message(accept, w + 204), Certified)
    confirm = b.sent(b.s.on_message(certified, w + 205), Confirm)
    assert b.summary(b.p[1].on_message(confirm, w + 206))[-2:] == ["unsubscribe",
                                                                   "released (another cluster was confirmed)"]
    assert b.p[1].gpus_free == 1


def test_late_accept_after_a_view_change() -> None:
    b = Bench(3, replicas=2)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    prop0 = b.sent(b.timer(0, "window", w), Proposal)
    assert b.summary(b.timer(1, "window", w)) == follows()
    late = b.sent(b.p[1].on_message(prop0, w + 1), Accept)  # delayed in the network
    v = w + 1 + CFG.leader_timeout_ms
    # P0's view times out (it lost its own accept's round too): view 1 belongs to P1.
    assert b.summary(b.timer(0, "view", v)) == ["emit view_change", "send offer>S"] + follows("P1")
    lead = b.timer(1, "view", v)
    prop1 = b.sent(lead, Proposal)
    assert (prop1.view, prop1.leader) == (1, b.p[1].peer_id)
    assert b.summary(b.p[0].on_message(late, v + 1)) == ["emit accept_stale"]
    assert b.p[0].state(b.job) is WorkerState.FOLLOWING
    # P1 held a lease for view 0 and now leads view 1 with itself in it: the hold moved, it did not double.
    assert prop1.members == (b.p[1].peer_id, b.p[2].peer_id) and b.p[1].ledger.reserved == 1
    assert b.summary(b.p[0].on_message(prop1, v + 2)) == ["timer view"]  # not a member: keeps its lease
    accept = b.sent(b.p[2].on_message(prop1, v + 2), Accept)
    assert accept.view == 1
    assert "send certified>S" in b.summary(b.p[1].on_message(accept, v + 3))


@pytest.mark.parametrize("seed", range(8))
def test_two_jobs_competing_for_the_same_peers_never_share_capacity(seed: int) -> None:
    """Two 2-member jobs submitted at once to two 1-GPU peers: one forms, the
    other fails with a reason; the swarm checks after every step that no peer
    holds more than its GPU, and that only one cluster per job is confirmed."""
    swarm = Swarm(seed, workers=2, submitters=2, gpus=(1,), delay_ms=(1, 3))
    jobs = [swarm.submit_at(0, swarm.submitter_ids[i], replicas=2) for i in range(2)]
    swarm.run(CFG.formation_timeout_ms + 1000)
    assert len(swarm.confirmed) == 1
    (formed,) = swarm.confirmed
    (other,) = [j for j in jobs if j != formed]
    assert sorted(swarm.started[formed]) == sorted(swarm.workers)
    assert "2 matching peers with free GPUs offered, 2 needed" in swarm.failed[other]
    for pid in swarm.workers:
        node = swarm.peers[pid].node
        assert node is not None and list(node.ledger.holds) == [formed]
        assert node.state(other) is WorkerState.CLOSED  # the failed job's CANCEL freed everything


def test_leader_of_a_dead_proposal_frees_its_own_gpus_for_another_job() -> None:
    """Two leaders each holding their own GPU for their own job decline each
    other: each frees its GPU for its dead proposal and volunteers again."""
    b = Bench(2, replicas=2)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    prop = b.sent(b.timer(0, "window", w), Proposal)
    assert b.p[1].ledger.reserve("e" * 64, 1, T0 + 10**9)  # P1's GPU went to another job meanwhile
    decline = b.sent(b.p[1].on_message(prop, w + 1), Decline)
    acts = b.p[0].on_message(decline, w + 2)
    assert b.summary(acts) == ["emit declined", "emit too_few_volunteers", "cancel lease",
                               "released (own proposal abandoned)"]
    assert b.p[0].gpus_free == 1 and b.p[0].state(b.job) is WorkerState.LEADING
    # When P1 frees its GPU it offers again (newer seq): P0 proposes again at once.
    b.p[1].ledger.release("e" * 64)
    again = b.p[1].update_advert(b.p[1]._advert, w + 3)
    offer = b.sent(again, Offer)
    assert offer.seq == 2
    assert "publish proposal" in b.summary(b.p[0].on_message(offer, w + 4))


def test_a_job_passed_over_for_lack_of_gpus_gets_an_offer_when_they_free() -> None:
    b = Bench(1)
    other = make_manifest(SUBMITTER, Random(99), now_ms=T0)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert = b.sent(b.timer(0, "window", w), Certified)  # P0 holds its GPU for b.job
    assert b.summary(b.p[0].on_manifest(other, w + 1)) == ["timer end"]  # no free GPU: no offer
    assert b.p[0].state(other.job_id) is WorkerState.SEEN
    lapse = cert.certificate.lease_until_ms + CFG.lease_grace_ms
    acts = b.p[0].on_timer(fkey(b.job, "lease"), lapse)  # never confirmed
    assert b.summary(acts) == ["released (lease expired)", "subscribe", "publish offer", "timer window"]
    assert b.p[0].state(other.job_id) is WorkerState.OFFERED


def test_unconfirmed_lease_expires_and_frees_capacity() -> None:
    b = Bench(2, replicas=2)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    prop = b.sent(b.timer(0, "window", w), Proposal)
    accept = b.sent(b.p[1].on_message(prop, w + 1), Accept)
    assert b.p[1].gpus_free == 0 and accept.lease_until_ms == w + 1 + CFG.lease_ms
    # The accept is resent while unconfirmed.
    assert b.summary(b.timer(1, "retry", w + 1 + CFG.accept_retry_ms)) == ["send accept>P0", "send accept>S",
                                                                           "timer retry"]
    early = b.timer(1, "lease", accept.lease_until_ms)
    assert b.summary(early) == ["timer lease"] and b.p[1].gpus_free == 0
    assert b.summary(b.timer(1, "lease", accept.lease_until_ms + CFG.lease_grace_ms)) == [
        "released (lease expired)"]
    assert b.p[1].gpus_free == 1


def test_submitter_confirms_exactly_one_certificate() -> None:
    b = Bench(3)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert0 = b.sent(b.timer(0, "window", w), Certified)  # 1 member: P0 certifies itself
    b.timer(1, "window", w)
    cert1 = b.sent(b.timer(1, "view", w + CFG.leader_timeout_ms), Certified)  # a competing view 1
    assert cert0.certificate.digest != cert1.certificate.digest
    first = b.s.on_message(cert1, w + 500)
    assert "confirmed" in b.summary(first)
    second = b.s.on_message(cert0, w + 501)
    assert b.summary(second) == ["emit certificate_refused", "send confirm>P0"]  # told how it ended
    assert b.s.progress(b.job).certificates_refused == 1  # type: ignore[union-attr]
    confirm = b.sent(first, Confirm)
    assert b.summary(b.p[0].on_message(confirm, w + 502))[-1] == "released (another cluster was confirmed)"
    assert b.summary(b.p[0].on_message(confirm, w + 503)) == []  # a duplicate changes nothing


def test_certificate_with_short_leases_is_not_confirmed() -> None:
    b = Bench(1)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert = b.sent(b.timer(0, "window", w), Certified)
    late = cert.certificate.lease_until_ms - CFG.confirm_margin_ms + 1
    assert b.summary(b.s.on_message(cert, late)) == ["emit certificate_refused"]
    assert b.s.progress(b.job).state is SubmitterState.PUBLISHED  # type: ignore[union-attr]


def _cert_obj(b: Bench, members: int = 2) -> tuple[Proposal, list[Accept]]:
    lead = b.p[0].identity
    prop = Proposal.sign(lead, job_id=b.job, view=0, round=0, members=tuple(n.peer_id for n in b.p[:members]),
                         gpus_per_member=1)
    accepts = [Accept.sign(n.identity, proposal=prop, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0,
                           payout_address="") for n in b.p[:members]]
    return prop, accepts


def _certified_bytes(b: Bench, prop: Proposal, accepts: list[Any]) -> bytes:
    objs = [a if isinstance(a, dict) else a.envelope.to_obj() for a in accepts]
    body = {"job_id": b.job, "certificate": {"proposal": prop.envelope.to_obj(), "accepts": objs}}
    return seal(b.p[0].identity, Kind.CERTIFICATE, body).to_bytes()


def test_certificate_with_a_forged_or_missing_accept_is_refused() -> None:
    b = Bench(3, replicas=2)
    prop, accepts = _cert_obj(b)
    assert isinstance(decode_message(_certified_bytes(b, prop, accepts)), Certified)  # the honest one
    other = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=1, members=prop.members, gpus_per_member=1)
    forged_sig = dict(accepts[1].envelope.to_obj(), g=bytes(64))
    by_other = Accept.sign(b.p[2].identity, proposal=prop, lease_until_ms=1, price_per_gpu_hour=0, payout_address="")
    impostor = dict(by_other.envelope.to_obj(), b=accepts[1].envelope.body)  # P2's key over P1's accept body
    for accepts_given, reason in [
        (accepts[:1], Reason.BAD_PROOF),                                   # missing accept
        ([accepts[0], forged_sig], Reason.BAD_SIGNATURE),                  # forged signature
        ([accepts[0], impostor], Reason.BAD_SIGNATURE),                    # signed by another key
        ([accepts[0], by_other], Reason.BAD_PROOF),                        # a non-member's accept
        ([accepts[1], accepts[0]], Reason.BAD_PROOF),                      # members out of order
        ([accepts[0], Accept.sign(b.p[1].identity, proposal=other, lease_until_ms=1, price_per_gpu_hour=0,
                                  payout_address="")], Reason.BAD_PROOF),  # accept of another proposal
    ]:
        with pytest.raises(PeerMisbehaved) as info:
            decode_message(_certified_bytes(b, prop, accepts_given))
        assert info.value.reason is reason, (reason, info.value)
    # A certificate sent by someone other than its leader is refused too.
    body = {"job_id": b.job, "certificate": {"proposal": prop.envelope.to_obj(),
                                             "accepts": [a.envelope.to_obj() for a in accepts]}}
    with pytest.raises(PeerMisbehaved) as info:
        decode_message(seal(b.p[2].identity, Kind.CERTIFICATE, body).to_bytes())
    assert info.value.reason is Reason.SIGNER_MISMATCH


def test_confirm_or_cancel_not_from_the_submitter_is_refused() -> None:
    b = Bench(2, replicas=2)
    start(b)
    prop, accepts = _cert_obj(b)
    cert = Certificate(proposal=prop, accepts=tuple(accepts))
    for msg in (Confirm.sign(b.p[1].identity, cert, confirmed_at_ms=T0),
                Cancel.sign(b.p[1].identity, job_id=b.job, reason="x", cancelled_at_ms=T0)):
        with pytest.raises(PeerMisbehaved) as info:
            b.p[0].on_message(msg, T0 + 5)
        assert info.value.reason is Reason.SIGNER_MISMATCH
    assert b.p[0].state(b.job) is WorkerState.OFFERED
    # The submitter confirming a second, different certificate is caught as a conflict.
    b.p[0].on_message(Confirm.sign(SUBMITTER, cert, confirmed_at_ms=T0), T0 + 6)
    other = Proposal.sign(b.p[0].identity, job_id=b.job, view=0, round=1, members=prop.members, gpus_per_member=1)
    cert2 = Certificate(proposal=other, accepts=tuple(
        Accept.sign(n.identity, proposal=other, lease_until_ms=T0 + 10**6, price_per_gpu_hour=0, payout_address="")
        for n in b.p[:2]))
    with pytest.raises(PeerMisbehaved) as info:
        b.p[0].on_message(Confirm.sign(SUBMITTER, cert2, confirmed_at_ms=T0), T0 + 7)
    assert info.value.reason is Reason.CONFLICT


def test_replayed_or_expired_manifest_changes_nothing() -> None:
    b = Bench(1)
    node = b.p[0]
    assert b.summary(node.on_manifest(b.sm, T0)) == MANIFEST_IN
    before = (node.state(b.job), node.gpus_free, len(node.jobs))
    with pytest.raises(PeerMisbehaved) as info:
        node.on_message(decode_message(b.sm.wire), T0 + 5)
    assert info.value.reason is Reason.REPLAYED
    assert (node.state(b.job), node.gpus_free, len(node.jobs)) == before
    fresh = FormationNode(node.identity, make_advert(node.identity, gpus=1, model="A100"), CFG)
    with pytest.raises(PeerMisbehaved) as info:
        fresh.on_manifest(b.sm, b.sm.manifest.expires_at_ms)
    assert info.value.reason is Reason.EXPIRED and fresh.jobs == {}
    # A replay after the job was closed and forgotten is still refused.
    node.on_timer(fkey(b.job, "end"), T0 + CFG.formation_timeout_ms + CFG.lease_ms + CFG.lease_grace_ms)
    assert node.jobs == {}
    with pytest.raises(PeerMisbehaved) as info:
        node.on_manifest(b.sm, T0 + 100_000)
    assert info.value.reason is Reason.REPLAYED


def test_non_matching_or_full_node_does_not_volunteer() -> None:
    b = Bench(1)
    m = replace(b.sm.manifest, models=("H100",))
    from p2pgpu.core._manifest import sign_manifest
    other = sign_manifest(SUBMITTER, m)
    assert b.summary(b.p[0].on_manifest(other, T0)) == ["timer end"]
    assert b.p[0].state(other.job_id) is WorkerState.SEEN


def test_cancel_stops_a_running_job_and_frees_gpus() -> None:
    b = Bench(1)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert = b.sent(b.timer(0, "window", w), Certified)
    confirm = b.sent(b.s.on_message(cert, w + 1), Confirm)
    b.p[0].on_message(confirm, w + 2)
    assert b.p[0].state(b.job) is WorkerState.RUNNING
    cancel_acts = b.s.cancel(b.job, w + 3)
    assert b.summary(cancel_acts) == ["publish cancel", "send cancel>P0", "cancel end", "cancel republish",
                                      "unsubscribe", "cancelled"]
    acts = b.p[0].on_message(b.sent(cancel_acts, Cancel), w + 4)
    # Stopped, but its GPUs stay held while the sandbox is being stopped: a
    # job confirmed meanwhile must not be promised them (the runner still has them).
    assert b.summary(acts)[0] == "stopjob" and not any(s.startswith("released") for s in b.summary(acts))
    assert b.p[0].gpus_free == 0 and b.p[0].state(b.job) is WorkerState.RUNNING
    assert b.p[0].on_message(b.sent(cancel_acts, Cancel), w + 5) == []  # a second cancel stops nothing twice
    acts = b.p[0].finish(b.job, w + 6)  # the driver: the run has ended
    assert b.summary(acts)[-1] == "released (finished)"
    assert b.p[0].gpus_free == 1 and b.p[0].state(b.job) is None  # closed and forgotten, as any finished job


def test_a_stopped_job_whose_end_is_never_reported_frees_its_gpus_after_the_grace() -> None:
    b = Bench(1)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert = b.sent(b.timer(0, "window", w), Certified)
    confirm = b.sent(b.s.on_message(cert, w + 1), Confirm)
    b.p[0].on_message(confirm, w + 2)
    acts = b.p[0].on_message(b.sent(b.s.cancel(b.job, w + 3), Cancel), w + 4)
    assert b.summary(acts) == ["stopjob", "timer stop"]
    acts = b.p[0].on_timer(fkey(b.job, "stop"), w + 4 + CFG.stop_grace_ms)
    assert b.summary(acts)[-1].startswith("released") and b.p[0].gpus_free == 1
    assert b.p[0].state(b.job) is None  # forgotten: nothing of it left to grow the table


def test_member_whose_lease_lapsed_reports_itself_lost() -> None:
    b = Bench(1)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert = b.sent(b.timer(0, "window", w), Certified)
    confirm = b.sent(b.s.on_message(cert, w + 1), Confirm)
    b.p[0].on_timer(fkey(b.job, "lease"), w + CFG.lease_ms + CFG.lease_grace_ms)  # lease lapsed
    assert b.p[0].ledger.reserve("e" * 64, 1, T0 + 10**9)  # and the GPU went to another job
    acts = b.p[0].on_message(confirm, w + CFG.lease_ms + CFG.lease_grace_ms + 1)
    assert "send decline>S" in b.summary(acts) and "startjob" not in b.summary(acts)
    lost = b.s.on_message(b.sent(acts, Decline), w + CFG.lease_ms + CFG.lease_grace_ms + 2)
    assert lost == [MemberLost(b.job, b.p[0].peer_id, "lease expired and the GPUs are taken")]


def test_same_inputs_same_actions() -> None:
    def run() -> list[bytes]:
        b = Bench(3, nodes=2)
        start(b)
        w = T0 + 1 + CFG.offer_window_ms
        acts = b.timer(0, "window", w)
        acts += b.p[1].on_message(b.sent(acts, Proposal), w + 1)
        return [a.data for a in acts if isinstance(a, (Send, Publish))]

    assert run() == run()


def test_transition_tables_refuse_unlisted_moves() -> None:
    assert advance(WORKER_TRANSITIONS, WorkerState.SEEN, WorkerState.OFFERED) is WorkerState.OFFERED
    with pytest.raises(LocalProtocolError):
        advance(WORKER_TRANSITIONS, WorkerState.CLOSED, WorkerState.RUNNING)
    with pytest.raises(LocalProtocolError):
        advance(SUBMITTER_TRANSITIONS, SubmitterState.FAILED, SubmitterState.CONFIRMED)
    assert set(WORKER_TRANSITIONS) == set(WorkerState) and set(SUBMITTER_TRANSITIONS) == set(SubmitterState)


# -- decoders: any bytes give a message or PeerMisbehaved -----------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_decode_message_any_bytes(data: bytes) -> None:
    try:
        decode_message(data)
    except PeerMisbehaved:
        pass


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.text(max_size=70), st.binary(max_size=40))
_values = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=10)


def _valid_bodies() -> list[tuple[Kind, dict[str, Any], Identity]]:
    b = Bench(2, replicas=2)
    prop, accepts = _cert_obj(b)
    cert = {"proposal": prop.envelope.to_obj(), "accepts": [a.envelope.to_obj() for a in accepts]}
    p0, p1 = b.p[0].identity, b.p[1].identity
    return [
        (Kind.OFFER, {"job_id": b.job, "peer_id": p0.peer_id, "seq": 1, "gpus_free": 1, "price_per_gpu_hour": 5,
                      "advert": b.p[0]._signed.envelope.to_obj()}, p0),
        (Kind.PROPOSAL, {"job_id": b.job, "view": 0, "round": 0, "leader": p0.peer_id,
                         "members": list(prop.members), "gpus_per_member": 1}, p0),
        (Kind.ACCEPT, {"job_id": b.job, "view": 0, "round": 0, "proposal": prop.digest, "peer_id": p1.peer_id,
                       "gpus": 1, "lease_until_ms": 5, "price_per_gpu_hour": 0, "payout_address": ""}, p1),
        (Kind.DECLINE, {"job_id": b.job, "view": 0, "round": 0, "proposal": prop.digest, "peer_id": p1.peer_id,
                        "reason": "busy"}, p1),
        (Kind.CERTIFICATE, {"job_id": b.job, "certificate": cert}, p0),
        (Kind.CONFIRM, {"job_id": b.job, "certificate": cert, "confirmed_at_ms": 1}, SUBMITTER),
        (Kind.CANCEL, {"job_id": b.job, "reason": "", "cancelled_at_ms": 1}, SUBMITTER),
    ]


_BODIES = _valid_bodies()


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_every_decoder_on_signed_mutated_bodies(data: st.DataObject) -> None:
    """A validly signed envelope of each kind whose body has one field replaced
    (or dropped, or added): a message of that kind or PeerMisbehaved."""
    kind, body, signer = data.draw(st.sampled_from(_BODIES))
    body = dict(body)
    key = data.draw(st.sampled_from(sorted(body) + ["extra"]))
    if data.draw(st.booleans()) and key in body:
        del body[key]
    else:
        body[key] = data.draw(_values)
    try:
        wire = seal(signer, kind, body).to_bytes()
    except LocalProtocolError:
        return
    try:
        _CLASS_OF[kind].decode(wire)
    except PeerMisbehaved:
        pass
    try:
        msg = decode_message(wire)
    except PeerMisbehaved:
        return
    assert msg.envelope.kind is kind  # type: ignore[union-attr]
    assert _CLASS_OF[kind].decode(wire).to_bytes() == wire


_CLASS_OF: dict[Kind, Any] = {c.kind: c for c in (Offer, Proposal, Accept, Decline, Certified, Confirm, Cancel)}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_CLASS_OF, key=lambda k: k.value)), st.binary(max_size=2048))
def test_each_class_decoder_any_bytes(kind: Kind, data: bytes) -> None:
    try:
        _CLASS_OF[kind].decode(data)
    except PeerMisbehaved:
        pass


def test_valid_bodies_decode() -> None:
    for kind, body, signer in _BODIES:
        msg = decode_message(seal(signer, kind, body).to_bytes())
        assert msg.envelope.kind is kind  # type: ignore[union-attr]
    with pytest.raises(PeerMisbehaved) as info:
        decode_message(seal(SUBMITTER, Kind.HEARTBEAT, {"x": 1}).to_bytes())
    assert info.value.reason is Reason.WRONG_KIND


def test_docs_show_the_transition_tables_of_the_code() -> None:
    from pathlib import Path

    from p2pgpu.core._formation_states import SUBMITTER_EVENTS, WORKER_EVENTS, table_markdown

    doc = (Path(__file__).resolve().parents[2] / "docs" / "formation.md").read_text()
    assert table_markdown(WORKER_TRANSITIONS, WORKER_EVENTS) in doc
    assert table_markdown(SUBMITTER_TRANSITIONS, SUBMITTER_EVENTS) in doc
    assert all((old, new) in WORKER_EVENTS for old, news in WORKER_TRANSITIONS.items() for new in news)


def test_the_largest_cluster_fits_every_size_limit() -> None:
    """64 members (nodes x replicas at most): proposal, certificate and confirm all fit."""
    ids = [Identity(bytes([i + 1, 7]) * 16) for i in range(64)]
    job = "ab" * 32
    prop = Proposal.sign(ids[0], job_id=job, view=2**16, round=2**16, members=tuple(i.peer_id for i in ids),
                         gpus_per_member=16)
    accepts = tuple(Accept.sign(i, proposal=prop, lease_until_ms=2**62, price_per_gpu_hour=2**62,
                                payout_address="11111111111111111111111111111111") for i in ids)
    cert = Certificate(proposal=prop, accepts=accepts)
    for msg in (prop, Certified.sign(ids[0], cert), Confirm.sign(SUBMITTER, cert, confirmed_at_ms=2**62)):
        again = decode_message(msg.envelope.to_bytes())
        assert again.envelope.kind is msg.envelope.kind  # type: ignore[union-attr]
    assert len(Confirm.sign(SUBMITTER, cert, confirmed_at_ms=0).envelope.to_bytes()) < Kind.CONFIRM.bytes_max


def test_job_table_is_bounded_and_forgets_closed_jobs_first() -> None:
    cfg = replace(CFG, jobs_max=2)
    ident = Identity(bytes([9]) * 32)
    node = FormationNode(ident, make_advert(ident, gpus=1, model="A100"), cfg)
    rng = Random(5)
    a, b, c = (make_manifest(SUBMITTER, rng, now_ms=T0) for _ in range(3))
    node.on_manifest(a, T0)
    node.on_manifest(b, T0)
    with pytest.raises(PeerMisbehaved) as info:
        node.on_manifest(c, T0)
    assert info.value.reason is Reason.LIMIT_EXCEEDED
    node.on_message(Cancel.sign(SUBMITTER, job_id=a.job_id, reason="", cancelled_at_ms=T0), T0)
    assert node.state(a.job_id) is WorkerState.CLOSED
    node.on_manifest(c, T0 + 1)  # the closed job made room
    assert sorted(node.jobs) == sorted([b.job_id, c.job_id])
