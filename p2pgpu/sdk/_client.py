"""The synchronous client: :class:`Client` and the :class:`Job` it returns.

A thin layer over the daemon's control API (``_transport.call``) that turns
its documents into typed objects (``_model``) and its refusals into typed
exceptions (``_errors``).  Everything a job does happens in the daemon; the
client only asks, so it can stop and start again, and several clients (the
CLI, a script, the explorer) can follow one job at once.  Waiting and
following poll the daemon at a fixed interval, each call bounded in time.

The CLI is written on this class: ``p2pgpu job ...``, ``status``, ``peers``,
``market``, ``payouts``, ``earnings`` and ``wallet`` are each one call here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from p2pgpu.home import Home

from . import _local
from ._errors import DaemonNotRunning, JobFailed, Timeout
from ._inputs import InputProgress, with_local_inputs
from ._model import (
    JobStatus,
    LogLine,
    ManifestLike,
    Progress,
    ResultFile,
    check_result_file,
    manifest_param,
    progress_line,
    result_files,
)
from ._transport import call, home_of

#: ``job.logs`` lines per request (the daemon's own cap).
log_lines_per_call = 5_000
#: How long one ``job results`` may take: it fetches every member's files.
results_timeout_s = 3600.0
#: The slowest rate at which a daemon is expected to copy a local input into its store.
local_import_bytes_per_s = 20 << 20


def _manifest_dir(manifest: ManifestLike) -> Path | None:
    """The directory of a manifest given as a file (relative input paths start there)."""
    if isinstance(manifest, os.PathLike) or (isinstance(manifest, str) and "\n" not in manifest
                                             and "=" not in manifest):
        p = Path(manifest).expanduser()
        if p.is_file():
            return p.resolve().parent
    return None


class Client:
    """A node daemon, through its control API on 127.0.0.1.

    ``Client()`` uses ``$P2PGPU_HOME``, else ``~/.p2pgpu``; ``Client("/path/to/home")``
    another home.  ``timeout_s`` bounds each request (not a job's run: see
    :meth:`Job.wait`)."""

    def __init__(self, home: str | os.PathLike[str] | Home | None = None, *, timeout_s: float = 30.0) -> None:
        self.home = home_of(home)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"Client({str(self.home.path)!r})"

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any:
        """One control method, as it is: the escape hatch for methods this class does not wrap."""
        return call(self.home, method, params, timeout_s=timeout_s or self.timeout_s)

    # ------------------------------------------------------------------ jobs

    def submit(self, manifest: ManifestLike, *, inputs: Mapping[str, str | os.PathLike[str]] | None = None,
               progress: InputProgress | None = None) -> Job:
        """Sign (with the node's identity) and publish a job.

        ``manifest`` is a path to a manifest file, its TOML text, or the same
        document as a dict (``{"requirements": {...}, "runtime": {...}, ...}``).
        ``inputs`` adds local files (``{"data.bin": "/path/to/file"}``), as
        ``{ path = "..." }`` does in the manifest: each is hashed here
        (``progress(name, done_bytes, total_bytes)``), copied into the node's
        content store and served from there to the job's members.
        Raises :class:`BadManifest` naming the field at fault."""
        param = manifest_param(manifest)
        base = _manifest_dir(manifest)
        param, local_bytes = with_local_inputs(param, inputs, base, progress)
        # The daemon copies and re-hashes local files before it answers.
        timeout = self.timeout_s + local_bytes / local_import_bytes_per_s
        res = self.call("job.submit", {"manifest": param}, timeout_s=timeout)
        return Job(self, str(res["job_id"]), name=str(res.get("name") or ""), submitted=res)

    def dry_run(self, manifest: ManifestLike) -> dict[str, Any]:
        """Publish nothing; explain, requirement by requirement, how many known peers match
        (``enough`` says whether they are enough)."""
        res: dict[str, Any] = self.call("job.submit", {"manifest": manifest_param(manifest), "dry_run": True})
        return res

    def job(self, job_id: str) -> Job:
        """A job by id (or a unique prefix of 6+ characters) without asking the daemon yet."""
        return Job(self, job_id)

    def jobs(self) -> list[JobStatus]:
        """Jobs this node submitted or worked on, oldest first."""
        return [JobStatus.from_doc(d) for d in self.call("job.list") or []]

    # -------------------------------------------------------- the node, market

    def status(self) -> dict[str, Any]:
        """The daemon's status (``peer_id``, ``addrs``, ``peers``, ``adverts_known``, ``jobs``, ``uptime_s``, ...)."""
        res: dict[str, Any] = self.call("status")
        return res

    def peers(self) -> list[dict[str, Any]]:
        """Connected peers: ``peer_id``, ``addrs``, ``latency_ms``, and
        ``reputation`` (the peer's score and its evidence, docs/reputation.md)."""
        res: list[dict[str, Any]] = self.call("peers")
        return res

    def reputation(self, *, fresh: bool = False) -> dict[str, Any]:
        """Every peer's score from the receipts this node holds:
        ``computed_at_ms``, ``scores``, ``refused`` (docs/reputation.md)."""
        res: dict[str, Any] = self.call("reputation", {"fresh": fresh})
        return res

    def receipts(self) -> list[dict[str, Any]]:
        """The receipts this node holds (``kind``, ``digest``, ``job_id``,
        ``signer``, ``at_ms``, ``ours``, ``wire`` as hex): a copy anyone can
        recompute the scores from."""
        res: list[dict[str, Any]] = self.call("receipts.list")
        return res

    def market(self, requirements: Mapping[str, Any] | None = None, *, model: str | None = None,
               min_vram_gb: float = 0) -> list[dict[str, Any]]:
        """GPU supply this node knows of, one row per advertising peer.

        ``requirements`` takes the keys of a manifest's ``[requirements]`` table
        (``gpus_per_node``, ``vram_gb_min``, ``models``, ``compute_capability_min``,
        ``regions``, ...) plus ``runtime``, ``price_per_gpu_hour_max`` and
        ``currency``, and keeps the peers that could serve such a job now;
        ``model`` and ``min_vram_gb`` are the CLI's simpler filters."""
        if requirements is not None:
            rows: list[dict[str, Any]] = self.call("market.match", {"requirements": dict(requirements)})
            return rows
        return list(self.call("market", {"model": model, "min_vram_gb": min_vram_gb}))

    def network_jobs(self, *, limit: int = 500) -> list[dict[str, Any]]:
        """Every job this node has seen on the network, newest first, with its cluster where known."""
        return list(self.call("network.jobs", {"limit": limit}))

    # ------------------------------------------------------------ money

    def payouts(self) -> list[dict[str, Any]]:
        """What this node owes and paid (works without a daemon: read from the home's store)."""
        try:
            return list(self.call("payouts"))
        except DaemonNotRunning:
            return _local.store_rows(self.home, "payouts")

    def earnings(self) -> list[dict[str, Any]]:
        """Proofs this node produced and what each was paid (works without a daemon)."""
        try:
            return list(self.call("earnings"))
        except DaemonNotRunning:
            return _local.store_rows(self.home, "earnings")

    def wallet(self, *, airdrop_lamports: int | None = None) -> dict[str, Any]:
        """The payer address and its balance on the home's ledger (``address``, ``balance``
        in lamports, ``ledger``); ``airdrop_lamports`` first asks a local ledger for funds."""
        import trio

        return trio.run(lambda: _local.wallet(self.home, airdrop_lamports=airdrop_lamports))


class Job:
    """One job on the daemon; every method asks the daemon afresh."""

    def __init__(self, client: Client, job_id: str, *, name: str = "",
                 submitted: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.name = name
        #: The daemon's answer to the submission (``job_id``, ``name``, ``members``), when this object made it.
        self.submitted = submitted or {"job_id": job_id, "name": name}

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """State, cluster, timings, proofs, payouts; :class:`UnknownJob` if the node knows no such job."""
        return JobStatus.from_doc(self.client.call("job.status", {"job_id": self.id}))

    def wait(self, *, timeout_s: float = 300.0, progress: Callable[[Progress], None] | None = None,
             poll_interval_s: float = 0.2, check: bool = True) -> JobStatus:
        """Follow the job until it ends; return its final status.

        ``progress(p)`` is called each time the job's progress line changes.
        With ``check`` (the default) a job that did not succeed raises
        :class:`JobFailed` carrying its ``reason``; :class:`Timeout` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            st = self.status()
            line = progress_line(st.raw)
            if progress is not None and line != last:
                progress(Progress(job_id=st.job_id, state=st.state, line=line, status=st))
            last = line
            if st.done:
                if check and not st.succeeded:
                    raise job_failed(st)
                return st
            if time.monotonic() > deadline:
                raise Timeout(f"job {self.id[:12]} still {st.state} after {timeout_s:g} s; "
                              f"follow it with `p2pgpu job status {st.job_id or self.id}`")
            time.sleep(poll_interval_s)

    def logs(self, *, follow: bool = False, poll_interval_s: float = 0.3) -> Iterator[LogLine]:
        """The job's output lines (every member's on the submitter's node).

        With ``follow``, keep yielding new lines until the job ends."""
        since = 0
        while True:
            batch = self.client.call("job.logs", {"job_id": self.id, "since": since, "limit": log_lines_per_call})
            for d in batch:
                yield LogLine.from_doc(d)
            since += len(batch)
            if len(batch) >= log_lines_per_call:
                continue  # more are waiting
            if not follow:
                return
            if self.status().done:
                # Lines that arrived between the last read and the end.
                for d in self.client.call("job.logs", {"job_id": self.id, "since": since,
                                                       "limit": log_lines_per_call}):
                    yield LogLine.from_doc(d)
                return
            time.sleep(poll_interval_s)

    def results(self, dest: str | os.PathLike[str]) -> list[ResultFile]:
        """Fetch every member's output files into ``dest/member-<index>/``.

        The daemon refuses any file whose size or sha256 differs from what its
        member committed to; each saved file is hashed again here, and
        :class:`ResultsMismatch` is raised if it differs."""
        out = Path(dest).expanduser().resolve()
        res = self.client.call("job.results", {"job_id": self.id, "out": str(out)}, timeout_s=results_timeout_s)
        files = result_files(res)
        for f in files:
            check_result_file(f.saved_as, sha256=f.sha256, size_bytes=f.size_bytes)
        return files

    def cancel(self) -> JobStatus:
        """Cancel the job (only its submitter's node can): every member stops."""
        return JobStatus.from_doc(self.client.call("job.cancel", {"job_id": self.id}))


def job_failed(st: JobStatus) -> JobFailed:
    return JobFailed(f"job {st.job_id[:12]} {st.state}: {st.reason}", job_id=st.job_id, state=st.state,
                     reason=st.reason, status=st)
