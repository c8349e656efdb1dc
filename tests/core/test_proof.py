"""Work proofs: signing, the verifier's rules (table), quorum and what is owed."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import Identity, Kind, PeerMisbehaved, Reason, decode, encode, seal
from p2pgpu.core._proof import (
    CheckpointChain,
    Cosign,
    Proof,
    ProofFault,
    ProofRejected,
    ProofTerms,
    SignedProof,
    checkpoint_interval_ms,
    checkpoints_max,
    decode_cosign,
    decode_proof,
    output_digest,
    owed,
    owed_total,
    quorum_digests,
    sign_cosign,
    sign_proof,
    verify_proof,
)

RNG = random.Random(4)
IDS = [Identity.from_rng(RNG) for _ in range(4)]
A, B, C, OUTSIDER = IDS
JOB = "ab" * 32
CERT_HASH = bytes(range(32))
DIGEST = output_digest([("out.txt", 6, bytes(32))], bytes(32))
OTHER_DIGEST = output_digest([("out.txt", 6, b"\x01" * 32)], bytes(32))
T0 = 1_700_000_000_000


@dataclasses.dataclass(frozen=True)
class Cert:
    members: tuple[str, ...]
    cert_hash: bytes


CERT = Cert(members=(A.peer_id, B.peer_id, C.peer_id), cert_hash=CERT_HASH)
TERMS = ProofTerms(job_id=JOB, duration_ms_max=60_000, gpus_per_member=2, price_per_gpu_hour_max=3_600_000,
                   tolerance_ms=2_000)


def chain_for(identity: Identity, start: int, end: int, every: int = 10_000) -> CheckpointChain:
    chain = CheckpointChain(JOB, CERT_HASH, identity.peer_id)
    for t in range(start + every, end + 1, every):
        chain.add(t, t.to_bytes(8, "big"))
    return chain


def proof(identity: Identity = A, *, start: int = T0, end: int = T0 + 30_000, gpus: tuple[str, ...] = ("g0", "g1"),
          digest: bytes = DIGEST, **over: Any) -> Proof:
    chain = chain_for(identity, start, end)
    fields: dict[str, Any] = {
        "job_id": JOB, "cert_hash": CERT_HASH, "peer_id": identity.peer_id, "gpus": gpus, "started_at_ms": start,
        "ended_at_ms": end, "gpu_ms": len(gpus) * (end - start), "exit_code": 0, "end_reason": "exited",
        "output_digest": digest, "checkpoints": tuple(chain.checkpoints), "chain_head": chain.head}
    fields.update(over)
    return Proof(**fields)


def cosign(observer: Identity, subject: Identity = A, *, first: int = T0 + 500, last: int = T0 + 29_500,
           count: int = 30, head: bytes = b"", **over: Any) -> bytes:
    fields: dict[str, Any] = {"job_id": JOB, "cert_hash": CERT_HASH, "subject": subject.peer_id,
                                  "observer": observer.peer_id, "first_seen_ms": first, "last_seen_ms": last,
                                  "heartbeats": count, "last_chain_head": head}
    fields.update(over)
    return sign_cosign(observer, Cosign(**fields)).wire


def signed(p: Proof, identity: Identity | None = None) -> bytes:
    if identity is None:
        return sign_proof(A if p.peer_id == A.peer_id else next(i for i in IDS if i.peer_id == p.peer_id), p).wire
    return seal(identity, Kind.PROOF, p.to_obj()).to_bytes()


def flip_signature(wire: bytes) -> bytes:
    obj = decode(wire)
    obj["g"] = obj["g"][:-1] + bytes([obj["g"][-1] ^ 1])
    return encode(obj)


def broken_chain_info() -> Proof:
    good = proof()
    cps = list(good.checkpoints)
    cps[1] = dataclasses.replace(cps[1], info=b"forged")
    return dataclasses.replace(good, checkpoints=tuple(cps))


def backwards_chain() -> Proof:
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    chain.add(T0 + 20_000)
    chain.checkpoints.append(dataclasses.replace(chain.checkpoints[0], t_ms=T0 + 10_000))
    from p2pgpu.core._proof import chain_next
    head = chain_next(chain.head, T0 + 10_000, b"")
    return proof(checkpoints=tuple(chain.checkpoints), chain_head=head)


def outside_chain() -> Proof:
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    chain.add(T0 + 45_000)
    return proof(checkpoints=tuple(chain.checkpoints), chain_head=chain.head)


# name, proof bytes, co-signatures, terms, expected fault
REJECTIONS: list[tuple[str, Callable[[], bytes], Callable[[], list[bytes]], ProofTerms, ProofFault]] = [
    ("bad signature", lambda: flip_signature(signed(proof())), lambda: [cosign(B)], TERMS,
     ProofFault.BAD_SIGNATURE),
    ("signed by another member", lambda: signed(proof(), B), lambda: [cosign(B)], TERMS,
     ProofFault.SIGNER_MISMATCH),
    ("truncated", lambda: signed(proof())[:-20], list, TERMS, ProofFault.MALFORMED),
    ("not a member", lambda: signed(proof(OUTSIDER)), lambda: [cosign(B, OUTSIDER)], TERMS,
     ProofFault.NOT_A_MEMBER),
    ("another job", lambda: signed(proof(job_id="cd" * 32)), lambda: [cosign(B)], TERMS, ProofFault.WRONG_JOB),
    ("another certificate", lambda: signed(proof(cert_hash=b"\x07" * 32)), lambda: [cosign(B)], TERMS,
     ProofFault.WRONG_CERTIFICATE),
    ("more GPUs than assigned", lambda: signed(proof(gpus=("g0", "g1", "g2"))), lambda: [cosign(B)], TERMS,
     ProofFault.TOO_MANY_GPUS),
    ("beyond the duration limit", lambda: signed(proof(end=T0 + 70_000)),
     lambda: [cosign(B, last=T0 + 70_000)], TERMS, ProofFault.OVER_DURATION),
    ("GPU time beyond GPUs x duration", lambda: signed(proof(gpu_ms=60_001)), lambda: [cosign(B)], TERMS,
     ProofFault.OVER_GPU_TIME),
    ("GPU time beyond the duration limit", lambda: signed(proof(end=T0 + 61_000, gpu_ms=122_000)),
     lambda: [cosign(B, last=T0 + 61_000)], TERMS, ProofFault.OVER_GPU_TIME),
    ("no co-signature in a 3-member cluster", lambda: signed(proof()), list, TERMS,
     ProofFault.NOT_OBSERVED),
    ("only unusable co-signatures", lambda: signed(proof()),
     lambda: [cosign(OUTSIDER), cosign(B, C), flip_signature(cosign(C))], TERMS, ProofFault.NOT_OBSERVED),
    ("checkpoint altered", lambda: signed(broken_chain_info()), lambda: [cosign(B)], TERMS,
     ProofFault.BROKEN_CHAIN),
    ("head does not match", lambda: signed(proof(chain_head=b"\x09" * 32)), lambda: [cosign(B)], TERMS,
     ProofFault.BROKEN_CHAIN),
    ("checkpoint times backwards", lambda: signed(backwards_chain()), lambda: [cosign(B)], TERMS,
     ProofFault.BROKEN_CHAIN),
    ("checkpoint after the end", lambda: signed(outside_chain()), lambda: [cosign(B)], TERMS,
     ProofFault.BROKEN_CHAIN),
]


@pytest.mark.parametrize("name,make,cosigns,terms,fault", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_verifier_rejects_with_a_reason(name: str, make: Callable[[], bytes], cosigns: Callable[[], list[bytes]],
                                        terms: ProofTerms, fault: ProofFault) -> None:
    with pytest.raises(ProofRejected) as err:
        verify_proof(make(), cert=CERT, terms=terms, cosigns=cosigns())
    assert err.value.fault is fault
    assert isinstance(err.value, PeerMisbehaved)


def test_a_claim_beyond_what_co_signers_observed_is_paid_up_to_their_observation() -> None:
    """Not refused (#13: a member a partition cut off from its co-signers
    served that time too, and its honest proof went unpaid): paid for the
    best co-signer's observation plus one heartbeat interval plus the
    tolerance, never more."""
    vp = verify_proof(signed(proof()), cert=CERT, terms=TERMS,
                      cosigns=[cosign(B, last=T0 + 10_000), cosign(C, last=T0 + 20_000)])
    best = 20_000 - 500
    bound = best + 1_000 + TERMS.tolerance(best + 1_000)
    assert vp.observed_ms == best and vp.bound_ms == bound and vp.capped
    assert vp.paid_gpu_ms == 2 * bound < vp.proof.gpu_ms
    (row,) = owed([vp], terms=TERMS)
    assert row.amount == 2 * bound * TERMS.price_per_gpu_hour_max // 3_600_000


def test_reasons_map_to_protocol_reasons() -> None:
    with pytest.raises(ProofRejected) as err:
        verify_proof(signed(proof(OUTSIDER)), cert=CERT, terms=TERMS, cosigns=[cosign(B, OUTSIDER)])
    assert err.value.reason is Reason.NOT_A_MEMBER
    with pytest.raises(ProofRejected) as err:
        verify_proof(flip_signature(signed(proof())), cert=CERT, terms=TERMS)
    assert err.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(ProofRejected) as err:
        verify_proof(signed(proof(gpu_ms=60_001)), cert=CERT, terms=TERMS, cosigns=[cosign(B)])
    assert err.value.reason is Reason.BAD_PROOF


# name, proof, co-signatures, what the result must show
ACCEPTS: list[tuple[str, Callable[[], bytes], Callable[[], list[bytes]], Callable[[Any], bool]]] = [
    ("one co-signer", lambda: signed(proof()), lambda: [cosign(B)],
     lambda v: v.cosigners == (B.peer_id,) and v.observed_ms == 29_000),
    ("served within tolerance of what was observed", lambda: signed(proof()),
     lambda: [cosign(B, first=T0 + 1_000, last=T0 + 29_000)], lambda v: v.observed_ms == 28_000),
    ("the best co-signer bounds the claim", lambda: signed(proof()),
     lambda: [cosign(B, last=T0 + 5_000), cosign(C)], lambda v: v.cosigners == tuple(sorted([B.peer_id, C.peer_id]))),
    ("bad co-signatures are ignored, not held against the proof", lambda: signed(proof()),
     lambda: [cosign(OUTSIDER), cosign(B, C), flip_signature(cosign(C)), cosign(C, head=b"\x05" * 32), cosign(B)],
     lambda v: v.cosigners == (B.peer_id,) and len(v.cosigns_ignored) == 4),
    ("a co-signer saw a head on the chain", lambda: signed(proof()),
     lambda: [cosign(B, head=chain_for(A, T0, T0 + 30_000).heads[2])], lambda v: v.cosigners == (B.peer_id,)),
    ("a second co-signature of one observer counts once", lambda: signed(proof()),
     lambda: [cosign(B), cosign(B, last=T0 + 29_000)], lambda v: len(v.cosigners) == 1),
    ("member of rank 0 replica 2", lambda: signed(proof(C)), lambda: [cosign(A, C)],
     lambda v: (v.rank, v.replica) == (0, 2)),
    ("no GPUs used, nothing claimed", lambda: signed(proof(gpus=(), gpu_ms=0)), lambda: [cosign(B)],
     lambda v: v.proof.gpu_ms == 0),
    ("killed at the limit: duration within tolerance, GPU time capped", lambda: signed(
        proof(end=T0 + 61_000, gpu_ms=120_000)), lambda: [cosign(B, last=T0 + 61_000)],
     lambda v: v.proof.gpu_ms == 120_000),
]


@pytest.mark.parametrize("name,make,cosigns,check", ACCEPTS, ids=[a[0] for a in ACCEPTS])
def test_verifier_accepts(name: str, make: Callable[[], bytes], cosigns: Callable[[], list[bytes]],
                          check: Callable[[Any], bool]) -> None:
    assert check(verify_proof(make(), cert=CERT, terms=TERMS, cosigns=cosigns()))


def test_single_member_job_needs_no_co_signer() -> None:
    cert = Cert(members=(A.peer_id,), cert_hash=CERT_HASH)
    vp = verify_proof(signed(proof()), cert=cert, terms=TERMS)
    assert vp.observed_ms is None and vp.cosigners == ()


def test_message_constructors_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        proof(end=T0 - 1)
    with pytest.raises(ValueError):
        proof(end_reason="bored")
    with pytest.raises(ValueError):
        Cosign(job_id=JOB, cert_hash=CERT_HASH, subject=A.peer_id, observer=A.peer_id, first_seen_ms=0,
               last_seen_ms=1, heartbeats=1, last_chain_head=b"")
    with pytest.raises(ValueError):
        sign_proof(B, proof(A))
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    chain.add(10)
    with pytest.raises(ValueError):
        chain.add(5)


def test_checkpoint_interval_fits_the_limit() -> None:
    for duration_ms in (1_000, 60_000, 3_600_000, 7 * 24 * 3_600_000):
        interval = checkpoint_interval_ms(duration_ms)
        assert duration_ms // interval + 1 <= checkpoints_max


def test_a_full_chain_fits_in_a_proof() -> None:
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    for i in range(checkpoints_max):
        chain.add(T0 + i, b"\xff" * 32)
    p = proof(end=T0 + checkpoints_max, gpu_ms=0, checkpoints=tuple(chain.checkpoints), chain_head=chain.head)
    assert decode_proof(sign_proof(A, p).wire).proof == p


# --- quorum and owed --------------------------------------------------------------

def verified(identity: Identity, terms: ProofTerms, cert: Cert, **kw: Any) -> Any:
    p = proof(identity, **kw)
    others = [i for i in IDS if i.peer_id in cert.members and i.peer_id != identity.peer_id]
    return verify_proof(signed(p), cert=cert, terms=terms, cosigns=[cosign(others[0], identity)] if others else [])


REPL = dataclasses.replace(TERMS, replicas=3, quorum=2)


def test_owed_pays_time_served_at_the_price() -> None:
    cert = Cert(members=(A.peer_id,), cert_hash=CERT_HASH)
    terms = dataclasses.replace(TERMS, price_per_gpu_hour_max=7_200_000)
    vp = verified(A, terms, cert, gpus=("g0",), end=T0 + 1_500)
    [row] = owed([vp], terms=terms)
    assert row.amount == 1_500 * 7_200_000 // 3_600_000 == 3_000 and row.status == "paid"
    [row] = owed([vp], terms=terms, prices={A.peer_id: 3_600_000})
    assert row.amount == 1_500 and row.price_per_gpu_hour == 3_600_000
    [row] = owed([vp], terms=terms, prices={A.peer_id: 10**12})
    assert row.price_per_gpu_hour == 7_200_000, "never above the ceiling"


def test_owed_rounds_down() -> None:
    cert = Cert(members=(A.peer_id,), cert_hash=CERT_HASH)
    terms = dataclasses.replace(TERMS, price_per_gpu_hour_max=3_599_999)
    vp = verified(A, terms, cert, gpus=("g0",), end=T0 + 1)
    assert owed([vp], terms=terms)[0].amount == 0


def test_quorum_pays_the_majority_only() -> None:
    vps = [verified(A, REPL, CERT), verified(B, REPL, CERT), verified(C, REPL, CERT, digest=OTHER_DIGEST)]
    assert quorum_digests(vps, REPL) == {0: DIGEST}
    rows = {r.peer_id: r for r in owed(vps, terms=REPL)}
    assert rows[C.peer_id].status == "outside_quorum" and rows[C.peer_id].amount == 0
    assert rows[A.peer_id].status == rows[B.peer_id].status == "paid" and rows[A.peer_id].amount > 0


def test_no_quorum_pays_each_its_time_served() -> None:
    """Nobody can tell which replica is right: each is owed its time, as every
    member of a failed job is (it was 0, and an honest replica tied with a
    liar went unpaid)."""
    third = output_digest([], b"\x02" * 32)
    vps = [verified(A, REPL, CERT), verified(B, REPL, CERT, digest=OTHER_DIGEST),
           verified(C, REPL, CERT, digest=third)]
    assert quorum_digests(vps, REPL) == {0: None}
    rows = owed(vps, terms=REPL)
    assert {r.status for r in rows} == {"no_quorum"}
    assert all(r.amount == r.gpu_ms * r.price_per_gpu_hour // 3_600_000 > 0 for r in rows)
    # A tie at quorum 1 is no quorum either.
    tie = dataclasses.replace(REPL, replicas=2, quorum=1)
    assert quorum_digests(vps[:2], tie) == {0: None}


def test_missing_output_never_wins() -> None:
    vps = [verified(A, REPL, CERT, digest=b""), verified(B, REPL, CERT, digest=b""), verified(C, REPL, CERT)]
    assert quorum_digests(vps, REPL) == {0: None}


def test_ranks_vote_separately() -> None:
    ids4 = IDS[:4]
    cert = Cert(members=tuple(i.peer_id for i in ids4), cert_hash=CERT_HASH)
    terms = dataclasses.replace(TERMS, nodes=2, replicas=2, quorum=2)
    vps = [verified(ids4[0], terms, cert), verified(ids4[1], terms, cert, digest=OTHER_DIGEST),
           verified(ids4[2], terms, cert), verified(ids4[3], terms, cert, digest=DIGEST)]
    assert [v.rank for v in vps] == [0, 1, 0, 1]
    assert quorum_digests(vps, terms) == {0: DIGEST, 1: None}


def test_owed_is_deterministic_and_counts_one_proof_per_member() -> None:
    vps = [verified(A, REPL, CERT), verified(B, REPL, CERT), verified(C, REPL, CERT, digest=OTHER_DIGEST)]
    again = verified(A, REPL, CERT, end=T0 + 29_000)
    first = owed(vps + [again], terms=REPL)
    rng = random.Random(1)
    for _ in range(5):
        shuffled = vps + [again]
        rng.shuffle(shuffled)
        assert owed(shuffled, terms=REPL) == first
    assert len(first) == 3
    assert owed_total(first) == owed_total(owed(list(reversed(vps + [again])), terms=REPL))


def test_anyone_recomputes_the_same_figure_from_wire_bytes() -> None:
    wires = [signed(proof(i)) for i in (A, B, C)]
    cos = {A.peer_id: [cosign(B, A)], B.peer_id: [cosign(C, B)], C.peer_id: [cosign(A, C)]}
    def recompute() -> dict[str, int]:
        vps = [verify_proof(w, cert=CERT, terms=REPL, cosigns=cos[decode_proof(w).proof.peer_id]) for w in wires]
        return owed_total(owed(vps, terms=REPL))
    total = recompute()
    assert total == recompute() and sum(total.values()) == 3 * (60_000 * 3_600_000 // 3_600_000)


def test_terms_from_a_signed_manifest() -> None:
    manifest = pytest.importorskip("p2pgpu.core._manifest")
    m = manifest.Manifest(name="t", submitter=A.peer_id, created_at_ms=T0, expires_at_ms=T0 + 60_000,
                          nonce=b"\x00" * 16, command=("true",), duration_s_max=90, gpus_per_node=2,
                          price_per_gpu_hour_max=500, replicas=3, quorum=2, nodes=1,
                          payer="11111111111111111111111111111111")
    terms = ProofTerms.from_manifest(manifest.sign_manifest(A, m))
    assert (terms.duration_ms_max, terms.gpus_per_member, terms.replicas, terms.quorum) == (90_000, 2, 3, 2)
    assert len(terms.job_id) == 64


# --- decoders never crash ----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoders_take_any_bytes(data: bytes) -> None:
    for decoder, kind in ((decode_proof, Kind.PROOF), (decode_cosign, Kind.COSIGN)):
        try:
            result = decoder(data)
        except PeerMisbehaved:
            continue
        assert result.envelope.kind is kind


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decoders_take_mutated_messages(data: st.DataObject) -> None:
    wire = bytearray(data.draw(st.sampled_from([signed(proof()), cosign(B)])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    for decoder in (decode_proof, decode_cosign):
        try:
            result = decoder(bytes(wire))
        except PeerMisbehaved:
            continue
        assert isinstance(result.envelope.body, bytes)


def test_verify_proof_on_garbage_is_a_typed_rejection() -> None:
    with pytest.raises(ProofRejected) as err:
        verify_proof(b"\x93\x01\x02", cert=CERT, terms=TERMS)
    assert err.value.fault is ProofFault.MALFORMED
    assert isinstance(decode_proof(signed(proof())), SignedProof)


def test_with_a_real_formation_certificate() -> None:
    from p2pgpu.core import Accept, Certificate, Proposal
    from p2pgpu.core._proof import agreed_prices

    proposal = Proposal.sign(A, job_id=JOB, view=0, round=0, members=(A.peer_id, B.peer_id), gpus_per_member=2)
    accepts = tuple(Accept.sign(i, proposal=proposal, lease_until_ms=T0 + 60_000, price_per_gpu_hour=p,
                                payout_address="") for i, p in ((A, 1_800_000), (B, 9_000_000)))
    cert = Certificate(proposal=proposal, accepts=accepts)
    p = dataclasses.replace(proof(), cert_hash=cert.digest, checkpoints=(),
                            chain_head=CheckpointChain(JOB, cert.digest, A.peer_id).head)
    co = sign_cosign(B, Cosign(job_id=JOB, cert_hash=cert.digest, subject=A.peer_id, observer=B.peer_id,
                               first_seen_ms=T0, last_seen_ms=T0 + 30_000, heartbeats=30, last_chain_head=b"")).wire
    vp = verify_proof(sign_proof(A, p).wire, cert=cert, terms=TERMS, cosigns=[co])
    prices = agreed_prices(cert)
    assert prices == {A.peer_id: 1_800_000, B.peer_id: 9_000_000}
    [row] = owed([vp], terms=TERMS, prices=prices)
    assert row.price_per_gpu_hour == 1_800_000 and row.amount == 60_000 * 1_800_000 // 3_600_000
    with pytest.raises(ProofRejected) as err:
        verify_proof(sign_proof(A, proof()).wire, cert=cert, terms=TERMS, cosigns=[co])
    assert err.value.fault is ProofFault.WRONG_CERTIFICATE
