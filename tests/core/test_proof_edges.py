"""Work proofs at their edges (#19): every bound of every field on both sides,
the decoders fed non-canonical, oversized and mistyped encodings (each
refusal must name the field at fault), every boundary of the verifier, and
every field of what ``verify_proof`` and ``owed`` return.  The known answers
of the hashes and signed bytes are in ``tests/data/vectors.json``
(``test_vectors.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from test_proof import (
    CERT,
    CERT_HASH,
    DIGEST,
    IDS,
    JOB,
    OTHER_DIGEST,
    REPL,
    T0,
    TERMS,
    A,
    B,
    C,
    Cert,
    cosign,
    proof,
    signed,
    verified,
)

from p2pgpu.core import Kind, LocalProtocolError, PeerMisbehaved, Reason, decode, encode, seal
from p2pgpu.core._proof import (
    Checkpoint,
    CheckpointChain,
    Cosign,
    Owed,
    Proof,
    ProofFault,
    ProofRejected,
    ProofTerms,
    agreed_prices,
    certificate_hash,
    chain_genesis,
    chain_next,
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
from p2pgpu.core._schema import int_max

D = IDS[3]  # a fourth identity (outside CERT)


def bare_proof(identity: Any = A, *, start: int = T0, end: int = T0 + 30_000, **over: Any) -> Proof:
    """A proof with no checkpoints (its head is the genesis): any duration fits."""
    fields: dict[str, Any] = {
        "job_id": JOB, "cert_hash": CERT_HASH, "peer_id": identity.peer_id, "gpus": ("g0",),
        "started_at_ms": start, "ended_at_ms": end, "gpu_ms": end - start, "exit_code": 0,
        "end_reason": "exited", "output_digest": DIGEST, "checkpoints": (),
        "chain_head": chain_genesis(JOB, CERT_HASH, identity.peer_id)}
    fields.update(over)
    return Proof(**fields)


def cosign_fields(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"job_id": JOB, "cert_hash": CERT_HASH, "subject": A.peer_id, "observer": B.peer_id,
                              "first_seen_ms": T0, "last_seen_ms": T0 + 30_000, "heartbeats": 30,
                              "last_chain_head": b""}
    fields.update(over)
    return fields


def refused(decoder: Any, wire: bytes) -> PeerMisbehaved:
    with pytest.raises(PeerMisbehaved) as err:
        decoder(wire)
    return err.value


# --- the message constructors: each bound on both sides ------------------------------


def test_proof_field_bounds() -> None:
    ok = bare_proof()
    good: list[dict[str, Any]] = [
        {"peer_id": "x"}, {"peer_id": "x" * 64}, {"gpus": ("g",) * 16, "gpu_ms": 0}, {"gpus": ("g" * 64,)},
        {"gpus": (), "gpu_ms": 0}, {"ended_at_ms": T0, "gpu_ms": 0}, {"started_at_ms": 0, "gpu_ms": 0},
        {"ended_at_ms": int_max}, {"gpu_ms": int_max}, {"exit_code": 255}, {"exit_code": 0},
        {"output_digest": b""}, {"end_reason": "interrupted"},
        {"checkpoints": (Checkpoint(t_ms=T0),) * checkpoints_max},
    ]
    for over in good:
        assert dataclasses.replace(ok, **over) is not None, over
    bad: list[tuple[dict[str, Any], str]] = [
        ({"job_id": "AB" * 32}, "job_id must be 64 hex"), ({"cert_hash": b"\x00" * 31}, "cert_hash 32 bytes"),
        ({"cert_hash": b"\x00" * 33}, "cert_hash 32 bytes"),
        ({"peer_id": ""}, "peer_id length"), ({"peer_id": "x" * 65}, "peer_id length"),
        ({"gpus": ("g",) * 17}, "at most 16 GPUs"), ({"gpus": ("",)}, "each named in 1..64"),
        ({"gpus": ("g" * 65,)}, "each named in 1..64"),
        ({"started_at_ms": -1}, "times must satisfy"), ({"ended_at_ms": T0 - 1}, "times must satisfy"),
        ({"ended_at_ms": int_max + 1}, "times must satisfy"), ({"gpu_ms": -1}, "times must satisfy"),
        ({"gpu_ms": int_max + 1}, "times must satisfy"),
        ({"exit_code": 256}, "exit_code in 0..255"), ({"exit_code": -1}, "exit_code in 0..255"),
        ({"end_reason": "bored"}, "end_reason one of exited, time_limit"),
        ({"output_digest": b"\x00" * 31}, "output_digest is empty or 32 bytes"),
        ({"chain_head": b"\x00" * 31}, "chain_head is 32 bytes"),
        ({"checkpoints": (Checkpoint(t_ms=T0),) * (checkpoints_max + 1)}, "at most 256 checkpoints"),
    ]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            dataclasses.replace(ok, **over)


def test_checkpoint_bounds() -> None:
    assert Checkpoint(t_ms=0).info == b""
    assert Checkpoint(t_ms=int_max, info=b"\x00" * 32).t_ms == int_max
    for t_ms, info in ((-1, b""), (int_max + 1, b""), (0, b"\x00" * 33)):
        with pytest.raises(ValueError, match="checkpoint time out of range or info over 32 bytes"):
            Checkpoint(t_ms=t_ms, info=info)


def test_cosign_field_bounds() -> None:
    for over in ({"subject": "x"}, {"subject": "x" * 64}, {"observer": "y"}, {"observer": "y" * 64},
                 {"first_seen_ms": 0}, {"last_seen_ms": T0}, {"last_seen_ms": int_max}, {"heartbeats": 1},
                 {"heartbeats": int_max}, {"last_chain_head": b"\x00" * 32}):
        Cosign(**cosign_fields(**over))
    bad: list[tuple[dict[str, Any], str]] = [
        ({"job_id": "AB" * 32}, "job_id must be 64 hex"), ({"cert_hash": b"\x00" * 31}, "cert_hash 32 bytes"),
        ({"subject": ""}, "peer id length"), ({"subject": "x" * 65}, "peer id length"),
        ({"observer": ""}, "peer id length"), ({"observer": "x" * 65}, "peer id length"),
        ({"observer": A.peer_id}, "does not co-sign its own proof"),
        ({"first_seen_ms": -1}, "first_seen_ms <= last_seen_ms"),
        ({"last_seen_ms": T0 - 1}, "first_seen_ms <= last_seen_ms"),
        ({"last_seen_ms": int_max + 1}, "first_seen_ms <= last_seen_ms"),
        ({"heartbeats": 0}, "at least one heartbeat"), ({"heartbeats": int_max + 1}, "at least one heartbeat"),
        ({"last_chain_head": b"\x00" * 31}, "last_chain_head is empty or 32 bytes"),
    ]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            Cosign(**cosign_fields(**over))


def test_terms_bounds() -> None:
    base = {"job_id": JOB, "duration_ms_max": 1, "gpus_per_member": 1, "price_per_gpu_hour_max": 0}
    t = ProofTerms(**base, nodes=1, replicas=1, quorum=1, tolerance_ms=0, tolerance_ppm=0,  # type: ignore[arg-type]
                   heartbeat_interval_ms=0)
    assert (t.duration_ms_max, t.tolerance_ms, t.tolerance_ppm, t.heartbeat_interval_ms, t.cosigns_min) == (
        1, 0, 0, 0, None)
    d = ProofTerms(job_id=JOB, duration_ms_max=1, gpus_per_member=1, price_per_gpu_hour_max=0)
    assert (d.tolerance_ms, d.tolerance_ppm, d.heartbeat_interval_ms) == (1_000, 50_000, 1_000)
    ProofTerms(**base, replicas=3, quorum=3, tolerance_ppm=1_000_000)  # type: ignore[arg-type]
    for over in ({"duration_ms_max": 0}, {"gpus_per_member": 0}, {"price_per_gpu_hour_max": -1}):
        with pytest.raises(ValueError, match="duration and GPUs must be positive, price not negative"):
            ProofTerms(**{**base, **over})  # type: ignore[arg-type]
    for over in ({"nodes": 0}, {"quorum": 0}, {"quorum": 2}, {"tolerance_ms": -1}):
        with pytest.raises(ValueError, match=r"need nodes >= 1, 1 <= quorum <= replicas, tolerance >= 0"):
            ProofTerms(**base, **over)  # type: ignore[arg-type]
    for over in ({"tolerance_ppm": -1}, {"tolerance_ppm": 1_000_001}, {"heartbeat_interval_ms": -1}):
        with pytest.raises(ValueError, match=r"tolerance_ppm in 0..10\^6, heartbeat interval >= 0"):
            ProofTerms(**base, **over)  # type: ignore[arg-type]


def test_tolerance_is_the_larger_of_the_floor_and_the_share() -> None:
    t = ProofTerms(job_id=JOB, duration_ms_max=1, gpus_per_member=1, price_per_gpu_hour_max=0, tolerance_ms=1_000,
                   tolerance_ppm=50_000)
    assert [t.tolerance(x) for x in (-5, 0, 19_999, 20_000, 20_019, 20_020, 100_000)] == [
        1_000, 1_000, 1_000, 1_000, 1_000, 1_001, 5_000]
    # no floor and the whole observation as the share: nothing observed, nothing tolerated
    whole = dataclasses.replace(t, tolerance_ms=0, tolerance_ppm=1_000_000)
    assert [whole.tolerance(x) for x in (-5, 0, 1, 7)] == [0, 0, 1, 7]


def test_terms_from_a_manifest_carry_every_field() -> None:
    from p2pgpu.core._manifest import Manifest, sign_manifest

    m = Manifest(name="t", submitter=A.peer_id, created_at_ms=T0, expires_at_ms=T0 + 60_000, nonce=b"\x00" * 16,
                 command=("true",), duration_s_max=90, gpus_per_node=2, price_per_gpu_hour_max=500, replicas=3,
                 quorum=2, nodes=2, payer="11111111111111111111111111111111")
    sm = sign_manifest(A, m)
    assert ProofTerms.from_manifest(sm) == ProofTerms(
        job_id=sm.job_id, duration_ms_max=90_000, gpus_per_member=2, price_per_gpu_hour_max=500, nodes=2,
        replicas=3, quorum=2, tolerance_ms=1_000, tolerance_ppm=50_000, heartbeat_interval_ms=1_000)
    assert ProofTerms.from_manifest(sm, tolerance_ms=7).tolerance_ms == 7


def test_signing_keeps_the_message() -> None:
    p = proof()
    sp = sign_proof(A, p)
    assert sp.proof == p and decode_proof(sp.wire).proof == p
    co = Cosign(**cosign_fields())
    sc = sign_cosign(B, co)
    assert sc.cosign == co and decode_cosign(sc.wire).cosign == co
    with pytest.raises(ValueError, match="a proof is signed by the member it describes"):
        sign_proof(B, p)
    with pytest.raises(ValueError, match="a co-signature is signed by its observer"):
        sign_cosign(A, co)


# --- decoders: every refusal names what is wrong ----------------------------------------


def proof_wire(identity: Any = A, **over: Any) -> bytes:
    """A proof body with fields set to anything, signed (so only the schema can refuse it)."""
    body = {**bare_proof().to_obj(), **over}
    return seal(identity, Kind.PROOF, body).to_bytes()


def cosign_wire(identity: Any = B, **over: Any) -> bytes:
    return seal(identity, Kind.COSIGN, {**Cosign(**cosign_fields()).to_obj(), **over}).to_bytes()


PROOF_FIELDS_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"job_id": "AB" * 32}, "job_id: must be 64 lowercase hex characters"),
    ({"job_id": "ab" * 32 + "a"}, "job_id: length must be in [64, 64]"),
    ({"job_id": "ab" * 31 + "a"}, "job_id: length must be in [64, 64]"),
    ({"cert_hash": b"\x00" * 31}, "cert_hash: length must be in [32, 32]"),
    ({"cert_hash": b"\x00" * 33}, "cert_hash: length must be in [32, 32]"),
    ({"peer_id": ""}, "peer_id: length must be in [1, 64]"),
    ({"exit_code": 256}, "exit_code: must be in [0, 255]"),
    ({"end_reason": "x" * 17}, "end_reason: length must be in [0, 16]"),
    ({"end_reason": "bored"}, "exit_code in 0..255 and end_reason one of"),
    ({"output_digest": b"\x00" * 33}, "output_digest: length must be in [0, 32]"),
    ({"chain_head": b"\x00" * 33}, "chain_head: length must be in [32, 32]"),
    ({"chain_head": b"\x00" * 31}, "chain_head: length must be in [32, 32]"),
    ({"started_at_ms": T0 + 1, "ended_at_ms": T0}, "times must satisfy 0 <= started_at_ms <= ended_at_ms"),
    ({"checkpoints": [5]}, "checkpoints[0]: must be [t_ms, info]"),
    ({"checkpoints": [[T0, b""], [T0, b"", 3]]}, "checkpoints[1]: must be [t_ms, info]"),
    ({"checkpoints": [["a", b""]]}, "checkpoints[0]: must be [t_ms, info]"),
    ({"checkpoints": [[T0, "text"]]}, "checkpoints[0]: must be [t_ms, info]"),
    ({"checkpoints": [[True, b""]]}, "checkpoints[0]: must be [t_ms, info]"),
    ({"checkpoints": [[T0, b"\x00" * 33]]}, "checkpoints[0]: checkpoint time out of range or info over 32 bytes"),
]


@pytest.mark.parametrize("over,why", PROOF_FIELDS_REFUSED, ids=[w for _, w in PROOF_FIELDS_REFUSED])
def test_proof_decoder_names_the_field(over: dict[str, Any], why: str) -> None:
    err = refused(decode_proof, proof_wire(**over))
    assert err.reason is Reason.BAD_SCHEMA
    assert err.detail.startswith(why), err.detail


COSIGN_FIELDS_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"cert_hash": b"\x00" * 31}, "cert_hash: length must be in [32, 32]"),
    ({"cert_hash": b"\x00" * 33}, "cert_hash: length must be in [32, 32]"),
    ({"subject": ""}, "subject: length must be in [1, 64]"),
    ({"observer": ""}, "observer: length must be in [1, 64]"),
    ({"heartbeats": 0}, "heartbeats: must be in [1, "),
    ({"last_chain_head": b"\x00" * 33}, "last_chain_head: length must be in [0, 32]"),
    ({"last_chain_head": b"\x00" * 31}, "last_chain_head is empty or 32 bytes"),
    ({"subject": B.peer_id}, "a member does not co-sign its own proof"),
    ({"job_id": "AB" * 32}, "job_id: must be 64 lowercase hex characters"),
]


@pytest.mark.parametrize("over,why", COSIGN_FIELDS_REFUSED, ids=[w for _, w in COSIGN_FIELDS_REFUSED])
def test_cosign_decoder_names_the_field(over: dict[str, Any], why: str) -> None:
    err = refused(decode_cosign, cosign_wire(**over))
    assert err.reason is Reason.BAD_SCHEMA
    assert err.detail.startswith(why), err.detail


def test_decoders_take_the_smallest_valid_fields() -> None:
    # One-character ids and one heartbeat are within the schema; whether they
    # name a member is the verifier's business.
    sc = decode_cosign(cosign_wire(subject="x", heartbeats=1))
    assert (sc.cosign.subject, sc.cosign.heartbeats) == ("x", 1)
    err = refused(decode_proof, proof_wire(peer_id="x"))
    assert err.reason is Reason.SIGNER_MISMATCH and err.detail == "proof not signed by its member"


def test_signer_must_be_the_member_or_the_observer() -> None:
    err = refused(decode_proof, signed(proof(), B))
    assert err.reason is Reason.SIGNER_MISMATCH and err.detail == "proof not signed by its member"
    err = refused(decode_cosign, cosign_wire(C))
    assert err.reason is Reason.SIGNER_MISMATCH and err.detail == "co-signature not signed by its observer"


def test_decoders_keep_the_envelope() -> None:
    wire = signed(proof())
    assert decode_proof(wire).wire == wire
    w = cosign(B)
    assert decode_cosign(w).wire == w and decode_cosign(w).envelope.kind is Kind.COSIGN


def test_decoders_refuse_another_kind() -> None:
    assert refused(decode_proof, cosign(B)).reason is Reason.WRONG_KIND
    assert refused(decode_cosign, signed(proof())).reason is Reason.WRONG_KIND


def _reordered(wire: bytes) -> bytes:
    """The same envelope with its map keys out of order: valid msgpack, same signature."""
    obj = decode(wire)
    return msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)  # type: ignore[no-any-return]


def _wide_version(wire: bytes) -> bytes:
    """The version 1 written as a uint16 (0xcd 0x00 0x01) instead of a fixint."""
    head = msgpack.packb("v")
    i = wire.index(head + b"\x01")
    return wire[: i + len(head)] + b"\xcd\x00\x01" + wire[i + len(head) + 1:]


@pytest.mark.parametrize("make", [lambda: signed(proof()), lambda: cosign(B)], ids=["proof", "cosign"])
def test_decoders_refuse_non_canonical_bytes(make: Any) -> None:
    wire = make()
    decoder = decode_proof if decode(wire)["k"] == "proof" else decode_cosign
    decoder(wire)
    for bent in (_reordered(wire), _wide_version(wire)):
        assert bent != wire and decode(bent) == decode(wire)
        assert refused(decoder, bent).reason is Reason.NON_CANONICAL


def test_decoders_refuse_oversized_bytes_before_reading_them() -> None:
    for decoder, kind in ((decode_proof, Kind.PROOF), (decode_cosign, Kind.COSIGN)):
        err = refused(decoder, b"\x00" * (kind.bytes_max + 1))
        assert err.reason is Reason.OVERSIZED
        # A well-formed envelope padded past the limit in a field other than
        # the body is refused for its size too, not for its signer.
        obj = decode(signed(proof()) if kind is Kind.PROOF else cosign(B))
        obj["s"] = b"\x00" * kind.bytes_max
        assert refused(decoder, encode(obj)).reason is Reason.OVERSIZED


# --- certificates -------------------------------------------------------------------------


def test_certificate_hash_needs_32_bytes() -> None:
    @dataclasses.dataclass(frozen=True)
    class Digest:
        members: tuple[str, ...]
        digest: bytes

    @dataclasses.dataclass(frozen=True)
    class Nothing:
        members: tuple[str, ...]

    assert certificate_hash(Digest(members=(), digest=CERT_HASH)) == CERT_HASH
    assert certificate_hash(CERT) == CERT_HASH
    for cert in (Nothing(members=()), Cert(members=(), cert_hash=b"\x00" * 31), Cert(members=(), cert_hash="x" * 32)):  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError, match="a certificate needs a 32-byte cert_hash or digest"):
            certificate_hash(cert)
    assert agreed_prices(CERT) == {}


def test_a_certificate_for_another_job_is_our_mistake() -> None:
    @dataclasses.dataclass(frozen=True)
    class JobCert:
        members: tuple[str, ...]
        cert_hash: bytes
        job_id: str

    good = JobCert(members=CERT.members, cert_hash=CERT_HASH, job_id=JOB)
    assert verify_proof(signed(proof()), cert=good, terms=TERMS, cosigns=[cosign(B)]).proof == proof()
    with pytest.raises(LocalProtocolError, match="the certificate is for another job than the terms"):
        verify_proof(signed(proof()), cert=dataclasses.replace(good, job_id="cd" * 32), terms=TERMS,
                     cosigns=[cosign(B)])


# --- the verifier's boundaries -----------------------------------------------------------


def rejected(wire: bytes | Any, cert: Any = CERT, terms: ProofTerms = TERMS, cosigns: Any = ()) -> ProofRejected:
    with pytest.raises(ProofRejected) as err:
        verify_proof(wire, cert=cert, terms=terms, cosigns=cosigns)
    return err.value


def test_duration_at_the_limit_plus_tolerance() -> None:
    # TERMS: 60 s limit, tolerance max(2 s, 5 % of 60 s) = 3 s.  63 s is in, 63.001 s is out.
    at = proof(end=T0 + 63_000, gpu_ms=120_000)
    vp = verify_proof(signed(at), cert=CERT, terms=TERMS, cosigns=[cosign(B, last=T0 + 63_000)])
    assert vp.proof.duration_ms == 63_000
    over = proof(end=T0 + 63_001, gpu_ms=120_000)
    err = rejected(signed(over), cosigns=[cosign(B, last=T0 + 63_001)])
    assert err.fault is ProofFault.OVER_DURATION
    assert err.detail == "over_duration: 63001 ms > limit 60000 ms"


def test_gpu_time_at_gpus_times_duration() -> None:
    at = proof(gpu_ms=60_000)  # 2 GPUs x 30 s
    assert verify_proof(signed(at), cert=CERT, terms=TERMS, cosigns=[cosign(B)]).proof.gpu_ms == 60_000
    assert rejected(signed(proof(gpu_ms=60_001)), cosigns=[cosign(B)]).fault is ProofFault.OVER_GPU_TIME
    at_gpus = proof(gpus=("g0", "g1"))
    assert verify_proof(signed(at_gpus), cert=CERT, terms=dataclasses.replace(TERMS, gpus_per_member=2),
                        cosigns=[cosign(B)]).proof.gpus == ("g0", "g1")


def test_observed_duration_at_the_tolerance() -> None:
    # Served 30 s.  A co-signer that saw 27 s is credited one heartbeat (28 s)
    # plus max(2 s, 5 % of 28 s) = 30 s: paid in full.  26.999 s seen: the
    # claim is not refused (#13) but paid only up to 29.999 s per GPU.
    vp = verify_proof(signed(proof()), cert=CERT, terms=TERMS, cosigns=[cosign(B, first=T0 + 1_000, last=T0 + 28_000)])
    assert (vp.observed_ms, vp.bound_ms, vp.capped) == (27_000, 30_000, False)
    assert vp.paid_gpu_ms == vp.proof.gpu_ms
    short = verify_proof(signed(proof()), cert=CERT, terms=TERMS,
                         cosigns=[cosign(B, first=T0 + 1_001, last=T0 + 28_000)])
    assert (short.observed_ms, short.bound_ms, short.capped) == (26_999, 29_999, True)
    assert short.paid_gpu_ms == len(short.proof.gpus) * 29_999 < short.proof.gpu_ms


def test_the_window_at_its_tolerance() -> None:
    # A window of 28 s allows 28 s + max(2 s, 1.4 s) = 30 s.
    from p2pgpu.core._proof import Window, claim_bound_ms

    ok = verify_proof(signed(proof()), cert=CERT, terms=TERMS, cosigns=[cosign(B)],
                      window=Window(confirmed_at_ms=5, results_at_ms=28_005))
    assert ok.bound_ms == 30_000
    err = rejected_window(Window(confirmed_at_ms=5, results_at_ms=28_004))
    assert err.fault is ProofFault.OVER_WINDOW and err.detail == (
        "over_window: served 30000 ms, but only 27999 ms passed between the confirmation and its results")
    assert Window(confirmed_at_ms=10, results_at_ms=5).ms == 0
    assert claim_bound_ms(TERMS, observed_ms=None, window=None) is None
    assert claim_bound_ms(TERMS, observed_ms=None, window=Window(confirmed_at_ms=0, results_at_ms=100_000)) == 105_000
    assert claim_bound_ms(TERMS, observed_ms=27_000, window=Window(confirmed_at_ms=0, results_at_ms=100_000)) == 30_000
    assert claim_bound_ms(TERMS, observed_ms=99_000, window=Window(confirmed_at_ms=0, results_at_ms=28_000)) == 30_000


def rejected_window(window: Any) -> ProofRejected:
    with pytest.raises(ProofRejected) as err:
        verify_proof(signed(proof()), cert=CERT, terms=TERMS, cosigns=[cosign(B)], window=window)
    return err.value


def test_checkpoints_at_the_start_the_end_and_at_one_time() -> None:
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    for t in (T0, T0 + 10_000, T0 + 10_000, T0 + 30_000):
        chain.add(t)
    p = proof(checkpoints=tuple(chain.checkpoints), chain_head=chain.head)
    vp = verify_proof(signed(p), cert=CERT, terms=TERMS, cosigns=[cosign(B)])
    assert len(vp.proof.checkpoints) == 4
    for bad_t in (T0 - 1, T0 + 30_001):
        chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
        chain.add(bad_t)
        err = rejected(signed(proof(checkpoints=tuple(chain.checkpoints), chain_head=chain.head)),
                       cosigns=[cosign(B)])
        assert err.fault is ProofFault.BROKEN_CHAIN
        assert err.detail == "broken_chain: checkpoints outside [started_at_ms, ended_at_ms]"


def test_co_signature_minimum() -> None:
    two = Cert(members=(A.peer_id, B.peer_id), cert_hash=CERT_HASH)
    err = rejected(signed(proof()), cert=two)
    assert err.fault is ProofFault.NOT_OBSERVED and err.detail == "not_observed: 0 usable co-signatures < 1"
    assert verify_proof(signed(proof()), cert=two, terms=TERMS, cosigns=[cosign(B)]).cosigners == (B.peer_id,)
    # The terms may ask for more, or for none.
    need_two = dataclasses.replace(TERMS, cosigns_min=2)
    assert rejected(signed(proof()), terms=need_two, cosigns=[cosign(B)]).fault is ProofFault.NOT_OBSERVED
    assert verify_proof(signed(proof()), cert=CERT, terms=need_two, cosigns=[cosign(B), cosign(C)]).cosigners == \
        tuple(sorted([B.peer_id, C.peer_id]))
    none = dataclasses.replace(TERMS, cosigns_min=0)
    vp = verify_proof(signed(proof()), cert=CERT, terms=none)
    assert vp.cosigners == () and vp.observed_ms is None


def test_co_signatures_about_something_else_are_ignored_with_a_reason() -> None:
    other_job = sign_cosign(B, Cosign(**cosign_fields(job_id="cd" * 32))).wire
    other_cert = sign_cosign(B, Cosign(**cosign_fields(cert_hash=b"\x07" * 32))).wire
    other_subject = cosign(B, C)
    outsider = cosign(D)
    off_chain = cosign(C, head=b"\x05" * 32)
    undecodable = encode([1, 2, 3])
    vp = verify_proof(signed(proof()), cert=CERT, terms=TERMS,
                      cosigns=[other_job, other_cert, other_subject, outsider, off_chain, undecodable, cosign(B),
                               cosign(B, last=T0 + 29_000)])
    assert vp.cosigners == (B.peer_id,)
    assert vp.cosigns_ignored == (
        ("?", "about another job, certificate or member"),
        ("?", "about another job, certificate or member"),
        ("?", "about another job, certificate or member"),
        ("?", "observer is not a member"),
        ("?", "saw a chain head that is not on this proof's chain"),
        ("?", "undecodable: bad_schema: not an envelope"),
        (B.peer_id, "second co-signature from one observer"),
    )


def test_verifier_takes_decoded_messages_too() -> None:
    sp = sign_proof(A, proof())
    sc = sign_cosign(B, Cosign(**cosign_fields(first_seen_ms=T0 + 500, last_seen_ms=T0 + 29_500)))
    vp = verify_proof(sp, cert=CERT, terms=TERMS, cosigns=[sc])
    assert vp.signed is sp and vp.cosigners == (B.peer_id,) and vp.observed_ms == 29_000


def test_a_decoder_refusal_keeps_its_detail() -> None:
    from test_proof import flip_signature

    err = rejected(flip_signature(signed(proof())))
    assert err.fault is ProofFault.BAD_SIGNATURE
    assert str(err) == "bad_signature: bad_signature: signature does not verify"


def test_rank_and_replica_of_every_member() -> None:
    ids4 = IDS[:4]
    cert = Cert(members=tuple(i.peer_id for i in ids4), cert_hash=CERT_HASH)
    terms = dataclasses.replace(TERMS, nodes=2, replicas=2)
    got = [verified(i, terms, cert) for i in ids4]
    assert [(v.rank, v.replica) for v in got] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(type(v.replica) is int and type(v.rank) is int for v in got)


def test_every_field_of_a_verified_proof() -> None:
    w = signed(proof())
    vp = verify_proof(w, cert=CERT, terms=TERMS, cosigns=[cosign(C, last=T0 + 20_000), cosign(B)])
    assert vp.signed.wire == w and vp.proof == proof()
    assert (vp.rank, vp.replica, vp.cosigners, vp.observed_ms, vp.cosigns_ignored, vp.bound_ms) == (
        0, 0, tuple(sorted([B.peer_id, C.peer_id])), 29_000, (), 32_000)


def test_rejection_text() -> None:
    assert str(ProofRejected(ProofFault.OVER_DURATION)) == "bad_proof: over_duration: "
    err = ProofRejected(ProofFault.NOT_A_MEMBER, "who")
    assert (err.reason, err.fault, err.detail, str(err)) == (
        Reason.NOT_A_MEMBER, ProofFault.NOT_A_MEMBER, "not_a_member: who", "not_a_member: not_a_member: who")


# --- checkpoints ---------------------------------------------------------------------------


def test_chain_add_hashes_time_and_info() -> None:
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    g = chain.head
    assert g == chain_genesis(JOB, CERT_HASH, A.peer_id)
    h1 = chain.add(T0)
    assert h1 == chain_next(g, T0, b"") == chain.head
    h2 = chain.add(T0, b"progress")
    assert h2 == chain_next(h1, T0, b"progress")
    assert chain.heads == [g, h1, h2] and chain.checkpoints == [Checkpoint(t_ms=T0), Checkpoint(t_ms=T0, info=b"progress")]
    with pytest.raises(ValueError, match="checkpoint times must not go backwards"):
        chain.add(T0 - 1)


def test_chain_holds_at_most_the_maximum() -> None:
    chain = CheckpointChain(JOB, CERT_HASH, A.peer_id)
    for i in range(checkpoints_max):
        chain.add(i)
    with pytest.raises(ValueError, match="a chain holds at most 256 checkpoints"):
        chain.add(checkpoints_max)
    assert len(chain.checkpoints) == checkpoints_max


def test_checkpoint_interval_exact_values() -> None:
    assert checkpoint_interval_ms(1_000) == 10_000
    assert checkpoint_interval_ms(1_000, 1) == 4  # ceil(1000 / 255)
    week = 7 * 24 * 3_600_000
    assert checkpoint_interval_ms(week) == 2_371_765 and type(checkpoint_interval_ms(week)) is int
    assert checkpoint_interval_ms(255 * 20_000) == 20_000


def test_hash_inputs_all_matter() -> None:
    files = [("out.txt", 6, bytes(32))]
    base = output_digest(files, bytes(32))
    assert base != output_digest([("out.txt", 7, bytes(32))], bytes(32))
    assert base != output_digest([], bytes(32))
    assert base != output_digest(files, b"\x01" * 32)
    assert output_digest([("b", 1, bytes(32)), ("a", 2, bytes(32))], bytes(32)) == \
        output_digest([("a", 2, bytes(32)), ("b", 1, bytes(32))], bytes(32))
    g = chain_genesis(JOB, CERT_HASH, A.peer_id)
    assert len({g, chain_genesis("cd" * 32, CERT_HASH, A.peer_id), chain_genesis(JOB, b"\x01" * 32, A.peer_id),
                chain_genesis(JOB, CERT_HASH, B.peer_id)}) == 4
    assert len({chain_next(g, 1, b""), chain_next(g, 2, b""), chain_next(g, 1, b"x"),
                chain_next(b"\x00" * 32, 1, b"")}) == 4


# --- quorum and what is owed ---------------------------------------------------------------


def test_the_most_voted_digest_wins_whatever_its_value() -> None:
    high, low = max(DIGEST, OTHER_DIGEST), min(DIGEST, OTHER_DIGEST)
    vps = [verified(A, REPL, CERT, digest=high), verified(B, REPL, CERT, digest=high),
           verified(C, REPL, CERT, digest=low)]
    assert quorum_digests(vps, REPL) == {0: high}
    vps = [verified(A, REPL, CERT, digest=low), verified(B, REPL, CERT, digest=low),
           verified(C, REPL, CERT, digest=high)]
    assert quorum_digests(vps, REPL) == {0: low}


def test_a_rank_without_outputs_has_no_winner() -> None:
    assert quorum_digests([], REPL) == {0: None}
    two_ranks = dataclasses.replace(REPL, nodes=2, replicas=1, quorum=1)
    vps = [verified(A, two_ranks, CERT)]  # rank 0 only
    assert quorum_digests(vps, two_ranks) == {0: DIGEST, 1: None}


def test_two_replicas_need_both_to_agree() -> None:
    # The quorum applies from two replicas up: two disagreeing outputs pay nobody.
    pair = Cert(members=(A.peer_id, B.peer_id), cert_hash=CERT_HASH)
    terms = dataclasses.replace(TERMS, replicas=2, quorum=2)
    agree = [verified(A, terms, pair), verified(B, terms, pair)]
    assert [r.status for r in owed(agree, terms=terms)] == ["paid", "paid"]
    disagree = [verified(A, terms, pair), verified(B, terms, pair, digest=OTHER_DIGEST)]
    rows = owed(disagree, terms=terms)
    # Nobody can tell who is right: each is paid its time served (#13), as in agreement.
    assert [(r.status, r.amount) for r in rows] == [("no_quorum", a.amount) for a in owed(agree, terms=terms)]
    assert all(r.amount > 0 for r in rows)


def test_every_field_of_an_owed_row() -> None:
    single = Cert(members=(A.peer_id,), cert_hash=CERT_HASH)
    terms = dataclasses.replace(TERMS, price_per_gpu_hour_max=7_200_000)
    vp = verified(A, terms, single, gpus=("g0",), end=T0 + 1_500)
    assert owed([vp], terms=terms) == [Owed(peer_id=A.peer_id, proof_hash=vp.signed.proof_hash, gpu_ms=1_500,
                                            price_per_gpu_hour=7_200_000, amount=3_000, status="paid")]


def test_a_zero_or_negative_agreed_price_pays_nothing() -> None:
    single = Cert(members=(A.peer_id,), cert_hash=CERT_HASH)
    hour = 3_600_000
    terms = dataclasses.replace(TERMS, duration_ms_max=2 * hour)
    vp = verify_proof(signed(bare_proof(end=T0 + 2 * hour)), cert=single, terms=terms)
    assert owed([vp], terms=terms)[0].amount == 2 * hour * terms.price_per_gpu_hour_max // hour
    for price in (0, -1):
        [row] = owed([vp], terms=terms, prices={A.peer_id: price})
        assert (row.amount, row.status) == (0, "paid")


def test_owed_total_sums_rows_of_one_peer() -> None:
    rows = [Owed(peer_id=p, proof_hash=bytes([i]) * 32, gpu_ms=1, price_per_gpu_hour=1, amount=a, status="paid")
            for i, (p, a) in enumerate([("b", 5), ("a", 1), ("b", 7)])]
    assert owed_total(rows) == {"a": 1, "b": 12}
    assert list(owed_total(rows)) == ["a", "b"]
