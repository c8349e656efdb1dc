"""Pull an OCI image by digest over the OCI distribution API, checking every digest.

``pull_image(store, "registry/name@sha256:...")`` fetches the manifest named by
the digest (an image index is resolved to this machine's platform, by the
digest the index gives), checks that its bytes hash to that digest, then
fetches the config and every layer into the content store, each checked
against its digest and size as it is written (:meth:`BlobStore.incoming`), so
a registry that serves other bytes than the digest names is refused and
nothing half-written stays.  Layers already in the store (pulled before, or
fetched from peers: they are blobs like any other) are not fetched again.

Anonymous bearer tokens (``WWW-Authenticate: Bearer realm=...``) are
followed, as public registries require.  Plain HTTP is used only for
registries the operator lists as insecure (``oci_insecure_registries``).
Limits: manifest bytes, layers per image, the image's compressed size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from p2pgpu.core._manifest import parse_image_ref

from ._store import BlobMismatch, BlobStore, StoreError

manifest_bytes_max = 4 << 20
config_bytes_max = 4 << 20
layers_max = 256
image_bytes_max_default = 32 << 30
stall_s = 60.0
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_ACCEPT = f"{MEDIA_OCI_MANIFEST}, {MEDIA_OCI_INDEX}, {MEDIA_DOCKER_MANIFEST}, {MEDIA_DOCKER_LIST}"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class ImageError(Exception):
    """An image could not be pulled or is not acceptable; the message says why."""


@dataclass(frozen=True)
class Layer:
    digest: str  # hex, without "sha256:"
    size: int
    media_type: str


@dataclass(frozen=True)
class PulledImage:
    ref: str
    manifest_digest: str
    config: dict[str, Any]
    layers: tuple[Layer, ...]

    @property
    def compressed_bytes(self) -> int:
        return sum(x.size for x in self.layers)

    def env(self) -> dict[str, str]:
        """The image's ``Env`` (``NAME=value`` strings), as a mapping."""
        out = {}
        for item in (self.config.get("config") or {}).get("Env") or []:
            if isinstance(item, str) and "=" in item:
                k, v = item.split("=", 1)
                out[k] = v
        return out

    def working_dir(self) -> str:
        wd = (self.config.get("config") or {}).get("WorkingDir") or ""
        return wd if isinstance(wd, str) and wd.startswith("/") else ""


