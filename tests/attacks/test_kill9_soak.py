"""#12 (held): ``kill -9`` of any process at random points of a devnet-like run.

A real ledger server (``p2pgpu ledger serve`` with a state file), a
submitter and workers (``node run``, each with its own ledger wallet), and
several jobs submitted together.  While they form, run and pay, a seeded
schedule kills a process with SIGKILL (the submitter, a worker or the
ledger), waits a moment and restarts it (same home, same ledger port and
state).  Then, when every job has ended:

- every job ends in a state both sides agree on: for each member the proof
  the submitter holds is the one the worker signed, and the worker expects
  exactly what the submitter owes it (``earnings`` against ``payouts``);
- every proof owed is paid exactly once: each worker's balance on the
  ledger grew by exactly the sum of the payouts the submitter recorded as
  paid to it (a payment made twice, or lost, would show), each payout row
  names a transaction the ledger knows, and no proof is owed twice;
- nothing is left: no sandbox record, no job process, and (after the nodes
  stop) no process that names the run's directory.

What it guards: the outbox's exactly-once payment across payer and ledger
deaths (``store/_outbox.py``, ``solana/_payer.py``), collection recovery on
the submitter (``node/_collect.py``), a worker's recovery of an interrupted
job (``runtime/_leftovers.py``, ``core/_outcome.py``) and the keeper that
kills a dead node's sandbox.  The default run is short (two kills); the
soak (more seeds, more jobs, more kills) is ``-m slow``.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ledger_attack_helpers import (
    Ledger,
    check_paid_as_recorded,
    free_port_pair,
    fund_wallets,
    node_rows,
    start_ledger,
)
from procs_helpers import kill_all, naming, wait_gone

from p2pgpu.localnet import LocalNet, LocalNetError, NodeProc
from p2pgpu.node import ControlError, DaemonUnavailable
from p2pgpu.runtime import check_sandbox
from p2pgpu.store import earnings, payouts

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
#: The submitter (node 0) asks more than the jobs' ceiling: it only submits and pays.
DEAR = {0: "price_per_gpu_hour = 360000000"}
ENDED = ("succeeded", "failed", "cancelled")
#: The soak also kills the submitter while a job forms (it used to forget
#: that job: ``test_a_job_acknowledged_while_forming_survives_kill_9_of_its_submitter``
#: below, fixed in node/_jobs.py by storing a job when it is submitted).
SUBMITTER_KILLS_WHILE_FORMING = True
#: Job processes are found by this number in their command line.
MARKER = "2.7182"


#: 2-node jobs among the soak's (a pair whose member died before co-signing
#: left the survivor unpaid before #13: ``test_the_survivor_of_a_pair_is_paid_when_its_co_member_is_killed``).
TWO_NODE_JOBS = True


def job_manifest(k: int, nodes: int) -> str:
    return f"""
