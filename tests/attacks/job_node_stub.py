"""A stand-in node for the attack tests: runs one job through ``run_job``
and nothing else, so that a test can ``kill -9`` it mid-job.

``python job_node_stub.py STATE_PATH WORK_DIR SCRATCH_ROOT SECONDS``: the job
prints ``started`` and sleeps SECONDS (a number the test greps for in
``/proc`` to find the job's processes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from p2pgpu.runtime import JobSpec, SandboxPolicy, run_job


async def main(state: Path, work: Path, scratch_root: Path, seconds: str) -> None:
    spec = JobSpec(argv=("/bin/sh", "-c", f"echo started; sleep {seconds}"), work_dir=work,
                   time_limit_ms=600_000, memory_bytes_max=256 << 20, state_path=state)
    await run_job(spec, SandboxPolicy(scratch_root=scratch_root))


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
