"""Payment notices (#16.3, ``core/_notices.py``): resent until acknowledged,
and checked on the ledger before an interval counts as paid.

- **A lost notice.** The submitter's host keeps each notice until the member
  acknowledges it and resends it (doubling pauses, bounded); sent once, a
  lost notice made an honest member stop at its grace although it was paid
  (``test_a_notice_sent_once_and_lost_stops_an_honest_member``, which is the
  code before #16.3 in all but name: ``attempts_max = 1``).
- **A forged notice.** A member host whose driver can reach a ledger
  (``check_payments``) asks it (``CheckPayment``) and counts the interval
  only when the ledger shows the job's payer moved the interval's amount to
  its own address in that transaction; a notice citing nothing, another
  payer's transaction, too little, or one transaction for two intervals is
  not acknowledged and the member stops at its grace.

Real hosts (``core/_host.py``), one event in, the actions out.
"""

from __future__ import annotations

from typing import Any

from test_installments import ADDRS, CFG, I_MS, PAYER, A, S, certificate, manifest

from p2pgpu.core import Kind, seal
from p2pgpu.core._actions import (
    CancelTimer,
    CheckPayment,
    Emit,
    PaidNotice,
    Send,
    SetTimer,
    StartJob,
    StopJob,
)
from p2pgpu.core._codec import decode
from p2pgpu.core._envelope import body_of, envelope_from_obj
from p2pgpu.core._host import Host, HostConfig, Via
from p2pgpu.core._installments import claim_timer, due_timer, installment_key
from p2pgpu.core._notices import NoticeConfig, PaidNotices, notice_timer, payment_fault
from p2pgpu.core._reputation import VerifiedPayment

T0 = 1_800_000_000_000
CLAIM_MS = T0 + I_MS + CFG.claim_delay_ms  # interval 1 is claimed then ...
DUE_MS = CLAIM_MS + CFG.grace_ms  # ... and due then
TX = "5" * 87
OTHER_PAYER = "SysvarRent111111111111111111111111111111111"


def member(*, check_payments: bool) -> tuple[Host, str]:
    """Member A of a one-member pay-as-you-go job of S, running since T0, with
    interval 1 claimed (what it earns: 10,000 at its address ADDRS[0])."""
    sm = manifest()
    cert = certificate(sm.job_id, (A,))
    h = Host(A, HostConfig(installments=CFG), submitter_of={sm.job_id: S.peer_id}.get,
             check_payments=check_payments)
    h._member_run(StartJob(sm.job_id, sm, cert, 0, b""))
    h.member_started(sm.job_id, T0)
    claimed = h.on_timer(claim_timer(sm.job_id), CLAIM_MS)
    assert any(isinstance(a, Send) and a.peer_id == S.peer_id for a in claimed)  # the claim went out
    return h, sm.job_id


def notice(job: str, interval: int = 1, tx: str = TX) -> bytes:
    body = {"type": "paid", "job_id": job, "proof_hash": installment_key(job, A.peer_id, interval),
            "tx_signature": tx}
    return seal(S, Kind.RESULT, body).to_bytes()


def acks(actions: list[Any]) -> list[bytes]:
    """The proof hashes the actions acknowledge to S."""
    out = []
    for a in actions:
        if isinstance(a, Send) and a.peer_id == S.peer_id:
            body = body_of(envelope_from_obj(decode(a.data, size_max=1 << 16, canonical=True)))
            if body.get("type") == "paid_ack":
                out.append(body["proof_hash"])
    return out


def stopped(actions: list[Any]) -> bool:
    return any(isinstance(a, StopJob) for a in actions)


def ledger(payer: str = PAYER, **to: int) -> VerifiedPayment:
    return VerifiedPayment(tx_signature=TX, payer=payer, transfers=to or {ADDRS[0]: 10_000})


# -- the member checks a notice on the ledger ----------------------------------------------


def test_a_member_checks_a_notice_on_the_ledger_before_the_interval_counts() -> None:
    h, job = member(check_payments=True)
    acts = h.on_bytes(notice(job), CLAIM_MS + 1_000, via=Via.DIRECT)
    (check,) = [a for a in acts if isinstance(a, CheckPayment)]
    assert check == CheckPayment(job, installment_key(job, A.peer_id, 1), TX, S.peer_id, None)
    assert not any(isinstance(a, PaidNotice) for a in acts) and not acks(acts)  # nothing counts yet
    done = h.payment_checked(check, ledger(), CLAIM_MS + 1_100)
    assert PaidNotice(job, check.proof_hash, TX, None) in done and acks(done) == [check.proof_hash]
    assert Emit("installments:paid") in done
    assert not stopped(h.on_timer(due_timer(job), DUE_MS))


