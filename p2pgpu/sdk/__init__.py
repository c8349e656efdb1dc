"""The Python SDK of p2pgpu: drive a node daemon from Python (docs/sdk.md).

``Client`` is synchronous (the ``p2pgpu`` command is written on it);
``AsyncClient`` has the same methods as coroutines for trio code.  Both talk
to the daemon of a node home over its local control API (127.0.0.1 and the
home's token), so they need the home, never the node's keys::

    from p2pgpu import Client

    client = Client("~/.p2pgpu")
    job = client.submit("examples/jobs/hello.toml")
    status = job.wait(progress=lambda p: print(p.line))
    for line in job.logs():
        print(line.line)
    job.results("out/")

Every error is a :class:`P2pgpuError`; the subclasses say who is at fault
(see ``_errors.py``).
"""

from ._async import AsyncClient, AsyncJob
from ._client import Client, Job
from ._errors import (
    BadManifest,
    DaemonNotRunning,
    JobFailed,
    MethodUnavailable,
    P2pgpuError,
    RequestRefused,
    ResultsMismatch,
    Timeout,
    UnknownJob,
)
from ._local import LedgerUnreachable
from ._model import FINAL_STATES, JobStatus, LogLine, Progress, ResultFile

__all__ = [
    "FINAL_STATES",
    "AsyncClient",
    "AsyncJob",
    "BadManifest",
    "Client",
    "DaemonNotRunning",
    "Job",
    "JobFailed",
    "JobStatus",
    "LedgerUnreachable",
    "LogLine",
    "MethodUnavailable",
    "P2pgpuError",
    "Progress",
    "RequestRefused",
    "ResultFile",
    "ResultsMismatch",
    "Timeout",
    "UnknownJob",
]
