"""Hardware challenges: the pure protocol (``p2pgpu/core/_challenge.py``) and
its arithmetic (``p2pgpu/gpu/_matmul.py``).

Sizes and deadlines follow the table; the NumPy backend's product equals a
Python-integer oracle; a wrong product is caught with the stated probability
(a fixed-seed statistical test: deterministic, so it cannot flake); the
prover's gate holds its limits; the claim book turns results into verdicts
and hides refused GPUs from matching.
"""

from __future__ import annotations

import random
from dataclasses import replace
from fractions import Fraction

import pytest

from p2pgpu.core import Advert, GpuInfo, Identity, Kind, PeerMisbehaved, Reason, Requirements, matching, seal
from p2pgpu.core._challenge import (
    MODELS,
    Admitted,
    ClaimBook,
    ClaimPolicy,
    Declined,
    Outcome,
    ProverGate,
    Verdict,
    answer,
    commitment_of,
    compute_ms_for,
    deadline_ms_for,
    decode_answer,
    decode_challenge,
    freivalds_error_bound,
    judge,
    make_challenge,
    model_key,
    model_spec,
    modulus,
    n_max,
    read_answer,
    size_for,
    throughput_floor_gflops,
)
from p2pgpu.gpu._matmul import (
    Abandoned,
    Instance,
    NumpyBackend,
    keystream,
    reference_product_mod_p,
    verify_product,
)

T0 = 1_700_000_000_000
ALICE = Identity.from_rng(random.Random(1))  # challenger
BOB = Identity.from_rng(random.Random(2))    # prover
H100 = GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_capability="9.0")
A100 = GpuInfo(model="NVIDIA A100-SXM4-40GB", memory_mb=40960, compute_capability="8.0")


def advert(peer: Identity, gpus: tuple[GpuInfo, ...], *, simulated: bool = False) -> Advert:
    return Advert(peer_id=peer.peer_id, network="strict", addrs=(), seq=1, issued_at_ms=T0,
                  expires_at_ms=T0 + 600_000, gpus=gpus, gpus_free=len(gpus), price_per_gpu_hour=1,
                  currency="SOL", payout_address="", region="eu", runtimes=("process",), simulated=simulated)


# --- the table, sizes and deadlines --------------------------------------------------

@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A10", "a10"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("Tesla T4", "t4"), ("Tesla V100-SXM2-16GB", "v100"),
    ("cpu", "cpu"), ("NVIDIA GeForce GTX 1080", None), ("my cpu", None),
])
def test_model_names_map_to_table_entries(name: str, key: str | None) -> None:
    assert model_key(name) == key


def test_sizes_and_deadlines_follow_the_published_throughput() -> None:
    for spec in MODELS:
        n = size_for(spec)
        assert n % 64 == 0 and 64 <= n <= n_max
        # At the published rate the product fits the target, the next size would not.
        assert 2 * n**3 <= 250 * spec.gflops * 1_000_000 or n == 64
        assert n == n_max or 2 * (n + 64) ** 3 > 250 * spec.gflops * 1_000_000
        assert compute_ms_for(n, spec) >= 4 * 2 * n**3 // (spec.gflops * 1_000_000)
    h100, cpu = model_spec("h100"), model_spec("cpu")
    assert h100 is not None and cpu is not None
    assert size_for(h100) == 8192 and size_for(cpu) == 832
    # What passing an H100 challenge proves: over 400 GFLOPS sustained;
    # this 2-core machine does 5-15.
    assert throughput_floor_gflops(8192, deadline_ms_for(8192, h100)) >= 400
    assert freivalds_error_bound(4) == Fraction(1, 251**4)


# --- messages --------------------------------------------------------------------

def test_challenge_and_answer_round_trip_and_bind_each_other() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(3), now_ms=T0)
    assert decode_challenge(sc.wire) == sc
    sa = answer(BOB, sc, "ok", commitment=b"c" * 32)
    assert decode_answer(sa.wire) == sa
    assert read_answer(sc, sa.wire) == sa
    other = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(4), now_ms=T0)
    assert read_answer(other, sa.wire) is Outcome.BAD_ANSWER      # an answer to another challenge
    by_alice = answer(ALICE, sc, "ok", commitment=b"c" * 32)
    assert read_answer(sc, by_alice.wire) is Outcome.BAD_ANSWER  # not the prover's
    assert read_answer(sc, b"\x00garbage") is Outcome.BAD_ANSWER


