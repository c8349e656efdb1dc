"""Hardware challenges at their edges (#19): the size and deadline arithmetic
at exact values (a size at the exact throughput, the cap, every ceiling
division), the messages' bounds on both sides with the refusal naming its
field, the prover's gate at its exact instants and token counts, the judge
at the deadline, and verdicts at their time-to-live.  The hashes (matrix
keys, commitment) and the signed messages are pinned in
``tests/data/vectors.json`` (``test_vectors.py``)."""

from __future__ import annotations

import random
from dataclasses import replace
from fractions import Fraction
from typing import Any

import msgpack
import pytest
from test_challenge import ALICE, BOB, H100, T0, advert

from p2pgpu.core import Identity, Kind, LocalProtocolError, PeerMisbehaved, Reason, decode, encode, seal
from p2pgpu.core._challenge import (
    MODELS,
    Admitted,
    Challenge,
    ChallengeAnswer,
    ClaimBook,
    ClaimPolicy,
    ClaimRecord,
    Declined,
    ModelSpec,
    Outcome,
    ProverGate,
    Verdict,
    answer,
    compute_ms_for,
    deadline_ms_for,
    decode_answer,
    decode_challenge,
    freivalds_error_bound,
    host_ms_for,
    judge,
    make_challenge,
    matrix_keys,
    model_key,
    model_spec,
    read_answer,
    size_for,
    throughput_floor_gflops,
    transfer_ms_for,
    verdict_of,
)
from p2pgpu.core._schema import int_max

CPU: ModelSpec = MODELS[-1]
assert CPU.key == "cpu"


def spec(gflops: int) -> ModelSpec:
    return ModelSpec(key="x", pattern="x", gflops=gflops)


# --- arithmetic -------------------------------------------------------------------------


def test_size_at_the_exact_throughput_and_at_the_cap() -> None:
    # 2 * 8000^3 flops is exactly 250 ms at 4096 GFLOPS: 8000 fits, 8064 does not.
    assert size_for(spec(4096)) == 8000 and size_for(spec(4095)) == 7936
    assert size_for(spec(10**9)) == 8192  # the cap, not beyond
    assert size_for(spec(1)) == 448
    assert size_for(CPU) == 832 and [size_for(m) for m in MODELS[:-1]] == [8192] * (len(MODELS) - 1)


def test_allowances_round_up_exactly() -> None:
    assert compute_ms_for(8000, spec(4096)) == 1000  # 2 n^3 * 4 / (4096e6): exact
    assert compute_ms_for(64, spec(5)) == 1  # 0.42 ms rounds up
    assert compute_ms_for(832, CPU) == 922
    assert host_ms_for(64) == 1 and host_ms_for(8192) == 1007 and host_ms_for(0) == 0
    assert deadline_ms_for(832, CPU) == 1_500 + 11 + 922 == 2_433
    assert transfer_ms_for(64) == 10_005 and transfer_ms_for(8192) == 77_109
    assert throughput_floor_gflops(8192, 2516) == 437 and throughput_floor_gflops(832, 2433) == 0


def test_freivalds_bound() -> None:
    assert freivalds_error_bound(1) == Fraction(1, 251)
    assert freivalds_error_bound(4) == Fraction(1, 251**4)
    assert freivalds_error_bound(2, p=2) == Fraction(1, 4)
    with pytest.raises(LocalProtocolError, match="at least one Freivalds round"):
        freivalds_error_bound(0)


def test_model_table_lookups() -> None:
    assert model_spec("a100") is MODELS[3] and model_spec("nope") is None
    assert model_spec("x", (spec(1),)) == spec(1)
    assert model_key("NVIDIA H100 PCIe") == "h100-pcie" and model_key("NVIDIA H100 80GB HBM3") == "h100"
    assert model_key("cpu") == "cpu" and model_key("a cpu") is None and model_key("Quadro") is None
    assert model_key("thing x", (spec(1),)) == "x"
    for bad in ({"gflops": 0}, {"key": ""}, {"key": "k" * 65}):
        with pytest.raises(ValueError, match="a model needs a key and a positive throughput"):
            ModelSpec(**{"key": "k", "pattern": "p", "gflops": 1, **bad})  # type: ignore[arg-type]
    assert ModelSpec(key="k" * 64, pattern="p", gflops=1).key == "k" * 64


