"""NATs in the simulated network: who can dial whom, relays, hole punching.

The model of what the node does (``p2pgpu/node/_reach.py``; issue #14), at
the simulator's level of detail:

- a share ``nat_pct`` of nodes sits behind NATs; of those, a share
  ``nat_symmetric_pct`` behind NATs that pick a random port per destination
  (symmetric, ``--random-fully``), the others behind NATs that keep a port
  per inside port (hole punching can work).  Placement draws come from the
  ``net/nat`` stream, so a run without NAT keeps its trace byte for byte;
- every private node holds slots on ``relays_per_private`` public nodes
  (drawn at the start; a relay that is down is not used);
- a connection with at least one public end is direct (the private end
  dials out).  Between two private nodes the dialer reaches the other
  through one of its relays, and the two punch: it succeeds with
  ``punch_success_pct`` when both NATs keep ports, never when one is
  symmetric.  A punched connection is direct; the others stay relayed, each
  taking one of the relay's ``relay_circuits_max`` circuits (a connection
  through a full relay, or to a node with no live relay, fails);
- a message over a relayed connection, and any message between two private
  nodes that share no connection (formation talks to strangers), goes
  through the relay: the delay of both legs.  When the relay goes down its
  circuits die after ``detect_ms``.

Counters (``summary``): connections direct / punched / relayed / refused,
punch attempts and failures, messages relayed, and the busiest relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._network import Network

PUBLIC, CONE, SYMMETRIC = 0, 1, 2


class NatModel:
    __slots__ = ("circuits", "counts", "kind", "net", "relays", "rng", "via")

    def __init__(self, net: Network) -> None:
        cfg = net.cfg
        self.net = net
        place = net.engine.stream("net/nat")
        self.rng = net.engine.stream("net/nat/punch")
        n = net.n
        self.kind = [PUBLIC] * n
        for i in range(n):
            if place.random() * 100 < cfg.nat_pct:
                self.kind[i] = SYMMETRIC if place.random() * 100 < cfg.nat_symmetric_pct else CONE
        public = [i for i in range(n) if self.kind[i] == PUBLIC]
        #: private node -> the public nodes it holds relay slots on
        self.relays: dict[int, list[int]] = {}
        for i in range(n):
            if self.kind[i] != PUBLIC and public:
                k = min(cfg.relays_per_private, len(public))
                self.relays[i] = place.sample(public, k)
        #: relayed connection (a, b) (both orders) -> its relay
        self.via: dict[tuple[int, int], int] = {}
        self.circuits = [0] * n
        self.counts = {"direct": 0, "punched": 0, "relayed": 0, "refused_no_relay": 0, "refused_relay_full": 0,
                       "punch_failed": 0, "messages_relayed": 0, "messages_no_relay": 0}

    def private(self, node: int) -> bool:
        return self.kind[node] != PUBLIC

    def _relay_for(self, dst: int, *, need_circuit: bool) -> int:
        """A live relay of ``dst`` (with a free circuit when one is needed), or -1."""
        up = self.net.up
        cap = self.net.cfg.relay_circuits_max
        for r in self.relays.get(dst, ()):
            if up[r] and (not need_circuit or self.circuits[r] < cap):
                return r
        return -1

    def connect(self, a: int, b: int) -> bool:
        """Whether ``a`` may open a connection to ``b`` (and through what)."""
        kind = self.kind
        if kind[a] == PUBLIC or kind[b] == PUBLIC:
            self.counts["direct"] += 1
            return True
        if kind[a] == CONE and kind[b] == CONE and self._has_relay(b):
            if self.rng.random() * 100 < self.net.cfg.punch_success_pct:
                self.counts["punched"] += 1
                return True
            self.counts["punch_failed"] += 1
        elif self._has_relay(b):
            self.counts["punch_failed"] += 1
        r = self._relay_for(b, need_circuit=True)
        if r < 0:
            self.counts["refused_relay_full" if self._has_relay(b) else "refused_no_relay"] += 1
            return False
        self.via[(a, b)] = self.via[(b, a)] = r
        self.circuits[r] += 1
        self.counts["relayed"] += 1
        return True

    def _has_relay(self, node: int) -> bool:
        return self._relay_for(node, need_circuit=False) >= 0

    def dropped(self, a: int, b: int) -> None:
        """The connection a-b closed: its circuit, if any, is free."""
        r = self.via.pop((a, b), -1)
        if r >= 0:
            self.via.pop((b, a), None)
            self.circuits[r] -= 1

    def relay_down(self, node: int) -> list[tuple[int, int]]:
        """``node`` went down: the relayed connections through it (to cut)."""
        return [(a, b) for (a, b), r in self.via.items() if r == node and a < b]

    def path(self, src: int, dst: int) -> int:
        """How a message from ``src`` to ``dst`` travels: -1 direct, -2 not at
        all (two private nodes, no live relay), else the relay it crosses."""
        r = self.via.get((src, dst), -1)
        if r >= 0:
            return r
        kind = self.kind
        if kind[src] == PUBLIC or kind[dst] == PUBLIC or dst in self.net.peers[src]:
            return -1  # a public end, or a punched connection
        r = self._relay_for(dst, need_circuit=False)
        return r if r >= 0 else -2

    def summary(self) -> dict[str, Any]:
        n = self.net.n
        private = sum(1 for k in self.kind if k != PUBLIC)
        return {"nodes_private": private, "nodes_symmetric": sum(1 for k in self.kind if k == SYMMETRIC),
                "nodes_public": n - private, **self.counts, "relayed_open": len(self.via) // 2,
                "relay_circuits_busiest": max(self.circuits, default=0)}
