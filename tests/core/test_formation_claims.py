"""A refused GPU liar wins no work (#16.1): formation uses hardware-challenge verdicts.

A node whose GPU claim failed this node's challenge (``ClaimBook``: a late or
wrong product) used to leave only this node's market: it could still
volunteer on its own, lead on its rank, and be proposed and confirmed.  Now
the verdicts reach the formation cores as a pure ``ClaimView`` (the book's
``view``): a leader never proposes such a volunteer, and a submitter refuses
a certificate naming one (``Refusal.CLAIM_REFUSED``).  Each case: a real
``ClaimBook`` with a recorded outcome, one event in, the verdict out.
"""

from __future__ import annotations

from random import Random

from test_formation_strangers import PAYER, SUBMITTER, advert

from p2pgpu.core import Identity
from p2pgpu.core._actions import Action, Confirmed, Publish, Send
from p2pgpu.core._challenge import ClaimBook, ClaimPolicy, Outcome
from p2pgpu.core._formation import FormationConfig, FormationNode, leader_rank
from p2pgpu.core._formation_messages import Accept, Proposal, decode_message
from p2pgpu.core._formation_rules import Refusal, believe_all, claim_fault
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest

CFG = FormationConfig()
T0 = 1_000_000


def job(nodes: int = 1, models: tuple[str, ...] = ("L4",)) -> SignedManifest:
    m = Manifest(name="l4", submitter=SUBMITTER.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000,
                 nonce=Random(nodes).randbytes(16), nodes=nodes, gpus_per_node=1, memory_mb_min=20_000,
                 models=models, command=("true",), price_per_gpu_hour_max=10_000, payer=PAYER)
    return sign_manifest(SUBMITTER, m)


def ranked(sm: SignedManifest, n: int = 3) -> list[Identity]:
    """``n`` L4 workers, best rank first."""
    return sorted((Identity(bytes([i + 1]) * 32) for i in range(n)), key=lambda i: leader_rank(sm.job_id, i.peer_id))


def refusing(*peers: Identity, model: str = "l4", outcome: Outcome = Outcome.LATE) -> ClaimBook:
    """A claim book (strict: simulated adverts are challenged too) that
    recorded ``outcome`` for each peer's ``model`` claim at T0."""
    book = ClaimBook(allow_simulated=False)
    for p in peers:
        book.record(p.peer_id, model, outcome, T0)
    return book


def confirmed(actions: list[Action]) -> bool:
    return any(isinstance(a, Confirmed) for a in actions)


def proposal_in(actions: list[Action]) -> Proposal:
    for a in actions:
        if isinstance(a, (Send, Publish)):
            msg = decode_message(a.data)
            if isinstance(msg, Proposal):
                return msg
    raise AssertionError(f"no proposal in {actions}")


def lone(leader: Identity, sm: SignedManifest, view: int = 0) -> tuple[Proposal, Accept]:
    prop = Proposal.sign(leader, job_id=sm.job_id, view=view, round=0, members=(leader.peer_id,), gpus_per_member=1)
    return prop, Accept.sign(leader, proposal=prop, lease_until_ms=T0 + 10_000, price_per_gpu_hour=1000,
                             payout_address=PAYER)


def submitter(sm: SignedManifest, workers: list[Identity], book: ClaimBook | None) -> Submitter:
    adverts = {w.peer_id: advert(w) for w in workers}
    s = Submitter(SUBMITTER, CFG, adverts=adverts.get, claims=book.view if book is not None else None)
    s.submit(sm, T0)
    return s


# -- the submitter -----------------------------------------------------------------

def test_a_submitter_refuses_a_certificate_naming_a_member_whose_claim_it_refused() -> None:
    """The liar ranks first for the job, volunteers on its own and proposes
    itself: its advert matches, it is the rightful leader, and before #16.1
    the submitter confirmed it although its own challenge refused the claim."""
    sm = job()
    liar, honest, _ = ranked(sm)
    s = submitter(sm, [liar, honest], refusing(liar))
    prop, accept = lone(liar, sm)
    acts = s.on_message(prop, T0 + 50) + s.on_message(accept, T0 + 51)
    assert not confirmed(acts)
    progress = s.progress(sm.job_id)
    assert progress is not None and progress.state.name == "PUBLISHED"
    assert progress.refusal_code is Refusal.CLAIM_REFUSED
    assert "hardware challenge" in progress.refusal and liar.peer_id[:16] in progress.refusal
    # The next view's honest leader is confirmed.
    prop1, accept1 = lone(honest, sm, view=1)
    later = T0 + CFG.leader_timeout_ms + 10
    assert confirmed(s.on_message(prop1, later) + s.on_message(accept1, later + 1))


def test_the_same_certificate_is_confirmed_when_the_claim_passed_or_was_never_refused() -> None:
    """The happy side: a passed challenge, an untested claim, or no verdicts
    at all (a node that challenges nobody) confirm the liar's certificate as
    before: only a refusal stops it."""
    sm = job()
    liar, honest, _ = ranked(sm)
    for book in (refusing(liar, outcome=Outcome.PASSED), ClaimBook(allow_simulated=False), None):
        s = submitter(sm, [liar, honest], book)
        prop, accept = lone(liar, sm)
        assert confirmed(s.on_message(prop, T0 + 50) + s.on_message(accept, T0 + 51))


