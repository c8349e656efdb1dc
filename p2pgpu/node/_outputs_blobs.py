"""Outputs as content-addressed blobs: kept by the members, fetched from any.

When a member's command ends, each output file (already found, bounded and
hashed by ``runtime/_outputs.py``) is copied into the member's content store
and announced in the DHT, so an output is a blob like an input: ``job
results`` fetches each file by its sha256 from any member that holds the same
bytes (the replicas of a job produce the same outputs) or any DHT provider,
over ``/p2pgpu/blobs/1.0.0`` with every chunk checked, and falls back to the
member-by-path protocol (``_results.py``) only when no peer has the blob.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pgpu.content import StoreError

from ._blobs import FetchError
from ._results import ResultsError, fetch_file, safe_relpath

if TYPE_CHECKING:
    from ._ports import NodePorts as Node

log = logging.getLogger("p2pgpu.outputs")

#: Output files a member copies into its store per job (the sandbox's own limit is 1,000).
outputs_kept_max = 1000


def keep_outputs(node: Node, work_dir: Path, outputs: list[dict[str, Any]]) -> list[str]:
    """Copy a finished job's outputs into the store (blocking: run in a
    thread); returns the blobs kept.  A file that changed since it was hashed
    is skipped (the copy is checked against the hash the proof signs)."""
    blobs = node.blobs
    if blobs is None:
        return []
    kept = []
    for o in outputs[:outputs_kept_max]:
        try:
            rel = safe_relpath(str(o["path"]))
            blobs.store.import_file(work_dir.joinpath(*rel.parts), node.now_ms(), sha256=str(o["sha256"]))
            kept.append(str(o["sha256"]))
        except (OSError, StoreError, ValueError) as exc:
            log.info("output %s not kept as a blob: %s", o.get("path"), exc)
    return kept


async def fetch_results_any(node: Node, job_id: str, out: Path) -> list[dict[str, Any]]:
    """``job results``: every member's files into ``out/member-<index>/``,
    each from any holder of its sha256, else from its member by path."""
    rec = node.jobs.record(job_id)
    if rec is None or "submitter" not in rec.roles:
        raise ResultsError(f"job {job_id[:12]} was not submitted by this node")
    outputs = rec.extra.get("member_outputs") or {}
    if not outputs:
        c = node.jobs.collector.collections.get(job_id)
        outputs = dict(c.outputs) if c is not None else {}
    if not outputs:
        raise ResultsError(f"no output list yet for job {job_id[:12]}: is it finished? (`p2pgpu job status`)")
    fetched = []
    for index, member in enumerate(rec.members):
        for o in outputs.get(member, []):
            rel = safe_relpath(str(o.get("path", "")))
            dest = out / f"member-{index}" / Path(*rel.parts)
            sha, size = str(o["sha256"]), int(o["size_bytes"])
            source = await _from_any(node, rec, member, sha, size, dest)
            if source is None:
                await fetch_file(node, member, job_id, str(rel), sha, size, dest)
                source = member
            fetched.append({"member": member, "member_index": index, "path": str(rel), "sha256": sha,
                            "size_bytes": size, "saved_as": str(dest), "from": source})
    return fetched


async def _from_any(node: Node, rec: Any, member: str, sha: str, size: int, dest: Path) -> str | None:
    blobs = node.blobs
    if blobs is None:
        return None
    sources = [member] + [p for p in rec.members if p != member]
    try:
        await blobs.fetch(sha, size, root=None, sources=sources)
    except FetchError as exc:
        log.info("output %s not fetched as a blob (%s): from its member by path", sha[:12], exc)
        return None
    got = blobs.sources.get(sha, {}).get("chunks_from", {})
    await trio.to_thread.run_sync(_copy_out, blobs.store, sha, dest)
    return max(got, key=got.get) if got else node.identity.peer_id


def _copy_out(store: Any, sha: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    fd = store.open_blob(sha)
    with os.fdopen(fd, "rb") as src, open(tmp, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    os.replace(tmp, dest)
