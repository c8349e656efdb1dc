"""The settlement core's restart path at its edges (#19): what ``restore``
and ``restore_logs`` rebuild from stored items, item by item and field by
field, and the answer to a lookup of a stored collection, so that a wrong
change to what a restarted submitter remembers (and so pays) fails a test.
Found by a mutation sample of ``core/_settlement.py`` (#13)."""

from __future__ import annotations

from typing import Any

import pytest
from test_settlement import ADDRS, SETTLE, T0, A, B, Bench, C, acks, cosign, proof

from p2pgpu.core import LocalProtocolError, PeerMisbehaved, Reason
from p2pgpu.core._actions import (
    CollectionOpened,
    Emit,
    ItemTaken,
    LateLine,
    LogsTaken,
    MemberLine,
    SetTimer,
    Settled,
    TimerKey,
    TimerOwner,
)
from p2pgpu.core._codec import decode as decode_any
from p2pgpu.core._envelope import Kind, seal
from p2pgpu.core._proof import decode_proof
from p2pgpu.core._settlement import (
    ProofAck,
    Settlement,
    SettlementConfig,
    ack_items_max,
    item_hash,
    part_words,
)

DEADLINE = T0 + 90_000


def outputs(me: Any, job: str, files: list[Any]) -> bytes:
    return seal(me, Kind.RESULT, {"type": "outputs", "job_id": job, "peer_id": me.peer_id, "outputs": files}).to_bytes()


def logs(me: Any, job: str, seq: int, n: int) -> tuple[dict[str, Any], bytes]:
    body = {"type": "log", "job_id": job, "peer_id": me.peer_id, "seq": seq, "lines": [[i, "o", f"l{i}"] for i in range(n)]}
    return body, seal(me, Kind.RESULT, body).to_bytes()


def restored(b: Bench, items: list[tuple[str, str, bytes, int]], now_ms: int = T0 + 10_000,
             s: Settlement | None = None) -> tuple[Settlement, list[Any]]:
    s = s or Settlement(b.s.identity)
    return s, s.restore(b.sm, b.cert, confirmed_at_ms=T0, deadline_ms=DEADLINE, payout_addresses={},
                        items=items, now_ms=now_ms)


def test_restore_rebuilds_each_kind_of_item() -> None:
    b = Bench()
    pa, pb = proof(A, b.job, b.cert), proof(B, b.job, b.cert)
    ca = cosign(A, B, b.job, b.cert)
    oa = outputs(A, b.job, [{"path": "out", "sha256": "00" * 32}, "not a map"])
    s, acts = restored(b, [("proof", A.peer_id, pa, T0 + 5_100), ("outputs", A.peer_id, oa, T0 + 5_200),
                           ("cosign", A.peer_id, ca, T0 + 5_300), ("outputs", B.peer_id, outputs(B, b.job, []),
                                                                    T0 + 5_400), ("proof", B.peer_id, pb, T0 + 5_500)])
    c = s.collections[b.job]
    assert acts == [Emit("settlement.reopened"), SetTimer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE),
                                                          max(DEADLINE, T0 + 10_000 + s.config.reopen_grace_ms))]
    assert list(c.proofs) == [A.peer_id, B.peer_id]
    assert c.outputs == {A.peer_id: [{"path": "out", "sha256": "00" * 32}], B.peer_id: []}
    # The first result of each member is when its results arrived (the window's end); a co-signature is not one.
    assert c.results_at_ms == {A.peer_id: T0 + 5_100, B.peer_id: T0 + 5_400}
    assert c.items == {item_hash(pa): "proof", item_hash(oa): "outputs", item_hash(ca): "cosign",
                       item_hash(outputs(B, b.job, [])): "outputs", item_hash(pb): "proof"}
    # Every stored item, resent, is acknowledged as recorded and taken no second time.
    for wire, who in ((pa, A), (ca, A)):
        on = s.on_proof if wire is pa else s.on_cosign
        assert acks(on(wire, T0 + 10_001)) == [(who.peer_id, "recorded")]


def test_restore_refuses_a_non_members_item_and_counts_each_refusal() -> None:
    b = Bench()
    s, acts = restored(b, [("proof", C.peer_id, proof(C, b.job, b.cert), T0), ("proof", A.peer_id, b"junk", T0),
                           ("cosign", B.peer_id, b"junk", T0)])
    assert acts[:3] == [Emit("settlement.stored_item_refused")] * 3 and acts[3] == Emit("settlement.reopened")
    c = s.collections[b.job]
    assert c.proofs == {} and c.items == {} and c.results_at_ms == {}


