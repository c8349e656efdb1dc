"""The chunk tree (core/_chunks.py) at its edges (#19): every limit on both
sides, the hash rules as known answers recomputed with ``hashlib`` alone, and
each refusal of a tree from the wire naming what is wrong, so that a wrong
change to how a chunk is checked fails a test.  (The scheduler and the tree's
ordinary cases are in ``tests/content/test_chunks.py``; this file sits in
``tests/core`` so that the mutation runs, whose test selection is
``tests/core``, see it.)"""

from __future__ import annotations

import hashlib

import pytest

from p2pgpu.core import PeerMisbehaved, Reason
from p2pgpu.core._chunks import (
    HASH_BYTES,
    BlobTree,
    TreeHasher,
    blob_bytes_max,
    chunk_bytes_default,
    chunk_bytes_max,
    chunk_bytes_min,
    chunk_count,
    chunk_span,
    leaf_hash,
    merkle_root,
    tree_of_bytes,
    tree_root,
)

CB = chunk_bytes_min


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def L(i: int) -> bytes:  # a leaf, as in the module doc
    return sha(b"\x00" + bytes([i]))


# --- the limits ------------------------------------------------------------


def test_the_limits_are_what_the_docs_say() -> None:
    assert (chunk_bytes_default, chunk_bytes_min, chunk_bytes_max) == (1 << 20, 16 << 10, 4 << 20)
    assert blob_bytes_max == 1 << 42 and HASH_BYTES == 32


@pytest.mark.parametrize("cb", [chunk_bytes_min, chunk_bytes_max])
def test_chunk_sizes_at_both_limits_are_accepted(cb: int) -> None:
    assert chunk_count(0, cb) == 0
    assert chunk_count(cb, cb) == 1 and chunk_count(cb + 1, cb) == 2 and chunk_count(cb - 1, cb) == 1
    assert TreeHasher(cb).chunk_bytes == cb


@pytest.mark.parametrize("cb", [chunk_bytes_min - 1, chunk_bytes_max + 1, 0, -CB])
def test_chunk_sizes_past_the_limits_are_refused(cb: int) -> None:
    with pytest.raises(ValueError, match="chunk_bytes within limits"):
        chunk_count(0, cb)
    with pytest.raises(ValueError, match="chunk_bytes within limits"):
        TreeHasher(cb)


def test_a_negative_size_is_refused_and_zero_has_no_chunks() -> None:
    assert chunk_count(0) == 0
    assert chunk_count(1) == 1 and chunk_count(chunk_bytes_default) == 1
    with pytest.raises(ValueError, match="size must be >= 0"):
        chunk_count(-1)


def test_spans_of_every_chunk_and_past_both_ends() -> None:
    size = 2 * CB + 5
    assert [chunk_span(i, size, CB) for i in range(3)] == [(0, CB), (CB, CB), (2 * CB, 5)]
    assert chunk_span(0, CB, CB) == (0, CB)  # one full chunk: not shortened
    assert chunk_span(0, 1, CB) == (0, 1)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=rf"chunk {bad} out of 0\.\.2"):
            chunk_span(bad, size, CB)
    with pytest.raises(ValueError, match=r"chunk 0 out of 0\.\.-1"):
        chunk_span(0, 0, CB)  # an empty blob has no chunk 0
    assert chunk_span(1, 2 * chunk_bytes_default) == (chunk_bytes_default, chunk_bytes_default)  # the default


# --- the hash rules, as known answers ---------------------------------------


def test_leaf_hash_is_sha256_of_a_zero_byte_and_the_chunk() -> None:
    assert leaf_hash(b"abc") == sha(b"\x00abc")
    assert leaf_hash(b"") == sha(b"\x00")
    assert leaf_hash(b"abc") != leaf_hash(b"abd")


def test_merkle_roots_of_zero_to_five_leaves() -> None:
    def node(a: bytes, b: bytes) -> bytes:
        return sha(b"\x01" + a + b)

    a, b, c, d, e = (L(i) for i in range(5))
    assert merkle_root([]) == sha(b"")
    assert merkle_root([a]) == a
    assert merkle_root([a, b]) == node(a, b)
    assert merkle_root([a, b, c]) == node(node(a, b), c)  # the odd node is carried up unchanged
    assert merkle_root([a, b, c, d]) == node(node(a, b), node(c, d))
    assert merkle_root([a, b, c, d, e]) == node(node(node(a, b), node(c, d)), e)
    assert merkle_root([b, a]) != merkle_root([a, b])


def test_merkle_root_does_not_change_the_callers_list() -> None:
    leaves = [L(0), L(1), L(2)]
    merkle_root(leaves)
    assert leaves == [L(0), L(1), L(2)]


def test_tree_root_binds_size_as_u64_and_chunking_as_u32() -> None:
    leaves = [L(0), L(1), L(2)]
    size = 2 * CB + 5
    want = sha(b"p2pgpu/blobtree/v1\0" + size.to_bytes(8, "big") + CB.to_bytes(4, "big") + merkle_root(leaves))
    assert tree_root(leaves, size, CB) == want
    assert tree_root(leaves, 3 * CB, CB) != want  # same count, another size
    assert tree_root([], 0, CB) == sha(b"p2pgpu/blobtree/v1\0" + bytes(8) + CB.to_bytes(4, "big") + sha(b""))
    one = [L(9)]
    assert tree_root(one, 5) == sha(b"p2pgpu/blobtree/v1\0" + (5).to_bytes(8, "big")
                                    + chunk_bytes_default.to_bytes(4, "big") + L(9))


