"""The bubblewrap sandbox, with real bubblewrap: what a job can and cannot do."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

import pytest
import trio

from p2pgpu.core._proof import output_digest
from p2pgpu.home import Home
from p2pgpu.runtime import (
    ClusterEnv,
    JobRejected,
    JobSpec,
    SandboxPolicy,
    SandboxResult,
    bwrap_argv,
    check_sandbox,
    job_env,
    run_job,
    sandbox_memory_backend,
)
from p2pgpu.runtime._limits import memory_backend

PY = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")


def spec(tmp_path: Path, script: str, **kw: object) -> JobSpec:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    base: dict[str, object] = {"time_limit_ms": 20_000, "memory_bytes_max": 512 << 20}
    base.update(kw)
    return JobSpec(argv=("/bin/sh", "-c", script), work_dir=work, **base)  # type: ignore[arg-type]


async def run(s: JobSpec, policy: SandboxPolicy | None = None) -> tuple[SandboxResult, list[tuple[str, bytes]]]:
    lines: list[tuple[str, bytes]] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append((stream, line))

    return await run_job(s, policy, on_line=on_line), lines


def stdout(lines: list[tuple[str, bytes]]) -> bytes:
    return b"\n".join(line for stream, line in lines if stream == "stdout")


def fake_dev(tmp_path: Path, names: list[str]) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for n in names:
        (dev / n).write_text("")
    return dev


def marker_processes(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


# --- what the job cannot see ---------------------------------------------------

async def test_job_cannot_read_node_key_or_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home(tmp_path / "nodehome")
    home.init()
    key = home.identity_path
    secret = key.read_bytes()
    (home.path / "notes.txt").write_text("operator-private-notes")
    other_job = home.path / "jobs" / "other" / "work"
    other_job.mkdir(parents=True)
    (other_job / "result.txt").write_text("another-jobs-result")
    monkeypatch.setenv("P2PGPU_NODE_SECRET", "do-not-leak")
    script = f"""
        cat {key} && echo READ1
        cat /proc/1/root{key} && echo READ2
        cat /proc/self/root{key} && echo READ3
        cat {home.path}/notes.txt && echo READ4
        ls /root /home {tmp_path} && echo READ5
        cat /etc/shadow && echo READ6
        cat {other_job}/result.txt && echo READ8
        for p in /proc/[0-9]*; do cat $p/root{key} 2>/dev/null && echo READ7; done
        env
        ls -a / /etc
    """
    res, lines = await run(spec(tmp_path, script))
    out = stdout(lines)
    assert res.reason == "exited"
    for n in range(1, 9):
        assert f"READ{n}".encode() not in out
    assert secret.hex().encode() not in out and b"operator-private-notes" not in out
    assert b"another-jobs-result" not in out
    assert b"do-not-leak" not in out and b"P2PGPU_NODE_SECRET" not in out
    assert b"HOME=/work" in out
    assert b"shadow" not in out
    assert [f.path for f in res.outputs] == []


async def test_job_runs_as_nobody_without_capabilities(tmp_path: Path) -> None:
    res, lines = await run(spec(tmp_path, "id -u; grep CapEff /proc/self/status; hostname"))
    out = stdout(lines)
    assert out.splitlines()[0] == b"65534"
    assert b"CapEff:\t0000000000000000" in out
    assert res.ok


# --- network -----------------------------------------------------------------------

CONNECT = f"""{PY} -c '
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).sendall(b"x")
    print("CONNECTED")
except OSError as e:
    print("FAILED", e)
' """


def listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    return srv


async def test_no_network_unless_asked(tmp_path: Path) -> None:
    srv = listener()
    try:
        port = srv.getsockname()[1]
        res, lines = await run(spec(tmp_path, CONNECT + str(port)), SandboxPolicy(allow_network=True))
        assert res.ok
        assert b"FAILED" in stdout(lines) and b"CONNECTED" not in stdout(lines)
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


async def test_network_when_asked_and_allowed(tmp_path: Path) -> None:
    # The control for the test above: the same probe does connect when allowed.
    srv = listener()
    try:
        port = srv.getsockname()[1]
        res, lines = await run(spec(tmp_path, CONNECT + str(port), network=True), SandboxPolicy(allow_network=True))
        assert res.ok and b"CONNECTED" in stdout(lines)
        conn, _ = srv.accept()
        conn.close()
    finally:
        srv.close()


async def test_network_asked_but_not_allowed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobRejected, match="network"):
        await run_job(spec(tmp_path, "true", network=True), SandboxPolicy(allow_network=False))


# --- limits --------------------------------------------------------------------------

