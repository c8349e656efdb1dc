"""#12.8: a directory path longer than PATH_MAX crashed the watchdog.

The job nests directories past 4096 bytes of path (each ``mkdir`` relative
to the last, so the job itself never needs a long path).  The node's walk
went by path, ``stat`` raised ``ENAMETOOLONG`` inside the watchdog task,
and the run ended in an exception group ("internal error", the worker stuck
in ``running``, the files left on disk).  Now every walk goes through
directory handles and reports problems instead of raising: the run ends
with a reason, under every disk backend, and the job's disk is removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from job_attack_helpers import PY, job, run_lines

from p2pgpu.runtime import SandboxPolicy, check_sandbox

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")

DEEP = PY + """ -c '
import os
for i in range(40):          # 40 * 201 bytes: twice PATH_MAX
    os.mkdir("d" * 200)
    os.chdir("d" * 200)
open("bottom.txt", "w").write("deep")
print("nested", flush=True)
import time; time.sleep(1.5)  # the watchdog walks meanwhile (the dir backend walks names)
' """


@pytest.mark.parametrize("backend", ["loop", "dir"])
async def test_paths_past_path_max_end_the_run_with_a_reason(tmp_path: Path, backend: str) -> None:
    scratch = tmp_path / "scratch"
    res, lines = await run_lines(job(tmp_path, DEEP), SandboxPolicy(disk_backend=backend, scratch_root=scratch,
                                                                      poll_interval_ms=50))
    assert lines == [b"nested"]
    assert res.reason == "output_limit" and "nested deeper" in res.detail, (res.reason, res.detail)
    assert res.outputs == () and list((tmp_path / "work").iterdir()) == []
    assert list(scratch.iterdir()) == [], "the job's disk was left behind"


async def test_a_shallow_job_beside_it_is_unaffected(tmp_path: Path) -> None:
    res, lines = await run_lines(job(tmp_path, "mkdir -p a/b/c && echo hi > a/b/c/f.txt && echo ok"))
    assert res.ok and lines == [b"ok"] and [o.path for o in res.outputs] == ["a/b/c/f.txt"]
