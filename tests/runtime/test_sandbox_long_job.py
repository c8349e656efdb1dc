"""Regression: a job longer than 10 s runs to its end.

trio starts processes from a worker thread that exits after 10 s idle, and
bubblewrap's ``--die-with-parent`` follows the thread that forked it: every
job was SIGKILLed 10 s in, reported as ``sandbox_error``.  The sandbox now
runs bwrap under ``timeout``, which lives as long as the job.
"""

from __future__ import annotations

from pathlib import Path

from p2pgpu.runtime import JobSpec, run_job


async def test_a_job_longer_than_ten_seconds_is_not_killed(tmp_path: Path) -> None:
    lines: list[bytes] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append(line)

    spec = JobSpec(argv=("sh", "-c", "sleep 11; echo done"), work_dir=tmp_path, time_limit_ms=60_000,
                   memory_bytes_max=512 << 20)
    result = await run_job(spec, on_line=on_line)
    assert (result.reason, result.exit_code) == ("exited", 0), result
    assert lines == [b"done"]
    assert result.wall_ms >= 11_000
