"""The same scenario and seed give the same trace_hash in separate processes.

Each run is a fresh interpreter with a different ``PYTHONHASHSEED``, so any
iteration over a set or a str-keyed hash order that leaked into a decision
would show up as a different hash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"


def _run(seed: int, hashseed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run(
        [sys.executable, "-m", "p2pgpu.cli", "sim", "run", str(SMOKE), "--seed", str(seed), "--json", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(out.stdout)


def test_same_seed_same_trace_hash_across_processes() -> None:
    a = _run(11, "1")
    b = _run(11, "987654")
    assert a["trace_hash"] == b["trace_hash"]
    assert a["trace_records"] == b["trace_records"] > 10_000
    assert a["events"] == b["events"]
    assert {k: v for k, v in a.items() if k not in ("wall_s", "speed_x_real_time", "events_per_s")} == \
        {k: v for k, v in b.items() if k not in ("wall_s", "speed_x_real_time", "events_per_s")}


def test_another_seed_another_trace() -> None:
    assert _run(12, "1")["trace_hash"] != _run(13, "1")["trace_hash"]