@pytest.mark.parametrize("field,value", [("n", 63), ("n", 8256), ("n", 100), ("seed", b"x" * 31),
                                         ("deadline_ms", 0), ("model", ""), ("prover", "")])
def test_hostile_challenge_fields_are_refused(field: str, value: object) -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(3), now_ms=T0)
    body = {**sc.challenge.to_obj(), field: value}
    with pytest.raises(PeerMisbehaved) as exc:
        decode_challenge(seal(ALICE, Kind.CHALLENGE, body).to_bytes())
    assert exc.value.reason is Reason.BAD_SCHEMA


def test_a_challenge_signed_by_someone_else_is_refused() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(3), now_ms=T0)
    forged = seal(BOB, Kind.CHALLENGE, sc.challenge.to_obj())  # challenger says Alice, signed by Bob
    with pytest.raises(PeerMisbehaved) as exc:
        decode_challenge(forged.to_bytes())
    assert exc.value.reason is Reason.SIGNER_MISMATCH


# --- the arithmetic --------------------------------------------------------------------

def test_chacha_keystream_is_rfc_8439() -> None:
    # RFC 8439 A.1, test vector 1: all-zero key and nonce, counter 0.
    assert keystream(bytes(32), 32).hex() == "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"


@pytest.mark.parametrize("n", [64, 128])
def test_numpy_product_equals_the_integer_oracle(n: int) -> None:
    seed = bytes(range(32))
    got = NumpyBackend().product_mod_p(seed, n, should_stop=lambda: False)
    assert got == reference_product_mod_p(seed, n)
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(5), now_ms=T0, n=n)
    assert verify_product(sc.digest, sc.challenge.seed, n, NumpyBackend().product_mod_p(
        sc.challenge.seed, n, should_stop=lambda: False), commitment_of(sc.digest, NumpyBackend().product_mod_p(
            sc.challenge.seed, n, should_stop=lambda: False)), rounds=4, rng=random.Random(1))


def test_product_entries_stay_exact_at_the_largest_size() -> None:
    # The bound the docs rely on: |entry| <= 16, so |c| <= n * 256 < 2^24 for n <= 8192.
    assert n_max * 16 * 16 < 2**24
    assert n_max * 16 * (modulus - 1) < 2**53 and n_max * (modulus - 1) ** 2 < 2**53


def test_prover_abandons_when_told_to() -> None:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Abandoned):
        NumpyBackend().product_mod_p(bytes(32), 512, should_stop=stop)
    assert len(calls) == 2  # stopped at the first row block, not at the end


def test_wrong_products_are_refused() -> None:
    seed, n = bytes(range(32)), 128
    good = NumpyBackend().product_mod_p(seed, n, should_stop=lambda: False)
    inst = Instance.from_seed(seed, n)
    assert inst.freivalds(good, rounds=4, rng=random.Random(0))
    zero = bytes(n * n)
    assert not inst.freivalds(zero, rounds=4, rng=random.Random(0))
    assert not inst.freivalds(good[:-1], rounds=4, rng=random.Random(0))  # short
    unreduced = bytearray(good)
    unreduced[0] = 251  # congruent to 0 but not reduced: not what was committed
    assert not inst.freivalds(bytes(unreduced), rounds=4, rng=random.Random(0))
    digest = b"d" * 32
    assert not verify_product(digest, seed, n, good, commitment_of(digest, zero), rounds=4, rng=random.Random(0))


