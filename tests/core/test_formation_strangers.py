"""Strangers cannot take jobs (#18.1): the cores' eligibility and rightful-leader rules.

A certificate only ever names volunteers whose signed adverts match the job,
proposed by the rightful leader of its view.  The submitter checks before
it confirms; workers check before they follow or accept (so a stranger's
proposal neither reserves their GPUs nor keeps quiet candidates quiet).
Each case: one event in, the verdict out.  The first test is the attack as
it was run against real nodes.
"""

from __future__ import annotations

from dataclasses import replace
from random import Random

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason
from p2pgpu.core._actions import Action, Confirmed, Emit, Publish, Reserved, Send
from p2pgpu.core._advert import Advert, GpuInfo, sign_advert
from p2pgpu.core._formation import FormationConfig, FormationNode, leader_rank
from p2pgpu.core._formation_messages import Accept, Offer, Proposal, decode_message
from p2pgpu.core._formation_rules import leader_fault, views_reachable
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest

CFG = FormationConfig()
T0 = 1_000_000
SUBMITTER = Identity(bytes([201]) * 32)
STRANGER = Identity(bytes([202]) * 32)
PAYER = "11111111111111111111111111111111"


def advert(identity: Identity, *, model: str = "NVIDIA L4", memory_mb: int = 23034, gpus: int = 1,
           expires_at_ms: int = T0 + 3_000_000, network: str = "local") -> Advert:
    return Advert(peer_id=identity.peer_id, network=network, addrs=(), seq=1, issued_at_ms=T0 - 1_000,
                  expires_at_ms=expires_at_ms,
                  gpus=tuple(GpuInfo(model=model, memory_mb=memory_mb, compute_capability="8.9")
                             for _ in range(gpus)),
                  gpus_free=gpus, price_per_gpu_hour=1000, currency="SOL", payout_address=PAYER, region="local",
                  runtimes=("process",), simulated=True)


def l4_job(now_ms: int = T0) -> SignedManifest:
    """The attack's jobs: an L4 with 20 GB."""
    m = Manifest(name="l4", submitter=SUBMITTER.peer_id, created_at_ms=now_ms, expires_at_ms=now_ms + 600_000,
                 nonce=Random(now_ms).randbytes(16), nodes=1, gpus_per_node=1, memory_mb_min=20_000,
                 models=("L4",), command=("true",), price_per_gpu_hour_max=10_000, payer=PAYER)
    return sign_manifest(SUBMITTER, m)


class World:
    """A submitter and three honest L4 workers, named by rank (W0 ranks best)."""

    def __init__(self, sm: SignedManifest | None = None) -> None:
        self.sm = sm or l4_job()
        self.job = self.sm.job_id
        ids = sorted((Identity(bytes([i + 1]) * 32) for i in range(3)), key=lambda i: leader_rank(self.job, i.peer_id))
        self.book = {i.peer_id: advert(i) for i in ids}
        self.w = [FormationNode(i, self.book[i.peer_id], CFG, adverts=self.book.get) for i in ids]
        self.s = Submitter(SUBMITTER, CFG, adverts=self.book.get)
        self.s.submit(self.sm, T0)

    def offer_of(self, k: int, now_ms: int = T0 + 1) -> Offer:
        return sent(self.w[k].on_manifest(self.sm, now_ms), Offer)


def sent(actions: list[Action], kind: type) -> object:
    for a in actions:
        if isinstance(a, (Send, Publish)):
            msg = decode_message(a.data)
            if isinstance(msg, kind):
                return msg
    raise AssertionError(f"no {kind.__name__} in {actions}")


def confirmed(actions: list[Action]) -> bool:
    return any(isinstance(a, Confirmed) for a in actions)


def lone_cluster(leader: Identity, job: str, *, view: int = 0, members: tuple[Identity, ...] = ()) -> \
        tuple[Proposal, list[Accept]]:
    ms = members or (leader,)
    prop = Proposal.sign(leader, job_id=job, view=view, round=0, members=tuple(m.peer_id for m in ms),
                         gpus_per_member=1)
    return prop, [Accept.sign(m, proposal=prop, lease_until_ms=T0 + 10_000, price_per_gpu_hour=1000,
                              payout_address=PAYER) for m in ms]


