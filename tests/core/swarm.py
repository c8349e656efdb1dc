"""An in-memory network that carries the core host's actions between peers.

Not a driver for real use (that is ``p2pgpu.node`` and ``p2pgpu.sim``): a
test harness in the TigerBeetle manner, and, like them, only a carrier: every
peer is one :class:`~p2pgpu.core.Host` (the same object the node and the
simulator drive), handed bytes and timer firings, whose actions are carried
out here.  One seed drives everything: the peers' keys, GPUs and models, the
jobs and when they are submitted, each message's delay, which messages are
dropped while faults last, and which peers crash (crash-stop) and when.
Publish goes to the peers subscribed to the topic when it is sent; Send to
one peer; timers are typed and replaceable, as the actions module says.

After every step, :meth:`Swarm.check_step` checks the safety invariants on
what that step changed: no peer holds more GPUs than it has; at most one
certificate per job is confirmed; a peer starts a job only as a member of
the confirmed certificate; every member of a confirmed certificate signed an
accept of exactly that proposal.  :meth:`Swarm.unformed` lists the jobs that
had enough live matching peers but formed no cluster (the liveness check).
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from random import Random
from typing import Any

from p2pgpu.core import Identity, PeerMisbehaved, verify_signature
from p2pgpu.core._actions import (
    Action,
    CancelTimer,
    Confirmed,
    Emit,
    Failed,
    ItemTaken,
    LookupCollection,
    MemberLost,
    Publish,
    Refused,
    Released,
    Reserved,
    Send,
    SetTimer,
    Settled,
    StartJob,
    StopJob,
    Subscribe,
    TimerKey,
    Unsubscribe,
)
from p2pgpu.core._advert import Advert, GpuInfo
from p2pgpu.core._formation import FormationConfig, FormationNode
from p2pgpu.core._formation_messages import Certificate
from p2pgpu.core._formation_submitter import Submitter
from p2pgpu.core._host import Host, HostConfig, Via
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest
from p2pgpu.core._matching import exclusion, matching
from p2pgpu.core._member import PartEnded

MODELS = ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090")
PAYER = "11111111111111111111111111111111"


class InvariantViolated(AssertionError):
    pass


class MemoVerifier:
    """The real signature check, once per distinct (key, message, signature):
    every receiver decodes the bytes it gets, as a node does."""

    def __init__(self) -> None:
        self.seen: dict[tuple[bytes, bytes, bytes], PeerMisbehaved | None] = {}

    def __call__(self, key: bytes, message: bytes, signature: bytes) -> None:
        k = (key, message, signature)
        if k not in self.seen:
            try:
                verify_signature(key, message, signature)
                self.seen[k] = None
            except PeerMisbehaved as exc:
                self.seen[k] = exc
        err = self.seen[k]
        if err is not None:
            raise PeerMisbehaved(err.reason, err.detail)


def make_advert(identity: Identity, *, gpus: int, model: str, price: int = 1000, now_ms: int = 0) -> Advert:
    return Advert(
        peer_id=identity.peer_id, network="local", addrs=(), seq=1, issued_at_ms=now_ms,
        expires_at_ms=now_ms + 3_600_000,
        gpus=tuple(GpuInfo(model=model, memory_mb=81920, compute_capability="8.0") for _ in range(gpus)),
        gpus_free=gpus, price_per_gpu_hour=price, currency="SOL", payout_address=PAYER, region="local",
        runtimes=("process",), simulated=True,
    )


def make_manifest(submitter: Identity, rng: Random, *, now_ms: int, nodes: int = 1, replicas: int = 1,
                  gpus_per_node: int = 1, models: tuple[str, ...] = (), ttl_ms: int = 600_000,
                  duration_s_max: int = 3_600, on_member_loss: str = "fail") -> SignedManifest:
    m = Manifest(name="swarm", submitter=submitter.peer_id, created_at_ms=now_ms, expires_at_ms=now_ms + ttl_ms,
                 nonce=rng.randbytes(16), nodes=nodes, replicas=replicas, quorum=1, gpus_per_node=gpus_per_node,
                 models=models, command=("true",), price_per_gpu_hour_max=10_000, payer=PAYER,
                 duration_s_max=duration_s_max, on_member_loss=on_member_loss)
    return sign_manifest(submitter, m)


@dataclass
class Peer:
    identity: Identity
    host: Host
    crashed: bool = False
    topics: dict[str, bool] = field(default_factory=dict)
    timers: dict[TimerKey, int] = field(default_factory=dict)

    @property
    def node(self) -> FormationNode | None:
        """This peer's worker formation core (``None`` for a submitter)."""
        return self.host.formation

    @property
    def submitter(self) -> Submitter:
        return self.host.submitter


