"""Shared by the job attack tests: run one hostile job in the real sandbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from p2pgpu.runtime import JobSpec, SandboxPolicy, SandboxResult, run_job

PY = "/usr/bin/python3"


def job(tmp_path: Path, script: str, **kw: object) -> JobSpec:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    base: dict[str, object] = {"time_limit_ms": 60_000, "memory_bytes_max": 1 << 30}
    base.update(kw)
    return JobSpec(argv=("/bin/sh", "-c", script), work_dir=work, **base)  # type: ignore[arg-type]


async def run_lines(spec: JobSpec, policy: SandboxPolicy | None = None, *,
                    now_ms: Callable[[], int] | None = None) -> tuple[SandboxResult, list[bytes]]:
    """Run ``spec``; its stdout lines."""
    lines: list[bytes] = []

    async def on_line(stream: str, line: bytes) -> None:
        if stream == "stdout":
            lines.append(line)

    return await run_job(spec, policy, on_line=on_line, now_ms=now_ms), lines
