"""Small fixes to py-libp2p 0.8.1's GossipSub hot path, applied at start-up.

py-libp2p's GossipSub spends 2.5-7 ms of CPU per delivered message on this
kind of machine, almost none of it in the work a message needs (two Ed25519
verifies and a protobuf parse): it writes every queued RPC separately, reads
length prefixes one byte at a time through Yamux and Noise, rebuilds and
re-verifies the sender's signed peer record on every RPC, sends a Yamux window
update for every read, and spawns a task per inbound message.  Each fix below
replaces exactly one py-libp2p function (a method or a module-level name) with
a corrected version that keeps its contract: messages are still delivered in
order and intact, every signature is still verified, invalid messages are
still rejected.  Each comment says what upstream does wrong and the gain
measured here (``benchmarks/adverts.py``, ``docs/performance.md``); each fix
has a test in ``tests/node/test_patches.py`` that fails if it is lost.

Where the function is a method of an object the node builds itself, the fix
is an override in a subclass (:class:`FastPubsub`, :class:`FastGossipSub`:
``_stack.py`` builds those), not a replaced attribute: the batched writer, the
inline reader and the ``send_rpc`` fast path.  The override takes its fast
path only while its patch is on, so :func:`remove` and
``P2PGPU_LIBP2P_PATCHES=0`` still give upstream's behaviour.  The others
replace names the node does not own (module functions, the Yamux stream, the
validation cache, the queues).  Every fix, override or replacement, checks a
sha256 of the upstream source it stands in for (:data:`UPSTREAM_SHA256`) as
well as the library's version (``libp2p==0.8.1``): on any difference it is
skipped, loudly, so an upgrade falls back to upstream behaviour, slower but
correct, until the fix is re-checked or upstreamed.
:func:`apply` is idempotent; :func:`remove` restores upstream (tests,
benchmarks).  Call :func:`apply` before creating hosts: the queue sizes take
effect for queues created afterwards.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub

logger = logging.getLogger(__name__)

PINNED_VERSION = "0.8.1"
#: ``P2PGPU_LIBP2P_PATCHES=0`` turns the layer off (an operator's escape hatch,
#: and how benchmarks measure real nodes without it).
DISABLE_ENV = "P2PGPU_LIBP2P_PATCHES"
#: ``P2PGPU_LIBP2P_PATCHES_SKIP=name,name`` leaves out the named speed patches
#: (how ``benchmarks/transfer_ab.py`` measures one patch against the rest).
SKIP_ENV = "P2PGPU_LIBP2P_PATCHES_SKIP"
#: Outbound RPC queue per peer (upstream: 32).  With batched writes one drain
#: empties it, but a burst of adverts from several peers, each relayed to the
#: whole mesh, fills 32 slots in a few milliseconds and upstream then drops
#: silently.
outbound_queue_size = 1024
#: Messages buffered per subscription (upstream: 32, then dropped silently).
subscription_buffer_size = 4096
#: Most bytes gathered into one write by the batched sender (Noise frames
#: carry at most 65,535 bytes; Yamux splits writes into 64 KiB frames).
write_batch_bytes_max = 60 * 1024
#: Bytes asked of the stream per buffered read.
read_chunk_bytes = 64 * 1024
#: Our own signed peer record is rebuilt at most this often.
sender_record_ttl_s = 1.0
#: A byte-identical peer record from the same peer is re-consumed (its address
#: TTL refreshed in the peerstore) after this long; until then it is trusted
#: because it verified before.
peer_record_reverify_s = 60.0
peer_records_max = 4096
signer_keys_max = 4096

Undo = list[tuple[Any, str, Any]]
_installed: dict[str, Undo] = {}

#: The sha256 of each upstream function or class a patch stands in for, in
#: py-libp2p 0.8.1 (``inspect.getsource``).
UPSTREAM_SHA256: dict[str, str] = {
    "Pubsub.handle_sending_messages": "4eb0b978f9c4b1420cc6bd70e26726d25e3a369c43597983cbca95ae1fd9ea2c",
    "read_varint_prefixed_bytes_limited": "75623a1c5c4e2c39cdd128685dd7eb8c510939bf06f957489d4dccc4e7ca47fd",
    "env_to_send_in_RPC": "9fea9d702c187d224bec58beb9b09961e93c863bcad8a94baa90a79a287fed36",
    "maybe_consume_signed_record": "11b2181c27d75df4753635abc3ee3c7e9adaf6a0dd7829d8e6c416f161ef0f8b",
    "YamuxStream._auto_tune_and_send_window_update":
        "6ebcbd822fe7f996efbc9efd5dceea1e8d0d729380a807eb7e4aa81cf79ca036",
    "Pubsub.continuously_read_stream": "ac0c4ad87ca39288d70fcc5a58a842613bc8c47f32c171995a5775bc83fa4430",
    "ValidationCache": "fccf4cb10b96c6ff5094538cf23a8af7fd1c61f6575af90e971ee20742570ecd",
    "signature_validator": "4ef201cd300c8e3e0f8ff3b6806f5d24a3432a6d5a2b26136502a59ff21cee7c",
    "GossipSub.send_rpc": "9829bb1473a299fb8a54b2541fe8f05c5b7974b84c75eab114680460b0c37257",
    "RpcQueue.__init__": "29b912ed933ac51fc0fd7270d4ffe938c6a7ddc23b23787674a921c9d2b9a882",
}


class _SourceChanged(Exception):
    """The upstream function a fix replaces is not the one it was written for."""


def _source_sha256(fn: Any) -> str:
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _check_source(name: str, upstream: Any) -> None:
    """Raise :class:`_SourceChanged` unless ``upstream`` is the source the fix
    named ``name`` in :data:`UPSTREAM_SHA256` was written against."""
    if _source_sha256(upstream) != UPSTREAM_SHA256[name]:
        raise _SourceChanged(name)


def _on(name: str) -> bool:
    return name in _installed


def libp2p_version() -> str:
    return importlib.metadata.version("libp2p")


def _replace(undo: Undo, owner: Any, attr: str, new: Any, name: str) -> None:
    undo.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)))
    try:
        new.__p2pgpu_patch__ = name
    except AttributeError:
        pass  # plain values (queue sizes) cannot carry the marker
    setattr(owner, attr, new)


# --- 1. one write per drain of the outbound queue -----------------------------
# Upstream's Pubsub.handle_sending_messages pops one RPC and writes it: one
# Yamux frame, one Noise encryption and one send() per RPC, each with several
# trio lock round-trips.  Draining what is queued and writing it at once (in
# the same order, same bytes) is the largest single gain: CPU per delivered
# message 0.39 ms with all patches, 1.26 ms with all but this one (upstream
# 3.05 ms; ``benchmarks/adverts.py --only p``, docs/performance.md).


def _install_batch_writes(undo: Undo) -> None:
    # The fix is FastPubsub.handle_sending_messages; this turns it on.
    _check_source("Pubsub.handle_sending_messages", Pubsub.handle_sending_messages)


async def _batched_sending(self: Any, peer_id: Any, stream: Any, queue: Any) -> None:
    from libp2p.network.stream.exceptions import StreamClosed, StreamReset
    from libp2p.utils.varint import encode_varint_prefixed

    try:
        while True:
            rpc = await queue.pop()
            if rpc is None:
                return  # queue closed: the peer is gone
            parts = [encode_varint_prefixed(rpc.SerializeToString())]
            size = len(parts[0])
            while size < write_batch_bytes_max:
                more = queue._queue.pop()  # non-blocking, priority first, as pop()
                if more is None:
                    break
                frame = encode_varint_prefixed(more.SerializeToString())
                parts.append(frame)
                size += len(frame)
            try:
                await stream.write(b"".join(parts))
            except (StreamClosed, StreamReset):
                logger.debug("pubsub write to %s failed: stream closed or reset", peer_id)
                self._handle_dead_peer(peer_id)
                return
    except Exception:
        logger.debug("sending loop for %s terminated with error", peer_id, exc_info=True)
        self._handle_dead_peer(peer_id)


# --- 2. buffered length-prefixed reads -----------------------------------------
# Upstream reads each RPC's varint length one byte at a time, each read(1)
# going through NetStream, Yamux (two locks, a window update) and Noise.  The
# pubsub reader owns its inbound stream, so it can read what is available in
# one call and parse prefixes from its own buffer.  Same limits, same errors.
# Without it: 1.07 ms per delivery instead of 0.39 ms.


#: Unparsed bytes per pubsub stream (dropped with the stream).
_read_buffers: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()


def _install_buffered_reads(undo: Undo) -> None:
    from libp2p.exceptions import ParseError
    from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
    from libp2p.pubsub import pubsub as ps_mod

    _check_source("read_varint_prefixed_bytes_limited", vars(ps_mod)["read_varint_prefixed_bytes_limited"])

    async def read_varint_prefixed_bytes_limited(reader: Any, max_length: int) -> bytes:
        if max_length <= 0:
            raise ValueError("max_length must be greater than 0")
        data = _read_buffers.get(reader)
        if data is None:
            data = _read_buffers[reader] = bytearray()
        # The length prefix: at most 10 bytes for a 64-bit varint.
        length = shift = pos = 0
        while True:
            if pos == len(data):
                chunk = await reader.read(read_chunk_bytes)
                if not chunk:
                    raise IncompleteReadError("Stream ended while reading varint length prefix",
                                              expected_bytes=1, received_bytes=0)
                data += chunk
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if pos >= 10:
                raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
        if length >= 1 << 64:
            raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
        if length > max_length:
            raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
        end = pos + length
        while len(data) < end:
            chunk = await reader.read(read_chunk_bytes)
            if not chunk:
                raise IncompleteReadError(f"Incomplete message: expected {length}, got {len(data) - pos}",
                                          expected_bytes=length, received_bytes=len(data) - pos)
            data += chunk
        message = bytes(data[pos:end])
        del data[:end]
        return message

    _replace(undo, ps_mod, "read_varint_prefixed_bytes_limited", read_varint_prefixed_bytes_limited,
             "buffered_reads")


# --- 3. our own signed peer record, cached ---------------------------------------
# Every RPC upstream sends carries our signed peer record, and
# env_to_send_in_RPC recomputes the host's addresses (multiaddr parsing,
# ~0.2 ms) to check the cached record on every send.  Rebuild at most once a
# second instead; a changed address still reaches peers within a second.
# Without it: 0.52 ms per delivery instead of 0.39 ms.

_sender_records: weakref.WeakKeyDictionary[Any, tuple[float, tuple[bytes, bool]]] = weakref.WeakKeyDictionary()


def _install_sender_record_cache(undo: Undo) -> None:
    from libp2p.peer import peerstore
    from libp2p.pubsub import floodsub, gossipsub
    from libp2p.pubsub import pubsub as ps_mod

    original = peerstore.env_to_send_in_RPC
    _check_source("env_to_send_in_RPC", original)

    def env_to_send_in_RPC(host: Any) -> tuple[bytes, bool]:
        now = time.monotonic()
        hit = _sender_records.get(host)
        if hit is not None and now - hit[0] < sender_record_ttl_s:
            return hit[1][0], False
        result = original(host)
        _sender_records[host] = (now, result)
        return result

    for mod in (ps_mod, gossipsub, floodsub):
        _replace(undo, mod, "env_to_send_in_RPC", env_to_send_in_RPC, "sender_record_cache")


# --- 4. a peer's signed record, verified once --------------------------------------
# Upstream verifies the sender's peer record (an Ed25519 envelope) on every
# inbound RPC, and twice for RPCs with control messages (Pubsub and GossipSub
# each consume it): ~3.3 envelope verifies per delivered message.  A record
# byte-identical to one this host already accepted from the same peer is
# accepted without verifying it again; a different record is verified as
# upstream does.  Without it: 0.67 ms per delivery instead of 0.39 ms.

_peer_records: weakref.WeakKeyDictionary[Any, collections.OrderedDict[Any, tuple[bytes, float]]] = (
    weakref.WeakKeyDictionary()
)


def _install_record_verify_once(undo: Undo) -> None:
    from libp2p.pubsub import floodsub, gossipsub, utils
    from libp2p.pubsub import pubsub as ps_mod

    original = utils.maybe_consume_signed_record
    _check_source("maybe_consume_signed_record", original)

    def maybe_consume_signed_record(msg: Any, host: Any, peer_id: Any) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        record = msg.senderRecord
        known = _peer_records.get(host)
        if known is None:
            known = _peer_records[host] = collections.OrderedDict()
        now = time.monotonic()
        hit = known.get(peer_id)
        if hit is not None and hit[0] == record and now - hit[1] < peer_record_reverify_s:
            return True
        if not original(msg, host, peer_id):
            return False
        known[peer_id] = (bytes(record), now)
        known.move_to_end(peer_id)
        while len(known) > peer_records_max:
            known.popitem(last=False)
        return True

    for mod in (ps_mod, gossipsub, floodsub):
        _replace(undo, mod, "maybe_consume_signed_record", maybe_consume_signed_record, "record_verify_once")


# --- 5. Yamux window updates at half a window -------------------------------------
# Upstream (PY_YAMUX_RELEASE_ON_READ, on by default, and its "partial slack"
# branch) sends a WINDOW_UPDATE frame for every read, so each small pubsub RPC
# costs the receiver an extra encrypted frame and the sender an extra frame to
# parse.  go-yamux sends one when at least half the window has been consumed;
# the sender never stalls because half a window is still open.  Without it:
# 0.48 ms per delivery instead of 0.39 ms.


def _install_yamux_half_window(undo: Undo) -> None:
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    _check_source("YamuxStream._auto_tune_and_send_window_update", YamuxStream._auto_tune_and_send_window_update)

    async def _auto_tune_and_send_window_update(self: Any, *, bytes_read: int = 0) -> None:
        total_delta = 0
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            # Credit owed to the peer: what was consumed since the last update.
            delta = self.target_recv_window - (self.recv_window + buffered)
            if delta > 0 and delta >= self.target_recv_window // 2:
                total_delta = self._grow_to_delta(buffered)
                total_delta += self._apply_autotune_epoch(buffered)
                self._pending_recv_release = 0
        if total_delta > 0:
            await self.send_window_update(total_delta, skip_lock=True)

    _replace(undo, YamuxStream, "_auto_tune_and_send_window_update", _auto_tune_and_send_window_update,
             "yamux_half_window")


# --- 6. inbound messages handled in the reader ------------------------------------
# Upstream spawns a managed task for every inbound message (push_msg), which
# costs more than validating it.  When every validator of the message's topics
# is synchronous, handling it in the peer's reader loop is equivalent (push_msg
# never waits on the network: sends go to queues) and keeps the peer's order.
# Messages on topics with async validators still get a task each, as upstream,
# so a slow validator cannot stall the reader.  An exception from a validator
# is logged and the message dropped instead of ending the reader.  Without
# it: 0.55 ms per delivery instead of 0.39 ms.


def _install_inline_inbound(undo: Undo) -> None:
    # The fix is FastPubsub.continuously_read_stream; this turns it on.
    _check_source("Pubsub.continuously_read_stream", Pubsub.continuously_read_stream)


async def _inline_reading(self: Any, stream: Any) -> None:
    from libp2p.io.exceptions import IOException, MessageTooLarge
    from libp2p.network.connection.exceptions import RawConnError
    from libp2p.network.stream.exceptions import StreamEOF, StreamError
    from libp2p.pubsub import pubsub as ps_mod
    from libp2p.pubsub.pb import rpc_pb2

    names = vars(ps_mod)  # looked up per call: the buffered reader and record cache may be on or off
    # Upstream's loop (pubsub.py, continuously_read_stream) with one change:
    # publish messages whose validators are all synchronous are pushed
    # inline instead of through manager.run_task.
    peer_id = stream.muxed_conn.peer_id
    try:
        while self.manager.is_running:
            incoming = await names["read_varint_prefixed_bytes_limited"](stream, self.max_inbound_rpc_size)
            rpc_incoming = rpc_pb2.RPC()
            rpc_incoming.ParseFromString(incoming)
            if not names["maybe_consume_signed_record"](rpc_incoming, self.host, peer_id):
                logger.debug("invalid signed peer record from %s, RPC ignored", peer_id)
                continue
            event = ps_mod.GossipsubEvent()
            event.peer_id = peer_id.pretty()
            event.message_size = len(incoming)
            if rpc_incoming.publish:
                event.publish = True
                for msg in rpc_incoming.publish:
                    if not self._is_subscribed_to_msg(msg) or not self.manager.is_running:
                        continue
                    if any(v.is_async for v in self.get_msg_validators(msg)):
                        self.manager.run_task(self.push_msg, peer_id, msg)
                        continue
                    try:
                        await self.push_msg(peer_id, msg)
                    except Exception:
                        # Upstream would lose the task (and with it, often the
                        # service); a validator's bug must not end the reader.
                        logger.warning("message from %s dropped: push_msg failed", peer_id, exc_info=True)
            if rpc_incoming.subscriptions:
                event.subopts = True
                if len(rpc_incoming.subscriptions) > self.max_subscriptions_per_rpc:
                    logger.warning("peer %s sent %d subscriptions, over the limit %d; ignored",
                                   peer_id, len(rpc_incoming.subscriptions), self.max_subscriptions_per_rpc)
                else:
                    for message in rpc_incoming.subscriptions:
                        self.handle_subscription(peer_id, message)
            if rpc_incoming.HasField("control"):
                event.control = True
                await self.router.handle_rpc(rpc_incoming, peer_id)
            if stream.metric_send_channel is not None:
                await stream.metric_send_channel.send(event)
    except MessageTooLarge as error:
        logger.warning("inbound pubsub RPC from %s over the size limit: %s", peer_id, error)
        try:
            await stream.reset()
        except (StreamError, IOException, RawConnError):
            logger.debug("reset of %s's stream failed", peer_id)
        self._handle_dead_peer(peer_id)
    except StreamEOF:
        logger.debug("stream closed for peer %s", peer_id)
    except StreamError as error:
        logger.debug("stream error for peer %s: %s", peer_id, error)
    except (IOException, RawConnError) as error:
        logger.debug("connection closed for peer %s during read: %s", peer_id, error)


# --- 7. an O(1) validation cache ---------------------------------------------------
# Upstream's ValidationCache keeps its LRU order in a list: list.remove() and
# pop(0) on every get/put, O(n) in its 1,000 entries.  An OrderedDict does the
# same LRU in O(1).  Small here (0.43 ms without it, within noise), but the
# list grows with the rate of distinct messages.


def _install_validation_cache_o1(undo: Undo) -> None:
    from libp2p.pubsub import pubsub as ps_mod

    cls = ps_mod.ValidationCache
    _check_source("ValidationCache", cls)

    def __init__(self: Any, ttl: int = 300, max_size: int = 1000) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.cache = collections.OrderedDict()
        self.access_order = []  # kept for code that reads it; the OrderedDict is the order

    def get(self: Any, msg_id: bytes) -> Any:
        result = self.cache.get(msg_id)
        if result is None:
            return None
        if time.time() - result.timestamp > self.ttl:
            del self.cache[msg_id]
            return None
        self.cache.move_to_end(msg_id)
        return result

    def put(self: Any, msg_id: bytes, result: Any) -> None:
        if msg_id in self.cache:
            self.cache.move_to_end(msg_id)
        else:
            while self.cache and len(self.cache) >= self.max_size:
                self.cache.popitem(last=False)
        self.cache[msg_id] = result

    def _remove(self: Any, msg_id: bytes) -> None:
        self.cache.pop(msg_id, None)

    for attr, fn in (("__init__", __init__), ("get", get), ("put", put), ("_remove", _remove)):
        _replace(undo, cls, attr, fn, "validation_cache_o1")


# --- 8. origin keys cached for message signatures ------------------------------------
# Upstream's signature_validator parses the origin's peer id into a key object
# (protobuf and a new libsodium key, about the cost of the verify itself) for
# every message.  Without it: 0.52 ms per delivery instead of 0.39 ms.  For Ed25519 origins, whose key is inside the peer id, the
# verify key is cached per origin; the payload and the verify are upstream's
# (the same signing prefix and message fields).  Other key types go upstream's
# way.


def _install_signer_key_cache(undo: Undo) -> None:
    import nacl.exceptions
    import nacl.signing
    from libp2p.pubsub import pubsub as ps_mod
    from libp2p.pubsub import validators
    from libp2p.pubsub.pb import rpc_pb2

    original = validators.signature_validator
    _check_source("signature_validator", original)
    prefix = validators.PUBSUB_SIGNING_PREFIX.encode()
    # identity multihash (0x00, 36 bytes) of protobuf PublicKey{Ed25519, 32 bytes}
    ed25519_id_prefix = b"\x00\x24\x08\x01\x12\x20"
    keys: collections.OrderedDict[bytes, nacl.signing.VerifyKey] = collections.OrderedDict()

    def signature_validator(msg: Any) -> bool:
        from_id = msg.from_id
        if len(from_id) != 38 or not from_id.startswith(ed25519_id_prefix):
            return bool(original(msg))
        if msg.signature == b"":
            return False
        if msg.key and msg.key != from_id[2:]:
            # A key field that disagrees with the peer id: let upstream judge it.
            return bool(original(msg))
        key = keys.get(from_id)
        if key is None:
            try:
                key = nacl.signing.VerifyKey(from_id[6:])
            except (nacl.exceptions.ValueError, nacl.exceptions.TypeError):
                return False
            keys[from_id] = key
            while len(keys) > signer_keys_max:
                keys.popitem(last=False)
        payload = prefix + rpc_pb2.Message(
            data=msg.data, topicIDs=msg.topicIDs, from_id=from_id, seqno=msg.seqno
        ).SerializeToString()
        try:
            key.verify(payload, msg.signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
            return False
        return True

    _replace(undo, ps_mod, "signature_validator", signature_validator, "signer_key_cache")


# --- 9. one RPC object per message, not one copy per peer ------------------------------
# GossipSub.send_rpc copies the RPC (CopyFrom) and runs the splitter (several
# ByteSize() passes) for every peer it forwards to, although a message RPC
# that fits the size limit and has no deferred control to piggyback is the
# same for every peer.  That case now queues the RPC itself; everything else
# goes upstream's way.  Nothing mutates a queued RPC (the writer only
# serialises it).  Without it: 0.48 ms per delivery instead of 0.39 ms.


def _install_send_rpc_fast_path(undo: Undo) -> None:
    # The fix is FastGossipSub.send_rpc; this turns it on.
    _check_source("GossipSub.send_rpc", GossipSub.send_rpc)


# --- 10. queues sized for the rate -----------------------------------------------------
# Upstream bounds each peer's outbound queue and each subscription at 32 and
# drops on overflow with only a log line; at hundreds of adverts a second they
# overflow (the notes saw 411 of 4,000 messages lost).  Bounded still, larger.
# No CPU effect; it is what keeps (c) of the benchmark at 3,000 of 3,000.


def _install_queue_sizes(undo: Undo) -> None:
    from libp2p.pubsub import pubsub as ps_mod
    from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize, RpcQueue

    _check_source("RpcQueue.__init__", RpcQueue.__init__)
    if ps_mod.SUBSCRIPTION_CHANNEL_SIZE != 32:
        raise _SourceChanged("SUBSCRIPTION_CHANNEL_SIZE")

    class SizedRpcQueue(RpcQueue):
        def __init__(self, max_size: int | None = None, max_message_size: int = DefaultMaxMessageSize) -> None:
            super().__init__(outbound_queue_size if max_size is None else max_size, max_message_size)

    _replace(undo, ps_mod, "RpcQueue", SizedRpcQueue, "queue_sizes")
    _replace(undo, ps_mod, "SUBSCRIPTION_CHANNEL_SIZE", subscription_buffer_size, "queue_sizes")


#: Every patch, in the order applied: name -> installer.
PATCHES: dict[str, Callable[[Undo], None]] = {
    "batch_writes": _install_batch_writes,
    "buffered_reads": _install_buffered_reads,
    "sender_record_cache": _install_sender_record_cache,
    "record_verify_once": _install_record_verify_once,
    "yamux_half_window": _install_yamux_half_window,
    "inline_inbound": _install_inline_inbound,
    "validation_cache_o1": _install_validation_cache_o1,
    "signer_key_cache": _install_signer_key_cache,
    "send_rpc_fast_path": _install_send_rpc_fast_path,
    "queue_sizes": _install_queue_sizes,
}


class FastPubsub(Pubsub):
    """py-libp2p's Pubsub with the batched writer (patch 1) and the inline
    reader (patch 6), each taken only while its patch is on."""

    async def handle_sending_messages(self, peer_id: Any, stream: Any, queue: Any) -> None:
        if _on("batch_writes"):
            await _batched_sending(self, peer_id, stream, queue)
        else:
            await super().handle_sending_messages(peer_id, stream, queue)

    async def continuously_read_stream(self, stream: Any) -> None:
        if _on("inline_inbound"):
            await _inline_reading(self, stream)
        else:
            await super().continuously_read_stream(stream)


class FastGossipSub(GossipSub):
    """py-libp2p's GossipSub with one RPC object per message (patch 9), taken
    only while its patch is on."""

    def send_rpc(self, peer_id: Any, rpc: Any, priority: bool = False) -> None:
        from libp2p.pubsub.rpc_queue import _rpc_has_data

        pubsub = self.pubsub
        queue = pubsub.peer_queues.get(peer_id) if pubsub is not None and _on("send_rpc_fast_path") else None
        if queue is None or peer_id in self._pending_control or rpc.ByteSize() > queue.max_message_size \
                or not _rpc_has_data(rpc):  # an RPC with no content: leave it to upstream's splitter
            super().send_rpc(peer_id, rpc, priority)
            return
        if not queue.push(rpc, priority=priority):
            self._handle_dropped_rpc(peer_id, rpc, "queue_full")


# === Fixes (correctness and security, not speed) ===================================
# Applied whatever P2PGPU_LIBP2P_PATCHES says: turning the speed-ups off must
# not reopen a hole.  Each replaces one upstream function whose source is
# pinned by hash (not only the library's version), and is skipped, loudly, if
# the source differs, so an upgrade cannot silently run a stale copy.


# --- F1. an inbound connection's slot lives as long as the connection ----------------
# Upstream's Swarm._do_handle_inbound_connection keeps its handler (and the
# inbound slot it holds: max_connections - min_connections of them) until the
# *swarm* ends ("intentional barrier: keep handler alive"), not until the
# connection ends: every inbound connection ever accepted holds a slot for
# good, and after 250 of them (260 Sybils, #18.6) the node accepts no inbound
# connection at all, even after they left.  Here the handler waits for its
# own connection to close.  It also asks the node's connection manager
# (``swarm.p2pgpu_inbound_gate``: ``admit(ip) -> bool``, ``release(ip)``)
# before any handshake, so limits per IP and per subnet cost a refused
# connection nothing but an accept.

INBOUND_HANDLER_SHA256 = "c22fdfd5289f671c6ca1d2141200153d74bd1b81c873259215d3f2f5b91bc782"


def _remote_ip(read_write_closer: Any) -> str | None:
    get = getattr(read_write_closer, "get_remote_address", None)
    try:
        remote = get() if callable(get) else None
    except (OSError, AttributeError):
        return None
    if isinstance(remote, (tuple, list)) and remote and isinstance(remote[0], str):
        return remote[0]
    return None


async def _until_closed(swarm: Any, muxed_conn: Any) -> None:
    import trio

    event = getattr(muxed_conn, "event_closed", None)
    if isinstance(event, trio.Event):
        await event.wait()
    else:  # a muxer without a close event: upstream's behaviour
        await swarm.manager.wait_finished()


def _install_inbound_slot_release(undo: Undo) -> None:
    from libp2p.abc import IMuxedConn
    from libp2p.network import swarm as swarm_mod
    from libp2p.network.connection.raw_connection import RawConnection

    if _source_sha256(swarm_mod.Swarm._do_handle_inbound_connection) != INBOUND_HANDLER_SHA256:
        raise _SourceChanged("Swarm._do_handle_inbound_connection")

    async def _do_handle_inbound_connection(self: Any, read_write_closer: Any, maddr: Any,
                                            failure_event: Any) -> None:
        gate: Any = getattr(self, "p2pgpu_inbound_gate", None)
        ip = _remote_ip(read_write_closer) if gate is not None else None
        if ip is not None and not gate.admit(ip):
            try:
                await read_write_closer.close()
            except Exception:  # noqa: BLE001 - closing a refused socket; nothing to add
                logger.debug("closing a refused inbound connection from %s failed", ip)
            return
        try:
            await _handle_inbound(self, read_write_closer, maddr, failure_event)
        finally:
            if ip is not None:
                gate.release(ip)

    async def _handle_inbound(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        # Upstream's body, with its two barriers waiting for this connection.
        remote_maddr = self._build_remote_multiaddr(read_write_closer)
        if remote_maddr is not None and not await self.connection_gate.is_allowed(remote_maddr):
            try:
                await read_write_closer.close()
                failure_event.conn_incoming_error = True
                if self.metric_send_channel is not None:
                    await self.metric_send_channel.send(failure_event)
            except Exception:  # noqa: BLE001 - as upstream
                logger.debug("closing a gated inbound connection failed")
            return
        if isinstance(read_write_closer, IMuxedConn):
            try:
                await self.add_conn(read_write_closer, direction="inbound")
                await _until_closed(self, read_write_closer)
            except Exception:  # noqa: BLE001 - as upstream: any failure closes the connection
                await read_write_closer.close()
                failure_event.conn_incoming_error = True
                if self.metric_send_channel is not None:
                    await self.metric_send_channel.send(failure_event)
            return
        raw_conn = None
        try:
            raw_conn = RawConnection(read_write_closer, False)
            muxed = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
            await _until_closed(self, muxed)
        except Exception as e:  # noqa: BLE001 - as upstream: any failure closes the connection
            logger.debug("Error handling incoming connection: %s", e)
            try:
                if raw_conn is not None:
                    await raw_conn.close()
                else:
                    await read_write_closer.close()
                    failure_event.conn_incoming_error = True
                    if self.metric_send_channel is not None:
                        await self.metric_send_channel.send(failure_event)
            except Exception:  # noqa: BLE001 - as upstream
                logger.debug("closing a failed inbound connection failed")

    _replace(undo, swarm_mod.Swarm, "_do_handle_inbound_connection", _do_handle_inbound_connection,
             "inbound_slot_release")


#: Every fix, applied by :func:`apply_fixes`: name -> installer.
FIXES: dict[str, Callable[[Undo], None]] = {
    "inbound_slot_release": _install_inbound_slot_release,
}
_fixed: dict[str, Undo] = {}


def apply_fixes() -> list[str]:
    """Install every fix whose upstream source is the one it was written for
    (whatever ``P2PGPU_LIBP2P_PATCHES`` says); return the names installed.
    Idempotent."""
    for name, install in FIXES.items():
        if name in _fixed:
            continue
        undo: Undo = []
        try:
            install(undo)
        except _SourceChanged as exc:
            _restore(undo)
            logger.warning("py-libp2p fix %s NOT applied: upstream %s changed; re-check the fix", name, exc)
            continue
        _fixed[name] = undo
    return [n for n in FIXES if n in _fixed]


def remove_fixes() -> None:
    for name in reversed(list(_fixed)):
        _restore(_fixed.pop(name))


def apply(only: Iterable[str] | None = None) -> list[str]:
    """Install the patches (all, or the named ones); return the names now
    installed.  Idempotent.  On a libp2p other than :data:`PINNED_VERSION` it
    logs why and installs nothing."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "1"):
        logger.warning("%s=%s: GossipSub speed patches skipped (upstream behaviour, slower)",
                       DISABLE_ENV, os.environ[DISABLE_ENV])
        return sorted(_installed)
    version = libp2p_version()
    if version != PINNED_VERSION:
        logger.warning("py-libp2p %s is not %s: GossipSub speed patches skipped (upstream behaviour, slower)",
                       version, PINNED_VERSION)
        return sorted(_installed)
    names = list(PATCHES) if only is None else list(only)
    skip = {n for n in os.environ.get(SKIP_ENV, "").split(",") if n} if only is None else set()
    for name in names:
        if name not in PATCHES:
            raise ValueError(f"unknown patch {name!r}")
        if name in skip:
            logger.warning("%s: speed patch %s skipped", SKIP_ENV, name)
            continue
        if name in _installed:
            continue
        undo: Undo = []
        try:
            PATCHES[name](undo)
        except _SourceChanged as exc:
            _restore(undo)
            logger.warning("py-libp2p speed patch %s NOT applied: upstream %s changed; re-check the patch",
                           name, exc)
            continue
        except BaseException:
            _restore(undo)
            raise
        _installed[name] = undo
        logger.debug("libp2p patch %s applied", name)
    return [n for n in PATCHES if n in _installed]