class Swarm:
    """Peers, a clock and an event queue.  Build, ``submit`` jobs, ``run``."""

    def __init__(self, seed: int, *, workers: int = 50, submitters: int = 2,
                 config: FormationConfig | None = None, gpus: tuple[int, ...] = (1, 1, 2),
                 models: tuple[str, ...] = MODELS, delay_ms: tuple[int, int] = (1, 20), drop_rate: float = 0.0,
                 faults_until_ms: int = 0, candidates: bool = False, run_ms: tuple[int, int] | None = None,
                 host_config: HostConfig | None = None) -> None:
        self.rng = Random(seed)
        #: With ``run_ms``, members run each job they start for a random span
        #: in that range (their heartbeats, proofs and co-signatures go through
        #: the hosts and settle the job); without, jobs only form.
        self.run_ms = run_ms
        self.settled: dict[str, Settled] = {}
        #: (job, item hash) of every member message a submitter stored.
        self.stored_items: dict[tuple[str, bytes], bool] = {}
        #: (peer, job) -> when its part started, for the members running now.
        self.running: dict[tuple[str, str], int] = {}
        #: Hand the cores candidate lists (every worker whose advert matches,
        #: crashed or busy ones included: a stale advert book), as the node does.
        self.candidates = candidates
        self.seed = seed
        config = config or FormationConfig()
        self.config = config
        self.now_ms = 0
        self.delay_ms = delay_ms
        self.drop_rate = drop_rate
        self.faults_until_ms = faults_until_ms
        self.peers: dict[str, Peer] = {}
        self.workers: list[str] = []
        self.submitter_ids: list[str] = []
        self._queue: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.steps = 0
        self.misbehaved: dict[str, int] = {}
        self.metrics: dict[str, int] = {}
        self.manifests: dict[str, SignedManifest] = {}
        #: Jobs handed to their submitter's host (what its driver stored).
        self.handed: set[str] = set()
        #: Peers killed as they confirm a job, before its CONFIRM leaves.
        self.die_at_confirm: set[str] = set()
        self.confirmed: dict[str, Certificate] = {}
        #: Virtual time of each submission and confirmation (formation latency).
        self.submitted_at: dict[str, int] = {}
        self.confirmed_at: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.started: dict[str, list[str]] = {}
        self.lost: dict[str, list[str]] = {}
        self.trace: list[tuple[int, str, str]] = []
        #: Every worker's advert: the advert book every peer consults (the
        #: cores also learn adverts from the offers that carry them).
        self.book: dict[str, Advert] = {}
        self.verify = MemoVerifier()
        host_config = host_config or HostConfig(formation=config)
        for i in range(workers):
            ident = Identity.from_rng(self.rng)
            advert = make_advert(ident, gpus=self.rng.choice(gpus), model=models[i % len(models)])
            self.book[ident.peer_id] = advert
            peer = Peer(ident, self._host(ident, host_config))
            peer.host.set_advert(advert, 0)
            peer.topics[config.jobs_topic] = True
            self.peers[ident.peer_id] = peer
            self.workers.append(ident.peer_id)
        for _ in range(submitters):
            ident = Identity.from_rng(self.rng)
            self.peers[ident.peer_id] = Peer(ident, self._host(ident, host_config))
            self.submitter_ids.append(ident.peer_id)

    def _host(self, ident: Identity, config: HostConfig) -> Host:
        return Host(ident, config, adverts=self.book.get, verify=self.verify,
                    candidates=lambda sm, _now: self.candidate_list(sm.job_id))

