"""OCI images on a node: pulled by digest, unpacked once, cached read-only.

``prepare_image`` turns a job with ``runtime = "oci"`` into a sandbox spec
whose root is the image: on the first job the node pulls the image
(``content/_oci.py``: layers into the content store, each checked against its
digest; layers other nodes hold are fetched from them first), unpacks the
layers in order into ``<cache>/.tmp-*`` (``content/_unpack.py``: nothing
escapes the root), adds the mount points the sandbox needs, and renames the
directory to ``<cache>/<manifest digest>``: a crash never leaves a
half-unpacked image that looks complete.  Later jobs on the node start from
that cache.  The cache is bounded (``images_bytes_max``): the least recently
used images that no running job uses are removed to make room.

The cache is not in the node's home: an ``oci`` job's root is a bind of the
cached root, and a bind's source path shows in the job's
``/proc/self/mountinfo``.  It lives beside the job disks, under the scratch
root (``runtime/_disk.py``: ``/var/tmp/p2pgpu-<uid>``, mode 0700), as
``images-<16 hex of the home's path hash>``, so a job sees only that neutral
path and its image's digest (which its manifest names anyway).  An ``owner``
file there names the home; a node removes the caches of homes that no longer
exist when it opens its own.

The job's environment starts from the image's ``Env``, then the manifest's,
then the sandbox's own variables; its working directory is ``/work``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pgpu.content._oci import ImageError, PulledImage, image_bytes_max_default, pull_image
from p2pgpu.content._unpack import UnpackLimits, UnsafeLayer, unpack_layer
from p2pgpu.core._manifest import parse_image_ref
from p2pgpu.runtime import JobRejected, JobSpec

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._ports import NodePorts as Node

log = logging.getLogger("p2pgpu.images")

images_bytes_max_default = 64 << 30
unpacked_bytes_max_default = 64 << 30
#: What the sandbox mounts over, made in every cached root.
MOUNT_DIRS = ("proc", "dev", "tmp", "work", "etc", "sys")
MOUNT_FILES = ("etc/passwd", "etc/group", "etc/hostname", "etc/resolv.conf", "etc/hosts")


class ImageRefused(JobRejected):
    """The job's image cannot be used here (pull failed, digest mismatch, unsafe layers, too large)."""


def _dir_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


#: Orphaned caches (their home is gone) removed per start, at most.
orphan_caches_swept_max = 64


def images_dir(home: Path, scratch_root: Path) -> Path:
    """Where the node whose home is ``home`` keeps its images (see the module doc)."""
    key = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
    return scratch_root / f"images-{key}"


