"""A GossipSub v1.1 model: meshes, heartbeats, IHAVE/IWANT gossip, scores.

py-libp2p's GossipSub is not sans-IO, so the simulator carries its own model
of the router, following the v1.1 spec's parameters (``D``, ``D_lo``,
``D_hi``, ``D_lazy``, heartbeat, message cache windows, flood publishing)
closely enough to reproduce propagation latency, duplicates and bytes per
node.  What is simplified, and why (each is listed in docs/simulation.md):

- one mesh serves every topic (all nodes subscribe to all of the few topics);
- a node's seen-cache is a flag per (message, node) in a ``bytearray`` per
  message, not a dict per node: 1 byte per node per live message, which is
  what lets 100,000 nodes fit in memory;
- scores only count invalid messages (P4); a peer below ``graylist_score`` is
  ignored and pruned; no backoff timers, no opportunistic grafting;
- the message cache answers IWANT while the message is younger than
  ``history_length`` heartbeats.

Validation is the application's: ``validate(node, src, msg)`` returns a
:class:`~p2pgpu.core.GossipVerdict` (this is where the real advert core runs, and
where a rejection reason becomes a verdict through the same
:func:`~p2pgpu.core.verdict_for` as the node's validators): ``REJECT`` drops
the message and costs the sender score, ``IGNORE`` only drops it.
``deliver(node, msg)`` is called once per node per message.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from p2pgpu.core import GossipVerdict

from ._engine import _TIE_BITS, _TIE_MASK, Engine
from ._network import Network
from ._scenario import GossipSection

#: The verdicts, as the core defines them: an ``Enum``, never equal to a
#: ``Reason`` (plain integers here once made ``Reason.OVERSIZED`` an accept).
ACCEPT, IGNORE, REJECT = GossipVerdict.ACCEPT, GossipVerdict.IGNORE, GossipVerdict.REJECT
_ID_BYTES = 40  # a libp2p message id (from + seqno) is about this long


class Msg:
    """One published message; ``seen[node]`` is that node's seen-cache flag."""

    __slots__ = ("data", "delivered", "info", "landing", "mid", "nbytes", "origin", "seen", "t0_us", "topic",
                 "valid")

    def __init__(self, mid: int, origin: int, topic: str, nbytes: int, data: Any, t0_us: int, n: int) -> None:
        self.mid = mid
        self.origin = origin
        self.topic = topic
        self.nbytes = nbytes
        self.data = data
        self.t0_us = t0_us
        self.seen = bytearray(n)
        self.valid: GossipVerdict | None = None  # validation verdict cached per message (see validate)
        self.delivered = 0
        self.info: Any = None
        #: node -> [key, src, epoch, [(key, src), ...]]: the first copy on its
        #: way to a node that has not seen the message (its engine key), and
        #: the later copies counted as its duplicates instead of scheduled
        #: (see GossipSub._forward)
        self.landing: dict[int, list[Any]] = {}


