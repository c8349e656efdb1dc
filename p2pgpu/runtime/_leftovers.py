"""What a running sandbox leaves on the host, written down so that a restarted node can take it away.

While a job runs, :func:`run_job` keeps a small JSON record (``JobSpec.
state_path``, the node puts it in ``jobs/<job>/sandbox.json`` in its home):
the keeper's pid and start time, the job's cgroups, its scratch directory
and the disk mounted there.  It is removed once everything is cleaned up.
A record still there when the node starts belongs to a previous life that
was killed (``kill -9``, a crash, a power cut); :func:`reap_leftovers`
then stops that life's keeper if it is still the same process (pid *and*
start time, so a reused pid is never touched), kills what is left in its
cgroups, unmounts and deletes its disk, and removes the record.  The keeper
already kills its sandbox when the node dies; this is the second line, and
what frees the disk.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from ._disk import remove_scratch
from ._limits import SandboxUnavailable, _kill_cgroup, _try_rmdir
from ._netns import NETNS_DIR, remove_member_net

RECORD_NAME = "sandbox.json"
record_bytes_max = 64 * 1024


def process_start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat``
    field 22): with the pid, an identity that survives pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def write_record(path: Path, doc: dict[str, Any]) -> None:
    """Replace the record at ``path`` atomically (mode 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, sort_keys=True)
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(record_bytes_max + 1)
    try:
        doc = json.loads(data) if len(data) <= record_bytes_max else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def reap(doc: dict[str, Any]) -> list[str]:
    """Stop and remove what one record names; returns what was done."""
    done: list[str] = []
    pid, ticks = doc.get("keeper_pid"), doc.get("keeper_start")
    if isinstance(pid, int) and pid > 1 and isinstance(ticks, int) and process_start_ticks(pid) == ticks:
        try:
            os.killpg(pid, signal.SIGKILL)  # the keeper leads its group; bwrap dies with it
            done.append(f"stopped keeper {pid}")
        except OSError:
            pass
    for cg in doc.get("cgroups") or []:
        if isinstance(cg, str) and "/p2pgpu-" in cg and os.path.isdir(cg):
            _kill_cgroup(Path(cg))
            try:
                _try_rmdir(Path(cg))
            except SandboxUnavailable:
                continue
            done.append(f"cleared cgroup {cg}")
    netns, table, claim = doc.get("netns"), doc.get("nft_table"), doc.get("net_claim")
    if isinstance(netns, str) and netns and isinstance(table, str) and isinstance(claim, str):
        existed = (NETNS_DIR / netns).exists()
        problem = remove_member_net(netns=netns, table=table, claim=claim)
        if existed or problem:
            done.append(f"removed network {netns}" + (f" ({problem})" if problem else ""))
    scratch, mount = doc.get("scratch"), doc.get("mount")
    if isinstance(scratch, str) and "/job-" in scratch and os.path.isabs(scratch) and os.path.lexists(scratch):
        problem = remove_scratch(Path(scratch), mounted=Path(mount) if isinstance(mount, str) and mount else None)
        done.append(f"removed {scratch}" + (f" ({problem})" if problem else ""))
    return done


def reap_leftovers(root: Path) -> list[str]:
    """Clean up after every sandbox a previous life of the node left under
    ``root`` (``root/<job>/sandbox.json``).  Call it at start, before any
    job runs.  Returns one line per thing done."""
    done: list[str] = []
    try:
        jobs = sorted(root.iterdir())
    except OSError:
        return done
    for job in jobs:
        path = job / RECORD_NAME
        doc = read_record(path)
        if doc is None:
            continue
        done += [f"{job.name[:12]}: {what}" for what in reap(doc)]
        path.unlink(missing_ok=True)
    return done