def remove(only: Iterable[str] | None = None) -> None:
    """Restore upstream's functions (all patches, or the named ones)."""
    names = list(PATCHES) if only is None else list(only)
    for name in reversed(names):
        undo = _installed.pop(name, None)
        if undo is not None:
            _restore(undo)


def installed() -> list[str]:
    return [n for n in PATCHES if n in _installed]


def _restore(undo: Undo) -> None:
    for owner, attr, original in reversed(undo):
        setattr(owner, attr, original)


# === Bulk transfer (blobs, #15) =====================================================
# A self-contained block: speed-ups for streams that carry megabytes (blob
# chunks), applied and removed with the others (``PATCHES`` below), each
# pinned to a hash of the upstream source it replaces and skipped, loudly, if
# that source changed.  The wire stays exactly what upstream sends and
# accepts, so an unpatched py-libp2p (or go/js) peer interoperates
# (``tests/content/test_bulk_patches.py``).  Measured with
# ``benchmarks/transfer.py`` (docs/performance.md, "Blob transfer").
#
# B1. Larger Yamux frames on streams that ask for them.  Upstream cuts every
#     write into 64 KiB frames (go-yamux's *send* default); each frame costs
#     the sender two locks, a header and a copy, and the receiver a header
#     parse, ~10 debug f-strings, two locks and a buffer append.  A receiver
#     accepts any DATA frame up to the window it granted (go-yamux, js-yamux,
#     py-libp2p: length <= receive window), so a stream that sets
#     ``muxed_stream.p2pgpu_frame_bytes_max`` is written in frames up to that
#     size (never more than the peer's window); every other stream keeps 64 KiB.
# B2. One socket write per Noise write.  Upstream encrypts a write larger than
#     a Noise message (65,519 bytes of plaintext) piece by piece and sends each
#     piece separately (a trio send and a lock each); here the pieces are
#     encrypted in the same order with the same nonces and sent at once.
# B3. Buffered reads under Noise.  Upstream reads each Noise message with two
#     exact reads (2 bytes of length, then the body, each a ``receive_some``);
#     here the transport reader (the only reader of its connection once the
#     handshake is over) reads up to ``noise_read_bytes`` at a time and cuts
#     messages out of its buffer.  The handshake reader is left alone: bytes
#     read ahead during the handshake would be lost to the transport reader.