@pytest.mark.parametrize("count", [2, 4])
def test_tree_root_refuses_a_leaf_count_that_does_not_match_the_size(count: int) -> None:
    with pytest.raises(ValueError, match="leaf count does not match the size"):
        tree_root([L(i) for i in range(count)], 2 * CB + 5, CB)


# --- hashing a blob ---------------------------------------------------------


def test_hasher_cuts_exact_chunks_and_a_short_last_one() -> None:
    data = bytes(range(256)) * (CB // 256) * 2 + b"tail"
    h = TreeHasher(CB)
    h.update(data[:CB - 1])
    h.update(data[CB - 1:CB])   # completes chunk 0 exactly
    h.update(data[CB:])
    t = h.finish()
    assert t == BlobTree(sha256=sha(data), size=len(data), chunk_bytes=CB,
                         leaves=(leaf_hash(data[:CB]), leaf_hash(data[CB:2 * CB]), leaf_hash(b"tail")))
    assert t.root == tree_root(list(t.leaves), len(data), CB) and t.chunks == 3


def test_hasher_of_whole_chunks_adds_no_empty_leaf_and_finish_twice_adds_nothing() -> None:
    data = b"q" * (2 * CB)
    h = TreeHasher(CB)
    h.update(data)
    t = h.finish()
    assert t.leaves == (leaf_hash(b"q" * CB),) * 2 and t.size == 2 * CB
    assert h.finish() == t


def test_empty_blob_and_the_default_chunk_size() -> None:
    t = tree_of_bytes(b"")
    assert t == BlobTree(sha256=sha(b""), size=0, chunk_bytes=chunk_bytes_default, leaves=())
    assert t.root == tree_root([], 0)
    assert tree_of_bytes(b"x").chunk_bytes == chunk_bytes_default == TreeHasher().chunk_bytes


# --- a tree checks itself ---------------------------------------------------


def tree(**kw: object) -> BlobTree:
    args: dict[str, object] = {"sha256": sha(b""), "size": 0, "chunk_bytes": CB, "leaves": ()}
    args.update(kw)
    return BlobTree(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "words"), [
    ({"sha256": bytes(31)}, "bad sha256 or size"),
    ({"sha256": bytes(33)}, "bad sha256 or size"),
    ({"size": -1}, "bad sha256 or size"),
    ({"size": blob_bytes_max + 1}, "bad sha256 or size"),
    ({"chunk_bytes": chunk_bytes_min - 1}, "chunk size out of range"),
    ({"chunk_bytes": chunk_bytes_max + 1}, "chunk size out of range"),
    ({"size": 1}, "leaf count does not match"),
    ({"leaves": (L(0),)}, "leaf count does not match"),
    ({"size": 1, "leaves": (L(0)[:31],)}, "leaf count does not match"),
    ({"size": 1, "leaves": (L(0) + b"x",)}, "leaf count does not match"),
    ({"size": CB + 1, "leaves": (L(0), L(1)[:31])}, "leaf count does not match"),
])
def test_a_tree_refuses_what_is_wrong_naming_it(kw: dict[str, object], words: str) -> None:
    with pytest.raises(PeerMisbehaved, match=words) as e:
        tree(**kw)
    assert e.value.reason is Reason.BAD_SCHEMA


def test_a_tree_at_its_limits_gets_past_each_check() -> None:
    # The largest size passes the size check (the leaf count is what stops it);
    # both chunk sizes at their limits pass the chunk-size check.
    with pytest.raises(PeerMisbehaved, match="leaf count does not match"):
        tree(size=blob_bytes_max)
    for cb in (chunk_bytes_min, chunk_bytes_max):
        assert tree(chunk_bytes=cb, size=cb, leaves=(L(0),)).chunks == 1
    assert tree(size=CB + 1, leaves=(L(0), L(1))).chunks == 2


