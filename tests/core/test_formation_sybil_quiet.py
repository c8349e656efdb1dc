"""Silent Sybil candidates (#12): identities in the advert book that never offer
cannot hold a free, matching worker back.

A worker with a candidate list (its advert book: peers that match the job
with GPUs free) volunteers at once only if it ranks among the first
``members + spare_volunteers``; the others stay quiet for a turn that grew
with their rank: ``(p // (members + 2)) x late_volunteer_ms``.  Fresh
identities with free, matching, unattested adverts that never offer held
every earlier turn: behind 150 of them a worker waited 20 s, behind 450 past
the 60 s formation deadline (one forwarder may place 2,500 adverts in a
book).  Now the groups double (the turn grows with the log of the rank) and
no turn is later than ``quiet_steps_max`` steps, however many candidates rank
before, and however often a matching stranger proposes (proposals defer a
turn, never past that bound).  An honest network still draws the eager few
first, then twice as many per step while the job is undecided, and each
candidate offers once: the Sybils cannot turn the bound into an offer storm.
Leaders come from offers only, so silent Sybils never take a view.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_formation_strangers import SUBMITTER, advert, confirmed, l4_job

from p2pgpu.core import Identity
from p2pgpu.core._actions import Action, Publish, Send, SetTimer
from p2pgpu.core._formation import FormationConfig, FormationNode, leader_rank
from p2pgpu.core._formation_messages import Offer, Proposal, decode_message
from p2pgpu.core._formation_states import WorkerState
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._manifest import SignedManifest

CFG = FormationConfig()
T0 = 1_000_000
STEP = CFG.late_volunteer_ms  # 400 ms
WORKER = Identity(bytes([77]) * 32)


def sybils_before(sm: SignedManifest, n: int, after: int = 20) -> list[str]:
    """Peer ids of ``n`` Sybils that rank before the worker for this job and
    ``after`` that rank after it (only ranks matter to a candidate list)."""
    mine = leader_rank(sm.job_id, WORKER.peer_id)
    before: list[str] = []
    behind: list[str] = []
    i = 0
    while len(before) < n or len(behind) < after:
        peer = f"12D3KooSybil{i:06d}"
        (before if leader_rank(sm.job_id, peer) < mine else behind).append(peer)
        i += 1
    return before[:n] + behind[:after]


def job_ranking_the_worker_late() -> SignedManifest:
    """A job for which the worker's rank is in the last eighth (so 4,095
    Sybils ahead of it take few tries to find)."""
    t = T0
    while True:
        sm = l4_job(t)
        if leader_rank(sm.job_id, WORKER.peer_id)[0] >= 0xE0:
            return sm
        t += 1


SM = job_ranking_the_worker_late()


def late_timer(actions: list[Action]) -> int:
    (at,) = [a.at_ms for a in actions if isinstance(a, SetTimer) and a.key.name == "late"]
    return at


def offers(actions: list[Action]) -> list[Offer]:
    out = []
    for a in actions:
        if isinstance(a, (Send, Publish)):
            msg = decode_message(a.data)
            if isinstance(msg, Offer):
                out.append(msg)
    return out


def worker(config: FormationConfig = CFG, book: dict[str, object] | None = None) -> FormationNode:
    return FormationNode(WORKER, advert(WORKER), config, adverts=(book or {}).get)  # type: ignore[arg-type]


# (silent Sybils ranked before the worker, when it offers after the manifest (ms)); 1 member + 2 spare.
# Before: (p // 3) x 400 ms: 150 -> 20,000 ms, 450 -> 60,000 ms (the formation deadline), 2,500 -> 333,200.
TURNS = [
    (0, 0),            # eager: at once
    (2, 0),
    (3, 1 * STEP),     # the next 6 wait one step
    (8, 1 * STEP),
    (9, 2 * STEP),     # the next 12 two
    (20, 2 * STEP),
    (21, 3 * STEP),
    (150, 5 * STEP),   # the attack test's case: 2 s, not 20 s
    (450, 7 * STEP),   # was past the 60 s deadline: 2.8 s
    (2_500, 8 * STEP),  # one forwarder's share of a book: the bound, 3.2 s
    (4_095, 8 * STEP),  # candidates_max: the bound
]


@pytest.mark.parametrize(("behind", "turn_ms"), TURNS)
def test_a_worker_behind_silent_sybils_offers_within_a_bounded_time(behind: int, turn_ms: int) -> None:
    node = worker()
    acts = node.on_manifest(SM, T0, candidates=sybils_before(SM, behind))
    if turn_ms == 0:
        assert offers(acts) and node.state(SM.job_id) is not WorkerState.SEEN
        return
    assert not offers(acts) and node.state(SM.job_id) is WorkerState.SEEN
    at = late_timer(acts)
    assert at - T0 == turn_ms <= CFG.quiet_steps_max * STEP
    # Nobody offered, nobody proposed: its turn comes and it offers (on the job's topic).
    acts = node.on_timer(next(a.key for a in acts if isinstance(a, SetTimer) and a.key.name == "late"), at)
    (offer,) = offers(acts)
    assert offer.peer_id == WORKER.peer_id and node.state(SM.job_id) is WorkerState.OFFERED


# (steps of the bound, Sybils before): the bound is a config value, and a bound of 0 means no quiet turn at all.
@pytest.mark.parametrize(("steps_max", "behind", "turn_ms"), [(8, 4_095, 8 * STEP), (3, 450, 3 * STEP),
                                                             (3, 9, 2 * STEP), (0, 450, 0)])
def test_the_bound_is_quiet_steps_max(steps_max: int, behind: int, turn_ms: int) -> None:
    node = worker(replace(CFG, quiet_steps_max=steps_max))
    acts = node.on_manifest(SM, T0, candidates=sybils_before(SM, behind))
    assert late_timer(acts) - T0 == turn_ms


# (proposal every ... ms by one matching Sybil, Sybils before the worker): the worker still offers by the bound.
@pytest.mark.parametrize(("every_ms", "behind"), [(300, 9), (100, 150), (399, 2_500)])
def test_a_proposing_sybil_defers_a_quiet_turn_only_up_to_the_bound(every_ms: int, behind: int) -> None:
    sybil = Identity(bytes([66]) * 32)
    node = worker(book={sybil.peer_id: advert(sybil)})
    acts = node.on_manifest(SM, T0, candidates=sybils_before(SM, behind))
    timer = next(a for a in acts if isinstance(a, SetTimer) and a.key.name == "late")
    bound = T0 + CFG.quiet_steps_max * STEP
    t, offered_at = T0, None
    while offered_at is None and t < T0 + 60_000:
        t += every_ms
        if timer.at_ms <= t:  # the timer fires before this proposal
            acts = node.on_timer(timer.key, timer.at_ms)
            if offers(acts):
                offered_at = timer.at_ms
                break
            timer = next(a for a in acts if isinstance(a, SetTimer) and a.key.name == "late")
        bait = Proposal.sign(sybil, job_id=SM.job_id, view=0, round=0, members=(sybil.peer_id,), gpus_per_member=1)
        assert node.on_message(bait, t) == []  # eligible and rightful for a quiet node: it is progress
        assert node.jobs[SM.job_id].progress_ms == t
    assert offered_at is not None and offered_at <= bound, (offered_at, bound)


def test_an_honest_network_still_draws_the_eager_few_first_then_doubling_groups() -> None:
    """48 honest candidates, nobody deciding: how many have offered after
    each step.  Each offers once (the late timer fires once), so the total
    is the number of matching free candidates, whatever the Sybils do (they
    only push honest candidates to later groups)."""
    sm = l4_job(T0 + 7)
    ids = [Identity(bytes([i + 1]) * 32) for i in range(48)]
    cands = [i.peer_id for i in ids]
    turns: dict[int, int] = {}
    for ident in ids:
        node = FormationNode(ident, advert(ident), CFG)
        acts = node.on_manifest(sm, T0, candidates=cands)
        step = 0 if offers(acts) else (late_timer(acts) - T0) // STEP
        turns[step] = turns.get(step, 0) + 1
        if step:
            key = next(a.key for a in acts if isinstance(a, SetTimer) and a.key.name == "late")
            assert len(offers(node.on_timer(key, T0 + step * STEP))) == 1
            assert node.on_timer(key, T0 + 60_000) == []  # once
    # Before: 3 per step for 16 steps (6.4 s for the last).
    assert turns == {0: 3, 1: 6, 2: 12, 3: 24, 4: 3}


def test_silent_sybils_never_lead_a_view() -> None:
    """The leader of a view is chosen among those who offered, at the worker
    and at the submitter alike (``leader_fault`` counts volunteers, not
    candidates): the worker behind 450 silent Sybils leads view 0 and its
    certificate is confirmed, with no view change."""
    book = {WORKER.peer_id: advert(WORKER)}
    node = worker(book=book)
    cands = sybils_before(SM, 450)
    s = Submitter(SUBMITTER, CFG, adverts=book.get)  # type: ignore[arg-type]
    s.submit(SM, T0, cands + [WORKER.peer_id])
    acts = node.on_manifest(SM, T0, candidates=cands)
    at = late_timer(acts)
    acts = node.on_timer(next(a.key for a in acts if isinstance(a, SetTimer) and a.key.name == "late"), at)
    window = next(a for a in acts if isinstance(a, SetTimer) and a.key.name == "window")
    acts += node.on_timer(window.key, window.at_ms)
    assert node.state(SM.job_id) in (WorkerState.LEADING, WorkerState.CERTIFIED) and node.jobs[SM.job_id].view == 0
    done = False
    for a in acts:
        if isinstance(a, Publish) or (isinstance(a, Send) and a.peer_id == SUBMITTER.peer_id):
            done = confirmed(s.on_message(decode_message(a.data), window.at_ms + 1)) or done
    assert done and window.at_ms + 1 - T0 <= CFG.quiet_steps_max * STEP + CFG.offer_window_ms + 1


@pytest.mark.parametrize("others", [4_095, 4_096, 5_000, 10_000])
def test_a_full_candidate_list_never_pushes_the_node_out_of_its_own_ranking(others: int) -> None:
    """A book with ``candidates_max`` or more matching adverts (two forwarders'
    share) made ``on_manifest`` raise ``ValueError`` on every manifest: the
    list was cut after the node added itself at its end."""
    node = worker()
    cands = [f"12D3KooSybil{i:06d}" for i in range(others)]
    acts = node.on_manifest(SM, T0, candidates=cands)
    assert offers(acts) or late_timer(acts) - T0 <= CFG.quiet_steps_max * STEP
