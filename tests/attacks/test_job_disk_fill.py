"""#12.7: the output size limit was bypassed by writing to a file deleted while open.

The watchdog walked the job's file names, and a deleted-but-open file has
none: 5.5 GB were written against a 4 GiB limit.  Now everything a job can
write is a filesystem whose size the kernel enforces: its own disk at
``/work`` (``_disk``), tmpfs with ``--size`` at ``/tmp`` and ``/dev/shm``,
and a read-only ``/`` and ``/dev``.  Real bubblewrap, real mounts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from job_attack_helpers import PY, job, run_lines

from p2pgpu.runtime import SandboxPolicy, check_sandbox
from p2pgpu.runtime._disk import disk_overhead_bytes
from p2pgpu.runtime._sandbox import sandbox_disk_backend

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")

#: Writes 1 MiB at a time to ``path`` after deleting it, printing the total;
#: prints ENOSPC when the disk refuses, WROTE-ALL if nothing stopped it.
FILL = PY + """ -c '
import os, sys, time
path, total = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
os.unlink(path)
n, block = 0, bytes(1 << 20)
try:
    while n < total:
        n += os.write(fd, block)
        print(n, flush=True)
    print("WROTE-ALL", flush=True)
except OSError as e:
    print("ENOSPC" if e.errno == 28 else e, flush=True)
time.sleep(3)
' """


def written(lines: list[bytes]) -> int:
    return max((int(x) for x in lines if x.isdigit()), default=0)


async def test_a_deleted_open_file_cannot_pass_the_output_limit(tmp_path: Path) -> None:
    if sandbox_disk_backend()[0] == "dir":
        pytest.skip(f"no kernel-enforced disk here: {sandbox_disk_backend()[1]}")
    limit = 16 << 20
    res, lines = await run_lines(job(tmp_path, FILL + f"big {4 * limit}", output_bytes_max=limit,
                                     output_file_bytes_max=limit))
    assert b"WROTE-ALL" not in lines, "the job wrote four times its limit"
    assert written(lines) <= limit + disk_overhead_bytes + (1 << 20)
    assert res.reason == "output_limit", (res.reason, res.detail)


async def test_an_honest_job_under_the_limit_keeps_its_outputs(tmp_path: Path) -> None:
    res, lines = await run_lines(job(tmp_path, "head -c 3000000 /dev/zero > data.bin; echo ok",
                                     output_bytes_max=16 << 20))
    assert res.ok and lines == [b"ok"]
    assert [(o.path, o.size) for o in res.outputs] == [("data.bin", 3_000_000)]
    assert (tmp_path / "work" / "data.bin").stat().st_size == 3_000_000  # sealed into the node's work dir


@pytest.mark.parametrize("where", ["/dev/shm", "/tmp"])
async def test_memory_backed_dirs_are_size_limited(tmp_path: Path, where: str) -> None:
    policy = SandboxPolicy(shm_bytes_max=8 << 20, tmp_bytes_max=8 << 20)
    _res, lines = await run_lines(job(tmp_path, FILL + f"{where}/big {64 << 20}"), policy)
    assert b"WROTE-ALL" not in lines and b"ENOSPC" in lines
    assert written(lines) <= 8 << 20


async def test_root_and_dev_are_read_only(tmp_path: Path) -> None:
    script = "for d in / /etc /dev /usr; do touch $d/x 2>/dev/null && echo WROTE $d; done; echo done"
    res, lines = await run_lines(job(tmp_path, script))
    assert res.ok and lines == [b"done"]
