"""GPU adverts at their edges (#19): each refusal names the field at fault
(the schema layer and the constructor check some fields twice, and only the
detail tells which refused), every length limit on both sides, the smallest
valid values, and the time window at its exact instants.  The advert's bytes
and DHT keys are pinned in ``tests/data/vectors.json`` (``test_vectors.py``)."""

from __future__ import annotations

from typing import Any

import pytest
from test_advert import ALICE, BOB, H100, MALLORY, T0, TTL, book, make_advert, signed_body, wire

from p2pgpu.core import (
    Advert,
    GpuInfo,
    Kind,
    PeerMisbehaved,
    Reason,
    _advert,
    decode,
    encode,
    sign_advert,
    verify_advert,
)


def refusal(data: bytes, now_ms: int = T0) -> PeerMisbehaved:
    with pytest.raises(PeerMisbehaved) as err:
        verify_advert(data, now_ms=now_ms)
    return err.value


def body(**over: Any) -> dict[str, Any]:
    return {**make_advert().to_obj(), **over}


# name, body fields, the detail the refusal starts with
BODY_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"peer_id": "x" * 65}, "peer_id: length must be in [1, 64]"),
    ({"seq": 0}, "seq: must be in [1, "),
    ({"gpus_free": 17}, "gpus_free: must be in [0, 16]"),
    ({"gpus_free": 3}, "gpus_free must be between 0 and the number of GPUs"),
    ({"currency": "c" * 65}, "currency: length must be in [1, 64]"),
    ({"payout_address": "1" * 65}, "payout_address: length must be in [0, 64]"),
    ({"region": "r" * 33}, "region: length must be in [1, 32]"),
    ({"runtimes": ["r" * 17]}, "runtimes[0]: must be a string of 1 to 16 characters"),
    ({"runtimes": ["docker"]}, "unknown runtime 'docker'"),
    ({"gpus": [H100.to_obj(), {**H100.to_obj(), "memory_mb": 0}]}, "gpus[1]: memory_mb out of range"),
    ({"gpus": [H100.to_obj(), "x"]}, "gpus[1]: must be a map"),
    ({"gpus": [{**H100.to_obj(), "memory_mb": "1"}]}, "gpus[0].memory_mb: must be an integer"),
    ({"gpus": [{**H100.to_obj(), "utilization_pct": 101}]}, "gpus[0]: utilization_pct must be 0..100"),
    ({"gpus": [{k: v for k, v in H100.to_obj().items() if k != "model"}]}, "model: missing"),
    ({"gpus": [{**H100.to_obj(), "foo": 1}]}, "foo: unknown field"),
    ({"gpus": [{"model": "m", "memory_mb": 1, "compute_capability": "8.0", "driver_version": "", "foo": 1}]},
     "foo: unknown field"),
]


@pytest.mark.parametrize("over,why", BODY_REFUSED, ids=[w for _, w in BODY_REFUSED])
def test_a_refused_body_names_the_field(over: dict[str, Any], why: str) -> None:
    err = refusal(signed_body(body(**over)))
    assert err.reason is Reason.BAD_SCHEMA
    assert err.detail.startswith(why), err.detail


def test_gpu_decoder_names_a_lone_gpu() -> None:
    with pytest.raises(PeerMisbehaved) as err:
        GpuInfo.from_obj("x")
    assert err.value.detail == "gpu: must be a map"
    with pytest.raises(PeerMisbehaved) as err:
        GpuInfo.from_obj({**H100.to_obj(), "memory_mb": 0})
    assert err.value.detail == "gpu: memory_mb out of range"


def test_gpu_fields_required_and_all() -> None:
    only_required = {"model": "m", "memory_mb": 1, "compute_capability": "8.0"}
    assert GpuInfo.from_obj(only_required) == GpuInfo(model="m", memory_mb=1, compute_capability="8.0")
    assert GpuInfo.from_obj(H100.to_obj()) == H100