YAMUX_WRITE_SHA256 = "d87f74dfb53ab194e7907a44c7400ce2f7e64f8cde63b5840af83772b17547af"
NOISE_WRITE_SHA256 = "00818920318f86aa35a975a694953d4afb06267afe15922ee8447c6f10875330"
NOISE_READ_SHA256 = "b2fa218c135c82c09e8741282b92839f70c7275c05a78f23bfa30c7bd67ddf85"
#: Largest Yamux frame a bulk stream may ask for (its own attribute says how large).
bulk_frame_bytes_max = (4 << 20) + 64
#: Bytes asked of the socket per read under Noise (a Noise message is <= 65,537 bytes).
noise_read_bytes = 256 * 1024


UPSTREAM_SHA256.update({
    "YamuxStream.write": YAMUX_WRITE_SHA256,
    "BaseNoiseMsgReadWriter.write_msg": NOISE_WRITE_SHA256,
    "BaseNoiseMsgReadWriter.read_msg": NOISE_READ_SHA256,
})


def _pinned(fn: Any, sha: str, what: str) -> None:
    """``fn`` must be the upstream source ``what``: its hash ``sha``, also
    listed in :data:`UPSTREAM_SHA256` with every other pin."""
    _check_source(what, fn)
    if _source_sha256(fn) != sha:
        raise _SourceChanged(what)


