"""Requirement matching: each requirement can exclude a peer, in a fixed order.

One base advert matches the base requirements; each row changes one thing
and names the requirement that must then exclude the peer.  ``explain()``
must count, requirement by requirement, how many peers are still in.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from p2pgpu.core import (
    Advert,
    GpuInfo,
    Identity,
    Requirement,
    Requirements,
    exclusion,
    explain,
    matching,
)

T0 = 1_700_000_000_000
H100 = GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_capability="9.0")
A10 = GpuInfo(model="NVIDIA A10", memory_mb=23028, compute_capability="8.6")
T4 = GpuInfo(model="Tesla T4", memory_mb=15360, compute_capability="7.5")
PEERS = [Identity.from_rng(random.Random(100 + i)).peer_id for i in range(12)]


def advert(i: int = 0, **over: Any) -> Advert:
    fields: dict[str, Any] = dict(
        peer_id=PEERS[i], network="local", addrs=(), seq=1, issued_at_ms=T0, expires_at_ms=T0 + 60_000,
        gpus=(H100, H100), gpus_free=2, price_per_gpu_hour=100, currency="SOL", payout_address="",
        region="eu-west", runtimes=("process", "ray"), simulated=False,
    )
    fields.update(over)
    return Advert(**fields)


BASE = Requirements(nodes=1, gpus_per_node=2, memory_mb_min=40_000, models=("H100",),
                    compute_capability_min="8.0",
                    price_per_gpu_hour_max=100, currency="SOL", regions=("eu-west",), runtime="process",
                    allow_simulated=False)


def test_base_matches() -> None:
    assert exclusion(advert(), BASE) is None
    assert matching([advert()], BASE) == [advert()]


EXCLUDES: list[tuple[str, dict[str, Any], dict[str, Any], Requirement]] = [
    ("simulated refused", {"simulated": True}, {}, Requirement.NETWORK_RULES),
    ("runtime missing", {"runtimes": ("ray",)}, {}, Requirement.RUNTIME),
    ("ray asked", {"runtimes": ("process",)}, {"runtime": "ray"}, Requirement.RUNTIME),
    ("no runtimes", {"runtimes": ()}, {}, Requirement.RUNTIME),
    ("other region", {"region": "us-east"}, {}, Requirement.REGION),
    ("other currency", {"currency": "USDC"}, {}, Requirement.CURRENCY),
    ("too expensive", {"price_per_gpu_hour": 101}, {}, Requirement.PRICE),
    ("other model", {"gpus": (A10, A10)}, {}, Requirement.MODEL),
    ("no gpus", {"gpus": (), "gpus_free": 0}, {}, Requirement.MODEL),
    ("too little vram", {"gpus": (A10, A10)}, {"models": ()}, Requirement.VRAM),
    ("no gpus, no model asked", {"gpus": (), "gpus_free": 0}, {"models": ()}, Requirement.VRAM),
    ("old gpu", {"gpus": (T4, T4)}, {"models": (), "memory_mb_min": 0}, Requirement.COMPUTE_CAPABILITY),
    ("cc 9.0 < 9.1", {}, {"compute_capability_min": "9.1"}, Requirement.COMPUTE_CAPABILITY),
    ("cc compared as numbers, not text", {}, {"compute_capability_min": "10.0"},
     Requirement.COMPUTE_CAPABILITY),
    ("one gpu", {"gpus": (H100,), "gpus_free": 1}, {}, Requirement.GPUS_PER_NODE),
    ("one fitting gpu of two", {"gpus": (H100, A10)}, {"models": ()}, Requirement.GPUS_PER_NODE),
    ("no gpu fits every rule", {"gpus": (A10, T4)},
     {"models": (), "memory_mb_min": 20_000, "compute_capability_min": "7.5", "gpus_per_node": 1},
     None),  # A10 fits alone
    ("one free", {"gpus_free": 1}, {}, Requirement.FREE_GPUS),
    ("none free", {"gpus_free": 0}, {}, Requirement.FREE_GPUS),
]


@pytest.mark.parametrize(("adv_over", "req_over", "expected"), [r[1:] for r in EXCLUDES],
                         ids=[r[0] for r in EXCLUDES])
def test_each_requirement_excludes(adv_over: dict[str, Any], req_over: dict[str, Any],
                                   expected: Requirement | None) -> None:
    req = dataclasses.replace(BASE, **req_over)
    assert exclusion(advert(**adv_over), req) is expected


def test_gpus_that_fit_must_fit_every_rule_at_once() -> None:
    # One GPU has the memory, another the capability: no single GPU fits both.
    big_old = GpuInfo(model="old", memory_mb=50_000, compute_capability="7.0")
    small_new = GpuInfo(model="new", memory_mb=8_000, compute_capability="9.0")
    req = Requirements(gpus_per_node=1, memory_mb_min=40_000, compute_capability_min="8.0",
                       price_per_gpu_hour_max=100)
    assert exclusion(advert(gpus=(big_old, small_new), gpus_free=2), req) is Requirement.GPUS_PER_NODE


def test_models_match_case_insensitive_substrings() -> None:
    req = dataclasses.replace(BASE, models=("a10", "h100"), memory_mb_min=0, gpus_per_node=1)
    assert exclusion(advert(gpus=(A10,), gpus_free=1), req) is None
    assert exclusion(advert(gpus=(H100,), gpus_free=1), req) is None
    assert exclusion(advert(gpus=(T4,), gpus_free=1), req) is Requirement.MODEL


def test_empty_region_list_means_anywhere_and_simulated_allowed_when_asked() -> None:
    req = dataclasses.replace(BASE, regions=(), allow_simulated=True)
    assert exclusion(advert(region="ap-south", simulated=True), req) is None


def test_the_first_failing_requirement_is_reported() -> None:
    # Fails everything: the first in Requirement's order wins.
    bad: dict[str, Any] = dict(simulated=True, runtimes=("ray",), region="x", currency="X",
                               price_per_gpu_hour=10**6,
                               gpus=(T4,), gpus_free=0)
    order = list(Requirement)
    assert order == [Requirement.NETWORK_RULES, Requirement.RUNTIME, Requirement.REGION, Requirement.CURRENCY,
                     Requirement.PRICE, Requirement.MODEL, Requirement.VRAM, Requirement.COMPUTE_CAPABILITY,
                     Requirement.GPUS_PER_NODE, Requirement.FREE_GPUS]
    fixes: list[tuple[Requirement, dict[str, Any]]] = [
        (Requirement.NETWORK_RULES, {"simulated": False}),
        (Requirement.RUNTIME, {"runtimes": ("process",)}),
        (Requirement.REGION, {"region": "eu-west"}),
        (Requirement.CURRENCY, {"currency": "SOL"}),
        (Requirement.PRICE, {"price_per_gpu_hour": 100}),
        (Requirement.MODEL, {"gpus": (T4, dataclasses.replace(H100, memory_mb=10_000,
                                                              compute_capability="7.0"))}),
        (Requirement.VRAM, {"gpus": (T4, dataclasses.replace(H100, compute_capability="7.0"))}),
        (Requirement.COMPUTE_CAPABILITY, {"gpus": (T4, H100)}),  # one H100 only
    ]
    for expected, fix in fixes:
        assert exclusion(advert(**bad), BASE) is expected
        bad.update(fix)
    assert exclusion(advert(**bad), BASE) is Requirement.GPUS_PER_NODE
    bad.update(gpus=(H100, H100))
    assert exclusion(advert(**bad), BASE) is Requirement.FREE_GPUS
    bad.update(gpus_free=2)
    assert exclusion(advert(**bad), BASE) is None


def test_explain_counts_per_requirement() -> None:
    ads = [
        advert(0),
        advert(1),
        advert(2, simulated=True),
        advert(3, region="us-east"),
        advert(4, region="us-east"),
        advert(5, price_per_gpu_hour=500),
        advert(6, gpus=(A10, A10)),
        advert(7, gpus_free=0),
    ]
    ex = explain(ads, BASE)
    assert ex.known == 8
    assert dict(ex.passing_after) == {
        Requirement.NETWORK_RULES: 7,
        Requirement.RUNTIME: 7,
        Requirement.REGION: 5,
        Requirement.CURRENCY: 5,
        Requirement.PRICE: 4,
        Requirement.MODEL: 3,
        Requirement.VRAM: 3,
        Requirement.COMPUTE_CAPABILITY: 3,
        Requirement.GPUS_PER_NODE: 3,
        Requirement.FREE_GPUS: 2,
    }
    assert [r for r, _ in ex.passing_after] == list(Requirement)
    assert ex.matched == (PEERS[0], PEERS[1])
    assert ex.excluded_by == {
        PEERS[2]: Requirement.NETWORK_RULES,
        PEERS[3]: Requirement.REGION,
        PEERS[4]: Requirement.REGION,
        PEERS[5]: Requirement.PRICE,
        PEERS[6]: Requirement.MODEL,
        PEERS[7]: Requirement.FREE_GPUS,
    }
    assert ex.nodes_needed == 1 and ex.enough
    assert not explain(ads, dataclasses.replace(BASE, nodes=3)).enough
    assert matching(ads, BASE) == [ads[0], ads[1]]


def test_explain_of_nothing() -> None:
    ex = explain([], BASE)
    assert ex.known == 0 and ex.matched == () and not ex.enough
    assert all(n == 0 for _, n in ex.passing_after)


def test_explain_keeps_input_order() -> None:
    ads = [advert(i) for i in (5, 1, 3)]
    assert explain(ads, BASE).matched == (PEERS[5], PEERS[1], PEERS[3])


REQ_BAD: list[tuple[str, dict[str, Any]]] = [
    ("0 nodes", {"nodes": 0}),
    ("65 nodes", {"nodes": 65}),
    ("0 gpus per node", {"gpus_per_node": 0}),
    ("17 gpus per node", {"gpus_per_node": 17}),
    ("negative memory", {"memory_mb_min": -1}),
    ("negative price", {"price_per_gpu_hour_max": -1}),
    ("bad cc", {"compute_capability_min": "sm80"}),
]


@pytest.mark.parametrize("over", [r[1] for r in REQ_BAD], ids=[r[0] for r in REQ_BAD])
def test_requirements_validate(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Requirements(**over)