def test_matrix_keys_need_a_32_byte_seed() -> None:
    a, b = matrix_keys(bytes(32))
    assert a != b and len(a) == len(b) == 32
    assert matrix_keys(bytes(32)) != matrix_keys(b"\x01" + bytes(31))
    for bad in (bytes(31), bytes(33)):
        with pytest.raises(LocalProtocolError, match="a challenge seed is 32 bytes"):
            matrix_keys(bad)


# --- messages -----------------------------------------------------------------------------


def challenge(**over: Any) -> Challenge:
    fields: dict[str, Any] = {"challenger": ALICE.peer_id, "prover": BOB.peer_id, "model": "cpu", "n": 832,
                              "seed": bytes(32), "deadline_ms": 2_433, "issued_at_ms": T0}
    fields.update(over)
    return Challenge(**fields)


def test_challenge_field_bounds() -> None:
    for over in ({"n": 64}, {"n": 8192}, {"deadline_ms": 1}, {"deadline_ms": int_max}, {"model": "m"},
                 {"model": "m" * 64}):
        assert challenge(**over) is not None
    bad: list[tuple[dict[str, Any], str]] = [
        ({"n": 0}, r"n must be a multiple of 64 in \[64, 8192\]"), ({"n": 8256}, "n must be a multiple of 64"),
        ({"n": 65}, "n must be a multiple of 64"), ({"seed": bytes(31)}, "seed is 32 bytes and the deadline positive"),
        ({"deadline_ms": 0}, "seed is 32 bytes and the deadline positive"),
        ({"deadline_ms": int_max + 1}, "the deadline positive"),
        ({"model": ""}, "a model name, and a challenger that is not the prover"),
        ({"model": "m" * 65}, "a model name"), ({"prover": ALICE.peer_id}, "a challenger that is not the prover"),
    ]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            challenge(**over)


def test_answer_field_bounds() -> None:
    ok = ChallengeAnswer(challenge=bytes(32), prover="p", status="ok", commitment=bytes(32), detail="d" * 128)
    assert replace(ok, prover="p" * 64).prover == "p" * 64
    for status in ("busy", "refused"):
        assert replace(ok, status=status, commitment=b"").status == status
    bad: list[tuple[dict[str, Any], str]] = [
        ({"challenge": bytes(31)}, "challenge digest is 32 bytes, status one of"),
        ({"status": "maybe"}, "status one of"),
        ({"commitment": b""}, "an ok answer carries a 32-byte commitment, others none"),
        ({"commitment": bytes(31)}, "an ok answer carries a 32-byte commitment"),
        ({"status": "busy"}, "an ok answer carries a 32-byte commitment, others none"),
        ({"detail": "d" * 129}, "detail or prover too long"), ({"prover": ""}, "detail or prover too long"),
        ({"prover": "p" * 65}, "detail or prover too long"),
    ]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            replace(ok, **over)


def test_make_challenge_and_answer() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(1), now_ms=T0)
    assert sc.challenge == challenge(seed=random.Random(1).randbytes(32))
    assert sc.digest == sc.envelope.digest and decode_challenge(sc.wire) == sc
    small = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(1), now_ms=T0, n=128)
    assert (small.challenge.n, small.challenge.deadline_ms) == (128, deadline_ms_for(128, CPU))
    other = make_challenge(ALICE, prover=BOB.peer_id, model="x", rng=random.Random(1), now_ms=T0, models=(spec(4096),))
    assert (other.challenge.n, other.challenge.deadline_ms) == (8000, deadline_ms_for(8000, spec(4096)))
    with pytest.raises(LocalProtocolError, match="no table entry for model 'h900'"):
        make_challenge(ALICE, prover=BOB.peer_id, model="h900", rng=random.Random(1), now_ms=T0)
    sa = answer(BOB, sc, "refused", detail="x" * 200)
    assert sa.answer == ChallengeAnswer(challenge=sc.digest, prover=BOB.peer_id, status="refused", commitment=b"",
                                        detail="x" * 128)
    assert decode_answer(sa.wire).wire == sa.wire


