"""``scripts/device_oci_gpu_check.py`` (run once on a lent GPU machine, issue
15) keeps working: on this machine, without GPUs, its ``--no-gpu`` part
builds the image root (with busybox, and with only the host's shell, as on a
bare GPU machine), runs jobs in it through the real sandbox, and finds the
image's ``/etc/os-release`` and no NVIDIA device or driver file; without
``--no-gpu`` it says there is no GPU and fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pgpu.runtime import check_sandbox

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device_oci_gpu_check.py"


@pytest.mark.parametrize("shell", ["busybox", "--host-sh"])
def test_the_device_script_runs_its_no_gpu_part(shell: str) -> None:
    if check_sandbox():
        pytest.skip(f"no sandbox here: {check_sandbox()}")
    args = [sys.executable, str(SCRIPT), "--no-gpu"] + ([shell] if shell.startswith("--") else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   the job sees the image's /etc/os-release" in r.stdout
    assert "ok   no GPU: no NVIDIA device or driver files in the job" in r.stdout and r.stdout.endswith("OK\n")


def test_without_a_gpu_the_full_check_says_so() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    if "host GPUs: 0" not in r.stdout:
        pytest.skip("this machine has GPUs: run the script itself")
    assert r.returncode == 1 and "FAIL no NVIDIA GPU visible on the host" in r.stdout
