"""The formation fast path, table-driven: candidate lists, quiet volunteers,
the early end of the offer window, certificates the submitter assembles, and
the fixes that came with them (exclusions per view, a confirm after a lapsed
lease).  Bench names nodes P0, P1, ... by leader rank for the job, so P0 is
the view-0 leader whenever it volunteers."""

from __future__ import annotations

from p2pgpu.core._actions import Confirmed, Reserved, TimerKey, TimerOwner
from p2pgpu.core._formation import expected_volunteers
from p2pgpu.core._formation_messages import Accept, Certificate, Certified, Confirm, Offer, Proposal
from p2pgpu.core._formation_states import SubmitterState, WorkerState


def fkey(job_id: str, name: str) -> TimerKey:
    """A formation timer's key."""
    return TimerKey(TimerOwner.FORMATION, job_id, name)

try:
    from .test_formation import CFG, T0, Bench, start
except ImportError:  # tests/core is not a package: pytest put this directory on sys.path
    from test_formation import CFG, T0, Bench, start  # type: ignore[no-redef]


def ids(b: Bench) -> list[str]:
    return [n.peer_id for n in b.p]


# -- candidate lists ---------------------------------------------------------


def test_expected_volunteers_are_the_best_ranked_few_for_everyone() -> None:
    b = Bench(8, nodes=2)
    every = ids(b)
    want = every[: 2 + CFG.spare_volunteers]
    assert expected_volunteers(b.sm, every, CFG) == want
    assert expected_volunteers(b.sm, list(reversed(every)) + every, CFG) == want  # order and repeats do not matter
    assert expected_volunteers(b.sm, every[3:], CFG) == every[3:7]


def test_only_the_expected_volunteers_offer_and_they_tell_each_other_directly() -> None:
    b = Bench(8, nodes=2)  # 2 members + 2 spare: P0-P3 volunteer, P4-P7 stay quiet
    cands = ids(b)
    sub = b.summary(b.s.submit(b.sm, T0, cands))
    assert sub == ["subscribe", "send signedmanifest>P0", "send signedmanifest>P1", "send signedmanifest>P2",
                   "send signedmanifest>P3", "publish signedmanifest", "timer end", "timer republish"]
    # P0 ranks first: it knows it leads at once (nobody expected ranks before it).
    lead = b.p[0].on_manifest(b.sm, T0 + 1, cands)
    assert b.summary(lead) == ["timer end", "subscribe", "send offer>P1", "send offer>P2", "send offer>P3",
                               "send offer>S", "timer window", "cancel window", "cancel round", "timer view",
                               "emit too_few_volunteers"]
    assert b.p[0].state(b.job) is WorkerState.LEADING
    # P2 offers to the others; it waits for P0 or P1 (both rank before it).
    follow = b.p[2].on_manifest(b.sm, T0 + 1, cands)
    assert b.summary(follow) == ["timer end", "subscribe", "send offer>P0", "send offer>P1", "send offer>P3",
                                 "send offer>S", "timer window"]
    assert b.p[2].state(b.job) is WorkerState.OFFERED
    # Hearing P0's offer settles the leader: the window ends early, P2 follows
    # P0 without sending its offer again (P0 already has it).
    p0_offer = b.sent(lead, Offer)
    assert b.summary(b.p[2].on_message(p0_offer, T0 + 3)) == ["cancel window", "cancel round", "timer view"]
    assert b.p[2].state(b.job) is WorkerState.FOLLOWING and b.p[2].leader_of(b.job, 0) == b.p[0].peer_id
    # P0 proposes as soon as a second volunteer is known: to P2, the submitter, and on the topic.
    prop_acts = b.p[0].on_message(b.sent(follow, Offer), T0 + 3)
    prop = b.sent(prop_acts, Proposal)
    assert prop.members == (b.p[0].peer_id, b.p[2].peer_id)
    assert "send proposal>P2" in b.summary(prop_acts) and "send proposal>S" in b.summary(prop_acts)
    # A quiet node (P5) offers nothing; it listens on the job's topic and sets its late timer.
    quiet = b.p[5].on_manifest(b.sm, T0 + 1, cands)
    assert b.summary(quiet) == ["timer end", "subscribe", "timer late"]
    assert b.p[5].state(b.job) is WorkerState.SEEN


