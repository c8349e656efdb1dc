"""Every decoder of #16 either parses its input or raises PeerMisbehaved, never another exception.

The receipt, member-receipt, challenge and challenge-answer decoders (and
the prover's gate, which decodes first) get arbitrary bytes, arbitrary
msgpack structures, byte-level mutations of valid signed messages, and valid
bodies with one field replaced by an arbitrary value and signed by the right
key.  A mutated message that still decodes must be the original one (the
signature and canonical form leave no slack); a re-signed body that decodes
must round-trip to the same body.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trust_fixtures import ALICE, BOB, SUBMITTER, T0, line, member_receipt, receipt

from p2pgpu.core import Identity, Kind, LocalProtocolError, PeerMisbehaved, Reason, encode, seal
from p2pgpu.core._challenge import ProverGate, answer, decode_answer, decode_challenge, make_challenge
from p2pgpu.core._receipt import decode_member_receipt, decode_receipt, sign_member_receipt, sign_receipt
from p2pgpu.core._reputation import VerifiedPayment, compute_reputation

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROVER = Identity.from_rng(random.Random(77))
RECEIPT = sign_receipt(SUBMITTER, receipt("fuzz", [line(ALICE), line(BOB, "proof_refused")]))
MEMBER = sign_member_receipt(ALICE, member_receipt("fuzz", ALICE, "late"))
CHALLENGE = make_challenge(ALICE, prover=PROVER.peer_id, model="cpu", rng=random.Random(1), now_ms=T0, n=64)
ANSWER = answer(PROVER, CHALLENGE, "ok", commitment=b"c" * 32)

DECODERS: dict[str, tuple[Callable[[bytes], Any], Any, Identity, Kind]] = {
    "receipt": (decode_receipt, RECEIPT, SUBMITTER, Kind.RECEIPT),
    "member_receipt": (decode_member_receipt, MEMBER, ALICE, Kind.MEMBER_RECEIPT),
    "challenge": (decode_challenge, CHALLENGE, ALICE, Kind.CHALLENGE),
    "answer": (decode_answer, ANSWER, PROVER, Kind.CHALLENGE_ANSWER),
}


def outcome(fn: Callable[[], Any]) -> tuple[Any, Reason | None]:
    try:
        return fn(), None
    except PeerMisbehaved as exc:
        assert isinstance(exc.reason, Reason)
        return None, exc.reason


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.text(max_size=40), st.binary(max_size=80))
msgpackable = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                             st.dictionaries(st.text(max_size=12), inner,
                                                                             max_size=6)), max_leaves=30)


def _all(data: bytes) -> None:
    for fn, _, _, _ in DECODERS.values():
        outcome(lambda fn=fn: fn(data))  # type: ignore[misc]
    gate = ProverGate(peer_id=PROVER.peer_id)
    outcome(lambda: gate.admit(data, from_peer=ALICE.peer_id, now_ms=T0))
    rep = compute_reputation([data], member_receipts=[data], payments={}, now_ms=T0)
    assert rep.scores == {} and len(rep.refused) >= 1


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    _all(data)


@FUZZ
@given(msgpackable)
def test_arbitrary_structures(obj: Any) -> None:
    try:
        data = encode(obj)
    except LocalProtocolError:
        return
    _all(data)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_mutated_messages_decode_only_as_themselves(name: str, data: st.DataObject) -> None:
    fn, signed, _, _ = DECODERS[name]
    wire = signed.wire
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    pos = data.draw(st.integers(0, len(wire) - 1))
    if kind == "flip":
        mutant = wire[:pos] + bytes([wire[pos] ^ data.draw(st.integers(1, 255))]) + wire[pos + 1:]
    elif kind == "insert":
        mutant = wire[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + wire[pos:]
    elif kind == "delete":
        mutant = wire[:pos] + wire[pos + data.draw(st.integers(1, 16)):]
    else:
        mutant = wire[:pos]
    value, reason = outcome(lambda: fn(mutant))
    if reason is None:
        assert mutant == wire and value == signed


#: The attribute holding each signed message's body object.
INNER = {"receipt": "receipt", "member_receipt": "receipt", "challenge": "challenge", "answer": "answer"}


def _body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = getattr(DECODERS[name][1], INNER[name]).to_obj()
    return body


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.data(), msgpackable, st.booleans())
def test_a_field_replaced_then_signed(name: str, data: st.DataObject, value: Any, drop: bool) -> None:
    fn, _, signer, kind = DECODERS[name]
    body = _body(name)
    field = data.draw(st.sampled_from(sorted(body)))
    if drop:
        del body[field]
    else:
        body[field] = value
    try:
        wire = seal(signer, kind, body).to_bytes()
    except LocalProtocolError:
        return
    got, reason = outcome(lambda: fn(wire))
    if reason is None:
        assert getattr(got, INNER[name]).to_obj() == body


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["paid", "proof_refused", "no_proof"]),
                          st.integers(1, 10**12)), min_size=1, max_size=6),
       st.dictionaries(st.sampled_from(["t0", "t1", "t2"]), st.integers(0, 10**12), max_size=3),
       st.integers(-10**12, 10**13))
def test_reputation_never_raises_and_stays_bounded(lines: list[tuple[int, str, int]], paid: dict[str, int],
                                                   age: int) -> None:
    from trust_fixtures import IDS, address, tx

    members = {}
    for i, outc, amount in lines:
        members[IDS[1 + i].peer_id] = line(IDS[1 + i], outc, amount, txname=f"t{i % 3}")
    r = sign_receipt(SUBMITTER, receipt("prop", list(members.values())))
    payer = r.receipt.payer
    payments = {tx(k): VerifiedPayment(tx_signature=tx(k), payer=payer,
                                       transfers={address(m): v for m in members}) for k, v in paid.items()}
    rep = compute_reputation([r.wire, r.wire], payments=payments, now_ms=T0 + age)
    total_paid = sum(ln.amount for ln in r.receipt.lines)
    for s in rep.scores.values():
        assert 0 <= s.good <= total_paid and s.bad >= 0
    sub = rep.score(SUBMITTER.peer_id)
    assert sub.paid <= total_paid