def test_a_wrong_product_escapes_one_round_at_most_one_time_in_251() -> None:
    """The stated bound, measured: a product wrong in a single entry is the
    hardest case for Freivalds over F_p (it escapes exactly when r_j = 0,
    probability 1/p).  3,000 trials of one round, fixed seeds: the escape
    count must be within the binomial's 1e-9 tails around 3000/251 ~ 12;
    with four rounds nothing may escape (bound 251^-4 per trial)."""
    seed, n = bytes(range(32)), 64
    good = NumpyBackend().product_mod_p(seed, n, should_stop=lambda: False)
    inst = Instance.from_seed(seed, n)
    pick = random.Random(42)
    trials, escaped_1, escaped_4 = 3000, 0, 0
    for t in range(trials):
        bad = bytearray(good)
        pos = pick.randrange(n * n)
        bad[pos] = (bad[pos] + pick.randrange(1, modulus)) % modulus
        escaped_1 += inst.freivalds(bytes(bad), rounds=1, rng=random.Random(t))
        escaped_4 += inst.freivalds(bytes(bad), rounds=4, rng=random.Random(10_000 + t))
    # Binomial(3000, 1/251): mean 11.95, sd 3.45; P[X > 40] and P[X < 1] are far below 1e-9... except
    # P[X = 0] = (250/251)^3000 ~ 6e-6, so the lower bound is 1.
    assert 1 <= escaped_1 <= 40
    assert escaped_4 == 0


# --- the prover's gate ------------------------------------------------------------------

def _challenge(rng_seed: int = 3, **kw: object) -> bytes:
    return make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(rng_seed),
                          now_ms=T0, **kw).wire  # type: ignore[arg-type]


def test_gate_admits_one_at_a_time() -> None:
    gate = ProverGate(peer_id=BOB.peer_id)
    first = gate.admit(_challenge(), from_peer=ALICE.peer_id, now_ms=T0)
    assert isinstance(first, Admitted) and first.abandon_at_ms == T0 + first.challenge.challenge.deadline_ms
    busy = gate.admit(_challenge(4), from_peer=ALICE.peer_id, now_ms=T0)
    assert isinstance(busy, Declined) and (busy.status, busy.detail) == ("busy", "another challenge is running")
    assert busy.challenge == decode_challenge(_challenge(4))
    gate.done()
    assert isinstance(gate.admit(_challenge(5), from_peer=ALICE.peer_id, now_ms=T0), Admitted)


def test_gate_rate_limits_each_challenger_and_all_of_them() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, per_challenger_burst=2, per_challenger_refill_ms=60_000,
                      total_burst=3, total_refill_ms=10_000)
    results = []
    for i in range(3):
        got = gate.admit(_challenge(10 + i), from_peer=ALICE.peer_id, now_ms=T0)
        results.append(isinstance(got, Admitted))
        gate.done()
    assert results == [True, True, False]  # a burst of 2, then busy
    later = gate.admit(_challenge(20), from_peer=ALICE.peer_id, now_ms=T0 + 60_000)
    assert isinstance(later, Admitted)  # one token back after a minute
    gate.done()
    # All challengers together: 3 in the bucket, 3 used (ALICE twice, then once at +60s refilled it to 3-1).
    strangers = [Identity.from_rng(random.Random(100 + i)) for i in range(5)]
    admitted = 0
    for i, s in enumerate(strangers):
        wire = make_challenge(s, prover=BOB.peer_id, model="cpu", rng=random.Random(i), now_ms=T0).wire
        got = gate.admit(wire, from_peer=s.peer_id, now_ms=T0 + 60_000)
        admitted += isinstance(got, Admitted)
        gate.done()
    assert admitted < len(strangers)


def test_gate_forgets_challengers_beyond_its_table() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, challengers_max=3, total_burst=100)
    for i in range(6):
        s = Identity.from_rng(random.Random(200 + i))
        wire = make_challenge(s, prover=BOB.peer_id, model="cpu", rng=random.Random(i), now_ms=T0).wire
        assert isinstance(gate.admit(wire, from_peer=s.peer_id, now_ms=T0), Admitted)
        gate.done()
    assert len(gate._buckets) == 3


