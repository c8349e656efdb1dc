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
    class_key,
    is_solana_address,
    next_seq,
    parse_compute_capability,
    sign_advert,
    verify_advert,
)
from ._codec import decode, encode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, open_envelope, protocol_version, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, peer_id_from_public_key, public_key_from_peer_id, verify_signature
from ._matching import Explanation, Requirement, Requirements, exclusion, explain, matching

__all__ = [
    "RUNTIMES",
    "Advert",
    "AdvertBook",
    "Envelope",
    "Explanation",
    "GpuInfo",
    "Identity",
    "Kind",
    "LocalProtocolError",
    "PeerMisbehaved",
    "Reason",
    "Requirement",
    "Requirements",
    "SignedAdvert",
    "advert_key",
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
    "verify_advert",
    "verify_signature",
]