def refused(decoder: Any, wire: bytes) -> PeerMisbehaved:
    with pytest.raises(PeerMisbehaved) as err:
        decoder(wire)
    return err.value


CHALLENGE_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"challenger": ""}, "challenger: length must be in [1, 64]"),
    ({"prover": "p" * 65}, "prover: length must be in [1, 64]"),
    ({"model": ""}, "model: length must be in [1, 64]"), ({"model": "m" * 65}, "model: length must be in [1, 64]"),
    ({"n": "64"}, "n: must be an integer"), ({"n": 100}, "n must be a multiple of 64"),
    ({"seed": bytes(31)}, "seed: length must be in [32, 32]"), ({"seed": bytes(33)}, "seed: length must be in"),
    ({"deadline_ms": -1}, "deadline_ms: must be in [0, "), ({"deadline_ms": 0}, "seed is 32 bytes and the deadline"),
    ({"issued_at_ms": -1}, "issued_at_ms: must be in [0, "), ({"extra": 1}, "extra: unknown field"),
]


@pytest.mark.parametrize("over,why", CHALLENGE_REFUSED, ids=[w for _, w in CHALLENGE_REFUSED])
def test_challenge_decoder_names_the_field(over: dict[str, Any], why: str) -> None:
    wire = seal(ALICE, Kind.CHALLENGE, {**challenge().to_obj(), **over}).to_bytes()
    err = refused(decode_challenge, wire)
    assert err.reason is Reason.BAD_SCHEMA and err.detail.startswith(why), err.detail


ANSWER_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"challenge": bytes(31)}, "challenge: length must be in [32, 32]"),
    ({"prover": ""}, "prover: length must be in [1, 64]"),
    ({"status": "s" * 17}, "status: length must be in [0, 16]"),
    ({"status": "maybe"}, "challenge digest is 32 bytes, status one of"),
    ({"commitment": bytes(33)}, "commitment: length must be in [0, 32]"),
    ({"detail": "d" * 129}, "detail: length must be in [0, 128]"),
]


@pytest.mark.parametrize("over,why", ANSWER_REFUSED, ids=[w for _, w in ANSWER_REFUSED])
def test_answer_decoder_names_the_field(over: dict[str, Any], why: str) -> None:
    base = ChallengeAnswer(challenge=bytes(32), prover=BOB.peer_id, status="ok", commitment=bytes(32))
    err = refused(decode_answer, seal(BOB, Kind.CHALLENGE_ANSWER, {**base.to_obj(), **over}).to_bytes())
    assert err.reason is Reason.BAD_SCHEMA and err.detail.startswith(why), err.detail


def test_signers_kinds_canonical_and_size() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(1), now_ms=T0)
    err = refused(decode_challenge, seal(BOB, Kind.CHALLENGE, sc.challenge.to_obj()).to_bytes())
    assert (err.reason, err.detail) == (Reason.SIGNER_MISMATCH, "challenge not signed by its challenger")
    sa = answer(BOB, sc, "busy")
    err = refused(decode_answer, seal(ALICE, Kind.CHALLENGE_ANSWER, sa.answer.to_obj()).to_bytes())
    assert (err.reason, err.detail) == (Reason.SIGNER_MISMATCH, "answer not signed by its prover")
    assert refused(decode_challenge, sa.wire).reason is Reason.WRONG_KIND
    assert refused(decode_answer, sc.wire).reason is Reason.WRONG_KIND
    for decoder, wire, kind in ((decode_challenge, sc.wire, Kind.CHALLENGE),
                                (decode_answer, sa.wire, Kind.CHALLENGE_ANSWER)):
        shuffled = msgpack.packb(dict(reversed(list(decode(wire).items()))), use_bin_type=True)
        assert refused(decoder, shuffled).reason is Reason.NON_CANONICAL
        obj = decode(wire)
        obj["s"] = bytes(kind.bytes_max)
        assert refused(decoder, encode(obj)).reason is Reason.OVERSIZED


