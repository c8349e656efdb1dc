"""The bubblewrap command line of a job that runs in an OCI image's root.

Same confinement as a ``process`` job (``_sandbox.py``: new namespaces, uid
65534, no capabilities, no network unless asked and allowed, a fresh
``/proc`` and ``/dev``, a private ``/tmp``, ``/work`` and read-only
``/work/in``), but the root is the image's unpacked file system instead of
the host's ``/usr``: the job sees the image's ``/etc/os-release``, its
libraries, its Python.  The image root is bound, everything else is mounted
on it, and the root is then remounted read-only (``--remount-ro /``), so the
job cannot change the cached image that later jobs start from.

GPUs, the NVIDIA container toolkit way: the assigned GPUs' device nodes
(``_sandbox.gpu_device_paths``), and the host's driver libraries and tools
bound read-only at their host paths.  Which files: from a CDI spec
(``/etc/cdi/*.json|yaml``, ``/var/run/cdi/*``; what ``nvidia-ctk cdi
generate`` writes) when one exists, else the NVIDIA libraries ``ldconfig -p``
lists and ``nvidia-smi``.  A job with no GPU gets none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._sandbox import JobSpec, SandboxPolicy

CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
#: Driver files bound into a GPU job at most (a CDI spec lists ~40).
driver_files_max = 256
_LIB_PREFIXES = ("libcuda.", "libnvidia-", "libnvcuvid.", "libcudadebugger.", "libnvoptix.")
_TOOLS = ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-debugdump", "/usr/bin/nvidia-persistenced")


def _load_spec(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError:
            return None
    else:
        try:
            import yaml
        except ImportError:
            return None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
    return doc if isinstance(doc, dict) else None


def cdi_mounts(dirs: tuple[Path, ...] = CDI_DIRS) -> list[str] | None:
    """Host paths of the driver files an NVIDIA CDI spec mounts into
    containers (``containerEdits.mounts[].hostPath``), or None without a spec."""
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if not name.endswith((".json", ".yaml", ".yml")):
                continue
            doc = _load_spec(d / name)
            if doc is None or "nvidia.com" not in str(doc.get("kind", "")):
                continue
            edits = [doc.get("containerEdits") or {}] + [
                dev.get("containerEdits") or {} for dev in doc.get("devices") or [] if isinstance(dev, dict)]
            paths = []
            for e in edits:
                for mnt in e.get("mounts") or [] if isinstance(e, dict) else []:
                    hp = mnt.get("hostPath") if isinstance(mnt, dict) else None
                    if isinstance(hp, str) and hp.startswith("/") and hp not in paths:
                        paths.append(hp)
            return paths[:driver_files_max]
    return None


@lru_cache(maxsize=1)
def driver_files() -> tuple[str, ...]:
    """The host's NVIDIA driver files to bind into a GPU job (CDI spec first)."""
    from_cdi = cdi_mounts()
    if from_cdi is not None:
        return tuple(from_cdi)
    found: list[str] = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.startswith(_LIB_PREFIXES) and path.startswith("/") and path not in found:
            found.append(path)
    found += [t for t in _TOOLS if os.path.exists(t)]
    return tuple(found[:driver_files_max])


def oci_bwrap_argv(spec: JobSpec, policy: SandboxPolicy, *, disk_top: Path | None = None,
                   status_fd: int | None = None, env_fd: int | None = None) -> list[str]:
    """The bubblewrap command line for ``spec`` in ``spec.root_dir``: the
    job's disk (``disk_top``; ``run_job`` always gives it: without it the
    line names ``spec.work_dir``, for inspection only), its environment set
    by bubblewrap (``env_fd``) and the size-limited and read-only places
    exactly as for a ``process`` job (``_sandbox.bwrap_argv``)."""
    from ._disk import WORK_DIR, inputs_of
    from ._sandbox import SANDBOX_UID, WORK, JobRejected, env_args, gpu_device_paths, job_env, proc_args

    root = spec.root_dir
    assert root is not None
    if not root.is_dir():
        raise JobRejected(f"image root {root} is missing")
    a = [shutil.which(policy.bwrap) or policy.bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
         "--die-with-parent", "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
         "--hostname", "p2pgpu-job", "--cap-drop", "ALL"]
    a += ["--args", str(env_fd)] if env_fd is not None else env_args(job_env(spec))
    a += ["--bind", str(root), "/"]
    if spec.network or spec.cluster_net is not None:
        a += ["--share-net"]
    if spec.network:
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            if os.path.exists(f):
                a += ["--ro-bind", f, f]
    a += [*proc_args(), "--dev", "/dev"]
    for p in gpu_device_paths(spec.gpus, policy.dev_dir):
        a += ["--dev-bind", str(p), f"/dev/{p.name}"]
    if spec.gpus:
        for f in driver_files():
            if os.path.exists(f):
                a += ["--ro-bind", f, f]
    a += ["--size", str(policy.shm_bytes_max), "--tmpfs", "/dev/shm",
          "--size", str(policy.tmp_bytes_max), "--tmpfs", "/tmp",
          "--bind", str(disk_top / WORK_DIR if disk_top is not None else spec.work_dir), WORK]
    inputs = inputs_of(disk_top) if disk_top is not None else spec.inputs_dir
    if inputs is not None:
        a += ["--ro-bind", str(inputs), WORK + "/in"]
    a += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", WORK]
    if status_fd is not None:
        a += ["--json-status-fd", str(status_fd)]
    return a + ["--", *spec.argv]