# -- scheduling ---------------------------------------------------------------

    def _push(self, at_ms: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at_ms, self._seq, kind, payload))

    def submit_at(self, at_ms: int, submitter: str, **manifest: Any) -> str:
        sm = make_manifest(self.peers[submitter].identity, self.rng, now_ms=at_ms, **manifest)
        self.manifests[sm.job_id] = sm
        self.submitted_at[sm.job_id] = at_ms
        self._push(at_ms, "submit", (submitter, sm))
        return sm.job_id

    def crash_at(self, at_ms: int, peer_id: str) -> None:
        self._push(at_ms, "crash", peer_id)

    def restart_at(self, at_ms: int, peer_id: str, *, resume: bool = True) -> None:
        """The crashed peer starts again: a fresh host with the same identity
        (nothing in memory survives), and, as the node's driver does from its
        store, the jobs it submitted and never saw confirmed or failed handed
        back to it (``Host.resume_submitted``; ``resume=False``: not)."""
        self._push(at_ms, "restart", (peer_id, resume))

    def _restart(self, peer_id: str, resume: bool) -> None:
        old = self.peers[peer_id]
        peer = Peer(old.identity, self._host(old.identity, old.host.config))
        peer.topics[self.config.jobs_topic] = True
        self.peers[peer_id] = peer
        advert = self.book.get(peer_id)
        if advert is not None and peer_id in self.workers:
            peer.host.set_advert(advert, self.now_ms)
        if resume:
            for job_id, cert in list(self.confirmed.items()):
                sm = self.manifests[job_id]
                if sm.manifest.submitter == peer_id and job_id not in self.settled:
                    # Its collection, stored at confirmation (the node's ``collections`` row).
                    self._carry(peer_id, peer.host.settlement_restore(
                        sm, cert, confirmed_at_ms=self.confirmed_at[job_id],
                        deadline_ms=self.now_ms + sm.manifest.duration_s_max * 1000 + 30_000,
                        payout_addresses={}, items=[], now_ms=self.now_ms))
            for job_id, sm in list(self.manifests.items()):
                if sm.manifest.submitter == peer_id and job_id in self.handed and job_id not in self.confirmed \
                        and job_id not in self.failed:
                    self._carry(peer_id, peer.host.resume_submitted(sm, self.submitted_at[job_id], self.now_ms))

    def _transmit(self, sender: str, to: str, data: bytes, via: Via) -> None:
        if self.now_ms < self.faults_until_ms and self.rng.random() < self.drop_rate:
            return
        self._push(self.now_ms + self.rng.randint(*self.delay_ms), "msg", (to, data, via))

    # -- carrying out actions -----------------------------------------------------

    def _carry(self, peer_id: str, actions: list[Action]) -> None:
        peer = self.peers[peer_id]
        if peer_id in self.die_at_confirm and any(isinstance(a, Confirmed) for a in actions):
            # Killed the moment it stored its decision: the CONFIRM never leaves.
            self.die_at_confirm.discard(peer_id)
            peer.crashed = True
            actions = [a for a in actions if not isinstance(a, (Send, Publish))]
        for a in actions:
            if isinstance(a, Send):
                self._transmit(peer_id, a.peer_id, a.data, Via.DIRECT)
            elif isinstance(a, Publish):
                for other_id in self.peers:
                    if other_id != peer_id and self.peers[other_id].topics.get(a.topic):
                        self._transmit(peer_id, other_id, a.data, Via.TOPIC)
            elif isinstance(a, Subscribe):
                peer.topics[a.topic] = True
            elif isinstance(a, Unsubscribe):
                peer.topics.pop(a.topic, None)
            elif isinstance(a, SetTimer):
                gen = peer.timers.get(a.key, 0) + 1
                peer.timers[a.key] = gen
                self._push(max(a.at_ms, self.now_ms), "timer", (peer_id, a.key, gen))
            elif isinstance(a, CancelTimer):
                peer.timers[a.key] = peer.timers.get(a.key, 0) + 1
            elif isinstance(a, Emit):
                self.metrics[a.metric] = self.metrics.get(a.metric, 0) + a.value
            elif isinstance(a, ItemTaken):
                self.stored_items[(a.job_id, a.item_hash)] = True
            elif isinstance(a, LookupCollection):  # a late resend: answered from what was "stored"
                cert = self.confirmed.get(a.job_id)
                self._carry(peer_id, peer.host.on_stored(
                    a.job_id, a.sender, a.item_hash, members=list(cert.members) if cert else None,
                    stored=(a.job_id, a.item_hash) in self.stored_items, now_ms=self.now_ms))
            elif isinstance(a, Refused):
                self.misbehaved[a.reason.name] = self.misbehaved.get(a.reason.name, 0) + 1
            elif isinstance(a, Confirmed):
                self._on_confirmed(a)
            elif isinstance(a, StartJob):
                self._on_started(peer_id, a)
                if self.run_ms is not None:
                    self._push(self.now_ms, "run", (peer_id, a.job_id))
            elif isinstance(a, Settled):
                if a.job_id in self.settled:
                    raise InvariantViolated(f"seed {self.seed}: job {a.job_id[:12]} settled twice")
                self.settled[a.job_id] = a
            elif isinstance(a, Failed):
                self.failed[a.job_id] = a.reason
            elif isinstance(a, MemberLost):
                self.lost.setdefault(a.job_id, []).append(a.peer_id)
            elif isinstance(a, (Reserved, Released, StopJob)):
                self.trace.append((self.now_ms, peer_id, repr(a)))
                if isinstance(a, StopJob) and (peer_id, a.job_id) in self.running:
                    self._push(self.now_ms, "end", (peer_id, a.job_id, True))
            else:
                self.trace.append((self.now_ms, peer_id, type(a).__name__))

    def _on_confirmed(self, a: Confirmed) -> None:
        if a.job_id in self.confirmed:
            raise InvariantViolated(f"seed {self.seed}: job {a.job_id[:12]} confirmed twice")
        cert = Certificate.from_obj(a.certificate.to_obj())  # re-verify every signature from the bytes
        digest = cert.proposal.digest
        for member, accept in zip(cert.members, cert.accepts):
            if accept.peer_id != member or accept.proposal != digest or \
                    accept.envelope.signer_peer_id != member:
                raise InvariantViolated(f"seed {self.seed}: {member[:12]} did not accept this membership")
        self.confirmed[a.job_id] = cert
        self.confirmed_at[a.job_id] = self.now_ms

    def _on_started(self, peer_id: str, a: StartJob) -> None:
        cert = self.confirmed.get(a.job_id)
        if cert is None or cert.digest != a.certificate.digest:
            raise InvariantViolated(f"seed {self.seed}: {peer_id[:12]} started an unconfirmed cluster")
        if peer_id not in cert.members or cert.members[a.member_index] != peer_id:
            raise InvariantViolated(f"seed {self.seed}: {peer_id[:12]} started but is not a member")
        started = self.started.setdefault(a.job_id, [])
        if peer_id in started:
            raise InvariantViolated(f"seed {self.seed}: {peer_id[:12]} started a job twice")
        started.append(peer_id)

    def check_step(self, peer_id: str) -> None:
        node = self.peers[peer_id].node
        if node is not None:
            ledger = node.ledger
            if ledger.reserved > ledger.gpus_total or any(h.gpus <= 0 for h in ledger.holds.values()):
                raise InvariantViolated(f"seed {self.seed}: {peer_id[:12]} holds {ledger.reserved} GPUs "
                                        f"of {ledger.gpus_total}")

    # -- running ------------------------------------------------------------------

    def step(self) -> bool:
        if not self._queue:
            return False
        at_ms, _, kind, payload = heapq.heappop(self._queue)
        self.now_ms = max(self.now_ms, at_ms)
        self.steps += 1
        if kind == "crash":
            self.peers[payload].crashed = True
            return True
        if kind == "restart":
            self._restart(*payload)
            return True
        peer_id = payload[0]
        peer = self.peers[peer_id]
        if peer.crashed:
            return True
        if kind == "submit":
            self.handed.add(payload[1].job_id)
            actions = peer.host.submit(payload[1], self.now_ms)
        elif kind == "run":
            job_id = payload[1]
            self.running[(peer_id, job_id)] = self.now_ms
            self._push(self.now_ms + self.rng.randint(*(self.run_ms or (1, 1))), "end", (peer_id, job_id, False))
            actions = peer.host.member_started(job_id, self.now_ms)
        elif kind == "end":
            _, job_id, stopped = payload
            started = self.running.pop((peer_id, job_id), None)
            if started is None:
                return True  # already ended (stopped first)
            part = PartEnded(started_at_ms=started, ended_at_ms=self.now_ms, exit_code=0, end_reason="exited",
                             stopped=stopped, output_digest=hashlib.sha256(job_id.encode()).digest(),
                             gpus=("g",) * self.manifests[job_id].manifest.gpus_per_node)
            actions = peer.host.member_ended(job_id, part, self.now_ms)
        elif kind == "timer":
            _, key, gen = payload
            if peer.timers.get(key) != gen:
                return True
            actions = peer.host.on_timer(key, self.now_ms)
        else:
            actions = peer.host.on_bytes(payload[1], self.now_ms, via=payload[2])
        self._carry(peer_id, actions)
        self.check_step(peer_id)
        return True

    def run(self, until_ms: int) -> None:
        while self._queue and self._queue[0][0] <= until_ms:
            self.step()
        self.now_ms = max(self.now_ms, until_ms)

    # -- liveness -----------------------------------------------------------------

    def candidate_list(self, job_id: str) -> list[str] | None:
        """What an advert book would say can serve the job (GPU free counts as
        first advertised, so stale once jobs run), or ``None`` when off."""
        if not self.candidates:
            return None
        req = self.manifests[job_id].manifest.requirements
        return [a.peer_id for a in matching((self.book[p] for p in self.workers), req)]

    def live_matching(self, job_id: str) -> list[str]:
        req = self.manifests[job_id].manifest.requirements
        out = []
        for p in self.workers:
            node = self.peers[p].node
            assert node is not None
            if not self.peers[p].crashed and exclusion(node._all_free, req) is None:
                out.append(p)
        return out

    def unformed(self) -> list[str]:
        """Jobs with enough live matching peers that have no confirmed cluster."""
        return [j for j in self.manifests if j not in self.confirmed
                and len(self.live_matching(j)) >= self.manifests[j].manifest.members]


