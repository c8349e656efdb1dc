"""Requirement matching: which peers can serve a job, and why the others can't.

``exclusion(advert, req)`` returns the first requirement a peer fails (in the
fixed order of :class:`Requirement`), so ``job submit --dry-run`` can explain,
requirement by requirement, how many known peers pass.  Pure and
deterministic: adverts in, verdicts out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from . import _limits as limits
from ._advert import Advert, GpuInfo, parse_compute_capability

nodes_max = limits.nodes_per_job_max


class Requirement(str, Enum):
    """In the order they are checked; the first failing one is reported."""

    NETWORK_RULES = "simulated"
    RUNTIME = "runtime"
    REGION = "region"
    CURRENCY = "currency"
    PRICE = "price"
    MODEL = "models"
    VRAM = "vram"
    COMPUTE_CAPABILITY = "compute_capability"
    GPUS_PER_NODE = "gpus_per_node"
    FREE_GPUS = "free_gpus"


@dataclass(frozen=True, kw_only=True, slots=True)
class Requirements:
    nodes: int = 1
    gpus_per_node: int = 1
    memory_mb_min: int = 0
    models: tuple[str, ...] = ()
    compute_capability_min: str = "0.0"
    price_per_gpu_hour_max: int = 0
    currency: str = "SOL"
    regions: tuple[str, ...] = ()
    runtime: str = "process"
    allow_simulated: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= nodes_max:
            raise ValueError(f"nodes must be between 1 and {nodes_max}")
        if not 1 <= self.gpus_per_node <= 16:
            raise ValueError("gpus_per_node must be between 1 and 16")
        if self.memory_mb_min < 0 or self.price_per_gpu_hour_max < 0:
            raise ValueError("memory and price must not be negative")
        parse_compute_capability(self.compute_capability_min)


def _gpu_fits(g: GpuInfo, req: Requirements, cc_min: tuple[int, int]) -> bool:
    return (
        g.memory_mb >= req.memory_mb_min
        and (not req.models or any(m.lower() in g.model.lower() for m in req.models))
        and parse_compute_capability(g.compute_capability) >= cc_min
    )


def exclusion(adv: Advert, req: Requirements) -> Requirement | None:
    """The first requirement ``adv`` fails, or ``None`` when it matches."""
    if adv.simulated and not req.allow_simulated:
        return Requirement.NETWORK_RULES
    if req.runtime not in adv.runtimes:
        return Requirement.RUNTIME
    if req.regions and adv.region not in req.regions:
        return Requirement.REGION
    if adv.currency != req.currency:
        return Requirement.CURRENCY
    if adv.price_per_gpu_hour > req.price_per_gpu_hour_max:
        return Requirement.PRICE
    cc_min = parse_compute_capability(req.compute_capability_min)
    gpus = list(adv.gpus)
    if req.models and not any(any(m.lower() in g.model.lower() for m in req.models) for g in gpus):
        return Requirement.MODEL
    if not any(g.memory_mb >= req.memory_mb_min for g in gpus):
        return Requirement.VRAM
    if not any(parse_compute_capability(g.compute_capability) >= cc_min for g in gpus):
        return Requirement.COMPUTE_CAPABILITY
    fitting = sum(1 for g in gpus if _gpu_fits(g, req, cc_min))
    if fitting < req.gpus_per_node:
        return Requirement.GPUS_PER_NODE
    # Free capacity is counted over all GPUs: adverts say how many are free,
    # not which; a node re-checks its real free set before it volunteers.
    if min(fitting, adv.gpus_free) < req.gpus_per_node:
        return Requirement.FREE_GPUS
    return None


def matching(adverts: Iterable[Advert], req: Requirements) -> list[Advert]:
    return [a for a in adverts if exclusion(a, req) is None]


def image_digest(image_ref: str) -> str:
    """The hex digest an image reference pins (``...@sha256:<hex>``), or ``""``."""
    _, at, digest = image_ref.rpartition("@sha256:")
    return digest if at and len(digest) == 64 else ""


def is_warm(adv: Advert | None, image_ref: str) -> bool:
    """Does ``adv`` say its node has the image ``image_ref`` cached?"""
    digest = image_digest(image_ref)
    return bool(digest) and adv is not None and digest in adv.images


def warm_first(peers: list[str], adverts: dict[str, Advert], image_ref: str) -> list[str]:
    """``peers`` with those whose advert lists ``image_ref``'s digest as
    cached moved to the front, each group in its given order: a tie-breaker
    among peers that are already eligible, never a filter (a cold peer is
    still chosen when there are not enough warm ones)."""
    if not image_digest(image_ref):
        return list(peers)
    warm = [p for p in peers if is_warm(adverts.get(p), image_ref)]
    return warm + [p for p in peers if p not in warm]


@dataclass(frozen=True, slots=True)
class Explanation:
    """How many known peers survive each requirement, in checking order."""

    known: int
    passing_after: tuple[tuple[Requirement, int], ...]
    excluded_by: dict[str, Requirement]
    matched: tuple[str, ...]
    nodes_needed: int

    @property
    def enough(self) -> bool:
        return len(self.matched) >= self.nodes_needed


def explain(adverts: Iterable[Advert], req: Requirements) -> Explanation:
    ads = list(adverts)
    excluded: dict[str, Requirement] = {}
    for a in ads:
        why = exclusion(a, req)
        if why is not None:
            excluded[a.peer_id] = why
    order = list(Requirement)
    passing = []
    remaining = len(ads)
    for r in order:
        remaining -= sum(1 for w in excluded.values() if w is r)
        passing.append((r, remaining))
    matched = tuple(a.peer_id for a in ads if a.peer_id not in excluded)
    return Explanation(len(ads), tuple(passing), excluded, matched, req.nodes)