def test_a_quiet_candidate_volunteers_late_unless_formation_progresses_or_ended() -> None:
    b = Bench(8, nodes=2)
    cands = ids(b)
    b.s.submit(b.sm, T0, cands)
    b.p[5].on_manifest(b.sm, T0, cands)
    late_at = T0 + CFG.late_volunteer_ms
    # A proposal seen meanwhile: formation is moving, wait one leader timeout more.
    prop = b.sent(b.p[0].on_manifest(b.sm, T0, cands) + b.p[0].on_message(
        b.sent(b.p[1].on_manifest(b.sm, T0, cands), Offer), T0 + 1), Proposal)
    assert b.summary(b.p[5].on_message(prop, T0 + 5)) == []
    assert b.summary(b.timer(5, "late", late_at)) == ["timer late"]
    # No progress since: it offers, on the topic (it is not one of the expected few).
    acts = b.timer(5, "late", T0 + 5 + CFG.leader_timeout_ms)
    assert b.summary(acts) == ["emit late_volunteer", "publish offer", "timer window"]
    # Another quiet node whose job was confirmed meanwhile stays quiet.
    b.p[6].on_manifest(b.sm, T0, cands)
    cert = Certified.sign(b.p[0].identity, _cert_of(b, prop))
    confirm = b.sent(b.s.on_message(cert, T0 + 10), Confirm)
    assert "unsubscribe" in b.summary(b.p[6].on_message(confirm, T0 + 11))  # it stops listening
    assert b.p[6].state(b.job) is WorkerState.CLOSED
    assert b.timer(6, "late", late_at) == []


def _cert_of(b: Bench, prop: Proposal) -> Certificate:
    accepts = []
    for peer in prop.members:
        node = next(n for n in b.p if n.peer_id == peer)
        accepts.append(Accept.sign(node.identity, proposal=prop, lease_until_ms=T0 + CFG.lease_ms,
                                   price_per_gpu_hour=1000, payout_address=""))
    return Certificate(proposal=prop, accepts=tuple(accepts))


def test_without_candidates_everyone_who_can_serve_volunteers_as_before() -> None:
    b = Bench(6, nodes=2)
    b.s.submit(b.sm, T0)
    for node in b.p:
        assert "publish offer" in b.summary(node.on_manifest(b.sm, T0 + 1))


def test_a_stale_candidate_list_only_costs_the_offer_window() -> None:
    """P0 is expected to lead but is gone: the others wait out the window, then
    the best volunteer heard leads (as without candidates)."""
    b = Bench(6, nodes=2)
    cands = ids(b)
    offers = [b.sent(b.p[k].on_manifest(b.sm, T0, cands), Offer) for k in (1, 2, 3)]
    for k in (1, 2, 3):
        for o in offers:
            b.p[k].on_message(o, T0 + 1)
        assert b.p[k].state(b.job) is WorkerState.OFFERED  # P0 ranks first and was not heard
    lead = b.timer(1, "window", T0 + CFG.offer_window_ms)
    assert b.sent(lead, Proposal).members == (b.p[1].peer_id, b.p[2].peer_id)


# -- the submitter assembles the certificate -------------------------------------


def proposed(b: Bench) -> tuple[Proposal, Accept]:
    """Everyone offered; P0 proposes {P0, P1}: its proposal and its own accept."""
    start(b)
    prop_acts = b.timer(0, "window", T0 + 1 + CFG.offer_window_ms)
    return b.sent(prop_acts, Proposal), b.sent([a for a in prop_acts if "accept" in b.summary([a])[0]], Accept)


def test_submitter_confirms_from_the_proposal_and_every_accept_before_the_certified() -> None:
    b = Bench(3, nodes=2)
    prop, own_accept = proposed(b)
    assert b.s.on_message(prop, T0 + 50) == []
    assert b.s.on_message(own_accept, T0 + 51) == []  # P1's accept still missing
    accept1 = b.sent(b.p[1].on_message(prop, T0 + 52), Accept)
    acts = b.s.on_message(accept1, T0 + 53)
    assert b.summary(acts)[0] == "emit assembled" and "confirmed" in b.summary(acts)
    confirmed = next(a for a in acts if isinstance(a, Confirmed))
    # The leader's Certified of the same membership arrives later: the same certificate, confirmed once.
    certified = b.sent(b.p[0].on_message(accept1, T0 + 54), Certified)
    assert certified.certificate.digest == confirmed.certificate.digest
    late = b.s.on_message(certified, T0 + 55)
    assert b.summary(late) == ["send confirm>P0"]
    assert b.s.progress(b.job).state is SubmitterState.CONFIRMED  # type: ignore[union-attr]