def test_a_claim_refused_for_another_model_does_not_stop_the_job() -> None:
    """A refusal counts only for the model the job needs: the peer refused
    for a T4 claim still serves an L4 job (its L4 was not refused)."""
    sm = job()
    liar, honest, _ = ranked(sm)
    s = submitter(sm, [liar, honest], refusing(liar, model="t4"))
    prop, accept = lone(liar, sm)
    assert confirmed(s.on_message(prop, T0 + 50) + s.on_message(accept, T0 + 51))


def test_a_refusal_that_expired_no_longer_stops_the_job() -> None:
    """Verdicts hold for ``refused_ttl_ms``: after that the claim is untested
    again (and the challenger tests it again) rather than refused for ever."""
    sm = job()
    liar, honest, _ = ranked(sm)
    book = refusing(liar)
    book.policy = ClaimPolicy(refused_ttl_ms=40)
    s = submitter(sm, [liar, honest], book)
    prop, accept = lone(liar, sm)
    assert not confirmed(s.on_message(prop, T0 + 30) + s.on_message(accept, T0 + 31))
    prop2 = Proposal.sign(liar, job_id=sm.job_id, view=0, round=1, members=(liar.peer_id,), gpus_per_member=1)
    accept2 = Accept.sign(liar, proposal=prop2, lease_until_ms=T0 + 10_000, price_per_gpu_hour=1000,
                          payout_address=PAYER)
    assert confirmed(s.on_message(prop2, T0 + 50) + s.on_message(accept2, T0 + 51))


# -- the leader ----------------------------------------------------------------------

def leader_after_offers(sm: SignedManifest, workers: list[Identity], book: ClaimBook | None) -> Proposal:
    """``workers[0]`` leads (it ranks first); every worker offers; its proposal."""
    adverts = {w.peer_id: advert(w) for w in workers}
    nodes = [FormationNode(w, adverts[w.peer_id], CFG, adverts=adverts.get,
                           claims=book.view if (book is not None and k == 0) else None)
             for k, w in enumerate(workers)]
    offers = [nodes[k].on_manifest(sm, T0 + 1) for k in range(1, len(nodes))]
    lead = nodes[0]
    acts = lead.on_manifest(sm, T0 + 1)
    for o in offers:
        for a in o:
            if isinstance(a, (Send, Publish)):
                acts += lead.on_bytes(a.data, T0 + 2)
    acts += lead.on_timer(lead._key(lead.jobs[sm.job_id], "window"), T0 + CFG.offer_window_ms + 2)
    return proposal_in(acts)


def test_a_leader_does_not_propose_a_volunteer_whose_claim_it_refused() -> None:
    """Two members needed, three volunteers in rank order L, X, Y: the
    leader's pick after itself is X, the next in rank order, unless its own
    challenge refused X's claim (before #16.1 it proposed X all the same)."""
    sm = job(nodes=2)
    lead, x, y = ranked(sm)
    assert leader_after_offers(sm, [lead, x, y], None).members == (lead.peer_id, x.peer_id)
    prop = leader_after_offers(sm, [lead, x, y], refusing(x))
    assert prop.members == (lead.peer_id, y.peer_id)


def test_a_leader_with_only_refused_volunteers_proposes_nobody() -> None:
    """Refused volunteers are not padding: with too few believed volunteers
    the leader waits for more (no proposal) rather than name a liar."""
    sm = job(nodes=2)
    lead, x, y = ranked(sm)
    adverts = {w.peer_id: advert(w) for w in (lead, x, y)}
    book = refusing(x, y)
    node = FormationNode(lead, adverts[lead.peer_id], CFG, adverts=adverts.get, claims=book.view)
    others = [FormationNode(w, adverts[w.peer_id], CFG, adverts=adverts.get) for w in (x, y)]
    acts = node.on_manifest(sm, T0 + 1)
    for o in others:
        for a in o.on_manifest(sm, T0 + 1):
            if isinstance(a, (Send, Publish)):
                acts += node.on_bytes(a.data, T0 + 2)
    acts += node.on_timer(node._key(node.jobs[sm.job_id], "window"), T0 + CFG.offer_window_ms + 2)
    assert not any(isinstance(decode_message(a.data), Proposal) for a in acts if isinstance(a, (Send, Publish)))


# -- the rule itself -----------------------------------------------------------------

def test_claim_fault_names_only_refusals_the_job_needs() -> None:
    sm = job()
    liar, *_ = ranked(sm)
    adv = advert(liar)
    assert claim_fault(adv, sm, T0, believe_all) is None
    assert claim_fault(None, sm, T0, refusing(liar).view) is None  # no advert: advert_fault's business
    assert claim_fault(adv, sm, T0, refusing(liar, model="t4").view) is None
    why = claim_fault(adv, sm, T0, refusing(liar).view)
    assert why is not None and "hardware challenge" in why
    # A job that any model serves (no models named) still needs the GPU: refused.
    assert claim_fault(adv, job(models=()), T0, refusing(liar).view) is not None
