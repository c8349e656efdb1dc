"""The chunk tree (core/_chunks.py) and the download scheduler (core/_fetch.py), as tables."""

from __future__ import annotations

import hashlib

import pytest

from p2pgpu.core import PeerMisbehaved, Reason, decode, encode
from p2pgpu.core._chunks import (
    BlobTree,
    TreeHasher,
    chunk_bytes_min,
    chunk_count,
    leaf_hash,
    merkle_root,
    tree_of_bytes,
    tree_root,
)
from p2pgpu.core._fetch import Drop, FetchPlan

CB = chunk_bytes_min  # 16 KiB chunks keep the tables small


@pytest.mark.parametrize(("size", "chunks"), [(0, 0), (1, 1), (CB, 1), (CB + 1, 2), (10 * CB, 10)])
def test_chunk_count(size: int, chunks: int) -> None:
    assert chunk_count(size, CB) == chunks


def test_tree_in_pieces_equals_tree_at_once() -> None:
    data = bytes(range(256)) * 300  # 76,800 bytes: 4 full chunks and a short one
    h = TreeHasher(CB)
    for i in range(0, len(data), 777):
        h.update(data[i:i + 777])
    t = h.finish()
    assert t == tree_of_bytes(data, CB)
    assert t.sha256 == hashlib.sha256(data).digest() and t.size == len(data) and t.chunks == 5
    assert t.leaves[4] == leaf_hash(data[4 * CB:])


def test_root_binds_size_and_chunking() -> None:
    data = b"x" * (3 * CB)
    a = tree_of_bytes(data, CB)
    b = tree_of_bytes(data, 2 * CB)
    assert a.root != b.root
    # Same leaves claimed for another size: refused or a different root.
    assert tree_root(list(a.leaves), 3 * CB, CB) != tree_root(list(a.leaves), 3 * CB - 1, CB)


def test_leaf_and_inner_hashes_are_domain_separated() -> None:
    l0, l1 = leaf_hash(b"a"), leaf_hash(b"b")
    inner = merkle_root([l0, l1])
    assert inner == hashlib.sha256(b"\x01" + l0 + l1).digest()
    assert inner != leaf_hash(l0 + l1)


def test_check_chunk_catches_one_flipped_byte() -> None:
    data = bytes(range(256)) * 200
    t = tree_of_bytes(data, CB)
    t.check_chunk(1, data[CB:2 * CB])
    bad = bytearray(data[CB:2 * CB])
    bad[100] ^= 1
    with pytest.raises(PeerMisbehaved) as e:
        t.check_chunk(1, bytes(bad))
    assert e.value.reason is Reason.BAD_CONTENT
    with pytest.raises(PeerMisbehaved):
        t.check_chunk(1, data[CB:2 * CB - 1])  # short


def test_tree_wire_round_trip_and_hostile_forms() -> None:
    t = tree_of_bytes(b"y" * (2 * CB + 5), CB)
    assert BlobTree.from_obj(decode(encode(t.to_obj()))) == t
    obj = t.to_obj()
    for bad in ({**obj, "leaves": obj["leaves"][:-1]},      # not whole hashes
                {**obj, "leaves": obj["leaves"][:32]},      # too few leaves for the size
                {**obj, "size": -1}, {**obj, "chunk_bytes": 7}, {**obj, "extra": 1},
                {**obj, "sha256": b"short"}, [1, 2]):
        with pytest.raises(PeerMisbehaved):
            BlobTree.from_obj(bad)
    with pytest.raises(PeerMisbehaved) as e:
        BlobTree.from_obj(obj, size_max=CB)
    assert e.value.reason is Reason.OVERSIZED
    other = tree_of_bytes(b"z" * (2 * CB + 5), CB)
    with pytest.raises(PeerMisbehaved):
        other.check_root(t.root)


# ---------------------------------------------------------------- the scheduler

def test_runs_are_contiguous_lowest_first_and_split_between_providers() -> None:
    p = FetchPlan(chunks=20, run_chunks=4)
    p.add_provider("A")
    p.add_provider("B")
    assert p.take("A") == [0, 1, 2, 3]
    assert p.take("B") == [4, 5, 6, 7]
    assert p.take("A") == [8, 9, 10, 11]
    for i in [0, 1, 2, 3]:
        p.chunk_ok("A", i)
    assert p.chunks_from() == {"A": 4}
    assert p.missing() == 16 and not p.done


def test_a_bad_chunk_drops_its_sender_and_the_run_goes_elsewhere() -> None:
    p = FetchPlan(chunks=8, run_chunks=4)
    p.add_provider("A")
    p.add_provider("B")
    run_a = p.take("A")
    p.chunk_ok("A", run_a[0])
    assert p.chunk_bad("A", run_a[1]) is Drop.BAD_CHUNK
    assert p.live_providers() == ["B"] and p.dropped() == {"A": Drop.BAD_CHUNK}
    assert p.take("A") == []                      # a dropped provider gets nothing
    assert p.take("B") == [1, 2, 3, 4]            # A's unfinished chunks come back
    assert not p.add_provider("A")                # and it cannot come back


def test_failures_drop_a_provider_after_the_limit() -> None:
    p = FetchPlan(chunks=4, run_chunks=1, failures_max=2)
    p.add_provider("A")
    assert p.run_failed("A", p.take("A")) is None
    assert p.run_failed("A", p.take("A")) is Drop.FAILURES
    assert p.live_providers() == [] and p.stuck()
    assert "no provider left" in p.failure_reason()


def test_partial_providers_are_asked_only_what_they_have() -> None:
    p = FetchPlan(chunks=10, run_chunks=8)
    p.add_provider("member", has=frozenset({0, 1, 2, 5}))
    assert p.take("member") == [0, 1, 2]
    assert p.take("member") == [5]
    assert p.take("member") == []
    p.release("member", [5])
    p.add_provider("member", has=frozenset(range(10)))  # it fetched more since
    assert p.take("member") == [3, 4, 5, 6, 7, 8, 9]


def test_resume_starts_from_what_is_on_disk_and_stuck_is_honest() -> None:
    p = FetchPlan(chunks=6, have={0, 1, 2}, run_chunks=8)
    p.add_provider("A", has=frozenset({0, 1}))
    assert p.take("A") == [] and p.stuck()         # A has nothing we miss
    p.add_provider("B")
    assert not p.stuck() and p.take("B") == [3, 4, 5]
    for i in (3, 4, 5):
        p.chunk_ok("B", i)
    assert p.done and not p.stuck()


def test_provider_limit() -> None:
    p = FetchPlan(chunks=1, providers_max=2)
    assert p.add_provider("A") and p.add_provider("B") and not p.add_provider("C")


def test_start_offset_wraps_and_runs_stay_contiguous() -> None:
    p = FetchPlan(chunks=10, run_chunks=4, start=8)
    p.add_provider("A")
    assert p.take("A") == [8, 9]          # a run never wraps past the end
    assert p.take("A") == [0, 1, 2, 3]
    assert p.take("A") == [4, 5, 6, 7]
    assert p.take("A") == []
    assert FetchPlan(chunks=0, start=5).start == 0
