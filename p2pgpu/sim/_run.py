"""One run of a scenario with one seed: build the world, run it, report.

:func:`run_scenario` is what ``p2pgpu sim run``, the sweep, the tests and
the benchmark call.  It makes the run's signature verifier (memoised, see
:mod:`._crypto`), hands it to the world's cores, and returns a :class:`RunResult` whose
``summary`` is plain JSON-ready data with ``seed`` first and ``trace_hash``
last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._adversary import inactive
from ._crypto import verify_cache
from ._scenario import Scenario
from ._world import World


@dataclass
class RunResult:
    seed: int
    summary: dict[str, Any]
    trace_hash: str
    violations: list[dict[str, Any]]
    files: list[str]
    world: World

    @property
    def ok(self) -> bool:
        return not self.violations


def run_scenario(scenario: Scenario, seed: int, *, out_dir: str | Path | None = None, plots: bool = True,
                 progress: Callable[[str], None] | None = None, mutation: str = "",
                 tracing: bool = True) -> RunResult:
    with verify_cache(scenario.adverts.verify == "cached") as cache:
        world = World(scenario, seed, progress=progress, tracing=tracing, mutation=mutation, verify=cache)
        world.run()
    body = world.metrics.summary()
    body["signature_verifies_real"] = cache.real
    body["signature_verifies_cached"] = cache.hits
    body["adversaries_inactive"] = inactive(world.adversaries)
    if world.stopped:
        body["stopped"] = world.stopped
    if world.net.nat is not None:
        body["nat"] = world.net.nat.summary()
    th = world.engine.trace_hash()
    summary = {"seed": seed, **body, "trace_records": world.engine.trace_records, "trace_hash": th}
    files: list[str] = []
    if out_dir is not None:
        files = world.metrics.write(Path(out_dir), summary, plots=plots)
    return RunResult(seed, summary, th, list(world.checker.violations), files, world)