def test_accepts_without_their_proposal_or_over_the_price_confirm_nothing() -> None:
    b = Bench(3, nodes=2)
    prop, own_accept = proposed(b)
    accept1 = b.sent(b.p[1].on_message(prop, T0 + 52), Accept)
    assert b.s.on_message(own_accept, T0 + 53) == [] and b.s.on_message(accept1, T0 + 54) == []  # no proposal
    # A member asking more than the ceiling: the assembled certificate is refused, nobody is blamed here.
    greedy = Accept.sign(b.p[1].identity, proposal=prop, lease_until_ms=T0 + CFG.lease_ms,
                         price_per_gpu_hour=b.sm.manifest.price_per_gpu_hour_max + 1, payout_address="")
    b2 = Bench(3, nodes=2)
    start(b2)
    b2.s.on_message(own_accept, T0 + 50)
    b2.s.on_message(greedy, T0 + 51)
    assert b.summary(b2.s.on_message(prop, T0 + 52)) == ["emit certificate_refused"]
    assert b2.s.progress(b2.job).state is SubmitterState.PUBLISHED  # type: ignore[union-attr]


# -- fixes that came with it -------------------------------------------------------


def test_exclusions_do_not_outlive_the_view() -> None:
    """A member silent for the view-0 leader is proposed again by the same
    node when it leads a later view (busy then, maybe free now)."""
    b = Bench(3, nodes=2)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    b.timer(0, "window", w)
    b.timer(0, "round", w + CFG.member_timeout_ms)  # P1 silent: excluded, P2 proposed
    assert b.p[1].peer_id in b.p[0].jobs[b.job].excluded
    # Views 1 (P1 leads) and 2 (P2) pass without a certificate; view 3 is P0's again.
    for k in (1, 2):
        b.timer(0, "view", w + k * CFG.leader_timeout_ms)
    lead = b.timer(0, "view", w + 3 * CFG.leader_timeout_ms)
    prop = b.sent(lead, Proposal)
    assert (prop.view, prop.members) == (3, (b.p[0].peer_id, b.p[1].peer_id))


def test_confirm_after_a_lapsed_lease_reserves_again_and_says_so() -> None:
    b = Bench(1)
    start(b)
    w = T0 + 1 + CFG.offer_window_ms
    cert = b.sent(b.timer(0, "window", w), Certified)
    confirm = b.sent(b.s.on_message(cert, w + 1), Confirm)
    lapse = w + CFG.lease_ms + CFG.lease_grace_ms
    assert b.summary(b.p[0].on_timer(fkey(b.job, "lease"), lapse))[0] == "released (lease expired)"
    acts = b.p[0].on_message(confirm, lapse + 1)  # the GPU is still free: run, and say it is taken
    reserved = [a for a in acts if isinstance(a, Reserved)]
    assert len(reserved) == 1 and reserved[0].gpus_free == 0 and "startjob" in b.summary(acts)
    assert b.p[0].gpus_free == 0 and b.p[0].state(b.job) is WorkerState.RUNNING


def test_what_the_submitter_keeps_for_assembling_is_bounded() -> None:
    from p2pgpu.core._formation_submitter import accepted_digests_max

    b = Bench(3, nodes=2)
    start(b)
    prop = b.sent(b.timer(0, "window", T0 + 1 + CFG.offer_window_ms), Proposal)
    # Accepts of 3x the bound of proposals nobody made (signed by a member): kept for at most the bound.
    for k in range(3 * accepted_digests_max):
        fake = Proposal.sign(b.p[2].identity, job_id=b.job, view=0, round=k % 8, members=(b.p[2].peer_id,
                             b.p[1].peer_id), gpus_per_member=1)
        b.s.on_message(Accept.sign(b.p[2].identity, proposal=fake, lease_until_ms=T0 + CFG.lease_ms + k,
                                   price_per_gpu_hour=1000, payout_address=""), T0 + 60)
    job = b.s.jobs[b.job]
    assert len(job.accepted) <= accepted_digests_max
    # An accept from a peer the proposal does not name is not kept once the proposal is known.
    b.s.on_message(prop, T0 + 61)
    outsider = Accept.sign(b.p[2].identity, proposal=prop, lease_until_ms=T0 + CFG.lease_ms,
                           price_per_gpu_hour=1000, payout_address="")
    b.s.on_message(outsider, T0 + 62)
    assert b.p[2].peer_id not in job.accepted.get(prop.digest, {})