async def test_time_limit_kills_the_whole_sandbox(tmp_path: Path) -> None:
    marker = "987.654321"
    res, lines = await run(spec(tmp_path, f"(sleep {marker} &) ; echo started; sleep {marker}", time_limit_ms=500))
    assert res.reason == "time_limit" and res.exit_code == 137 and not res.ok
    assert stdout(lines) == b"started"
    assert marker_processes(marker) == []


async def test_memory_limit_kernel_backend(tmp_path: Path) -> None:
    backend = sandbox_memory_backend()
    if backend == "rlimit":
        pytest.skip("no writable cgroup here")
    script = f"{PY} -c 'b = bytearray(400 << 20); print(\"ALLOCATED\")'"
    res, lines = await run(spec(tmp_path, script, memory_bytes_max=96 << 20))
    assert res.reason == "memory_limit" and res.memory_backend == backend
    assert b"ALLOCATED" not in stdout(lines)


async def test_memory_limit_rlimit_backend(tmp_path: Path) -> None:
    script = f"{PY} -c 'b = bytearray(400 << 20); print(\"ALLOCATED\")'"
    res, lines = await run(spec(tmp_path, script, memory_bytes_max=96 << 20), SandboxPolicy(memory_backend="rlimit"))
    assert res.reason == "memory_limit" and res.memory_backend == "rlimit"
    assert b"MemoryError" in res.stderr_tail and b"ALLOCATED" not in stdout(lines)


async def test_memory_limit_rss_watchdog_for_gpu_jobs(tmp_path: Path) -> None:
    # GPU jobs get no address-space limit (CUDA maps huge ranges): the RSS
    # watchdog must catch them.  The allocation is touched, then kept.
    dev = fake_dev(tmp_path, ["nvidia0", "nvidiactl"])
    script = f"{PY} -c 'b = bytearray(300 << 20); print(\"ALLOCATED\", flush=True); import time; time.sleep(60)'"
    res, _lines = await run(spec(tmp_path, script, memory_bytes_max=96 << 20, gpus=(0,)),
                           SandboxPolicy(memory_backend="rlimit", dev_dir=dev, poll_interval_ms=50))
    assert res.reason == "memory_limit" and "resident" in res.detail


def test_unavailable_backends_are_reported() -> None:
    assert memory_backend("rlimit") == "rlimit"
    with pytest.raises(ValueError):
        memory_backend("lots")
    assert check_sandbox(SandboxPolicy(bwrap="/nonexistent/bwrap")) is not None


# --- GPUs --------------------------------------------------------------------------------

async def test_only_assigned_gpus_are_visible(tmp_path: Path) -> None:
    dev = fake_dev(tmp_path, ["nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm"])
    s = spec(tmp_path, "ls /dev; echo CVD=$CUDA_VISIBLE_DEVICES", gpus=(1, 3))
    policy = SandboxPolicy(dev_dir=dev)
    argv = bwrap_argv(s, policy, disk_top=tmp_path)
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--dev-bind"]
    assert binds == [str(dev / n) for n in ("nvidia1", "nvidia3", "nvidiactl", "nvidia-uvm")]
    env = job_env(s)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["P2PGPU_GPUS"] == "1,3"
    _res, lines = await run(s, policy)
    names = set(stdout(lines).split(b"\n"))
    assert {b"nvidia1", b"nvidia3", b"nvidiactl", b"nvidia-uvm", b"CVD=0,1"} <= names
    assert not {b"nvidia0", b"nvidia2"} & names


async def test_no_gpus_no_nvidia_nodes(tmp_path: Path) -> None:
    dev = fake_dev(tmp_path, ["nvidia0", "nvidiactl", "nvidia-uvm"])
    s = spec(tmp_path, "ls /dev; echo CVD=[$CUDA_VISIBLE_DEVICES]")
    assert "--dev-bind" not in bwrap_argv(s, SandboxPolicy(dev_dir=dev), disk_top=tmp_path)
    _res, lines = await run(s, SandboxPolicy(dev_dir=dev))
    assert b"nvidia" not in stdout(lines).replace(b"CVD=[]", b"") and b"CVD=[]" in stdout(lines)


def test_missing_gpu_is_refused(tmp_path: Path) -> None:
    dev = fake_dev(tmp_path, ["nvidia0"])
    with pytest.raises(JobRejected, match="GPU 2"):
        bwrap_argv(spec(tmp_path, "true", gpus=(2,)), SandboxPolicy(dev_dir=dev), disk_top=tmp_path)


# --- environment ------------------------------------------------------------------------------

