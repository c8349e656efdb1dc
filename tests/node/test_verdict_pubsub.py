"""GossipSub validators with three answers, on real hosts (``_stack.VerdictPubsub``).

Hosts A - B - C on 127.0.0.1, all on one topic; B's validator answers by the
message's text.  ACCEPT: delivered to B and forwarded to C.  REJECT: neither,
and A's invalid-message count at B goes up (py-libp2p's score P4).  IGNORE:
neither, A's score untouched, the message marked seen so that a duplicate is
not validated again, and counted.  Before ``VerdictPubsub`` a validator could
only return a bool, and every refusal cost the forwarder score.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import GossipVerdict
from p2pgpu.node._stack import open_stack

TOPIC = "/p2pgpu/test-verdicts/1"


async def _collect(sub: Any, into: list[bytes]) -> None:
    while True:
        msg = await sub.get()
        into.append(bytes(msg.data))


async def test_accept_ignore_reject_on_real_hosts() -> None:
    async with AsyncExitStack() as ex:
        a, b, c = [await ex.enter_async_context(open_stack(bytes([k]) * 32, ["/ip4/127.0.0.1/tcp/0"],
                                                           dht_validators={})) for k in (31, 32, 33)]
        seen_by_b: list[Any] = []

        def judge(forwarder: ID, msg: Any) -> GossipVerdict:
            seen_by_b.append(msg)
            return GossipVerdict(msg.data.split(b"-")[0].decode())

        b.pubsub.set_topic_verdict_validator(TOPIC, judge)
        for s in (a, c):
            await s.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(b.addrs()[0])))
        got_b: list[bytes] = []
        got_c: list[bytes] = []
        await a.pubsub.subscribe(TOPIC)
        sub_b = await b.pubsub.subscribe(TOPIC)
        sub_c = await c.pubsub.subscribe(TOPIC)
        async with trio.open_nursery() as n:
            n.start_soon(_collect, sub_b, got_b)
            n.start_soon(_collect, sub_c, got_c)
            await trio.sleep(2.5)  # meshes form on 1 s heartbeats
            scorer = b.gossipsub.scorer
            a_id = a.host.get_id()

            async def publish(*texts: bytes) -> None:
                want = len(seen_by_b) + len(texts)
                for text in texts:
                    await a.pubsub.publish(TOPIC, text)
                with trio.fail_after(20):
                    while len(seen_by_b) < want:
                        await trio.sleep(0.05)

            await publish(b"ignore-1", b"ignore-2")
            assert b.pubsub.ignored == 2
            assert scorer.invalid_messages[a_id][TOPIC] == 0.0  # ignoring costs A nothing
            await publish(b"reject-1", b"reject-2")
            assert scorer.invalid_messages[a_id][TOPIC] > 0.0  # (it decays per heartbeat)
            await publish(b"accept-1", b"accept-2")
            with trio.fail_after(20):
                while len(got_c) < 2:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert got_b == [b"accept-1", b"accept-2"]
            assert got_c == [b"accept-1", b"accept-2"]  # only accepted messages are forwarded
            assert b.pubsub.ignored == 2
            # An ignored message was marked seen: the same message again is not validated again.
            ignored = next(m for m in seen_by_b if m.data == b"ignore-1")
            before = len(seen_by_b)
            await b.pubsub.push_msg(a_id, ignored)
            assert len(seen_by_b) == before and b.pubsub.ignored == 2
            n.cancel_scope.cancel()
