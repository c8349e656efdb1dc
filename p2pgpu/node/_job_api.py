"""Control API methods for jobs: submit (or explain), status, list, cancel, logs.

``job.submit`` takes the manifest's TOML text (or the same document as a JSON
object, from the Python SDK), parses it on the daemon (so
the payer defaults to this node's wallet and the nonce comes from the node's
RNG), signs it with the node's identity and hands it to the submitter core;
with ``dry_run`` it publishes nothing and explains, requirement by
requirement, how many known peers match.

Refusals carry a machine-readable ``code`` beside the message (see
``ControlError``): ``bad_manifest`` (with ``details.field``), ``unknown_job``
(with ``details.job_id``), ``not_submitter``, ``bad_params``; the SDK
(``p2pgpu/sdk``) turns each into its own exception type.  ``market.match``
(the market filtered by a manifest's requirements) and ``network.jobs`` (every
job this node has seen, with its cluster where a confirmation was seen: the
explorer's network view) are read-only and bounded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from p2pgpu.core import Requirement, explain, matching
from p2pgpu.core._manifest import (
    Manifest,
    ManifestError,
    interval_s_default,
    manifest_from_doc,
    sign_manifest,
    toml_doc,
)

from ._control import ControlError
from ._jobs import network_ended_max, network_summary

if TYPE_CHECKING:
    from ._ports import NodePorts as Node

manifest_text_bytes_max = 512 * 1024
#: Log lines per ``job.logs`` answer (a follower asks again from where it stopped).
log_lines_per_call_max = 5_000
#: Rows per ``network.jobs`` answer (as many as the jobs service keeps of
#: ended jobs of ours that left memory).
network_jobs_max = network_ended_max
#: A market query's price ceiling when it names none: no ceiling.
_NO_PRICE_CEILING = 2**62
_MATCH_KEYS = {"nodes", "gpus_per_node", "vram_gb_min", "memory_mb_min", "models", "compute_capability_min",
               "regions", "allow_simulated"}

_REQUIREMENT_WORDS = {
    Requirement.NETWORK_RULES: "simulated GPUs allowed",
    Requirement.RUNTIME: "runtime",
    Requirement.REGION: "region",
    Requirement.CURRENCY: "currency",
    Requirement.PRICE: "price per GPU-hour within the ceiling",
    Requirement.MODEL: "GPU model",
    Requirement.VRAM: "GPU memory",
    Requirement.COMPUTE_CAPABILITY: "compute capability",
    Requirement.GPUS_PER_NODE: "GPUs per node",
    Requirement.FREE_GPUS: "enough free GPUs now",
}


def _payer_address(node: Node) -> str | None:
    return node.wallet.payer_address if node.home is not None else None


def payment_interval_s_default(node: Node) -> int:
    """The pay-as-you-go interval of a manifest that names none (``payment_interval_s``
    in config.toml; the devnet writes a short one)."""
    value = node.config.extra.get("payment_interval_s", interval_s_default)
    return value if type(value) is int and value >= 0 else interval_s_default


def job_handlers(node: Node) -> dict[str, Any]:
    jobs = node.jobs

    async def submit(params: dict[str, Any]) -> dict[str, Any]:
        text = params.get("manifest")
        if isinstance(text, dict):
            # The SDK's dict form; the control request itself is already capped in size.
            parse: Any = manifest_from_doc
        elif isinstance(text, str) and text.strip():
            if len(text.encode()) > manifest_text_bytes_max:
                raise ControlError(f"manifest larger than {manifest_text_bytes_max} bytes", code="bad_manifest",
                                   details={"field": "manifest"})
            try:
                text = toml_doc(text)  # depth-checked; local file inputs are resolved on the document
            except ManifestError as exc:
                raise ControlError(f"manifest: {exc}", code="bad_manifest",
                                   details={"field": exc.field, "problem": exc.message}) from None
            parse = manifest_from_doc
        else:
            raise ControlError("manifest (the TOML text, or the same document as an object) is required",
                               code="bad_manifest", details={"field": "manifest"})
        from ._inputs import import_local_inputs, local_input_paths

        local: list[str] = []
        if local_input_paths(text) and not params.get("dry_run"):
            try:
                local = await trio.to_thread.run_sync(import_local_inputs, node, text)
            except ValueError as exc:
                field = str(exc).split(":", 1)[0]
                raise ControlError(f"manifest: {exc}", code="bad_manifest",
                                   details={"field": field, "problem": str(exc)}) from None
        elif local_input_paths(text):
            for name, _spec in local_input_paths(text):  # a dry run reads no file: a placeholder name
                text["inputs"][name] = {"sha256": "0" * 64, "size_bytes": 0}
        now = node.now_ms()
        try:
            manifest = parse(text, submitter=node.identity.peer_id, now_ms=now, rng=node.rng,
                             payer=_payer_address(node), interval_s_default=payment_interval_s_default(node))
        except ManifestError as exc:
            raise ControlError(f"manifest: {exc}", code="bad_manifest",
                               details={"field": exc.field, "problem": exc.message}) from None
        if params.get("dry_run"):
            return dry_run(node, manifest)
        sm = sign_manifest(node.identity, manifest)
        jobs.submit(sm)
        if local:
            from ._inputs import pin_local_inputs

            pin_local_inputs(node, sm, local)  # until the job ends (_inputs.input_pins_loop)
        if node.blobs is not None and getattr(node, "_nursery", None) is not None:
            for sha in local:
                node._nursery.start_soon(node.blobs.announce, sha)
        doc: dict[str, Any] = {"job_id": sm.job_id, "members": manifest.members, "name": manifest.name}
        by_hash = [{"name": i.name, "size_bytes": i.size_bytes, **({"cid": i.cid} if i.cid else {"sha256": i.sha256})}
                   for i in manifest.inputs if i.data is None]
        if by_hash:  # added only when there are some: scripts compare the keys
            doc["inputs"] = by_hash
        return doc

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        job_id = params.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ControlError("job_id is required")
        doc = jobs.status(job_id)
        if doc is None:
            raise _unknown(job_id)
        rec = jobs.record(doc["job_id"])
        if rec is not None and node.blobs is not None:
            doc["inputs"] = input_transfers(node, rec)
        if doc["state"] == "failed" and not doc["cluster"]["members"] and "submitter" in doc["roles"]:
            # Formation failed: say, against the market as it is now, which
            # requirement leaves too few peers (e.g. none can run the runtime).
            rec = jobs.record(doc["job_id"])
            if rec is not None:
                doc["explain"] = dry_run(node, rec.manifest.manifest)
        return doc

    async def list_jobs(params: dict[str, Any]) -> list[dict[str, Any]]:
        return jobs.listed()

    async def cancel(params: dict[str, Any]) -> dict[str, Any]:
        job_id = params.get("job_id")
        if not isinstance(job_id, str):
            raise ControlError("job_id is required", code="bad_params")
        if job_id not in jobs.submitter.jobs:
            if jobs.record(job_id) is None:
                raise _unknown(job_id)
            raise ControlError(f"job {job_id} was not submitted by this node; only its submitter can cancel it",
                               code="not_submitter", details={"job_id": job_id})
        jobs.cancel(job_id)
        return jobs.status(job_id) or {}

    async def logs(params: dict[str, Any]) -> list[dict[str, Any]]:
        job_id = params.get("job_id")
        if not isinstance(job_id, str):
            raise ControlError("job_id is required", code="bad_params")
        since = params.get("since", 0)
        limit = params.get("limit", log_lines_per_call_max)
        if type(since) is not int or since < 0 or type(limit) is not int or not 1 <= limit <= log_lines_per_call_max:
            raise ControlError(f"since must be a whole number >= 0 and limit between 1 and {log_lines_per_call_max}",
                               code="bad_params")
        lines = jobs.logs_of(job_id)
        if not lines and jobs.record(job_id) is None:
            raise _unknown(job_id)
        return lines[since:since + limit]

    async def results(params: dict[str, Any]) -> dict[str, Any]:
        from pathlib import Path

        from ._outputs_blobs import fetch_results_any as fetch_results
        from ._results import ResultsError

        job_id, out = params.get("job_id"), params.get("out")
        if not isinstance(job_id, str) or not isinstance(out, str) or not out:
            raise ControlError("job_id and out (a directory) are required")
        try:
            files = await fetch_results(node, job_id, Path(out))
        except ResultsError as exc:
            raise ControlError(str(exc)) from None
        except OSError as exc:
            raise ControlError(f"cannot write into {out}: {exc.strerror}") from None
        return {"job_id": job_id, "out": out, "files": files}

    async def wallet(params: dict[str, Any]) -> dict[str, Any]:
        return {"address": _payer_address(node) or "", "payout_address": node.payout_address,
                "ledger": node.ledger_spec}

    def _db() -> Any:
        if jobs.db is None:
            raise ControlError("this node has no store (no home)")
        return jobs.db

    async def proofs(params: dict[str, Any]) -> list[dict[str, Any]]:
        from p2pgpu.store import proofs_of

        job_id = params.get("job_id")
        return proofs_of(_db(), job_id if isinstance(job_id, str) else None)

    async def payouts(params: dict[str, Any]) -> list[dict[str, Any]]:
        from p2pgpu.store import payouts as payout_rows

        return payout_rows(_db())

    async def earnings(params: dict[str, Any]) -> list[dict[str, Any]]:
        from p2pgpu.store import earnings as earning_rows

        return earning_rows(_db())

    async def inclusion(params: dict[str, Any]) -> dict[str, Any]:
        proof_hash = params.get("proof_hash")
        if not isinstance(proof_hash, str) or len(proof_hash) != 64:
            raise ControlError("proof_hash (64 hex characters) is required")
        doc = inclusion_doc(_db(), proof_hash)
        if doc is None:
            raise ControlError(f"proof {proof_hash[:16]} is not in any payout batch of this node")
        return doc

    async def market_match(params: dict[str, Any]) -> list[dict[str, Any]]:
        from ._market import market_row

        manifest = requirements_manifest(node, params.get("requirements"))
        return [market_row(a) for a in matching(node.book.live(node.now_ms()), manifest.requirements)]

    async def network_jobs(params: dict[str, Any]) -> list[dict[str, Any]]:
        limit = params.get("limit", network_jobs_max)
        if type(limit) is not int or not 1 <= limit <= network_jobs_max:
            raise ControlError(f"limit must be between 1 and {network_jobs_max}", code="bad_params")
        rows = {r.job_id: network_row(node, r) for r in jobs.records.values()}
        # Our ended jobs left memory for the store (#13); their rows were kept.
        for job_id, row in jobs.network_ended.items():
            rows.setdefault(job_id, row)
        return sorted(rows.values(), key=lambda r: (-r["seen_at_ms"], r["job_id"]))[:limit]

    return {"market.match": market_match, "network.jobs": network_jobs,
            "proofs": proofs, "payouts": payouts, "earnings": earnings, "proof.inclusion": inclusion,
            "wallet": wallet, "job.results": results, "job.submit": submit, "job.status": status, "job.list": list_jobs, "job.cancel": cancel,
            "job.logs": logs}


def input_transfers(node: Node, rec: Any) -> list[dict[str, Any]]:
    """Where each by-hash input stands on this node: bytes served to peers
    (the submitter, members that hold it), bytes fetched so far, held."""
    blobs = node.blobs
    assert blobs is not None
    out = []
    for i in rec.manifest.manifest.inputs:
        if i.data is not None:
            continue
        if i.cid:  # fetched over Bitswap, not served by us (docs/manifest.md, "Inputs by IPFS CID")
            out.append({"name": i.name, "cid": i.cid, "size_bytes": i.size_bytes})
            continue
        fetched = blobs.fetching.get(i.sha256)
        held = blobs.store.has(i.sha256)
        out.append({"name": i.name, "sha256": i.sha256, "size_bytes": i.size_bytes,
                    "served_bytes": blobs.served.get(i.sha256, 0),
                    "fetched_bytes": i.size_bytes if held else (fetched[0] if fetched else 0), "held": held})
    return out


def inclusion_doc(db: Any, proof_hash: str) -> dict[str, Any] | None:
    """The Merkle inclusion proof of a paid proof hash in the batch that paid
    it, with that transaction's signature (as ``p2pgpu proof inclusion``)."""
    from p2pgpu.core._payout import inclusion_proof
    from p2pgpu.store import batch_of_proof, batch_plan

    try:
        found = batch_of_proof(db, proof_hash)
    except ValueError:
        return None
    if found is None:
        return None
    batch_id, signature, state = found
    proof = inclusion_proof(batch_plan(db, batch_id).proof_hashes, bytes.fromhex(proof_hash))
    return {**proof.to_json(), "tx_signature": signature, "batch_state": state}