def test_the_smallest_valid_fields() -> None:
    # A one-character currency and region, and a 1 ms lifetime, are valid;
    # a one-character peer id is valid schema but cannot be the signer's.
    adv = make_advert(currency="X", region="r", expires_at_ms=T0 + 1)
    assert verify_advert(sign_advert(ALICE, adv).wire, now_ms=T0).advert == adv
    err = refusal(signed_body(body(peer_id="x")))
    assert err.reason is Reason.SIGNER_MISMATCH and err.detail == "advert not signed by its peer"
    with pytest.raises(ValueError, match="an advert lives between 1 ms and 3600000 ms"):
        make_advert(expires_at_ms=T0)
    assert make_advert(expires_at_ms=T0 + _advert.ttl_ms_max).expires_at_ms == T0 + _advert.ttl_ms_max


def test_the_largest_valid_fields() -> None:
    # The longest address an advert may carry: a dialable DNS multiaddr naming its owner (core/_reach.py).
    tail = f"/tcp/65535/p2p/{ALICE.peer_id}"
    longest = "/dns4/" + "h" * (256 - len("/dns4/") - len(tail)) + tail
    assert len(longest) == 256
    adv = make_advert(peer_id=ALICE.peer_id, currency="c" * 64, region="r" * 32, runtimes=("process",) * 8,
                      gpus=(H100,) * 16, gpus_free=16, addrs=(longest,) * 8)
    assert verify_advert(sign_advert(ALICE, adv).wire, now_ms=T0).advert == adv


def test_gpu_field_bounds() -> None:
    ok = {"model": "m", "memory_mb": 1, "compute_capability": "0.0"}
    GpuInfo(**ok)  # type: ignore[arg-type]
    GpuInfo(model="m" * 64, memory_mb=_advert.memory_mb_max, compute_capability="99.99", driver_version="d" * 32,
            cuda_version="c" * 16, uuid_hash="u" * 64, utilization_pct=100)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"model": ""}, "model must be 1 to 64"), ({"model": "m" * 65}, "model must be 1 to 64"),
        ({"memory_mb": 0}, "memory_mb out of range"), ({"memory_mb": _advert.memory_mb_max + 1}, "memory_mb"),
        ({"compute_capability": "8"}, "compute capability must look like '8.0', not '8'"),
        ({"driver_version": "d" * 33}, "version or uuid_hash too long"),
        ({"cuda_version": "c" * 17}, "version or uuid_hash too long"),
        ({"uuid_hash": "u" * 65}, "version or uuid_hash too long"),
        ({"utilization_pct": -1}, "utilization_pct must be 0..100"),
        ({"utilization_pct": 101}, "utilization_pct must be 0..100"),
    ]
    for over, why in bad:
        with pytest.raises(ValueError, match=why):
            GpuInfo(**{**ok, **over})


def test_advert_errors_say_what_is_wrong() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"gpus": (H100,) * 17, "gpus_free": 0}, "too many gpus or addrs"),
        ({"addrs": ("a",) * 9}, "too many gpus or addrs"),
        ({"gpus_free": -1}, "gpus_free must be between 0 and the number of GPUs"),
        ({"seq": 0}, "seq starts at 1"), ({"payout_address": "x"}, "payout_address is not a Solana address"),
        ({"price_per_gpu_hour": -1}, "price must not be negative"), ({"runtimes": ("ray", "x")}, "unknown runtime 'x'"),
    ]
    for over, why in cases:
        with pytest.raises(ValueError, match=why):
            make_advert(**over)
    assert make_advert(price_per_gpu_hour=0, seq=1, gpus_free=0).price_per_gpu_hour == 0
    with pytest.raises(ValueError, match="an advert is signed by the peer it describes"):
        sign_advert(BOB, make_advert())


def test_signing_keeps_the_advert_and_its_envelope() -> None:
    adv = make_advert()
    sa = sign_advert(ALICE, adv)
    assert sa.advert == adv and sa.envelope.kind is Kind.ADVERT
    got = verify_advert(sa.wire, now_ms=T0)
    assert got.advert == adv and got.wire == sa.wire and got.envelope == sa.envelope