def test_read_answer_binds_the_challenge_and_the_prover() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(1), now_ms=T0)
    other = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(2), now_ms=T0)
    good = answer(BOB, sc, "ok", commitment=bytes(32))
    assert read_answer(sc, good.wire) == good
    assert read_answer(other, good.wire) is Outcome.BAD_ANSWER
    carol = Identity.from_rng(random.Random(77))
    assert read_answer(sc, answer(carol, sc, "busy").wire) is Outcome.BAD_ANSWER
    assert read_answer(sc, b"\x00") is Outcome.BAD_ANSWER


# --- the prover's gate --------------------------------------------------------------------


def wire_at(issued_at_ms: int, seed: int = 3, **kw: Any) -> bytes:
    return make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(seed), now_ms=issued_at_ms,
                          **kw).wire


def test_gate_time_window_instants() -> None:
    gate = ProverGate(peer_id=BOB.peer_id)
    deadline = deadline_ms_for(832, CPU)
    assert isinstance(gate.admit(wire_at(T0 + 60_000), from_peer=ALICE.peer_id, now_ms=T0), Admitted)
    gate.done()
    with pytest.raises(PeerMisbehaved) as err:
        gate.admit(wire_at(T0 + 60_001), from_peer=ALICE.peer_id, now_ms=T0)
    assert (err.value.reason, err.value.detail) == (Reason.NOT_YET_VALID, "challenge issued in the future")
    stale_at = T0 + 60_000 + deadline
    got = gate.admit(wire_at(T0, seed=4), from_peer=ALICE.peer_id, now_ms=stale_at)
    assert isinstance(got, Admitted) and got.abandon_at_ms == stale_at + deadline
    gate.done()
    with pytest.raises(PeerMisbehaved) as err:
        gate.admit(wire_at(T0, seed=5), from_peer=ALICE.peer_id, now_ms=stale_at + 1)
    assert (err.value.reason, err.value.detail) == (Reason.EXPIRED, "challenge is stale")


def test_gate_refusal_details_and_limits() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, n_max=832)
    with pytest.raises(PeerMisbehaved) as err:
        gate.admit(wire_at(T0), from_peer=BOB.peer_id, now_ms=T0)
    assert err.value.detail == "challenge signed by another peer than the sender"
    carol = Identity.from_rng(random.Random(9))
    for_carol = make_challenge(ALICE, prover=carol.peer_id, model="cpu", rng=random.Random(1), now_ms=T0).wire
    with pytest.raises(PeerMisbehaved) as err:
        gate.admit(for_carol, from_peer=ALICE.peer_id, now_ms=T0)
    assert (err.value.reason, err.value.detail) == (Reason.BAD_SCHEMA, "challenge addressed to another prover")
    assert isinstance(gate.admit(wire_at(T0), from_peer=ALICE.peer_id, now_ms=T0), Admitted)  # n == n_max
    gate.done()
    big = gate.admit(wire_at(T0, n=896), from_peer=ALICE.peer_id, now_ms=T0)
    assert isinstance(big, Declined) and (big.status, big.detail) == (
        "refused", "n 896 > 832 or deadline over 60000 ms")
    for deadline, admitted in ((60_000, True), (60_001, False)):
        ch = challenge(deadline_ms=deadline, n=64)
        got = ProverGate(peer_id=BOB.peer_id).admit(seal(ALICE, Kind.CHALLENGE, ch.to_obj()).to_bytes(),
                                                    from_peer=ALICE.peer_id, now_ms=T0)
        assert isinstance(got, Admitted) is admitted
        if not admitted:
            assert isinstance(got, Declined) and got.detail == "n 64 > 8192 or deadline over 60000 ms"