def _install_yamux_bulk_frames(undo: Undo) -> None:
    import struct

    import trio
    from libp2p.stream_muxer.exceptions import MuxedStreamError
    from libp2p.stream_muxer.yamux import yamux as ymod

    _pinned(ymod.YamuxStream.write, YAMUX_WRITE_SHA256, "YamuxStream.write")
    header_size, default_payload = ymod.HEADER_SIZE, ymod.MAX_MESSAGE_SIZE - ymod.HEADER_SIZE

    async def write(self: Any, data: bytes) -> None:
        # Upstream's body; only the frame size (and one copy fewer) differ.
        if self.send_closed:
            raise MuxedStreamError("Stream is closed for sending")
        payload_max = min(getattr(self, "p2pgpu_frame_bytes_max", 0) or default_payload, bulk_frame_bytes_max)
        view = memoryview(data)
        total_len, sent = len(view), 0
        while sent < total_len:
            frame: bytes | None = None
            while frame is None:
                async with self.rw_lock.write_lock():
                    if self.send_closed:
                        raise MuxedStreamError("Stream is closed for sending")
                    async with self.window_lock:
                        if self.closed:
                            raise MuxedStreamError("Stream is closed")
                        if self.send_window > 0:
                            to_send = min(self.send_window, payload_max, total_len - sent)
                            self.send_window -= to_send
                            frame = struct.pack(ymod.YAMUX_HEADER_FORMAT, 0, ymod.TYPE_DATA, 0, self.stream_id,
                                                to_send) + view[sent:sent + to_send]
                if frame is not None:
                    break
                self._zero_window_waits += 1
                with trio.move_on_after(5.0) as cancel_scope:
                    while True:
                        async with self.window_lock:
                            if self.send_window > 0 or self.closed:
                                break
                        await trio.sleep(0.01)
                if cancel_scope.cancelled_caught:
                    raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")
            await self.conn._write_frame(frame)
            sent += len(frame) - header_size

    _replace(undo, ymod.YamuxStream, "write", write, "yamux_bulk_frames")