name = "soak-{k}"
[requirements]
nodes = {nodes}
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "echo started; sleep {MARKER}{k}; echo done"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
[verification]
on_member_loss = "continue"
"""


@dataclass
class Run:
    root: Path
    net: LocalNet
    ledger: Ledger
    ledger_state: Path
    ledger_log: Path
    rng: random.Random
    kills: list[str] = field(default_factory=list)
    waiting: str = ""

    @property
    def submitter(self) -> NodeProc:
        return self.net.nodes[0]

    def kill_and_restart(self, victim: str, jobs: list[str]) -> None:
        """SIGKILL ``victim`` ("submitter", "worker", "ledger"), wait a moment, restart it.
        While the submitter has a job still forming, a worker dies in its place
        unless ``SUBMITTER_KILLS_WHILE_FORMING`` (see there)."""
        if victim == "submitter" and not SUBMITTER_KILLS_WHILE_FORMING and any(
                (doc := call(self.submitter, "job.status", {"job_id": j})) is None or doc["state"] == "forming"
                for j in jobs):
            self.kills.append("(submitter spared: a job is forming)")
            victim = "worker"
        if victim == "ledger":
            self.ledger.proc.send_signal(signal.SIGKILL)
            self.ledger.proc.wait()
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.ledger = start_ledger(state=self.ledger_state, port=self.ledger.port, log=self.ledger_log)
        else:
            i = 0 if victim == "submitter" else self.rng.randrange(1, len(self.net.nodes))
            self.net.terminate(i, sig=signal.SIGKILL)
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.net.restart(i)
            victim = f"worker {i}" if i else victim
        self.kills.append(victim)


def call(node: NodeProc, method: str, params: dict[str, Any] | None = None) -> Any:
    try:
        return node.call(method, params, timeout_s=10.0)
    except (ControlError, DaemonUnavailable):
        return None  # not known there (yet), or restarting


def job_processes() -> list[int]:
    return [p for p in naming(f"sleep {MARKER}") if p]


def all_settled(run: Run, jobs: list[str]) -> dict[str, dict[str, Any]] | None:
    """Every job ended on the submitter and every payout it owes paid (what
    is still open is kept in ``run.waiting``, for the failure message)."""
    docs = {}
    for job in jobs:
        doc = call(run.submitter, "job.status", {"job_id": job})
        if doc is None or doc["state"] not in ENDED:
            run.waiting = f"job {job[:12]}: " + ("not known" if doc is None else
                                                 str({k: doc.get(k) for k in ("state", "reason", "proofs")}))
            return None
        docs[job] = doc
    owed = node_rows(run.submitter, payouts)
    if unpaid := [p for p in owed if p["status"] != "paid"]:
        run.waiting = f"unpaid: {unpaid}"
        return None
    return docs


def soak(tmp_path: Path, *, seed: int, workers: int, jobs_n: int, kills_n: int, settle_s: float) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")  # the schedule replays from it
    state, log = tmp_path / "ledger.state", tmp_path / "ledger.log"
    ledger = start_ledger(state=state, port=free_port_pair(), log=log)
    net = LocalNet(tmp_path / "net", workers + 1, gpu_mix=ONE_GPU, node_config=DEAR,
                   config_extra=f'ledger = "{ledger.url}"')
    run = Run(root=tmp_path, net=net, ledger=ledger, ledger_state=state, ledger_log=log, rng=rng)
    try:
        net.start()
        start_balance = fund_wallets(ledger.url, net.nodes[0], net.nodes[1:])
        net.wait_until(lambda: call(run.submitter, "status")["adverts_known"] >= workers + 1, timeout_s=60,
                       what="the submitter to see every worker")
        sizes = [rng.choice([1, 1, 2]) if TWO_NODE_JOBS else 1 for _ in range(jobs_n)]
        jobs = [run.submitter.call("job.submit", {"manifest": job_manifest(k, n)})["job_id"]
                for k, n in enumerate(sizes)]
        # The kills: at random points while the jobs form, run and are paid.
        victims = ["submitter", "worker", "ledger"]
        for _ in range(kills_n):
            time.sleep(rng.uniform(0.5, 4.0))
            run.kill_and_restart(rng.choice(victims), jobs)
        docs = net.wait_until(lambda: all_settled(run, jobs), timeout_s=settle_s, interval_s=0.5,
                              what="every job to end and be paid")
        check_agreement(run, jobs, docs)
        check_paid_as_recorded(run.ledger.url, node_rows(run.submitter, payouts), start_balance)
        # No sandbox left running, and none recorded as running.
        assert wait_gone(job_processes(), 15) == [], "a job's sandbox outlived its job"
        for node in net.nodes:
            assert list(node.home.path.glob("jobs/*/sandbox.json")) == [], node.index
    except (AssertionError, LocalNetError) as exc:
        raise AssertionError(f"seed {seed}, kills {run.kills}: {exc} (still open: {run.waiting})") from exc
    finally:
        net.stop()
        run.ledger.stop()
        left = wait_gone(naming(str(tmp_path)), 15)
        kill_all(left, str(tmp_path))
        assert left == [], f"processes of the run outlived it: {left}"


def check_agreement(run: Run, jobs: list[str], docs: dict[str, dict[str, Any]]) -> None:
    by_peer = {n.peer_id: n for n in run.net.nodes}
    owed_rows = node_rows(run.submitter, payouts)
    assert len({p["proof_hash"] for p in owed_rows}) == len(owed_rows), "a proof owed twice"
    for job in jobs:
        doc = docs[job]
        members = doc["cluster"]["members"]
        proofs = {p["worker"]: p for p in doc["proofs"]}
        for member in members:
            worker = by_peer[member]
            mine = call(worker, "job.status", {"job_id": job})
            assert mine is not None, f"worker {worker.index} does not know job {job[:12]}"
            assert mine.get("member_state") in ("succeeded", "failed", "interrupted"), \
                (worker.index, {k: mine.get(k) for k in ("state", "member_state", "reason", "timings", "roles")},
                 {k: doc.get(k) for k in ("state", "reason", "proofs", "timings")})
            theirs = proofs.get(member)
            expected = [e for e in node_rows(worker, earnings) if e["job_id"] == job]
            owed = [p for p in owed_rows if p["job_id"] == job and p["worker"] == member]
            if theirs is None or theirs["status"] == "missing":
                assert expected == [], f"worker {worker.index} expects pay for job {job[:12]} that is never owed"
                continue
            assert theirs["proof_hash"] == mine["proof_hash"], (worker.index, theirs, mine)
            assert [(e["proof_hash"], e["amount"]) for e in expected] == \
                [(p["proof_hash"], p["amount"]) for p in owed], (worker.index, expected, owed, theirs)


def test_kill_9_of_any_process_pays_every_proof_exactly_once(tmp_path: Path) -> None:
    soak(tmp_path, seed=12, workers=2, jobs_n=3, kills_n=2, settle_s=180)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_soak(tmp_path: Path, seed: int) -> None:
    soak(tmp_path, seed=seed, workers=3, jobs_n=8, kills_n=8, settle_s=300)


UNSERVABLE = """
name = "forming"
[requirements]
nodes = 1
gpus_per_node = 1
models = ["nothing-matches"]
[runtime]
command = ["true"]
duration_s_max = 30
[payment]
price_per_gpu_hour_max = 36000000
"""


def test_a_job_acknowledged_while_forming_survives_kill_9_of_its_submitter(tmp_path: Path) -> None:
    # Guards: a job the control API acknowledged (a job id returned) is known
    # after any restart, in a state that says what happened to it.
    net = LocalNet(tmp_path, 1, gpu_mix=ONE_GPU)
    try:
        net.start()
        job = net.nodes[0].call("job.submit", {"manifest": UNSERVABLE})["job_id"]
        assert net.nodes[0].call("job.status", {"job_id": job})["state"] == "forming"
        net.terminate(0, sig=signal.SIGKILL)
        node = net.restart(0)
        doc = call(node, "job.status", {"job_id": job})
        assert doc is not None, "the job the submitter acknowledged is unknown after kill -9"
        assert doc["state"] in ("forming", "interrupted", "failed"), doc
    finally:
        net.stop()


PAIR_UNEVEN = """
name = "uneven"
[requirements]
nodes = 2
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "if [ \\"$P2PGPU_RANK\\" = 0 ]; then sleep 1; else sleep 8; fi; echo done"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
"""


def form_pair(net: LocalNet, manifest: str) -> tuple[str, list[NodeProc]]:
    """Start ``net`` (a dear submitter and two workers), submit a 2-node job;
    its id and its members in rank order, once it formed."""
    net.start()
    net.wait_until(lambda: call(net.nodes[0], "status")["adverts_known"] >= 3, timeout_s=60,
                   what="the submitter to see both workers")
    job: str = net.nodes[0].call("job.submit", {"manifest": manifest})["job_id"]
    by_peer = {n.peer_id: n for n in net.nodes}
    doc = net.wait_until(lambda: (d := call(net.nodes[0], "job.status", {"job_id": job})) and
                         d["cluster"]["members"] and d, timeout_s=60, what="the job to form")
    return job, [by_peer[m] for m in doc["cluster"]["members"]]


@pytest.mark.slow  # about 25 s; the default run's soak kills members at random points too
def test_a_member_killed_after_its_proof_keeps_what_it_did(tmp_path: Path) -> None:
    # Guards: a member's end (its state and proof) is stored as soon as its
    # proof is signed, not only once it stops watching the members still
    # running; found by the soak (seed 3): a worker killed in that window came
    # back "interrupted", member state "running", no proof, while the
    # submitter owed and paid the proof it had sent: the two sides disagreed.
    net = LocalNet(tmp_path, 3, gpu_mix=ONE_GPU, node_config=DEAR)
    try:
        job, (first, second) = form_pair(net, PAIR_UNEVEN)
        # first is rank 0: done after 1 s; rank 1 runs 8 s more
        done = net.wait_until(lambda: (d := call(first, "job.status", {"job_id": job})) and
                              d.get("member_state") == "succeeded" and d.get("proof_hash") and d, timeout_s=60,
                              what="rank 0 to finish and prove")
        assert call(second, "job.status", {"job_id": job})["state"] == "running"
        net.terminate(first.index, sig=signal.SIGKILL)
        first = net.restart(first.index)
        mine = call(first, "job.status", {"job_id": job})
        assert (mine["state"], mine.get("member_state"), mine.get("proof_hash")) == \
            ("succeeded", "succeeded", done["proof_hash"]), mine
        theirs = net.wait_until(lambda: (d := call(net.nodes[0], "job.status", {"job_id": job}))
                                and d["state"] in ENDED and d, timeout_s=60, what="the job to end")
        proof = next(p for p in theirs["proofs"] if p["worker"] == first.peer_id)
        assert (proof["status"], proof["proof_hash"]) == ("owed", done["proof_hash"]), proof
    finally:
        net.stop()


PAIR_CONTINUE = """
name = "pair"
[requirements]
nodes = 2
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "sleep 4; echo done"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
[verification]
on_member_loss = "continue"
"""


@pytest.mark.slow  # about two minutes: the submitter waits out the dead member
@pytest.mark.timeout(400)
def test_the_survivor_of_a_pair_is_paid_when_its_co_member_is_killed(tmp_path: Path) -> None:
    # Guards: an honest member that served its whole job under
    # on_member_loss = "continue" is owed what it served (bounded by the
    # submitter's window), and worker and submitter agree on it.  Found by the
    # soak (seeds 2 and 3) before #13's refactor: the survivor's proof was
    # rejected (not_observed: 0 usable co-signatures < 1) and never owed,
    # while the survivor expected its pay; main as merged here pays it.
    net = LocalNet(tmp_path, 3, gpu_mix=ONE_GPU, node_config=DEAR)
    try:
        job, (survivor, victim) = form_pair(net, PAIR_CONTINUE)
        net.wait_until(lambda: (d := call(victim, "job.status", {"job_id": job})) and d["state"] == "running",
                       timeout_s=30, what="the victim to run")
        net.terminate(victim.index, sig=signal.SIGKILL)
        theirs = net.wait_until(lambda: (d := call(net.nodes[0], "job.status", {"job_id": job}))
                                and d["state"] in ENDED and d, timeout_s=90, what="the job to end")
        proof = next(p for p in theirs["proofs"] if p["worker"] == survivor.peer_id)
        expected = [(e["proof_hash"], e["amount"]) for e in node_rows(survivor, earnings) if e["job_id"] == job]
        assert proof["status"] == "owed" and proof["amount"] > 0, proof
        assert expected == [(p["proof_hash"], p["amount"]) for p in node_rows(net.nodes[0], payouts)
                            if p["job_id"] == job and p["worker"] == survivor.peer_id], (expected, proof)
    finally:
        net.stop()
