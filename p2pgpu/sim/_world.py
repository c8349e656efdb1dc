"""The simulated world: nodes that run the real advert and matching cores.

This is the simulator's driver, the twin of ``p2pgpu/node``: it turns the
cores' inputs and outputs into events on the simulated network.  Each node
has GPUs drawn from a catalog, a payout address, a region, a clock skew and,
for the share ``adverts.real_fraction``, a real Ed25519 identity whose
adverts are really built (:class:`~p2pgpu.core.Advert`), signed
(:func:`~p2pgpu.core.sign_advert`) and gossiped as bytes.  Nodes that keep a
market view (submitters, ``adverts.observers`` of them, or all) ingest those
bytes with the real :class:`~p2pgpu.core.AdvertBook` at their own skewed
``now_ms``; its verdict is the GossipSub validator's, so a rejected advert is
not forwarded and costs the sender score, exactly as in the node.

What is real and what is modelled is listed in docs/simulation.md.  In short:
signatures, advert decoding, book rules, sequence numbers (``next_seq``) and
matching are the real code; routing (GossipSub, Kademlia) and links are
models; nodes without a book validate with the cached verdict of the first
real verification of the same bytes plus their own clock check.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import base58

from p2pgpu.core import (
    Advert,
    AdvertBook,
    GossipVerdict,
    GpuInfo,
    Identity,
    PeerMisbehaved,
    Reason,
    advert_time_reason,
    next_seq,
    sign_advert,
    verdict_for,
    verify_advert_bytes,
)
from p2pgpu.core._identity import Verifier

from ._adversary import Adversary, make_adversaries
from ._churn import Churn, partition_sides
from ._engine import Engine, SimulationStopped
from ._gossip import ACCEPT, REJECT, GossipSub, Msg
from ._invariants import Checker
from ._jobs import JobFlow
from ._kademlia import Kademlia, Lookup
from ._metrics import Metrics
from ._scenario import Scenario

ADVERTS = "/p2pgpu/adverts/1"
JOBS = "/p2pgpu/jobs/1"
#: size of a modelled (unsigned) advert: what a 4-GPU signed advert weighs
modelled_advert_bytes = 850
#: allocations between two collections of young objects during a run
gc_young_threshold = 100_000

DEFAULT_CATALOG: list[dict[str, Any]] = [
    {"model": "NVIDIA GeForce RTX 4090", "memory_mb": 24564, "compute_capability": "8.9",
     "count": [1, 2], "price": 400_000, "weight": 5},
    {"model": "NVIDIA RTX A6000", "memory_mb": 49140, "compute_capability": "8.6",
     "count": [2, 4], "price": 700_000, "weight": 2},
    {"model": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920, "compute_capability": "8.0",
     "count": [4, 8], "price": 1_500_000, "weight": 2},
    {"model": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0",
     "count": [8], "price": 2_500_000, "weight": 1},
]


class SimNode:
    """One node's static facts and the state the world keeps for it.

    The Ed25519 identity (a key pair, and a base58 peer id) and the base58
    payout address are made the first time they are read, from 32 bytes
    drawn at build time: a node that never advertises, submits or runs a job
    in a short run never pays for them (two thirds of building 100,000 nodes).
    """

    __slots__ = ("_id_seed", "_identity", "_payout", "_payout_key", "_registry", "adversary", "advert", "book",
                 "gpus", "idx", "price", "region", "seq", "skew_ms", "submitter")

    def __init__(self, *, idx: int, region: str, gpus: tuple[GpuInfo, ...], price: int, payout_key: bytes,
                 skew_ms: int, id_seed: bytes | None, registry: dict[str, int]) -> None:
        self.idx = idx
        self.region = region
        self.gpus = gpus
        self.price = price
        self.skew_ms = skew_ms
        self._payout_key = payout_key
        self._payout = ""
        self._id_seed = id_seed
        self._identity: Identity | None = None
        self._registry = registry
        self.book: AdvertBook | None = None
        self.seq = 0
        self.advert: Advert | None = None
        self.adversary: Adversary | None = None
        self.submitter = False

    @property
    def real(self) -> bool:
        """Whether this node has a real identity (signs real adverts)."""
        return self._id_seed is not None

    @property
    def identity(self) -> Identity | None:
        if self._identity is None and self._id_seed is not None:
            ident = self._identity = Identity(self._id_seed)
            self._registry[ident.peer_id] = self.idx
        return self._identity

    @property
    def payout_address(self) -> str:
        if not self._payout:
            self._payout = base58.b58encode(self._payout_key).decode()
        return self._payout


class World:
    def __init__(self, scenario: Scenario, seed: int, *, progress: Callable[[str], None] | None = None,
                 tracing: bool = True, mutation: str = "", verify: Verifier | None = None) -> None:
        self.scenario = s = scenario
        self.seed = seed
        self.mutation = mutation
        #: The signature check every core of this world uses (the run's
        #: memoised one, ``_crypto.py``; None: the real check each time).
        self.verify = verify
        #: Wall-clock ms at simulated time 0 (every node clock counts from it).
        self.epoch_ms = s.run.start_epoch_ms
        self.engine = Engine(seed, tracing=tracing)
        self.progress = progress
        self.n = n = s.run.nodes
        from ._network import Network
        self.net = Network(self.engine, s.network, n)
        self.metrics = Metrics(self)
        self.gossip = GossipSub(self.engine, self.net, s.gossipsub, self._judge, self._deliver)
        self.kad = Kademlia(self.engine, self.net, s.kademlia) if s.kademlia.enabled else None
        self.checker = Checker(self)
        self.churn = Churn(self, s.churn)
        self._build_nodes()
        self.jobs = JobFlow(self, s.jobs, verify=verify)
        self.adversaries = make_adversaries(self, s.adversary)
        #: advert bytes -> their reason for refusal, or their (issued, expires)
        #: times for each node's own clock check
        self._verdicts: dict[bytes, Reason | tuple[int, int]] = {}
        self.end_us = int(s.run.duration_s * 1_000_000)
        self.quiet_us = self.end_us - int(s.run.settle_s * 1_000_000)
        self.stopped: str = ""

    # -- setup ------------------------------------------------------------------------
    def _build_nodes(self) -> None:
        s = self.scenario
        rng = self.engine.stream("nodes")
        catalog = s.adverts.gpu_catalog or DEFAULT_CATALOG
        weights = [int(c.get("weight", 1)) for c in catalog]
        skew = s.churn.clock_skew_ms
        real_k = round(s.adverts.real_fraction * self.n)
        real = [False] * self.n
        for i in rng.sample(range(self.n), real_k):
            real[i] = True
        self.nodes: list[SimNode] = []
        self.by_peer: dict[str, int] = {}
        gpu_of = [GpuInfo(model=c["model"], memory_mb=int(c["memory_mb"]),
                          compute_capability=str(c["compute_capability"])) for c in catalog]
        kinds = range(len(catalog))
        for i in range(self.n):
            k = rng.choices(kinds, weights=weights)[0]
            c = catalog[k]
            counts = c.get("count", [1])
            count = rng.choice(counts if isinstance(counts, list) else [counts])
            payout_key = rng.randbytes(32)
            skew_ms = int(rng.uniform(-skew, skew)) if skew else 0
            self.nodes.append(SimNode(
                idx=i, region=self.net.region_names[self.net.region[i]], gpus=(gpu_of[k],) * count,
                price=int(c.get("price", 1_000_000)), payout_key=payout_key, skew_ms=skew_ms,
                id_seed=rng.randbytes(32) if real[i] else None, registry=self.by_peer,
            ))
        # Books: every node, or submitters (chosen by JobFlow) plus observers.
        book_rng = self.engine.stream("observers")
        if s.adverts.books == "all":
            self.book_nodes = list(range(self.n))
        else:
            self.book_nodes = sorted(book_rng.sample(range(self.n), min(self.n, s.adverts.observers)))
        for i in self.book_nodes:
            self.nodes[i].book = self._new_book()

    def _new_book(self) -> AdvertBook:
        return AdvertBook(network=self.scenario.run.network_name, allow_simulated=True, verify=self.verify)

    def node_now_ms(self, node: int) -> int:
        """What ``node``'s clock reads now: the epoch, the simulated time, its skew."""
        return self.epoch_ms + self.engine.now_us // 1000 + self.nodes[node].skew_ms

    def network_now_ms(self) -> int:
        """A clock without skew (the simulator's view of wall-clock time)."""
        return self.epoch_ms + self.engine.now_us // 1000

    def engine_us_of(self, node: int, at_ms: int) -> int:
        """The simulated time at which ``node``'s clock reads ``at_ms``."""
        return (at_ms - self.nodes[node].skew_ms - self.epoch_ms) * 1000

    # -- lifecycle ----------------------------------------------------------------------
    def node_up(self, node: int) -> None:
        net = self.net
        net.node_up(node)
        self.engine.trace("up", node)
        self.checker.on_up(node)
        self.gossip.start(node)
        rng = self.gossip.rng(node)
        self._connect_some(node, rng)
        # A joining node advertises within 2 s; the population present at the
        # start is a network already running, whose adverts are spread over
        # initial_spread_s (short by default, so that books fill quickly).
        a = self.scenario.adverts
        spread = 2_000_000 if self.engine.now_us > 1_000_000 else \
            int(min(a.refresh_s, a.initial_spread_s or a.refresh_s) * 1_000_000)
        self.engine.after(int(rng.random() * spread), self._advertise, (node, net.epoch[node]))
        self.engine.after(int(self.scenario.network.discovery_s * 1_000_000), self._discover,
                          (node, net.epoch[node]))
        adv = self.nodes[node].adversary
        if adv is not None:
            adv.on_up(node)
        if self.jobs.enabled:
            self.jobs.on_node_up(node)

    def node_down(self, node: int, *, crash: bool, lose_state: bool) -> None:
        self.engine.trace("down", node, int(crash), int(lose_state))
        self.net.node_down(node, crash=crash)
        self.jobs.on_node_down(node, lose_state=lose_state)
        self.checker.on_down(node, lose_state=lose_state)
        sn = self.nodes[node]
        if lose_state:
            sn.seq = 0
            self.checker.on_state_lost(node)
            if sn.book is not None:
                sn.book = self._new_book()

    def _connect_some(self, node: int, rng: Any) -> None:
        net = self.net
        want = self.scenario.network.peers_target - len(net.peers[node])
        for _ in range(want * 3):
            if want <= 0:
                break
            p = net.random_live(rng)
            if p is not None and net.connect(node, p):
                want -= 1

    def _discover(self, arg: tuple[int, int]) -> None:
        node, epoch = arg
        if not self.net.up[node] or self.net.epoch[node] != epoch:
            return
        cfg = self.scenario.network
        rng = self.gossip.rng(node)
        peers = self.net.peers[node]
        if len(peers) < cfg.peers_target:
            self._connect_some(node, rng)
        else:
            p = self.net.random_live(rng)
            if p is not None:
                self.net.connect(node, p)
            high = cfg.peers_high or cfg.peers_target + 8
            if len(peers) > high:
                mesh = self.gossip.mesh[node]
                spare = [q for q in peers if q not in mesh]
                rng.shuffle(spare)
                for q in spare[: len(peers) - high]:
                    self.net.disconnect(node, q)
        self.engine.after(int(self.scenario.network.discovery_s * 1_000_000), self._discover, arg)

    # -- adverts ---------------------------------------------------------------------------
    def make_advert(self, node: int, *, gpus_free: int | None = None, ttl_ms: int | None = None,
                    gpus: tuple[GpuInfo, ...] | None = None) -> Advert:
        sn = self.nodes[node]
        assert sn.identity is not None
        now_ms = self.node_now_ms(node)
        sn.seq = next_seq(sn.seq, max(now_ms, 1))
        g = gpus if gpus is not None else sn.gpus
        h = self.jobs.hosts[node]
        fn = h.formation if h is not None else None
        free = min(len(g), (fn.gpus_free if fn is not None else len(g)) if gpus_free is None else gpus_free)
        ttl = ttl_ms or int(self.scenario.adverts.ttl_s * 1000)
        return Advert(
            peer_id=sn.identity.peer_id, network=self.scenario.run.network_name, addrs=(), seq=sn.seq,
            issued_at_ms=now_ms, expires_at_ms=now_ms + ttl, gpus=g, gpus_free=max(0, free),
            price_per_gpu_hour=sn.price, currency="SOL", payout_address=sn.payout_address,
            region=sn.region, runtimes=("process",), simulated=True,
        )

    def publish_advert(self, node: int, advert: Advert | None = None) -> Msg:
        sn = self.nodes[node]
        if sn.identity is None:
            return self.gossip.publish(node, ADVERTS, modelled_advert_bytes, None, None)
        adv = advert or self.make_advert(node)
        sa = sign_advert(sn.identity, adv)
        sn.advert = adv
        if sn.book is not None:
            sn.book.add_own(sa)
        self.jobs.on_own_advert(node, adv)
        wire = sa.wire
        return self.gossip.publish(node, ADVERTS, len(wire), wire, adv)

    def _advertise(self, arg: tuple[int, int]) -> None:
        node, epoch = arg
        if not self.net.up[node] or self.net.epoch[node] != epoch:
            return
        adv = self.nodes[node].adversary
        if self.engine.now_us < self.quiet_us and self.scenario.adverts.publish:
            if adv is None or not adv.replaces_adverts:
                msg = self.publish_advert(node)
                if adv is None:
                    self.metrics.track(msg)
            else:
                adv.advertise(node)
        self.engine.after(int(self.scenario.adverts.refresh_s * 1_000_000), self._advertise, arg)

    # -- gossip validation and delivery (the advert core runs here) ----------------------------
    def _validate(self, node: int, src: int, msg: Msg) -> GossipVerdict:
        """The node's advert validator, with the node's mapping from a
        rejection reason to a verdict (``verdict_for``)."""
        if msg.topic == JOBS:
            return ACCEPT
        wire = msg.data
        if wire is None:
            return msg.valid or ACCEPT
        sn = self.nodes[node]
        now_ms = self.node_now_ms(node)
        if sn.book is not None:
            try:
                sa = sn.book.ingest(wire, now_ms, forwarder=str(src))
            except PeerMisbehaved as exc:
                self.engine.trace("rej", node, msg.mid, int(exc.reason))
                self.metrics.rejections[exc.reason.name] = self.metrics.rejections.get(exc.reason.name, 0) + 1
                return verdict_for(exc.reason)
            self.engine.trace("book", node, msg.mid, sa.advert.seq)
            self.checker.on_book_store(node, sa)
            return ACCEPT
        # No book: the first real verification of these bytes decides for all
        # (signature and schema are pure functions of the bytes); the time
        # check is this node's own, at its own skewed clock.
        cached = self._verdicts.get(wire)
        if cached is None:
            try:
                adv = verify_advert_bytes(wire, verify=self.verify).advert
                cached = (adv.issued_at_ms, adv.expires_at_ms)
            except PeerMisbehaved as exc:
                cached = exc.reason
            self._verdicts[wire] = cached
        if isinstance(cached, Reason):
            return verdict_for(cached)
        late = advert_time_reason(cached[0], cached[1], now_ms)
        return ACCEPT if late is None else verdict_for(late)

    def _judge(self, node: int, src: int, msg: Msg) -> Any:
        """The validator, watched: a rejection lowers the forwarder's score, and
        the ``penalised-honest`` invariant holds that to faults an honest node
        would never forward."""
        verdict = self._validate(node, src, msg)
        if verdict == REJECT and src != node:
            self.checker.on_rejected(node, src, f"a {msg.topic} message (mid {msg.mid})")
        return verdict

    def _deliver(self, node: int, src: int, msg: Msg) -> None:
        msg.delivered += 1
        if node != msg.origin:
            self.engine.trace("dlv", msg.mid, node)
            self.metrics.on_delivery(node, msg)
        if msg.topic == JOBS:
            self.jobs.on_topic(node, msg)

    # -- DHT measurements ----------------------------------------------------------------
    def _dht_tick(self, _: Any) -> None:
        kad = self.kad
        assert kad is not None
        rng = self._dht_rng
        if self.engine.now_us < self.quiet_us:
            origin = self.net.random_live(rng)
            target = self.net.random_live(rng)
            if origin is not None and target is not None and origin != target:
                kad.lookup(origin, kad.ids[target], self._dht_done)
        rate = self.scenario.kademlia.lookups_per_s
        self.engine.after(int(rng.expovariate(rate) * 1_000_000) + 1, self._dht_tick, None)

    def _dht_done(self, lk: Lookup) -> None:
        self.engine.trace("kad", lk.origin, lk.hops, int(lk.found), lk.rpcs)

    # -- running ---------------------------------------------------------------------------
    def run(self) -> None:
        s = self.scenario
        eng = self.engine
        start_rng = eng.stream("start")
        for i in range(self.n):
            # Joins spread over the first second, as a network that is already running.
            eng.at(int(start_rng.random() * 1_000_000), self._join, i)
        prng = eng.stream("partition")
        for p in s.partition:
            eng.at(int(p.at_s * 1_000_000), self._partition, p)
            eng.at(int(p.heal_s * 1_000_000), self._heal, p)
        if self.kad is not None and s.kademlia.lookups_per_s > 0:
            self._dht_rng = eng.stream("dht")
            eng.at(2_000_000, self._dht_tick, None)
        self._prng = prng
        self.jobs.start()
        eng.at(1_000_000, self._sample, None)
        wall0 = time.perf_counter()
        # The run allocates a few tuples per event and frees them soon; the
        # cyclic collector would rescan every node's state and every pending
        # event each time the long-lived set grows (30% of a 10,000-node run).
        # The world built so far is frozen out of its scans and young objects
        # are collected every 100,000 allocations instead of 700.
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(gc_young_threshold, 50, 100)
        try:
            eng.run_until(self.end_us, progress=self._progress if self.progress else None,
                          progress_every_us=int(s.run.progress_every_s * 1_000_000))
            self.checker.at_end()
        except SimulationStopped as exc:
            self.stopped = str(exc)
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        self.wall_s = time.perf_counter() - wall0

    def _join(self, node: int) -> None:
        self.node_up(node)
        self.churn.schedule_departure(node)

    def _partition(self, p: Any) -> None:
        self.engine.trace("partition", p.split)
        self.net.partition(partition_sides(p, self, self._prng))

    def _heal(self, p: Any) -> None:
        self.engine.trace("heal", p.split)
        self.net.heal()

    def _sample(self, _: Any) -> None:
        self.metrics.sample()
        self.checker.periodic()
        self.engine.after(1_000_000, self._sample, None)

    def _progress(self, now_us: int) -> None:
        assert self.progress is not None
        self.progress(f"t={now_us / 1e6:.0f}s/{self.end_us / 1e6:.0f}s events={self.engine.events_run} "
                      f"live={self.net.live} violations={len(self.checker.violations)}")