def dry_run(node: Node, manifest: Any) -> dict[str, Any]:
    req = manifest.requirements
    ex = explain(node.book.live(node.now_ms()), req)
    steps = [{"requirement": r.value, "what": _REQUIREMENT_WORDS[r], "peers_passing": n}
             for r, n in ex.passing_after]
    return {
        "dry_run": True,
        "known_peers": ex.known,
        "requirements": steps,
        "matching_peers": list(ex.matched),
        "members_needed": manifest.members,
        "enough": len(ex.matched) >= manifest.members,
        "excluded_by": {pid: r.value for pid, r in sorted(ex.excluded_by.items())},
    }


def _unknown(job_id: str) -> ControlError:
    return ControlError(f"no job {job_id} is known to this node (see `p2pgpu job list`)", code="unknown_job",
                        details={"job_id": job_id})


def requirements_manifest(node: Node, req: Any) -> Manifest:
    """A manifest around a market query's requirements (the ``[requirements]``
    keys plus ``runtime``, ``price_per_gpu_hour_max`` and ``currency``), checked
    by the manifest's own parser so errors name the same fields."""
    if req is None:
        req = {}
    if not isinstance(req, dict):
        raise ControlError("requirements must be an object", code="bad_params")
    extra = sorted(set(req) - _MATCH_KEYS - {"runtime", "price_per_gpu_hour_max", "currency"})
    if extra:
        raise ControlError(f"requirements.{extra[0]}: unknown field", code="bad_manifest",
                           details={"field": f"requirements.{extra[0]}", "problem": "unknown field"})
    doc = {"requirements": {k: v for k, v in req.items() if k in _MATCH_KEYS},
           "runtime": {"command": ["true"], "kind": req.get("runtime", "process")},
           "payment": {"price_per_gpu_hour_max": req.get("price_per_gpu_hour_max", _NO_PRICE_CEILING),
                       "currency": req.get("currency", "SOL"), "payer": "11111111111111111111111111111111"}}
    try:
        return manifest_from_doc(doc, submitter=node.identity.peer_id, now_ms=node.now_ms(), rng=node.rng)
    except ManifestError as exc:
        raise ControlError(f"requirements: {exc}", code="bad_manifest",
                           details={"field": exc.field, "problem": exc.message}) from None


def network_row(node: Node, rec: Any) -> dict[str, Any]:
    """One job this node has seen, whoever submitted it: what the manifest
    asks and, where this node saw the submitter's confirmation, the cluster."""
    members, cert = list(rec.members), rec.certificate
    if not members and node.jobs.formation is not None:
        c = node.jobs.formation.certificate(rec.job_id)
        if c is not None:
            members, cert = list(c.members), c.digest.hex()
    return network_summary(rec, members, cert)