def test_a_challenger_bucket_refills_one_token_per_interval() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, per_challenger_burst=2, per_challenger_refill_ms=1_000, total_burst=100)
    seeds = iter(range(100, 200))

    def take(now: int) -> bool:
        got = gate.admit(wire_at(T0, next(seeds)), from_peer=ALICE.peer_id, now_ms=now)
        gate.done()
        if isinstance(got, Declined):
            assert (got.status, got.detail) == ("busy", "too many challenges from you: try later")
        return isinstance(got, Admitted)

    assert [take(T0), take(T0), take(T0)] == [True, True, False]
    assert take(T0 + 999) is False
    assert take(T0 + 1_000) is True and take(T0 + 1_000) is False
    # A full bucket does not bank time: after a long wait, still a burst of two.
    assert [take(T0 + 10_000), take(T0 + 10_000), take(T0 + 10_000)] == [True, True, False]


def test_the_total_bucket_holds_for_all_challengers() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, total_burst=2, total_refill_ms=1_000)
    ids = [Identity.from_rng(random.Random(300 + i)) for i in range(4)]
    got = []
    for i, ident in enumerate(ids[:3]):
        w = make_challenge(ident, prover=BOB.peer_id, model="cpu", rng=random.Random(i), now_ms=T0).wire
        got.append(gate.admit(w, from_peer=ident.peer_id, now_ms=T0))
        gate.done()
    assert [isinstance(g, Admitted) for g in got] == [True, True, False]
    assert isinstance(got[2], Declined) and got[2].detail == "too many challenges: try later"
    # The refused challenger's own bucket was not charged for it.
    w = make_challenge(ids[2], prover=BOB.peer_id, model="cpu", rng=random.Random(9), now_ms=T0).wire
    assert isinstance(gate.admit(w, from_peer=ids[2].peer_id, now_ms=T0 + 1_000), Admitted)


def test_the_gate_forgets_the_least_recent_challenger() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, challengers_max=2, total_burst=100)
    ids = [Identity.from_rng(random.Random(400 + i)) for i in range(3)]
    for i, ident in enumerate([ids[0], ids[1], ids[0], ids[2]]):
        w = make_challenge(ident, prover=BOB.peer_id, model="cpu", rng=random.Random(i), now_ms=T0).wire
        gate.admit(w, from_peer=ident.peer_id, now_ms=T0)
        gate.done()
    assert list(gate._buckets) == [ids[0].peer_id, ids[2].peer_id]


# --- verdicts ------------------------------------------------------------------------------


def test_judge_before_and_at_the_deadline() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(3), now_ms=T0)
    ok = answer(BOB, sc, "ok", commitment=bytes(32))
    dl = sc.challenge.deadline_ms
    assert judge(sc, ok, elapsed_ms=None, product_ok=True) is Outcome.NO_ANSWER
    assert judge(sc, ok, elapsed_ms=0, product_ok=True) is Outcome.PASSED
    assert judge(sc, Outcome.WRONG, elapsed_ms=0, product_ok=True) is Outcome.WRONG
    assert judge(sc, answer(BOB, sc, "busy"), elapsed_ms=dl + 1, product_ok=None) is Outcome.BUSY


def test_verdicts_at_their_time_to_live() -> None:
    policy = ClaimPolicy(believed_ttl_ms=100, refused_ttl_ms=200, inconclusive_max=2)
    passed = ClaimRecord(outcome=Outcome.PASSED, at_ms=T0)
    assert verdict_of(passed, T0 + 99, policy) is Verdict.BELIEVED
    assert verdict_of(passed, T0 + 100, policy) is Verdict.UNTESTED
    late = ClaimRecord(outcome=Outcome.LATE, at_ms=T0)
    assert verdict_of(late, T0 + 199, policy) is Verdict.REFUSED
    assert verdict_of(late, T0 + 200, policy) is Verdict.UNTESTED
    for outcome in (Outcome.WRONG, Outcome.REFUSED, Outcome.BAD_ANSWER):
        assert verdict_of(ClaimRecord(outcome=outcome, at_ms=T0), T0, policy) is Verdict.REFUSED
    busy = ClaimRecord(outcome=Outcome.BUSY, at_ms=T0, inconclusive=1)
    assert verdict_of(busy, T0, policy) is Verdict.UNTESTED
    assert verdict_of(replace(busy, inconclusive=2), T0, policy) is Verdict.REFUSED
    assert verdict_of(None, T0, policy) is Verdict.UNTESTED
    assert ClaimPolicy() == ClaimPolicy(believed_ttl_ms=86_400_000, refused_ttl_ms=86_400_000, retry_ms=60_000,
                                        inconclusive_max=3, untested_believed=True)


