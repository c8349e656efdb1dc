"""Attack: hostile HTTP servers behind URL inputs and OCI registries.

A real HTTP server on 127.0.0.1 (Python's http.server in a thread) plays the
stranger: it serves the wrong bytes for a hash, more bytes than announced,
stalls mid-body, or a registry manifest/layer that does not match its digest.
Each must end the fetch with a reason that says what happened, and leave
nothing in the content store (no blob, no temporary file).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.content import BlobStore
from p2pgpu.content._http import UrlError, fetch_url
from p2pgpu.content._oci import ImageError, pull_image

GOOD = b"the real input\n" * 1000
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


@contextmanager
def server(routes: dict[str, Any]) -> Iterator[str]:
    """``routes``: path -> bytes, or a callable(handler) that writes the answer."""
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            r = routes.get(self.path.split("?")[0])
            if r is None:
                self.send_response(404)
                self.end_headers()
                return
            if callable(r):
                r(self)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(r)))
            self.end_headers()
            self.wfile.write(r)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def store_is_clean(store: BlobStore) -> bool:
    return store.blobs() == [] and os.listdir(store.root / "data") == []


async def test_url_happy_path(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b")
    with server({"/good": GOOD}) as host:
        tree = await fetch_url(store, f"http://{host}/good", GOOD_SHA, len(GOOD), now_ms=0)
    assert tree.sha256.hex() == GOOD_SHA and store.has(GOOD_SHA)


async def test_url_wrong_bytes_for_the_hash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b")
    evil = b"X" * len(GOOD)
    with server({"/f": evil}) as host, pytest.raises(UrlError, match="hashes to .*nothing was kept"):
        await fetch_url(store, f"http://{host}/f", GOOD_SHA, len(GOOD), now_ms=0)
    assert store_is_clean(store)


async def test_url_oversized_body_is_cut_off(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b")

    def endless(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: a body that never ends
        h.send_response(200)
        h.end_headers()
        try:
            for _ in range(10_000):
                h.wfile.write(b"y" * 65536)
        except OSError:
            pass  # the fetcher hung up, as it should

    with server({"/big": endless}) as host, pytest.raises(UrlError, match="more than"):
        await fetch_url(store, f"http://{host}/big", GOOD_SHA, len(GOOD), now_ms=0)
    assert store_is_clean(store)
    with server({"/lies": GOOD}) as host, pytest.raises(UrlError, match="announces"):
        await fetch_url(store, f"http://{host}/lies", GOOD_SHA, len(GOOD) - 1, now_ms=0)


async def test_url_that_stalls_times_out_with_the_reason(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b")

    def stall(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(GOOD)))
        h.end_headers()
        h.wfile.write(GOOD[:100])
        h.wfile.flush()
        time.sleep(3)

    t0 = time.monotonic()
    with server({"/stall": stall}) as host, pytest.raises(UrlError, match="stalled"):
        await fetch_url(store, f"http://{host}/stall", GOOD_SHA, len(GOOD), now_ms=0, stall_s=0.5)
    assert time.monotonic() - t0 < 3
    assert store_is_clean(store)


def _registry_routes(manifest: bytes, config: bytes, layer: bytes, *, served_manifest: bytes | None = None,
                     served_layer: bytes | None = None) -> tuple[dict[str, Any], str]:
    mdig = hashlib.sha256(manifest).hexdigest()

    def man(h: BaseHTTPRequestHandler) -> None:
        body = served_manifest if served_manifest is not None else manifest
        h.send_response(200)
        h.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return ({f"/v2/x/img/manifests/sha256:{mdig}": man,
             f"/v2/x/img/blobs/sha256:{hashlib.sha256(config).hexdigest()}": config,
             f"/v2/x/img/blobs/sha256:{hashlib.sha256(layer).hexdigest()}":
                 served_layer if served_layer is not None else layer}, mdig)


def _image(layer: bytes) -> tuple[bytes, bytes]:
    config = json.dumps({"config": {"Env": ["A=b"]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
                                       "size": len(layer)}]}).encode()
    return manifest, config


async def test_registry_happy_path_then_a_manifest_that_does_not_match_its_digest(tmp_path: Path) -> None:
    layer = b"not really a tar, but the digest is what is checked here"
    manifest, config = _image(layer)
    routes, mdig = _registry_routes(manifest, config, layer)
    store = BlobStore(tmp_path / "b")
    with server(routes) as host:
        img = await pull_image(store, f"{host}/x/img@sha256:{mdig}", now_ms=0, insecure_registries=(host,))
    assert img.env() == {"A": "b"} and store.has(hashlib.sha256(layer).hexdigest())
    store2 = BlobStore(tmp_path / "b2")
    evil_manifest = manifest.replace(b'"size": ', b'"size":  ', 1)  # same meaning, other bytes
    routes, _ = _registry_routes(manifest, config, layer, served_manifest=evil_manifest)
    with server(routes) as host, pytest.raises(ImageError, match="image digest mismatch"):
        await pull_image(store2, f"{host}/x/img@sha256:{mdig}", now_ms=0, insecure_registries=(host,))
    assert store_is_clean(store2)


async def test_registry_layer_with_other_bytes_is_refused_and_not_kept(tmp_path: Path) -> None:
    layer = b"the layer the manifest names"
    manifest, config = _image(layer)
    routes, mdig = _registry_routes(manifest, config, layer, served_layer=b"the layer an attacker serves")
    store = BlobStore(tmp_path / "b")
    with server(routes) as host, pytest.raises(ImageError, match="does not match its digest"):
        await pull_image(store, f"{host}/x/img@sha256:{mdig}", now_ms=0, insecure_registries=(host,))
    assert not store.has(hashlib.sha256(layer).hexdigest())
    assert [n for n in os.listdir(store.root / "data") if n.startswith(".tmp")] == []


async def test_an_image_over_the_size_limit_is_refused_before_any_layer(tmp_path: Path) -> None:
    layer = b"z" * 10_000
    manifest, config = _image(layer)
    routes, mdig = _registry_routes(manifest, config, layer)
    store = BlobStore(tmp_path / "b")
    with server(routes) as host, pytest.raises(ImageError, match="over this node's limit"):
        await pull_image(store, f"{host}/x/img@sha256:{mdig}", now_ms=0, insecure_registries=(host,),
                         image_bytes_max=1000)
    assert store_is_clean(store)