def test_gate_refuses_hostile_challenges() -> None:
    gate = ProverGate(peer_id=BOB.peer_id, n_max=512)
    with pytest.raises(PeerMisbehaved) as exc:  # relayed by someone else
        gate.admit(_challenge(), from_peer=BOB.peer_id, now_ms=T0)
    assert exc.value.reason is Reason.SIGNER_MISMATCH
    carol = Identity.from_rng(random.Random(9))
    for_carol = make_challenge(ALICE, prover=carol.peer_id, model="cpu", rng=random.Random(1), now_ms=T0).wire
    with pytest.raises(PeerMisbehaved):
        gate.admit(for_carol, from_peer=ALICE.peer_id, now_ms=T0)
    with pytest.raises(PeerMisbehaved) as exc:
        gate.admit(_challenge(), from_peer=ALICE.peer_id, now_ms=T0 - 120_000)
    assert exc.value.reason is Reason.NOT_YET_VALID
    with pytest.raises(PeerMisbehaved) as exc:
        gate.admit(_challenge(), from_peer=ALICE.peer_id, now_ms=T0 + 3_600_000)
    assert exc.value.reason is Reason.EXPIRED
    big = gate.admit(_challenge(n=1024), from_peer=ALICE.peer_id, now_ms=T0)
    assert isinstance(big, Declined) and big.status == "refused" and not gate.busy
    with pytest.raises(PeerMisbehaved):
        gate.admit(b"\x93\x01\x02\x03", from_peer=ALICE.peer_id, now_ms=T0)
    assert not gate.busy


# --- verdicts ----------------------------------------------------------------------------

def test_judge_outcomes() -> None:
    sc = make_challenge(ALICE, prover=BOB.peer_id, model="cpu", rng=random.Random(3), now_ms=T0)
    ok = answer(BOB, sc, "ok", commitment=b"c" * 32)
    dl = sc.challenge.deadline_ms
    assert judge(sc, ok, elapsed_ms=dl, product_ok=True) is Outcome.PASSED
    assert judge(sc, ok, elapsed_ms=dl + 1, product_ok=True) is Outcome.LATE
    assert judge(sc, ok, elapsed_ms=10, product_ok=False) is Outcome.WRONG
    assert judge(sc, ok, elapsed_ms=10, product_ok=None) is Outcome.NO_ANSWER
    assert judge(sc, None, elapsed_ms=None, product_ok=None) is Outcome.NO_ANSWER
    assert judge(sc, answer(BOB, sc, "busy"), elapsed_ms=10, product_ok=None) is Outcome.BUSY
    assert judge(sc, answer(BOB, sc, "refused"), elapsed_ms=10, product_ok=None) is Outcome.REFUSED
    assert judge(sc, Outcome.BAD_ANSWER, elapsed_ms=10, product_ok=None) is Outcome.BAD_ANSWER


def test_claim_book_refuses_a_liar_and_hides_its_gpus_from_matching() -> None:
    book = ClaimBook(allow_simulated=False)
    liar = advert(BOB, (H100, H100))
    honest = advert(ALICE, (A100,))
    req = Requirements(models=("H100",), gpus_per_node=1, price_per_gpu_hour_max=10)
    assert [a.peer_id for a in matching([book.view(liar, T0)], req)] == [BOB.peer_id]  # untested: believed
    assert book.due([liar, honest], T0, me="me") == sorted([(BOB.peer_id, "h100"), (ALICE.peer_id, "a100")])
    assert book.record(BOB.peer_id, "h100", Outcome.LATE, T0) is Verdict.REFUSED
    assert matching([book.view(liar, T0 + 1)], req) == []
    assert book.view(liar, T0 + 1).gpus == () and book.view(liar, T0 + 1).gpus_free == 0
    assert book.due([liar, honest], T0 + 1, me="me") == [(ALICE.peer_id, "a100")]
    # A refusal lasts its TTL, then the claim is tested again.
    ttl = ClaimPolicy().refused_ttl_ms
    assert book.verdict(BOB.peer_id, "h100", T0 + ttl) is Verdict.UNTESTED
    assert book.record(ALICE.peer_id, "a100", Outcome.PASSED, T0) is Verdict.BELIEVED
    assert book.view(honest, T0 + 1) is honest


def test_claim_book_strict_policy_and_exemptions() -> None:
    strict = ClaimBook(allow_simulated=False, policy=ClaimPolicy(untested_believed=False))
    adv = advert(BOB, (H100, A100))
    assert strict.view(adv, T0).gpus == ()
    strict.record(BOB.peer_id, "a100", Outcome.PASSED, T0)
    assert strict.view(adv, T0).gpus == (A100,)
    # Simulated GPUs are exempt where the network allows them, and only there.
    sim = advert(BOB, (H100,), simulated=True)
    assert ClaimBook(allow_simulated=True, policy=ClaimPolicy(untested_believed=False)).view(sim, T0) is sim
    assert ClaimBook(allow_simulated=True).due([sim], T0, me="me") == []
    assert ClaimBook(allow_simulated=False).due([sim], T0, me="me") == [(BOB.peer_id, "h100")]
    # GPUs without a table entry cannot be challenged: untested, never due.
    odd = advert(BOB, (GpuInfo(model="Some Card", memory_mb=1024, compute_capability="7.0"),))
    assert ClaimBook(allow_simulated=False).due([odd], T0, me="me") == []


