"""The signature-verification cache: real Ed25519, once per unique signature.

Verifying costs ~50 us; a thousand nodes each verifying a thousand adverts
would spend most of a run there, re-checking the same bytes.  Signature
verification is a pure function of (key, message, signature), so memoising it
changes no decision the cores make, only the cost.  For the duration of a
run, :func:`verify_cache` makes a memoised wrapper around the real check,
which the simulator passes to every core it drives (a ``Verifier``: the
advert books, the decoders of formation messages, manifests, proofs and
heartbeats); nothing global is swapped.  A failed check is cached as the
same ``PeerMisbehaved``.  ``adverts.verify = "every"`` runs the real check
every time instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from p2pgpu.core import PeerMisbehaved, verify_signature

cache_entries_max = 2_000_000


class VerifyCache:
    def __init__(self, real_fn: object, *, memoise: bool = True) -> None:
        self._real = real_fn
        self.memoise = memoise
        self._seen: dict[tuple[bytes, bytes, bytes], PeerMisbehaved | None] = {}
        self.real = 0
        self.hits = 0

    def __call__(self, public_key: bytes, message: bytes, signature: bytes) -> None:
        key = (bytes(public_key), bytes(message), bytes(signature))
        if self.memoise and key in self._seen:
            self.hits += 1
            err = self._seen[key]
        else:
            self.real += 1
            err = None
            try:
                self._real(public_key, message, signature)  # type: ignore[operator]
            except PeerMisbehaved as exc:
                err = exc
            if self.memoise and len(self._seen) < cache_entries_max:
                self._seen[key] = err
        if err is not None:
            raise PeerMisbehaved(err.reason, err.detail)


@contextmanager
def verify_cache(enabled: bool = True) -> Iterator[VerifyCache]:
    """The verifier for one run: memoised, or (``enabled=False``) the real
    check every time, still counted.  It is handed to the cores (``World``,
    ``JobFlow``, the advert books); nothing global is replaced."""
    yield VerifyCache(verify_signature, memoise=enabled)
