"""The matrix work of hardware challenges: derive, multiply, reduce, check.

``p2pgpu.core._challenge`` defines the protocol (sizes, deadlines, the
commitment, verdicts); this module does the arithmetic, off the event loop
(the node calls it through ``trio.to_thread``):

- :func:`derive` expands a challenge seed into ``A`` and ``B`` exactly as the
  core specifies (ChaCha20 keystreams from ``cryptography``'s OpenSSL, one
  byte per entry, entry ``(byte >> 3) - 16``);
- a :class:`Backend` computes ``C = A B mod 251`` on a device, row block by
  row block so that a prover gives up once its answer would be late:
  :class:`NumpyBackend` (float32 BLAS on the CPU), :class:`TorchBackend` and
  :class:`CupyBackend` (CUDA, TF32 allowed; used when installed and a device
  is present; :func:`pick_backend`);
- :func:`freivalds` is the challenger's check in ``O(rounds * n^2)``: ``r``
  uniform over ``F_251^n``, ``C r == A (B r) (mod 251)``, computed in float64
  whose 53-bit mantissa holds every intermediate exactly (``n * 16 * 250`` and
  ``n * 250 * 250`` stay below ``2^31`` for ``n <= 8192``).

Exactness of the prover's float32: entries are integers in ``[-16, 15]``, so
every partial sum of a product entry is an integer of magnitude at most
``n * 256 <= 2^21``, exactly representable in float32 (and TF32/FP16/BF16
inputs hold the entries exactly), whatever order the BLAS sums in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from random import Random
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from p2pgpu.core._challenge import commitment_of, matrix_keys, modulus

_ZERO_NONCE = bytes(16)
#: Rows per block: the prover checks for abandonment between blocks, the
#: verifier bounds its float64 working set (block x n x 8 bytes).
block_rows = 256


class Abandoned(Exception):
    """The prover stopped: its answer could no longer arrive in time."""


def keystream(key: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` of ChaCha20 (RFC 8439) under ``key``, counter 0, nonce 0."""
    enc = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    return enc.update(bytes(nbytes))


def derive(seed: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``A`` and ``B`` as ``n x n`` uint8 arrays of raw keystream bytes
    (:func:`entries` turns them into the matrix entries)."""
    key_a, key_b = matrix_keys(seed)
    a = np.frombuffer(keystream(key_a, n * n), dtype=np.uint8).reshape(n, n)
    b = np.frombuffer(keystream(key_b, n * n), dtype=np.uint8).reshape(n, n)
    return a, b


def entries(raw: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Matrix entries ``(byte >> 3) - 16``, in ``[-16, 15]``."""
    return (raw >> 3).astype(dtype) - 16


def reference_product_mod_p(seed: bytes, n: int) -> bytes:
    """``A B mod p`` with Python integers: slow, independent of any BLAS; the
    oracle the tests hold the backends to (small ``n`` only)."""
    a, b = derive(seed, n)
    ai = [[int(x >> 3) - 16 for x in row] for row in a]
    bt = [[int(b[k][j] >> 3) - 16 for k in range(n)] for j in range(n)]
    return bytes(sum(x * y for x, y in zip(row, col)) % modulus for row in ai for col in bt)


class Backend(Protocol):
    name: str

    def product_mod_p(self, seed: bytes, n: int, *, should_stop: Callable[[], bool]) -> bytes: ...


@dataclass
class NumpyBackend:
    """float32 BLAS on the CPU (exact: see the module's docstring)."""

    name: str = "numpy"

    def product_mod_p(self, seed: bytes, n: int, *, should_stop: Callable[[], bool]) -> bytes:
        a_raw, b_raw = derive(seed, n)
        if should_stop():
            raise Abandoned("after deriving the matrices")
        b = entries(b_raw)
        out = bytearray()
        for i in range(0, n, block_rows):
            c = entries(a_raw[i:i + block_rows]) @ b
            out += np.mod(c.astype(np.int64), modulus).astype(np.uint8).tobytes()
            if should_stop():
                raise Abandoned(f"after {i + block_rows} of {n} rows")
        return bytes(out)


@dataclass
class TorchBackend:
    """PyTorch on a CUDA device, TF32 tensor cores allowed (exact here)."""

    torch: Any
    device: str = "cuda"
    name: str = "torch"

    def product_mod_p(self, seed: bytes, n: int, *, should_stop: Callable[[], bool]) -> bytes:
        t = self.torch
        a_raw, b_raw = derive(seed, n)
        if should_stop():
            raise Abandoned("after deriving the matrices")
        prev = t.backends.cuda.matmul.allow_tf32
        t.backends.cuda.matmul.allow_tf32 = True
        try:
            a = (t.from_numpy(a_raw.copy()).to(self.device) >> 3).to(t.float32) - 16
            b = (t.from_numpy(b_raw.copy()).to(self.device) >> 3).to(t.float32) - 16
            out = bytearray()
            for i in range(0, n, block_rows):
                c = (a[i:i + block_rows] @ b).round().to(t.int64)
                out += t.remainder(c, modulus).to(t.uint8).cpu().numpy().tobytes()
                if should_stop():
                    raise Abandoned(f"after {i + block_rows} of {n} rows")
            return bytes(out)
        finally:
            t.backends.cuda.matmul.allow_tf32 = prev


@dataclass
class CupyBackend:
    """CuPy on the current CUDA device (float32; exact here)."""

    cupy: Any
    name: str = "cupy"

    def product_mod_p(self, seed: bytes, n: int, *, should_stop: Callable[[], bool]) -> bytes:
        cp = self.cupy
        a_raw, b_raw = derive(seed, n)
        if should_stop():
            raise Abandoned("after deriving the matrices")
        a = (cp.asarray(a_raw) >> 3).astype(cp.float32) - 16
        b = (cp.asarray(b_raw) >> 3).astype(cp.float32) - 16
        out = bytearray()
        for i in range(0, n, block_rows):
            c = cp.rint(a[i:i + block_rows] @ b).astype(cp.int64)
            out += cp.mod(c, modulus).astype(cp.uint8).get().tobytes()
            if should_stop():
                raise Abandoned(f"after {i + block_rows} of {n} rows")
        return bytes(out)


def available_backends() -> dict[str, str]:
    """Each backend and whether it can run here ("ok" or why not)."""
    found = {"numpy": "ok"}
    try:
        import cupy

        found["cupy"] = "ok" if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - any import or driver failure means "not here"
        found["cupy"] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        found["torch"] = "ok" if torch.cuda.is_available() else "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - as above
        found["torch"] = f"unavailable ({type(exc).__name__})"
    return found


def pick_backend(name: str = "auto") -> Backend:
    """``auto``: CuPy, then PyTorch, when one has a CUDA device; else NumPy."""
    found = available_backends()
    if name not in ("auto", *found):
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(found)}")
    order = ["cupy", "torch", "numpy"] if name == "auto" else [name]
    for cand in order:
        if found.get(cand) != "ok":
            if name != "auto":
                raise ValueError(f"backend {name} cannot run here: {found.get(cand)}")
            continue
        if cand == "cupy":
            import cupy

            return CupyBackend(cupy)
        if cand == "torch":
            import torch

            return TorchBackend(torch)
    return NumpyBackend()


