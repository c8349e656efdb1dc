"""Seed sweeps: many runs of one scenario, in local processes or on Ray.

Each seed is an independent run (workers load the scenario file themselves,
so nothing but a path and a seed crosses a process boundary).  The sweep
reports, for every numeric metric, the mean with a 95 % confidence interval
(Student's t) over seeds, and lists every seed whose run broke an invariant
together with the one command that replays it.  Ray is optional: it is
imported only when ``ray_address`` is given, with a clear error when absent.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: metrics summarised across seeds (those a run reports as numbers)
_SKIP = ("seed", "nodes", "trace_hash", "trace_records", "wall_s", "events_per_s", "speed_x_real_time")
seeds_max = 1_000_000
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04}


def t95(df: int) -> float:
    if df >= 30:
        return 1.96 + 2.4 / df  # close to the t quantile above 30 degrees of freedom
    best = max(k for k in _T95 if k <= df)
    return _T95[best]


def mean_ci(values: list[float]) -> dict[str, float]:
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return {"mean": m, "ci95": 0.0, "n": n}
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": round(m, 6), "ci95": round(half, 6), "n": n}


def replay_command(path: str, seed: int) -> str:
    return f"p2pgpu sim run {path} --seed {seed}"


def _one(job: tuple[str, int, dict[str, Any], str]) -> dict[str, Any]:
    path, seed, overrides, mutation = job
    from ._run import run_scenario
    from ._scenario import load_scenario

    result = run_scenario(load_scenario(path, overrides), seed, plots=False, mutation=mutation)
    s = result.summary
    return {"seed": seed, "trace_hash": result.trace_hash, "violations": result.violations,
            "metrics": {k: v for k, v in s.items()
                        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}}


@dataclass
class SweepResult:
    path: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["violations"]]

    def stats(self) -> dict[str, dict[str, float]]:
        keys: dict[str, bool] = {}
        for r in self.runs:
            for k in r["metrics"]:
                keys[k] = True
        out = {}
        for k in keys:
            vals = [float(r["metrics"][k]) for r in self.runs if r["metrics"].get(k) is not None]
            if vals:
                out[k] = mean_ci(vals)
        return out

    def to_doc(self) -> dict[str, Any]:
        return {
            "scenario": self.path,
            "seeds": len(self.runs),
            "failures": [{"seed": r["seed"], "violation": r["violations"][0],
                          "replay": replay_command(self.path, r["seed"])} for r in self.failures],
            "metrics": self.stats(),
        }


def sweep(path: str, seeds: int, *, first_seed: int = 1, workers: int | None = None,
          ray_address: str | None = None, overrides: dict[str, Any] | None = None, mutation: str = "",
          progress: Callable[[int, int], None] | None = None) -> SweepResult:
    if not 1 <= seeds <= seeds_max:
        raise ValueError(f"seeds must be between 1 and {seeds_max}")
    jobs = [(path, first_seed + i, dict(overrides or {}), mutation) for i in range(seeds)]
    result = SweepResult(path)
    if ray_address is not None:
        result.runs = _on_ray(ray_address, jobs)
    elif workers == 1:
        for i, job in enumerate(jobs):
            result.runs.append(_one(job))
            if progress:
                progress(i + 1, seeds)
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(processes=workers or multiprocessing.cpu_count()) as pool:
            for i, r in enumerate(pool.imap(_one, jobs, chunksize=max(1, seeds // 64))):
                result.runs.append(r)
                if progress:
                    progress(i + 1, seeds)
    result.runs.sort(key=lambda r: r["seed"])
    return result


class RayMissing(RuntimeError):
    pass


def _on_ray(address: str, jobs: list[tuple[str, int, dict[str, Any], str]]) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise RayMissing("--ray needs the 'ray' package: pip install 'p2pgpu[ray]' (or pip install ray)") from None
    ray.init(address=address, ignore_reinit_error=True)
    remote = ray.remote(_one)
    # The scenario file must exist at the same path on the workers (a shared
    # checkout), as in any Ray job that reads local files.
    return list(ray.get([remote.remote(j) for j in jobs]))