def test_a_stranger_without_an_advert_proposes_itself_and_is_not_confirmed() -> None:
    """The attack: a stranger with no advert and no GPU reads the manifest and
    sends the submitter a proposal naming itself as the only member, plus its
    own accept.  The submitter used to assemble and confirm that certificate."""
    w = World()
    prop, (accept,) = lone_cluster(STRANGER, w.job)
    acts = w.s.on_message(prop, T0 + 50) + w.s.on_message(accept, T0 + 51)
    assert not confirmed(acts)
    assert Emit("formation.certificate_refused") in acts
    progress = w.s.progress(w.job)
    assert progress is not None and progress.state.name == "PUBLISHED"
    assert "no signed advert" in progress.refusal
    # The honest volunteers still form the job.
    offers = [w.offer_of(k) for k in range(3)]
    for o in offers:
        w.s.on_message(o, T0 + 2)
    honest, (honest_accept,) = lone_cluster(w.w[0].identity, w.job)
    acts = w.s.on_message(honest, T0 + 60) + w.s.on_message(honest_accept, T0 + 61)
    assert confirmed(acts)


@pytest.mark.parametrize(("name", "stranger_advert", "why"), [
    ("a T4 for an L4 job", lambda: advert(STRANGER, model="Tesla T4", memory_mb=15_360), "models"),
    ("an L4 with too little memory", lambda: advert(STRANGER, memory_mb=8_000), "vram"),
    ("an expired advert", lambda: advert(STRANGER, expires_at_ms=T0), "expired"),
    ("another network's advert", lambda: advert(STRANGER, network="mainnet"), "network"),
])
def test_a_stranger_whose_advert_does_not_fit_is_not_confirmed(name: str, stranger_advert: object,
                                                               why: str) -> None:
    w = World()
    w.book[STRANGER.peer_id] = stranger_advert()  # type: ignore[operator]
    s = Submitter(SUBMITTER, replace(CFG, network="local"), adverts=w.book.get)
    s.submit(w.sm, T0)
    prop, (accept,) = lone_cluster(STRANGER, w.job)
    assert not confirmed(s.on_message(prop, T0 + 50) + s.on_message(accept, T0 + 51))
    assert why in s.progress(w.job).refusal  # type: ignore[union-attr]


def test_a_matching_leader_that_is_not_the_rightful_one_is_not_confirmed() -> None:
    """W1 matches, but W0 offered and ranks first: W1 may lead view 1 (after
    a leader timeout), not view 0."""
    w = World()
    for k in range(3):
        w.s.on_message(w.offer_of(k), T0 + 2)
    prop, (accept,) = lone_cluster(w.w[1].identity, w.job, view=0)
    assert not confirmed(w.s.on_message(prop, T0 + 50) + w.s.on_message(accept, T0 + 51))
    assert "cannot lead view 0" in w.s.progress(w.job).refusal  # type: ignore[union-attr]
    prop1, (accept1,) = lone_cluster(w.w[1].identity, w.job, view=1)
    later = T0 + CFG.leader_timeout_ms + 10
    assert confirmed(w.s.on_message(prop1, later) + w.s.on_message(accept1, later + 1))


def test_a_view_from_the_future_is_not_confirmed() -> None:
    """W2 ranks third of three: it is the rightful leader of view 2 only after
    two leader timeouts have passed, not at once."""
    w = World()
    for k in range(3):
        w.s.on_message(w.offer_of(k), T0 + 2)
    prop, (accept,) = lone_cluster(w.w[2].identity, w.job, view=5)
    assert not confirmed(w.s.on_message(prop, T0 + 50) + w.s.on_message(accept, T0 + 51))
    assert "cannot have been reached" in w.s.progress(w.job).refusal  # type: ignore[union-attr]


def test_a_rightful_leader_cannot_slip_in_a_stranger_as_member() -> None:
    w = World()
    for k in range(3):
        w.s.on_message(w.offer_of(k), T0 + 2)
    two = replace(w.sm.manifest, nodes=2, nonce=b"2" * 16)
    sm2 = sign_manifest(SUBMITTER, two)
    w.s.submit(sm2, T0)
    prop, accepts = lone_cluster(w.w[0].identity, sm2.job_id, members=(w.w[0].identity, STRANGER))
    acts = w.s.on_message(prop, T0 + 50)
    for a in accepts:
        acts += w.s.on_message(a, T0 + 51)
    assert not confirmed(acts)
    assert f"member {STRANGER.peer_id[:16]}" in w.s.progress(sm2.job_id).refusal  # type: ignore[union-attr]


def test_workers_neither_follow_nor_reserve_for_a_strangers_proposal() -> None:
    """A stranger proposes an honest worker (to hold its GPU under a lease):
    the worker refuses without reserving; the rightful leader's proposal of
    the same worker is accepted."""
    w = World()
    offers = [w.offer_of(k) for k in range(3)]
    for node in w.w:
        for o in offers:
            node.on_message(o, T0 + 2)
    bait = Proposal.sign(STRANGER, job_id=w.job, view=0, round=0, members=(w.w[1].peer_id,), gpus_per_member=1)
    acts = w.w[1].on_message(bait, T0 + 3)
    assert acts == [Emit("formation.proposal_refused")]
    assert w.w[1].gpus_free == 1 and not any(isinstance(a, Reserved) for a in acts)
    honest = Proposal.sign(w.w[0].identity, job_id=w.job, view=0, round=0, members=(w.w[1].peer_id,),
                           gpus_per_member=1)
    acts = w.w[1].on_message(honest, T0 + 4)
    assert any(isinstance(a, Reserved) for a in acts) and w.w[1].gpus_free == 0


