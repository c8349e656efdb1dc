"""The simulated network: links, faults, connections, partitions.

Nodes are integers ``0..n-1``; everything per node lives in flat lists
indexed by node (fast, and small enough for 100,000 nodes).  A message is
delivered as an engine event after serialisation on the sender's uplink
(``bandwidth_mbps``) plus the one-way delay between the two regions (half the
RTT of :mod:`._regions`, or ``link_ms`` in uniform mode) with +-``jitter_pct``
uniform jitter.  Faults: loss, duplication, reordering (a share of messages
held back by up to ``reorder_ms`` so later ones overtake them), partitions
(messages across sides are dropped, and the connections die after
``detect_ms``), and nodes going down (messages to a down node, or to an
earlier incarnation of it, vanish).

Connections are symmetric lists of peers.  Protocol models register a
handler per message kind; the network only moves ``(src, payload)`` pairs.
All draws come from the ``"net"`` stream, in event order, so they replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._engine import _TIE_BITS, _TIE_MASK, Engine, bucket_bits
from ._nat import NatModel
from ._regions import DEFAULT_WEIGHTS, REGIONS, intra_region_rtt_ms, rtt_ms
from ._scenario import NetworkSection, ScenarioError

Handler = Callable[[int, int, Any], None]


class Network:
    __slots__ = (
        "_delay_us",
        "_detect_us",
        "_dup",
        "_jit",
        "_live_nodes",
        "_live_pos",
        "_loss",
        "_random",
        "_reorder",
        "_reorder_us",
        "_rng",
        "_us_per_byte",
        "bytes_in",
        "bytes_out",
        "cfg",
        "dropped",
        "engine",
        "epoch",
        "handlers",
        "live",
        "n",
        "nat",
        "on_peer_lost",
        "peers",
        "region",
        "region_names",
        "side",
        "up",
        "uplink_free_us",
    )

    def __init__(self, engine: Engine, cfg: NetworkSection, n: int) -> None:
        self.engine = engine
        self.cfg = cfg
        self.n = n
        self._rng = engine.stream("net")
        self._random = self._rng.random
        weights = cfg.regions or DEFAULT_WEIGHTS
        for name in weights:
            if cfg.latency == "regions" and name not in REGIONS and not cfg.rtt_ms:
                raise ScenarioError(f"network.regions.{name}: unknown region (known: {', '.join(REGIONS)})")
        self.region_names = list(weights)
        place = engine.stream("net/placement")
        self.region = place.choices(range(len(self.region_names)), weights=list(weights.values()), k=n)
        table = None
        if cfg.rtt_ms:
            table = {}
            for key, ms in cfg.rtt_ms.items():
                a, _, b = key.partition("|")
                table[(a, b)] = int(ms)
        names = self.region_names
        if cfg.latency == "uniform":
            self._delay_us = [[int(cfg.link_ms * 1000)] * len(names) for _ in names]
        else:
            intra = cfg.intra_region_rtt_ms if cfg.intra_region_rtt_ms else intra_region_rtt_ms
            self._delay_us = [[int((intra if a == b else rtt_ms(a, b, table)) * 500) for b in names]
                              for a in names]
        self._jit = cfg.jitter_pct / 100.0
        self._loss = cfg.loss_pct / 100.0
        self._dup = cfg.duplicate_pct / 100.0
        self._reorder = cfg.reorder_pct / 100.0
        self._reorder_us = int(cfg.reorder_ms * 1000)
        self._us_per_byte = 8.0 / cfg.bandwidth_mbps  # 1 Mbit/s = 1 bit/us
        self._detect_us = int(cfg.detect_ms * 1000)
        self.up = [False] * n
        self.live = 0
        #: the nodes that are up, in no meaningful but a deterministic order
        #: (swap-removal), and each one's place in it: one draw picks a live node
        self._live_nodes: list[int] = []
        self._live_pos = [-1] * n
        self.epoch = [0] * n
        self.peers: list[list[int]] = [[] for _ in range(n)]
        self.side: list[int] | None = None
        self.uplink_free_us = [0] * n
        self.bytes_out = [0] * n
        self.bytes_in = [0] * n
        self.dropped = {"loss": 0, "down": 0, "partition": 0}
        self.handlers: dict[str, Handler] = {}
        #: called as on_peer_lost(node, peer) when ``node`` notices ``peer`` is gone
        self.on_peer_lost: list[Callable[[int, int], None]] = []
        #: NATs, relays and hole punching (``_nat.py``), when any node is behind one
        self.nat: NatModel | None = NatModel(self) if cfg.nat_pct > 0 else None

    # -- sending --------------------------------------------------------------
    def send(self, src: int, dst: int, nbytes: int, kind: str, payload: Any) -> bool:
        """Queue a message; False if it was dropped at once (cut, down or lost)."""
        t = self.depart(src, dst, nbytes)
        if t < 0:
            return False
        self.land(t, src, dst, nbytes, kind, payload)
        return True

    def depart(self, src: int, dst: int, nbytes: int) -> int:
        """The sender's side of a message (the cut, bytes out, loss, the
        uplink's queue, the link's delay, jitter and reordering): when it will
        land at ``dst``, or -1 if it was dropped at once.  :meth:`land` then
        schedules it, or :meth:`absorb` counts it as a certain duplicate."""
        if not self.up[dst]:
            self.dropped["down"] += 1
            return -1
        side = self.side
        if side is not None and side[src] != side[dst]:
            self.dropped["partition"] += 1
            return -1
        self.bytes_out[src] += nbytes
        rnd = self._random
        if self._loss and rnd() < self._loss:
            self.dropped["loss"] += 1
            return -1
        now = self.engine.now_us
        ufree = self.uplink_free_us
        free = ufree[src]
        done = (free if free > now else now) + int(nbytes * self._us_per_byte)  # noqa: FURB136 (hot path)
        ufree[src] = done
        region = self.region
        nat = self.nat
        if nat is None:
            base = self._delay_us[region[src]][region[dst]]
        else:
            hop = nat.path(src, dst)
            if hop == -2:
                nat.counts["messages_no_relay"] += 1
                self.dropped["nat"] = self.dropped.get("nat", 0) + 1
                return -1
            if hop >= 0:
                nat.counts["messages_relayed"] += 1
                base = self._delay_us[region[src]][region[hop]] + self._delay_us[region[hop]][region[dst]]
            else:
                base = self._delay_us[region[src]][region[dst]]
        t: int = done + base
        if self._jit:
            t += int(base * self._jit * (2.0 * rnd() - 1.0))
        if self._reorder and rnd() < self._reorder:
            t += int(rnd() * self._reorder_us)
        return t

    def land(self, t: int, src: int, dst: int, nbytes: int, kind: str, payload: Any) -> None:
        """Schedule the arrival at ``t`` of what :meth:`depart` sent (and of a
        second copy, a little later, for ``duplicate_pct``).  The engine's
        push is inlined: this is the hot path of every run."""
        engine = self.engine
        item = (dst, self.epoch[dst], src, nbytes, kind, payload)
        seq = engine._seq = engine._seq + 1
        key = (t << _TIE_BITS) | ((seq * engine._mul + engine._salt) & _TIE_MASK)
        lst = engine._buckets.get(t >> bucket_bits)
        if lst is None:
            engine.push_key(key, self._arrive, item)
        else:
            lst.append((-key, self._arrive, item))
        if self._dup and self._random() < self._dup:
            base = self._delay_us[self.region[src]][self.region[dst]]
            engine.at(t + int(base * self._jit * self._random()) + 1, self._arrive, item)

    def absorb(self, t: int, src: int, dst: int, nbytes: int) -> tuple[int, int]:
        """What :meth:`depart` sent for ``t`` can only land as a duplicate: take
        the draws and the tie-break numbers that :meth:`land` would (so every
        other event keeps its key, and the run its trace), count the copies
        in ``bytes_in`` now instead of scheduling them, and return their keys
        (the second is 0 unless ``duplicate_pct`` doubled it) so that
        :meth:`unabsorb` can still schedule them exactly as :meth:`land` would
        have.  The one difference from landing: a copy whose receiver goes
        down while it is in flight is counted as received, not as dropped (a
        counter, never a decision, and absent from the trace)."""
        engine = self.engine
        mul = engine._mul
        salt = engine._salt
        seq = engine._seq = engine._seq + 1
        key = (t << _TIE_BITS) | ((seq * mul + salt) & _TIE_MASK)
        key2 = 0
        if self._dup and self._random() < self._dup:
            base = self._delay_us[self.region[src]][self.region[dst]]
            t2 = t + int(base * self._jit * self._random()) + 1
            seq = engine._seq = seq + 1
            key2 = (t2 << _TIE_BITS) | ((seq * mul + salt) & _TIE_MASK)
            self.bytes_in[dst] += 2 * nbytes
        else:
            self.bytes_in[dst] += nbytes
        return key, key2

    def unabsorb(self, key: int, src: int, dst: int, nbytes: int, kind: str, payload: Any) -> None:
        """Take back one copy counted by :meth:`absorb`: it lands after all,
        with the key it would have had."""
        self.bytes_in[dst] -= nbytes
        self.engine.push_key(key, self._arrive, (dst, self.epoch[dst], src, nbytes, kind, payload))

    def account(self, src: int, dst: int, nbytes: int) -> int:
        """:meth:`depart` then :meth:`absorb`: a message whose landing could
        change nothing but counters.  Returns how many copies land (0-2)."""
        if self._dup or self._jit == 0.0 or self._reorder or self.nat is not None:
            t = self.depart(src, dst, nbytes)
            if t < 0:
                return 0
            return 2 if self.absorb(t, src, dst, nbytes)[1] else 1
        # The common case inlined (no duplication or reordering): the same
        # checks, counters and draws as depart() and absorb().
        if not self.up[dst]:
            self.dropped["down"] += 1
            return 0
        side = self.side
        if side is not None and side[src] != side[dst]:
            self.dropped["partition"] += 1
            return 0
        self.bytes_out[src] += nbytes
        rnd = self._random
        if self._loss and rnd() < self._loss:
            self.dropped["loss"] += 1
            return 0
        now = self.engine.now_us
        ufree = self.uplink_free_us
        free = ufree[src]
        ufree[src] = (free if free > now else now) + int(nbytes * self._us_per_byte)  # noqa: FURB136 (hot path)
        rnd()  # the jitter draw depart() takes
        self.engine._seq += 1  # the tie-break number land() takes
        self.bytes_in[dst] += nbytes
        return 1

    def _arrive(self, item: tuple[int, int, int, int, str, Any]) -> None:
        dst, epoch, src, nbytes, kind, payload = item
        if not self.up[dst] or self.epoch[dst] != epoch:
            self.dropped["down"] += 1
            return
        self.bytes_in[dst] += nbytes
        self.handlers[kind](dst, src, payload)

    def rtt_us(self, a: int, b: int) -> int:
        return 2 * self._delay_us[self.region[a]][self.region[b]]

    # -- connections ------------------------------------------------------------
    def reachable(self, a: int, b: int) -> bool:
        side = self.side
        return self.up[a] and self.up[b] and (side is None or side[a] == side[b])

    def connect(self, a: int, b: int) -> bool:
        up = self.up
        side = self.side
        if a == b or not (up[a] and up[b]) or (side is not None and side[a] != side[b]):
            return False
        pa, pb = self.peers[a], self.peers[b]
        if b in pa or len(pa) >= self.cfg.peers_max or len(pb) >= self.cfg.peers_max:
            return False
        if self.nat is not None and not self.nat.connect(a, b):
            return False
        pa.append(b)
        pb.append(a)
        return True

    def _drop_link(self, a: int, b: int) -> None:
        pa = self.peers[a]
        if b in pa:
            pa.remove(b)
            if self.nat is not None and a not in self.peers[b]:
                self.nat.dropped(a, b)  # both ends closed: the circuit is free
            for cb in self.on_peer_lost:
                cb(a, b)

    def disconnect(self, a: int, b: int) -> None:
        """Close a connection on purpose: both ends know at once."""
        self._drop_link(a, b)
        self._drop_link(b, a)

    def node_down(self, node: int, *, crash: bool) -> None:
        """``node`` stops; its peers notice at once (clean close) or after detect_ms (crash)."""
        if self.up[node]:
            self.live -= 1
            pos = self._live_pos[node]
            last = self._live_nodes.pop()
            if last != node:
                self._live_nodes[pos] = last
                self._live_pos[last] = pos
            self._live_pos[node] = -1
        self.up[node] = False
        self.epoch[node] += 1
        peers, self.peers[node] = self.peers[node], []
        delay = self._detect_us if crash else 1000
        for p in peers:
            self.engine.after(delay, self._notice_gone, (p, node))
        if self.nat is not None:
            for a, b in self.nat.relay_down(node):  # circuits through it die too
                self.engine.after(self._detect_us, self._cut_pair, (a, b))

    def _notice_gone(self, pair: tuple[int, int]) -> None:
        self._drop_link(*pair)

    def _cut_pair(self, pair: tuple[int, int]) -> None:
        self._drop_link(*pair)
        self._drop_link(pair[1], pair[0])

    def node_up(self, node: int) -> None:
        if not self.up[node]:
            self.live += 1
            self._live_pos[node] = len(self._live_nodes)
            self._live_nodes.append(node)
        self.up[node] = True
        self.uplink_free_us[node] = self.engine.now_us

    # -- partitions -------------------------------------------------------------
    def partition(self, side: list[int]) -> None:
        """Cut the network into sides (``side[node]``); cross links die after detect_ms."""
        self.side = side
        self.engine.after(self._detect_us, self._cut_links, None)

    def _cut_links(self, _: Any) -> None:
        side = self.side
        if side is None:
            return
        for a in range(self.n):
            for b in list(self.peers[a]):
                if side[a] != side[b]:
                    self._drop_link(a, b)

    def heal(self) -> None:
        self.side = None

    def random_live(self, rng: Any) -> int | None:
        """A uniformly drawn node that is up (a stand-in for a DHT random walk):
        one draw from the list of live nodes, however few are up."""
        live = self._live_nodes
        if not live:
            return None
        return live[int(rng.random() * len(live))]
