"""From a real sandboxed run to a proof the submitter accepts, and what it is owed."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from p2pgpu.core import (
    Identity,
    ProofFault,
    ProofRejected,
    ProofTerms,
    decode_proof,
    output_digest,
    owed,
    owed_total,
    verify_proof,
)
from p2pgpu.runtime import (
    JobSpec,
    RunCheckpoints,
    SandboxPolicy,
    bwrap_argv,
    check_sandbox,
    proof_for,
    run_job,
)

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")
RNG = random.Random(3)
ME, OTHER = Identity.from_rng(RNG), Identity.from_rng(RNG)
JOB = "0f" * 32
CERT_HASH = b"\x11" * 32
T0 = 1_800_000_000_000


@dataclasses.dataclass(frozen=True)
class Cert:
    members: tuple[str, ...]
    cert_hash: bytes


async def test_a_sandboxed_run_becomes_a_verifiable_proof(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    rc = RunCheckpoints(job_id=JOB, cert_hash=CERT_HASH, peer_id=ME.peer_id, started_at_ms=T0,
                        duration_ms_max=60_000)

    async def on_line(stream: str, line: bytes) -> None:
        rc.feed(stream, line)

    res = await run_job(JobSpec(argv=("/bin/sh", "-c", "echo result > out.txt; echo done"), work_dir=work,
                                time_limit_ms=20_000, memory_bytes_max=256 << 20), on_line=on_line)
    assert res.ok
    # Virtual wall clock: checkpoints every interval for a 25 s run.
    for t in range(T0, T0 + 25_001, 1_000):
        rc.tick(t)
    assert rc.count == 2 and rc.interval_ms == 10_000
    sp = proof_for(res, identity=ME, checkpoints=rc, job_id=JOB, cert_hash=CERT_HASH, gpus=("h200#0",),
                   ended_at_ms=T0 + 25_000, duration_ms_max=60_000)
    p = decode_proof(sp.wire).proof
    assert (p.gpu_ms, p.exit_code, p.end_reason) == (25_000, 0, "exited")
    assert p.output_digest == output_digest([(f.path, f.size, f.sha256) for f in res.outputs], res.stdout_sha256)
    assert p.checkpoints[-1].info == res.output_digest and len(p.checkpoints) == 3

    terms = ProofTerms(job_id=JOB, duration_ms_max=60_000, gpus_per_member=1, price_per_gpu_hour_max=3_600_000)
    vp = verify_proof(sp.wire, cert=Cert((ME.peer_id,), CERT_HASH), terms=terms)
    assert owed_total(owed([vp], terms=terms)) == {ME.peer_id: 25_000}
    # In a two-member cluster the same proof needs the other member's word.
    with pytest.raises(ProofRejected) as err:
        verify_proof(sp.wire, cert=Cert((ME.peer_id, OTHER.peer_id), CERT_HASH), terms=terms)
    assert err.value.fault is ProofFault.NOT_OBSERVED


async def test_gpu_time_is_capped_at_the_duration_limit(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    res = await run_job(JobSpec(argv=("/bin/sh", "-c", "sleep 5"), work_dir=work, time_limit_ms=200,
                                memory_bytes_max=256 << 20))
    assert res.reason == "time_limit"
    rc = RunCheckpoints(job_id=JOB, cert_hash=CERT_HASH, peer_id=ME.peer_id, started_at_ms=T0,
                        duration_ms_max=200)
    sp = proof_for(res, identity=ME, checkpoints=rc, job_id=JOB, cert_hash=CERT_HASH, gpus=("a", "b"),
                   ended_at_ms=T0 + 1_000, duration_ms_max=200)
    assert sp.proof.gpu_ms == 400 and sp.proof.exit_code == 137 and sp.proof.end_reason == "time_limit"
    terms = ProofTerms(job_id=JOB, duration_ms_max=200, gpus_per_member=2, price_per_gpu_hour_max=1,
                       tolerance_ms=1_000)
    assert verify_proof(sp.wire, cert=Cert((ME.peer_id,), CERT_HASH), terms=terms).proof.gpu_ms == 400


def test_bwrap_argv_shape(tmp_path: Path) -> None:
    spec = JobSpec(argv=("prog", "--flag"), work_dir=tmp_path, time_limit_ms=1, memory_bytes_max=1)
    argv = bwrap_argv(spec, SandboxPolicy(extra_ro_paths=("/opt",)), disk_top=tmp_path, status_fd=7)
    assert argv[0].startswith("/"), "absolute: the job's environment has no PATH"
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "--share-net" not in argv
    assert argv[argv.index("--json-status-fd") + 1] == "7"
    assert ["--ro-bind", "/opt", "/opt"] == argv[argv.index("/opt") - 1:argv.index("/opt") + 2]
    assert argv[-3:] == ["--", "prog", "--flag"]
