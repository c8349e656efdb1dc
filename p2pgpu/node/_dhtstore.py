"""Bounded Kademlia stores: what strangers may make this node keep (#18.5).

py-libp2p 0.8.1's DHT, as the node used it, stored any value under any key
that no registered validator claimed (300 records of 1 MB under foreign keys
took the node from 117 to 421 MB and stayed), kept up to 50,000 values, and
kept provider records for any number of keys.  Here:

- **Values**: only our namespace (``/p2pgpu/``, strict: every other key is
  refused before it is stored), each value validated by the namespace's
  validator (a signed advert under its own peer's key, at most
  ``Kind.ADVERT.bytes_max`` bytes) and then bounded: at most ``values_max``
  records and ``value_bytes_max`` bytes in all, and at most
  ``values_per_peer_max`` records put by any one peer.  A full store refuses
  newcomers (the DHT is a secondary path: gossip and market syncs carry every
  advert too), and our own records are never refused.
- **Provider records**: at most ``provider_keys_max`` keys and
  ``provider_records_max`` records in all, and at most
  ``provider_keys_per_peer_max`` keys per provider (py-libp2p accepts only a
  provider that is the sender).  Keys are hashes, so their namespace cannot
  be read from them; when the provider's signed advert is known, a key must be
  one of its GPU classes (``class_key``).

Who sent a PUT_VALUE is not passed down by the library: the Kademlia stream
handler is wrapped (:func:`with_sender`) to set a context variable that the
store reads (trio gives each stream handler task its own context).  The
stores keep py-libp2p's interfaces (subclasses of its ``ValueStore`` and
``ProviderStore``) and count what they refuse (``refused``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.peerinfo import PeerInfo

from p2pgpu.core import Kind

log = logging.getLogger("p2pgpu.node")

#: The peer whose Kademlia stream is being handled ("" for our own calls).
current_sender: ContextVar[str] = ContextVar("p2pgpu_dht_sender", default="")


@dataclass(frozen=True, kw_only=True)
class DhtLimits:
    values_max: int = 4_096
    value_bytes_max: int = 16 * 1024 * 1024
    values_per_peer_max: int = 8
    record_bytes_max: int = Kind.ADVERT.bytes_max
    provider_keys_max: int = 4_096
    provider_records_max: int = 20_000
    provider_keys_per_peer_max: int = 32


def with_sender(handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    """Wrap the Kademlia stream handler so the stores know who is talking."""

    async def handle(stream: Any) -> None:
        token = current_sender.set(stream.muxed_conn.peer_id.to_base58())
        try:
            await handler(stream)
        finally:
            current_sender.reset(token)

    return handle


class StoreFull(ValueError):
    """A record refused for a limit (py-libp2p resets the PUT_VALUE stream)."""


class _AccountedRecords(dict[bytes, Any]):
    """The value store's dict, counting bytes and who put each record however
    py-libp2p adds or deletes entries (``del``, ``pop``, eviction, expiry)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.sender: dict[bytes, str] = {}
        self.per_sender: Counter[str] = Counter()

    @staticmethod
    def _size(entry: Any) -> int:
        record = entry[0]
        return len(record.key) + len(record.value)

    def __setitem__(self, key: bytes, entry: Any) -> None:
        if key in self:
            self._forget(key)
        super().__setitem__(key, entry)
        self.bytes += self._size(entry)
        who = current_sender.get()
        self.sender[key] = who
        self.per_sender[who] += 1

    def _forget(self, key: bytes) -> None:
        self.bytes -= self._size(dict.__getitem__(self, key))
        who = self.sender.pop(key, "")
        self.per_sender[who] -= 1
        if self.per_sender[who] <= 0:
            del self.per_sender[who]

    def __delitem__(self, key: bytes) -> None:
        self._forget(key)
        super().__delitem__(key)

    def pop(self, key: bytes, *default: Any) -> Any:
        if key in self:
            self._forget(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[bytes, Any]:
        key = next(reversed(self))
        return key, self.pop(key)

    def clear(self) -> None:
        super().clear()
        self.bytes = 0
        self.sender.clear()
        self.per_sender.clear()


class BoundedValueStore(ValueStore):
    def __init__(self, host: Any, local_peer_id: Any, limits: DhtLimits) -> None:
        super().__init__(host=host, local_peer_id=local_peer_id)
        self.limits = limits
        self.store: _AccountedRecords = _AccountedRecords()
        self.refused: Counter[str] = Counter()

    def put_record(self, key: bytes, record: Any) -> None:
        """A record from the network: a PUT_VALUE is refused with
        ``StoreFull`` past any limit (the library then resets the stream); a
        value our own lookup found is simply not cached."""
        try:
            self._admit(key, len(key) + len(record.value))
        except StoreFull:
            if current_sender.get():
                raise
            return
        super().put_record(key, record)

    def _admit(self, key: bytes, size: int) -> None:
        lim, store = self.limits, self.store
        if size - len(key) > lim.record_bytes_max:
            self._refuse("value_too_large", f"a {size}-byte record")
        old = store.get(key)
        old_size = _AccountedRecords._size(old) if old is not None else 0
        who = current_sender.get()
        if who and key not in store and store.per_sender.get(who, 0) >= lim.values_per_peer_max:
            self._refuse("per_peer", f"{who[:16]} already put {lim.values_per_peer_max} records here")
        if key not in store and len(store) >= lim.values_max:
            self._refuse("count", f"{lim.values_max} records held")
        if store.bytes - old_size + size > lim.value_bytes_max:
            self._refuse("bytes", f"{store.bytes} bytes held")

    def _refuse(self, why: str, detail: str) -> None:
        self.refused[why] += 1
        log.debug("DHT record refused (%s): %s", why, detail)
        raise StoreFull(f"DHT store limit: {detail}")

    def _evict_if_full(self) -> None:
        return  # our limits are far below the library's 50,000; nothing is evicted behind our back


class BoundedProviderStore(ProviderStore):
    def __init__(self, host: Any, peer_routing: Any, limits: DhtLimits,
                 classes_of: Callable[[str], Iterable[bytes] | None]) -> None:
        super().__init__(host=host, peer_routing=peer_routing)
        self.limits = limits
        #: The provider keys a peer's signed advert names, or None if unknown.
        self.classes_of = classes_of
        self.refused: Counter[str] = Counter()
        self._keys_of: dict[str, dict[bytes, None]] = {}

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        if provider is None or provider.peer_id is None:
            return
        pid = provider.peer_id.to_base58()
        if provider.peer_id != self.local_peer_id and not self._admit(key, pid):
            return
        super().add_provider(key, provider)
        if pid in self.providers.get(key, {}):
            self._keys_of.setdefault(pid, {})[key] = None

    def _admit(self, key: bytes, pid: str) -> bool:
        lim = self.limits
        known = self.classes_of(pid)
        if known is not None and key not in set(known):
            return self._refuse("not_its_class", pid, key)
        keys = self._live_keys(pid)
        if key not in keys and len(keys) >= lim.provider_keys_per_peer_max:
            return self._refuse("per_peer", pid, key)
        if key not in self.providers and len(self.providers) >= lim.provider_keys_max:
            return self._refuse("keys", pid, key)
        if key not in keys and sum(map(len, self.providers.values())) >= lim.provider_records_max:
            return self._refuse("records", pid, key)
        return True

    def _live_keys(self, pid: str) -> dict[bytes, None]:
        """``pid``'s keys still in the store (expiry deletes behind our back)."""
        keys = self._keys_of.get(pid)
        if not keys:
            return {}
        live = {k: None for k in keys if pid in self.providers.get(k, {})}
        if live:
            self._keys_of[pid] = live
        else:
            del self._keys_of[pid]
        return live

    def _refuse(self, why: str, pid: str, key: bytes) -> bool:
        self.refused[why] += 1
        log.debug("provider record refused (%s): %s for %s", why, pid[:16], key.hex()[:16])
        return False
