"""Churn, crashes, clock skew and partitions: the faults a scenario schedules.

Session lengths follow the distributions measured for real peer-to-peer
networks (Stutzbach and Rejaie, "Understanding churn in peer-to-peer
networks", IMC 2006, found heavy tails better fit by Weibull than by the
exponential): exponential, Weibull (shape < 1 is heavy-tailed) or Pareto,
each scaled so that its mean is ``session_mean_s``.  A departure is a crash
(peers notice after ``detect_ms``) or a clean leave, and loses the node's
state (``state_loss_pct``: the disk is gone: advert book, sequence number,
reservations) or keeps it; the node comes back after an exponential
downtime.  Every draw comes from the ``"churn"`` stream.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._scenario import ChurnSection, PartitionSection

if TYPE_CHECKING:
    from ._world import World


def session_s(cfg: ChurnSection, rng: Any) -> float:
    mean = cfg.session_mean_s
    if cfg.session == "weibull":
        k = cfg.weibull_shape
        return float(rng.weibullvariate(mean / math.gamma(1 + 1 / k), k))
    if cfg.session == "pareto":
        a = cfg.pareto_alpha
        return float(rng.paretovariate(a) * mean * (a - 1) / a)
    return float(rng.expovariate(1.0 / mean))


class Churn:
    def __init__(self, world: World, cfg: ChurnSection) -> None:
        self.world = world
        self.cfg = cfg
        self.rng = world.engine.stream("churn")
        self.departures = 0
        self.crashes = 0
        self.state_losses = 0
        n = world.n
        self.churning = [False] * n
        if cfg.fraction > 0:
            for i in self.rng.sample(range(n), round(cfg.fraction * n)):
                self.churning[i] = True

    def schedule_departure(self, node: int) -> None:
        if self.churning[node]:
            us = int(session_s(self.cfg, self.rng) * 1_000_000) + 1
            self.world.engine.after(us, self._depart, (node, self.world.net.epoch[node]))

    def _depart(self, arg: tuple[int, int]) -> None:
        node, epoch = arg
        w = self.world
        if not w.net.up[node] or w.net.epoch[node] != epoch:
            return
        crash = self.rng.random() * 100 < self.cfg.crash_pct
        lose = self.rng.random() * 100 < self.cfg.state_loss_pct
        self.departures += 1
        self.crashes += crash
        self.state_losses += lose
        w.node_down(node, crash=crash, lose_state=lose)
        down_us = int(self.rng.expovariate(1.0 / self.cfg.downtime_mean_s) * 1_000_000) + 1
        w.engine.after(down_us, self._return, node)

    def _return(self, node: int) -> None:
        self.world.node_up(node)
        self.schedule_departure(node)


def partition_sides(p: PartitionSection, world: World, rng: Any) -> list[int]:
    """Side of each node (0 or 1) for one partition."""
    kind, _, arg = p.split.partition(":")
    n = world.n
    if kind == "regions":
        names = [r.strip() for r in arg.split(",") if r.strip()]
        idx = [i for i, name in enumerate(world.net.region_names) if name in names]
        return [1 if world.net.region[i] in idx else 0 for i in range(n)]
    frac = float(arg)
    side = [0] * n
    for i in rng.sample(range(n), round(frac * n)):
        side[i] = 1
    return side
