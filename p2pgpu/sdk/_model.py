"""What the SDK hands back, and the decisions both clients share: pure code.

The daemon answers JSON documents (their keys are the contract of
``docs/cli.md``); this module wraps them in small typed
objects that keep the document as ``raw`` (so ``--json`` prints exactly what
the daemon said) and decides, once for the blocking and the trio client:

* which states are final and what the progress line of a job reads
  (:func:`progress_line`);
* why a job failed, in words, from everything its status holds
  (:func:`failure_reason`): a job that did not succeed always has a reason,
  even where the daemon recorded none or only a terse one;
* how a manifest given as a path, TOML text or a dict goes on the wire
  (:func:`manifest_param`);
* whether a result file on disk is the one its member committed to
  (:func:`check_result_file`).

No sockets, no clock, no trio here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ._errors import BadManifest, ResultsMismatch

#: A job in one of these states changes no more.
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")
#: Manifest files larger than this are refused before they are read (the daemon's own cap is 512 KiB).
manifest_file_bytes_max = 512 * 1024

ManifestLike = Union[str, "os.PathLike[str]", Mapping[str, Any]]


@dataclass(frozen=True)
class JobStatus:
    """A job as the daemon knows it (``job status --json`` is ``raw``)."""

    job_id: str
    name: str
    state: str
    #: Why it failed, was cancelled or interrupted: the daemon's words, or
    #: words built from its proofs and formation figures (never empty then).
    reason: str
    members: tuple[str, ...]
    certificate_hash: str
    roles: tuple[str, ...]
    proofs: tuple[dict[str, Any], ...]
    payouts: tuple[dict[str, Any], ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> JobStatus:
        d = dict(doc)
        cluster = _dict(d.get("cluster"))
        return cls(job_id=str(d.get("job_id", "")), name=str(d.get("name") or ""), state=str(d.get("state", "")),
                   reason=failure_reason(d), members=tuple(cluster.get("members") or ()),
                   certificate_hash=str(cluster.get("certificate_hash") or ""),
                   roles=tuple(d.get("roles") or ()), proofs=tuple(_dicts(d.get("proofs"))),
                   payouts=tuple(_dicts(d.get("payouts"))), raw=d)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @property
    def formation_ms(self) -> int | None:
        t = self.raw.get("timings")
        v = t.get("formation_ms") if isinstance(t, dict) else None
        return v if isinstance(v, int) else None

    def to_json(self) -> dict[str, Any]:
        """The daemon's document, with ``reason`` filled in where the daemon left it empty."""
        return {**self.raw, "reason": self.reason}


@dataclass(frozen=True)
class Progress:
    """What :meth:`Job.wait` reports each time the job's progress line changes."""

    job_id: str
    state: str
    line: str
    status: JobStatus


