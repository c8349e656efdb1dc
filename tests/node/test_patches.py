"""The py-libp2p speed patches keep libp2p's contract, and are really applied.

Three layers: each patched function against upstream's on the same input
(Hypothesis where the input space is large: any byte stream and any split of
it gives the same messages and the same errors); real hosts on 127.0.0.1 with
and without the patches (messages delivered in order and intact, invalid ones
rejected, a crashing validator does not end a peer's reader); and counters of
the work the patches remove (writes, reads, window updates, envelope
verifies), which fail if a patch is lost.  No timings: speed is measured by
``benchmarks/adverts.py``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.peer.id import ID
from libp2p.pubsub import pubsub as ps_mod
from libp2p.pubsub import validators
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.utils import varint
from libp2p.utils.varint import encode_varint_prefixed

from p2pgpu.node import _patches

TOPIC = "/p2pgpu/test/1"

# Upstream's functions, from the modules the patches leave alone (they rebind
# the names inside libp2p.pubsub.pubsub only).
UPSTREAM_READ = varint.read_varint_prefixed_bytes_limited
UPSTREAM_SIGNATURE_VALIDATOR = validators.signature_validator


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """All patches on for the test; the previous state restored after."""
    monkeypatch.delenv(_patches.DISABLE_ENV, raising=False)
    before = _patches.installed()
    _patches.apply()
    yield
    _patches.remove()
    _patches.apply(only=before)


@pytest.fixture
def upstream() -> Iterator[None]:
    before = _patches.installed()
    _patches.remove()
    yield
    _patches.apply(only=before)


# --- the layer itself ----------------------------------------------------------


def test_apply_is_idempotent_and_remove_restores_upstream(upstream: None) -> None:
    originals = {
        "send": ps_mod.Pubsub.handle_sending_messages,
        "read": ps_mod.read_varint_prefixed_bytes_limited,
        "reader": ps_mod.Pubsub.continuously_read_stream,
    }
    first = _patches.apply()
    assert first == list(_patches.PATCHES)
    assert _patches.apply() == first
    assert ps_mod.read_varint_prefixed_bytes_limited.__p2pgpu_patch__ == "buffered_reads"
    # The node's own Pubsub and GossipSub are subclasses: upstream's classes
    # are left as they are.
    assert ps_mod.Pubsub.handle_sending_messages is originals["send"]
    assert ps_mod.Pubsub.continuously_read_stream is originals["reader"]
    assert issubclass(_patches.FastPubsub, ps_mod.Pubsub)
    _patches.remove()
    assert _patches.installed() == []
    assert ps_mod.Pubsub.handle_sending_messages is originals["send"]
    assert ps_mod.read_varint_prefixed_bytes_limited is originals["read"]
    assert ps_mod.Pubsub.continuously_read_stream is originals["reader"]
    assert ps_mod.SUBSCRIPTION_CHANNEL_SIZE == 32


def test_refuses_another_libp2p_version(upstream: None, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_patches, "libp2p_version", lambda: "0.9.0")
    with caplog.at_level(logging.WARNING, logger=_patches.__name__):
        assert _patches.apply() == []
    assert _patches.installed() == []
    assert "0.9.0" in caplog.text
    assert not hasattr(ps_mod.read_varint_prefixed_bytes_limited, "__p2pgpu_patch__")


#: Each patch and the upstream source it stands in for.
SOURCES = [("batch_writes", "Pubsub.handle_sending_messages"),
           ("buffered_reads", "read_varint_prefixed_bytes_limited"),
           ("sender_record_cache", "env_to_send_in_RPC"),
           ("record_verify_once", "maybe_consume_signed_record"),
           ("yamux_half_window", "YamuxStream._auto_tune_and_send_window_update"),
           ("inline_inbound", "Pubsub.continuously_read_stream"),
           ("validation_cache_o1", "ValidationCache"),
           ("signer_key_cache", "signature_validator"),
           ("send_rpc_fast_path", "GossipSub.send_rpc"),
           ("queue_sizes", "RpcQueue.__init__"),
           ("yamux_bulk_frames", "YamuxStream.write"),
           ("noise_write_once", "BaseNoiseMsgReadWriter.write_msg"),
           ("noise_buffered_reads", "BaseNoiseMsgReadWriter.read_msg")]


def test_every_patch_and_every_pinned_source_is_listed() -> None:
    assert [n for n, _ in SOURCES] == list(_patches.PATCHES)
    assert sorted(src for _, src in SOURCES) == sorted(_patches.UPSTREAM_SHA256)


@pytest.mark.parametrize(("name", "source"), SOURCES, ids=[n for n, _ in SOURCES])
def test_a_patch_whose_upstream_source_changed_is_skipped(upstream: None, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture, name: str,
                                                          source: str) -> None:
    """Same version, different source (a patched release, a local edit): the
    patch that stands in for it is skipped, loudly, and its code is not used
    (an override falls back to upstream's method); the others still apply."""
    monkeypatch.delenv(_patches.DISABLE_ENV, raising=False)
    monkeypatch.setitem(_patches.UPSTREAM_SHA256, source, "0" * 64)
    with caplog.at_level(logging.WARNING, logger=_patches.__name__):
        got = _patches.apply()
    try:
        assert got == [n for n in _patches.PATCHES if n != name]
        assert f"{name} NOT applied" in caplog.text and source in caplog.text
        assert not _patches._on(name)
    finally:
        _patches.remove()


async def test_the_node_classes_take_upstreams_path_while_a_patch_is_off(upstream: None) -> None:
    queue = RpcQueue(max_size=100)
    for i in range(5):
        queue.push(rpc_with(i))
    queue.close()
    stream = RecordingStream()
    ps = object.__new__(_patches.FastPubsub)  # only its sending loop is used
    await ps.handle_sending_messages("peer", stream, queue)
    assert len(stream.writes) == 5  # upstream: one write per RPC


def test_environment_can_turn_the_layer_off(upstream: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_patches.DISABLE_ENV, "0")
    assert _patches.apply() == []
    monkeypatch.setenv(_patches.DISABLE_ENV, "1")
    assert _patches.apply() == list(_patches.PATCHES)
    _patches.remove()


def test_unknown_patch_name_is_refused(upstream: None) -> None:
    with pytest.raises(ValueError):
        _patches.apply(only=["no_such_patch"])


def test_installed_version_is_the_pinned_one() -> None:
    # If this fails, libp2p was upgraded: re-check every patch against the new
    # source before moving PINNED_VERSION (apply() is skipping them meanwhile).
    assert _patches.libp2p_version() == _patches.PINNED_VERSION


# --- buffered reads: same messages and errors as upstream --------------------------


class ChunkReader:
    """Serves a byte string in the given chunk sizes; counts read calls."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data = data
        self.cuts = cuts
        self.pos = 0
        self.reads = 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        size = self.cuts[self.reads % len(self.cuts)] if self.cuts else len(self.data)
        take = min(n if n is not None and n >= 0 else len(self.data), max(size, 1))
        chunk = self.data[self.pos:self.pos + take]
        self.pos += len(chunk)
        return chunk


async def read_all(fn: Any, reader: ChunkReader, max_length: int) -> tuple[list[bytes], str | None]:
    out = []
    try:
        for _ in range(1000):
            out.append(await fn(reader, max_length))
    except (IncompleteReadError, MessageTooLarge, ParseError) as exc:
        return out, type(exc).__name__
    return out, None


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=300), max_size=12),
    tail=st.binary(max_size=12),
    cuts=st.lists(st.integers(1, 400), max_size=6),
    max_length=st.sampled_from([1, 64, 200, 1 << 20]),
)
def test_buffered_reads_match_upstream(messages: list[bytes], tail: bytes, cuts: list[int],
                                       max_length: int) -> None:
    stream = b"".join(encode_varint_prefixed(m) for m in messages) + tail
    with _state(on=["buffered_reads"]):
        patched_fn = ps_mod.read_varint_prefixed_bytes_limited

    async def both() -> None:
        want = await read_all(UPSTREAM_READ, ChunkReader(stream, cuts), max_length)
        got = await read_all(patched_fn, ChunkReader(stream, cuts), max_length)
        assert got == want

    trio.run(both)


@pytest.mark.parametrize("data, error", [
    (b"", IncompleteReadError),
    (b"\x85", IncompleteReadError),  # prefix cut
    (b"\x05abc", IncompleteReadError),  # body cut
    (b"\xff" * 11, ParseError),  # varint over 64 bits
    (encode_varint_prefixed(b"x" * 100), MessageTooLarge),
])
async def test_buffered_reads_errors(patched: None, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        await ps_mod.read_varint_prefixed_bytes_limited(ChunkReader(data, []), 64)


async def test_buffered_reads_take_one_read_per_chunk(patched: None) -> None:
    stream = b"".join(encode_varint_prefixed(b"advert %d" % i * 20) for i in range(50))
    reader = ChunkReader(stream, [])
    got = [await ps_mod.read_varint_prefixed_bytes_limited(reader, 1 << 20) for _ in range(50)]
    assert got == [b"advert %d" % i * 20 for i in range(50)]
    assert reader.reads == 1  # upstream: 100 (a prefix byte, then the body)


# --- batched writes -------------------------------------------------------------------


class RecordingStream:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.writes: list[bytes] = []
        self.fail = fail

    async def write(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append(data)


class DeadPeers:
    def __init__(self) -> None:
        self.dead: list[Any] = []

    def _handle_dead_peer(self, peer_id: Any) -> None:
        self.dead.append(peer_id)


def rpc_with(i: int, *, control: bool = False) -> rpc_pb2.RPC:
    rpc = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=b"m%d" % i, topicIDs=[TOPIC], seqno=i.to_bytes(8, "big"))])
    if control:
        rpc.control.graft.append(rpc_pb2.ControlGraft(topicID=TOPIC))
    return rpc


async def test_batched_writes_keep_order_and_bytes(patched: None) -> None:
    queue = RpcQueue(max_size=100)
    rpcs = [rpc_with(i, control=(i % 7 == 3)) for i in range(40)]
    for r in rpcs:
        assert queue.push(r, priority=r.HasField("control"))
    queue.close()
    stream, owner = RecordingStream(), DeadPeers()
    await _patches.FastPubsub.handle_sending_messages(owner, "peer", stream, queue)
    assert len(stream.writes) == 1  # upstream: 40
    reader = ChunkReader(b"".join(stream.writes), [])
    got = [rpc_pb2.RPC.FromString(await UPSTREAM_READ(reader, 1 << 20)) for _ in range(40)]
    # priority (control) RPCs first, each tier in push order: exactly upstream's pop order
    want = [r for r in rpcs if r.HasField("control")] + [r for r in rpcs if not r.HasField("control")]
    assert got == want
    assert owner.dead == []


async def test_batched_writes_report_a_closed_stream(patched: None) -> None:
    from libp2p.network.stream.exceptions import StreamClosed

    queue = RpcQueue()
    queue.push(rpc_with(1))
    owner = DeadPeers()
    await _patches.FastPubsub.handle_sending_messages(owner, "peer", RecordingStream(StreamClosed()), queue)
    assert owner.dead == ["peer"]


async def test_batched_writes_are_bounded(patched: None) -> None:
    queue = RpcQueue(max_size=200)
    big = [rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes(5000), seqno=i.to_bytes(8, "big"))]) for i in range(60)]
    for r in big:
        queue.push(r)
    queue.close()
    stream = RecordingStream()
    await _patches.FastPubsub.handle_sending_messages(DeadPeers(), "peer", stream, queue)
    assert len(stream.writes) > 1
    assert all(len(w) <= _patches.write_batch_bytes_max + 6000 for w in stream.writes)
    assert sum(len(w) for w in stream.writes) == sum(len(encode_varint_prefixed(r.SerializeToString())) for r in big)


# --- message signatures: same verdicts as upstream -----------------------------------


def signed_message(key_pair: Any, data: bytes, seqno: int) -> rpc_pb2.Message:
    """A message signed exactly as ``Pubsub.publish`` signs it."""
    msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC], from_id=ID.from_pubkey(key_pair.public_key).to_bytes(),
                          seqno=seqno.to_bytes(8, "big"))
    msg.signature = key_pair.private_key.sign(validators.PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = key_pair.public_key.serialize()
    return msg


ED_KEYS = [create_new_key_pair(hashlib.sha256(b"k%d" % i).digest()) for i in range(3)]


@settings(max_examples=200, deadline=None)
@given(
    signer=st.integers(0, 2),
    data=st.binary(max_size=64),
    field=st.sampled_from(["none", "data", "seqno", "signature", "topic", "from_id", "key", "no_sig", "other_key"]),
    flip=st.integers(0, 10_000),
)
def test_signature_verdicts_match_upstream(signer: int, data: bytes, field: str, flip: int) -> None:
    msg = signed_message(ED_KEYS[signer], data, 7)
    if field in ("data", "seqno", "signature", "from_id", "key"):
        raw = bytearray(getattr(msg, field) or b"\x00")
        raw[flip % len(raw)] ^= 1 << (flip % 8)
        setattr(msg, field, bytes(raw))
    elif field == "topic":
        msg.topicIDs[0] = TOPIC + "x"
    elif field == "no_sig":
        msg.signature = b""
    elif field == "other_key":
        msg.key = ED_KEYS[(signer + 1) % 3].public_key.serialize()
    with _state(on=["signer_key_cache"]):
        patched_fn = ps_mod.signature_validator

    def verdict(fn: Any) -> Any:
        try:
            return bool(fn(msg))
        except Exception as exc:  # noqa: BLE001 - comparing upstream's exception type
            return type(exc).__name__

    assert verdict(patched_fn) == verdict(UPSTREAM_SIGNATURE_VALIDATOR)
    if field == "none":
        assert verdict(patched_fn) is True
    if field in ("data", "seqno", "signature", "topic", "no_sig"):
        assert verdict(patched_fn) is False


def test_signature_of_other_key_types_goes_upstream(patched: None) -> None:
    kp = create_secp256k1_key_pair(hashlib.sha256(b"secp").digest())
    msg = signed_message(kp, b"hello", 1)
    assert ps_mod.signature_validator(msg) is True
    msg.data = b"hellp"
    assert ps_mod.signature_validator(msg) is False


# --- the validation cache: same LRU as upstream --------------------------------------


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 12), st.booleans()), max_size=80))
def test_validation_cache_matches_upstream(ops: list[tuple[str, int, bool]]) -> None:
    """An exact LRU of ``max_size`` entries, and it answers whatever upstream
    answers (upstream also evicts a neighbour when re-putting a key while full)."""
    import collections

    upstream_cache = cache_class(patched=False)(ttl=300, max_size=5)
    fast = cache_class(patched=True)(ttl=300, max_size=5)
    model: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
    for op, key, valid in ops:
        k = b"%d" % key
        if op == "put":
            result = ps_mod.ValidationResult(is_valid=valid, timestamp=1e18)
            upstream_cache.put(k, result)
            fast.put(k, result)
            model[k] = result
            model.move_to_end(k)
            while len(model) > 5:
                model.popitem(last=False)
        else:
            want = upstream_cache.get(k)
            got = fast.get(k)
            assert got == model.get(k)
            if k in model:
                model.move_to_end(k)
            # Upstream evicts a neighbour instead of the oldest entry when a key
            # is re-put while full, so either side may miss a key the other
            # still has; where both answer, they must agree.
            assert want is None or got is None or got == want
        assert list(fast.cache) == list(model)


def cache_class(*, patched: bool) -> Any:
    """A stand-alone copy of ValidationCache with upstream's or the patched methods."""
    with _state(on=["validation_cache_o1"] if patched else []):
        methods = {k: ps_mod.ValidationCache.__dict__[k] for k in ("__init__", "get", "put", "_remove")}
    return type("ValidationCacheCopy", (), methods)


def test_validation_cache_expires(patched: None) -> None:
    cache = ps_mod.ValidationCache(ttl=10, max_size=5)
    cache.put(b"old", ps_mod.ValidationResult(is_valid=True, timestamp=0.0))
    assert cache.get(b"old") is None
    assert b"old" not in cache.cache


# --- the send_rpc fast path ------------------------------------------------------------


class QueuesOnly:
    def __init__(self, peer: Any) -> None:
        self.peer_queues = {peer: RpcQueue()}


def test_send_rpc_shares_one_rpc_and_keeps_piggybacked_control(patched: None) -> None:
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11

    gs = _patches.FastGossipSub([PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=4)
    gs.pubsub = QueuesOnly("p")  # a unit test of the router: only its queues are used
    rpc = rpc_with(1)
    gs.send_rpc("p", rpc)
    assert gs.pubsub.peer_queues["p"]._queue.pop() is rpc
    # Deferred control (a GRAFT to retry) goes upstream's way: copied and attached.
    gs.mesh[TOPIC] = {"p"}
    gs._pending_control["p"].graft.append(rpc_pb2.ControlGraft(topicID=TOPIC))
    gs.send_rpc("p", rpc)
    queued = gs.pubsub.peer_queues["p"]._queue
    sent = [queued.pop() for _ in range(len(queued))]  # upstream's splitter: messages, then control
    assert all(r is not rpc for r in sent)
    assert [m for r in sent for m in r.publish] == list(rpc.publish)
    assert [g.topicID for r in sent for g in r.control.graft] == [TOPIC]
    assert not rpc.HasField("control")
    # An RPC with nothing in it but our peer record goes upstream's way too.
    gs.send_rpc("p", rpc_pb2.RPC(senderRecord=b"record"))
    assert queued.pop() == rpc_pb2.RPC(senderRecord=b"record")


# --- signed peer records ---------------------------------------------------------------


class FakeHost:
    """A unit test of the record cache: only the peerstore is used."""

    def __init__(self) -> None:
        from libp2p.peer.peerstore import PeerStore

        self.store = PeerStore()

    def get_peerstore(self) -> Any:
        return self.store


def peer_record_bytes(key_pair: Any, seq: int) -> bytes:
    from libp2p.peer.envelope import seal_record
    from libp2p.peer.peer_record import PeerRecord
    from multiaddr import Multiaddr

    pid = ID.from_pubkey(key_pair.public_key)
    record = PeerRecord(pid, [Multiaddr("/ip4/127.0.0.1/tcp/4001")], seq)
    return seal_record(record, key_pair.private_key).marshal_envelope()


def test_peer_record_is_verified_once_and_forgeries_still_refused(patched: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from libp2p.pubsub import utils

    calls = []
    real = utils.consume_envelope
    monkeypatch.setattr(utils, "consume_envelope", lambda *a: calls.append(1) or real(*a))
    host, kp = FakeHost(), ED_KEYS[0]
    pid = ID.from_pubkey(kp.public_key)
    good = rpc_pb2.RPC(senderRecord=peer_record_bytes(kp, 1))
    for _ in range(20):
        assert ps_mod.maybe_consume_signed_record(good, host, pid)
    assert len(calls) == 1  # upstream: 20
    forged = bytearray(good.senderRecord)
    forged[-3] ^= 0xFF  # inside the signature
    assert not ps_mod.maybe_consume_signed_record(rpc_pb2.RPC(senderRecord=bytes(forged)), host, pid)
    other = ID.from_pubkey(ED_KEYS[1].public_key)  # a record for someone else
    assert not ps_mod.maybe_consume_signed_record(good, host, other)
    assert ps_mod.maybe_consume_signed_record(rpc_pb2.RPC(), host, pid)  # no record: fine


# --- real hosts on 127.0.0.1 -----------------------------------------------------------


@asynccontextmanager
async def open_node(index: int) -> AsyncIterator[tuple[Any, Any]]:
    """A host built as the node builds it (Noise only, Yamux, meshsub v1.1/v1.0)."""
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.tools.anyio_service import background_trio_service
    from multiaddr import Multiaddr

    kp = create_new_key_pair(hashlib.sha256(b"test-node-%d" % index).digest())
    host = new_host(key_pair=kp, sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519().private_key)},
                    muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=1))
    gs = _patches.FastGossipSub([PROTOCOL_ID_V11, PROTOCOL_ID], degree=3, degree_low=2, degree_high=4,
                                heartbeat_interval=1, spam_protection_enabled=False, eclipse_protection_enabled=False)
    ps = _patches.FastPubsub(host, gs)
    try:
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                async with background_trio_service(ps), background_trio_service(gs):
                    await ps.wait_until_ready()
                    yield host, ps
            finally:
                # leaving host.run() leaves the swarm's sockets open: close them
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await host.get_network().close()
    finally:
        ps.seen_messages.stop()


