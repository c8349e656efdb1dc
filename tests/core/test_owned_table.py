"""The bounded table a node keeps its job records in (#18.4): strangers'
entries never evict the node's own, each stranger has a quota, and every
operation is O(1)."""

from __future__ import annotations

import pytest

from p2pgpu.core._owned_table import OwnedTable


def table(theirs: int = 4, per_owner: int = 2, ours: int = 3) -> OwnedTable[str, int]:
    return OwnedTable(theirs_max=theirs, per_owner_max=per_owner, ours_max=ours)


def test_theirs_never_evict_ours() -> None:
    t = table()
    t.put("mine", 0, owner="me", ours=True)
    for i in range(10_300):  # the attack's count
        t.put(f"x{i}", i, owner=f"stranger{i % 7}")
    assert "mine" in t and t.is_ours("mine")
    assert t.theirs_count == 4 and len(t) == 5


def test_each_owner_has_a_quota_and_loses_its_own_oldest_first() -> None:
    t = table(theirs=10, per_owner=2)
    t.put("a1", 1, owner="a")
    t.put("b1", 1, owner="b")
    t.put("a2", 2, owner="a")
    assert t.put("a3", 3, owner="a") == ["a1"]
    assert sorted(t) == ["a2", "a3", "b1"] and t.owned_by("a") == 2


def test_the_total_of_theirs_evicts_the_oldest_of_theirs() -> None:
    t = table(theirs=3, per_owner=3)
    for k, owner in (("a1", "a"), ("b1", "b"), ("c1", "c")):
        t.put(k, 0, owner=owner)
    assert t.put("d1", 0, owner="d") == ["a1"]
    assert t.owned_by("a") == 0


def test_ours_are_bounded_by_their_own_limit_only() -> None:
    t = table(ours=2)
    t.put("x", 0, owner="s")
    for k in ("m1", "m2", "m3"):
        t.put(k, 0, owner="me", ours=True)
    assert sorted(t) == ["m2", "m3", "x"] and t.evicted_ours == 1


def test_an_entry_can_become_ours_but_not_theirs_again() -> None:
    t = table(theirs=2, per_owner=2)
    t.put("j", 1, owner="s")
    t.make_ours("j")
    assert t.is_ours("j") and t.theirs_count == 0 and t.owned_by("s") == 0
    t.put("j", 2, owner="s")  # replaced by a stranger's message: still ours
    assert t.is_ours("j") and t["j"] == 2
    for i in range(5):
        t.put(f"x{i}", i, owner="s")
    assert "j" in t
    assert t.pop("j") == 2 and "j" not in t and t.pop("j") is None


def test_ours_newest_first_lists_only_ours_in_reverse_order_of_arrival() -> None:
    t = table(theirs=5, per_owner=5, ours=3)
    t.put("m1", 1, owner="me", ours=True)
    t.put("x", 9, owner="s")
    t.put("m2", 2, owner="me", ours=True)
    t.make_ours("x")  # a stranger's job we then worked on becomes our newest
    assert list(t.ours_newest_first()) == [9, 2, 1]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        table(theirs=0)


class CountingKey:
    """A key that counts how often the table hashes or compares it."""

    ops = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        CountingKey.ops += 1
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        CountingKey.ops += 1
        return isinstance(other, CountingKey) and other.n == self.n


def test_eviction_is_constant_time() -> None:
    """Past the limit each insertion costs the same few key operations, not a
    scan of the table (the old eviction looked at all 10,000 records for each
    new one)."""
    t: OwnedTable[CountingKey, int] = OwnedTable(theirs_max=1_000, per_owner_max=1_000, ours_max=10)
    for i in range(1_000):
        t.put(CountingKey(i), i, owner="flood")
    CountingKey.ops = 0
    for i in range(1_000, 21_000):
        t.put(CountingKey(i), i, owner="flood")
    assert CountingKey.ops / 20_000 < 20  # a scan would be >= 1,000 per insertion
    assert len(t) == 1_000