def test_a_complete_restored_collection_settles_now_and_restoring_twice_does_nothing() -> None:
    b = Bench((A,))
    s, acts = restored(b, [("proof", A.peer_id, proof(A, b.job, b.cert), T0 + 5_100)], now_ms=T0 + 6_000)
    assert acts[-1] == SetTimer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 6_000)
    assert restored(b, [], s=s)[1] == []


def test_reopening_waits_until_the_deadline_or_the_grace_whichever_is_later() -> None:
    b = Bench()
    grace = Settlement(b.s.identity).config.reopen_grace_ms
    key = TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE)
    assert restored(b, [], now_ms=DEADLINE - grace - 1)[1][-1] == SetTimer(key, DEADLINE)
    assert restored(b, [], now_ms=DEADLINE - grace + 1)[1][-1] == SetTimer(key, DEADLINE + 1)


def test_restore_is_bounded_by_the_collections_limit() -> None:
    b = Bench()
    s = Settlement(b.s.identity, SettlementConfig(collections_max=1))
    restored(b, [], s=s)
    other = Bench((A,))
    with pytest.raises(LocalProtocolError, match="more than 1 collections open"):
        restored(other, [], s=s)


def test_restore_logs_rebuilds_the_sequence_numbers_and_keeps_what_the_fresh_path_keeps() -> None:
    b = Bench()
    assert Settlement(b.s.identity).restore_logs(b.job, []) == []  # no open collection
    s, _ = restored(b, [])
    a1, a2, b1 = logs(A, b.job, 1, 3), logs(A, b.job, 2, 2), logs(B, b.job, 1, 1)
    c1 = logs(C, b.job, 1, 1)  # not a member
    got = s.restore_logs(b.job, [a1[1], b"junk", a2[1], c1[1], b1[1], a1[1]])
    assert all(isinstance(t, LogsTaken) for t in got)
    got_logs = [t for t in got if isinstance(t, LogsTaken)]
    assert [(t.member, t.seq, len(t.lines)) for t in got_logs] == [(A.peer_id, 1, 3), (A.peer_id, 2, 2), (B.peer_id, 1, 1)]
    assert got[0] == LogsTaken(b.job, A.peer_id, 0, 1, ((0, "o", "l0"), (1, "o", "l1"), (2, "o", "l2")), b"")
    assert got_logs[2].member_index == 1
    # The fresh path keeps the same lines; the restored path has no wire to store again.
    fresh = Bench()
    (taken,) = fresh.s.on_result(a1[0], A.peer_id, a1[1], T0)
    assert isinstance(taken, LogsTaken) and (taken.lines, taken.seq, taken.wire) == (got_logs[0].lines, 1, a1[1])
    # Known again: a resend is repeated, the next batch is new.
    assert s.on_result(a2[0], A.peer_id, a2[1], T0) == [Emit("settlement.logs_repeated")]
    a3 = logs(A, b.job, 3, 1)
    (t3,) = s.on_result(a3[0], A.peer_id, a3[1], T0)
    assert isinstance(t3, LogsTaken) and t3.seq == 3


def test_a_lookup_answer_acknowledges_only_a_stored_collections_member() -> None:
    b = Bench()
    h = item_hash(proof(A, b.job, b.cert))
    members = [A.peer_id, B.peer_id]
    assert acks(b.s.stored_ack(b.job, B.peer_id, h, members=members, stored=True)) == [(B.peer_id, "recorded")]
    assert acks(b.s.stored_ack(b.job, B.peer_id, h, members=members, stored=False)) == [(B.peer_id, "late")]
    with pytest.raises(PeerMisbehaved, match=f"no confirmed job {b.job[:12]} here") as e:
        b.s.stored_ack(b.job, A.peer_id, h, members=None, stored=True)
    assert e.value.reason is Reason.UNKNOWN_JOB
    with pytest.raises(PeerMisbehaved, match=f"{C.peer_id[:16]} is not a member of {b.job[:12]}") as e:
        b.s.stored_ack(b.job, C.peer_id, h, members=members, stored=True)
    assert e.value.reason is Reason.NOT_A_MEMBER
    assert b.s.stored_ack(b.job, A.peer_id, h, members=members, stored=True)[0] == Emit("collect:ack_recorded")


