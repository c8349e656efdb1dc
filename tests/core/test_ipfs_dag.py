"""The IPFS core (``core/_ipfs.py``), table-driven: CIDs as people write them
and as links carry them, dag-pb/UnixFS file nodes, and the walk of a file's
DAG: blocks in any order give the file's bytes in order, a block named twice
is fetched once while needed, memory stays within the window, and every
hostile block or DAG is refused with a typed reason.  The decoder is fuzzed:
it parses or raises ``PeerMisbehaved``, never anything else."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core._ipfs import (
    CODEC_DAG_PB,
    CODEC_RAW,
    Cid,
    DagLimits,
    DagRefused,
    DagWalk,
    decode_file_node,
    encode_file_node,
    parse_cid,
)


def raw(data: bytes) -> Cid:
    return Cid(version=1, codec=CODEC_RAW, digest=hashlib.sha256(data).digest())


def pb(block: bytes) -> Cid:
    return Cid(version=1, codec=CODEC_DAG_PB, digest=hashlib.sha256(block).digest())


# ------------------------------------------------------------------ CIDs

def test_cids_round_trip_in_both_versions() -> None:
    # Helia's and Kubo's own CIDs (the empty raw block; a well-known CIDv0).
    v1 = parse_cid("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
    assert v1.codec == CODEC_RAW and v1.digest == hashlib.sha256(b"").digest()
    assert str(v1) == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    v0 = parse_cid("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")
    assert v0.version == 0 and str(v0) == "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    for c in (v1, v0, pb(b"x")):
        assert Cid.from_bytes(c.to_bytes()) == c
        assert Cid.from_prefix(c.prefix(), b"x").codec == c.codec


@pytest.mark.parametrize(("text", "why"), [
    ("", "at most 100 characters"),
    ("b" * 101, "at most 100 characters"),
    ("zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA", "base32"),  # base58btc CIDv1: not read
    ("bafyBEIB", "lowercase"),
    ("bafy", "not a CID we can read"),
    ("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPb0G", "base58"),  # '0' is no base58 digit
    ("bahaacvrabdhd3fzrwaambazyivoiustl2bo2c3rgweo2ug4rogcoz2apaqaa", "not a CID we can read"),  # sha3, not sha2-256
])
def test_bad_cids_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_cid(text)


def test_codecs_other_than_raw_and_dag_pb_are_refused() -> None:
    dag_cbor = bytes([1, 0x71, 0x12, 0x20]) + bytes(32)
    with pytest.raises(ValueError, match="codec 0x71"):
        Cid.from_bytes(dag_cbor)


# ------------------------------------------------------------- file nodes

def test_a_file_node_round_trips() -> None:
    a, b = raw(b"a" * 10), raw(b"b" * 7)
    node = decode_file_node(encode_file_node([(a, 10), (b, 7)], data=b"hi"))
    assert node.links == (a, b) and node.blocksizes == (10, 7) and node.data == b"hi" and node.filesize == 19


@pytest.mark.parametrize(("block", "reason", "why"), [
    (b"\xff", Reason.MALFORMED, "truncated varint"),
    (b"\x0a\x05ab", Reason.MALFORMED, "past the end"),
    (b"\x09" + bytes(8), Reason.MALFORMED, "wire type 1"),
    (b"", Reason.BAD_SCHEMA, "without UnixFS data"),
    (b"\x0a\x02\x08\x01", Reason.BAD_SCHEMA, "names a directory, not a file"),
    (b"\x0a\x02\x08\x05", Reason.BAD_SCHEMA, "names a sharded directory"),
    (b"\x0a\x04\x08\x02\x20\x05", Reason.BAD_SCHEMA, "0 links but 1 block sizes"),
    (b"\x12\x02\x0a\x00\x0a\x02\x08\x02", Reason.MALFORMED, "a link's CID: truncated"),  # a link whose hash is empty
    (b"\x1a\x00\x0a\x02\x08\x02", Reason.MALFORMED, "unexpected dag-pb field 3"),
])
def test_hostile_nodes_are_refused_with_a_reason(block: bytes, reason: Reason, why: str) -> None:
    with pytest.raises(PeerMisbehaved, match=why) as exc:
        decode_file_node(block)
    assert exc.value.reason == reason


def test_a_node_with_too_many_links_is_refused_before_it_is_read_whole() -> None:
    leaf = raw(b"x")
    with pytest.raises(PeerMisbehaved, match="more than 8 links") as exc:
        decode_file_node(encode_file_node([(leaf, 1)] * 9), links_max=8)
    assert exc.value.reason == Reason.LIMIT_EXCEEDED


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_the_node_decoder_parses_or_refuses(block: bytes) -> None:
    try:
        decode_file_node(block)
    except PeerMisbehaved:
        pass


# ------------------------------------------------------------------ walks

def build(data: bytes, leaf_bytes: int, links_max: int) -> tuple[Cid, dict[Cid, bytes]]:
    """A balanced DAG of raw leaves, as Helia's importer builds one."""
    blocks: dict[Cid, bytes] = {}
    level: list[tuple[Cid, int]] = []
    for i in range(0, len(data), leaf_bytes):
        piece = data[i:i + leaf_bytes]
        blocks[raw(piece)] = piece
        level.append((raw(piece), len(piece)))
    while len(level) > 1:
        up = []
        for i in range(0, len(level), links_max):
            node = encode_file_node(level[i:i + links_max])
            blocks[pb(node)] = node
            up.append((pb(node), sum(s for _, s in level[i:i + links_max])))
        level = up
    return level[0][0], blocks


