"""The node's driver and the simulator's drive the core host alike (#13).

A small simulated network runs jobs (formation, membership, settlement,
deliveries); for a few of its nodes every call the simulator's driver made
into the node's :class:`~p2pgpu.core.Host` is recorded, with what the host
answered and what it asked of its environment (advert lookups, candidate
lists, who submitted a job).  The same sequence of messages, timer firings
and local events is then fed to the node's driver (``JobsService`` over a
real SQLite store; no network: what it sends is captured) through its own
entry points (the GossipSub validator, the direct-stream frame handler, its
timer loop, its advert, submit and runner calls), with the environment's
answers played back.  Both drivers must make the same host calls, with the
same arguments, and get the same actions back.  A driver that decided
anything itself (filtered a message, handed the host another time or path,
settled or routed on its own) would make this differ.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from random import Random
from types import SimpleNamespace
from typing import Any

import pytest

from p2pgpu.core import PeerMisbehaved
from p2pgpu.core._host import Host, Via
from p2pgpu.node._jobs import JobsService
from p2pgpu.sim import scenario_from_obj
from p2pgpu.sim._crypto import verify_cache
from p2pgpu.sim._jobs import JobFlow
from p2pgpu.sim._world import World
from p2pgpu.store import open_db

SCENARIO = {"run": {"nodes": 10, "duration_s": 45, "settle_s": 10},
            "network": {"latency": "uniform", "link_ms": 5},
            "adverts": {"refresh_s": 20, "ttl_s": 60, "initial_spread_s": 1},
            "jobs": {"submitters": 2, "rate_per_s": 0.5, "duration_s": 4, "nodes_choices": [1, 2, 3]}}
#: Host calls a driver makes on its own; the rest are consequences of actions
#: (a store lookup) the replay reproduces by itself.
EVENTS = ("set_advert", "submit", "on_bytes", "on_timer", "member_started", "member_ended", "on_balance")


@dataclasses.dataclass
class Recording:
    #: (method, args, kwargs, actions returned) of every host call, in order.
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any], list[Any]]] = dataclasses.field(default_factory=list)
    #: What the host asked its environment, in order: (what, key, answer).
    asked: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)


def record_host(host: Host, rec: Recording) -> None:
    """Wrap one host's methods and environment to record every call (the
    simulator's side of the comparison)."""
    for name in (*EVENTS, "on_stored"):
        real = getattr(host, name)

        def wrapped(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            entry: tuple[str, tuple[Any, ...], dict[str, Any], list[Any]] = (_name, args, kwargs, [])
            rec.calls.append(entry)
            out = _real(*args, **kwargs)
            entry[3].extend(out)
            return out

        setattr(host, name, wrapped)
    for what in ("adverts", "candidates", "submitter_of"):
        real_env = getattr(host, what)

        def asked(*args: Any, _real: Any = real_env, _what: str = what) -> Any:
            answer = _real(*args)
            rec.asked.append((_what, args[0] if _what != "candidates" else args[0].job_id, answer))
            return answer

        setattr(host, what, asked)
        if what == "adverts":  # the cores hold the lookup they were built with
            host.submitter.lookup = asked


def run_simulation(nodes: list[int]) -> tuple[World, dict[int, Recording]]:
    recordings = {n: Recording() for n in nodes}
    real_host = JobFlow.host

    def host(self: JobFlow, node: int) -> Host:
        fresh = self.hosts[node] is None
        h = real_host(self, node)
        if fresh and node in recordings:
            record_host(h, recordings[node])
        return h

    JobFlow.host = host  # type: ignore[method-assign]
    try:
        with verify_cache() as cache:
            world = World(scenario_from_obj(SCENARIO), 4, tracing=False, verify=cache)
            world.run()
    finally:
        JobFlow.host = real_host  # type: ignore[method-assign]
    assert world.checker.violations == []
    return world, recordings


class Playback:
    """The environment's answers, played back in the order they were asked."""

    def __init__(self, asked: list[tuple[str, Any, Any]]) -> None:
        self.asked = list(asked)
        self.pos = 0

    def answer(self, what: str, key: Any) -> Any:
        assert self.pos < len(self.asked), f"the node's host asked more than the simulator's: {what} {key}"
        got = self.asked[self.pos]
        assert got[:2] == (what, key), f"asked {what} {key}, the simulator's host asked {got[:2]}"
        self.pos += 1
        return got[2]


def node_driver(world: World, node: int, rec: Recording,
                db_path: Path) -> tuple[JobsService, Recording, Any, Playback]:
    """The node's driver for the simulator's node ``node``: a ``JobsService``
    over a real store, its host recorded, its environment played back."""
    sn = world.nodes[node]
    clock = SimpleNamespace(now=0)
    # The book's view: the claim verdicts the simulator hands this node's host (#16.1).
    book = SimpleNamespace(adverts={}, network="sim", view=world.jobs.challenges.claims_of(node))
    ports = SimpleNamespace(identity=sn.identity, counts=Counter(), now_ms=lambda: clock.now,
                            payout_address=sn.payout_address, book=book,
                            payouts_due=lambda: None, capacity_changed=lambda: None, gpus_reserved=0,
                            inventory=SimpleNamespace(gpus=list(sn.gpus), simulated=True), stack=None, blobs=None)
    jobs = JobsService(ports, rng=Random(0), config=world.jobs.hconfig)  # type: ignore[arg-type]
    jobs.db = open_db(db_path)
    replay = Recording()
    playback = Playback(rec.asked)
    record_host(jobs.host, replay)
    # The environment answers as it did in the simulation.
    jobs.host.adverts = lambda peer: playback.answer("adverts", peer)
    jobs.host.submitter.lookup = jobs.host.adverts
    jobs.host.candidates = lambda sm, now: playback.answer("candidates", sm.job_id)
    jobs.host.submitter_of = lambda job: playback.answer("submitter_of", job)
    return jobs, replay, clock, playback


def replay_through_the_node(jobs: JobsService, clock: Any, rec: Recording) -> None:
    """Feed the simulator's events to the node's driver through its entry points."""
    me = jobs.node.identity.peer_id
    for name, args, kwargs, _ in rec.calls:
        if name not in EVENTS:
            continue  # a consequence of an earlier action: the node's driver makes it itself
        if name == "on_bytes":
            data, now = args
            clock.now = now
            if kwargs["via"] is Via.TOPIC:  # GossipSub's validator, as for a message from another peer
                jobs._validate(SimpleNamespace(), SimpleNamespace(data=data, from_id=b"someone else"))  # type: ignore[arg-type]
            else:
                try:
                    jobs._on_frame(data)
                except PeerMisbehaved:
                    pass  # the stream would be reset
        elif name == "on_timer":
            key, now = args
            clock.now = now
            jobs._fire(key, now)
        elif name == "set_advert":
            advert, now = args
            clock.now = now
            jobs.on_advert(advert)
        elif name == "submit":
            sm, now = args
            clock.now = now
            assert sm.manifest.submitter == me
            jobs.submit(sm)
        elif name in ("member_started", "member_ended"):  # what the runner reports
            clock.now = args[-1]
            jobs.apply(getattr(jobs.host, name)(*args, **kwargs))
        else:
            raise AssertionError(f"unexpected event {name}")


def test_the_node_and_the_simulator_drive_the_host_alike(tmp_path: Path) -> None:
    world, recordings = run_simulation(nodes=[])
    # The nodes worth comparing: both submitters, and two workers that ran jobs.
    ran = sorted({n for (_jid, n) in world.checker.ran})
    chosen = world.jobs.submitters + ran[:2]
    world, recordings = run_simulation(nodes=chosen)
    kinds: Counter[str] = Counter()
    for node in chosen:
        rec = recordings[node]
        assert rec.calls, f"node {node} never reached its host"
        jobs, replay, clock, playback = node_driver(world, node, rec, tmp_path / f"node{node}.db")
        replay_through_the_node(jobs, clock, rec)
        assert len(replay.calls) == len(rec.calls), f"node {node}: {len(replay.calls)} calls, sim {len(rec.calls)}"
        for i, (got, want) in enumerate(zip(replay.calls, rec.calls)):
            assert got[0] == want[0] and got[1] == want[1] and got[2] == want[2], f"node {node}, call {i}: {got[:3]}"
            assert got[3] == want[3], f"node {node}, call {i} ({want[0]}): other actions"
            kinds.update(type(a).__name__ for a in got[3])
        assert playback.pos == len(rec.asked)  # it asked its environment the same things
    # The comparison covered the whole lifecycle, not only formation.
    for kind in ("Publish", "Send", "StartJob", "Confirmed", "HandOver", "ItemTaken", "Settled", "MemberDone"):
        assert kinds[kind] > 0, f"no {kind} compared"


@pytest.mark.parametrize("via", [Via.TOPIC, Via.DIRECT])
def test_a_driver_that_decides_is_caught(tmp_path: Path, via: Via) -> None:
    """The comparison is not vacuous: a node driver that hands the host a
    message by another path than it came differs at once."""
    world, recordings = run_simulation(nodes=[])
    node = world.jobs.submitters[0]
    world, recordings = run_simulation(nodes=[node])
    rec = recordings[node]
    jobs, replay, clock, _ = node_driver(world, node, rec, tmp_path / "n.db")
    flipped = Recording(calls=[(n, a, {**k, "via": Via.DIRECT if k["via"] is Via.TOPIC else Via.TOPIC}, r)
                               if n == "on_bytes" and k.get("via") is via else (n, a, k, r)
                               for n, a, k, r in rec.calls], asked=rec.asked)
    with pytest.raises(AssertionError):
        replay_through_the_node(jobs, clock, flipped)
        assert [c[:3] for c in replay.calls] == [c[:3] for c in rec.calls]
