"""``/p2pgpu/challenge/1.0.0`` between real libp2p hosts on 127.0.0.1
(``p2pgpu/node/_challenge.py``), with the real NumPy backend.

An honest CPU prover passes a challenge sized for the CPU entry; the same
prover challenged for an H100 gives up at the deadline and the claim is
refused; a prover that commits to a wrong product, answers another
challenge, or streams a product of the wrong length is caught; a busy prover is retried,
not refused; hostile challenge frames cost the sender its stream and leave
the prover serving.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import AdvertBook, Identity, Kind, seal
from p2pgpu.core._challenge import Verdict, answer, commitment_of, decode_challenge
from p2pgpu.gpu._matmul import NumpyBackend
from p2pgpu.node._challenge import CHALLENGE_PROTOCOL, ChallengeService
from p2pgpu.node._stack import open_stack
from p2pgpu.node._streams import guarded, read_frame, write_frame


def wall_ms() -> int:
    return int(trio.current_time() * 1000) + 1_700_000_000_000


class WrongBackend:
    """Computes honestly, then changes one entry: the cheapest lie to spot."""

    name = "wrong"

    def product_mod_p(self, seed: bytes, n: int, *, should_stop: Callable[[], bool]) -> bytes:
        good = bytearray(NumpyBackend().product_mod_p(seed, n, should_stop=should_stop))
        good[n + 3] = (good[n + 3] + 1) % 251
        return bytes(good)


@asynccontextmanager
async def pair(*, backend: Any = None, raw_handler: Any = None) -> AsyncIterator[tuple[ChallengeService,
                                                                                      ChallengeService, Counter[str]]]:
    """Challenger A and prover B, connected; B serves challenges with
    ``backend`` (or answers with ``raw_handler``)."""
    counts: Counter[str] = Counter()
    async with AsyncExitStack() as ex:
        a = await ex.enter_async_context(open_stack(b"a" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
        b = await ex.enter_async_context(open_stack(b"b" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
        ids = Identity(b"a" * 32), Identity(b"b" * 32)
        svc = [ChallengeService(identity=i, book=AdvertBook(network="strict", allow_simulated=False),
                                allow_simulated=False, now_ms=wall_ms, counts=counts, host=lambda s=s: s.host,
                                backend=backend or NumpyBackend(), rng=random.Random(7))
               for i, s in zip(ids, (a, b))]
        handler = raw_handler(svc[1]) if raw_handler else svc[1].serve
        b.host.set_stream_handler(CHALLENGE_PROTOCOL, guarded("challenge", handler, counts, timeout_s=120))
        await a.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(b.addrs()[0])))
        async with trio.open_nursery() as nursery:
            for s in svc:
                await nursery.start(s.run)
            yield svc[0], svc[1], counts
            nursery.cancel_scope.cancel()


async def test_an_honest_cpu_prover_passes_a_challenge_sized_for_it() -> None:
    async with pair() as (a, b, counts):
        row = await a.issue(b.identity.peer_id, "cpu")
        assert row["outcome"] == "passed", row
        assert row["n"] == 832 and row["elapsed_ms"] <= row["deadline_ms"]
        assert a.claims.verdict(b.identity.peer_id, "cpu", wall_ms()) is Verdict.BELIEVED
        assert counts["challenge:served_ok"] == 1 and counts["challenge:issued_passed"] == 1


async def test_a_cpu_claiming_an_h100_gives_up_at_the_deadline_and_is_refused() -> None:
    async with pair() as (a, b, counts):
        row = await a.issue(b.identity.peer_id, "h100")
        assert row["n"] == 8192 and row["outcome"] == "late", row
        assert row["elapsed_ms"] >= row["deadline_ms"]
        assert a.claims.verdict(b.identity.peer_id, "h100", wall_ms()) is Verdict.REFUSED
        with trio.fail_after(30):  # the prover's thread stopped at its own deadline
            while b.gate.busy:
                await trio.sleep(0.1)
        assert counts["challenge:served_abandoned"] == 1


async def test_a_wrong_product_is_caught() -> None:
    async with pair(backend=WrongBackend()) as (a, b, _):
        row = await a.issue(b.identity.peer_id, "cpu", n=256)
        assert row["outcome"] == "wrong", row
        assert a.claims.verdict(b.identity.peer_id, "cpu", wall_ms()) is Verdict.REFUSED


def cheat(kind: str) -> Callable[[ChallengeService], Any]:
    """Provers that answer in time but lie in the protocol."""

    def make(svc: ChallengeService) -> Any:
        async def handler(stream: Any) -> None:
            sc = decode_challenge(await read_frame(stream, Kind.CHALLENGE.bytes_max))
            n = sc.challenge.n
            product = NumpyBackend().product_mod_p(sc.challenge.seed, n, should_stop=lambda: False)
            if kind == "short":
                await write_frame(stream, answer(svc.identity, sc, "ok", commitment_of(sc.digest, product)).wire)
                await write_frame(stream, product[:-1])
            elif kind == "long":
                await write_frame(stream, answer(svc.identity, sc, "ok", commitment_of(sc.digest, product)).wire)
                await write_frame(stream, product + b"\x00")
            elif kind == "other_commitment":
                await write_frame(stream, answer(svc.identity, sc, "ok", commitment_of(b"x" * 32, product)).wire)
                await write_frame(stream, product)
            elif kind == "answer_for_another_challenge":
                body = {**sc.challenge.to_obj(), "seed": b"s" * 32}
                other = decode_challenge(seal(Identity(b"a" * 32), Kind.CHALLENGE, body).to_bytes())
                await write_frame(stream, answer(svc.identity, other, "ok", commitment_of(other.digest, product)).wire)
            elif kind == "busy":
                await write_frame(stream, answer(svc.identity, sc, "busy", detail="later").wire)
        return handler
    return make


async def test_protocol_lies_are_caught() -> None:
    for kind, outcome, verdict in [("short", "no_answer", Verdict.UNTESTED),
                                   ("long", "bad_answer", Verdict.REFUSED),
                                   ("other_commitment", "wrong", Verdict.REFUSED),
                                   ("answer_for_another_challenge", "bad_answer", Verdict.REFUSED),
                                   ("busy", "busy", Verdict.UNTESTED)]:
        async with pair(raw_handler=cheat(kind)) as (a, b, _):
            row = await a.issue(b.identity.peer_id, "cpu", n=128)
            assert (row["outcome"], row["verdict"]) == (outcome, verdict.value), (kind, row)


async def test_hostile_challenge_frames_cost_the_sender_its_stream() -> None:
    async with pair() as (a, b, counts):
        host = a._host()
        me = a.identity
        good = None
        for frame in [b"\xff" * 10, b"\x00" * 2000, seal(Identity(b"z" * 32), Kind.CHALLENGE, {"x": 1}).to_bytes()]:
            stream = await host.new_stream(b._host().get_id(), [CHALLENGE_PROTOCOL])
            await write_frame(stream, frame)
            with trio.fail_after(10):
                try:
                    got = await read_frame(stream, 4096)
                except Exception:  # noqa: BLE001 - a reset stream is the expected answer
                    got = None
            assert got in (None, b"")
        assert sum(v for k, v in counts.items() if k.startswith("challenge:") and "served" not in k) >= 3
        # A challenge addressed to another prover is refused too; the prover still serves the next one.
        from p2pgpu.core._challenge import make_challenge

        wrong = make_challenge(me, prover=Identity(b"q" * 32).peer_id, model="cpu", rng=random.Random(1),
                               now_ms=wall_ms(), n=64)
        stream = await host.new_stream(b._host().get_id(), [CHALLENGE_PROTOCOL])
        await write_frame(stream, wrong.wire)
        with trio.fail_after(10):
            try:
                good = await read_frame(stream, 4096)
            except Exception:  # noqa: BLE001 - reset, as above
                good = None
        assert good in (None, b"")
        row = await a.issue(b.identity.peer_id, "cpu", n=128)
        assert row["outcome"] == "passed"