async def test_manifest_env_and_cluster_env(tmp_path: Path) -> None:
    cluster = ClusterEnv(rank=1, world_size=2, members=("peerA", "peerB"), rendezvous_host="10.0.0.5",
                         rendezvous_port=29500)
    s = spec(tmp_path, "env | sort", env={"FOO": "bar baz"}, cluster=cluster, job_id="abc")
    _res, lines = await run(s)
    got = dict(line.decode().split("=", 1) for line in stdout(lines).split(b"\n"))
    assert got["FOO"] == "bar baz" and got["P2PGPU_JOB_ID"] == "abc"
    assert got["P2PGPU_RANK"] == got["RANK"] == "1" and got["P2PGPU_WORLD_SIZE"] == got["WORLD_SIZE"] == "2"
    assert got["P2PGPU_MEMBERS"] == "peerA,peerB" and got["P2PGPU_RENDEZVOUS"] == "10.0.0.5:29500"
    assert got["MASTER_ADDR"] == "10.0.0.5" and got["MASTER_PORT"] == "29500"
    assert set(got) <= {"FOO", "PATH", "HOME", "TMPDIR", "PWD", "SHLVL", "_", "CUDA_VISIBLE_DEVICES",
                        "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"} | {
        k for k in got if k.startswith("P2PGPU_")}


@pytest.mark.parametrize("name", ["HOME", "CUDA_VISIBLE_DEVICES", "P2PGPU_RANK", "1BAD", "A=B"])
def test_reserved_or_bad_env_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(JobRejected):
        job_env(spec(tmp_path, "true", env={name: "x"}))


# --- logs, exit status, outputs -------------------------------------------------------------

async def test_logs_stream_line_by_line(tmp_path: Path) -> None:
    script = "echo one; echo two >&2; printf 'x%.0s' $(seq 1 50); echo; printf 'tail-without-newline'"
    res, lines = await run(spec(tmp_path, script, log_line_bytes_max=20))
    assert ("stderr", b"two") in lines
    out = [line for stream, line in lines if stream == "stdout"]
    assert out == [b"one", b"x" * 20, b"x" * 20, b"x" * 10, b"tail-without-newline"]
    assert res.stdout_bytes == 4 + 51 + 20 and not res.logs_truncated


async def test_logs_beyond_the_budget_are_hashed_not_forwarded(tmp_path: Path) -> None:
    res, lines = await run(spec(tmp_path, "seq 1 1000", log_bytes_max=100))
    assert res.logs_truncated and sum(len(line) for _, line in lines) <= 100
    expected = "".join(f"{i}\n" for i in range(1, 1001)).encode()
    assert res.stdout_sha256 == hashlib.sha256(expected).digest()


async def test_exit_status_passes_through(tmp_path: Path) -> None:
    res, _ = await run(spec(tmp_path, "exit 3"))
    assert res.reason == "exited" and res.exit_code == 3 and not res.ok
    res, _ = await run(spec(tmp_path, "kill -SEGV $$"))
    assert res.reason == "exited" and res.exit_code == 128 + 11


async def test_outputs_are_collected_with_hashes(tmp_path: Path) -> None:
    outside = tmp_path / "host-secret.txt"
    outside.write_text("host secret")
    script = f"""mkdir -p sub/deeper; echo hello > a.txt; head -c 100000 /dev/zero > sub/deeper/zeros.bin
        chmod 6755 a.txt; ln -s {outside} link-to-host; mkfifo fifo; echo done"""
    res, _lines = await run(spec(tmp_path, script))
    assert res.ok
    got = {f.path: f for f in res.outputs}
    assert sorted(got) == ["a.txt", "sub/deeper/zeros.bin"]
    assert got["a.txt"].sha256 == hashlib.sha256(b"hello\n").digest() and got["a.txt"].size == 6
    assert (tmp_path / "work" / "a.txt").stat().st_mode & 0o7111 == 0, "set-uid/set-gid/exec bits cleared"
    assert got["sub/deeper/zeros.bin"].sha256 == hashlib.sha256(bytes(100000)).digest()
    assert res.stdout_sha256 == hashlib.sha256(b"done\n").digest()
    assert res.output_digest == output_digest([(f.path, f.size, f.sha256) for f in res.outputs],
                                              res.stdout_sha256)


async def test_inputs_are_read_only(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "data.txt").write_text("input data")
    _res, lines = await run(spec(tmp_path, "cat in/data.txt; echo x > in/new && echo WROTE", inputs_dir=inputs))
    assert b"input data" in stdout(lines) and b"WROTE" not in stdout(lines)
    assert not (inputs / "new").exists()


