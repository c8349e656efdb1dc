"""Running a job on this node: the bubblewrap sandbox, and Ray clusters inside it.

``check_sandbox()`` says whether jobs can run confined here (the node refuses
jobs when it returns a reason); ``run_job(spec, policy, on_line=...)`` runs one
job's command and returns a ``SandboxResult``; ``RunCheckpoints`` and
``proof_for`` turn a run into a signed work proof.  ``RayMember`` runs one
member of a ``ray`` job (every process of it in the sandbox, on a network
that reaches only the job's other members); ``ray_unavailable()`` says why a
node cannot offer ``ray``.  See ``docs/sandbox.md``, ``docs/ray.md`` and
``docs/proofs.md``.
"""

from ._limits import BACKENDS, SandboxUnavailable
from ._outputs import OutputFile, OutputLimitExceeded, collect_outputs
from ._proving import RunCheckpoints, proof_for
from ._ray import RayAddress, RayMember, RayMemberSpec, RayResult, ray_unavailable
from ._sandbox import (
    REASONS,
    ClusterEnv,
    JobRejected,
    JobSpec,
    SandboxPolicy,
    SandboxResult,
    bwrap_argv,
    check_sandbox,
    gpu_device_paths,
    job_env,
    run_job,
    sandbox_memory_backend,
)

__all__ = [
    "BACKENDS",
    "REASONS",
    "ClusterEnv",
    "JobRejected",
    "JobSpec",
    "OutputFile",
    "OutputLimitExceeded",
    "RayAddress",
    "RayMember",
    "RayMemberSpec",
    "RayResult",
    "RunCheckpoints",
    "SandboxPolicy",
    "SandboxResult",
    "SandboxUnavailable",
    "bwrap_argv",
    "check_sandbox",
    "collect_outputs",
    "gpu_device_paths",
    "job_env",
    "proof_for",
    "ray_unavailable",
    "run_job",
    "sandbox_memory_backend",
]
