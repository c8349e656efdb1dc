"""The market as the control API and the explorer show it: one row per advert.

Kept apart from the daemon so that the control methods (``_job_api.py``) and
the daemon both use it without importing each other.
"""

from __future__ import annotations

from typing import Any

from p2pgpu.core import Advert


def market_row(adv: Advert) -> dict[str, Any]:
    by_model: dict[tuple[str, int], int] = {}
    for g in adv.gpus:
        by_model[(g.model, g.memory_mb)] = by_model.get((g.model, g.memory_mb), 0) + 1
    return {
        "peer_id": adv.peer_id,
        "gpus": [{"model": m, "memory_mb": mb, "count": c} for (m, mb), c in sorted(by_model.items())],
        "gpus_free": adv.gpus_free,
        "price": adv.price_per_gpu_hour,
        "currency": adv.currency,
        "region": adv.region,
        "expires_at": adv.expires_at_ms,
        "addrs": list(adv.addrs),
        "simulated": adv.simulated,
        "payout_address": adv.payout_address,
        "runtimes": list(adv.runtimes),
        "images": list(adv.images),
    }