def _hex(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{what}: not a sha256 digest: {str(digest)[:80]!r}")
    return digest[7:]


class _Registry:
    def __init__(self, client: httpx.Client, base: str, name: str) -> None:
        self.client, self.base, self.name = client, base, name
        self.token: str | None = None

    def _get(self, path: str, *, accept: str | None = None, stream: bool = False) -> httpx.Response:
        headers = {"Accept": accept} if accept else {}
        for _ in range(2):
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            req = self.client.build_request("GET", f"{self.base}/v2/{self.name}/{path}", headers=headers)
            resp = self.client.send(req, stream=stream)
            if resp.status_code == 401 and self.token is None:
                challenge = resp.headers.get("www-authenticate", "")
                resp.close()
                self._login(challenge)
                continue
            return resp
        return resp

    def _login(self, challenge: str) -> None:
        if not challenge.lower().startswith("bearer "):
            raise ImageError(f"{self.base}: the registry asks for credentials ({challenge[:60]!r}); "
                             "only public images can be pulled")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise ImageError(f"{self.base}: a token realm that is not a URL")
        resp = self.client.get(realm, params=params)
        if resp.status_code != 200:
            raise ImageError(f"{self.base}: no anonymous token (HTTP {resp.status_code})")
        doc = resp.json()
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise ImageError(f"{self.base}: the token answer has no token")
        self.token = token

    def manifest(self, digest_hex: str) -> tuple[str, dict[str, Any]]:
        resp = self._get(f"manifests/sha256:{digest_hex}", accept=_ACCEPT, stream=True)
        try:
            if resp.status_code != 200:
                raise ImageError(f"{self.base}/{self.name}@sha256:{digest_hex[:12]}: the registry answered "
                                 f"HTTP {resp.status_code}")
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > manifest_bytes_max:
                    raise ImageError(f"a manifest over {manifest_bytes_max} bytes")
        finally:
            resp.close()
        got = hashlib.sha256(body).hexdigest()
        if got != digest_hex:
            raise ImageError(f"image digest mismatch: the registry's manifest hashes to sha256:{got}, "
                             f"not sha256:{digest_hex}; refused")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ImageError("the manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise ImageError("the manifest is not a JSON object")
        media = str(doc.get("mediaType") or resp.headers.get("content-type", "").split(";")[0])
        return media, doc

    def blob(self, store: BlobStore, digest_hex: str, size: int, now_ms: int,
             progress: Callable[[int, int], None] | None) -> None:
        resp = self._get(f"blobs/sha256:{digest_hex}", stream=True)
        try:
            if resp.status_code != 200:
                raise ImageError(f"blob sha256:{digest_hex[:12]}: the registry answered HTTP {resp.status_code}")
            with store.incoming(digest_hex, size, now_ms) as inc:
                for chunk in resp.iter_raw(1 << 20):
                    inc.write(chunk)
                    if progress is not None:
                        progress(inc.hasher.size, size)
        except BlobMismatch as exc:
            raise ImageError(f"layer sha256:{digest_hex[:12]} does not match its digest: {exc}; refused") from None
        finally:
            resp.close()


def _platform_manifest(index: dict[str, Any]) -> str:
    arch = _ARCH.get(platform.machine(), platform.machine())
    for m in index.get("manifests") or []:
        p = m.get("platform") or {} if isinstance(m, dict) else {}
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return _hex(m.get("digest"), "index entry")
    raise ImageError(f"the image index has no linux/{arch} image")


async def pull_image(store: BlobStore, ref: str, *, now_ms: int, insecure_registries: tuple[str, ...] = (),
                     image_bytes_max: int = image_bytes_max_default,
                     fetch_from_peers: Callable[[str, int], Awaitable[bool]] | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> PulledImage:
    """Pull ``ref`` (``REGISTRY/NAME@sha256:DIGEST``) into ``store``; raise :class:`ImageError`.

    ``fetch_from_peers(digest_hex, size)``, when given, is awaited first for
    each missing layer and returns True if peers supplied it.  The blocking
    HTTP client runs in a worker thread (as in ``_http.py``); every read is
    bounded by ``stall_s``."""
    return await trio.to_thread.run_sync(functools.partial(
        _pull_image, store, ref, now_ms=now_ms, insecure_registries=insecure_registries,
        image_bytes_max=image_bytes_max, fetch_from_peers=fetch_from_peers, progress=progress))


def _pull_image(store: BlobStore, ref: str, *, now_ms: int, insecure_registries: tuple[str, ...],
                image_bytes_max: int, fetch_from_peers: Callable[[str, int], Awaitable[bool]] | None,
                progress: Callable[[str, int, int], None] | None) -> PulledImage:
    try:
        registry, name, digest = parse_image_ref(ref)
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    scheme = "http" if registry in insecure_registries else "https"
    timeout = httpx.Timeout(connect=15.0, read=stall_s, write=stall_s, pool=15.0)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=5, trust_env=False) as client:
            reg = _Registry(client, f"{scheme}://{registry}", name)
            media, doc = reg.manifest(digest)
            manifest_digest = digest
            if media in (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST) or "manifests" in doc:
                manifest_digest = _platform_manifest(doc)
                media, doc = reg.manifest(manifest_digest)
            cfg = doc.get("config")
            layers_doc = doc.get("layers")
            if not isinstance(cfg, dict) or not isinstance(layers_doc, list):
                raise ImageError("the manifest has no config or layers")
            if len(layers_doc) > layers_max:
                raise ImageError(f"more than {layers_max} layers")
            layers = []
            for item in layers_doc:
                if not isinstance(item, dict) or type(item.get("size")) is not int or item["size"] < 0:
                    raise ImageError("a layer without a size")
                layers.append(Layer(digest=_hex(item.get("digest"), "layer"), size=item["size"],
                                    media_type=str(item.get("mediaType", ""))))
            total = sum(x.size for x in layers)
            if total > image_bytes_max:
                raise ImageError(f"the image is {total} bytes compressed, over this node's limit of "
                                 f"{image_bytes_max} bytes")
            cfg_hex = _hex(cfg.get("digest"), "config")
            cfg_size = cfg.get("size")
            if type(cfg_size) is not int or not 0 <= cfg_size <= config_bytes_max:
                raise ImageError("the config is missing its size or too large")
            for hexd, size in [(cfg_hex, cfg_size)] + [(x.digest, x.size) for x in layers]:
                if store.has(hexd):
                    store.touch(hexd, now_ms)
                    continue
                if fetch_from_peers is not None and size > cfg_size and trio.from_thread.run(
                        fetch_from_peers, hexd, size):
                    continue
                reg.blob(store, hexd, size, now_ms,
                         None if progress is None else functools.partial(progress, hexd))
    except httpx.HTTPError as exc:
        raise ImageError(f"{registry}: {type(exc).__name__}: {exc}") from None
    except StoreError as exc:
        raise ImageError(f"{ref}: {exc}") from None
    fd = store.open_blob(cfg_hex)
    try:
        raw = os.read(fd, config_bytes_max + 1)
    finally:
        os.close(fd)
    try:
        config = json.loads(raw)
    except ValueError:
        raise ImageError("the image config is not JSON") from None
    if not isinstance(config, dict):
        raise ImageError("the image config is not a JSON object")
    return PulledImage(ref=ref, manifest_digest=manifest_digest, config=config, layers=tuple(layers))
