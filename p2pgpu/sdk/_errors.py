"""The SDK's exceptions: one type per thing a caller handles differently.

Every error the SDK raises is a :class:`P2pgpuError` whose message says what
is wrong and what to do, so a script can print ``str(exc)`` as it is (the CLI
does exactly that).  The types say who is at fault:

* the local set-up: :class:`DaemonNotRunning` (start ``p2pgpu node run``);
* the caller's input, refused by the daemon: :class:`BadManifest` (with the
  manifest ``field`` at fault), :class:`UnknownJob`, and the general
  :class:`RequestRefused` (with the daemon's ``code``);
* the job itself: :class:`JobFailed` (with its ``reason`` and the last
  ``status``);
* time: :class:`Timeout` (also a :class:`TimeoutError`);
* the results: :class:`ResultsMismatch` (a file differs from the hash its
  member committed to).

:func:`error_from_reply` maps a refusal from the daemon (``{"ok": false,
"error", "code", "details"}``) to its type; it is pure, so both the blocking
and the trio transport share it.
"""

from __future__ import annotations

from typing import Any


class P2pgpuError(Exception):
    """Base of every SDK error; ``str()`` says what to do."""


class DaemonNotRunning(P2pgpuError):
    """No node daemon answers for this home (none started, or it died)."""

    def __init__(self, message: str, *, home: str = "") -> None:
        super().__init__(message)
        self.home = home


class RequestRefused(P2pgpuError):
    """The daemon refused a request; ``code`` is its machine-readable reason
    (``bad_params``, ``not_submitter``, ... or ``""`` from an older daemon)."""

    def __init__(self, message: str, *, code: str = "", details: dict[str, Any] | None = None,
                 method: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = dict(details or {})
        self.method = method


class BadManifest(RequestRefused):
    """The manifest is wrong; ``field`` names where (``requirements.nodes``, ``toml``, ...)."""

    def __init__(self, message: str, *, field: str, problem: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.field = field
        self.problem = problem


class UnknownJob(RequestRefused):
    """This node knows no job with that id (or prefix)."""

    def __init__(self, message: str, *, job_id: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.job_id = job_id


class MethodUnavailable(RequestRefused):
    """The daemon does not offer this method (it is older than this SDK)."""


class JobFailed(P2pgpuError):
    """The job ended in a state other than ``succeeded``; ``reason`` says why."""

    def __init__(self, message: str, *, job_id: str, state: str, reason: str, status: Any = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.reason = reason
        #: The job's last :class:`~p2pgpu.sdk.JobStatus`.
        self.status = status


class Timeout(P2pgpuError, TimeoutError):
    """Waited longer than allowed (for the daemon's answer, or for a job to end)."""


class ResultsMismatch(P2pgpuError):
    """A result file on disk does not match the size or sha256 its member committed to."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


def error_from_reply(msg: dict[str, Any], method: str) -> RequestRefused:
    """The exception for a daemon's refusal of ``method``."""
    text = str(msg.get("error") or "the daemon refused the request without saying why")
    code = str(msg.get("code") or "")
    raw = msg.get("details")
    details: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kw: dict[str, Any] = {"code": code, "details": details, "method": method}
    if code == "bad_manifest" or (not code and text.startswith("manifest: ")):
        field = details.get("field")
        if not isinstance(field, str):
            # An older daemon: "manifest: FIELD: problem".
            rest = text.removeprefix("manifest: ")
            field = rest.split(": ", 1)[0] if ": " in rest else "manifest"
        problem = details.get("problem")
        return BadManifest(text, field=field, problem=problem if isinstance(problem, str) else "", **kw)
    if code == "unknown_job" or (not code and text.startswith("no job ")):
        job_id = details.get("job_id")
        return UnknownJob(text, job_id=job_id if isinstance(job_id, str) else "", **kw)
    if text.startswith("unknown method"):
        return MethodUnavailable(f"this daemon does not offer {method!r}: upgrade it to the version of this SDK",
                                 **kw)
    return RequestRefused(text, **kw)
