"""Output files, returned by content hash over direct streams.

``/p2pgpu/results/1.0.0``: the submitter sends one frame
``{job_id, path, sha256}``; the member that ran the job checks that the
requester is the job's submitter and that (path, sha256) is one of the
outputs it sealed when the job ended (``p2pgpu.runtime._outputs``: copied
out of the job's disk into ``jobs/<job>/work``, where the job never
reaches), opens that sealed copy through directory handles without
following links, checks its whole content against the hash, and only then
streams it in frames of at most ``chunk_bytes``, ending with an empty frame.
Nothing is served while the job runs, and nothing a job does can make the
node open another file: there is no path check to race.  The submitter
verifies the size and the sha256 before it keeps a byte: a file is
byte-identical to what the member's proof committed to, or it is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError

from p2pgpu.core import PeerMisbehaved, Reason, decode, encode
from p2pgpu.runtime._outputs import OutputLimitExceeded, open_sealed, sha256_fd

from ._streams import StreamGone, read_frame, write_frame

if TYPE_CHECKING:
    from ._ports import NodePorts as Node

log = logging.getLogger("p2pgpu.results")
RESULTS_PROTOCOL = "/p2pgpu/results/1.0.0"
chunk_bytes = 64 * 1024
request_bytes_max = 4096
file_bytes_max = 1 << 30


class ResultsError(Exception):
    """A result could not be fetched; the message says which and why."""


def safe_relpath(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts or len(path) > 1024:
        raise PeerMisbehaved(Reason.BAD_SCHEMA, f"bad output path {path[:64]!r}")
    return p


def _sealed_entry(rec: Any, path: str, sha256: str) -> dict[str, Any]:
    """The output this node sealed under ``path`` with that hash, or refuse."""
    for o in rec.extra.get("outputs") or []:
        if isinstance(o, dict) and o.get("path") == path and o.get("sha256") == sha256:
            return o
    raise PeerMisbehaved(Reason.UNKNOWN_JOB, f"no sealed output {path[:64]!r} with that hash")


def _open_checked(root: Path, rel: str, size: int, sha256: str) -> int:
    """Open a sealed output and check its whole content against the hash the
    proof committed to, before a byte of it leaves (blocking)."""
    try:
        fd = open_sealed(root, rel)
    except (OSError, ValueError) as exc:
        raise ResultsError(f"sealed output {rel[:64]!r} cannot be opened: {exc}") from None
    try:
        got_size, digest = sha256_fd(fd, max(0, size))
    except OutputLimitExceeded:
        got_size, digest = -1, b""
    if got_size != size or digest.hex() != sha256:
        os.close(fd)
        raise ResultsError(f"sealed output {rel[:64]!r} no longer matches its hash")
    return fd


async def serve_results(node: Node, stream: Any) -> None:
    """Serve one sealed output to the job's submitter: only a (path, sha256)
    this node recorded when it sealed the job's outputs, opened through a
    directory handle without following links, hash-checked in full before
    the first byte is sent.  Nothing is served while the job runs."""
    req = decode(await read_frame(stream, request_bytes_max), size_max=request_bytes_max)
    if not isinstance(req, dict) or not all(isinstance(req.get(k), str) for k in ("job_id", "path", "sha256")):
        raise PeerMisbehaved(Reason.BAD_SCHEMA, "results request needs job_id, path, sha256")
    rec = node.jobs.record(req["job_id"])
    requester = stream.muxed_conn.peer_id.to_base58()
    if rec is None or node.runner is None or rec.manifest.manifest.submitter != requester:
        raise PeerMisbehaved(Reason.UNKNOWN_JOB, "only a job's submitter may fetch its results")
    rel = safe_relpath(req["path"])
    entry = _sealed_entry(rec, str(rel), req["sha256"])
    size = int(entry.get("size_bytes", -1))
    try:
        fd = await trio.to_thread.run_sync(_open_checked, node.runner.work_dir(rec.job_id), str(rel), size,
                                           req["sha256"])
    except ResultsError as exc:
        log.warning("job %s: %s", rec.job_id[:12], exc)
        return  # end without the closing frame: the fetcher refuses it
    try:
        offset = 0
        while offset < size:
            chunk = await trio.to_thread.run_sync(os.pread, fd, min(chunk_bytes, size - offset), offset)
            if not chunk:
                return  # shorter than it was a moment ago: no closing frame
            offset += len(chunk)
            await write_frame(stream, chunk)
    finally:
        os.close(fd)
    await write_frame(stream, b"")


async def fetch_file(node: Node, peer_id: str, job_id: str, path: str, sha256: str, size: int,
                     dest: Path) -> None:
    from libp2p.peer.id import ID  # noqa: PLC0415

    assert node.stack is not None
    if size > file_bytes_max:
        raise ResultsError(f"{path}: {size} bytes is over the {file_bytes_max} byte limit")
    tmp = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, got = hashlib.sha256(), 0
    if peer_id == node.identity.peer_id and node.runner is not None:
        # We ran it ourselves: copy our sealed copy, checked the same way.
        fd = await trio.to_thread.run_sync(_open_checked, node.runner.work_dir(job_id),
                                           str(safe_relpath(path)), size, sha256)
        try:
            data = await trio.to_thread.run_sync(os.pread, fd, size + 1, 0)
        finally:
            os.close(fd)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise ResultsError(f"{path}: our own copy no longer matches its hash")
        await trio.to_thread.run_sync(dest.write_bytes, data)
        return
    with trio.fail_after(60 + size / (1 << 20)):
        try:
            stream = await node.stack.host.new_stream(ID.from_base58(peer_id), [TProtocol(RESULTS_PROTOCOL)])
        except BaseLibp2pError as exc:
            raise ResultsError(f"cannot reach {peer_id[:12]} for {path}: {exc}") from None
        try:
            await write_frame(stream, encode({"job_id": job_id, "path": path, "sha256": sha256}))
            async with await trio.open_file(tmp, "wb") as f:  # writes off the event loop
                while True:
                    chunk = await read_frame(stream, chunk_bytes)
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise ResultsError(f"{path}: more bytes than the {size} announced")
                    digest.update(chunk)
                    await f.write(chunk)
        except (StreamGone, PeerMisbehaved) as exc:
            tmp.unlink(missing_ok=True)
            raise ResultsError(f"{path} from {peer_id[:12]}: {exc}") from None
        finally:
            await stream.close()
    if got != size or digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise ResultsError(f"{path} from {peer_id[:12]}: content does not match its hash")
    os.replace(tmp, dest)


async def fetch_results(node: Node, job_id: str, out: Path) -> list[dict[str, Any]]:
    """Fetch every member's output files into ``out/member-<index>/``."""
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
            await fetch_file(node, member, job_id, str(rel), str(o["sha256"]), int(o["size_bytes"]), dest)
            fetched.append({"member": member, "member_index": index, "path": str(rel), "sha256": o["sha256"],
                            "size_bytes": o["size_bytes"], "saved_as": str(dest)})
    return fetched