def forged_cases(job: str) -> list[tuple[str, VerifiedPayment | None]]:
    return [
        ("a transaction the ledger does not show", None),
        ("paid by someone else", ledger(payer=OTHER_PAYER)),
        ("paid to another address", ledger(**{ADDRS[1]: 10_000})),
        ("less than the interval earns", ledger(**{ADDRS[0]: 9_999})),
    ]


def test_a_forged_notice_does_not_fool_the_member() -> None:
    """Each forgery: not acknowledged, the interval stays due, and the member
    stops at its grace with end reason ``unpaid``."""
    for why, payment in forged_cases("x"):
        h, job = member(check_payments=True)
        (check,) = [a for a in h.on_bytes(notice(job), CLAIM_MS + 1_000, via=Via.DIRECT)
                    if isinstance(a, CheckPayment)]
        done = h.payment_checked(check, payment, CLAIM_MS + 1_100)
        assert Emit("installments:notice_refused") in done, why
        assert not acks(done) and not any(isinstance(a, PaidNotice) for a in done), why
        out = h.on_timer(due_timer(job), DUE_MS)
        assert stopped(out) and next(a for a in out if isinstance(a, StopJob)).cause == "unpaid", why


def test_a_member_that_believes_notices_is_fooled_by_a_forged_one() -> None:
    """Without a ledger to check on (the code before #16.3 everywhere), the
    same forged notice keeps the member working for nothing."""
    h, job = member(check_payments=False)
    acts = h.on_bytes(notice(job, tx="1" * 87), CLAIM_MS + 1_000, via=Via.DIRECT)
    assert not any(isinstance(a, CheckPayment) for a in acts) and acks(acts)
    assert not stopped(h.on_timer(due_timer(job), DUE_MS))


def test_one_transaction_pays_one_interval_not_two() -> None:
    """A transaction that moved one interval's amount, cited for interval 1
    and again for interval 2, pays interval 1 only."""
    h, job = member(check_payments=True)
    (c1,) = [a for a in h.on_bytes(notice(job), CLAIM_MS + 1_000, via=Via.DIRECT) if isinstance(a, CheckPayment)]
    assert acks(h.payment_checked(c1, ledger(), CLAIM_MS + 1_100))
    h.on_timer(claim_timer(job), CLAIM_MS + I_MS)  # interval 2 claimed
    (c2,) = [a for a in h.on_bytes(notice(job, 2), CLAIM_MS + I_MS + 500, via=Via.DIRECT)
             if isinstance(a, CheckPayment)]
    done = h.payment_checked(c2, ledger(), CLAIM_MS + I_MS + 600)
    assert Emit("installments:notice_refused") in done and not acks(done)
    # A batch that moved both intervals' amounts pays both.
    done = h.payment_checked(c2, ledger(**{ADDRS[0]: 20_000}), CLAIM_MS + I_MS + 700)
    assert acks(done) == [c2.proof_hash]


def test_an_unreachable_ledger_leaves_the_notice_believed() -> None:
    h, job = member(check_payments=True)
    (check,) = [a for a in h.on_bytes(notice(job), CLAIM_MS + 1_000, via=Via.DIRECT) if isinstance(a, CheckPayment)]
    done = h.payment_checked(check, None, CLAIM_MS + 1_100, reachable=False)
    assert Emit("installments:paid_unchecked") in done and acks(done) == [check.proof_hash]
    assert not stopped(h.on_timer(due_timer(job), DUE_MS))


def test_a_notice_for_nothing_owed_is_not_checked_and_pays_nothing() -> None:
    """Another member's key, or an interval not claimed: no ledger lookup
    (a submitter cannot make members query the ledger at will), recorded as
    before, and the due interval stays due."""
    h, job = member(check_payments=True)
    for wire in (notice(job, 3), seal(S, Kind.RESULT, {"type": "paid", "job_id": job, "proof_hash": b"\x07" * 32,
                                                          "tx_signature": TX}).to_bytes()):
        acts = h.on_bytes(wire, CLAIM_MS + 1_000, via=Via.DIRECT)
        assert not any(isinstance(a, CheckPayment) for a in acts)
    assert stopped(h.on_timer(due_timer(job), DUE_MS))


