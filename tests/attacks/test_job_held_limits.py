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


WRITE_EVERYWHERE = r"""
import os, stat, sys
mark, allowed = sys.argv[1], ("/work", "/tmp", "/dev/shm")
made, opened, seen = [], [], 0
def walk(top, skip=()):
    global seen
    for root, dirs, files in os.walk(top):
        if root in skip:
            dirs[:] = []
            continue
        seen += 1
        if seen > 60000:
            return
        try:
            fd = os.open(os.path.join(root, mark), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            made.append(root)
        except OSError:
            pass
        for f in files:
            p = os.path.join(root, f)
            try:
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                os.close(fd)
                opened.append(p)
            except OSError:
                pass
walk("/", skip=("/proc", "/sys"))
# The kernel's files in /proc (not the job's own processes' directories).
pid_dirs = tuple(f"/proc/{p}" for p in os.listdir("/proc") if p.isdigit() or p in ("self", "thread-self"))
walk("/proc", skip=pid_dirs)
print("SEEN", seen)
for d in made:
    print("MADE", d)
for p in opened:
    print("OPENED", p)
"""


async def test_a_job_that_writes_everywhere_writes_only_its_own_places(tmp_path: Path) -> None:
    # Guards: the read-only system binds, the read-only ``/work/in``, the
    # kernel's settings in ``/proc`` read-only (``_sandbox.PROC_READ_ONLY``:
    # 765 sysctl files of the host were writable when the node runs as root),
    # and that nothing of the host is bound writable.  The job tries to create
    # a file in every directory it can reach and to open every regular file
    # for writing (opening writes nothing).
    mark = "p2pgpu-was-here-5150"
    host_places = [tmp_path, Path("/tmp"), Path("/dev/shm"), Path.home()]
    res, lines = await run_lines(job(tmp_path, f'{PY} -c "$PROBE" {mark}', time_limit_ms=120_000,
                                             env={"PROBE": WRITE_EVERYWHERE}))
    assert res.ok, (res.reason, res.detail, res.stderr_tail)
    assert lines and lines[0].startswith(b"SEEN") and int(lines[0].split()[1]) > 100, lines[:3]
    made = [ln.split(b" ", 1)[1].decode() for ln in lines if ln.startswith(b"MADE ")]
    opened = [ln.split(b" ", 1)[1].decode() for ln in lines if ln.startswith(b"OPENED ")]
    own = ("/work", "/tmp", "/dev/shm")

    def is_own(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in own) and not path.startswith("/work/in")

    assert made and all(is_own(d) for d in made), [d for d in made if not is_own(d)]
    assert "/work" in made and "/tmp" in made  # the probe works: it did write where it may
    assert all(is_own(p) for p in opened), [p for p in opened if not is_own(p)]
    # Nothing named by the mark appeared on the host outside the job's disk.
    for place in host_places:
        stray = [p for p in place.glob(mark)] + [p for p in place.glob(f"*/{mark}")]
        stray = [p for p in stray if (tmp_path / "work") not in p.parents]
        assert stray == [], stray
