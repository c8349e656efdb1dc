"""The public mode: what a stranger may see, and how often they may ask.

``p2pgpu explorer --public --bind ADDR`` serves the explorer to the world.
Three rules, each a pure piece here and each tested on its own:

* **Only what is public.** :func:`public_views` keeps, per panel, a fixed
  list of fields that signed adverts, certificates, proofs and ledger
  transactions already make public (peer ids, GPUs, regions, prices,
  clusters, proof hashes, amounts paid and their transaction signatures).
  Everything else is dropped: the daemon's error texts (they name local
  paths), job reasons, outputs, logs, exit codes, payout errors, what this
  node still *expects* to earn.  A field a newer daemon adds is therefore
  never exposed by accident.  Nothing the explorer serves in public needs
  the control token; routes that would (``/metrics``, which re-exports the
  daemon's counters) are not served, and the proof check never calls the
  daemon (``ProofChecker(use_daemon=False)``).
* **Rate limits.** :class:`RateLimiter`: a token bucket per client address
  (``requests_per_s`` refilled, ``burst`` at most), a bounded table of
  addresses (the oldest forgotten first), and at most ``streams_per_client``
  open event streams per address.  The address is the TCP peer: headers
  such as ``X-Forwarded-For`` are not trusted.
* **Every hostile string escaped.** The page writes network text only with
  ``textContent``; plots are SVG built by ``_plots.text``; JSON is JSON; and
  :data:`SECURITY_HEADERS` (a strict Content-Security-Policy with no inline
  script or style, ``nosniff``, no framing, no referrer) go on every
  response, in both modes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

#: The fields each panel's rows keep in public.
PUBLIC_FIELDS: dict[str, tuple[str, ...]] = {
    "nodes": ("peer_id", "self", "connected", "region", "gpus", "gpus_total", "gpus_free", "price", "currency",
              "simulated", "expires_at", "payout_address"),
    "clusters": ("job_id", "name", "certificate_hash", "members", "state", "formation_ms"),
    "jobs": ("job_id", "name", "state", "roles", "submitter", "nodes", "replicas", "runtime", "members",
             "certificate_hash", "formation_ms", "payouts_paid", "payouts_total"),
    "proofs": ("proof_hash", "job_id", "peer_id", "worker", "gpu_ms", "status", "amount", "currency", "paid",
               "tx_signature"),
    "payouts": ("proof_hash", "job_id", "side", "worker", "payout_address", "amount", "currency", "status",
                "tx_signature", "paid", "paid_ms"),
}
SUMMARY_FIELDS = ("daemon_up", "peer_id", "network", "uptime_s", "peers", "adverts_known", "nodes", "gpus_total",
                  "gpus_free", "models", "regions", "jobs", "clusters", "proofs", "payouts_paid", "paid_total",
                  "as_of_ms", "version")
_PANEL_META = ("available", "missing_methods")


def _pick(row: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row}


def public_views(views: Mapping[str, Any]) -> dict[str, Any]:
    """The views with only public fields (a new dict; ``views`` is not changed)."""
    out: dict[str, Any] = {"version": views["version"], "as_of_ms": views["as_of_ms"], "public": True,
                           "daemon_up": views["daemon_up"], "errors": {},
                           "missing_methods": list(views.get("missing_methods", []))}
    for name, keys in PUBLIC_FIELDS.items():
        panel = views[name]
        out[name] = {**_pick(panel, _PANEL_META), "rows": [_pick(r, keys) for r in panel["rows"]]}
    out["supply"] = dict(views["supply"])  # aggregates of signed adverts: public as they are
    out["summary"] = _pick(views["summary"], SUMMARY_FIELDS)
    net = dict(views["network"])
    net["earnings"] = [{"t_ms": p["t_ms"], "paid": p["paid"]} for p in net.get("earnings", [])]
    out["network"] = net
    return out


@dataclass
class RateLimiter:
    """Token buckets per client address; ``now_s`` is passed in (no clock here)."""

    requests_per_s: float = 10.0
    burst: float = 40.0
    clients_max: int = 4096
    streams_per_client: int = 4
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)
    _streams: dict[str, int] = field(default_factory=dict)
    refused: int = 0

    def allow(self, client: str, now_s: float) -> bool:
        """Take one token for ``client``; False (and counted) when it has none left."""
        tokens, last = self._buckets.pop(client, (self.burst, now_s))
        tokens = min(self.burst, tokens + max(0.0, now_s - last) * self.requests_per_s)
        ok = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if ok else tokens, now_s)
        while len(self._buckets) > self.clients_max:
            self._buckets.popitem(last=False)  # the least recently seen client starts afresh
        if not ok:
            self.refused += 1
        return ok

    def may_open_stream(self, client: str) -> bool:
        return self._streams.get(client, 0) < self.streams_per_client

    def open_stream(self, client: str) -> None:
        self._streams[client] = self._streams.get(client, 0) + 1

    def close_stream(self, client: str) -> None:
        n = self._streams.get(client, 0) - 1
        if n > 0:
            self._streams[client] = n
        else:
            self._streams.pop(client, None)
