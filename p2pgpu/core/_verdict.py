"""One mapping from a rejection reason to a gossip verdict.

A GossipSub validator has three answers (libp2p's ``ValidationResult``):
**accept** (keep and forward), **ignore** (drop quietly: not forwarded, and
nobody is blamed) and **reject** (drop, and lower the score of the peer that
forwarded it).  Rejecting costs an honest forwarder score, so a message is
rejected only for a fault that every honest node on the same network would
have seen in the bytes alone: bad encoding, a bad signature, a broken schema
rule, a forgery, the wrong network.  What depends on the receiver's own clock,
state or limits (a replay, an expiry, a full table, an unknown job, a newer
protocol version) is ignored: the forwarder checked it against its own clock
and state and was right to pass it on.

Both drivers use :func:`verdict_for`: the node's GossipSub validators
(adverts and jobs topics, ``p2pgpu/node``) and the simulator's gossip model
(``p2pgpu/sim/_gossip.py``), so the simulator penalises exactly what the node
does.  :class:`Verdict` is a plain ``Enum``: its members never compare equal to
a :class:`~p2pgpu.core.Reason` (the simulator once had ``ACCEPT == 1 ==
Reason.OVERSIZED``, and oversized adverts passed).
"""

from __future__ import annotations

from enum import Enum

from ._errors import Reason


class Verdict(Enum):
    """What a gossip validator answers for one message."""

    ACCEPT = "accept"
    IGNORE = "ignore"
    REJECT = "reject"


#: Every reason's verdict, with why.  ``tests/core/test_verdict.py`` checks
#: that each ``Reason`` is listed, so a new reason cannot slip through.
VERDICTS: dict[Reason, Verdict] = {
    # The bytes themselves are bad: the forwarder should have dropped them.
    Reason.OVERSIZED: Verdict.REJECT,
    Reason.MALFORMED: Verdict.REJECT,
    Reason.BAD_SCHEMA: Verdict.REJECT,
    Reason.NON_CANONICAL: Verdict.REJECT,
    Reason.BAD_SIGNATURE: Verdict.REJECT,
    Reason.WRONG_KIND: Verdict.REJECT,
    Reason.SIGNER_MISMATCH: Verdict.REJECT,
    Reason.BAD_PROOF: Verdict.REJECT,
    # Rules of the network every node on it shares (bootstrap_peers.toml).
    Reason.WRONG_NETWORK: Verdict.REJECT,
    Reason.SIMULATED_FORBIDDEN: Verdict.REJECT,
    # A newer node may forward a version we do not speak yet (upgrades roll).
    Reason.UNSUPPORTED_VERSION: Verdict.IGNORE,
    # Our clock, not the bytes: a message can expire in flight, and clocks
    # differ by up to the allowed skew.
    Reason.EXPIRED: Verdict.IGNORE,
    Reason.NOT_YET_VALID: Verdict.IGNORE,
    # Our state, not the bytes: the forwarder may not have seen the earlier
    # copy, does not share our limits, and may know jobs we do not.
    Reason.REPLAYED: Verdict.IGNORE,
    Reason.LIMIT_EXCEEDED: Verdict.IGNORE,
    Reason.UNKNOWN_JOB: Verdict.IGNORE,
    Reason.NOT_A_MEMBER: Verdict.IGNORE,
    Reason.CONFLICT: Verdict.IGNORE,
}


def verdict_for(reason: Reason) -> Verdict:
    """The gossip verdict for a message refused with ``reason``.  A reason
    missing from :data:`VERDICTS` (a test forbids it) is ignored, never held
    against the forwarder."""
    return VERDICTS.get(reason, Verdict.IGNORE)