def sweep_orphan_caches(scratch_root: Path, *, keep: Path) -> list[Path]:
    """Remove image caches whose ``owner`` home no longer exists (a test's or
    a deleted node's); return what was removed.  A cache without an owner
    file is left alone: it is not known to be ours to remove."""
    removed: list[Path] = []
    try:
        names = sorted(n for n in os.listdir(scratch_root) if n.startswith("images-"))
    except OSError:
        return removed
    for name in names:
        d = scratch_root / name
        if d == keep or len(removed) >= orphan_caches_swept_max:
            continue
        try:
            owner = (d / "owner").read_text().strip()
        except OSError:
            continue
        if owner.startswith("/") and not os.path.exists(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class ImageCache:
    """One read-only root per image manifest digest (see the module doc)."""

    def __init__(self, root: Path, *, bytes_max: int = images_bytes_max_default,
                 unpacked_bytes_max: int = unpacked_bytes_max_default,
                 image_bytes_max: int = image_bytes_max_default) -> None:
        self.root = root
        self.bytes_max = bytes_max
        self.unpacked_bytes_max = unpacked_bytes_max
        self.image_bytes_max = image_bytes_max
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(root / name, ignore_errors=True)  # an unpack a crash interrupted
        #: job id -> the image digest it runs in (never evicted while there).
        self.jobs: dict[str, str] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.pulls = 0
        #: Orphaned caches of other homes looked for yet (``_sweep_once``).
        self.swept = False

    def lock(self, digest: str) -> trio.Lock:
        return self._locks.setdefault(digest, trio.Lock())

    def cached(self) -> list[str]:
        """Manifest digests of the images ready here (for the advert)."""
        return sorted(n for n in os.listdir(self.root) if len(n) == 64 and (self.root / n / "image.json").exists())

    def entry(self, digest: str) -> tuple[Path, dict[str, Any]] | None:
        meta = self.root / digest / "image.json"
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        os.utime(meta)  # last use, for eviction
        return self.root / digest / "rootfs", doc

    def make_room(self, size: int) -> None:
        entries = []
        for d in self.cached():
            meta = self.root / d / "image.json"
            try:
                doc = json.loads(meta.read_text())
                entries.append((meta.stat().st_mtime, d, int(doc.get("unpacked_bytes", 0))))
            except (OSError, ValueError):
                continue
        used = sum(e[2] for e in entries)
        for _t, d, n in sorted(entries):
            if used + size <= self.bytes_max:
                break
            if d in self.jobs.values():
                continue
            shutil.rmtree(self.root / d, ignore_errors=True)
            used -= n
        if used + size > self.bytes_max:
            raise ImageRefused(f"no room in the image cache: {size} bytes needed, {used} of {self.bytes_max} "
                               "used by images that jobs are using")

    def build(self, pulled: PulledImage, store: Any) -> tuple[Path, dict[str, Any]]:
        """Unpack ``pulled``'s layers (from ``store``) into a new cached root."""
        digest = pulled.manifest_digest
        tmp = self.root / f".tmp-{digest[:16]}-{os.getpid()}-{time.monotonic_ns()}"
        rootfs = tmp / "rootfs"
        rootfs.mkdir(parents=True, mode=0o755)
        try:
            written = 0
            limits = UnpackLimits(bytes_max=self.unpacked_bytes_max)
            for layer in pulled.layers:
                if "zstd" in layer.media_type:
                    raise ImageRefused(f"layer {layer.digest[:12]} is zstd-compressed, which this node cannot "
                                       "unpack (gzip or plain tar layers only)")
                fd = store.open_blob(layer.digest)
                with os.fdopen(fd, "rb") as f:
                    written = unpack_layer(f, rootfs, limits, already_written=written)
            for d in MOUNT_DIRS:
                p = rootfs / d
                if not p.is_symlink() and not p.exists():
                    p.mkdir(mode=0o755)
            for name in MOUNT_FILES:
                p = rootfs / name
                if p.parent.is_dir() and not p.parent.is_symlink() and not p.is_symlink() and not p.exists():
                    p.touch(mode=0o644)
            meta = {"ref": pulled.ref, "manifest_digest": digest, "env": pulled.env(),
                    "working_dir": pulled.working_dir(), "layers": [x.digest for x in pulled.layers],
                    "compressed_bytes": pulled.compressed_bytes, "unpacked_bytes": written}
            self.make_room(written)
            (tmp / "image.json").write_text(json.dumps(meta, sort_keys=True))
            final = self.root / digest
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / "rootfs", meta


def _scratch_root(node: Node) -> Path:
    from p2pgpu.runtime._disk import scratch_root_default

    policy = getattr(getattr(node, "runner", None), "policy", None)
    return getattr(policy, "scratch_root", None) or scratch_root_default()


def image_cache(node: Node) -> ImageCache:
    """The node's cache, opened on first use (its directory made, its owner
    file written; orphaned caches are swept by :func:`prepare_image`, in a
    worker thread)."""
    cache = getattr(node, "images", None)
    if cache is None:
        import tempfile

        from p2pgpu.runtime._disk import DiskUnavailable, _ensure_root

        extra = node.config.extra
        if node.home is not None:
            scratch = _scratch_root(node)
            try:
                _ensure_root(scratch)
            except (DiskUnavailable, OSError) as exc:
                raise ImageRefused(f"no place for the image cache: {exc}") from None
            root = images_dir(node.home.path, scratch)
            root.mkdir(mode=0o700, exist_ok=True)
            (root / "owner").write_text(str(node.home.path.resolve()) + "\n")
        else:
            root = Path(tempfile.mkdtemp(prefix="p2pgpu-img-"))
        cache = ImageCache(root, bytes_max=int(extra.get("images_bytes_max", images_bytes_max_default)),
                           unpacked_bytes_max=int(extra.get("image_unpacked_bytes_max", unpacked_bytes_max_default)),
                           image_bytes_max=int(extra.get("image_bytes_max", image_bytes_max_default)))
        node.images = cache
    return cache


async def _sweep_once(node: Node, cache: ImageCache) -> None:
    """Remove the caches of homes that no longer exist, once per node run
    (a worker thread: a cache can hold gigabytes)."""
    if getattr(cache, "swept", True) is False and node.home is not None:
        cache.swept = True
        scratch = _scratch_root(node)
        for gone in await trio.to_thread.run_sync(lambda: sweep_orphan_caches(scratch, keep=cache.root)):
            log.info("removed the image cache %s: its node home no longer exists", gone)


async def prepare_image(node: Node, start: Any, spec: JobSpec, say: Callable[[str], Awaitable[None]]) -> JobSpec:
    """The spec of an ``oci`` job: its image's root, env and working directory."""
    m = start.manifest.manifest
    try:
        _registry, _name, digest = parse_image_ref(m.image)
    except ValueError as exc:
        raise ImageRefused(str(exc)) from None
    cache = image_cache(node)
    await _sweep_once(node, cache)
    blobs = node.blobs
    if blobs is None:
        raise ImageRefused("this node has no content store")
    t0 = trio.current_time()
    async with cache.lock(digest):
        # The cache is keyed by the digest the manifest names (an index's, or the image manifest's).
        found = cache.entry(digest)
        if found is None:
            await say(f"p2pgpu: image {m.image}: pulling")
            insecure = tuple(str(x) for x in node.config.extra.get("oci_insecure_registries", []) or [])
            members = [p for p in start.certificate.members if p != node.identity.peer_id]

            async def from_peers(hexd: str, size: int) -> bool:
                from ._blobs import FetchError

                try:
                    providers = await blobs.find_providers(hexd)
                    if not providers:
                        return False
                    await blobs.fetch(hexd, size, root=None, sources=members + providers, use_dht=False)
                    return True
                except FetchError as exc:
                    log.info("layer %s not fetched from peers (%s): from the registry", hexd[:12], exc)
                    return False

            try:
                pulled = await pull_image(blobs.store, m.image, now_ms=node.now_ms(), insecure_registries=insecure,
                                          image_bytes_max=cache.image_bytes_max, fetch_from_peers=from_peers)
                cache.pulls += 1
                root, meta = await trio.to_thread.run_sync(cache.build, pulled, blobs.store)
            except (ImageError, UnsafeLayer) as exc:
                raise ImageRefused(f"image {m.image}: {exc}") from None
            if pulled.manifest_digest != digest and not (cache.root / digest).exists():
                os.symlink(pulled.manifest_digest, cache.root / digest)  # an index names the same root
            for layer in meta["layers"]:
                if nursery := getattr(node, "_nursery", None):
                    nursery.start_soon(blobs.announce, layer)
            _readvertise(node)  # the advert lists cached images: say we have one more
            await say(f"p2pgpu: image {m.image}: ready ({meta['unpacked_bytes']} bytes unpacked in "
                      f"{trio.current_time() - t0:.1f} s)")
        else:
            root, meta = found
            await say(f"p2pgpu: image {m.image}: from the cache")
        cache.jobs[start.job_id] = meta["manifest_digest"]
    node.counts["images:cache_hits" if found is not None else "images:pulls"] += 1
    return dataclasses.replace(spec, root_dir=root, image_env=dict(meta["env"]))


def _readvertise(node: Node) -> None:
    """Have the advert loop publish a fresh advert (new terms: the image list)."""
    if hasattr(node, "_advert_stale"):
        node._advert_stale = True
        node.capacity_changed()  # wakes the advert loop


def advertised_images(node: Node) -> tuple[str, ...]:
    """The cached images this node's advert lists (``core/_advert.images_max``
    of them, the most recently used; sorted): nothing unless it runs ``oci``.
    Reads the cache directory only (a listing and a stat per image): it is
    called for every advert, on the event loop."""
    from p2pgpu.core._advert import images_max

    if "oci" not in getattr(node, "runtimes", ()):
        return ()
    cache = getattr(node, "images", None)
    if cache is not None:
        root = cache.root
    elif node.home is not None:
        root = images_dir(node.home.path, _scratch_root(node))
    else:
        return ()
    used = []
    try:
        names = os.listdir(root)
    except OSError:
        return ()  # no image cached yet
    for d in names[:4096]:
        if len(d) != 64:
            continue
        try:
            used.append(((root / d / "image.json").stat().st_mtime, d))
        except OSError:
            continue
    return tuple(sorted(d for _t, d in sorted(used, reverse=True)[:images_max]))


def release_image(node: Node, job_id: str) -> None:
    """The job no longer runs in its image: the cache may evict it."""
    cache = getattr(node, "images", None)
    if cache is not None:
        cache.jobs.pop(job_id, None)
