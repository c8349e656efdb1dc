"""#12 (held): job code against the real sandbox's limits: fork bombs, memory
exhaustion, daemonised children, and writing everywhere.

Each job runs in real bubblewrap through ``run_job``, exactly as a worker
runs it (``job_attack_helpers``).  What each test guards is named in it; if
that protection were removed, the job would get further and the test's
assertion on what it reports, or on what is left on the host, would fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from job_attack_helpers import PY, job, run_lines
from procs_helpers import kill_all, naming

from p2pgpu.runtime import SandboxPolicy, check_sandbox, sandbox_memory_backend
from p2pgpu.runtime._limits import cgroup_base

pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")

no_pids_controller = cgroup_base("cgroup1", "pids") is None and sandbox_memory_backend() != "cgroup2"


@pytest.mark.skipif(no_pids_controller, reason="no pids cgroup here: a fork bomb would be bounded by nothing")
async def test_a_fork_bomb_is_bounded_and_leaves_no_process(tmp_path: Path) -> None:
    # Guards: the pids cgroup (``pids_max``) and the time limit, which kills the
    # whole pid namespace.  Without the pids limit the bomb counts past it.
    marker = "31337.4242"
    script = f"""{PY} -c '
import os, sys, time
n = 0
while n < 5000:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        try:
            os.fork()  # and each child forks again
        except OSError:
            pass
        time.sleep({marker})
        os._exit(0)
    n += 1
print("FORKED", n, flush=True)
time.sleep({marker})
'"""
    try:
        res, lines = await run_lines(job(tmp_path, script, pids_max=64, time_limit_ms=4_000))
        assert lines and lines[0].startswith(b"FORKED"), (res, lines)
        forked = int(lines[0].split()[1])
        assert forked < 64, f"{forked} processes forked against a limit of 64"
        assert res.reason == "time_limit"
        assert naming(marker) == [], "processes of the fork bomb outlived the job"
    finally:
        kill_all([], marker)


@pytest.mark.parametrize("backend", ["auto", "rlimit"])
async def test_memory_exhaustion_by_many_processes_is_stopped(tmp_path: Path, backend: str) -> None:
    # Guards: the memory cgroup (auto), or RLIMIT_AS plus the watchdog on the
    # job's total RSS (rlimit).  Each of 6 processes stays under the job's
    # limit; together they are far over it.  Without a limit on the sum they
    # would all print ALLOCATED and the job would exit cleanly.
    if backend == "auto" and sandbox_memory_backend() == "rlimit":
        pytest.skip("no writable memory cgroup here (the rlimit case covers it)")
    marker = "2718.2818"
    script = f"""{PY} -c '
import os, time
kids = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        b = bytearray(48 << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        print("ALLOCATED", flush=True)
        time.sleep(3)
        os._exit(0)
    kids.append(pid)
ok = sum(os.waitpid(pid, 0)[1] == 0 for pid in kids)
print("SURVIVED", ok, flush=True)
' {marker}"""
    try:
        res, lines = await run_lines(job(tmp_path, script, memory_bytes_max=128 << 20, time_limit_ms=30_000),
                                     SandboxPolicy(memory_backend=backend))
        assert res.reason == "memory_limit", (res.reason, res.detail, lines)
        assert b"SURVIVED 6" not in lines, lines  # not every process lived with its memory
        assert lines.count(b"ALLOCATED") < 6, lines
        assert naming(marker) == []
    finally:
        kill_all([], marker)


async def test_daemonised_children_do_not_outlive_the_job(tmp_path: Path) -> None:
    # Guards: the sandbox's own pid namespace (its init's death kills every
    # process in it) and the job's cgroup.  A double fork with setsid, a
    # ``setsid -f`` and a ``nohup`` child each try to live on after the job's
    # main process exits 0; they keep writing to a file on the job's disk.
    marker = "1618.0339"
    script = f"""
        {PY} -c '
import os, time, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)
        while True:
            open("/work/alive", "a").write("x")
            time.sleep(0.2)
    os._exit(0)
' {marker}
        setsid -f sleep {marker}
        nohup sleep {marker} >/dev/null 2>&1 &
        echo detached
    """
    try:
        res, lines = await run_lines(job(tmp_path, script, time_limit_ms=30_000))
        assert res.ok and lines == [b"detached"], (res, lines)
        assert naming(marker) == [], "a daemonised child of the job outlived it"
    finally:
        kill_all([], marker)