def test_check_chunk_at_each_index_and_each_way_of_being_wrong() -> None:
    data = bytes(range(256)) * (CB // 256) + b"end"
    t = tree_of_bytes(data, CB)
    t.check_chunk(0, data[:CB])
    t.check_chunk(1, b"end")
    for index, bad in ((1, b"enD"), (1, b"en"), (1, b"end!"), (0, data[1:CB + 1]), (1, data[:CB])):
        with pytest.raises(PeerMisbehaved, match=f"chunk {index} does not match its hash") as e:
            t.check_chunk(index, bad)
        assert e.value.reason is Reason.BAD_CONTENT
    # (chunk 0's bytes offered as chunk 1 are refused above; past the last chunk is our mistake.)
    with pytest.raises(ValueError, match="out of"):
        t.check_chunk(2, b"")
    same = tree_of_bytes(b"z" * (2 * CB), CB)
    same.check_chunk(1, b"z" * CB)
    # A leaf equal in hash but shorter than the span cannot be: the length alone refuses.
    short = BlobTree(sha256=sha(b""), size=CB + 3, chunk_bytes=CB, leaves=(leaf_hash(b"a" * CB), leaf_hash(b"ab")))
    with pytest.raises(PeerMisbehaved, match="chunk 1 does not match"):
        short.check_chunk(1, b"ab")  # the hash matches, the length (3) does not


def test_check_root() -> None:
    t = tree_of_bytes(b"r" * (CB + 1), CB)
    t.check_root(t.root)
    with pytest.raises(PeerMisbehaved, match="does not hash to the tree root") as e:
        t.check_root(tree_of_bytes(b"r" * (CB + 2), CB).root)
    assert e.value.reason is Reason.BAD_CONTENT


def test_span_of_a_tree_is_its_chunk_span() -> None:
    t = tree_of_bytes(b"s" * (CB + 7), CB)
    assert (t.span(0), t.span(1)) == ((0, CB), (CB, 7))


# --- a tree from the wire ---------------------------------------------------


def test_to_obj_is_exactly_the_four_fields_with_leaves_joined() -> None:
    t = tree_of_bytes(b"w" * (CB + 1), CB)
    assert t.to_obj() == {"sha256": t.sha256, "size": CB + 1, "chunk_bytes": CB, "leaves": t.leaves[0] + t.leaves[1]}
    assert BlobTree.from_obj(t.to_obj()) == t


@pytest.mark.parametrize(("obj", "reason", "words"), [
    ([1, 2], Reason.BAD_SCHEMA, "must be {sha256, size, chunk_bytes, leaves}"),
    ({"sha256": b"", "size": 0, "chunk_bytes": CB}, Reason.BAD_SCHEMA, "must be {sha256"),
    ({"sha256": b"", "size": 0, "chunk_bytes": CB, "leaves": b"", "x": 1}, Reason.BAD_SCHEMA, "must be {sha256"),
    ({"sha256": "00" * 32, "size": 0, "chunk_bytes": CB, "leaves": b""}, Reason.BAD_SCHEMA, "field types"),
    ({"sha256": sha(b""), "size": True, "chunk_bytes": CB, "leaves": b""}, Reason.BAD_SCHEMA, "field types"),
    ({"sha256": sha(b""), "size": 0, "chunk_bytes": True, "leaves": b""}, Reason.BAD_SCHEMA, "field types"),
    ({"sha256": sha(b""), "size": 0, "chunk_bytes": CB, "leaves": [b""]}, Reason.BAD_SCHEMA, "field types"),
    ({"sha256": sha(b""), "size": -1, "chunk_bytes": CB, "leaves": b""}, Reason.OVERSIZED, "blob of -1 bytes"),
    ({"sha256": sha(b""), "size": blob_bytes_max + 1, "chunk_bytes": CB, "leaves": b""}, Reason.OVERSIZED,
     f"blob of {blob_bytes_max + 1} bytes is over {blob_bytes_max}"),
    ({"sha256": sha(b""), "size": 1, "chunk_bytes": CB, "leaves": bytes(31)}, Reason.BAD_SCHEMA, "whole 32-byte"),
    ({"sha256": sha(b""), "size": 1, "chunk_bytes": CB, "leaves": bytes(33)}, Reason.BAD_SCHEMA, "whole 32-byte"),
    ({"sha256": sha(b""), "size": 1, "chunk_bytes": CB, "leaves": bytes(64)}, Reason.BAD_SCHEMA, "leaf count"),
])
def test_from_obj_refuses_naming_what_is_wrong(obj: object, reason: Reason, words: str) -> None:
    with pytest.raises(PeerMisbehaved, match=words.replace("{", r"\{").replace("}", r"\}")) as e:
        BlobTree.from_obj(obj)
    assert e.value.reason is reason


def test_from_obj_size_limit_on_both_sides() -> None:
    t = tree_of_bytes(b"m" * (CB + 1), CB)
    assert BlobTree.from_obj(t.to_obj(), size_max=CB + 1) == t
    with pytest.raises(PeerMisbehaved, match=f"blob of {CB + 1} bytes is over {CB}") as e:
        BlobTree.from_obj(t.to_obj(), size_max=CB)
    assert e.value.reason is Reason.OVERSIZED
    # The wire's own ceiling is the module's: the largest size gets past the size check.
    with pytest.raises(PeerMisbehaved, match="leaf count") as e2:
        BlobTree.from_obj({"sha256": sha(b""), "size": blob_bytes_max, "chunk_bytes": CB, "leaves": b""})
    assert e2.value.reason is Reason.BAD_SCHEMA
    assert BlobTree.from_obj({"sha256": sha(b""), "size": 0, "chunk_bytes": CB, "leaves": b""}).chunks == 0


def test_from_obj_splits_leaves_in_order() -> None:
    leaves = (L(0), L(1), L(2))
    got = BlobTree.from_obj({"sha256": sha(b""), "size": 2 * CB + 1, "chunk_bytes": CB, "leaves": b"".join(leaves)})
    assert got.leaves == leaves