def test_inconclusive_exchanges_are_retried_then_refused() -> None:
    book = ClaimBook(allow_simulated=False, policy=ClaimPolicy(retry_ms=1000, inconclusive_max=3))
    adv = advert(BOB, (H100,))
    for i, outcome in enumerate([Outcome.BUSY, Outcome.NO_ANSWER]):
        assert book.record(BOB.peer_id, "h100", outcome, T0 + i * 1000) is Verdict.UNTESTED
        assert book.due([adv], T0 + i * 1000 + 1, me="me") == []        # not before retry_ms
        assert book.due([adv], T0 + i * 1000 + 1000, me="me") == [(BOB.peer_id, "h100")]
    assert book.record(BOB.peer_id, "h100", Outcome.BUSY, T0 + 2000) is Verdict.REFUSED
    # A pass resets the count.
    assert book.record(BOB.peer_id, "h100", Outcome.PASSED, T0 + 3000) is Verdict.BELIEVED
    assert book.record(BOB.peer_id, "h100", Outcome.BUSY, T0 + 4000) is Verdict.UNTESTED


def test_claim_book_is_bounded() -> None:
    book = ClaimBook(allow_simulated=False, claims_max=10)
    for i in range(25):
        book.record(f"peer{i}", "h100", Outcome.LATE, T0 + i)
    assert len(book.records) == 10
    assert ("peer24", "h100") in book.records and ("peer0", "h100") not in book.records


def test_view_never_claims_more_free_gpus_than_it_keeps() -> None:
    book = ClaimBook(allow_simulated=False)
    adv = replace(advert(BOB, (H100, H100, A100)), gpus_free=3)
    book.record(BOB.peer_id, "h100", Outcome.WRONG, T0)
    v = book.view(adv, T0)
    assert v.gpus == (A100,) and v.gpus_free == 1


def test_the_advert_books_view_hook_hides_refused_gpus_from_live_and_market() -> None:
    from p2pgpu.core import AdvertBook, sign_advert

    claims = ClaimBook(allow_simulated=False)
    book = AdvertBook(network="strict", allow_simulated=False, view=claims.view)
    liar = advert(BOB, (H100,))
    book.ingest(sign_advert(BOB, liar).wire, T0)
    assert [a.peer_id for a in book.live(T0)] == [BOB.peer_id]
    assert [a.peer_id for a in book.market(T0, model="H100")] == [BOB.peer_id]
    claims.record(BOB.peer_id, "h100", Outcome.LATE, T0)
    assert book.live(T0)[0].gpus == ()
    assert book.market(T0, model="H100") == [] and book.market(T0) == []
    assert book.adverts[BOB.peer_id].advert == liar  # the signed advert itself is kept as received
    assert AdvertBook(network="strict", allow_simulated=False).view is None  # no hook: adverts as signed


def test_bookkeeping_per_peer_follows_records_and_eviction() -> None:
    book = ClaimBook(allow_simulated=False, claims_max=2)
    book.record("p1", "h100", Outcome.LATE, T0)
    book.record("p1", "a100", Outcome.PASSED, T0 + 1)
    book.record("p1", "h100", Outcome.LATE, T0 + 2)  # again: still two records for p1
    assert book._per_peer == {"p1": 2}
    book.record("p2", "h100", Outcome.LATE, T0 + 3)  # evicts p1's a100
    assert book._per_peer == {"p1": 1, "p2": 1} and len(book.records) == 2
    book.record("p3", "h100", Outcome.LATE, T0 + 4)  # evicts p1's h100
    assert book._per_peer == {"p2": 1, "p3": 1}
    # An evicted refusal no longer hides anything: the peer is untested again.
    adv = advert(BOB, (H100,))
    assert book.view(adv, T0 + 5) is adv
