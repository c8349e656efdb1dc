"""Log lines kept in memory for ``job logs`` are bounded by jobs and bytes
(``node/_kept_logs.py``, #13): both the submitter's collected lines and a
member's own kept 64 jobs' lines with no bound on their size."""

from __future__ import annotations

import pytest

from p2pgpu.node._collect import log_bytes_kept_max as collected_bytes_max
from p2pgpu.node._kept_logs import KeptLogs, line_bytes, line_overhead_bytes
from p2pgpu.node._runner import log_bytes_kept_max as own_bytes_max


def lines(n: int, size: int = 100) -> list[dict[str, object]]:
    return [{"t_ms": i, "stream": "stdout", "line": "x" * size} for i in range(n)]


def test_lines_are_kept_in_order_per_job_and_the_oldest_job_goes_first() -> None:
    k = KeptLogs(jobs_max=2, bytes_max=1 << 20)
    assert k.add("a", lines(3)) == 3 and k.add("a", lines(2)) == 2
    assert [e["t_ms"] for e in k.get("a")] == [0, 1, 2, 0, 1]
    k.add("b", lines(1))
    k.add("a", lines(1))  # a written last: b is now the oldest
    k.add("c", lines(1))
    assert "b" not in k and "a" in k and "c" in k and len(k) == 2
    assert k.bytes == sum(line_bytes(e) for j in ("a", "c") for e in k.get(j))


def test_a_flood_of_lines_is_held_to_the_bytes_limit() -> None:
    """Hostile: one job (a member sending 50,000 lines of 4 KiB, each batch
    valid) fills the cache: older jobs go first, then its own lines stop at
    the limit; memory never passes ``bytes_max``."""
    per_line = 4096 + line_overhead_bytes
    k = KeptLogs(jobs_max=64, bytes_max=100 * per_line)
    k.add("old", lines(10, 4096))
    kept = sum(k.add("flood", lines(1_000, 4096)) for _ in range(50))
    assert kept == 100 and "old" not in k
    assert k.bytes <= k.bytes_max and k.dropped_lines == 50_000 - 100
    k.add("next", lines(1, 4096))  # a new job still gets its lines: the flood's go
    assert len(k.get("next")) == 1 and k.bytes <= k.bytes_max


def test_limits_are_set_and_checked() -> None:
    assert 0 < own_bytes_max <= 64 << 20 and 0 < collected_bytes_max <= 64 << 20
    with pytest.raises(ValueError):
        KeptLogs(jobs_max=0, bytes_max=1)
