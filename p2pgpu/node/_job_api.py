"""Control API methods for jobs: submit (or explain), status, list, cancel, logs.

``job.submit`` takes the manifest's TOML text, parses it on the daemon (so
the payer defaults to this node's wallet and the nonce comes from the node's
RNG), signs it with the node's identity and hands it to the submitter core;
with ``dry_run`` it publishes nothing and explains, requirement by
requirement, how many known peers match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pgpu.core import Requirement, explain
from p2pgpu.core._manifest import ManifestError, manifest_from_toml, sign_manifest

from ._control import ControlError

if TYPE_CHECKING:
    from ._daemon import Node

manifest_text_bytes_max = 512 * 1024

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


def _payer_address(node: "Node") -> str | None:
    if node.home is None:
        return None
    from p2pgpu.solana._keys import load_or_create_keypair, payer_keypair_path  # noqa: PLC0415

    return str(load_or_create_keypair(payer_keypair_path(node.home.path, node.config.extra)).pubkey())


def job_handlers(node: "Node") -> dict[str, Any]:
    jobs = node.jobs

    async def submit(params: dict[str, Any]) -> dict[str, Any]:
        text = params.get("manifest")
        if not isinstance(text, str) or not text.strip():
            raise ControlError("manifest (the TOML text) is required")
        if len(text.encode()) > manifest_text_bytes_max:
            raise ControlError(f"manifest larger than {manifest_text_bytes_max} bytes")
        now = node.now_ms()
        try:
            manifest = manifest_from_toml(text, submitter=node.identity.peer_id, now_ms=now, rng=node.rng,
                                          payer=_payer_address(node))
        except ManifestError as exc:
            raise ControlError(f"manifest: {exc}") from None
        if params.get("dry_run"):
            return dry_run(node, manifest)
        sm = sign_manifest(node.identity, manifest)
        jobs.submit(sm)
        return {"job_id": sm.job_id, "members": manifest.members, "name": manifest.name}

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        job_id = params.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ControlError("job_id is required")
        doc = jobs.status(job_id)
        if doc is None:
            raise ControlError(f"no job {job_id} is known to this node (see `p2pgpu job list`)")
        return doc

    async def list_jobs(params: dict[str, Any]) -> list[dict[str, Any]]:
        recs = sorted((r for r in jobs.records.values() if r.roles), key=lambda r: (r.seen_at_ms, r.job_id))
        return [r.to_json() for r in recs]

    async def cancel(params: dict[str, Any]) -> dict[str, Any]:
        job_id = params.get("job_id")
        if not isinstance(job_id, str) or job_id not in jobs.submitter.jobs:
            raise ControlError(f"no job {job_id} was submitted by this node; only its submitter can cancel it")
        jobs.cancel(job_id)
        return jobs.status(job_id) or {}

    async def logs(params: dict[str, Any]) -> list[dict[str, Any]]:
        job_id = params.get("job_id")
        if not isinstance(job_id, str):
            raise ControlError("job_id is required")
        return jobs.logs_of(job_id)

    async def results(params: dict[str, Any]) -> dict[str, Any]:
        from pathlib import Path  # noqa: PLC0415

        from ._results import ResultsError, fetch_results  # noqa: PLC0415

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
        from p2pgpu.store import proofs_of  # noqa: PLC0415

        job_id = params.get("job_id")
        return proofs_of(_db(), job_id if isinstance(job_id, str) else None)

    async def payouts(params: dict[str, Any]) -> list[dict[str, Any]]:
        from p2pgpu.store import payouts as payout_rows  # noqa: PLC0415

        return payout_rows(_db())

    async def earnings(params: dict[str, Any]) -> list[dict[str, Any]]:
        from p2pgpu.store import earnings as earning_rows  # noqa: PLC0415

        return earning_rows(_db())

    async def inclusion(params: dict[str, Any]) -> dict[str, Any]:
        proof_hash = params.get("proof_hash")
        if not isinstance(proof_hash, str) or len(proof_hash) != 64:
            raise ControlError("proof_hash (64 hex characters) is required")
        doc = inclusion_doc(_db(), proof_hash)
        if doc is None:
            raise ControlError(f"proof {proof_hash[:16]} is not in any payout batch of this node")
        return doc

    return {"proofs": proofs, "payouts": payouts, "earnings": earnings, "proof.inclusion": inclusion,
            "wallet": wallet, "job.results": results, "job.submit": submit, "job.status": status, "job.list": list_jobs, "job.cancel": cancel,
            "job.logs": logs}


def inclusion_doc(db: Any, proof_hash: str) -> dict[str, Any] | None:
    """The Merkle inclusion proof of a paid proof hash in the batch that paid
    it, with that transaction's signature (as ``p2pgpu proof inclusion``)."""
    from p2pgpu.core._payout import inclusion_proof  # noqa: PLC0415
    from p2pgpu.store import batch_of_proof, batch_plan  # noqa: PLC0415

    try:
        found = batch_of_proof(db, proof_hash)
    except ValueError:
        return None
    if found is None:
        return None
    batch_id, signature, state = found
    proof = inclusion_proof(batch_plan(db, batch_id).proof_hashes, bytes.fromhex(proof_hash))
    return {**proof.to_json(), "tx_signature": signature, "batch_state": state}


def dry_run(node: "Node", manifest: Any) -> dict[str, Any]:
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
