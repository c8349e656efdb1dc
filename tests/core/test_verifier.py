"""A verifier passed into the decoders and cores, never patched in: every
envelope a message carries is checked with the verifier handed in, and a
refusing verifier refuses the message."""

from __future__ import annotations

from random import Random
from typing import Any

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason, verify_signature
from p2pgpu.core._actions import Send
from p2pgpu.core._formation_messages import Confirm, decode_message
from p2pgpu.core._manifest import verify_manifest
from p2pgpu.core._membership import Membership, decode_heartbeat
from p2pgpu.core._proof import (
    Cosign,
    Proof,
    ProofTerms,
    chain_heads,
    decode_cosign,
    decode_proof,
    sign_cosign,
    sign_proof,
    verify_proof,
)

try:
    from .test_formation import T0, Bench, start
except ImportError:  # tests/core is not a package: pytest put this directory on sys.path
    from test_formation import T0, Bench, start  # type: ignore[no-redef]


class Counting:
    """The real check, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, key: bytes, message: bytes, signature: bytes) -> None:
        self.calls += 1
        verify_signature(key, message, signature)


def refuse(key: bytes, message: bytes, signature: bytes) -> None:
    raise PeerMisbehaved(Reason.BAD_SIGNATURE, "refused by the verifier handed in")


def test_formation_messages_check_every_envelope_they_carry_with_the_verifier() -> None:
    b = Bench(3, nodes=2)
    offer = start(b)[0]
    v = Counting()
    assert decode_message(offer.to_bytes(), verify=v) == offer
    assert v.calls == 2  # the offer and the advert it carries
    v = Counting()
    assert verify_manifest(b.sm.wire, now_ms=T0, verify=v).job_id == b.job and v.calls == 1
    for data in (offer.to_bytes(), b.sm.wire):
        with pytest.raises(PeerMisbehaved) as exc:
            decode_message(data, verify=refuse)
        assert exc.value.reason is Reason.BAD_SIGNATURE


def test_a_certificate_checks_the_proposal_and_every_accept() -> None:
    from p2pgpu.core._formation_messages import Accept, Certificate, Proposal

    a, c = Identity.from_rng(Random(1)), Identity.from_rng(Random(2))
    b = Bench(1)
    prop = Proposal.sign(a, job_id=b.job, view=0, round=0, members=(a.peer_id, c.peer_id), gpus_per_member=1)
    accepts = tuple(Accept.sign(i, proposal=prop, lease_until_ms=T0 + 60_000, price_per_gpu_hour=1,
                                payout_address="") for i in (a, c))
    confirm = Confirm.sign(b.s.identity, Certificate(proposal=prop, accepts=accepts), confirmed_at_ms=T0)
    v = Counting()
    assert isinstance(decode_message(confirm.to_bytes(), verify=v), Confirm)
    assert v.calls == 4  # confirm, proposal, two accepts
    with pytest.raises(PeerMisbehaved):
        Certificate.from_obj(confirm.certificate.to_obj(), refuse)


def test_proofs_cosigns_and_heartbeats_use_the_verifier() -> None:
    a, c = Identity.from_rng(Random(1)), Identity.from_rng(Random(2))
    job, cert_hash = "ab" * 32, b"\x01" * 32
    proof = sign_proof(a, Proof(job_id=job, cert_hash=cert_hash, peer_id=a.peer_id, gpus=("g",), started_at_ms=0,
                                ended_at_ms=1_000, gpu_ms=1_000, exit_code=0, end_reason="exited",
                                output_digest=b"", checkpoints=(),
                                chain_head=chain_heads(job, cert_hash, a.peer_id, ())[-1]))
    cosign = sign_cosign(c, Cosign(job_id=job, cert_hash=cert_hash, subject=a.peer_id, observer=c.peer_id,
                                   first_seen_ms=0, last_seen_ms=1_000, heartbeats=2, last_chain_head=b""))
    v = Counting()
    decode_proof(proof.wire, verify=v)
    decode_cosign(cosign.wire, verify=v)
    assert v.calls == 2
    cert: Any = type("Cert", (), {"members": (a.peer_id, c.peer_id), "cert_hash": cert_hash})()
    terms = ProofTerms(job_id=job, duration_ms_max=10_000, gpus_per_member=1, price_per_gpu_hour_max=1)
    v = Counting()
    verify_proof(proof.wire, cert=cert, terms=terms, cosigns=[cosign.wire], verify=v)
    assert v.calls == 2
    with pytest.raises(PeerMisbehaved):
        decode_proof(proof.wire, verify=refuse)
    m = Membership(identity=a, job_id=job, cert_hash=cert_hash, members=(a.peer_id, c.peer_id), policy="fail",
                   verify=refuse)
    other = Membership(identity=c, job_id=job, cert_hash=cert_hash, members=(a.peer_id, c.peer_id),
                       policy="fail")
    m.start(0)
    beat = next(x for x in other.start(0) if isinstance(x, Send)).data
    assert decode_heartbeat(beat).heartbeat.peer_id == c.peer_id
    with pytest.raises(PeerMisbehaved):
        m.on_heartbeat(beat, 10)