def test_outputs_and_cosignatures_are_taken_as_what_they_are() -> None:
    b = Bench()
    oa = outputs(A, b.job, [{"path": "out"}, 7])
    body = {"type": "outputs", "job_id": b.job, "peer_id": A.peer_id, "outputs": [{"path": "out"}, 7]}
    acts = b.s.on_result(body, A.peer_id, oa, T0 + 5_000)
    assert acts[0] == ItemTaken(b.job, item_hash(oa), "outputs", A.peer_id, oa, T0 + 5_000)
    assert acks(acts) == [(A.peer_id, "recorded")]
    c = b.s.collections[b.job]
    assert c.outputs == {A.peer_id: [{"path": "out"}]} and c.results_at_ms == {A.peer_id: T0 + 5_000}
    assert c.items == {item_hash(oa): "outputs"}
    ca = cosign(B, A, b.job, b.cert)
    acts = b.s.on_cosign(ca, T0 + 5_100)
    assert acts[0] == ItemTaken(b.job, item_hash(ca), "cosign", B.peer_id, ca, T0 + 5_100)
    assert c.results_at_ms == {A.peer_id: T0 + 5_000}  # a co-signature is not a member's result
    assert c.items[item_hash(ca)] == "cosign"


def test_log_batches_of_an_unknown_job_or_a_stranger_are_refused_naming_them() -> None:
    b = Bench()
    body, wire = logs(A, b.job, 1, 1)
    b.s.collections.clear()
    with pytest.raises(PeerMisbehaved, match=f"no confirmed job {b.job[:12]} here") as e:
        b.s.on_result(body, A.peer_id, wire, T0)
    assert e.value.reason is Reason.UNKNOWN_JOB
    b = Bench()
    body, wire = logs(C, b.job, 1, 1)
    with pytest.raises(PeerMisbehaved, match=f"{C.peer_id[:16]} is not a member of {b.job[:12]}$") as e:
        b.s.on_result(body, C.peer_id, wire, T0)
    assert e.value.reason is Reason.NOT_A_MEMBER


def test_log_lines_of_the_wrong_shape_are_dropped_and_the_rest_cut_to_size() -> None:
    b = Bench()
    lines: list[Any] = [[1, "o", "ok"], [2, "o"], ["3", "o", "x"], [4, "o", 5], "line", [5, 7, "stream as int"],
                        [6, "s" * 20, "x" * 5_000]]
    body = {"type": "log", "job_id": b.job, "peer_id": A.peer_id, "seq": 1, "lines": lines}
    (taken,) = b.s.on_result(body, A.peer_id, seal(A, Kind.RESULT, body).to_bytes(), T0)
    assert isinstance(taken, LogsTaken)
    assert taken.lines == ((1, "o", "ok"), (5, "7", "stream as int"), (6, "s" * 16, "x" * 4_096))
    for bad in ({"seq": "2"}, {"seq": 2, "lines": "x"}, {"seq": True}):
        body2 = {**body, **bad}
        assert b.s.on_result(body2, A.peer_id, seal(A, Kind.RESULT, body2).to_bytes(), T0) == [
            Emit("settlement.logs_repeated")]


def test_the_log_lines_limit_of_a_job_on_both_sides() -> None:
    b = Bench()
    b.s = Settlement(b.s.identity, SettlementConfig(log_lines_max=5))
    b.s.open(b.sm, b.cert, T0)

    def send(seq: int, n: int) -> LogsTaken:
        body, wire = logs(A, b.job, seq, n)
        (taken,) = b.s.on_result(body, A.peer_id, wire, T0)
        assert isinstance(taken, LogsTaken)
        return taken

    assert len(send(1, 3).lines) == 3
    assert len(send(2, 4).lines) == 2  # 5 in all: exactly the limit
    full = send(3, 1)
    assert full.lines == () and full.seq == 3  # a batch past the limit is still seen (its seq moves on)
    assert b.s.collections[b.job].log_lines == 5


def test_after_settling_only_co_signatures_about_a_member_still_owed_are_taken() -> None:
    # B's proof is held up past settlement (it may still come, and be owed):
    # C's co-signature of B is taken; C's of A (settled) is late.
    b = Bench((A, B, C))
    key = TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE)
    for me in (A, C):
        b.s.on_proof(proof(me, b.job, b.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"), T0 + 3_100)
    b.settled(b.s.on_timer(key, T0 + 11_100))
    about_b = cosign(C, B, b.job, b.cert)
    acts = b.s.on_cosign(about_b, T0 + 20_000)
    assert acts[0] == ItemTaken(b.job, item_hash(about_b), "cosign", C.peer_id, about_b, T0 + 20_000)
    assert acks(acts) == [(C.peer_id, "recorded")]
    about_a = cosign(C, A, b.job, b.cert)
    assert acks(b.s.on_cosign(about_a, T0 + 20_000)) == [(C.peer_id, "late")]


# --- settling: every field of what is owed ------------------------------------------------


def test_every_field_of_a_settled_line_and_the_actions_around_it() -> None:
    b = Bench((A,))
    pa = proof(A, b.job, b.cert, ran_ms=2_000)
    acts = b.s.on_proof(pa, T0 + 2_100)
    s = b.settled(acts)
    sp = decode_proof(pa)
    assert s.lines == (MemberLine(peer_id=A.peer_id, member_index=0, status="owed", amount=2_000, reason="",
                                  payout_address=ADDRS[0], proof_hash=sp.proof_hash, proof_wire=pa, cosigns=(),
                                  gpu_ms=2_000, served_ms=2_000, exit_code=0, end_reason="exited",
                                  output_digest=b"\x07" * 32, fault=""),)
    assert (s.succeeded, s.reason, s.settled_at_ms) == (True, "", T0 + 2_100)
    tail = acts[acts.index(s) - 2:]
    assert tail[:2] == [SetTimer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), b.s.collections[b.job].deadline_ms),
                        Emit("jobs_settled")]
    assert b.s.settle(b.job, T0 + 2_200) == []  # once


