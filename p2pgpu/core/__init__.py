"""The pure protocol cores of p2pgpu (sans-IO).

Nothing here awaits, touches the network, the disk or the clock, or uses the
global ``random``: events and ``now`` go in, values and actions come out.
``tests/core/test_purity.py`` enforces the import rule.  This file names the
public API; the ``_*.py`` modules are private.
"""

from ._advert import (
    RUNTIMES,
    Advert,
    AdvertBook,
    GpuInfo,
    SignedAdvert,
    advert_key,
    advert_time_reason,
    class_key,
    is_solana_address,
    next_seq,
    parse_compute_capability,
    sign_advert,
    verify_advert,
    verify_advert_bytes,
)
from ._codec import decode, encode
from ._connections import ConnectionLimits, ConnectionTable, Refusal
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, open_envelope, protocol_version, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, Verifier, peer_id_from_public_key, public_key_from_peer_id, verify_signature
from ._matching import Explanation, Requirement, Requirements, exclusion, explain, matching
from ._proof import (
    Checkpoint,
    CheckpointChain,
    Cosign,
    Owed,
    Proof,
    ProofFault,
    ProofRejected,
    ProofTerms,
    SignedCosign,
    SignedProof,
    VerifiedProof,
    Window,
    agreed_prices,
    certificate_hash,
    claim_bound_ms,
    decode_cosign,
    decode_proof,
    output_digest,
    owed,
    owed_total,
    quorum_digests,
    sign_cosign,
    sign_proof,
    verify_proof,
)
from ._reach import (
    Addr,
    CircuitCut,
    PunchBook,
    PunchLimits,
    Reachability,
    ReachabilityTracker,
    ReachLimits,
    RelayBook,
    RelayLimits,
    RelayRefusal,
    Scope,
    advertised_addrs,
    check_advert_addr,
    choose_relays,
    dialable,
    ip_scope,
    needs_relay,
    parse_addr,
    world_of,
)
from ._verdict import VERDICTS, GossipVerdict, verdict_for

__all__ = [
    "RUNTIMES",
    "Addr",
    "CircuitCut",
    "PunchBook",
    "PunchLimits",
    "Reachability",
    "ReachabilityTracker",
    "ReachLimits",
    "RelayBook",
    "RelayLimits",
    "RelayRefusal",
    "Scope",
    "advertised_addrs",
    "check_advert_addr",
    "choose_relays",
    "dialable",
    "ip_scope",
    "needs_relay",
    "parse_addr",
    "world_of",
    "VERDICTS",
    "Advert",
    "AdvertBook",
    "ConnectionLimits",
    "ConnectionTable",
    "Envelope",
    "Explanation",
    "GossipVerdict",
    "GpuInfo",
    "Identity",
    "Kind",
    "LocalProtocolError",
    "PeerMisbehaved",
    "Reason",
    "Refusal",
    "Requirement",
    "Requirements",
    "SignedAdvert",
    "Verifier",
    "advert_key",
    "advert_time_reason",
    "body_of",
    "class_key",
    "decode",
    "encode",
    "envelope_from_obj",
    "exclusion",
    "explain",
    "is_solana_address",
    "matching",
    "next_seq",
    "open_envelope",
    "parse_compute_capability",
    "peer_id_from_public_key",
    "protocol_version",
    "public_key_from_peer_id",
    "seal",
    "sign_advert",
    "verdict_for",
    "verify_advert",
    "verify_advert_bytes",
    "verify_signature",
]

# Work proofs (docs/proofs.md).
__all__ += [
    "Checkpoint", "CheckpointChain", "Cosign", "Owed", "Proof", "ProofFault", "ProofRejected", "ProofTerms",
    "SignedCosign", "SignedProof", "VerifiedProof", "Window", "agreed_prices", "certificate_hash",
    "claim_bound_ms", "decode_cosign",
    "decode_proof", "output_digest", "owed", "owed_total", "quorum_digests", "sign_cosign", "sign_proof",
    "verify_proof",
]

# Job manifests and cluster formation (docs/manifest.md, docs/formation.md).
from ._actions import (
    Cancelled,
    CancelTimer,
    Confirmed,
    Emit,
    Failed,
    MemberLost,
    Publish,
    Released,
    Reserved,
    Send,
    SetTimer,
    StartJob,
    StopJob,
    Subscribe,
    TimerKey,
    TimerOwner,
    Unsubscribe,
)
from ._formation import CapacityLedger, FormationConfig, FormationNode, leader_rank
from ._formation_messages import (
    Accept,
    Cancel,
    Certificate,
    Certified,
    Confirm,
    Decline,
    Offer,
    Proposal,
    decode_message,
)
from ._formation_states import SubmitterState, WorkerState
from ._formation_submitter import JobProgress, Submitter
from ._manifest import (
    JobInput,
    Manifest,
    ManifestError,
    ReplayGuard,
    SignedManifest,
    manifest_from_doc,
    manifest_from_toml,
    sign_manifest,
    verify_manifest,
)

__all__ += [
    "Accept", "Cancel", "CancelTimer", "Cancelled", "CapacityLedger", "Certificate", "Certified",
    "Confirm", "Confirmed", "Decline", "Emit", "Failed", "FormationConfig", "FormationNode",
    "JobInput", "JobProgress", "Manifest", "ManifestError", "MemberLost", "Offer", "Proposal", "Publish",
    "Released", "ReplayGuard", "Reserved", "Send", "SetTimer", "SignedManifest", "StartJob", "StopJob",
    "Submitter", "SubmitterState", "Subscribe", "TimerKey", "TimerOwner", "Unsubscribe", "WorkerState",
    "decode_message", "leader_rank",
    "manifest_from_doc", "manifest_from_toml", "sign_manifest", "verify_manifest",
]

# Cluster membership while a job runs (docs/proofs.md).
from ._membership import (
    Heartbeat,
    Membership,
    MemberStatus,
    SignedHeartbeat,
    decode_heartbeat,
    sign_heartbeat,
)

__all__ += ["Heartbeat", "MemberStatus", "Membership", "SignedHeartbeat", "decode_heartbeat", "sign_heartbeat"]

# Hardware challenges (docs/proofs.md, "Hardware challenges").
from ._challenge import (
    MODELS,
    Admitted,
    Challenge,
    ChallengeAnswer,
    ClaimBook,
    ClaimPolicy,
    Declined,
    ModelSpec,
    Outcome,
    ProverGate,
    SignedAnswer,
    SignedChallenge,
    Verdict,
    decode_answer,
    decode_challenge,
    judge,
    make_challenge,
    model_key,
)

__all__ += [
    "MODELS", "Admitted", "Challenge", "ChallengeAnswer", "ClaimBook", "ClaimPolicy", "Declined", "ModelSpec",
    "Outcome", "ProverGate", "SignedAnswer", "SignedChallenge", "Verdict", "decode_answer", "decode_challenge",
    "judge", "make_challenge", "model_key",
]

# Receipts and reputation (docs/reputation.md).
from ._receipt import (
    MemberReceipt,
    Receipt,
    ReceiptLine,
    SignedMemberReceipt,
    SignedReceipt,
    decode_member_receipt,
    decode_receipt,
    sign_member_receipt,
    sign_receipt,
)
from ._reputation import Reputation, Score, VerifiedPayment, compute_reputation, job_value_max

__all__ += [
    "MemberReceipt", "Receipt", "ReceiptLine", "Reputation", "Score", "SignedMemberReceipt", "SignedReceipt",
    "VerifiedPayment", "compute_reputation", "decode_member_receipt", "decode_receipt", "job_value_max",
    "sign_member_receipt", "sign_receipt",
]
