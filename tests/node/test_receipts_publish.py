"""The receipts' DHT records and decoder (node/_receipts.py).

- ``ReceiptRecordValidator`` keeps a published receipt only under the key of
  a peer it names, within the DHT's record limit, and selects the newest;
  the ``p2pgpu`` namespace routes ``/p2pgpu/receipts/`` keys to it and every
  other key to the adverts' validator;
- ``decode_item`` takes any bytes: a published receipt, a member receipt, or
  ``PeerMisbehaved``, never another error.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from p2pgpu.core import Identity, PeerMisbehaved
from p2pgpu.core._formation_messages import Accept, Certificate, Proposal
from p2pgpu.core._receipt import (
    MemberReceipt,
    PublishedReceipt,
    SettledLine,
    SignedMemberReceipt,
    build_receipt,
    publish_wire,
    receipts_key,
    sign_member_receipt,
    sign_receipt,
)
from p2pgpu.node._receipts import (
    P2pgpuRecordValidator,
    ReceiptRecordValidator,
    decode_item,
    dht_record_bytes_max,
)

SUBMITTER = Identity(bytes([40]) * 32)
MEMBERS = [Identity(bytes([41 + i]) * 32) for i in range(2)]
STRANGER = Identity(bytes([60]) * 32)
ADDRESS = "11111111111111111111111111111112"


def published(at_ms: int = 1_700_000_000_000, job: str = "j") -> bytes:
    job_id = hashlib.sha256(job.encode()).hexdigest()
    prop = Proposal.sign(MEMBERS[0], job_id=job_id, view=0, round=0, members=tuple(m.peer_id for m in MEMBERS),
                         gpus_per_member=1)
    cert = Certificate(proposal=prop, accepts=tuple(
        Accept.sign(m, proposal=prop, lease_until_ms=2**40, price_per_gpu_hour=1, payout_address=ADDRESS)
        for m in MEMBERS))
    lines = [SettledLine(peer_id=m.peer_id, status="owed", amount=5, address=ADDRESS, proof_hash=b"p" * 32,
                         tx_signature="5" * 87) for m in MEMBERS]
    r = build_receipt(job_id=job_id, cert_hash=cert.digest, submitter=SUBMITTER.peer_id, payer=ADDRESS,
                      currency="SOL", settled_at_ms=at_ms, lines=lines)
    assert r is not None
    return publish_wire(sign_receipt(SUBMITTER, r), cert)


class Adverts(Validator):
    def __init__(self) -> None:
        self.keys: list[str] = []

    def validate(self, key: str, value: bytes) -> None:
        self.keys.append(key)

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


def test_a_receipt_is_kept_only_under_the_key_of_a_peer_it_names() -> None:
    counts: Counter[str] = Counter()
    v = ReceiptRecordValidator(counts)
    wire = published()
    assert len(wire) <= dht_record_bytes_max
    for who in (SUBMITTER, *MEMBERS):
        v.validate(receipts_key(who.peer_id), wire)
    with pytest.raises(InvalidRecordType):
        v.validate(receipts_key(STRANGER.peer_id), wire)
    assert counts["dht:receipt_wrong_key"] == 1


def test_oversized_and_forged_records_are_refused() -> None:
    counts: Counter[str] = Counter()
    v = ReceiptRecordValidator(counts)
    key = receipts_key(MEMBERS[0].peer_id)
    with pytest.raises(InvalidRecordType):
        v.validate(key, published() + b"\x00" * dht_record_bytes_max)
    wire = bytearray(published())
    wire[-70] ^= 1  # inside the certificate's last signature
    with pytest.raises(InvalidRecordType):
        v.validate(key, bytes(wire))
    assert counts["dht:receipt_oversized"] == 1 and sum(counts.values()) == 2


def test_select_keeps_the_newest() -> None:
    v = ReceiptRecordValidator(Counter())
    old, new = published(1_000, "a"), published(2_000, "b")
    key = receipts_key(MEMBERS[1].peer_id)
    assert v.select(key, [old, new]) == 1 and v.select(key, [new, old, b"junk"]) == 0


def test_the_namespace_routes_by_sub_namespace() -> None:
    adverts = Adverts()
    ns = P2pgpuRecordValidator(adverts, ReceiptRecordValidator(Counter()))
    ns.validate("/p2pgpu/a/" + "0" * 32, b"advert bytes")
    assert adverts.keys == ["/p2pgpu/a/" + "0" * 32]
    with pytest.raises(InvalidRecordType):
        ns.validate(receipts_key(STRANGER.peer_id), b"advert bytes")
    assert adverts.keys == ["/p2pgpu/a/" + "0" * 32]


def test_decode_item_tells_the_two_kinds_apart() -> None:
    assert isinstance(decode_item(published()), PublishedReceipt)
    mr = MemberReceipt(job_id="ab" * 32, cert_hash=b"c" * 32, member=MEMBERS[0].peer_id,
                       submitter=SUBMITTER.peer_id, owed=5, received=5, tx_signature="5" * 87, verdict="on_time",
                       reported_at_ms=1)
    assert isinstance(decode_item(sign_member_receipt(MEMBERS[0], mr).wire), SignedMemberReceipt)


GOOD = published()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2048),
                 st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)).map(
                     lambda t: GOOD[:t[0]] + bytes([GOOD[t[0]] ^ t[1]]) + GOOD[t[0] + 1:]),
                 st.integers(0, len(GOOD)).map(lambda n: GOOD[:n])))
def test_fuzz_decode_item_only_ever_refuses_with_peer_misbehaved(data: Any) -> None:
    try:
        decode_item(data)
    except PeerMisbehaved:
        pass  # the only error a stranger's bytes may cause
