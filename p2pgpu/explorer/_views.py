"""What the explorer shows, computed from what the daemon answered: pure functions.

The collector (``_collect.py``) asks the daemon for its raw answers (``status``,
``peers``, ``market``, ``job.list``/``job.status``, ``proofs``, ``payouts``,
``earnings``) and hands them here as one :class:`Raw`; :func:`build_views`
turns them into the documents of the JSON API.  No I/O and no clock reads
(``now_ms`` comes in), so every panel is table-tested without a network.

What may be shown is what signed data and ledger transactions establish:

* supply and nodes come from signed adverts (the market keeps only verified,
  unexpired ones);
* clusters from certificates (every member's signed accept), as the jobs
  report them;
* proofs are signed by the member that did the work;
* a payout is "paid" only with the signature of the ledger transaction that
  paid it; anything else is shown as owed, never as earned.

A panel whose daemon method is missing is ``{"available": false, "rows": []}``
and the page says "no data yet"; the daemon's answers are taken leniently
(unknown keys are kept, missing ones become ``None``), so a newer daemon
that adds fields does not break an older explorer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Rows kept per panel: the page is for people, the API for tools; both stay bounded.
rows_max = 500

PANELS = ("supply", "nodes", "clusters", "jobs", "proofs", "payouts")

#: Method(s) each panel needs from the daemon (for "no data yet: the daemon lacks ...").
PANEL_METHODS: dict[str, tuple[str, ...]] = {
    "supply": ("market",),
    "nodes": ("market", "peers"),
    "clusters": ("job.list",),
    "jobs": ("job.list",),
    "proofs": ("proofs",),
    "payouts": ("payouts", "earnings"),
}


@dataclass
class Raw:
    """The daemon's answers of one poll; ``None`` where the method is missing or failed."""

    status: dict[str, Any] | None = None
    peers: list[dict[str, Any]] | None = None
    market: list[dict[str, Any]] | None = None
    jobs: list[dict[str, Any]] | None = None
    proofs: list[dict[str, Any]] | None = None
    payouts: list[dict[str, Any]] | None = None
    earnings: list[dict[str, Any]] | None = None
    #: Every job the node has seen on the network (``network.jobs``), for the network view.
    network_jobs: list[dict[str, Any]] | None = None
    missing: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _rows(value: Any) -> list[dict[str, Any]]:
    """A list of dicts from an answer that may be a list or ``{"<name>": [...]}``."""
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, list):
                value = v
                break
        else:
            return []
    if not isinstance(value, list):
        return []
    return [r for r in value if isinstance(r, dict)][:rows_max]


def rows_of(value: Any) -> list[dict[str, Any]] | None:
    return None if value is None else _rows(value)


#: The type each known key must have; a value of another type is dropped (read as missing).
_NUMBER = (int, float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **{k: (str,) for k in ("peer_id", "region", "currency", "model", "job_id", "state", "certificate_hash",
                           "proof_hash", "status", "tx_signature", "name", "worker", "payout_address", "network")},
    **{k: _NUMBER for k in ("gpus_free", "memory_mb", "count", "seen_at_ms", "formation_ms", "amount", "price",
                            "latency_ms", "gpu_ms", "expires_at", "peers", "adverts_known", "uptime_s", "nodes",
                            "replicas", "paid_ms", "created_ms")},
    **{k: (list,) for k in ("gpus", "members", "proofs", "payouts", "roles")},
    **{k: (dict,) for k in ("cluster", "timings", "rejections", "jobs", "counters")},
}


def clean(obj: Any, depth: int = 0) -> Any:
    """A daemon's answer with every known key of the wrong type dropped, recursively (bounded depth)."""
    if depth > 8:
        return None
    if isinstance(obj, list):
        return [clean(v, depth + 1) for v in obj[:rows_max]]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        want = FIELD_TYPES.get(k)
        if want is not None and (not isinstance(v, want) or isinstance(v, bool)):
            continue
        out[str(k)] = clean(v, depth + 1)
    return out


def clean_raw(raw: Raw) -> Raw:
    """:func:`clean` on every answer of a poll (idempotent)."""
    status = clean(raw.status)
    return Raw(status=status if isinstance(status, dict) else None, peers=clean(raw.peers),
               market=clean(raw.market), jobs=clean(raw.jobs), proofs=clean(raw.proofs),
               payouts=clean(raw.payouts), earnings=clean(raw.earnings), network_jobs=clean(raw.network_jobs),
               missing=raw.missing, errors=raw.errors)


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


# --------------------------------------------------------------------- supply