@dataclass(frozen=True)
class LogLine:
    """One line the job wrote; ``member`` is the worker's peer id on the submitter's node."""

    t_ms: int
    stream: str
    line: str
    member: str = ""
    member_index: int | None = None

    @classmethod
    def from_doc(cls, d: Mapping[str, Any]) -> LogLine:
        mi = d.get("member_index")
        return cls(t_ms=int(d.get("t_ms") or 0), stream=str(d.get("stream") or "stdout"), line=str(d.get("line", "")),
                   member=str(d.get("member") or ""), member_index=mi if isinstance(mi, int) else None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t_ms": self.t_ms, "stream": self.stream, "line": self.line}
        if self.member:
            out["member"] = self.member
            out["member_index"] = self.member_index
        return out


@dataclass(frozen=True)
class ResultFile:
    """An output file fetched into the destination, checked against its hash."""

    member: str
    member_index: int | None
    path: str
    sha256: str
    size_bytes: int
    saved_as: Path

    def to_json(self) -> dict[str, Any]:
        return {"member": self.member, "member_index": self.member_index, "path": self.path, "sha256": self.sha256,
                "size_bytes": self.size_bytes, "saved_as": str(self.saved_as)}


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _dicts(v: Any) -> list[dict[str, Any]]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


# ------------------------------------------------------------------ manifests


def manifest_param(manifest: ManifestLike) -> str | dict[str, Any]:
    """What ``job.submit`` gets: TOML text, or the manifest document as an object.

    A :class:`os.PathLike`, or a one-line string naming an existing file or
    ending in ``.toml``, is read as a file; any other string is TOML text; a
    mapping is the document itself (the tables of a manifest file).
    """
    if isinstance(manifest, Mapping):
        return dict(manifest)
    if isinstance(manifest, os.PathLike) or (
            isinstance(manifest, str) and "\n" not in manifest and "=" not in manifest
            and (manifest.endswith(".toml") or Path(manifest).expanduser().is_file())):
        path = Path(manifest).expanduser()
        try:
            size = path.stat().st_size
            if size > manifest_file_bytes_max:
                raise BadManifest(f"{path}: {size} bytes, over the {manifest_file_bytes_max} byte limit of a "
                                  "manifest; pass large inputs by sha256", field="manifest")
            return path.read_text()
        except FileNotFoundError:
            raise BadManifest(f"{path}: no such file", field="manifest") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BadManifest(f"{path}: cannot read it ({exc})", field="manifest") from None
    if isinstance(manifest, str):
        return manifest
    raise TypeError(f"a manifest is a path, TOML text or a dict, not {type(manifest).__name__}")


# ------------------------------------------------------------- job progress


def progress_line(doc: Mapping[str, Any]) -> str:
    """One line about where a job stands: formation figures, then its cluster."""
    state = str(doc.get("state", "?"))
    cluster = _dict(doc.get("cluster"))
    members = cluster.get("members") or []
    if members:
        line = f"{state}: cluster of {len(members)} (certificate {str(cluster.get('certificate_hash', ''))[:16]})"
        served = [i for i in doc.get("inputs") or [] if isinstance(i, dict) and i.get("served_bytes")]
        if served:  # uploads: what this node has sent of its inputs to the members
            line += "; inputs served " + ", ".join(
                f"{i.get('name')} {int(i['served_bytes']) >> 20} MiB" for i in served)
        return line
    f = _dict(doc.get("formation"))
    return (f"{state}: offers {f.get('offers', 0)}, accepts {f.get('accepts', 0)}/{f.get('members_needed', '?')}, "
            f"views {f.get('views_seen', 0)}")


_PROOF_WORDS = {
    "missing": "no proof of its work arrived",
    "rejected": "its proof was rejected",
    "outside_quorum": "its output differs from the quorum's",
    "no_quorum": "no quorum of replicas agreed on the output",
    "no_payout_address": "it advertises no payout address",
}


def failure_reason(doc: Mapping[str, Any]) -> str:
    """Why a job that did not succeed ended so, in words; ``""`` otherwise.

    The daemon's own ``reason`` comes first; where it is empty, or only lists
    members, the proofs say what went wrong with each member (exit code,
    missing proof, quorum), and a formation failure says which requirement
    leaves too few peers in the market as it is now (``explain``)."""
    state = str(doc.get("state", ""))
    own = str(doc.get("reason") or "").strip()
    if state not in ("failed", "cancelled", "interrupted"):
        return own if state in ("seen", "reserved") else ""
    parts: list[str] = []
    for p in _dicts(doc.get("proofs")):
        what = _member_problem(p)
        if what:
            parts.append(f"member {str(p.get('worker', '?'))[:12]}: {what}")
    lost = doc.get("lost_members")
    if isinstance(lost, list) and lost:
        parts.append("lost member(s) " + ", ".join(str(x)[:12] for x in lost[:8]))
    explained = _explain_words(doc.get("explain"))
    # The settlement's own reason lists the same members tersely: the proofs' words replace it.
    workers = [str(p.get("worker") or "")[:12] for p in _dicts(doc.get("proofs"))]
    if own and not (parts and any(w and w in own for w in workers)):
        parts.insert(0, own)
    if explained:
        parts.append(explained)
    if not parts and doc.get("exit_code") not in (None, 0):
        parts.append(f"the command exited with code {doc.get('exit_code')}")
    if not parts:
        parts.append(f"the job ended {state} and the node recorded no reason; see `p2pgpu job logs "
                     f"{str(doc.get('job_id', ''))[:16]}` and the node's log")
    return "; ".join(parts)


def _member_problem(p: Mapping[str, Any]) -> str:
    status = str(p.get("status", ""))
    exit_code = p.get("exit_code")
    why = str(p.get("reason") or "").strip()
    if status in _PROOF_WORDS:
        return _PROOF_WORDS[status] + (f" ({why})" if why else "")
    if status not in ("owed", "paid", ""):
        return f"{status}" + (f" ({why})" if why else "")
    if isinstance(exit_code, int) and exit_code != 0:
        end = str(p.get("end_reason") or "")
        words = {"sandbox_error": "the sandbox could not run it", "time_limit": "it ran past duration_s_max",
                 "memory_limit": "it ran out of memory", "cancelled": "it was stopped",
                 "member_lost": "another member was lost", "job_failed": "the job failed elsewhere",
                 "output_limit": "its outputs were over the limit", "interrupted": "its node restarted"}
        extra = f": {words.get(end, end)}" if end and end != "exited" else ""
        return f"the command exited with code {exit_code}{extra}"
    return ""


def _explain_words(ex: Any) -> str:
    """From a dry run of the job's requirements: the requirement that leaves too few peers."""
    if not isinstance(ex, dict) or ex.get("enough"):
        return ""
    needed = ex.get("members_needed", "?")
    known = ex.get("known_peers", 0)
    for step in _dicts(ex.get("requirements")):
        passing = step.get("peers_passing", 0)
        if isinstance(passing, int) and isinstance(needed, int) and passing < needed:
            return (f"of the {known} peers this node knows, {passing} pass '{step.get('what')}' "
                    f"({step.get('requirement')}), {needed} needed")
    return ""


# ------------------------------------------------------------------- results


def check_result_file(path: Path, *, sha256: str, size_bytes: int, chunk_bytes: int = 1 << 20) -> None:
    """Raise :class:`ResultsMismatch` unless ``path`` has exactly this size and sha256."""
    try:
        size = path.lstat().st_size
        if not path.is_file() or path.is_symlink():
            raise ResultsMismatch(f"{path} is not a plain file", path=str(path))
        if size != size_bytes:
            raise ResultsMismatch(f"{path} has {size} bytes, its member committed to {size_bytes}", path=str(path))
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
    except OSError as exc:
        raise ResultsMismatch(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from None
    if h.hexdigest() != sha256:
        raise ResultsMismatch(f"{path} does not match the sha256 its member committed to", path=str(path))


def result_files(res: Mapping[str, Any]) -> list[ResultFile]:
    out = []
    for f in _dicts(res.get("files")):
        mi = f.get("member_index")
        out.append(ResultFile(member=str(f.get("member", "")), member_index=mi if isinstance(mi, int) else None,
                              path=str(f.get("path", "")), sha256=str(f.get("sha256", "")),
                              size_bytes=int(f.get("size_bytes") or 0), saved_as=Path(str(f.get("saved_as", "")))))
    return out