# --- the challenger's side --------------------------------------------------------

@dataclass
class Instance:
    """A challenge's matrices, kept for checking one or many products."""

    n: int
    a_raw: np.ndarray
    b_raw: np.ndarray

    @classmethod
    def from_seed(cls, seed: bytes, n: int) -> Instance:
        a, b = derive(seed, n)
        return cls(n=n, a_raw=a, b_raw=b)

    def freivalds(self, product: bytes, *, rounds: int, rng: Random) -> bool:
        """True when ``product`` (``n^2`` bytes, ``C mod p`` row-major) passes
        ``rounds`` rounds; a wrong one passes with probability at most
        ``p^-rounds``.  ``rng`` draws the vectors (inject it: tests fix it)."""
        n = self.n
        if len(product) != n * n or rounds < 1:
            return False
        c = np.frombuffer(product, dtype=np.uint8).reshape(n, n)
        if int(c.max(initial=0)) >= modulus:
            return False  # not reduced: not what the commitment is defined over
        gen = np.random.Generator(np.random.PCG64(rng.getrandbits(128)))
        r = gen.integers(0, modulus, size=(n, rounds)).astype(np.float64)
        br = np.empty((n, rounds), dtype=np.float64)
        for i in range(0, n, block_rows):
            br[i:i + block_rows] = entries(self.b_raw[i:i + block_rows], np.float64) @ r
        br = np.mod(br, modulus)
        for i in range(0, n, block_rows):
            abr = np.mod(entries(self.a_raw[i:i + block_rows], np.float64) @ br, modulus)
            cr = np.mod(c[i:i + block_rows].astype(np.float64) @ r, modulus)
            if not np.array_equal(abr, cr):
                return False
        return True


def verify_product(challenge_digest: bytes, seed: bytes, n: int, product: bytes, commitment: bytes, *,
                   rounds: int, rng: Random) -> bool:
    """The streamed product hashes to the commitment and passes Freivalds."""
    if len(product) != n * n or commitment_of(challenge_digest, product) != commitment:
        return False
    return Instance.from_seed(seed, n).freivalds(product, rounds=rounds, rng=rng)


def product_digest(product: bytes) -> str:
    """A short name for a product in logs and tests."""
    return hashlib.sha256(product).hexdigest()[:16]