def supply(market: list[dict[str, Any]]) -> dict[str, Any]:
    """GPUs by (model, memory, region), by model and by region, from signed adverts."""
    cells: dict[tuple[str, int, str], dict[str, Any]] = {}
    for row in market:
        region = str(row.get("region") or "unknown")
        for g in row.get("gpus") or []:
            if not isinstance(g, dict):
                continue
            key = (str(g.get("model", "?")), _int(g.get("memory_mb")), region)
            cell = cells.setdefault(key, {"model": key[0], "memory_mb": key[1], "region": region, "gpus": 0,
                                          "nodes": 0, "price_min": None, "price_max": None,
                                          "currency": row.get("currency")})
            cell["gpus"] += _int(g.get("count", 1))
            cell["nodes"] += 1
            price = row.get("price")
            if isinstance(price, (int, float)) and not isinstance(price, bool):
                cell["price_min"] = price if cell["price_min"] is None else min(cell["price_min"], price)
                cell["price_max"] = price if cell["price_max"] is None else max(cell["price_max"], price)
    rows = [cells[k] for k in sorted(cells)]
    by_model: dict[str, dict[str, Any]] = {}
    by_region: dict[str, dict[str, Any]] = {}
    for c in rows:
        m = by_model.setdefault(c["model"], {"model": c["model"], "memory_mb": c["memory_mb"], "gpus": 0,
                                             "nodes": 0, "regions": {}})
        m["gpus"] += c["gpus"]
        m["nodes"] += c["nodes"]
        m["regions"][c["region"]] = m["regions"].get(c["region"], 0) + c["gpus"]
        r = by_region.setdefault(c["region"], {"region": c["region"], "gpus": 0, "models": {}})
        r["gpus"] += c["gpus"]
        r["models"][c["model"]] = r["models"].get(c["model"], 0) + c["gpus"]
    return {
        "rows": rows,
        "by_model": sorted(by_model.values(), key=lambda m: (-m["gpus"], m["model"])),
        "by_region": sorted(by_region.values(), key=lambda r: (-r["gpus"], r["region"])),
        "gpus_total": sum(c["gpus"] for c in rows),
        "gpus_free": sum(_int(r.get("gpus_free")) for r in market),
        "nodes": len({r.get("peer_id") for r in market}),
    }


# ---------------------------------------------------------------------- nodes


def nodes(market: list[dict[str, Any]], peers: list[dict[str, Any]] | None, self_id: str | None) -> list[dict[str, Any]]:
    """One row per advertising node, with the link to us where we have one."""
    latency = {p.get("peer_id"): p.get("latency_ms") for p in peers or []}
    out = []
    for row in sorted(market, key=lambda r: str(r.get("peer_id"))):
        pid = row.get("peer_id")
        gpus = [g for g in row.get("gpus") or [] if isinstance(g, dict)]
        out.append({
            "peer_id": pid,
            "self": pid == self_id,
            "connected": pid in latency,
            "latency_ms": latency.get(pid),
            "region": row.get("region"),
            "gpus": gpus,
            "gpus_total": sum(_int(g.get("count", 1)) for g in gpus),
            "gpus_free": row.get("gpus_free"),
            "price": row.get("price"),
            "currency": row.get("currency"),
            "simulated": bool(row.get("simulated")),
            "expires_at": row.get("expires_at"),
            "payout_address": row.get("payout_address"),
        })
    return out


# ------------------------------------------------------------------ jobs, clusters


def _cluster(job: Mapping[str, Any]) -> dict[str, Any]:
    c = job.get("cluster")
    return c if isinstance(c, dict) else {}


def jobs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for j in rows:
        cluster = _cluster(j)
        t = j.get("timings")
        timings: dict[str, Any] = t if isinstance(t, dict) else {}
        out.append({
            **j,
            "job_id": j.get("job_id"),
            "state": j.get("state"),
            "members": list(cluster.get("members") or []),
            "certificate_hash": cluster.get("certificate_hash") or None,
            "formation_ms": timings.get("formation_ms"),
        })
    return sorted(out, key=lambda j: (-_int(_seen_ms(j)), str(j["job_id"])))


def _seen_ms(job: Mapping[str, Any]) -> Any:
    t = job.get("timings")
    return t.get("seen_at_ms") if isinstance(t, dict) else None


