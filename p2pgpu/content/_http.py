"""Inputs from HTTP(S) URLs, always checked against the hash the manifest names.

A manifest input ``{ url = "https://...", sha256 = "...", size_bytes = N }``
is fetched by each member that needs it, straight into the content store
(:meth:`BlobStore.incoming`): bytes beyond ``size_bytes`` stop the download at
once, a body that does not hash to ``sha256`` never becomes a blob, and a
server that sends nothing for ``stall_s`` seconds ends the fetch with that
reason (:class:`UrlError`).  Redirects are followed up to
``redirects_max``; the URL may not carry credentials (the manifest checks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import httpx
import trio

from p2pgpu.core._chunks import BlobTree

from ._store import BlobMismatch, BlobStore, StoreError

stall_s_default = 30.0
connect_timeout_s = 15.0
redirects_max = 5
_READ_BYTES = 1 << 20


class UrlError(Exception):
    """A URL input could not be fetched or did not match; the message says why."""


async def fetch_url(store: BlobStore, url: str, sha256: str, size: int, *, now_ms: int,
                    stall_s: float = stall_s_default,
                    progress: Callable[[int, int], None] | None = None) -> BlobTree:
    """Fetch ``url`` into ``store`` as blob ``sha256`` of ``size`` bytes.

    The blocking client runs in a worker thread (httpx's async streams leave
    unfinished async generators behind when a body is cut off); every read
    is bounded by ``stall_s``, so the thread ends soon after a cancellation."""
    return await trio.to_thread.run_sync(functools.partial(
        _fetch_url, store, url, sha256, size, now_ms=now_ms, stall_s=stall_s, progress=progress))


def _fetch_url(store: BlobStore, url: str, sha256: str, size: int, *, now_ms: int, stall_s: float,
               progress: Callable[[int, int], None] | None) -> BlobTree:
    if store.has(sha256):
        store.touch(sha256, now_ms)
        tree = store.tree(sha256)
        if tree is not None:
            return tree
    timeout = httpx.Timeout(connect=connect_timeout_s, read=stall_s, write=stall_s, pool=connect_timeout_s)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=redirects_max,
                          trust_env=False) as client, \
                client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status_code != 200:
                raise UrlError(f"{url}: the server answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) != size:
                raise UrlError(f"{url}: the server announces {declared} bytes, the manifest says {size}")
            with store.incoming(sha256, size, now_ms) as inc:
                for chunk in resp.iter_raw(_READ_BYTES):
                    inc.write(chunk)
                    if progress is not None:
                        progress(inc.hasher.size, size)
    except httpx.ReadTimeout:
        raise UrlError(f"{url}: stalled (no data for {stall_s:g} s); nothing was kept") from None
    except httpx.ConnectTimeout:
        raise UrlError(f"{url}: no connection within {connect_timeout_s:g} s") from None
    except httpx.TooManyRedirects:
        raise UrlError(f"{url}: more than {redirects_max} redirects") from None
    except httpx.HTTPError as exc:
        raise UrlError(f"{url}: {type(exc).__name__}: {exc}") from None
    except BlobMismatch as exc:
        raise UrlError(f"{url}: {exc}; nothing was kept") from None
    except StoreError as exc:
        raise UrlError(f"{url}: {exc}") from None
    assert inc.tree is not None
    return inc.tree
