#!/usr/bin/env python3
"""Check the sandbox against a real NVIDIA driver, once, on a GPU machine.

The sandbox tests run everywhere with stand-in device files; this script runs
real jobs through ``run_job`` on a machine with a GPU and prints what they
saw: with GPU 0 assigned, the job must see ``/dev/nvidia0`` and CUDA must
work; with no GPU assigned, it must see no NVIDIA device and CUDA must find
none.  It also reports which memory backend the machine gives, checks the
memory limit on a GPU job, and that the network stays closed.

Usage, from the repository root:  python3 tests/runtime/device_sandbox_check.py [--out DIR]
It prints one line per check and ``OK`` at the end (exit 1 if a check failed).
Not a pytest module: it needs a GPU, which CI does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from p2pgpu.runtime import JobSpec, SandboxPolicy, check_sandbox, run_job, sandbox_memory_backend

CUDA_PROBE = (
    "import torch\n"
    "n = torch.cuda.device_count()\n"
    "print('CUDA_COUNT', n, flush=True)\n"
    "if n:\n"
    "    x = torch.ones(1024, device='cuda')\n"
    "    print('CUDA_SUM', int(x.sum().item()), torch.cuda.get_device_name(0), flush=True)\n"
)


def lines_of(result: dict[str, object]) -> list[str]:
    v = result["lines"]
    return [str(x) for x in v] if isinstance(v, list) else []


def sh(cmd: str) -> str:
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    return (p.stdout + p.stderr).strip()


async def job(policy: SandboxPolicy, script: str, gpus: tuple[int, ...], env: dict[str, str],
              memory: int = 16 << 30) -> dict[str, object]:
    lines: list[str] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append(f"{stream}: {line.decode(errors='replace')}")

    with tempfile.TemporaryDirectory() as tmp:
        res = await run_job(JobSpec(argv=("/bin/sh", "-c", script), work_dir=Path(tmp), time_limit_ms=120_000,
                                    memory_bytes_max=memory, gpus=gpus, env=env), policy, on_line=on_line)
    return {"reason": res.reason, "exit_code": res.exit_code, "detail": res.detail, "lines": lines[-40:],
            "memory_backend": res.memory_backend, "wall_ms": res.wall_ms}


async def main(out: Path | None) -> int:
    report: dict[str, object] = {}
    fails = 0

    def check(name: str, ok: bool, info: object = "") -> None:
        nonlocal fails
        fails += 0 if ok else 1
        print(f"{'PASS' if ok else 'FAIL'} {name} {info}", flush=True)

    report["host"] = {"uname": sh("uname -r"), "nvidia_smi": sh("nvidia-smi -L"), "dev": sh("ls /dev | grep nvidia"),
                      "cgroups": sh("grep cgroup /proc/self/mountinfo"), "self_cgroup": sh("cat /proc/self/cgroup"),
                      "bwrap": sh("command -v bwrap; bwrap --version")}
    print(json.dumps(report["host"], indent=1), flush=True)
    python = shutil.which("python3") or "/usr/bin/python3"
    extra = tuple(p for p in ("/opt", "/usr/local/nvidia") if os.path.isdir(p) and not os.path.islink(p))
    policy = SandboxPolicy(extra_ro_paths=extra)
    reason = check_sandbox(policy)
    check("check_sandbox", reason is None, reason or "")
    if reason is not None:
        return 1
    backend = sandbox_memory_backend(policy)
    print("memory backend:", backend, "| python:", python, "| extra ro:", extra, flush=True)
    env = {"PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin"}
    probe = f"ls /dev; echo CVD=$CUDA_VISIBLE_DEVICES; nvidia-smi -L; {python} -c \"{CUDA_PROBE}\""
    have_gpu = os.path.exists("/dev/nvidia0")

    no_gpu = await job(policy, probe, (), env)
    report["no_gpu"] = no_gpu
    text = "\n".join(lines_of(no_gpu))
    check("no GPU assigned: no nvidia device nodes", "nvidia0" not in text and "nvidiactl" not in text)
    check("no GPU assigned: CUDA sees none", "CUDA_COUNT 0" in text or "CUDA_COUNT" not in text, text[-300:])

    if have_gpu:
        one = await job(policy, probe, (0,), env)
        report["gpu0"] = one
        text = "\n".join(lines_of(one))
        check("GPU 0 assigned: /dev/nvidia0 visible", "stdout: nvidia0" in text)
        check("GPU 0 assigned: CUDA_VISIBLE_DEVICES=0", "CVD=0" in text)
        check("GPU 0 assigned: CUDA works in the sandbox", "CUDA_COUNT 1" in text and "CUDA_SUM 1024" in text,
              text[-600:])
        mem = await job(policy, f"{python} -c \"{CUDA_PROBE}b = bytearray(3 << 30)\nprint('ALLOCATED')\"",
                        (0,), env, memory=2 << 30)
        report["gpu_memory_limit"] = mem
        check("GPU job over its memory limit is stopped with memory_limit", mem["reason"] == "memory_limit",
              mem)
    else:
        check("a GPU on this machine", False, "no /dev/nvidia0")

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    net = await job(policy, f"{python} -c \"import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), "
                            f"timeout=2)\n print('CONNECTED')\nexcept OSError as e:\n print('FAILED', e)\"", (), env)
    srv.close()
    report["network"] = net
    check("no network", any("FAILED" in x for x in lines_of(net)), lines_of(net))

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sandbox_check.json").write_text(json.dumps(report, indent=1))
    print("OK" if fails == 0 else f"{fails} FAILED", flush=True)
    return 0 if fails == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    sys.exit(trio.run(main, ap.parse_args().out))