def test_a_refused_proof_is_counted_and_names_its_fault() -> None:
    b = Bench((A,))
    bad = proof(A, b.job, b.cert, ran_ms=61_000 + 5_000)  # past the 60 s limit and its tolerance
    acts = b.s.on_proof(bad, T0 + 66_100)
    s = b.settled(acts)
    (line,) = s.lines
    assert (line.status, line.amount, line.fault) == ("rejected", 0, "OVER_DURATION")
    assert line.reason.startswith("its proof was refused (") and line.proof_hash == decode_proof(bad).proof_hash
    assert Emit("settlement.proofs_refused", 1) in acts


def test_a_claim_beyond_what_co_signers_saw_is_paid_up_to_it_and_says_so() -> None:
    b = Bench()
    b.s.on_cosign(cosign(B, A, b.job, b.cert, seen_ms=2_000), T0 + 2_000)
    b.s.on_cosign(cosign(A, B, b.job, b.cert, seen_ms=5_000), T0 + 5_000)
    b.s.on_proof(proof(B, b.job, b.cert), T0 + 5_100)
    s = b.settled(b.s.on_proof(proof(A, b.job, b.cert), T0 + 5_100))
    line = s.lines[0]
    assert line.status == "owed" and 0 < line.amount < 5_000
    assert line.reason == (f"paid for {line.amount} of the 5000 GPU-ms it claimed: nobody saw more of its work")
    assert s.lines[1].reason == "" and s.lines[1].amount == 5_000


def test_a_member_without_a_payout_address_is_owed_nothing_it_can_receive() -> None:
    b = Bench((A,))
    s, _ = restored(b, [("proof", A.peer_id, proof(A, b.job, b.cert), T0 + 5_100)], now_ms=T0 + 6_000)
    settled = b.settled(s.settle(b.job, T0 + 6_000))
    (line,) = settled.lines
    assert (line.status, line.amount, line.reason, line.payout_address) == (
        "no_payout_address", 5_000, "it advertises no payout address", "")


def test_the_advert_books_payout_address_comes_before_the_accepts() -> None:
    b = Bench((A, B))
    book = {A.peer_id: "AdvertAddressOfA"}
    s = Settlement(b.s.identity, payout_address_of=lambda peer: book.get(peer, ""))
    opened = s.open(b.sm, b.cert, T0)
    assert opened[0] == CollectionOpened(b.job, b.cert, {A.peer_id: "AdvertAddressOfA", B.peer_id: ADDRS[1]}, T0,
                                         T0 + 60_000 + s.config.settle_grace_ms)


def test_part_words_for_unknown_and_empty_end_reasons() -> None:
    assert part_words("exited", 3) == "the command exited with code 3"
    assert part_words("time_limit", None) == "time limit reached"
    assert part_words("gone_fishing", None) == "gone_fishing"
    assert part_words("", None) == "it ended for no reason it gave"


def test_a_proof_ack_at_its_limits() -> None:
    job = "ab" * 32
    ok = ProofAck(job_id=job, submitter="p" * 64, items=(b"h" * 32,) * ack_items_max, status="late")
    assert ProofAck.from_body(ok.to_body(), "p" * 64) == ok
    for over in ({"submitter": ""}, {"submitter": "p" * 65}, {"items": ()}, {"items": (b"h" * 32,) * (ack_items_max + 1)},
                 {"items": (b"h" * 31,)}, {"items": (b"h" * 32, b"h" * 33)}, {"status": "paid"}, {"job_id": "AB" * 32}):
        with pytest.raises(ValueError):
            args: dict[str, Any] = {"job_id": job, "submitter": "p", "items": (b"h" * 32,), "status": "late", **over}
            ProofAck(**args)