class GossipSub:
    #: True schedules every copy as an event, as a plain router model would:
    #: the reference that tests compare the shortcuts' traces with
    exact = False

    def __init__(self, engine: Engine, net: Network, cfg: GossipSection,
                 validate: Callable[[int, int, Msg], GossipVerdict], deliver: Callable[[int, int, Msg], None]) -> None:
        self.engine = engine
        self.net = net
        self.cfg = cfg
        self.validate = validate
        self.deliver = deliver
        n = net.n
        self.mesh: list[list[int]] = [[] for _ in range(n)]
        #: per node, the message ids of its last history_length heartbeats (a
        #: list of a few lists: a deque would cost 600 bytes a node)
        self.mcache: list[list[list[int]]] = [[[]] for _ in range(n)]
        self.score: list[dict[int, float] | None] = [None] * n
        self.msgs: dict[int, Msg] = {}
        self.dups = [0] * n
        self.next_mid = 1
        self.hb_us = int(cfg.heartbeat_ms * 1000)
        self._seen_ttl_us = int(cfg.seen_ttl_s * 1_000_000)
        self._mcache_us = cfg.history_length * self.hb_us
        self._proc_us = int(cfg.processing_ms * 1000)
        self._cores = [0] * cfg.shared_cores
        self._rngs: list[Any] = [None] * n
        self.iwant_served = 0
        self.ihave_sent = 0
        net.handlers["gs.msg"] = self._on_msg
        net.handlers["gs.graft"] = self._on_graft
        net.handlers["gs.prune"] = self._on_prune
        net.handlers["gs.ihave"] = self._on_ihave
        net.handlers["gs.iwant"] = self._on_iwant
        net.on_peer_lost.append(self._peer_lost)

    def rng(self, node: int) -> Any:
        r = self._rngs[node]
        if r is None:
            r = self._rngs[node] = self.engine.stream(f"gossip/{node}")
        return r

    # -- node lifecycle ---------------------------------------------------------
    def start(self, node: int) -> None:
        """A node (re)starts: empty router state, heartbeat at a random phase."""
        self.mesh[node] = []
        self.mcache[node] = [[]]
        self.score[node] = None
        for m in self.msgs.values():
            m.seen[node] = 0
        self.engine.after(int(self.rng(node).random() * self.hb_us), self._heartbeat, (node, self.net.epoch[node]))

    def _peer_lost(self, node: int, peer: int) -> None:
        mesh = self.mesh[node]
        if peer in mesh:
            mesh.remove(peer)

    # -- publishing ---------------------------------------------------------------
    def publish(self, node: int, topic: str, nbytes: int, data: Any, info: Any = None) -> Msg:
        msg = Msg(self.next_mid, node, topic, nbytes, data, self.engine.now_us, self.net.n)
        msg.info = info
        self.next_mid += 1
        self.msgs[msg.mid] = msg
        self.engine.after(self._seen_ttl_us, self._forget, msg.mid)
        msg.seen[node] = 1
        self.mcache[node][-1].append(msg.mid)
        self.deliver(node, node, msg)
        targets = self._good_peers(node) if self.cfg.flood_publish else self.mesh[node]
        self._forward(node, targets, -1, msg)
        return msg

    def _forward(self, node: int, targets: list[int], skip: int, msg: Msg) -> None:
        """Send ``msg`` to ``targets`` but ``skip`` and the origin.

        Nine copies in ten of a gossip message can only land as duplicates,
        and are known to at the sender: a copy to a peer that has already
        seen the message, or one that lands after another copy already on
        its way to the same incarnation of the peer (``Msg.landing``).  Such a
        copy is counted now (:meth:`Network.absorb`), not scheduled; that is
        why this model's cost is not D events per node per message.  Should
        the first copy be ignored when it lands (its sender was graylisted
        meanwhile), the counted copies behind it are scheduled after all
        (:meth:`_on_msg`).  Absorbing takes the same draws and tie-break
        numbers as scheduling, so the trace is that of :attr:`exact` mode,
        where every copy is an event (tests/sim/test_fastpaths.py).

        The loop is the simulator's hottest code: it inlines
        :meth:`Network.depart` and :meth:`_send_copy`, draw for draw."""
        if self.exact:
            send = self.net.send
            for p in targets:
                if p != skip and p != msg.origin:
                    send(node, p, msg.nbytes, "gs.msg", msg)
            return
        net = self.net
        engine = self.engine
        up = net.up
        side = net.side
        my_side = side[node] if side is not None else 0
        rnd = net._random
        loss = net._loss
        jit = net._jit
        reorder = net._reorder
        region = net.region
        delay_row = net._delay_us[region[node]]
        epoch = net.epoch
        dups = self.dups
        bytes_in = net.bytes_in
        dup = net._dup
        land = net.land
        absorb = net.absorb
        origin = msg.origin
        seen = msg.seen
        landing = msg.landing
        nbytes = msg.nbytes
        now = engine.now_us
        ser = int(nbytes * net._us_per_byte)
        ufree = net.uplink_free_us
        free = ufree[node]
        done = start = free if free > now else now  # noqa: FURB136 (hot path)
        left = cut = lost = sent = 0
        for p in targets:
            if p == skip or p == origin:
                continue
            if not up[p]:
                left += 1
                continue
            if side is not None and side[p] != my_side:
                cut += 1
                continue
            sent += 1
            if loss and rnd() < loss:
                lost += 1
                continue
            done += ser
            if seen[p]:
                # depart()'s draws (the landing time is not needed), then absorb()
                if jit:
                    rnd()
                if reorder and rnd() < reorder:
                    rnd()
                if dup:
                    dups[p] += 2 if absorb(done, node, p, nbytes)[1] else 1
                else:  # absorb() inlined: the tie-break number, the count
                    engine._seq += 1
                    bytes_in[p] += nbytes
                    dups[p] += 1
                continue
            base = delay_row[region[p]]
            t = done + base
            if jit:
                t += int(base * jit * (2.0 * rnd() - 1.0))
            if reorder and rnd() < reorder:
                t += int(rnd() * net._reorder_us)
            rec = landing.get(p)
            e = epoch[p]
            if rec is not None and rec[2] == e:
                key = (t << _TIE_BITS) | (((engine._seq + 1) * engine._mul + engine._salt) & _TIE_MASK)
                if rec[0] < key:
                    k1, k2 = absorb(t, node, p, nbytes)
                    rec[3].append((k1, node))
                    dups[p] += 1
                    if k2:
                        rec[3].append((k2, node))
                        dups[p] += 1
                    continue
                landing[p] = [key, node, e, rec[3]]
            else:
                landing[p] = [(t << _TIE_BITS) | (((engine._seq + 1) * engine._mul + engine._salt) & _TIE_MASK),
                              node, e, []]
            land(t, node, p, nbytes, "gs.msg", msg)
        if sent:
            net.bytes_out[node] += sent * nbytes
            if done != start:
                ufree[node] = done
        if left or cut or lost:
            dropped = net.dropped
            dropped["down"] += left
            dropped["partition"] += cut
            dropped["loss"] += lost

    def _send_copy(self, src: int, dst: int, msg: Msg) -> None:
        """One copy of ``msg`` to ``dst`` (see :meth:`_forward`)."""
        net = self.net
        if self.exact:
            net.send(src, dst, msg.nbytes, "gs.msg", msg)
            return
        nbytes = msg.nbytes
        t = net.depart(src, dst, nbytes)
        if t < 0:
            return
        if msg.seen[dst]:
            self.dups[dst] += 2 if net.absorb(t, src, dst, nbytes)[1] else 1
            return
        engine = self.engine
        key = (t << _TIE_BITS) | (((engine._seq + 1) * engine._mul + engine._salt) & _TIE_MASK)
        landing = msg.landing
        rec = landing.get(dst)
        e = net.epoch[dst]
        if rec is not None and rec[2] == e:
            if rec[0] < key:
                for k in net.absorb(t, src, dst, nbytes):
                    if k:
                        rec[3].append((k, src))
                        self.dups[dst] += 1
                return
            landing[dst] = [key, src, e, rec[3]]
        else:
            landing[dst] = [key, src, e, []]
        net.land(t, src, dst, nbytes, "gs.msg", msg)

    def _forget(self, mid: int) -> None:
        self.msgs.pop(mid, None)

    def _good_peers(self, node: int) -> list[int]:
        sc = self.score[node]
        peers = self.net.peers[node]
        if sc is None:
            return peers
        return [p for p in peers if sc.get(p, 0.0) >= 0.0]

    # -- receiving ------------------------------------------------------------------
    def _on_msg(self, dst: int, src: int, msg: Msg) -> None:
        seen = msg.seen
        if seen[dst]:
            self.dups[dst] += 1
            return
        rec = msg.landing.pop(dst, None) if msg.landing else None
        sc = self.score[dst]
        if sc is not None and sc.get(src, 0.0) < self.cfg.graylist_score:
            if rec is not None:  # the copies counted behind this one land after all
                unabsorb = self.net.unabsorb
                for key, s in rec[3]:
                    self.dups[dst] -= 1
                    unabsorb(key, s, dst, msg.nbytes, "gs.msg", msg)
            return  # graylisted: not even looked at
        seen[dst] = 1
        if self._proc_us:
            net = self.net
            now = self.engine.now_us
            cores = self._cores
            if cores:
                # all nodes share a few cores: take the one free first
                free = heapq.heappop(cores)
                ready = max(now, free) + self._proc_us
                heapq.heappush(cores, ready)
            else:
                # the node's own CPU is one queue: validation waits for what came before
                free = net.uplink_free_us[dst]
                ready = max(now, free) + self._proc_us
                net.uplink_free_us[dst] = ready
            self.engine.at(ready, self._process, (dst, src, msg, net.epoch[dst]))
            return
        self._accept(dst, src, msg)

    def _process(self, arg: tuple[int, int, Msg, int]) -> None:
        dst, src, msg, epoch = arg
        if self.net.up[dst] and self.net.epoch[dst] == epoch:
            self._accept(dst, src, msg)

    def _accept(self, dst: int, src: int, msg: Msg) -> None:
        verdict = self.validate(dst, src, msg)
        if verdict is not ACCEPT:
            if verdict is REJECT:
                self._penalise(dst, src)
            return
        self.deliver(dst, src, msg)
        self.mcache[dst][-1].append(msg.mid)
        self._forward(dst, self.mesh[dst], src, msg)

    def _penalise(self, node: int, peer: int) -> None:
        sc = self.score[node]
        if sc is None:
            sc = self.score[node] = {}
        s = sc.get(peer, 0.0) - self.cfg.invalid_message_penalty
        sc[peer] = s
        if s < 0.0:
            mesh = self.mesh[node]
            if peer in mesh:
                mesh.remove(peer)
                self.net.send(node, peer, self.cfg.control_bytes, "gs.prune", None)

    def _on_graft(self, dst: int, src: int, _: Any) -> None:
        mesh = self.mesh[dst]
        sc = self.score[dst]
        if src in mesh or src not in self.net.peers[dst]:
            return
        if sc is not None and sc.get(src, 0.0) < 0.0:
            self.net.send(dst, src, self.cfg.control_bytes, "gs.prune", None)
            return
        mesh.append(src)

    def _on_prune(self, dst: int, src: int, _: Any) -> None:
        mesh = self.mesh[dst]
        if src in mesh:
            mesh.remove(src)

    def _on_ihave(self, dst: int, src: int, mids: list[int]) -> None:
        msgs = self.msgs
        want = [mid for mid in mids if mid in msgs and not msgs[mid].seen[dst]]
        if want:
            self.net.send(dst, src, self.cfg.control_bytes + _ID_BYTES * len(want), "gs.iwant", want)

    def _on_iwant(self, dst: int, src: int, mids: list[int]) -> None:
        msgs = self.msgs
        horizon = self.engine.now_us - self._mcache_us
        for mid in mids:
            m = msgs.get(mid)
            if m is not None and m.seen[dst] and m.t0_us >= horizon:
                self.iwant_served += 1
                self._send_copy(dst, src, m)

    # -- heartbeat ------------------------------------------------------------------
    def _heartbeat(self, arg: tuple[int, int]) -> None:
        node, epoch = arg
        net = self.net
        if not net.up[node] or net.epoch[node] != epoch:
            return  # this incarnation is gone; start() scheduled a new heartbeat
        cfg = self.cfg
        rng = self.rng(node)
        mesh = self.mesh[node]
        send = net.send
        if len(mesh) < cfg.D_lo:
            cands = [p for p in self._good_peers(node) if p not in mesh]
            for p in _pick(rng.random, cands, cfg.D - len(mesh)):
                mesh.append(p)
                send(node, p, cfg.control_bytes, "gs.graft", None)
        elif len(mesh) > cfg.D_hi:
            _pick(rng.random, mesh, cfg.D)  # the D kept come first
            for p in mesh[cfg.D:]:
                send(node, p, cfg.control_bytes, "gs.prune", None)
            del mesh[cfg.D:]
        windows = self.mcache[node]
        ids: list[int] = []
        for w in windows[-cfg.history_gossip:]:
            ids.extend(w)
        if ids:
            if len(ids) > cfg.ihave_ids_max:
                ids = ids[-cfg.ihave_ids_max:]
            sc = self.score[node]
            cands = [p for p in net.peers[node] if p not in mesh and (sc is None or sc.get(p, 0.0) >= 0.0)]
            if cands:
                nbytes = cfg.control_bytes + _ID_BYTES * len(ids)
                msgs = self.msgs
                live = [m for m in map(msgs.get, ids) if m is not None]
                exact = self.exact
                account = net.account
                targets = _pick(rng.random, cands, cfg.D_lazy)
                self.ihave_sent += len(targets)
                for p in targets:
                    # An IHAVE of ids the peer has all seen (or forgotten) asks
                    # for nothing when it lands: counted, not scheduled.
                    for m in live:
                        if exact or not m.seen[p]:
                            send(node, p, nbytes, "gs.ihave", ids)
                            break
                    else:
                        account(node, p, nbytes)
        windows.append([])
        if len(windows) > cfg.history_length:
            del windows[0]
        engine = self.engine
        engine.at(engine.now_us + self.hb_us, self._heartbeat, arg)


def _pick(rnd: Callable[[], float], xs: list[int], k: int) -> list[int]:
    """``k`` of ``xs`` drawn without replacement (a partial Fisher-Yates over
    ``xs``, which it reorders): ``random.sample`` costs 5x as much per draw."""
    n = len(xs)
    if k >= n:
        return xs
    for i in range(k):
        j = i + int(rnd() * (n - i))
        xs[i], xs[j] = xs[j], xs[i]
    return xs[:k]
