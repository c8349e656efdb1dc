"""A member's inputs, staged before its command runs.

For each input of the manifest: inline data is written as it is; an input
named by hash is fetched from peers (the submitter, the other members, and
providers found in the DHT: ``_blobs.py``) into the content store; an input
named by URL is fetched from there (``content/_http.py``); an input named
by IPFS CID from the Bitswap providers the manifest names (``_bitswap.py``).  Each is pinned for
the job (eviction never takes it while the job needs it) and linked, read-only,
into the job's inputs directory (``$P2PGPU_IN``).  Any failure ends the job
before its command starts, with :class:`InputError` saying which input and
why; nothing half-written is left in the store.

The submitter's side: ``job submit`` copies each local file into the
submitter's store (:func:`import_local_inputs`) and pins it for the job
(:func:`pin_local_inputs`: a row in the store's SQLite index, so it survives
a crash) until :func:`input_pins_loop` sees the job ended
(``core/_fetch.submitted_inputs_done``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pgpu.content import BlobStore, StoreError
from p2pgpu.content._http import UrlError, fetch_url
from p2pgpu.core._fetch import sources_retry_ms
from p2pgpu.runtime import JobRejected

from ._bitswap import CidError
from ._blobs import FetchError, NoSourceError

if TYPE_CHECKING:
    from ._ports import NodePorts as Node

log = logging.getLogger("p2pgpu.inputs")
#: A download progress line in the job's log at most this often per input.
progress_interval_s = 5.0

Say = Callable[[str], Awaitable[None]]


class InputError(JobRejected):
    """An input could not be staged (fetch failed, wrong hash, too large)."""


def link_blob(store: BlobStore, sha256: str, dest: Path) -> None:
    """Put a store blob at ``dest``: a hard link (same file system, no copy;
    the blob is read-only and the inputs directory is bound read-only), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(store.blob_path(sha256), dest, follow_symlinks=False)
    except OSError:
        fd = store.open_blob(sha256)
        with os.fdopen(fd, "rb") as src, open(dest, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(dest, 0o444)


async def stage_inputs(node: Node, start: Any, inputs_dir: Path, say: Say) -> list[str]:
    """Fetch, pin and link every by-hash and URL input of ``start``'s manifest
    into ``inputs_dir``; returns the blobs pinned.  Raises :class:`InputError`."""
    m = start.manifest.manifest
    wanted = [i for i in m.inputs if i.data is None]
    if not wanted:
        return []
    blobs = node.blobs
    if blobs is None:
        raise InputError("this node has no content store")
    store = blobs.store
    sources = [m.submitter] + [p for p in start.certificate.members if p != node.identity.peer_id]
    pinned = []
    for inp in wanted:
        shown = [0]

        def progress(done: int, total: int, shown: list[int] = shown) -> None:
            shown[0] = done  # may be called from a worker thread (URL fetches): no trio here

        await say(f"p2pgpu: input {inp.name}: fetching {inp.size_bytes} bytes "
                  + (f"from {inp.url}" if inp.url else f"(CID {inp.cid}) over Bitswap" if inp.cid
                     else f"(sha256 {inp.sha256[:16]}) from peers"))
        sha = inp.sha256
        if sha:
            store.pin(sha, start.job_id)  # before the fetch: eviction must not take it half way
            pinned.append(sha)
        t0 = trio.current_time()
        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            # Download progress for the submitter (``job logs``, the stderr of the job) every few seconds.
            nursery.start_soon(_report, say, inp.name, shown, inp.size_bytes)
            try:
                if inp.cid:
                    if node.bitswap is None:
                        raise CidError("this node has no Bitswap client")
                    tree = await node.bitswap.fetch(store, inp.cid, inp.size_bytes, list(inp.providers),
                                                    now_ms=node.now_ms(), progress=progress)
                    sha = tree.sha256.hex()
                    store.pin(sha, start.job_id)  # at once, no await between: eviction never sees it unpinned
                    pinned.append(sha)
                elif inp.url:
                    await fetch_url(store, inp.url, inp.sha256, inp.size_bytes, now_ms=node.now_ms(),
                                    progress=progress)
                else:
                    await _fetch_from_sources(blobs, inp, sources, progress, say)
            except (FetchError, UrlError, CidError, StoreError) as exc:
                failed = exc  # raised below, not wrapped in the nursery's ExceptionGroup
            nursery.cancel_scope.cancel()
        if failed is not None:
            raise InputError(f"input {inp.name}: {failed}") from None
        info = store.info(sha)
        if info is None or info.size != inp.size_bytes:
            raise InputError(f"input {inp.name}: the blob is {info.size if info else 0} bytes, the manifest says "
                             f"{inp.size_bytes}")
        await trio.to_thread.run_sync(link_blob, store, sha, inputs_dir / inp.name)
        dt = trio.current_time() - t0
        await say(f"p2pgpu: input {inp.name}: ready ({inp.size_bytes} bytes in {dt:.1f} s)")
    return pinned


async def _fetch_from_sources(blobs: Any, inp: Any, sources: list[str], progress: Callable[[int, int], None],
                              say: Say) -> None:
    """An input by hash from the submitter and the other members, tried again
    after each pause of ``core._fetch.sources_retry_ms`` while none of them
    serves it: the submitter may be restarting (its pins survive for this),
    another member may not hold it yet."""
    for pause_ms in (*sources_retry_ms, None):
        try:
            await blobs.fetch(inp.sha256, inp.size_bytes, root=bytes.fromhex(inp.tree) if inp.tree else None,
                              sources=sources, progress=progress)
            return
        except NoSourceError as exc:
            if pause_ms is None:
                raise
            await say(f"p2pgpu: input {inp.name}: {exc}; trying again in {pause_ms / 1000:g} s")
            await trio.sleep(pause_ms / 1000)


async def _report(say: Say, name: str, done: list[int], total: int) -> None:
    while True:
        await trio.sleep(progress_interval_s)
        pct = 100 * done[0] // total if total else 100
        await say(f"p2pgpu: input {name}: {done[0] >> 20} of {total >> 20} MiB ({pct}%)")


# ------------------------------------------------------- the submitter's side

#: Local files per manifest that ``job submit`` reads and serves.
local_inputs_max = 32
#: Pins of a submitter's local inputs are owned by ``submit:<job id>:<deadline
#: ms>`` (a member's own pins on the same node are owned by the job id and
#: unpinned when it finishes running, which must not release what the
#: submitter serves; the deadline decides when no job record is left).
SUBMIT_PIN_PREFIX = "submit:"
input_pins_check_s = 2.0
#: Pin owners looked at per check.
input_pins_checked_max = 10_000


def pin_local_inputs(node: Node, sm: Any, shas: list[str]) -> None:
    """Keep a submitted job's local inputs from eviction until it ends.  The
    pins are rows in the store's SQLite index: they survive a restart."""
    if node.blobs is not None:
        m = sm.manifest
        deadline_ms = m.expires_at_ms + m.duration_s_max * 1000
        for sha in shas:
            node.blobs.store.pin(sha, f"{SUBMIT_PIN_PREFIX}{sm.job_id}:{deadline_ms}")


def release_ended_input_pins(node: Node) -> list[str]:
    """Unpin the local inputs of submitted jobs that need them no more
    (``core/_fetch.submitted_inputs_done``); return the job ids released."""
    from p2pgpu.core._fetch import submitted_inputs_done

    if node.blobs is None:
        return []
    store, now = node.blobs.store, node.now_ms()
    released = []
    for owner in store.pin_owners(SUBMIT_PIN_PREFIX, limit=input_pins_checked_max):
        job_id, _, deadline = owner[len(SUBMIT_PIN_PREFIX):].partition(":")
        rec = node.jobs.record(job_id)
        if submitted_inputs_done(None if rec is None else rec.state, now_ms=now,
                                 deadline_ms=int(deadline) if deadline.isdigit() else 0):
            store.unpin(owner)
            released.append(job_id)
    return released


async def input_pins_loop(node: Node) -> None:
    """Release the pins of ended jobs' local inputs now and then (also the
    first thing after a restart: pins of jobs that ended meanwhile go)."""
    while True:
        for job_id in release_ended_input_pins(node):
            log.info("job %s ended: its local inputs may be evicted now", job_id[:12])
            node.counts["inputs:pins_released"] += 1
        await trio.sleep(input_pins_check_s)


def local_input_paths(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``{ path = "..." }`` inputs of a manifest document."""
    table = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        return []
    return [(str(name), spec) for name, spec in sorted(table.items())
            if isinstance(spec, dict) and "path" in spec]


def import_local_inputs(node: Node, doc: dict[str, Any]) -> list[str]:
    """Replace each ``{ path = "...", sha256? }`` input by ``{ sha256,
    size_bytes, tree }`` after copying the file into this node's store, from
    where it is served to the job's members.  The path must be absolute (the
    SDK resolves it against the manifest's directory); a ``sha256`` given with
    it (the SDK hashes the file first, with progress) must match.  Raises
    ``ValueError`` naming the input."""
    from p2pgpu.core._chunks import BlobTree

    found = local_input_paths(doc)
    if len(found) > local_inputs_max:
        raise ValueError(f"inputs: at most {local_inputs_max} local files")
    if found and node.blobs is None:
        raise ValueError("inputs: this node has no content store to serve local files from")
    added = []
    for name, spec in found:
        path, expected = spec.get("path"), spec.get("sha256")
        extra = sorted(set(spec) - {"path", "sha256"})
        if extra:
            raise ValueError(f"inputs.{name}.{extra[0]}: unknown field (a local file takes path, and sha256 to check)")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError(f"inputs.{name}.path: an absolute path to a local file")
        if expected is not None and not isinstance(expected, str):
            raise ValueError(f"inputs.{name}.sha256: 64 hex digits")
        assert node.blobs is not None
        try:
            tree: BlobTree = node.blobs.store.import_file(Path(path), node.now_ms(), sha256=expected)
        except FileNotFoundError:
            raise ValueError(f"inputs.{name}.path: {path} does not exist") from None
        except OSError as exc:
            raise ValueError(f"inputs.{name}.path: cannot read {path}: {exc.strerror or exc}") from None
        except StoreError as exc:
            raise ValueError(f"inputs.{name}.path: {exc}") from None
        sha = tree.sha256.hex()
        doc["inputs"][name] = {"sha256": sha, "size_bytes": tree.size, "tree": tree.root.hex()}
        added.append(sha)
    return added
