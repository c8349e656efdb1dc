"""The SDK's pure decisions, as tables: failure reasons, progress lines, how
a manifest goes on the wire, result-file checks, and the mapping from a
daemon's refusal to an exception type."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from p2pgpu.sdk import BadManifest, JobStatus, MethodUnavailable, RequestRefused, ResultsMismatch, UnknownJob
from p2pgpu.sdk._errors import error_from_reply
from p2pgpu.sdk._model import check_result_file, failure_reason, manifest_param, progress_line

W1, W2 = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


def proof(worker: str, status: str = "owed", exit_code: int = 0, **kw: Any) -> dict[str, Any]:
    return {"worker": worker, "status": status, "exit_code": exit_code, "reason": "", **kw}


@pytest.mark.parametrize(("doc", "want"), [
    # Succeeded or in progress: nothing to explain.
    ({"state": "succeeded", "reason": ""}, ""),
    ({"state": "running", "reason": ""}, ""),
    ({"state": "seen", "reason": "not volunteering: payer cannot pay"}, "not volunteering: payer cannot pay"),
    # The daemon's own reason comes first.
    ({"state": "failed", "reason": "no cluster formed within 60 s: 0 matching peers with free GPUs offered, 1 needed"},
     "no cluster formed within 60 s: 0 matching peers with free GPUs offered, 1 needed"),
    # A terse settlement reason is replaced by what the proofs say.
    ({"state": "failed", "reason": f"{W1[:12]}: owed", "proofs": [proof(W1, exit_code=3, end_reason="exited")]},
     f"member {W1[:12]}: the command exited with code 3"),
    ({"state": "failed", "reason": "", "proofs": [proof(W1, exit_code=255, end_reason="sandbox_error"),
                                                 proof(W2, "missing", reason="no proof arrived")]},
     (f"member {W1[:12]}: the command exited with code 255: the sandbox could not run it; "
      f"member {W2[:12]}: no proof of its work arrived (no proof arrived)")),
    ({"state": "failed", "reason": "", "proofs": [proof(W1, exit_code=137, end_reason="time_limit")]},
     f"member {W1[:12]}: the command exited with code 137: it ran past duration_s_max"),
    ({"state": "failed", "reason": "", "proofs": [proof(W1, "outside_quorum")]},
     f"member {W1[:12]}: its output differs from the quorum's"),
    # A formation failure says which requirement leaves too few peers now.
    ({"state": "failed", "reason": "no cluster formed within 3 s: 0 matching peers with free GPUs offered, 1 needed",
      "explain": {"enough": False, "known_peers": 3, "members_needed": 1, "requirements": [
          {"requirement": "simulated", "what": "simulated GPUs allowed", "peers_passing": 3},
          {"requirement": "runtime", "what": "runtime", "peers_passing": 0}]}},
     ("no cluster formed within 3 s: 0 matching peers with free GPUs offered, 1 needed; "
      "of the 3 peers this node knows, 0 pass 'runtime' (runtime), 1 needed")),
    # A member's own record: its exit code.
    ({"state": "failed", "reason": "", "exit_code": 2}, "the command exited with code 2"),
    ({"state": "cancelled", "reason": "cancelled by the submitter"}, "cancelled by the submitter"),
    ({"state": "failed", "reason": "", "lost_members": [W2]}, f"lost member(s) {W2[:12]}"),
])
def test_failure_reason(doc: dict[str, Any], want: str) -> None:
    assert failure_reason(doc) == want


@pytest.mark.parametrize("state", ["failed", "cancelled", "interrupted"])
def test_a_job_that_did_not_succeed_always_has_a_reason(state: str) -> None:
    st = JobStatus.from_doc({"job_id": "ab" * 32, "state": state, "reason": ""})
    assert st.reason and "p2pgpu job logs abababababababab" in st.reason
    assert st.to_json()["reason"] == st.reason


def test_hostile_status_documents_do_not_break_it() -> None:
    for doc in ({}, {"state": 5, "cluster": "x", "proofs": "y", "formation": [1]}, {"proofs": [1, None, "x"]},
                {"state": "failed", "proofs": [{"worker": None, "status": None, "exit_code": "9"}], "explain": 3}):
        st = JobStatus.from_doc(doc)
        assert isinstance(st.reason, str) and isinstance(progress_line(doc), str)


def test_progress_line() -> None:
    assert progress_line({"state": "forming", "formation": {"offers": 2, "accepts": 1, "members_needed": 2,
                                                            "views_seen": 1}}) == \
        "forming: offers 2, accepts 1/2, views 1"
    assert progress_line({"state": "confirmed", "cluster": {"members": [W1, W2], "certificate_hash": "ab" * 32}}) == \
        "confirmed: cluster of 2 (certificate abababababababab)"


def test_manifest_param(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('name = "x"\n')
    assert manifest_param(f) == 'name = "x"\n'
    assert manifest_param(str(f)) == 'name = "x"\n'
    assert manifest_param('name = "x"\n') == 'name = "x"\n'  # TOML text
    assert manifest_param('name = "x"') == 'name = "x"'  # one line, but TOML: not a path
    assert manifest_param({"name": "x"}) == {"name": "x"}
    with pytest.raises(BadManifest):
        manifest_param(str(tmp_path / "absent.toml"))
    weird = tmp_path / "no-suffix"
    weird.write_text("name = 'y'\n")
    assert manifest_param(str(weird)) == "name = 'y'\n"  # an existing file, whatever its name


def test_check_result_file(tmp_path: Path) -> None:
    f = tmp_path / "out.txt"
    f.write_bytes(b"hello\n")
    good = hashlib.sha256(b"hello\n").hexdigest()
    check_result_file(f, sha256=good, size_bytes=6)
    with pytest.raises(ResultsMismatch, match="6 bytes"):
        check_result_file(f, sha256=good, size_bytes=7)
    f.write_bytes(b"HELLO\n")  # same size, other bytes: tampered after the daemon checked it
    with pytest.raises(ResultsMismatch, match="sha256"):
        check_result_file(f, sha256=good, size_bytes=6)
    link = tmp_path / "link"
    os.symlink(f, link)
    with pytest.raises(ResultsMismatch, match="not a plain file"):
        check_result_file(link, sha256=good, size_bytes=6)
    with pytest.raises(ResultsMismatch, match="cannot read"):
        check_result_file(tmp_path / "gone", sha256=good, size_bytes=6)


@pytest.mark.parametrize(("msg", "kind", "attrs"), [
    ({"error": "manifest: requirements.nodes: between 1 and 64", "code": "bad_manifest",
      "details": {"field": "requirements.nodes", "problem": "between 1 and 64"}}, BadManifest,
     {"field": "requirements.nodes", "problem": "between 1 and 64"}),
    # An older daemon without codes.
    ({"error": "manifest: runtime.command: missing"}, BadManifest, {"field": "runtime.command"}),
    ({"error": "no job abc is known to this node", "code": "unknown_job", "details": {"job_id": "abc"}},
     UnknownJob, {"job_id": "abc"}),
    ({"error": "no job abc is known to this node"}, UnknownJob, {"job_id": ""}),
    ({"error": "unknown method 'market.match'"}, MethodUnavailable, {}),
    ({"error": "only its submitter can cancel it", "code": "not_submitter"}, RequestRefused,
     {"code": "not_submitter"}),
    ({"error": "manifest: x", "code": "bad_manifest", "details": "not a dict"}, BadManifest, {"field": "manifest"}),
    ({}, RequestRefused, {"code": ""}),
])
def test_error_from_reply(msg: dict[str, Any], kind: type, attrs: dict[str, Any]) -> None:
    exc = error_from_reply(msg, "job.submit")
    assert type(exc) is kind and exc.method == "job.submit" and str(exc)
    for k, v in attrs.items():
        assert getattr(exc, k) == v
