"""The hardware-challenge protocol ``/p2pgpu/challenge/1.0.0`` on a node.

One stream per challenge (``docs/protocol.md``): the challenger writes a
signed challenge frame; the prover answers with a signed answer frame (``ok``
with a commitment, ``busy`` or ``refused``), then, after ``ok``, the ``n^2``
bytes of the product ``C mod 251`` in frames of at most 1 MiB.  The
challenger times the answer against the challenge's deadline, reads the
product within a transfer allowance, checks it off the event loop, and
records the outcome in its :class:`~p2pgpu.core._challenge.ClaimBook`, whose
``view`` the advert book applies before matching: a refused claim's GPUs are
not offered to jobs.

Everything decided here is decided by the core (admission, verdicts, what to
challenge next); this module moves bytes, times them, and runs the matrix
work in a worker thread that stops at the prover's own deadline or when the
node shuts down (nothing outlives the service's nursery).  Seeds and
Freivalds vectors come from the OS (``random.SystemRandom``): a Mersenne
Twister's output can be predicted from enough past seeds, which would let a
liar precompute the next challenge.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pgpu.core import Advert, AdvertBook, Identity, Kind, PeerMisbehaved
from p2pgpu.core._challenge import (
    Admitted,
    ClaimBook,
    ClaimPolicy,
    Outcome,
    ProverGate,
    SignedChallenge,
    answer,
    commitment_hasher,
    deadline_ms_max,
    judge,
    make_challenge,
    model_spec,
    n_max,
    product_frame_bytes,
    read_answer,
    rounds_default,
    transfer_ms_for,
)
from p2pgpu.gpu._matmul import Abandoned, Backend, Instance, pick_backend

from ._streams import StreamGone, read_frame, write_frame

log = logging.getLogger("p2pgpu.challenge")

CHALLENGE_PROTOCOL = "/p2pgpu/challenge/1.0.0"
#: How long a served challenge may hold its stream: the longest deadline plus
#: the transfer of the largest product.
serve_timeout_s = (deadline_ms_max + transfer_ms_for(n_max)) / 1000 + 10
open_timeout_s = 5.0
results_kept_max = 256
auto_interval_s = 5.0


class ChallengeService:
    """Serves challenges to this node and issues them to others."""

    def __init__(self, *, identity: Identity, book: AdvertBook, allow_simulated: bool,
                 now_ms: Callable[[], int], counts: Counter[str], host: Callable[[], Any],
                 dial: Callable[[str], Any] | None = None, backend: Backend | str = "auto",
                 auto: bool = False, n_max_served: int = n_max, policy: ClaimPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self.identity = identity
        self.book = book
        self.now_ms = now_ms
        self.counts = counts
        self._host = host
        self._dial = dial
        # A backend named in the config is checked now (a typo fails at start,
        # not at the first challenge); "auto" is resolved on first use.
        self._backend: Backend | None = (None if backend == "auto" else
                                         pick_backend(backend) if isinstance(backend, str) else backend)
        self.auto = auto
        self.rng = rng if rng is not None else random.SystemRandom()
        self.gate = ProverGate(peer_id=identity.peer_id, n_max=n_max_served)
        self.claims = ClaimBook(allow_simulated=allow_simulated, policy=policy or ClaimPolicy())
        self.results: deque[dict[str, Any]] = deque(maxlen=results_kept_max)
        self._issuing = trio.Lock()
        self._closing = threading.Event()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = pick_backend()
        return self._backend

    def view(self, advert: Advert, now_ms: int) -> Advert:
        """The advert book's hook: what matching sees of ``advert``."""
        return self.claims.view(advert, now_ms)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Challenge due claims one at a time (when ``auto``) until cancelled."""
        task_status.started()
        try:
            if not self.auto:
                await trio.sleep_forever()
            while True:
                await trio.sleep(auto_interval_s)
                now = self.now_ms()
                live = [sa.advert for sa in self.book.adverts.values() if sa.advert.expires_at_ms > now]
                for peer_id, model in self.claims.due(live, now, me=self.identity.peer_id, limit=1):
                    await self.issue(peer_id, model)
        finally:
            self._closing.set()  # a prover thread still computing stops at its next row block

    # ---------------------------------------------------------------- prover

    async def serve(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        data = await read_frame(stream, Kind.CHALLENGE.bytes_max)
        got = self.gate.admit(data, from_peer=peer, now_ms=self.now_ms())
        if not isinstance(got, Admitted):
            self.counts[f"challenge:served_{got.status}"] += 1
            await write_frame(stream, answer(self.identity, got.challenge, got.status, detail=got.detail).wire)
            return
        sc = got.challenge
        product: bytes | None = None
        try:
            product = await self._compute(sc)
        except Abandoned as exc:
            log.info("gave up a challenge from %s (%s)", peer, exc)
        finally:
            self.gate.done()
        if product is None:
            self.counts["challenge:served_abandoned"] += 1
            await write_frame(stream, answer(self.identity, sc, "refused",
                                             detail="could not finish before the deadline").wire)
            return
        h = commitment_hasher(sc.digest)
        h.update(product)
        await write_frame(stream, answer(self.identity, sc, "ok", commitment=h.digest()).wire)
        for off in range(0, len(product), product_frame_bytes):
            await write_frame(stream, product[off:off + product_frame_bytes])
        self.counts["challenge:served_ok"] += 1

    async def _compute(self, sc: SignedChallenge) -> bytes:
        ch = sc.challenge
        abandon_at = time.monotonic() + ch.deadline_ms / 1000
        stop = self._closing
        cancelled = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or cancelled.is_set() or time.monotonic() > abandon_at

        async def watch() -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()  # our caller was cancelled: let the thread end early

        backend = self.backend
        result: bytes | Abandoned = Abandoned("not run")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                result = await trio.to_thread.run_sync(
                    partial(backend.product_mod_p, ch.seed, ch.n, should_stop=should_stop))
            except Abandoned as exc:
                result = exc  # raised outside the nursery, not as an exception group
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(result, Abandoned):
            raise result
        return result

    # ------------------------------------------------------------ challenger

    async def issue(self, peer_id: str, model: str, *, n: int | None = None,
                    rounds: int = rounds_default) -> dict[str, Any]:
        """Challenge ``peer_id``'s claim of ``model`` (a table key) now and
        record the outcome; one challenge leaves this node at a time."""
        if model_spec(model) is None:
            raise ValueError(f"no table entry for model {model!r}")
        async with self._issuing:
            sc = make_challenge(self.identity, prover=peer_id, model=model, rng=self.rng, now_ms=self.now_ms(), n=n)
            outcome, elapsed_ms, detail = await self._exchange(sc, rounds)
            verdict = self.claims.record(peer_id, model, outcome, self.now_ms())
        self.counts[f"challenge:issued_{outcome.value}"] += 1
        row = {"peer_id": peer_id, "model": model, "n": sc.challenge.n, "deadline_ms": sc.challenge.deadline_ms,
               "elapsed_ms": elapsed_ms, "outcome": outcome.value, "verdict": verdict.value, "detail": detail,
               "at_ms": self.now_ms()}
        self.results.append(row)
        log.info("challenge of %s for %s: %s (%s)", peer_id, model, outcome.value, detail)
        return row

    async def _exchange(self, sc: SignedChallenge, rounds: int) -> tuple[Outcome, int | None, str]:
        ch = sc.challenge
        host = self._host()
        peer = ID.from_base58(ch.prover)
        if self._dial is not None and peer not in host.get_connected_peers():
            await self._dial(ch.prover)
        stream = None
        with trio.move_on_after(open_timeout_s):
            try:
                stream = await host.new_stream(peer, [TProtocol(CHALLENGE_PROTOCOL)])
            except (BaseLibp2pError, OSError, ValueError) as exc:
                return Outcome.NO_ANSWER, None, f"cannot open a stream: {type(exc).__name__}"
        if stream is None:
            return Outcome.NO_ANSWER, None, "cannot open a stream: timed out"
        try:
            return await self._talk(stream, sc, rounds)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await stream.reset()
                except BaseLibp2pError:
                    pass  # already closed by the prover

    async def _talk(self, stream: Any, sc: SignedChallenge, rounds: int) -> tuple[Outcome, int | None, str]:
        ch = sc.challenge
        t0 = trio.current_time()
        try:
            await write_frame(stream, sc.wire)
            data = None
            with trio.move_on_after(ch.deadline_ms / 1000):
                data = await read_frame(stream, Kind.CHALLENGE_ANSWER.bytes_max)
        except (StreamGone, PeerMisbehaved) as exc:
            return Outcome.NO_ANSWER, None, f"stream failed before the answer: {exc}"
        elapsed_ms = math.ceil((trio.current_time() - t0) * 1000)
        if data is None:
            return Outcome.LATE, elapsed_ms, f"no answer within the deadline of {ch.deadline_ms} ms"
        got = read_answer(sc, data)
        early = judge(sc, got, elapsed_ms=elapsed_ms, product_ok=True)
        if early is not Outcome.PASSED or isinstance(got, Outcome):
            return early, elapsed_ms, "" if isinstance(got, Outcome) else got.answer.detail
        product = await self._read_product(stream, ch.n)
        if product is Outcome.BAD_ANSWER:
            return product, elapsed_ms, "the product stream broke the framing (a frame over what was due)"
        if not isinstance(product, bytes):
            return Outcome.NO_ANSWER, elapsed_ms, "the product did not arrive in time"
        ok = await trio.to_thread.run_sync(partial(
            _check, sc, product, got.answer.commitment, rounds, random.Random(self.rng.getrandbits(128))))
        outcome = judge(sc, got, elapsed_ms=elapsed_ms, product_ok=ok)
        return outcome, elapsed_ms, "" if ok else "the product does not match its commitment or fails Freivalds"

    async def _read_product(self, stream: Any, n: int) -> bytes | Outcome:
        """Exactly ``n^2`` bytes within the transfer allowance; ``NO_ANSWER``
        when the stream ends or stalls (retried), ``BAD_ANSWER`` for a frame
        larger than what is still due (a protocol violation: refused)."""
        want = n * n
        buf = bytearray()
        with trio.move_on_after(transfer_ms_for(n) / 1000):
            try:
                while len(buf) < want:
                    frame = await read_frame(stream, min(product_frame_bytes, want - len(buf)))
                    if not frame:
                        return Outcome.NO_ANSWER
                    buf += frame
            except StreamGone:
                return Outcome.NO_ANSWER
            except PeerMisbehaved:
                return Outcome.BAD_ANSWER
            return bytes(buf)
        return Outcome.NO_ANSWER


def _check(sc: SignedChallenge, product: bytes, commitment: bytes, rounds: int, rng: random.Random) -> bool:
    h = commitment_hasher(sc.digest)
    h.update(product)
    if h.digest() != commitment:
        return False
    return Instance.from_seed(sc.challenge.seed, sc.challenge.n).freivalds(product, rounds=rounds, rng=rng)


def challenge_handlers(service: ChallengeService) -> dict[str, Any]:
    """Control API: ``challenge.issue`` and ``challenge.claims``."""
    from ._control import ControlError

    async def issue(params: dict[str, Any]) -> dict[str, Any]:
        peer_id, model, n = params.get("peer_id"), params.get("model"), params.get("n")
        if not isinstance(peer_id, str) or not isinstance(model, str):
            raise ControlError("peer_id and model (a table key such as h100 or cpu) are required")
        if n is not None and type(n) is not int:
            raise ControlError("n must be an integer")
        try:
            return await service.issue(peer_id, model, n=n)
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    async def claims(params: dict[str, Any]) -> dict[str, Any]:
        now = service.now_ms()
        rows = [{"peer_id": p, "model": m, "outcome": r.outcome.value, "at_ms": r.at_ms,
                 "verdict": service.claims.verdict(p, m, now).value} for (p, m), r in service.claims.records.items()]
        return {"claims": sorted(rows, key=lambda r: (r["peer_id"], r["model"])), "recent": list(service.results),
                "auto": service.auto}

    return {"challenge.issue": issue, "challenge.claims": claims}
