"""Content-addressed data for jobs: the blob store, inputs from URLs, OCI images.

``BlobStore`` keeps blobs by SHA-256 in the node's home (``_store.py``);
peer-to-peer transfer is ``p2pgpu/node/_blobs.py`` over the chunk tree and
scheduler of ``p2pgpu/core/_chunks.py`` and ``_fetch.py``; ``_http.py`` fetches
inputs named by URL and hash; ``_oci.py`` pulls OCI images by digest and
``_unpack.py`` unpacks their layers safely into a cached root filesystem.
"""

from ._store import BlobInfo, BlobMismatch, BlobStore, Incoming, Partial, StoreError, StoreFull, check_hex

__all__ = ["BlobInfo", "BlobMismatch", "BlobStore", "Incoming", "Partial", "StoreError", "StoreFull", "check_hex"]
