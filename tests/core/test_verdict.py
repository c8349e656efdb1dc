"""One mapping from a rejection reason to a gossip verdict (#13).

Every ``Reason`` has a verdict; a replay, an expiry, a local limit or state a
forwarder could not know is ignored (nobody's fault), while bad bytes are
rejected; and a verdict can never be mistaken for a reason (the simulator had
``ACCEPT == 1 == Reason.OVERSIZED``).
"""

from __future__ import annotations

import pytest

from p2pgpu.core import VERDICTS, GossipVerdict, Reason, verdict_for


def test_every_reason_has_a_verdict() -> None:
    assert set(VERDICTS) == set(Reason), "add the new reason to core/_verdict.py's table"
    assert all(isinstance(v, GossipVerdict) for v in VERDICTS.values())


# Issue #13: "the node rejects, and so penalises the forwarder of, replayed
# adverts and adverts refused for a local limit".  Each row is a reason whose
# cause is the receiver's clock or state.
NOBODYS_FAULT = [Reason.REPLAYED, Reason.LIMIT_EXCEEDED, Reason.EXPIRED, Reason.NOT_YET_VALID,
                 Reason.UNKNOWN_JOB, Reason.NOT_A_MEMBER, Reason.CONFLICT, Reason.UNSUPPORTED_VERSION]
FORWARDERS_FAULT = [Reason.OVERSIZED, Reason.MALFORMED, Reason.BAD_SCHEMA, Reason.NON_CANONICAL,
                    Reason.BAD_SIGNATURE, Reason.WRONG_KIND, Reason.SIGNER_MISMATCH, Reason.BAD_PROOF,
                    Reason.WRONG_NETWORK, Reason.SIMULATED_FORBIDDEN, Reason.BAD_CONTENT]


@pytest.mark.parametrize("reason", NOBODYS_FAULT, ids=lambda r: r.name)
def test_what_the_forwarder_could_not_know_is_ignored(reason: Reason) -> None:
    assert verdict_for(reason) is GossipVerdict.IGNORE


@pytest.mark.parametrize("reason", FORWARDERS_FAULT, ids=lambda r: r.name)
def test_bad_bytes_are_rejected(reason: Reason) -> None:
    assert verdict_for(reason) is GossipVerdict.REJECT


def test_the_two_lists_cover_every_reason_once() -> None:
    assert sorted(NOBODYS_FAULT + FORWARDERS_FAULT) == sorted(Reason)


def test_no_reason_maps_to_accept_and_verdicts_never_equal_reasons() -> None:
    assert GossipVerdict.ACCEPT not in VERDICTS.values()
    for reason in Reason:
        for verdict in GossipVerdict:
            assert verdict != reason and reason != verdict