def _install_noise_write_once(undo: Undo) -> None:
    from libp2p.security.noise import io as nio

    _pinned(nio.BaseNoiseMsgReadWriter.write_msg, NOISE_WRITE_SHA256, "BaseNoiseMsgReadWriter.write_msg")
    piece_max = nio.MAX_PLAINTEXT_LENGTH
    len_bytes = nio.SIZE_NOISE_MESSAGE_LEN

    async def write_msg(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        parts: list[bytes] = []
        for start in range(0, max(len(msg), 1), piece_max):
            encrypted = self.encrypt(msg[start:start + piece_max])
            if prefix_encoded and start == 0:
                encrypted = self.prefix + encrypted
            parts.append(len(encrypted).to_bytes(len_bytes, "big"))
            parts.append(encrypted)
        await self.read_writer.read_write_closer.write(b"".join(parts))

    _replace(undo, nio.BaseNoiseMsgReadWriter, "write_msg", write_msg, "noise_write_once")


def _install_noise_buffered_reads(undo: Undo) -> None:
    from libp2p.io.exceptions import IncompleteReadError
    from libp2p.security.noise import io as nio

    _pinned(nio.BaseNoiseMsgReadWriter.read_msg, NOISE_READ_SHA256, "BaseNoiseMsgReadWriter.read_msg")
    len_bytes = nio.SIZE_NOISE_MESSAGE_LEN

    upstream_read_msg = nio.BaseNoiseMsgReadWriter.read_msg

    async def read_msg(self: Any, prefix_encoded: bool = False) -> bytes:
        if not isinstance(self, nio.NoiseTransportReadWriter):
            return await upstream_read_msg(self, prefix_encoded)  # the handshake: never read ahead
        buf: bytearray | None = self.__dict__.get("_p2pgpu_rbuf")
        if buf is None:
            buf = self.__dict__["_p2pgpu_rbuf"] = bytearray()
        conn = self.read_writer.read_write_closer
        while True:
            if len(buf) >= len_bytes:
                end = len_bytes + int.from_bytes(buf[:len_bytes], "big")
                if len(buf) >= end:
                    encrypted = bytes(buf[len_bytes:end])
                    del buf[:end]
                    break
                want = end - len(buf)
            else:
                want = len_bytes - len(buf)
            more = await conn.read(max(want, noise_read_bytes))
            if not more:
                # As upstream's two exact reads (length, then body): the error
                # counts the bytes of the read that was cut (0: a clean close).
                part = len(buf) if len(buf) < len_bytes else len(buf) - len_bytes
                raise IncompleteReadError(f"Connection closed during read operation: {len(buf)} bytes of a "
                                          "Noise message buffered", expected_bytes=part + want,
                                          received_bytes=part)
            buf += more
        if prefix_encoded:
            encrypted = encrypted[len(self.prefix):]
        return self.decrypt(encrypted)

    _replace(undo, nio.BaseNoiseMsgReadWriter, "read_msg", read_msg, "noise_buffered_reads")


# B4. Big buffers stay in the heap (the node process only, not a py-libp2p
#     patch).  glibc serves a malloc of 128 KiB or more with its own mmap and
#     gives it back with munmap on free; its "dynamic threshold" raises that
#     limit only up to 32 MiB after the first such free, and trims the heap's
#     top whenever 128 KiB of it is free.  A blob fetch allocates and frees
#     buffers of 64 KiB to 4 MiB for every frame (Noise messages, Yamux
#     frames, 4 MiB stream reads, 1 MiB chunks), so the kernel maps, zero-fills
#     and unmaps memory all the time.  Raising both thresholds keeps those
#     buffers in the heap and reused.  Measured on the fetcher (128 MiB, one
#     provider, three interleaved pairs): 137->158, 140->146, 164->170 MB per
#     CPU second (docs/performance.md).  What it costs: freed memory up to
#     ``malloc_trim_bytes`` stays in the process (RSS) instead of going back.
#: Allocations at least this large get their own mmap (glibc default 128 KiB, dynamic up to 32 MiB).
malloc_mmap_threshold_bytes = 64 << 20
#: Free memory at the top of the heap kept rather than given back (glibc default 128 KiB).
malloc_trim_bytes = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: ``P2PGPU_MALLOC_TUNE=0`` leaves glibc's defaults (benchmarks compare with it).
MALLOC_TUNE_ENV = "P2PGPU_MALLOC_TUNE"


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (B4 above);
    False (and nothing changed) off glibc, with ``P2PGPU_LIBP2P_PATCHES=0`` or
    with ``P2PGPU_MALLOC_TUNE=0``."""
    import ctypes
    import ctypes.util

    if os.environ.get(DISABLE_ENV, "") not in ("", "1") or os.environ.get(MALLOC_TUNE_ENV, "") not in ("", "1"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, malloc_mmap_threshold_bytes)
                and mallopt(_M_TRIM_THRESHOLD, malloc_trim_bytes))


PATCHES.update({
    "yamux_bulk_frames": _install_yamux_bulk_frames,
    "noise_write_once": _install_noise_write_once,
    "noise_buffered_reads": _install_noise_buffered_reads,
})