def test_restore_logs_skips_a_non_canonical_batch() -> None:
    import msgpack

    b = Bench()
    s, _ = restored(b, [])
    _, wire = logs(A, b.job, 1, 1)
    env = decode_any(wire)
    odd = msgpack.packb(dict(reversed(list(env.items()))), use_bin_type=True)
    assert odd != wire
    assert s.restore_logs(b.job, [odd]) == []
    assert len(s.restore_logs(b.job, [wire])) == 1


def test_the_verifier_handed_in_checks_stored_items_too() -> None:
    from p2pgpu.core._identity import verify_signature

    calls: list[bytes] = []

    def counting(key: bytes, msg: bytes, sig: bytes) -> None:
        calls.append(msg)
        verify_signature(key, msg, sig)

    b = Bench()
    s = Settlement(b.s.identity, verify=counting)
    items = [("outputs", A.peer_id, outputs(A, b.job, []), T0), ("cosign", A.peer_id, cosign(A, B, b.job, b.cert), T0)]
    restored(b, items, s=s)
    assert len(calls) == 2
    s.on_cosign(cosign(B, A, b.job, b.cert), T0 + 1)
    assert len(calls) >= 3


# -- written against the sample of 300 (seed 1) of core/_settlement.py at ab37f9e -------------


def _settled_with_b_pending() -> Bench:
    b = Bench()
    b.s.on_proof(proof(A, b.job, b.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"), T0 + 3_100)
    b.settled(b.s.on_timer(TimerKey(TimerOwner.SETTLEMENT, b.job, SETTLE), T0 + 11_100))
    return b


def test_a_late_members_outputs_make_no_line_its_proof_does() -> None:
    """``_take__mutmut_26`` (``and`` to ``or``): after settlement only the
    late proof of a pending member makes its line; its outputs list, taken
    first, does not (a line then would owe it nothing, before its proof)."""
    b = _settled_with_b_pending()
    acts = b.s.on_result({"type": "outputs", "job_id": b.job, "peer_id": B.peer_id, "outputs": []}, B.peer_id,
                         outputs(B, b.job, []), T0 + 20_000)
    assert any(isinstance(a, ItemTaken) for a in acts) and not any(isinstance(a, LateLine) for a in acts)
    acts = b.s.on_proof(proof(B, b.job, b.cert, ran_ms=3_000, exit_code=137, end_reason="member_lost"), T0 + 21_000)
    (late,) = [a for a in acts if isinstance(a, LateLine)]
    assert late.line.status == "owed" and late.line.amount == 3_000


def test_a_cosignature_is_checked_with_the_verifier_handed_in_even_for_a_job_not_open() -> None:
    """``on_cosign__mutmut_5``: a co-signature is decoded with the
    settlement's verifier before anything else (here: before the lookup of a
    job not open here)."""
    def refuse(key: bytes, message: bytes, signature: bytes) -> None:
        raise PeerMisbehaved(Reason.BAD_SIGNATURE, "refused by this test")

    b = Bench()
    s = Settlement(b.s.identity, verify=refuse)
    with pytest.raises(PeerMisbehaved, match="refused by this test"):
        s.on_cosign(cosign(A, B, b.job, b.cert), T0)


def test_a_job_settled_at_its_deadline_keeps_no_timer_and_lists_outputs_and_missing_members() -> None:
    """``settle__mutmut_63``, ``_69`` (a job settled exactly at its deadline
    keeps no deadline timer: it is forgotten now), ``_32`` (the outputs
    lists in the settlement), ``_line__mutmut_14`` (a missing member's
    index)."""
    b = Bench()
    c = b.s.collections[b.job]
    b.s.on_result({"type": "outputs", "job_id": b.job, "peer_id": A.peer_id, "outputs": [{"path": "o"}]}, A.peer_id,
                  outputs(A, b.job, [{"path": "o"}]), T0 + 1_000)
    acts = b.s.settle(b.job, c.deadline_ms)
    (settled,) = [a for a in acts if isinstance(a, Settled)]
    assert settled.outputs == {A.peer_id: [{"path": "o"}]}
    assert [(ln.member_index, ln.status) for ln in settled.lines] == [(0, "missing"), (1, "missing")]
    assert not any(isinstance(a, SetTimer) for a in acts) and b.job not in b.s.collections
    early = Bench()
    keep = early.s.settle(early.job, early.s.collections[early.job].deadline_ms - 1)
    assert SetTimer(TimerKey(TimerOwner.SETTLEMENT, early.job, SETTLE), early.s.collections[early.job].deadline_ms) \
        in keep
