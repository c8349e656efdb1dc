"""Found while fixing #12: the manifest's environment reached processes outside the sandbox.

The node started ``sh`` (the cgroup wrapper) and ``timeout`` on the host with
the job's environment, so a manifest with ``LD_PRELOAD`` pointing at a
library on the host (a previous job's output, at a path the job could read
in ``/proc/self/mountinfo``) ran the submitter's code as the node's user,
outside every namespace.  Now the processes the node starts outside the
sandbox get a fixed environment, and bubblewrap itself gives the job its
variables (``--clearenv``/``--setenv``, passed through ``--args``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from job_attack_helpers import job, run_lines

from p2pgpu.runtime import check_sandbox, run_job

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")

PRELOAD_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void pwn(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/pwned-%d", MARK_DIR, (int)getpid());
    FILE *f = fopen(path, "w");
    if (f) { fputs("ran outside the sandbox", f); fclose(f); }
}
"""


def evil_library(tmp_path: Path, mark_dir: Path) -> Path:
    src, lib = tmp_path / "evil.c", tmp_path / "evil.so"
    src.write_text(PRELOAD_C)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARK_DIR="{mark_dir}"', "-o", str(lib), str(src)], check=True)
    return lib


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the hostile library")
async def test_ld_preload_from_the_manifest_never_runs_on_the_host(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    lib = evil_library(tmp_path, marks)
    res, lines = await run_lines(job(tmp_path, "echo LD_PRELOAD=$LD_PRELOAD", env={"LD_PRELOAD": str(lib)}))
    assert res.reason == "exited"
    assert lines == [f"LD_PRELOAD={lib}".encode()]  # the job still gets its variable
    assert list(marks.iterdir()) == [], "the manifest's LD_PRELOAD ran code outside the sandbox"


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


async def test_no_host_process_carries_the_jobs_environment(tmp_path: Path) -> None:
    mark = "p2pgpu-host-env-probe-8175"
    own_pidns = os.readlink("/proc/self/ns/pid")
    seen: list[str] = []
    started = trio.Event()

    async def on_line(stream: str, line: bytes) -> None:
        if line == b"started":
            started.set()

    async def look() -> None:
        await started.wait()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                ns = os.readlink(f"/proc/{entry}/ns/pid")
            except OSError:
                continue
            if ns == own_pidns and mark.encode() in _environ(int(entry)):
                seen.append(Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode())

    spec = job(tmp_path, "echo started; sleep 2; echo $JOB_MARK", env={"JOB_MARK": mark})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(look)
        res = await run_job(spec, on_line=on_line)
    assert res.ok
    assert seen == [], f"host processes with the job's environment: {seen}"
