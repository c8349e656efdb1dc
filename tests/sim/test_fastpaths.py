"""The simulator's shortcuts change its cost, never its trace.

Gossip copies that can only land as duplicates are counted at the sender
instead of scheduled (``GossipSub._forward``); ``GossipSub.exact`` turns that
off and schedules every copy.  Both take the same random draws and the same
tie-break numbers, so the same scenario and seed must give the same
``trace_hash`` either way, through loss, duplication, reordering, churn,
partitions and graylisted adversaries.  The calendar queue must run events
in exactly the order of a binary heap over the same keys.
"""

from __future__ import annotations

import heapq
import random

import pytest

from p2pgpu.sim import Engine, load_scenario, run_scenario, scenario_from_obj
from p2pgpu.sim._engine import _TIE_BITS, _TIE_MASK
from p2pgpu.sim._gossip import GossipSub


def _both(scenario: object, seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    fast = run_scenario(scenario, seed, plots=False).summary  # type: ignore[arg-type]
    with monkeypatch.context() as m:
        m.setattr(GossipSub, "exact", True)
        exact = run_scenario(scenario, seed, plots=False).summary  # type: ignore[arg-type]
    return fast, exact


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_shortcuts_keep_the_trace_of_the_faulty_network(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, exact = _both(load_scenario("simulations/ci-faulty.toml"), seed, monkeypatch)
    assert fast["trace_hash"] == exact["trace_hash"]
    assert fast["events"] < exact["events"]
    assert fast["messages_dropped"]["loss"] == exact["messages_dropped"]["loss"]


@pytest.mark.parametrize("faults", [{"duplicate_pct": 3, "reorder_pct": 10}, {}])
def test_shortcuts_keep_the_trace_and_counters_with_graylisted_spammers(
        faults: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    s = scenario_from_obj({
        "run": {"nodes": 120, "duration_s": 25, "settle_s": 5},
        "network": {"latency": "regions", **faults},
        "adverts": {"refresh_s": 3, "ttl_s": 30, "observers": 40},
        "gossipsub": {"graylist_score": -1.0},
        # broken signatures get their senders graylisted: copies counted behind
        # a graylisted sender's copy are scheduled after all (several hundred)
        "adversary": [{"kind": "fake_capability", "count": 6},
                      {"kind": "advert_spam", "count": 10, "params": {"valid": False, "rate_per_s": 2.0}}],
        "jobs": {"submitters": 0},
    })
    fast, exact = _both(s, 3, monkeypatch)
    assert fast["advert_rejections"]["BAD_SIGNATURE"] > 100
    assert fast["trace_hash"] == exact["trace_hash"]
    assert fast["events"] * 2 < exact["events"]
    for key in ("bytes_out_per_node_mean", "iwant_served", "advert_rejections", "advert_propagation_ms_p99"):
        assert fast[key] == exact[key], key
    # with nobody going down, what landed differs only by the copies still in
    # flight when the run ends (counted when sent, never landed in exact mode)
    for key in ("duplicates_per_node_mean", "bytes_in_per_node_mean"):
        assert 0 <= fast[key] - exact[key] <= exact[key] / 1000, key


class _HeapEngine:
    """The binary-heap engine the calendar replaced, as the reference."""

    def __init__(self, mul: int, salt: int) -> None:
        self.now_us = 0
        self._seq = 0
        self._mul, self._salt = mul, salt
        self.heap: list[tuple[int, object, object]] = []

    def at(self, t_us: int, fn: object, arg: object) -> None:
        t_us = max(t_us, self.now_us)
        self._seq += 1
        heapq.heappush(self.heap, ((t_us << _TIE_BITS) | ((self._seq * self._mul + self._salt) & _TIE_MASK), fn, arg))

    def run_until(self, end_us: int) -> None:
        while self.heap and self.heap[0][0] < end_us << _TIE_BITS:
            key, fn, arg = heapq.heappop(self.heap)
            self.now_us = key >> _TIE_BITS
            fn(arg)  # type: ignore[operator]
        self.now_us = max(self.now_us, end_us)

    @property
    def pending(self) -> int:
        return len(self.heap)


def _workload(eng: Engine | _HeapEngine) -> list[tuple[int, int]]:
    rng = random.Random(5)
    ran: list[tuple[int, int]] = []
    ids = iter(range(10**9))

    def fire(i: int) -> None:
        ran.append((eng.now_us, i))
        for _ in range(rng.choice([0, 0, 1, 2])):
            # now, within the open bucket, a few buckets on, far ahead
            eng.at(eng.now_us + rng.choice([0, rng.randrange(900), rng.randrange(10_000), rng.randrange(2_000_000)]),
                   fire, next(ids))

    for _ in range(3000):
        eng.at(rng.randrange(3_000_000), fire, next(ids))
    t = 0
    while eng.pending:
        t += rng.randrange(1, 400_000)
        eng.run_until(t)  # stops inside buckets too
        eng.at(t + rng.randrange(-2, 3), fire, next(ids))  # between runs, around the clock
        if rng.random() < 0.02:
            eng.run_until(t + rng.randrange(1, 100_000) * 1000)
    return ran


def test_calendar_queue_runs_events_in_heap_order() -> None:
    eng = Engine(11)
    got = _workload(eng)
    want = _workload(_HeapEngine(eng._mul, eng._salt))
    assert len(got) > 5000
    assert got == want
    assert [t for t, _ in got] == sorted(t for t, _ in got)
