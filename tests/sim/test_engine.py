"""The engine: time order, seeded tie-breaking, independent streams, the trace hash."""

from __future__ import annotations

from p2pgpu.sim import Engine


def _order(seed: int) -> list[int]:
    eng = Engine(seed)
    out: list[int] = []
    for i in range(20):
        eng.at(1000, out.append, i)  # all due at the same microsecond
    eng.at(500, out.append, -1)
    eng.at(2000, out.append, 99)
    eng.run_until(10_000)
    return out


def test_time_order_then_seeded_ties() -> None:
    a = _order(1)
    assert a[0] == -1 and a[-1] == 99
    assert sorted(a[1:-1]) == list(range(20))
    assert _order(1) == a  # same seed, same order
    assert any(_order(s)[1:-1] != a[1:-1] for s in range(2, 6))  # ties depend on the seed


def test_clock_reads_end_and_never_goes_back() -> None:
    eng = Engine(3)
    seen: list[int] = []
    eng.at(100, lambda _: eng.at(50, lambda _: seen.append(eng.now_us)))  # "in the past" runs now
    eng.run_until(1_000)
    assert seen == [100]
    assert eng.now_us == 1_000
    assert eng.events_run == 2


def test_streams_are_independent_and_stable() -> None:
    a, b = Engine(7), Engine(7)
    a.stream("x").random()  # drawing from one stream...
    assert a.stream("y").random() == b.stream("y").random()  # ...does not shift another
    assert Engine(7).stream("x").random() != Engine(8).stream("x").random()


def test_trace_hash_covers_records_in_order() -> None:
    def h(records: list[tuple[str, int]]) -> str:
        eng = Engine(1)
        for r in records:
            eng.trace(*r)
        return eng.trace_hash()

    assert h([("a", 1), ("b", 2)]) == h([("a", 1), ("b", 2)])
    assert h([("a", 1), ("b", 2)]) != h([("b", 2), ("a", 1)])
    assert h([("a", 1)] * 10_000) != h([("a", 1)] * 10_001)  # across the flush boundary too