async def test_inputs_are_hard_links_bound_read_only_and_their_path_is_not_shown(tmp_path: Path) -> None:
    # Inputs staged from the content store may be gigabytes: linked, not copied,
    # and the job reads no path of the node's home in its mount table.
    home_inputs = tmp_path / "node-home" / "jobs" / "j1" / "in"
    home_inputs.mkdir(parents=True)
    big = home_inputs / "big.bin"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB (sparse): a copy would take a while and the disk's room
    (home_inputs / "sub").mkdir()
    (home_inputs / "sub" / "x.txt").write_text("x")
    s = spec(tmp_path, "stat -c %h:%s in/big.bin; cat in/sub/x.txt; echo; grep /work/in /proc/self/mountinfo",
             inputs_dir=home_inputs)
    res, lines = await run(s)
    out = stdout(lines).decode()
    assert res.ok, res.stderr_tail
    assert out.splitlines()[0] == f"2:{3 << 30}"  # a second link to the same inode, same size
    assert "x" in out.splitlines()[1]
    assert "/work/in" in out and str(tmp_path / "node-home") not in out
    assert big.stat().st_nlink == 1  # the staging link is gone with the job


@pytest.mark.parametrize("script,limits", [
    ("for i in 1 2 3 4; do echo $i > f$i; done", {"output_files_max": 3}),
    ("head -c 5000 /dev/zero > big", {"output_file_bytes_max": 4000}),
    ("head -c 3000 /dev/zero > a; head -c 3000 /dev/zero > b", {"output_bytes_max": 5000}),
])
async def test_output_limits(tmp_path: Path, script: str, limits: dict[str, int]) -> None:
    res, _ = await run(spec(tmp_path, script, **limits))
    assert res.reason == "output_limit" and res.outputs == ()


async def test_output_limit_while_running(tmp_path: Path) -> None:
    # A job that keeps writing is stopped by the watchdog, not after it fills the disk.
    res, _ = await run(spec(tmp_path, "while true; do head -c 100000 /dev/zero >> big; done",
                            output_bytes_max=2_000_000, output_file_bytes_max=2_000_000))
    assert res.reason == "output_limit" and "work dir" in res.detail


async def test_sandbox_error_is_not_a_job_exit(tmp_path: Path) -> None:
    res, _ = await run(spec(tmp_path, "true"), SandboxPolicy(extra_ro_paths=(str(tmp_path / "missing"),)))
    assert res.reason == "sandbox_error" and res.exit_code is None and "missing" in res.detail


async def test_missing_inputs_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobRejected, match="inputs dir"):
        await run(spec(tmp_path, "true", inputs_dir=tmp_path / "missing"))


# --- cancellation ------------------------------------------------------------------------------

async def test_cancellation_kills_the_sandbox(tmp_path: Path) -> None:
    marker = "876.54321"
    started = trio.Event()

    async def on_line(stream: str, line: bytes) -> None:
        if line == b"started":
            started.set()

    s = spec(tmp_path, f"(sleep {marker} &); echo started; sleep {marker}")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_job(s, on_line=on_line))
            await started.wait()
            assert marker_processes(marker) != []
            scope.cancel()
    assert scope.cancelled_caught
    assert marker_processes(marker) == []


def test_python_is_where_the_tests_expect() -> None:
    assert Path(PY).exists(), sys.executable


def test_cgroup2_bases_fall_back_to_beside_our_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A unit test of the choice only (a directory stands in for cgroupfs; the
    # real thing was checked on the H200 machine, docs/sandbox.md).
    from p2pgpu.runtime import _limits

    own = tmp_path / "process_api" / "node"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    monkeypatch.setattr(_limits, "cgroup_base", lambda version: own)
    monkeypatch.setattr(_limits, "_mountinfo", lambda: [(str(tmp_path), "cgroup2", "rw")])
    assert _limits.cgroup_bases("cgroup2") == [own, own.parent]
    (own / "cgroup.controllers").write_text("cpu pids\n")
    assert _limits.cgroup_bases("cgroup2") == [own]


async def test_process_count_is_bounded(tmp_path: Path) -> None:
    from p2pgpu.runtime._limits import cgroup_base

    if cgroup_base("cgroup1", "pids") is None and sandbox_memory_backend() != "cgroup2":
        pytest.skip("no pids controller here")
    script = f"""{PY} -c '
import os, time
n = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    except OSError:
        break
print("FORKED", n, flush=True)
'"""
    res, lines = await run(spec(tmp_path, script, pids_max=50))
    forked = int(stdout(lines).split()[-1])
    assert res.ok and forked < 50


def test_stale_empty_job_cgroups_are_swept() -> None:
    from p2pgpu.runtime._limits import cgroup_bases, sweep_stale_cgroups

    bases = cgroup_bases(sandbox_memory_backend())
    if not bases:
        pytest.skip("no job cgroups here")
    stale, fresh = bases[0] / "p2pgpu-stale0test", bases[0] / "p2pgpu-fresh0test"
    stale.mkdir()
    fresh.mkdir()
    try:
        os.utime(stale, (0, 0))
        removed = sweep_stale_cgroups()
        assert stale in removed and fresh not in removed
        assert not stale.exists() and fresh.exists()
    finally:
        for d in (stale, fresh):
            if d.exists():
                d.rmdir()