def clusters(job_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Clusters formed: jobs whose certificate names its members."""
    out = []
    for j in jobs(job_rows):
        if not j["members"] or not j["certificate_hash"]:
            continue
        out.append({"job_id": j["job_id"], "name": j.get("name"), "certificate_hash": j["certificate_hash"],
                    "members": j["members"], "state": j["state"], "formation_ms": j["formation_ms"]})
    return out


def job_states(job_rows: list[dict[str, Any]] | None, status: dict[str, Any] | None) -> dict[str, int]:
    """Jobs by state: from the job list when there is one, else ``status``'s ``jobs`` map."""
    if job_rows is not None:
        counts: dict[str, int] = {}
        for j in job_rows:
            s = str(j.get("state"))
            counts[s] = counts.get(s, 0) + 1
        return dict(sorted(counts.items()))
    doc = (status or {}).get("jobs")
    return {str(k): _int(v) for k, v in sorted(doc.items())} if isinstance(doc, dict) else {}


# ------------------------------------------------------------ proofs, payouts


def payouts(payout_rows: list[dict[str, Any]] | None, earning_rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """What this node owes (as a submitter) and earns (as a worker), one row per proof hash.

    ``paid`` is true only with a transaction signature and a ``paid`` status."""
    out: dict[str, dict[str, Any]] = {}
    for side, rows in (("owed", payout_rows or []), ("earned", earning_rows or [])):
        for r in rows:
            h = str(r.get("proof_hash") or "")
            if not h or h in out:
                continue
            sig = r.get("tx_signature") or None
            out[h] = {**r, "proof_hash": h, "side": side, "tx_signature": sig,
                      "paid": bool(sig) and r.get("status") == "paid"}
    return list(out.values())


def proofs(proof_rows: list[dict[str, Any]], payout_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_hash = {p["proof_hash"]: p for p in payout_rows}
    out = []
    for r in proof_rows:
        h = str(r.get("proof_hash") or "")
        pay = by_hash.get(h)
        out.append({**r, "proof_hash": h, "paid": bool(pay and pay["paid"]),
                    "tx_signature": (pay or {}).get("tx_signature") or r.get("tx_signature")})
    return out


# ------------------------------------------------------------------- together


def _panel(rows: Any, available: bool, raw: Raw, name: str) -> dict[str, Any]:
    missing = [m for m in PANEL_METHODS[name] if m in raw.missing]
    return {"available": available, "missing_methods": missing, "rows": rows}


def build_views(raw: Raw, *, now_ms: int, version: int) -> dict[str, Any]:
    """Every panel of the explorer, as the JSON API serves it."""
    raw = clean_raw(raw)
    status = raw.status or {}
    market = raw.market or []
    job_rows = raw.jobs or []
    # A daemon without the ``proofs``/``payouts`` methods may still report them per job (``job.status``).
    proof_src = raw.proofs if raw.proofs is not None else from_jobs(job_rows, "proofs")
    payout_src = raw.payouts if raw.payouts is not None else from_jobs(job_rows, "payouts")
    pay_rows = payouts(payout_src, raw.earnings)
    sup = supply(market)
    out: dict[str, Any] = {
        "version": version,
        "as_of_ms": now_ms,
        "daemon_up": raw.status is not None,
        "errors": dict(sorted(raw.errors.items())),
        "missing_methods": sorted(raw.missing),
        "supply": {"available": raw.market is not None, "missing_methods": [], **sup},
        "nodes": _panel(nodes(market, raw.peers, status.get("peer_id")), raw.market is not None, raw, "nodes"),
        "clusters": _panel(clusters(job_rows), raw.jobs is not None, raw, "clusters"),
        "jobs": _panel(_with_payouts(jobs(job_rows), pay_rows), raw.jobs is not None, raw, "jobs"),
        "proofs": _panel(proofs(proof_src or [], pay_rows), proof_src is not None, raw, "proofs"),
        "payouts": _panel(pay_rows, payout_src is not None or raw.earnings is not None, raw, "payouts"),
    }
    out["summary"] = {
        "daemon_up": out["daemon_up"],
        "peer_id": status.get("peer_id"),
        "network": status.get("network"),
        "uptime_s": status.get("uptime_s"),
        "peers": status.get("peers"),
        "adverts_known": status.get("adverts_known"),
        "nodes": sup["nodes"],
        "gpus_total": sup["gpus_total"],
        "gpus_free": sup["gpus_free"],
        "models": len(sup["by_model"]),
        "regions": len(sup["by_region"]),
        "jobs": job_states(raw.jobs, raw.status),
        "clusters": len(out["clusters"]["rows"]),
        "proofs": len(out["proofs"]["rows"]),
        "payouts_paid": sum(1 for p in pay_rows if p["paid"]),
        "paid_total": _paid_totals(pay_rows),
        "rejections": dict(status.get("rejections") or {}),
        "missing_methods": sorted(raw.missing),
        "as_of_ms": now_ms,
        "version": version,
    }
    return out


def from_jobs(job_rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]] | None:
    """The ``key`` lists of every job row (each item tagged with its job id), or None if no row has one."""
    if not any(isinstance(j.get(key), list) for j in job_rows):
        return None
    out = []
    for j in job_rows:
        for item in j.get(key) or []:
            if isinstance(item, dict) and item.get("proof_hash"):
                out.append({"job_id": j.get("job_id"), **item})
    return out[:rows_max]


def _with_payouts(job_rows: list[dict[str, Any]], pay_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each job with how many of its payouts a ledger transaction settled (``payouts_paid`` of ``payouts_total``)."""
    counts: dict[str, list[int]] = {}
    for p in pay_rows:
        c = counts.setdefault(str(p.get("job_id")), [0, 0])
        c[0] += 1 if p["paid"] else 0
        c[1] += 1
    return [{**j, "payouts_paid": counts.get(str(j["job_id"]), [0, 0])[0],
             "payouts_total": counts.get(str(j["job_id"]), [0, 0])[1]} for j in job_rows]


def _paid_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Amounts paid by currency: only rows with a ledger transaction."""
    out: dict[str, int] = {}
    for r in rows:
        if r["paid"]:
            cur = str(r.get("currency") or "SOL")
            out[cur] = out.get(cur, 0) + _int(r.get("amount"))
    return dict(sorted(out.items()))