def test_verify_refuses_before_reading_and_names_the_rule() -> None:
    err = refusal(b"\x00" * (Kind.ADVERT.bytes_max + 1))
    assert err.reason is Reason.OVERSIZED
    # A signer field that pads the envelope past the limit: refused for its size.
    obj = decode(wire())
    obj["s"] = b"\x00" * Kind.ADVERT.bytes_max
    assert refusal(encode(obj)).reason is Reason.OVERSIZED
    # The version written wide (uint16): the same values, not the canonical bytes.
    w = wire()
    i = w.index(b"\xa1v\x01")
    assert refusal(w[:i + 2] + b"\xcd\x00\x01" + w[i + 3:]).reason is Reason.NON_CANONICAL
    # Another kind with an advert's body: the kind is checked, not the body.
    from p2pgpu.core import seal

    err = refusal(seal(ALICE, Kind.PROOF, make_advert().to_obj()).to_bytes())
    assert err.reason is Reason.WRONG_KIND and err.detail == "expected advert, got proof"


def test_time_window_instants() -> None:
    data = wire()
    skew = _advert.clock_skew_ms_max
    verify_advert(data, now_ms=T0 - skew)
    err = refusal(data, T0 - skew - 1)
    assert (err.reason, err.detail) == (Reason.NOT_YET_VALID, "issued in the future")
    verify_advert(data, now_ms=T0 - 5, clock_skew_ms=5)
    assert refusal(data, T0 + TTL).detail == "advert has expired"
    verify_advert(data, now_ms=T0 + TTL - 1)


def test_book_rules_name_the_network() -> None:
    b = book(network="main", allow_simulated=False)
    with pytest.raises(PeerMisbehaved) as err:
        b.check_record(wire(network="other"), T0)
    assert (err.value.reason, err.value.detail) == (Reason.WRONG_NETWORK, "advert for network 'other'")
    with pytest.raises(PeerMisbehaved) as err:
        b.check_record(wire(network="main", simulated=True), T0)
    assert (err.value.reason, err.value.detail) == (Reason.SIMULATED_FORBIDDEN,
                                                    "network 'main' refuses simulated GPUs")
    sa = b.check_record(wire(network="main"), T0)
    assert sa.advert.network == "main" and b.adverts == {}
    b.ingest(wire(network="main", seq=5), T0)
    with pytest.raises(PeerMisbehaved) as err:
        b.check(wire(network="main", seq=5), T0)
    assert (err.value.reason, err.value.detail) == (Reason.REPLAYED, "seq 5 <= known 5")
    assert b.check(wire(network="main", seq=6), T0).advert.seq == 6


def test_own_advert_needs_a_higher_seq_to_replace() -> None:
    b = book()
    first = sign_advert(ALICE, make_advert(seq=5, price_per_gpu_hour=1))
    b.add_own(first)
    b.add_own(sign_advert(ALICE, make_advert(seq=5, price_per_gpu_hour=2)))
    assert b.adverts[ALICE.peer_id] is first
    newer = sign_advert(ALICE, make_advert(seq=6, price_per_gpu_hour=3))
    b.add_own(newer)
    assert b.adverts[ALICE.peer_id] is newer


def test_market_memory_filter_is_inclusive() -> None:
    b = book()
    b.ingest(wire(), T0)
    assert [a.peer_id for a in b.market(T0, memory_mb_min=H100.memory_mb)] == [ALICE.peer_id]
    assert b.market(T0, memory_mb_min=H100.memory_mb + 1) == []
    assert [a.peer_id for a in b.market(T0, model="h100")] == [ALICE.peer_id]
    assert b.market(T0, model="a10") == []


def test_advert_from_obj_of_a_non_map() -> None:
    with pytest.raises(PeerMisbehaved) as err:
        Advert.from_obj(["advert"])  # type: ignore[arg-type]
    assert err.value.detail == "advert: must be a map"


def test_every_refusal_of_a_full_book_is_counted() -> None:
    b = book(adverts_max=2, adverts_per_forwarder_max=2)
    b.ingest(wire(ALICE), T0, forwarder="f")
    b.ingest(wire(BOB), T0, forwarder="f")
    for seq in (1, 2):
        with pytest.raises(PeerMisbehaved) as err:
            b.ingest(wire(MALLORY, seq=seq), T0, forwarder="f")
        assert err.value.reason is Reason.LIMIT_EXCEEDED
    assert b.rejections == {Reason.LIMIT_EXCEEDED: 2}
    assert sorted(b.adverts) == sorted([ALICE.peer_id, BOB.peer_id])