def test_payment_fault_names_what_is_wrong() -> None:
    ok = ledger()
    assert payment_fault(ok, payer=PAYER, address=ADDRS[0], amount=10_000) is None
    assert "no such transaction" in (payment_fault(None, payer=PAYER, address=ADDRS[0], amount=1) or "")
    assert "not the job's payer" in (payment_fault(ok, payer=OTHER_PAYER, address=ADDRS[0], amount=1) or "")
    assert "less than" in (payment_fault(ok, payer=PAYER, address=ADDRS[0], amount=10_000, credited=1) or "")


# -- the submitter resends a notice until it is acknowledged --------------------------------


def submitter(config: NoticeConfig | None = None) -> Host:
    return Host(S, HostConfig(installments=CFG, notices=config or NoticeConfig()))


def sends_to(actions: list[Any], peer: str) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, Send) and a.peer_id == peer]


def test_a_lost_notice_is_resent_and_the_member_keeps_working() -> None:
    h, job = member(check_payments=False)
    s = submitter()
    key = installment_key(job, A.peer_id, 1)
    first = s.notify_paid(job, A.peer_id, key, TX, CLAIM_MS + 500)
    assert len(sends_to(first, A.peer_id)) == 1 and SetTimer(notice_timer(job), CLAIM_MS + 2_500) in first
    # ... lost.  The timer resends it, and this one arrives.
    again = s.on_timer(notice_timer(job), CLAIM_MS + 2_500)
    (wire,) = sends_to(again, A.peer_id)
    assert Emit("notices:resent") in again and SetTimer(notice_timer(job), CLAIM_MS + 6_500) in again
    got = h.on_bytes(wire, CLAIM_MS + 2_600, via=Via.DIRECT)
    (ack,) = sends_to(got, S.peer_id)
    assert not stopped(h.on_timer(due_timer(job), DUE_MS))
    # The acknowledgement ends the resending.
    done = s.on_bytes(ack, CLAIM_MS + 2_700, via=Via.DIRECT)
    assert Emit("notices:acked") in done and CancelTimer(notice_timer(job)) in done
    assert len(s.notices) == 0 and s.on_timer(notice_timer(job), CLAIM_MS + 60_000) == [
        CancelTimer(notice_timer(job))]


def test_a_notice_sent_once_and_lost_stops_an_honest_member() -> None:
    """What the resending fixes: sent once (``attempts_max = 1``, as before
    #16.3), the lost notice is never repeated and the paid member stops."""
    h, job = member(check_payments=False)
    s = submitter(NoticeConfig(attempts_max=1))
    s.notify_paid(job, A.peer_id, installment_key(job, A.peer_id, 1), TX, CLAIM_MS + 500)  # lost
    gave_up = s.on_timer(notice_timer(job), CLAIM_MS + 2_500)
    assert Emit("notices:given_up") in gave_up and not sends_to(gave_up, A.peer_id)
    assert stopped(h.on_timer(due_timer(job), DUE_MS))


def test_resending_is_bounded() -> None:
    cfg = NoticeConfig(resend_ms_min=1_000, resend_ms_max=4_000, attempts_max=5, pending_max=2)
    n = PaidNotices(cfg)
    now = 0
    sent = len(sends_to(n.send("j", "w", b"\x01" * 32, b"wire", now), "w"))
    assert n.send("j", "w", b"\x01" * 32, b"wire", now) == []  # the same payment: one notice
    pauses = []
    while len(n):
        nxt = min(p.next_ms for p in n.by_job["j"].values())
        pauses.append(nxt - now)
        now = nxt
        sent += len(sends_to(n.on_timer(notice_timer("j"), now), "w"))
    assert sent == 5 and pauses == [1_000, 2_000, 4_000, 4_000, 4_000]  # doubling, capped, then given up
    # At most pending_max notices wait; one more is sent once, untracked.
    n.send("j", "w", b"\x01" * 32, b"a", 0)
    n.send("j", "w", b"\x02" * 32, b"b", 0)
    assert Emit("notices:not_tracked") in n.send("j", "w", b"\x03" * 32, b"c", 0) and len(n) == 2


def test_only_the_member_a_notice_went_to_can_acknowledge_it() -> None:
    n = PaidNotices()
    n.send("j", "w", b"\x01" * 32, b"wire", 0)
    assert n.on_ack("j", b"\x01" * 32, "someone else") == [Emit("notices:ack_unknown")] and len(n) == 1
    assert n.on_ack("j", b"\x02" * 32, "w") == [Emit("notices:ack_unknown")]
    assert Emit("notices:acked") in n.on_ack("j", b"\x01" * 32, "w") and len(n) == 0