def _latency_figures(seeds: int = 100) -> None:
    """Formation latency (submit to confirmed) in virtual ms, over ``seeds`` swarms
    of 50 peers and 4 jobs each, with and without candidate lists:
    ``python3 tests/core/swarm.py [SEEDS]``."""
    import itertools

    settings = itertools.product((False, True), ((1, 5), (1, 30)), ((0.0, 0), (0.1, 4)))
    for candidates, delay, (drop, crashes) in settings:
        lat: list[int] = []
        for seed in range(seeds):
            s = Swarm(seed, delay_ms=delay, drop_rate=drop, faults_until_ms=2_000, candidates=candidates)
            wanted: list[tuple[str, ...]] = [(m.split()[-1],) for m in MODELS] + [()]
            jobs = [s.submit_at(s.rng.randint(0, 500), s.submitter_ids[i % 2], nodes=s.rng.choice([1, 2]),
                                replicas=s.rng.choice([1, 2]), models=w) for i, w in enumerate(wanted)]
            for p in s.rng.sample(s.workers, crashes):
                s.crash_at(s.rng.randint(0, 2_000), p)
            s.run(40_000)
            lat += [s.confirmed_at[j] - s.submitted_at[j] for j in jobs if j in s.confirmed_at]
        lat.sort()
        print(f"{'candidates' if candidates else 'everyone offers'}, delay {delay[0]}-{delay[1]} ms, "
              f"drop {drop:.0%} and {crashes} crashes for 2 s: {len(lat)} jobs formed, "
              f"p50 {lat[len(lat) // 2]} ms, p99 {lat[int(len(lat) * 0.99)]} ms, max {lat[-1]} ms")


if __name__ == "__main__":
    import sys

    _latency_figures(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
