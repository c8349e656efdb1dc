#!/usr/bin/env python3
"""On a machine with NVIDIA GPUs: an OCI job sees exactly its GPUs, through NVML.

Not a test (CI has no GPU): run it once on a GPU machine, from the repository
root, with the project's virtual environment:

    .venv/bin/python scripts/device_oci_gpu_check.py

It builds a small image root the way the node does (a busybox layer plus the
host's core glibc libraries, unpacked by ``content/_unpack.py``; no registry
or network needed), then runs jobs in it through ``run_job`` with the
``oci`` bubblewrap command line (``runtime/_oci_root.py``):

1. GPU 0 assigned: ``nvidia-smi -L`` (NVML, bound read-only from the host the
   NVIDIA container toolkit way: CDI spec, else ``ldconfig``) lists exactly
   one GPU, whose UUID is host GPU 0's; the job sees the image's
   ``/etc/os-release``;
2. no GPU assigned: no ``/dev/nvidia*`` and no driver files in the job;
3. with two or more GPUs, GPU 1 assigned: exactly host GPU 1's UUID.

The image needs only a shell: busybox when the host has it, else the host's
own ``/bin/sh`` (dash: glibc only); the job commands use shell builtins and
the ``nvidia-smi`` bound from the host, so a bare GPU machine runs it as is.

``--no-gpu``: on a machine without GPUs, run only what needs none (the image
root, its ``/etc/os-release``, no NVIDIA device or driver file in a job):
how ``tests/content/test_device_script.py`` keeps this script working
(``--host-sh``: the host's shell even where busybox is installed).

Prints one line per check and ``OK`` at the end; exits 1 if a check failed.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio

from p2pgpu.content._unpack import unpack_layer
from p2pgpu.runtime import JobSpec, SandboxPolicy, check_sandbox, run_job
from p2pgpu.runtime._oci_root import driver_files

OS_RELEASE = "ID=p2pgpu-gpu-check\nPRETTY_NAME=\"p2pgpu OCI GPU check image\"\n"
GLIBC = ("ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1")


def build_root(tmp: Path, *, host_sh: bool = False) -> Path:
    busybox = None if host_sh else shutil.which("busybox")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), mode
            tar.addfile(ti, io.BytesIO(data))

        add("etc/os-release", OS_RELEASE.encode())
        if not busybox:  # the host's shell (dash links glibc only, added below) and its loader's path
            add("bin/sh", Path("/bin/sh").resolve().read_bytes(), 0o755)
            add("lib64/ld-linux-x86-64.so.2", Path("/lib64/ld-linux-x86-64.so.2").resolve().read_bytes(), 0o755)
        if busybox:
            add("bin/busybox", Path(busybox).read_bytes(), 0o755)
            for applet in ("sh", "ls", "cat", "echo"):
                ti = tarfile.TarInfo(f"bin/{applet}")
                ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(ti)
        for lib in GLIBC:
            for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64"):
                p = Path(d) / lib
                if p.exists():
                    add(f"{d.lstrip('/')}/{lib}", p.resolve().read_bytes(), 0o755)
                    break
    buf.seek(0)
    root = tmp / "rootfs"
    root.mkdir()
    unpack_layer(buf, root)
    for d in ("proc", "dev", "tmp", "work"):
        (root / d).mkdir(exist_ok=True)
    return root


async def run(root: Path, tmp: Path, gpus: tuple[int, ...], cmd: str) -> tuple[int | None, str]:
    work = tmp / f"work-{'-'.join(map(str, gpus)) or 'none'}-{abs(hash(cmd))}"
    work.mkdir()
    lines: list[str] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append(line.decode(errors="replace"))

    spec = JobSpec(argv=("/bin/sh", "-c", cmd), work_dir=work, time_limit_ms=60_000, memory_bytes_max=2 << 30,
                   gpus=gpus, root_dir=root, image_env={"PATH": "/usr/bin:/bin"})
    res = await run_job(spec, SandboxPolicy(), on_line=on_line)
    return res.exit_code, "\n".join(lines)


def host_uuids() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False).stdout
    return [x.strip() for x in out.splitlines() if x.strip()]


#: Shell builtins only: the image may have no cat or ls.
CAT = 'while IFS= read -r l; do echo "$l"; done < /etc/os-release'
NO_GPU = (f"{CAT}; for f in /dev/* /usr/bin/nvidia-smi /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1; do "
          '[ -e "$f" ] && echo "$f"; done; command -v nvidia-smi || echo "no nvidia-smi"')


async def main() -> int:
    no_gpu = "--no-gpu" in sys.argv[1:]
    failed = 0

    def check(ok: bool, what: str, detail: str = "") -> None:
        nonlocal failed
        print(("ok   " if ok else "FAIL ") + what + (f"  [{detail[:300]}]" if detail and not ok else ""))
        failed += 0 if ok else 1

    reason = check_sandbox()
    if reason:
        print(f"FAIL the sandbox cannot run here: {reason}")
        return 1
    uuids = host_uuids()
    print(f"host GPUs: {len(uuids)}; driver files bound into GPU jobs: {len(driver_files())}")
    if not uuids and not no_gpu:
        print("FAIL no NVIDIA GPU visible on the host (nvidia-smi)")
        return 1
    with tempfile.TemporaryDirectory(prefix="p2pgpu-oci-gpu-") as t:
        tmp = Path(t)
        root = build_root(tmp, host_sh="--host-sh" in sys.argv[1:])
        code, out = await run(root, tmp, (), NO_GPU)
        check(code == 0 and "ID=p2pgpu-gpu-check" in out, "the job sees the image's /etc/os-release", out)
        check(not [ln for ln in out.splitlines() if ln.startswith("/") and "nvidia" in ln]
              and "no nvidia-smi" in out,
              "no GPU: no NVIDIA device or driver files in the job", out)
        if no_gpu:
            print("OK" if not failed else f"{failed} check(s) failed")
            return 1 if failed else 0
        code, out = await run(root, tmp, (0,), f"{CAT}; nvidia-smi -L; "
                              "nvidia-smi --query-gpu=uuid --format=csv,noheader")
        check(code == 0, "GPU 0: nvidia-smi runs in the image", out)
        check("ID=p2pgpu-gpu-check" in out, "GPU 0: the job sees the image's /etc/os-release", out)
        seen = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("GPU-")]
        check(seen == [uuids[0]], f"GPU 0: NVML lists exactly host GPU 0 ({uuids[0]})", out)
        if len(uuids) > 1:
            code, out = await run(root, tmp, (1,), "nvidia-smi --query-gpu=uuid --format=csv,noheader")
            seen = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("GPU-")]
            check(seen == [uuids[1]], f"GPU 1: NVML lists exactly host GPU 1 ({uuids[1]})", out)
    print("OK" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
