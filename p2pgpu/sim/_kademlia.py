"""A Kademlia model: XOR ids, k-buckets, iterative lookups with alpha in flight.

py-libp2p's KadDHT is not sans-IO, so lookups are modelled: each node has an
``id_bits``-bit id (the top bits of sha256 over its index and the seed, as a
peer id hash would be), a routing table of k-buckets, and a lookup that keeps
``alpha`` FIND_NODE requests in flight to the closest unqueried peers it
knows, stopping when the ``k`` closest it has heard of have all answered.
Requests travel on the simulated network, so latency, loss, partitions and
dead entries (requests that time out after ``rpc_timeout_ms``) shape hops and
time exactly as they would shape the real one.

Routing tables are built lazily, the first time a node is asked or asks:
with all ids sorted, the peers that fall in bucket ``i`` of node ``x`` (XOR
distance in ``[2**i, 2**(i+1))``) form one contiguous range of the sorted
array, so a bucket is filled by sampling up to ``k`` of that range with the
node's own stream.  That stands in for a table grown by past traffic, and it
is what keeps 100,000 nodes cheap: only tables that are used exist.  A node
that leaves stays in others' tables until a request to it times out, which
is how churn degrades lookups.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._engine import Engine
from ._network import Network
from ._scenario import KademliaSection


@dataclass(slots=True)
class Lookup:
    origin: int
    target: int
    started_us: int
    on_done: Callable[[Lookup], None] | None
    #: id -> (node, depth); depth = hops from the origin's own table
    known: dict[int, tuple[int, int]] = field(default_factory=dict)
    queried: dict[int, bool] = field(default_factory=dict)  # node -> answered?
    in_flight: int = 0
    hops: int = 0
    rpcs: int = 0
    timeouts: int = 0
    done: bool = False
    found: bool = False
    finished_us: int = 0


class Kademlia:
    def __init__(self, engine: Engine, net: Network, cfg: KademliaSection) -> None:
        self.engine = engine
        self.net = net
        self.cfg = cfg
        bits = cfg.id_bits
        self.ids: list[int] = []
        for i in range(net.n):
            h = hashlib.sha256(f"{engine.seed}/{i}".encode()).digest()
            self.ids.append(int.from_bytes(h, "big") >> (256 - bits))
        order = sorted(range(net.n), key=lambda i: self.ids[i])
        self._sorted_ids = [self.ids[i] for i in order]
        self._sorted_nodes = order
        self.tables: dict[int, list[list[int]]] = {}
        self._timeout_us = int(cfg.rpc_timeout_ms * 1000)
        self.finished: list[Lookup] = []
        self._next_req = 0
        self._pending: dict[int, tuple[Lookup, int, int]] = {}
        net.handlers["kad.req"] = self._on_request
        net.handlers["kad.resp"] = self._on_response

    # -- routing tables ---------------------------------------------------------
    def table(self, node: int) -> list[list[int]]:
        t = self.tables.get(node)
        if t is None:
            rng = self.engine.stream(f"kad/{node}")
            x = self.ids[node]
            t = []
            for i in range(self.cfg.id_bits):
                lo = ((x >> i) ^ 1) << i
                a = bisect.bisect_left(self._sorted_ids, lo)
                b = bisect.bisect_left(self._sorted_ids, lo + (1 << i))
                if b - a <= self.cfg.k:
                    t.append(self._sorted_nodes[a:b])
                else:
                    t.append([self._sorted_nodes[j] for j in sorted(rng.sample(range(a, b), self.cfg.k))])
            self.tables[node] = t
        return t

    def forget(self, node: int, peer: int) -> None:
        t = self.tables.get(node)
        if t is not None:
            d = self.ids[node] ^ self.ids[peer]
            if d:
                bucket = t[d.bit_length() - 1]
                if peer in bucket:
                    bucket.remove(peer)

    def closest(self, node: int, target: int, count: int) -> list[int]:
        ids = self.ids
        entries = [p for bucket in self.table(node) for p in bucket]
        entries.sort(key=lambda p: ids[p] ^ target)
        return entries[:count]

    # -- lookups ------------------------------------------------------------------
    def lookup(self, origin: int, target: int, on_done: Callable[[Lookup], None] | None = None) -> Lookup:
        lk = Lookup(origin, target, self.engine.now_us, on_done)
        for p in self.closest(origin, target, self.cfg.k):
            lk.known[self.ids[p]] = (p, 1)
        self._pump(lk)
        return lk

    def _pump(self, lk: Lookup) -> None:
        if lk.done:
            return
        k, alpha = self.cfg.k, self.cfg.alpha
        target = lk.target
        best = sorted(lk.known, key=lambda i: i ^ target)[:k]
        pending = [lk.known[i] for i in best if lk.known[i][0] not in lk.queried]
        if not pending and lk.in_flight == 0:
            self._finish(lk)
            return
        for node, depth in pending:
            if lk.in_flight >= alpha:
                break
            lk.queried[node] = False
            lk.in_flight += 1
            lk.rpcs += 1
            self._next_req += 1
            req = self._next_req
            self._pending[req] = (lk, node, depth)
            self.net.send(lk.origin, node, self.cfg.message_bytes, "kad.req", (req, target))
            self.engine.after(self._timeout_us, self._timeout, req)

    def _on_request(self, dst: int, src: int, payload: tuple[int, int]) -> None:
        req, target = payload
        found = self.closest(dst, target, self.cfg.k)
        self.net.send(dst, src, self.cfg.message_bytes + 40 * len(found), "kad.resp", (req, dst, found))

    def _on_response(self, dst: int, src: int, payload: tuple[int, int, list[int]]) -> None:
        req, _responder, found = payload
        entry = self._pending.pop(req, None)
        if entry is None:
            return  # timed out already
        lk, node, depth = entry
        lk.in_flight -= 1
        lk.queried[node] = True
        ids = self.ids
        if ids[node] == lk.target:
            lk.found = True
        for p in found:
            i = ids[p]
            if i not in lk.known and p != lk.origin:
                lk.known[i] = (p, depth + 1)
        self._pump(lk)

    def _timeout(self, req: int) -> None:
        entry = self._pending.pop(req, None)
        if entry is None:
            return
        lk, node, _ = entry
        lk.in_flight -= 1
        lk.timeouts += 1
        del lk.known[self.ids[node]]
        self.forget(lk.origin, node)
        self._pump(lk)

    def _finish(self, lk: Lookup) -> None:
        lk.done = True
        lk.finished_us = self.engine.now_us
        target = lk.target
        answered = [(i ^ target, d) for i, (p, d) in lk.known.items() if lk.queried.get(p)]
        # hops: how deep the chain of referrals went to reach the closest peer that answered
        lk.hops = min(answered)[1] if answered else 0
        self.finished.append(lk)
        if lk.on_done is not None:
            lk.on_done(lk)

    def stats(self) -> dict[str, Any]:
        done = self.finished
        if not done:
            return {"dht_lookups": 0}
        hops = sorted(lk.hops for lk in done)
        lat = sorted((lk.finished_us - lk.started_us) / 1000 for lk in done)
        return {
            "dht_lookups": len(done),
            "dht_success_ratio": sum(1 for lk in done if lk.found) / len(done),
            "dht_hops_mean": sum(hops) / len(hops),
            "dht_hops_p50": _pct(hops, 50),
            "dht_hops_p99": _pct(hops, 99),
            "dht_latency_ms_p50": _pct(lat, 50),
            "dht_latency_ms_p99": _pct(lat, 99),
            "dht_timeouts_mean": sum(lk.timeouts for lk in done) / len(done),
        }


def _pct(sorted_vals: list[Any], p: float) -> Any:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[i]