def test_inconclusive_count_restarts_after_a_failure() -> None:
    book = ClaimBook(allow_simulated=False, policy=ClaimPolicy(inconclusive_max=5))
    book.record("p", "h100", Outcome.BUSY, T0)
    book.record("p", "h100", Outcome.NO_ANSWER, T0 + 1)
    assert book.records[("p", "h100")].inconclusive == 2
    book.record("p", "h100", Outcome.LATE, T0 + 2)
    assert book.records[("p", "h100")].inconclusive == 0
    book.record("p", "h100", Outcome.BUSY, T0 + 3)
    assert book.records[("p", "h100")] == ClaimRecord(outcome=Outcome.BUSY, at_ms=T0 + 3, inconclusive=1)


def test_due_skips_me_and_stops_at_the_limit() -> None:
    book = ClaimBook(allow_simulated=False)
    ads = [advert(Identity.from_rng(random.Random(500 + i)), (H100,)) for i in range(5)]
    me = ads[0].peer_id
    due = book.due(ads, T0, me=me, limit=3)
    assert len(due) == 3 and me not in [p for p, _ in due]
    assert due == sorted(due)
    assert len(book.due(ads, T0, me=me)) == 4
    book.record(ads[1].peer_id, "h100", Outcome.BUSY, T0)
    retry = ClaimPolicy().retry_ms
    assert (ads[1].peer_id, "h100") not in book.due(ads, T0 + retry - 1, me=me)
    assert (ads[1].peer_id, "h100") in book.due(ads, T0 + retry, me=me)


def test_view_keeps_believed_and_hides_refused_models_only() -> None:
    from test_challenge import A100

    book = ClaimBook(allow_simulated=False)
    adv = replace(advert(BOB, (H100, A100)), gpus_free=1)
    book.record(BOB.peer_id, "a100", Outcome.PASSED, T0)
    assert book.view(adv, T0) is adv  # nothing refused: the advert itself
    book.record(BOB.peer_id, "h100", Outcome.WRONG, T0)
    v = book.view(adv, T0)
    assert (v.gpus, v.gpus_free) == ((A100,), 1)


def test_allowances_are_exact_to_the_flop() -> None:
    # Values where the quotient sits just past a whole number: an allowance
    # off by one part per million in its rate would round the other way.
    assert compute_ms_for(2368, spec(1)) == 106_228
    assert throughput_floor_gflops(8000, 1024) == 1000


def test_an_answer_without_detail_has_none() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(1), now_ms=T0)
    assert answer(BOB, sc, "busy").answer.detail == ""
    assert answer(BOB, sc, "ok", bytes(32)).answer == ChallengeAnswer(challenge=sc.digest, prover=BOB.peer_id,
                                                                      status="ok", commitment=bytes(32))


def test_a_claim_book_uses_its_own_model_table() -> None:
    table = (ModelSpec(key="foo", pattern=r"\bfoo\b", gflops=10),)
    book = ClaimBook(allow_simulated=False, models=table)
    from p2pgpu.core import GpuInfo

    foo = GpuInfo(model="Foo 9000", memory_mb=1024, compute_capability="8.0")
    adv = advert(BOB, (foo, H100))
    assert book.claims(adv) == ["foo"]  # H100 is not in this table
    book.record(BOB.peer_id, "foo", Outcome.WRONG, T0)
    assert book.view(adv, T0).gpus == (H100,)


def test_due_is_capped_at_sixteen_by_default() -> None:
    from p2pgpu.core import GpuInfo

    gpus = tuple(GpuInfo(model=name, memory_mb=1024, compute_capability="8.0")
                 for name in ("H200", "H100 PCIe", "H100", "A100", "L40S", "L40", "L4", "A10", "RTX 4090",
                              "RTX 3090", "V100", "T4"))
    ads = [advert(Identity.from_rng(random.Random(600 + i)), gpus) for i in range(2)]
    assert len(ClaimBook(allow_simulated=False).due(ads, T0, me="me")) == 16


