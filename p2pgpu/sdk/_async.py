"""The trio client: :class:`AsyncClient` and :class:`AsyncJob`.

The same methods as the blocking :class:`~p2pgpu.sdk.Client`, as coroutines
for code that already runs under trio (a bot, a scheduler, the explorer):
``await client.submit(...)``, ``await job.wait(progress=...)``, ``async for
line in job.logs(follow=True)``.  It speaks the same wire over trio sockets
(every read bounded in size and time) and shares every decision with the
blocking client (``_model``: states, progress lines, failure reasons, result
checks; ``_errors``: the typed errors).  Waits use ``trio.sleep``, so they
follow trio's clock (a test may run them on a ``MockClock``) and are
cancellable like any trio code.  Nothing here starts a task of its own.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from p2pgpu.home import Home

from . import _local
from ._client import job_failed, log_lines_per_call, results_timeout_s
from ._errors import DaemonNotRunning, P2pgpuError, Timeout
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
from ._transport import connect_timeout_s, decode_reply, encode_request, endpoint, home_of, reply_bytes_max

ProgressFn = Callable[[Progress], None | Awaitable[None]]


async def acall(home: Home, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0) -> Any:
    """One request over trio sockets: the result, or a :class:`P2pgpuError`."""
    ep = endpoint(home)
    try:
        with trio.fail_after(timeout_s):
            return await _exchange(home, ep, method, params)
    except trio.TooSlowError:
        raise Timeout(f"the daemon of {home.path} did not answer {method} within {timeout_s:g} s") from None


async def _exchange(home: Home, ep: Any, method: str, params: dict[str, Any] | None) -> Any:
    try:
        with trio.fail_after(connect_timeout_s):
            stream = await trio.open_tcp_stream("127.0.0.1", ep.port)
    except (OSError, trio.TooSlowError) as exc:
        raise DaemonNotRunning(f"no daemon answers for {home.path} (port {ep.port}: {exc}); "
                               f"start one with `p2pgpu node run --home {home.path}`", home=str(home.path)) from None
    try:
        await stream.send_all(encode_request(ep, method, params))
        buf = bytearray()
        while True:
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise DaemonNotRunning(f"the daemon of {home.path} closed the connection without answering "
                                           f"{method} (is it stopping?)", home=str(home.path))
                buf += chunk
                if len(buf) > reply_bytes_max:
                    raise P2pgpuError(f"the daemon's reply to {method} is larger than {reply_bytes_max} bytes")
            line, _, rest = bytes(buf).partition(b"\n")
            buf = bytearray(rest)
            final, result = decode_reply(line, method)
            if final:
                return result
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise DaemonNotRunning(f"the daemon of {home.path} closed the connection: {exc}", home=str(home.path)) from None
    finally:
        await stream.aclose()


class AsyncClient:
    """``AsyncClient(home)``: the methods of :class:`~p2pgpu.sdk.Client`, awaitable under trio."""

    def __init__(self, home: str | os.PathLike[str] | Home | None = None, *, timeout_s: float = 30.0) -> None:
        self.home = home_of(home)
        self.timeout_s = timeout_s
        #: Seconds the last call of each method took (the explorer exports them as metrics).
        self.last_latency_s: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"AsyncClient({str(self.home.path)!r})"

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout_s: float | None = None) -> Any:
        started = trio.current_time()
        result = await acall(self.home, method, params, timeout_s=timeout_s or self.timeout_s)
        self.last_latency_s[method] = trio.current_time() - started
        return result

    async def submit(self, manifest: ManifestLike) -> AsyncJob:
        res = await self.call("job.submit", {"manifest": manifest_param(manifest)})
        return AsyncJob(self, str(res["job_id"]), name=str(res.get("name") or ""), submitted=res)

    async def dry_run(self, manifest: ManifestLike) -> dict[str, Any]:
        res: dict[str, Any] = await self.call("job.submit", {"manifest": manifest_param(manifest), "dry_run": True})
        return res

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def jobs(self) -> list[JobStatus]:
        return [JobStatus.from_doc(d) for d in await self.call("job.list") or []]

    async def status(self) -> dict[str, Any]:
        res: dict[str, Any] = await self.call("status")
        return res

    async def peers(self) -> list[dict[str, Any]]:
        return list(await self.call("peers"))

    async def reputation(self, *, fresh: bool = False) -> dict[str, Any]:
        return dict(await self.call("reputation", {"fresh": fresh}))

    async def receipts(self) -> list[dict[str, Any]]:
        return list(await self.call("receipts.list"))

    async def market(self, requirements: Mapping[str, Any] | None = None, *, model: str | None = None,
                     min_vram_gb: float = 0) -> list[dict[str, Any]]:
        if requirements is not None:
            return list(await self.call("market.match", {"requirements": dict(requirements)}))
        return list(await self.call("market", {"model": model, "min_vram_gb": min_vram_gb}))

    async def network_jobs(self, *, limit: int = 500) -> list[dict[str, Any]]:
        return list(await self.call("network.jobs", {"limit": limit}))

    async def payouts(self) -> list[dict[str, Any]]:
        try:
            return list(await self.call("payouts"))
        except DaemonNotRunning:
            return await trio.to_thread.run_sync(_local.store_rows, self.home, "payouts")

    async def earnings(self) -> list[dict[str, Any]]:
        try:
            return list(await self.call("earnings"))
        except DaemonNotRunning:
            return await trio.to_thread.run_sync(_local.store_rows, self.home, "earnings")

    async def wallet(self, *, airdrop_lamports: int | None = None) -> dict[str, Any]:
        return await _local.wallet(self.home, airdrop_lamports=airdrop_lamports)


class AsyncJob:
    """One job on the daemon, for trio code; see :class:`~p2pgpu.sdk.Job`."""

    def __init__(self, client: AsyncClient, job_id: str, *, name: str = "",
                 submitted: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.name = name
        #: The daemon's answer to the submission (``job_id``, ``name``, ``members``), when this object made it.
        self.submitted = submitted or {"job_id": job_id, "name": name}

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobStatus:
        return JobStatus.from_doc(await self.client.call("job.status", {"job_id": self.id}))

    async def wait(self, *, timeout_s: float = 300.0, progress: ProgressFn | None = None,
                   poll_interval_s: float = 0.2, check: bool = True) -> JobStatus:
        """As :meth:`Job.wait`; ``progress`` may be a plain function or a coroutine function."""
        last = ""
        st: JobStatus | None = None
        with trio.move_on_after(timeout_s):
            while True:
                st = await self.status()
                line = progress_line(st.raw)
                if progress is not None and line != last:
                    ret = progress(Progress(job_id=st.job_id, state=st.state, line=line, status=st))
                    if ret is not None:
                        await ret
                last = line
                if st.done:
                    if check and not st.succeeded:
                        raise job_failed(st)
                    return st
                await trio.sleep(poll_interval_s)
        state = st.state if st is not None else "unknown"
        raise Timeout(f"job {self.id[:12]} still {state} after {timeout_s:g} s; "
                      f"follow it with `p2pgpu job status {self.id}`")

    async def logs(self, *, follow: bool = False, poll_interval_s: float = 0.3) -> AsyncIterator[LogLine]:
        since = 0
        while True:
            batch = await self.client.call("job.logs", {"job_id": self.id, "since": since,
                                                        "limit": log_lines_per_call})
            for d in batch:
                yield LogLine.from_doc(d)
            since += len(batch)
            if len(batch) >= log_lines_per_call:
                continue
            if not follow:
                return
            if (await self.status()).done:
                for d in await self.client.call("job.logs", {"job_id": self.id, "since": since,
                                                             "limit": log_lines_per_call}):
                    yield LogLine.from_doc(d)
                return
            await trio.sleep(poll_interval_s)

    async def results(self, dest: str | os.PathLike[str]) -> list[ResultFile]:
        out = Path(dest).expanduser().resolve()
        res = await self.client.call("job.results", {"job_id": self.id, "out": str(out)},
                                     timeout_s=results_timeout_s)
        files = result_files(res)
        for f in files:
            await trio.to_thread.run_sync(lambda f=f: check_result_file(f.saved_as, sha256=f.sha256,
                                                                        size_bytes=f.size_bytes))
        return files

    async def cancel(self) -> JobStatus:
        return JobStatus.from_doc(await self.client.call("job.cancel", {"job_id": self.id}))
