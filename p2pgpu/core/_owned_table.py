"""A bounded table that strangers' entries cannot use to evict a node's own.

A node keeps a record of every job it hears of (``job status``, ``job
list``).  10,300 manifest-and-cancel pairs from one stranger emptied a
submitter's list of its own jobs (one of them, evicted while confirmed,
still ran on its worker while the submitter refused its proof as unknown),
and past 10,000 records each new one cost a scan of all of them (#18.4).

:class:`OwnedTable` keeps two kinds of entries:

- **ours** (the node's own jobs: submitted or worked on): never evicted by
  anyone else's entries; at most ``ours_max``, beyond which the oldest of
  ours goes;
- **theirs** (caused by a stranger's message; ``owner`` is that stranger):
  at most ``per_owner_max`` per owner, beyond which that owner's oldest
  goes, and ``theirs_max`` in all, beyond which the oldest of theirs goes.

Every operation is O(1) (insertion-ordered dicts, no scan), and an entry
can become ours later (:meth:`make_ours`) but never theirs again.  Pure: no
clock, the order is insertion order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class OwnedTable(Mapping[K, V], Generic[K, V]):
    def __init__(self, *, theirs_max: int, per_owner_max: int, ours_max: int) -> None:
        if min(theirs_max, per_owner_max, ours_max) < 1:
            raise ValueError("every limit is at least 1")
        self.theirs_max, self.per_owner_max, self.ours_max = theirs_max, per_owner_max, ours_max
        self._values: dict[K, V] = {}
        self._ours: OrderedDict[K, None] = OrderedDict()
        self._theirs: OrderedDict[K, str] = OrderedDict()
        self._by_owner: dict[str, OrderedDict[K, None]] = {}
        #: How many entries each limit evicted (for metrics).
        self.evicted_theirs = 0
        self.evicted_ours = 0

    # -- Mapping ------------------------------------------------------------------------
    def __getitem__(self, key: K) -> V:
        return self._values[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def is_ours(self, key: K) -> bool:
        return key in self._ours

    @property
    def theirs_count(self) -> int:
        return len(self._theirs)

    def ours_newest_first(self) -> Iterator[V]:
        """The node's own entries, the most recently added first."""
        return (self._values[k] for k in reversed(self._ours))

    def owned_by(self, owner: str) -> int:
        """How many of theirs ``owner`` caused."""
        keys = self._by_owner.get(owner)
        return len(keys) if keys is not None else 0

    # -- changes ------------------------------------------------------------------------
    def put(self, key: K, value: V, *, owner: str, ours: bool = False) -> list[K]:
        """Add or replace an entry; returns the keys it evicted.  Replacing
        keeps the entry's kind, except that ``ours=True`` makes it ours."""
        if key in self._values:
            self._values[key] = value
            if ours:
                self.make_ours(key)
            return []
        evicted: list[K] = []
        if ours:
            while len(self._ours) >= self.ours_max:
                old, _ = self._ours.popitem(last=False)
                del self._values[old]
                self.evicted_ours += 1
                evicted.append(old)
            self._ours[key] = None
        else:
            keys = self._by_owner.get(owner)
            if keys is not None and len(keys) >= self.per_owner_max:
                evicted.append(self._drop_theirs(next(iter(keys))))
            while len(self._theirs) >= self.theirs_max:
                evicted.append(self._drop_theirs(next(iter(self._theirs))))
            self._theirs[key] = owner
            self._by_owner.setdefault(owner, OrderedDict())[key] = None
        self._values[key] = value
        return evicted

    def make_ours(self, key: K) -> list[K]:
        """The entry is the node's own from now on (it submitted or works on
        that job); returns what making room among ours evicted."""
        if key not in self._values or key in self._ours:
            return []
        value = self._values[key]
        self._unlink_theirs(key)
        del self._values[key]
        return self.put(key, value, owner="", ours=True)

    def pop(self, key: K, default: V | None = None) -> V | None:
        if key not in self._values:
            return default
        self._ours.pop(key, None)
        self._unlink_theirs(key)
        return self._values.pop(key)

    def _drop_theirs(self, key: K) -> K:
        self._unlink_theirs(key)
        del self._values[key]
        self.evicted_theirs += 1
        return key

    def _unlink_theirs(self, key: K) -> None:
        owner = self._theirs.pop(key, None)
        if owner is None:
            return
        keys = self._by_owner[owner]
        del keys[key]
        if not keys:
            del self._by_owner[owner]