def test_a_believed_claim_is_not_due_and_a_waiting_one_does_not_hide_the_next() -> None:
    book = ClaimBook(allow_simulated=False)
    a, b = sorted((advert(Identity.from_rng(random.Random(700 + i)), (H100,)) for i in range(2)),
                  key=lambda ad: ad.peer_id)
    retry = ClaimPolicy().retry_ms
    book.record(a.peer_id, "h100", Outcome.PASSED, T0)
    assert book.due([a], T0 + retry, me="me") == []
    book.record(a.peer_id, "h100", Outcome.BUSY, T0)
    assert book.due([a, b], T0 + 1, me="me") == [(b.peer_id, "h100")]


def test_a_one_ms_refill_and_a_clock_going_back() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, per_challenger_burst=1, per_challenger_refill_ms=1, total_burst=100)
    seeds = iter(range(800, 900))

    def take(now: int) -> bool:
        got = gate.admit(wire_at(T0, next(seeds)), from_peer=ALICE.peer_id, now_ms=now)
        gate.done()
        return isinstance(got, Admitted)

    assert [take(T0), take(T0), take(T0 - 5), take(T0 + 1)] == [True, False, False, True]


def test_refill_time_is_kept_exactly() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, per_challenger_burst=2, per_challenger_refill_ms=1_000, total_burst=100)
    seeds = iter(range(900, 1000))

    def take(now: int) -> bool:
        got = gate.admit(wire_at(T0, next(seeds)), from_peer=ALICE.peer_id, now_ms=now)
        gate.done()
        return isinstance(got, Admitted)

    assert [take(T0), take(T0), take(T0)] == [True, True, False]
    assert take(T0 + 1_000) is True and take(T0 + 1_999) is False and take(T0 + 2_000) is True
    # A full bucket's time restarts when it is next used: 10.5 s later two
    # tokens, and the next one 1 s after that use, not at the 11 s mark.
    assert [take(T0 + 12_500), take(T0 + 12_500)] == [True, True]
    assert take(T0 + 13_000) is False and take(T0 + 13_500) is True


def test_every_declined_challenge_is_returned_with_its_status() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, n_max=64, per_challenger_burst=1, total_burst=1)
    wire = wire_at(T0)
    sc = decode_challenge(wire)
    big = gate.admit(wire, from_peer=ALICE.peer_id, now_ms=T0)
    assert isinstance(big, Declined) and (big.challenge, big.status) == (sc, "refused")
    small = wire_at(T0, n=64)
    assert isinstance(gate.admit(small, from_peer=ALICE.peer_id, now_ms=T0), Admitted)
    gate.done()
    again = wire_at(T0, seed=9, n=64)
    got = gate.admit(again, from_peer=ALICE.peer_id, now_ms=T0)
    assert isinstance(got, Declined) and (got.challenge, got.status) == (decode_challenge(again), "busy")
    carol = Identity.from_rng(random.Random(77))
    other = make_challenge(carol, prover=BOB.peer_id, model="cpu", rng=random.Random(3), now_ms=T0, n=64).wire
    got = gate.admit(other, from_peer=carol.peer_id, now_ms=T0)
    assert isinstance(got, Declined) and (got.challenge, got.status, got.detail) == (
        decode_challenge(other), "busy", "too many challenges: try later")


def test_a_waiting_model_does_not_hide_the_same_adverts_next_model() -> None:
    from test_challenge import A100

    book = ClaimBook(allow_simulated=False)
    adv = advert(BOB, (H100, A100))
    assert book.claims(adv) == ["a100", "h100"]
    book.record(BOB.peer_id, "a100", Outcome.BUSY, T0)  # inconclusive: retried only after retry_ms
    assert book.due([adv], T0 + 1, me="me") == [(BOB.peer_id, "h100")]