async def open_net(stack: AsyncExitStack, n: int, first: int) -> list[tuple[Any, Any]]:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    nodes = [await stack.enter_async_context(open_node(first + i)) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            await nodes[i][0].connect(info_from_p2p_addr(nodes[j][0].get_addrs()[0]))
    for i in range(n):
        for j in range(n):
            if i != j:
                await nodes[i][1].wait_for_peer(nodes[j][0].get_id(), timeout=30)
    return nodes


class Counters:
    """Counts the work the patches remove, across all hosts of a test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from libp2p.network.stream.net_stream import NetStream
        from libp2p.pubsub import utils
        from libp2p.stream_muxer.yamux.yamux import YamuxStream

        self.n = {"writes": 0, "reads": 0, "window_updates": 0, "record_verifies": 0}

        def counting(key: str, fn: Any) -> Any:
            async def wrapper(*a: Any, **kw: Any) -> Any:
                self.n[key] += 1
                return await fn(*a, **kw)
            return wrapper

        monkeypatch.setattr(NetStream, "write", counting("writes", NetStream.write))
        monkeypatch.setattr(NetStream, "read", counting("reads", NetStream.read))
        monkeypatch.setattr(YamuxStream, "send_window_update",
                            counting("window_updates", YamuxStream.send_window_update))
        real = utils.consume_envelope

        def consume(*a: Any) -> Any:
            self.n["record_verifies"] += 1
            return real(*a)

        monkeypatch.setattr(utils, "consume_envelope", consume)


async def gossip_run(monkeypatch: pytest.MonkeyPatch, count: int) -> tuple[dict[str, int], list[list[bytes]]]:
    """Three hosts in a full mesh; the first publishes ``count`` messages in
    groups of 16; returns the work counters and what each other host got."""
    async with AsyncExitStack() as stack:
        nodes = await open_net(stack, 3, 0)
        invalid: list[bytes] = []

        def validator(_forwarder: Any, msg: Any) -> bool:
            if msg.data.startswith(b"bad"):
                invalid.append(msg.data)
                return False
            return True

        subs = []
        for _host, ps in nodes:
            ps.set_topic_validator(TOPIC, validator, is_async_validator=False)
            subs.append(await ps.subscribe(TOPIC))
        for i in range(3):
            for j in range(3):
                if i != j:
                    await nodes[i][1].wait_for_mesh(nodes[j][0].get_id(), TOPIC, timeout=30)
        counters = Counters(monkeypatch)
        sent = [b"msg %04d " % i + bytes(300) for i in range(count)]
        got: list[list[bytes]] = [[], []]

        async def consume(k: int) -> None:
            while len(got[k]) < count:
                got[k].append((await subs[k + 1].get()).data)

        publisher = nodes[0][1]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, 0)
                nursery.start_soon(consume, 1)
                for i, data in enumerate(sent):
                    await publisher.publish(TOPIC, data)
                    if i % 16 == 15:
                        await publisher.publish(TOPIC, b"bad %d" % i)  # rejected, never delivered
                        # upstream's queues hold 32 RPCs and drop the rest: let them drain
                        while any(len(q) for q in publisher.peer_queues.values()):
                            await trio.sleep(0.001)
        assert got == [sent, sent]
        assert invalid and all(d.startswith(b"bad") for d in invalid)
        result = dict(counters.n), got
        # Let relayed duplicates settle before the hosts stop: upstream's reader
        # can spawn a task into its closing nursery if one arrives during
        # shutdown (see test_gossip_upstream_does_the_work_the_patches_remove).
        with trio.move_on_after(5):
            while any(len(q) for _h, ps in nodes for q in ps.peer_queues.values()):
                await trio.sleep(0.01)
        await trio.sleep(0.3)
        return result


async def test_gossip_delivers_in_order_intact_with_patches(patched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    counts, _ = await gossip_run(monkeypatch, 96)
    # What the patches remove (upstream, 96 messages: see the next test).
    assert counts["writes"] <= 60
    assert counts["reads"] <= 100
    assert counts["window_updates"] <= 4
    assert counts["record_verifies"] <= 6


async def test_gossip_upstream_does_the_work_the_patches_remove(upstream: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[dict[str, int]] = []

    async def run() -> None:
        runs.append((await gossip_run(monkeypatch, 96))[0])

    try:
        await run()
    except* RuntimeError as group:
        # Upstream's shutdown race (py-libp2p 0.8.1, continuously_read_stream:
        # manager.run_task(push_msg) into a closed nursery), which the inline
        # reader patch avoids; it only happens after the counts were taken.
        if not runs or any("Nursery is closed" not in str(e) for e in _leaves(group)):
            raise
    counts = runs[0]
    assert counts["writes"] >= 96
    assert counts["reads"] >= 2 * 96
    assert counts["window_updates"] >= 96
    assert counts["record_verifies"] >= 96


async def test_reader_survives_a_crashing_validator(patched: None) -> None:
    async with AsyncExitStack() as stack:
        (_h0, ps0), (h1, ps1) = await open_net(stack, 2, 10)

        def validator(_forwarder: Any, msg: Any) -> bool:
            if msg.data == b"boom":
                raise RuntimeError("validator bug")
            return True

        ps1.set_topic_validator(TOPIC, validator, is_async_validator=False)
        sub = await ps1.subscribe(TOPIC)
        await ps0.subscribe(TOPIC)
        await ps0.wait_for_mesh(h1.get_id(), TOPIC, timeout=30)
        await ps0.publish(TOPIC, b"boom")
        await ps0.publish(TOPIC, b"after")
        with trio.fail_after(30):
            assert (await sub.get()).data == b"after"


async def test_async_validators_still_run(patched: None) -> None:
    async with AsyncExitStack() as stack:
        (_h0, ps0), (h1, ps1) = await open_net(stack, 2, 20)
        seen = []

        async def validator(_forwarder: Any, msg: Any) -> bool:
            await trio.sleep(0.01)
            seen.append(msg.data)
            return msg.data != b"no"

        ps1.set_topic_validator(TOPIC, validator, is_async_validator=True)
        sub = await ps1.subscribe(TOPIC)
        await ps0.subscribe(TOPIC)
        await ps0.wait_for_mesh(h1.get_id(), TOPIC, timeout=30)
        for data in (b"no", b"yes"):
            await ps0.publish(TOPIC, data)
        with trio.fail_after(30):
            assert (await sub.get()).data == b"yes"
        assert seen[:2] == [b"no", b"yes"] or sorted(seen[:2]) == [b"no", b"yes"]


async def test_queues_are_sized_for_the_rate(patched: None) -> None:
    assert ps_mod.RpcQueue()._queue.max_size == _patches.outbound_queue_size
    async with AsyncExitStack() as stack:
        (_h, ps), = await open_net(stack, 1, 30)
        sub = await ps.subscribe(TOPIC)
        assert sub.receive_channel.statistics().max_buffer_size == _patches.subscription_buffer_size


# --- helpers ---------------------------------------------------------------------------


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class _state:
    """Within the block exactly the named patches are installed; restored after."""

    def __init__(self, on: list[str]) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.before = _patches.installed()
        _patches.remove()
        _patches.apply(only=self.on)

    def __exit__(self, *exc: object) -> None:
        _patches.remove()
        _patches.apply(only=self.before)


def test_named_patches_can_be_skipped_for_a_benchmark(upstream: None, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``P2PGPU_LIBP2P_PATCHES_SKIP`` (benchmarks/transfer_ab.py) leaves out the
    named patches and only those; an explicit ``apply(only=...)`` ignores it."""
    monkeypatch.delenv(_patches.DISABLE_ENV, raising=False)
    monkeypatch.setenv(_patches.SKIP_ENV, "noise_write_once,yamux_bulk_frames")
    with caplog.at_level(logging.WARNING, logger=_patches.__name__):
        got = _patches.apply()
    try:
        assert got == [n for n in _patches.PATCHES if n not in ("noise_write_once", "yamux_bulk_frames")]
        assert "noise_write_once skipped" in caplog.text
    finally:
        _patches.remove()
    try:
        assert _patches.apply(only=["noise_write_once"]) == ["noise_write_once"]
    finally:
        _patches.remove()
