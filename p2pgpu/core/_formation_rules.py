"""Who may be in a cluster and who may lead it: the rules that keep strangers out.

A certificate only ever names *volunteers whose signed adverts match the
job*, proposed by *the rightful leader of its view* (#18.1: a stranger with
no advert and no GPU sent a submitter a proposal naming itself and its own
accept, and was confirmed).  Both the submitter (before it confirms) and
every worker (before it follows or accepts a proposal) apply these rules,
with the adverts they hold: the driver's advert book (``AdvertLookup``) and
the signed advert every offer carries (``Offer.advert``), so an advert not
yet heard by gossip still counts.

- **Eligible** (:func:`advert_fault`): the peer's signed advert is known,
  unexpired, of this network, and matches the job's requirements with all
  its GPUs counted free (whether GPUs are free *now* is the peer's own
  business: it accepts only by reserving them).
- **Rightful leader** (:func:`leader_fault`): the leader of view ``v`` is the
  volunteer at position ``v mod n`` in rank order (``leader_rank``), so at
  most ``v`` eligible volunteers the checker knows of may rank before it,
  and view ``v`` can only be reached after ``v`` leader timeouts (one view
  of slack for the manifest's spread).  Checkers know different volunteers,
  so this only refuses what *no* honest leader could propose: one that
  misses a better volunteer the checker knows is outranked by that volunteer
  (which leads the same view and wins it) or replaced at the next view.  A
  stranger that matches still leads only the jobs its rank gives it, and
  only after the better-ranked volunteers had their views.

- **Members by standing** (:func:`member_tier`): a leader picks the members
  of its proposal among its volunteers.  Nobody checks *which* eligible
  volunteers it picked (only that each is eligible and that it is the
  rightful leader), so this choice, unlike the leader's rank, may use what
  only this leader knows: the reputation it computed from the receipts it
  holds (``core/_reputation.py``).  Volunteers in good standing come
  first (no record, or one that is not negative), then those with a
  negative record, and last those the job is too valuable for
  (``job_value_max``); within a tier the rank order stands.  Two leaders
  holding different receipts propose different members, which the rules
  already tolerate (a proposal is the leader's alone); and a tier only
  orders, it never excludes, so a network of newcomers still forms jobs.

- **Claims this node refused** (:func:`claim_fault`, #16): a volunteer's
  signed advert may claim a GPU that this node's hardware challenge refused
  (``core/_challenge.ClaimBook``).  Such a volunteer still counts for the
  leader's rank (ranks are the hash every checker computes, and other
  checkers may believe the claim), but a leader does not pick it as a
  member, and a submitter refuses a certificate that names it (typed:
  :attr:`Refusal.CLAIM_REFUSED`).  The verdicts come in as a pure function
  (``ClaimView``: an advert and ``now`` in, the advert as matching should
  see it out, the refused GPUs left out), the same view the driver's advert
  book applies to matching, so the market, the dry run, the leader and the
  submitter all judge a claim alike.

Pure: adverts, times and ids in, a reason (or ``None``) out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum

from ._advert import Advert
from ._manifest import SignedManifest
from ._matching import Requirement, exclusion
from ._reputation import job_value_base, job_value_growth

#: A peer's worker score as this node computed it (``None``: no record).
Standing = Callable[[str], "int | None"]


def job_value(sm: SignedManifest) -> int:
    """What one member of the job can be paid at most, in lamports (its
    price ceiling for its GPUs over the job's time limit)."""
    m = sm.manifest
    return m.price_per_gpu_hour_max * m.gpus_per_node * m.duration_s_max // 3600


def member_tier(score: int | None, value: int) -> int:
    """0: in good standing (no record, or a record that is not negative);
    1: a negative record; 2: the job is worth more than this peer may be
    offered (``job_value_max``: a new identity gets small jobs first).
    Good standing is one tier on purpose: preferring proven peers over new
    ones would starve newcomers of the work they need to earn a record, and
    the hash order already spreads jobs fairly among peers in good standing."""
    if value > job_value_max_of(score):
        return 2
    return 1 if score is not None and score < 0 else 0


def job_value_max_of(score: int | None) -> int:
    return job_value_base + job_value_growth * max(0, score or 0)


#: How a core finds a peer's advert that did not come with an offer (the
#: driver's advert book): ``None`` when it knows none.
AdvertLookup = Callable[[str], Advert | None]

#: What this node's hardware-challenge verdicts leave of an advert at
#: ``now_ms`` (``ClaimBook.view``: GPUs whose claim it refused left out; the
#: advert itself, unchanged, when it refused nothing).
ClaimView = Callable[[Advert, int], Advert]


def believe_all(advert: Advert, _now_ms: int) -> Advert:
    """The ``ClaimView`` of a node that challenges nobody."""
    return advert


class Refusal(str, Enum):
    """Why a submitter refused a certificate, as a code (``JobProgress.refusal_code``)."""

    #: The leases end too soon to reach the members.
    LEASES = "leases"
    #: A member or the leader is not an eligible volunteer (no, expired or non-matching advert).
    INELIGIBLE = "ineligible"
    #: A member's GPU claim failed this node's hardware challenge.
    CLAIM_REFUSED = "claim_refused"
    #: The leader is not the rightful leader of the proposal's view.
    NOT_THE_LEADER = "not_the_leader"


def claim_fault(advert: Advert | None, sm: SignedManifest, now_ms: int, claims: ClaimView) -> str | None:
    """Why this node, from its hardware-challenge verdicts (``claims``), does
    not believe the peer with ``advert`` can serve the job (``None``: it
    believes it, or refused no claim the job needs).  Only a claim the job
    needs counts: a peer refused for one model may serve jobs for another."""
    if advert is None:
        return None
    seen = claims(advert, now_ms)
    if seen is advert or seen == advert:
        return None
    why = requirement_fault(seen, sm)
    if why is None:
        return None
    return f"its GPU claim failed this node's hardware challenge, so {why}"


def requirement_fault(advert: Advert, sm: SignedManifest) -> str | None:
    """Why ``advert`` does not match the job, all its GPUs counted free
    (free GPUs are checked last, so failing only that one is a match)."""
    why = exclusion(advert, sm.manifest.requirements)
    return None if why in (None, Requirement.FREE_GPUS) else f"its advert does not match the job ({why.value})"


def validity_fault(advert: Advert, now_ms: int, *, network: str = "") -> str | None:
    """Why ``advert`` does not count now: another network's, or expired."""
    if network and advert.network != network:
        return f"its advert is for network {advert.network!r}"
    if advert.expires_at_ms <= now_ms:
        return "its advert has expired"
    return None


def advert_fault(advert: Advert | None, sm: SignedManifest, now_ms: int, *, network: str = "") -> str | None:
    """Why the peer with ``advert`` may not serve the job (``None``: it may)."""
    if advert is None:
        return "no signed advert of it is known"
    return validity_fault(advert, now_ms, network=network) or requirement_fault(advert, sm)


def views_reachable(elapsed_ms: int, leader_timeout_ms: int) -> int:
    """The highest view an honest volunteer can be in ``elapsed_ms`` after the
    job appeared: one per leader timeout, plus one of slack."""
    return 1 + max(0, elapsed_ms) // max(1, leader_timeout_ms)


def leader_fault(job_id: str, *, view: int, leader: str, volunteers: Iterable[str], elapsed_ms: int,
                 leader_timeout_ms: int, rank: Callable[[str], bytes]) -> str | None:
    """Why ``leader`` cannot be the rightful leader of ``view`` for a checker
    that knows these eligible ``volunteers`` (``None``: it can).  ``rank`` is
    ``leader_rank`` bound to the job (the cores cache it)."""
    reachable = views_reachable(elapsed_ms, leader_timeout_ms)
    if view > reachable:
        return f"view {view} cannot have been reached {max(0, elapsed_ms)} ms after the job appeared"
    mine = rank(leader)
    better = sum(1 for v in volunteers if v != leader and rank(v) < mine)
    if better > view:
        return f"{better} eligible volunteers rank before {leader[:16]}: it cannot lead view {view}"
    return None