def test_a_strangers_proposal_does_not_keep_quiet_candidates_quiet() -> None:
    w = World()
    cands = [n.peer_id for n in w.w]
    quiet = FormationNode(Identity(bytes([9]) * 32), advert(Identity(bytes([9]) * 32)), replace(
        CFG, spare_volunteers=0), adverts=w.book.get)
    quiet.on_manifest(w.sm, T0, cands)
    bait = Proposal.sign(STRANGER, job_id=w.job, view=0, round=0, members=(STRANGER.peer_id,), gpus_per_member=1)
    assert quiet.on_message(bait, T0 + 5) == [Emit("formation.proposal_refused")]
    assert quiet.jobs[w.job].progress_ms == -1


def test_an_offer_whose_own_advert_does_not_match_is_a_lie() -> None:
    w = World()
    w.w[0].on_manifest(w.sm, T0)
    liar = sign_advert(STRANGER, advert(STRANGER, model="Tesla T4", memory_mb=15_360))
    lie = Offer.sign(STRANGER, job_id=w.job, seq=1, gpus_free=1, price_per_gpu_hour=1000, advert=liar)
    with pytest.raises(PeerMisbehaved) as err:
        w.w[0].on_message(lie, T0 + 1)
    assert err.value.reason is Reason.BAD_PROOF
    stale = sign_advert(STRANGER, advert(STRANGER, expires_at_ms=T0 + 1))
    late = Offer.sign(STRANGER, job_id=w.job, seq=1, gpus_free=1, price_per_gpu_hour=1000, advert=stale)
    assert w.w[0].on_message(late, T0 + 2) == [Emit("formation.offer_ineligible")]
    assert STRANGER.peer_id not in w.w[0].jobs[w.job].volunteers
    fine = Offer.sign(STRANGER, job_id=w.job, seq=2, gpus_free=1, price_per_gpu_hour=1000,
                      advert=sign_advert(STRANGER, advert(STRANGER)))
    w.w[0].on_message(fine, T0 + 3)
    assert STRANGER.peer_id in w.w[0].jobs[w.job].volunteers  # a matching stranger is a volunteer like any


def test_an_offer_cannot_carry_another_peers_advert() -> None:
    theirs = sign_advert(SUBMITTER, advert(SUBMITTER))
    with pytest.raises(ValueError):
        Offer.sign(STRANGER, job_id="ab" * 32, seq=1, gpus_free=1, price_per_gpu_hour=1, advert=theirs)


def test_a_carried_advert_teaches_the_submitter_an_advert_it_never_heard() -> None:
    """The submitter's book does not know W0 (its advert did not reach it by
    gossip); W0's offer carries it, so W0's certificate is confirmed."""
    w = World()
    s = Submitter(SUBMITTER, CFG, adverts={}.get)
    s.submit(w.sm, T0)
    s.on_message(w.offer_of(0), T0 + 2)
    prop, (accept,) = lone_cluster(w.w[0].identity, w.job)
    assert confirmed(s.on_message(prop, T0 + 50) + s.on_message(accept, T0 + 51))


# view, elapsed ms, better-ranked volunteers known -> rightful?
LEADER_CASES = [
    (0, 0, 0, True), (0, 0, 1, False), (1, 0, 1, True), (1, 0, 2, False), (2, 0, 0, False),
    (2, CFG.leader_timeout_ms - 1, 0, False), (2, CFG.leader_timeout_ms, 0, True), (2, CFG.leader_timeout_ms, 2, True),
    (2, CFG.leader_timeout_ms, 3, False),
]


@pytest.mark.parametrize(("view", "elapsed", "better", "ok"), LEADER_CASES)
def test_rightful_leader_boundaries(view: int, elapsed: int, better: int, ok: bool) -> None:
    ranks = {f"v{i}": bytes([i]) * 32 for i in range(better)} | {"leader": bytes([100]) * 32, "worse": b"\xff" * 32}
    why = leader_fault("ab" * 32, view=view, leader="leader", volunteers=list(ranks), elapsed_ms=elapsed,
                       leader_timeout_ms=CFG.leader_timeout_ms, rank=ranks.__getitem__)
    assert (why is None) is ok, why
    assert views_reachable(-5, 400) == 1