def run(walk: DagWalk, blocks: dict[Cid, bytes], rng: random.Random | None = None) -> bytes:
    out: list[bytes] = []
    pending = walk.outstanding()  # asked for before (and not answered)
    held_max = 0
    while not walk.done:
        pending += walk.wants()
        assert pending, "the walk stopped asking with the file unfinished"
        held_max = max(held_max, len(walk.outstanding()) + len(walk._held))
        cid = pending.pop(rng.randrange(len(pending)) if rng else 0)
        out += walk.on_block(cid, blocks[cid])
    assert held_max <= walk.limits.window + 1
    return b"".join(out)


@pytest.mark.parametrize(("size", "leaf", "links"), [(1, 4, 2), (1000, 7, 3), (5000, 64, 4), (4096, 64, 174)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_in_any_order_give_the_file_in_order(size: int, leaf: int, links: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    root, blocks = build(data, leaf, links)
    walk = DagWalk(root, size_bytes=size, limits=DagLimits(window=5))
    assert run(walk, blocks, random.Random(seed)) == data
    assert walk.blocks_used == walk.blocks_named and walk.bytes_out == size


def test_a_block_named_many_times_is_fetched_once_while_needed() -> None:
    data = b"z" * 64 * 40  # 40 identical leaves
    root, blocks = build(data, 64, 4)
    walk = DagWalk(root, size_bytes=len(data), limits=DagLimits(window=3))
    asked: list[Cid] = []
    out = []
    while not walk.done:
        got = walk.wants() or walk.outstanding()
        assert got, "the walk stopped asking with the file unfinished"
        asked += got
        for cid in got:
            out += walk.on_block(cid, blocks[cid])
    assert b"".join(out) == data
    assert asked.count(raw(b"z" * 64)) < 40  # not once per appearance


def test_a_single_raw_block_file() -> None:
    walk = DagWalk(raw(b"hello"), size_bytes=5)
    assert walk.wants() == [raw(b"hello")] and walk.on_block(raw(b"hello"), b"hello") == [b"hello"] and walk.done


@pytest.mark.parametrize(("case", "reason", "why"), [
    ("unasked", Reason.BAD_CONTENT, "was not asked for"),
    ("wrong_bytes", Reason.BAD_CONTENT, "does not hash to"),
    ("oversized", Reason.OVERSIZED, "over 64"),
])
def test_a_wrong_block_is_the_senders_fault_and_changes_nothing(case: str, reason: Reason, why: str) -> None:
    data = bytes(range(200))
    root, blocks = build(data, 50, 4)
    walk = DagWalk(root, size_bytes=200, limits=DagLimits(block_bytes_max=64 if case == "oversized" else 1 << 20))
    [want] = walk.wants()
    cid, block = {"unasked": (raw(b"other"), b"other"), "wrong_bytes": (want, b"not it"),
                  "oversized": (want, blocks[want])}[case]
    with pytest.raises(PeerMisbehaved, match=why) as exc:
        walk.on_block(cid, block)
    assert exc.value.reason == reason and not isinstance(exc.value, DagRefused)
    if case != "oversized":
        assert walk.outstanding() == [want] and run(walk, blocks) == data  # an honest peer still completes it


def chain(depth: int) -> tuple[Cid, dict[Cid, bytes]]:
    leaf = b"leaf"
    cid, blocks = raw(leaf), {raw(leaf): leaf}
    for _ in range(depth):
        node = encode_file_node([(cid, 4)])
        cid = pb(node)
        blocks[cid] = node
    return cid, blocks


def lying(kind: str) -> tuple[Cid, int, dict[Cid, bytes]]:
    leaf = b"x" * 100
    blocks = {raw(leaf): leaf}
    node = {"filesize": encode_file_node([(raw(leaf), 100)], filesize=150),
            "leaf": encode_file_node([(raw(leaf), 60)]),
            "sum": encode_file_node([(raw(leaf), 100)], filesize=100) + b"",
            "empty": encode_file_node([(raw(leaf), 100), (raw(b""), 0)]),
            "wide": encode_file_node([(raw(leaf), 100)] * 9)}[kind]
    blocks[pb(node)] = node
    size = {"filesize": 150, "leaf": 60, "sum": 90, "empty": 100, "wide": 900}[kind]
    return pb(node), size, blocks


@pytest.mark.parametrize(("kind", "why"), [
    ("filesize", "declares a file of 150 bytes, the manifest says 150"),
    ("leaf", "holds 100 bytes, its parent says 60"),
    ("sum", "declares a file of 100 bytes, the manifest says 90"),
    ("empty", "links an empty block"),
    ("wide", "more than 8 links"),
])
def test_a_dag_whose_sizes_lie_or_that_is_too_wide_is_refused(kind: str, why: str) -> None:
    root, size, blocks = lying(kind)
    walk = DagWalk(root, size_bytes=size, limits=DagLimits(links_per_node_max=8))
    if kind == "filesize":
        why = "add up to 100 bytes, not 150"
    with pytest.raises(DagRefused, match=why):
        run(walk, blocks)


def test_a_dag_deeper_than_the_limit_is_refused_before_its_leaf_is_fetched() -> None:
    root, blocks = chain(5)
    assert run(DagWalk(root, size_bytes=4, limits=DagLimits(depth_max=5)), blocks) == b"leaf"
    walk = DagWalk(root, size_bytes=4, limits=DagLimits(depth_max=4))
    with pytest.raises(DagRefused, match="deeper than 4 levels"):
        run(walk, blocks)
    assert walk.blocks_used == 5 and walk.bytes_out == 0  # the leaf was never asked for


def test_more_blocks_than_the_limit_are_refused_when_named() -> None:
    data = bytes(1000)
    root, blocks = build(random.Random(3).randbytes(1000), 10, 50)  # 100 leaves, 2 inner nodes, a root
    walk = DagWalk(root, size_bytes=len(data), limits=DagLimits(blocks_max=60))
    with pytest.raises(DagRefused, match="more than 60 blocks") as exc:
        run(walk, blocks)
    assert exc.value.reason == Reason.LIMIT_EXCEEDED
