"""The ``ray`` runtime's data: a member's spec, the head's address, a member's result.

Kept apart from ``_ray`` (the running member) so that the node can build and
check a :class:`RayMemberSpec` (and the simulator can reason about
:class:`RayResult` reasons) without the process machinery.  Building a spec
checks every limit; :meth:`RayMemberSpec.for_manifest` maps a ``ray``
manifest onto it.  See ``docs/ray.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._outputs import OutputFile
from ._sandbox import RESERVED_ENV, JobRejected

#: Why a member's run ended.
REASONS = ("exited", "time_limit", "memory_limit", "output_limit", "member_lost", "cancelled", "finished",
           "ray_error")
POLICIES = ("fail", "continue")
members_max = 64
object_store_bytes_min = 80 << 20
#: Inside a member's own network namespace every port is free: Ray's defaults
#: for the GCS, and a fixed rendezvous port handed to torch as MASTER_PORT.
gcs_port_default = 6379
master_port_default = 29500


@dataclass(frozen=True, kw_only=True)
class RayAddress:
    """Where the members and the driver find the head (its sandbox's address)."""

    host: str
    gcs_port: int
    master_port: int = 0

    def __str__(self) -> str:
        return f"{self.host}:{self.gcs_port}"


@dataclass(frozen=True, kw_only=True)
class RayMemberSpec:
    """One member's part of a ``ray`` job.

    ``members`` are the peer ids in rank order (rank 0 is the head).
    ``work_dir`` is an empty directory of the node's that receives this
    member's sealed outputs; ``state_path`` where its running sandbox is
    recorded for a restarted node.  ``num_cpus`` and ``gpus`` (host GPU
    indices) come from the advert and the reservation; ``memory_bytes_max``
    bounds the member's whole sandbox, Ray and driver included.
    """

    job_id: str
    members: tuple[str, ...]
    rank: int
    command: tuple[str, ...]
    work_dir: Path
    num_cpus: int
    memory_bytes_max: int
    time_limit_ms: int
    gpus: tuple[int, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    on_member_loss: str = "fail"
    auth_token: str = ""
    state_path: Path | None = None
    start_timeout_ms: int = 120_000
    head_lost_timeout_s: int = 10
    health_check_period_ms: int = 1_000
    health_check_failures_max: int = 3
    gcs_port: int = gcs_port_default
    master_port: int = master_port_default
    log_bytes_max: int = 64 << 20
    log_line_bytes_max: int = 16 * 1024
    output_files_max: int = 1000
    output_file_bytes_max: int = 1 << 30
    output_bytes_max: int = 4 << 30

    def __post_init__(self) -> None:
        if not 0 < len(self.members) <= members_max or not 0 <= self.rank < len(self.members):
            raise ValueError(f"1 to {members_max} members, and rank must index them")
        if not self.command or any("\0" in a for a in self.command):
            raise ValueError("command must be a non-empty argv without NUL")
        if self.on_member_loss not in POLICIES:
            raise ValueError(f"on_member_loss must be one of {', '.join(POLICIES)}")
        if self.num_cpus < 1 or self.memory_bytes_max < 2 * object_store_bytes_min or self.time_limit_ms <= 0:
            raise ValueError("at least 1 CPU, 160 MiB of memory and a positive time limit")
        if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise ValueError("gpus must be distinct non-negative indices")
        if not (0 < self.gcs_port < 65536 and 0 < self.master_port < 65536) or self.gcs_port == self.master_port:
            raise ValueError("gcs_port and master_port: two different ports in 1..65535")
        if self.start_timeout_ms <= 0:
            raise ValueError("start_timeout_ms must be positive")

    @classmethod
    def for_manifest(cls, manifest: Any, *, job_id: str, members: tuple[str, ...], rank: int,
                     **node: Any) -> RayMemberSpec:
        """The spec from a ``core.Manifest`` (command, env, duration, loss
        policy) plus what this node decides (``work_dir``, ``num_cpus``,
        ``gpus``, ``memory_bytes_max``, ``auth_token``, ...)."""
        if manifest.runtime != "ray":
            raise ValueError(f"the manifest asks for the {manifest.runtime!r} runtime, not 'ray'")
        return cls(job_id=job_id, members=members, rank=rank, command=tuple(manifest.command),
                   env=dict(manifest.env), time_limit_ms=manifest.duration_s_max * 1000,
                   on_member_loss=manifest.on_member_loss, **node)

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def head(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, kw_only=True)
class RayResult:
    reason: str
    #: The driver's exit status (rank 0; 128+N for signal N); None elsewhere.
    exit_code: int | None
    wall_ms: int
    #: From the start of :meth:`RayMember.run` to the entrypoint started (rank
    #: 0) or to this member's node up (other ranks); -1 if it never got there.
    startup_ms: int
    stdout_sha256: bytes
    stderr_sha256: bytes
    stdout_bytes: int
    stderr_bytes: int
    logs_truncated: bool
    stderr_tail: bytes
    outputs: tuple[OutputFile, ...]
    output_digest: bytes
    members_lost: tuple[int, ...]
    detail: str = ""
    #: The wall clock when the member's sandbox died (0 without a clock).
    ended_at_ms: int = 0

    @property
    def ok(self) -> bool:
        return self.reason in ("exited", "finished") and self.exit_code in (0, None)


def check_env(env: Mapping[str, str]) -> None:
    for name in sorted(env):
        if name in RESERVED_ENV or name.startswith(("P2PGPU_", "RAY_")) or "\0" in env[name]:
            raise JobRejected(f"environment variable {name} is set by the runtime")
