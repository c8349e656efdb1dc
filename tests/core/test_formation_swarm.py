"""Formation among 50 simulated peers, with delays, drops and crashes, over many seeds.

Each seed builds a swarm (``swarm.py``): 50 workers with 1 or 2 GPUs of three
models, two submitters, four jobs of 1 to 4 members submitted in the first
half second, messages delayed 1-30 ms, 10 % of them dropped and 4 workers
crashed during the first two seconds (one of them, in half the seeds, the
view-0 leader of a job, killed as formation starts).  The swarm checks the
safety invariants after every step; at the end every job must have formed
(each has far more live matching peers than it needs), and every live member
of a confirmed cluster must have started it.  The seed is the test id:
``pytest 'tests/core/test_formation_swarm.py::test_swarm[17]'`` replays one.
"""

from __future__ import annotations

import hashlib

import pytest

from p2pgpu.core._formation import leader_rank

try:
    from .swarm import MODELS, Swarm
except ImportError:  # tests/core is not a package: pytest put this directory on sys.path
    from swarm import MODELS, Swarm  # type: ignore[no-redef]

FAULTS_UNTIL_MS = 2_000
RUN_UNTIL_MS = 40_000
SEEDS = 200


def build(seed: int, *, drop_rate: float = 0.1, crashes: int = 4) -> tuple[Swarm, list[str]]:
    # Half the seeds give the cores candidate lists (as the node does: only the
    # best-ranked few volunteer at once), half let every matching peer volunteer.
    swarm = Swarm(seed, workers=50, submitters=2, delay_ms=(1, 30), drop_rate=drop_rate,
                  faults_until_ms=FAULTS_UNTIL_MS, candidates=(seed // 2) % 2 == 1)
    rng = swarm.rng
    # One job per model, one for any model: the demand always fits the live peers.
    wanted: list[tuple[str, ...]] = [(m.split()[-1],) for m in MODELS] + [()]
    jobs = []
    for i, models in enumerate(wanted):
        at = rng.randint(0, 500)
        job = swarm.submit_at(at, swarm.submitter_ids[i % 2], nodes=rng.choice([1, 2]),
                              replicas=rng.choice([1, 2]), models=models)
        jobs.append(job)
        if i == 0 and seed % 2 == 0:  # kill the would-be leader as formation starts
            matching = swarm.live_matching(job)
            first = min(matching, key=lambda p: leader_rank(job, p))
            swarm.crash_at(at + rng.randint(20, 80), first)
            crashes -= 1
    for peer in rng.sample(swarm.workers, crashes):
        swarm.crash_at(rng.randint(0, FAULTS_UNTIL_MS), peer)
    return swarm, jobs


@pytest.mark.parametrize("seed", range(SEEDS))
def test_swarm(seed: int) -> None:
    swarm, jobs = build(seed)
    swarm.run(RUN_UNTIL_MS)  # InvariantViolated is raised at the first bad step
    assert swarm.unformed() == [], f"seed {seed}: jobs with enough live peers did not form"
    assert sorted(swarm.confirmed) == sorted(jobs)
    for job, cert in swarm.confirmed.items():
        for member in cert.members:
            if not swarm.peers[member].crashed:
                assert member in swarm.started.get(job, []) or member in swarm.lost.get(job, []), \
                    f"seed {seed}: live member {member[:12]} of {job[:12]} never started"
    for pid in swarm.workers:
        node = swarm.peers[pid].node
        assert node is not None
        if not swarm.peers[pid].crashed:  # every hold left is a running job of a confirmed cluster
            for job_id, hold in node.ledger.holds.items():
                assert hold.lease_until_ms is None and pid in swarm.confirmed[job_id].members


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1_000, 2_000))
def test_swarm_soak_harsh(seed: int) -> None:
    """``-m slow``: 1 000 more seeds with 30 % loss and 8 crashes for 2 s."""
    swarm, jobs = build(seed, drop_rate=0.3, crashes=8)
    swarm.run(RUN_UNTIL_MS)
    assert swarm.unformed() == [] and sorted(swarm.confirmed) == sorted(jobs)
    for job, cert in swarm.confirmed.items():
        for member in cert.members:
            if not swarm.peers[member].crashed:
                assert member in swarm.started.get(job, []) or member in swarm.lost.get(job, [])


def test_no_faults_every_job_forms_fast() -> None:
    """Without drops or crashes every job is confirmed within a second of virtual time."""
    swarm, jobs = build(1, drop_rate=0.0, crashes=1)
    swarm.run(1_500)
    assert sorted(swarm.confirmed) == sorted(jobs)


def trace_hash(seed: int) -> str:
    swarm, _ = build(seed)
    swarm.run(RUN_UNTIL_MS)
    h = hashlib.sha256()
    for at, peer, what in swarm.trace:
        h.update(f"{at} {peer} {what}\n".encode())
    for job in sorted(swarm.confirmed):
        h.update(swarm.confirmed[job].digest)
    h.update(repr(sorted(swarm.metrics.items())).encode())
    return h.hexdigest()


def test_same_seed_same_run() -> None:
    assert trace_hash(5) == trace_hash(5)
    assert trace_hash(5) != trace_hash(6)
