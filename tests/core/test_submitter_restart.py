"""A submitter that restarts while its job forms (#13).

A submitter killed after a volunteer had accepted its job (a GPU held under
a lease) but before it confirmed it came back knowing nothing of that job:
the volunteer kept resending its certificate to a submitter that answered
none of them, kept the GPU until the job's formation deadline, and, holding
a lease for this submitter already (``holds_per_submitter_max``), offered
for none of its new jobs: the restarted submitter's first job "found no
volunteer" (``tests/content/test_input_pins.py`` failed 3 runs in 7).

Now the driver hands the host the jobs it stored as forming
(``Host.resume_submitted``): each forms again within its original deadline,
or fails at once past it, its CANCEL freeing the volunteers.
"""

from __future__ import annotations

from random import Random

import pytest

from p2pgpu.core import Identity, LocalProtocolError
from p2pgpu.core._actions import Failed, Publish
from p2pgpu.core._formation import FormationConfig
from p2pgpu.core._formation_messages import Cancel, decode_message
from p2pgpu.core._formation_states import SubmitterState
from p2pgpu.core._host import Host, HostConfig

try:
    from .swarm import Swarm, make_manifest
except ImportError:  # tests/core is not a package: pytest put this directory on sys.path
    from swarm import Swarm, make_manifest  # type: ignore[no-redef]


def crash_while_leased(seed: int) -> tuple[Swarm, str, str, str]:
    """One worker with two GPUs; the submitter crashes the moment the worker
    holds a GPU for its first job under a lease (accepted, not confirmed)."""
    s = Swarm(seed, workers=1, submitters=1, gpus=(2,), candidates=True)
    sub, worker = s.submitter_ids[0], s.workers[0]
    first = s.submit_at(0, sub)
    node = s.peers[worker].node
    assert node is not None
    while s.step():
        hold = node.ledger.holds.get(first)
        if hold is not None and hold.lease_until_ms is not None:
            break
    else:
        raise AssertionError("the worker never held a lease for the first job")
    assert first not in s.confirmed
    s.peers[sub].crashed = True
    return s, sub, worker, first


def test_a_restarted_submitter_resumes_its_forming_job_and_its_next_job_forms() -> None:
    for seed in range(5):
        s, sub, _worker, first = crash_while_leased(seed)
        t = s.now_ms
        s.restart_at(t + 3_000, sub)
        second = s.submit_at(t + 3_500, sub)
        s.run(t + 13_500)
        assert first in s.confirmed, (seed, s.failed.get(first))  # the held GPU's job went on
        assert second in s.confirmed, (seed, s.failed.get(second))
        assert s.confirmed_at[second] - (t + 3_500) < 5_000, seed  # not after the first job's deadline
        assert s.metrics.get("formation.resumed") == 1


def test_without_resuming_the_next_job_waits_for_the_forgotten_ones_lease() -> None:
    """What happened before: the volunteer holds its GPU for the forgotten
    job and offers for nothing else of this submitter."""
    s, sub, worker, first = crash_while_leased(0)
    t = s.now_ms
    s.restart_at(t + 3_000, sub, resume=False)
    second = s.submit_at(t + 3_500, sub)
    s.run(t + 13_500)
    assert first not in s.confirmed and second not in s.confirmed
    node = s.peers[worker].node
    assert node is not None and first in node.ledger.holds


def test_a_submitter_killed_as_it_confirmed_answers_with_its_confirm_after_the_restart() -> None:
    """Killed the moment it stored its confirmation, before the CONFIRM left:
    the volunteer holds the GPU and resends its certificate.  The restarted
    submitter knows the job again from its stored collection
    (``Submitter.restore_confirmed``) and answers with the same CONFIRM, so
    the job runs and the next job forms (before: neither, until the first
    job's formation deadline)."""
    for seed in range(5):
        s = Swarm(seed, workers=1, submitters=1, gpus=(2,), candidates=True)
        sub, worker = s.submitter_ids[0], s.workers[0]
        s.die_at_confirm.add(sub)
        first = s.submit_at(0, sub)
        s.run(5_000)
        assert s.peers[sub].crashed and first in s.confirmed and first not in s.started, seed
        s.restart_at(5_000, sub)
        second = s.submit_at(5_500, sub)
        s.run(15_500)
        # The CONFIRM reached it after the restart (the swarm checks it started the confirmed cluster,
        # and that no job is confirmed twice).
        assert s.started.get(first) == [worker], seed
        assert second in s.confirmed and s.confirmed_at[second] - 5_500 < 5_000, (seed, s.failed.get(second))


SUB = Identity(bytes([3]) * 32)
T0 = 1_000_000


def test_a_job_resumed_past_its_deadline_fails_and_cancels() -> None:
    cfg = FormationConfig(formation_timeout_ms=10_000)
    sm = make_manifest(SUB, Random(1), now_ms=T0)
    h = Host(SUB, HostConfig(formation=cfg))
    acts = h.resume_submitted(sm, T0, T0 + 10_000)
    (failed,) = [a for a in acts if isinstance(a, Failed)]
    assert "restarted" in failed.reason and "ran out" in failed.reason
    cancels = [decode_message(a.data) for a in acts if isinstance(a, Publish)]
    assert any(isinstance(m, Cancel) and m.job_id == sm.job_id for m in cancels)
    progress = h.submitter.progress(sm.job_id)
    assert progress is not None and progress.state is SubmitterState.FAILED


def test_a_resumed_job_keeps_its_original_deadline_and_is_resumed_once() -> None:
    cfg = FormationConfig(formation_timeout_ms=10_000)
    sm = make_manifest(SUB, Random(2), now_ms=T0)
    h = Host(SUB, HostConfig(formation=cfg))
    acts = h.resume_submitted(sm, T0, T0 + 4_000)
    assert any(isinstance(a, Publish) and a.data == sm.wire for a in acts)
    progress = h.submitter.progress(sm.job_id)
    assert progress is not None and progress.deadline_ms == T0 + 10_000 and progress.submitted_at_ms == T0
    assert h.resume_submitted(sm, T0, T0 + 4_500) == []  # already taken up: nothing twice


def test_a_stranger_manifest_is_never_resumed() -> None:
    """Only a job this node signed: a stored stranger's manifest is refused
    (the driver's bug, raised, never a job formed in another's name)."""
    other = make_manifest(Identity(bytes([4]) * 32), Random(3), now_ms=T0)
    h = Host(SUB)
    with pytest.raises(LocalProtocolError):
        h.resume_submitted(other, T0, T0 + 1_000)
    assert h.submitter.progress(other.job_id) is None


def test_a_stored_certificate_of_another_job_is_never_restored_as_confirmed() -> None:
    """The driver's store handing back a certificate that is not the job's
    (a bug, or a tampered file) is refused, never signed as a CONFIRM."""
    mine, other = (make_manifest(SUB, Random(n), now_ms=T0) for n in (5, 6))
    s = Swarm(0, workers=1, submitters=1, gpus=(2,))
    w = s.workers[0]
    from p2pgpu.core._formation_messages import Accept, Certificate, Proposal

    ident = s.peers[w].identity
    prop = Proposal.sign(ident, job_id=other.job_id, view=0, round=0, members=(w,), gpus_per_member=1)
    cert = Certificate(proposal=prop, accepts=(Accept.sign(ident, proposal=prop, lease_until_ms=T0 + 60_000,
                                                           price_per_gpu_hour=1000, payout_address=""),))
    h = Host(SUB)
    with pytest.raises(LocalProtocolError):
        h.submitter.restore_confirmed(mine, cert, T0)
    assert h.submitter.progress(mine.job_id) is None
