"""From a sandboxed run to a signed work proof: the glue the node uses.

The sandbox (``_sandbox``) knows how a run ended and what it produced; the
proof core (``p2pgpu.core._proof``) knows what a proof says and how it is
checked.  :class:`RunCheckpoints` keeps a member's checkpoint chain during the
run (fed with every log line, so each checkpoint's info is a hash of the
output so far), and :func:`proof_for` turns a :class:`SandboxResult` and the
chain into a :class:`SignedProof`, applying the rules the verifier checks:
``gpu_ms = len(gpus) * min(served, duration limit)`` and a last checkpoint at
the end whose info is the output digest, so the chain commits to the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from p2pgpu.core import CheckpointChain, Identity, Proof, SignedProof, sign_proof
from p2pgpu.core._proof import checkpoint_interval_ms, checkpoints_max

from ._sandbox import SandboxResult


class RunCheckpoints:
    """A member's checkpoint chain while its job runs.

    Call :meth:`feed` with every log line (the ``on_line`` callback can do it)
    and :meth:`tick` with the wall clock whenever a timer fires; a checkpoint
    is added once ``interval_ms`` passed since the last one.  Its info is the
    sha256 of the log bytes seen so far.  ``head`` goes into heartbeats
    (``Membership.set_progress(rc.head, rc.count)``).
    """

    def __init__(self, *, job_id: str, cert_hash: bytes, peer_id: str, started_at_ms: int,
                 duration_ms_max: int) -> None:
        self.chain = CheckpointChain(job_id, cert_hash, peer_id)
        self.interval_ms = checkpoint_interval_ms(duration_ms_max)
        self.started_at_ms = started_at_ms
        self._last_ms = started_at_ms
        self._log = hashlib.sha256()

    @property
    def head(self) -> bytes:
        return self.chain.head

    @property
    def count(self) -> int:
        return len(self.chain.checkpoints)

    def feed(self, stream: str, line: bytes) -> None:
        self._log.update(stream.encode() + b"\x00" + line + b"\n")

    def tick(self, now_ms: int) -> bool:
        """Add a checkpoint if one is due (keeps one slot for the last one)."""
        if now_ms - self._last_ms < self.interval_ms or self.count >= checkpoints_max - 1:
            return False
        self.chain.add(now_ms, self._log.digest())
        self._last_ms = now_ms
        return True


def proof_for(result: SandboxResult, *, identity: Identity, checkpoints: RunCheckpoints, job_id: str,
              cert_hash: bytes, gpus: Sequence[str], ended_at_ms: int, duration_ms_max: int,
              end_reason: str | None = None) -> SignedProof:
    """Sign the proof of one member's run.

    ``ended_at_ms`` is the wall clock when the run ended; ``end_reason``
    overrides the sandbox's reason (``member_lost``, ``job_failed``,
    ``cancelled`` come from the cluster, not the sandbox).  Call it once per
    run: it appends the final checkpoint.  A missing exit code
    (``sandbox_error``) is signed as 255.
    """
    started = checkpoints.started_at_ms
    chain = checkpoints.chain
    end = max(ended_at_ms, started, chain.checkpoints[-1].t_ms if chain.checkpoints else started)
    chain.add(end, result.output_digest)  # the chain commits to the result
    proof = Proof(
        job_id=job_id, cert_hash=cert_hash, peer_id=identity.peer_id, gpus=tuple(gpus),
        started_at_ms=started, ended_at_ms=end, gpu_ms=len(gpus) * min(end - started, duration_ms_max),
        exit_code=result.exit_code if result.exit_code is not None and 0 <= result.exit_code <= 255 else 255,
        end_reason=end_reason or result.reason, output_digest=result.output_digest,
        checkpoints=tuple(chain.checkpoints), chain_head=chain.head,
    )
    return sign_proof(identity, proof)
