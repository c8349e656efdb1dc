"""GPU adverts: the message rules, verification, and the market book.

Each rejection rule has its own row and its own ``Reason``; the book counts
every rejection by reason, refuses replays, bounds what each forwarder may
hold and evicts by a table-tested policy when full (the node's own advert and
protected peers never), and forgets expired adverts.  Time is an argument
(``now_ms``), so the tests name exact instants.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import (
    Advert,
    AdvertBook,
    GpuInfo,
    Identity,
    Kind,
    PeerMisbehaved,
    Reason,
    SignedAdvert,
    _advert,
    advert_key,
    advert_time_reason,
    class_key,
    encode,
    is_solana_address,
    next_seq,
    parse_compute_capability,
    protocol_version,
    seal,
    sign_advert,
    verify_advert,
    verify_advert_bytes,
)

T0 = 1_700_000_000_000  # an arbitrary "now" in ms
TTL = 600_000
ALICE = Identity.from_rng(random.Random(10))
BOB = Identity.from_rng(random.Random(11))
MALLORY = Identity.from_rng(random.Random(12))
PAYOUT = "11111111111111111111111111111111"  # the system program: a valid 32-byte address

H100 = GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_capability="9.0",
               driver_version="550.54.15", cuda_version="12.4", uuid_hash="ab" * 16)
A10 = GpuInfo(model="NVIDIA A10", memory_mb=23028, compute_capability="8.6")


def make_advert(ident: Identity = ALICE, **over: Any) -> Advert:
    fields: dict[str, Any] = {
        "peer_id": ident.peer_id, "network": "local", "addrs": ("/ip4/127.0.0.1/tcp/4001",), "seq": 1,
        "issued_at_ms": T0, "expires_at_ms": T0 + TTL, "gpus": (H100, H100), "gpus_free": 2,
        "price_per_gpu_hour": 1_000_000, "currency": "SOL", "payout_address": PAYOUT, "region": "eu-west",
        "runtimes": ("process",), "simulated": False,
    }
    fields.update(over)
    return Advert(**fields)


def wire(ident: Identity = ALICE, **over: Any) -> bytes:
    return sign_advert(ident, make_advert(ident, **over)).wire


def signed_body(body: Any, ident: Identity = ALICE) -> bytes:
    """Envelope bytes around an arbitrary (possibly invalid) advert body."""
    return seal(ident, Kind.ADVERT, body).to_bytes()


def reason_of(fn: Callable[[], Any]) -> Reason:
    with pytest.raises(PeerMisbehaved) as info:
        fn()
    return info.value.reason


# --- the message ---------------------------------------------------------------


def test_valid_advert_round_trips() -> None:
    adv = make_advert()
    sa = verify_advert(sign_advert(ALICE, adv).wire, now_ms=T0 + 1)
    assert isinstance(sa, SignedAdvert)
    assert sa.advert == adv
    assert sa.envelope.signer_peer_id == ALICE.peer_id
    assert Advert.from_obj(adv.to_obj()) == adv
    assert len(sa.wire) < Kind.ADVERT.bytes_max


def test_maximal_advert_fits_the_size_limit() -> None:
    gpu = GpuInfo(model="M" * 64, memory_mb=_advert.memory_mb_max, compute_capability="10.10",
                  driver_version="d" * 32, cuda_version="c" * 16, uuid_hash="u" * 64, utilization_pct=100)
    tail = f"/tcp/65535/p2p/{ALICE.peer_id}"
    longest = "/dns4/" + "a" * (_advert.addr_len_max - len("/dns4/") - len(tail)) + tail
    assert len(longest) == _advert.addr_len_max
    adv = make_advert(
        network="n" * 32, addrs=(longest,) * _advert.addrs_max,
        seq=2**63 - 1, issued_at_ms=2**62, expires_at_ms=2**62 + _advert.ttl_ms_max,
        gpus=(gpu,) * _advert.gpus_max,
        gpus_free=_advert.gpus_max, price_per_gpu_hour=2**63 - 1, currency="c" * 64, region="r" * 32,
        runtimes=("process", "ray") * 4,
    )
    sa = sign_advert(ALICE, adv)
    assert verify_advert(sa.wire, now_ms=2**62).advert == adv


def test_sign_advert_refuses_another_peers_advert() -> None:
    with pytest.raises(ValueError):
        sign_advert(BOB, make_advert(ALICE))


def test_gpu_class_and_dht_keys() -> None:
    assert H100.gpu_class == "nvidia-h100-80gb-hbm3/80gb"
    assert A10.gpu_class == "nvidia-a10/22gb"
    adv = make_advert(gpus=(H100, A10, H100), gpus_free=1)
    assert adv.gpu_classes == ("nvidia-a10/22gb", "nvidia-h100-80gb-hbm3/80gb")
    key = advert_key(ALICE.peer_id)
    assert key.startswith("/p2pgpu/") and len(key.encode()) <= 50  # py-libp2p's limit for plain keys
    # Provider keys are hex sha256 multihashes (what py-libp2p's providers expect).
    raw = bytes.fromhex(class_key(H100.gpu_class))
    assert raw[:2] == b"\x12\x20" and len(raw) == 34
    assert class_key(H100.gpu_class) != class_key(A10.gpu_class)
    assert advert_key(ALICE.peer_id) != advert_key(BOB.peer_id)
    # A pure function of the class: the same in every process.
    assert class_key(H100.gpu_class) == class_key("nvidia-h100-80gb-hbm3/80gb")
    assert advert_key(ALICE.peer_id) == advert_key(Identity.from_rng(random.Random(10)).peer_id)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("8.0", (8, 0)), ("9.0", (9, 0)), ("10.10", (10, 10)), ("8", None), ("8.", None), (".8", None),
     ("8.0.1", None), ("a.b", None), ("8.0\n", None), (" 8.0", None), ("123.0", None), ("", None),
     ("٨.٠", None)],
)
def test_parse_compute_capability(text: str, ok: tuple[int, int] | None) -> None:
    if ok is None:
        with pytest.raises(ValueError):
            parse_compute_capability(text)
    else:
        assert parse_compute_capability(text) == ok


def test_is_solana_address() -> None:
    assert is_solana_address(PAYOUT)
    assert is_solana_address("So11111111111111111111111111111111111111112")
    for bad in ["", "1", "0OIl" * 11, "é", ALICE.peer_id, "1" * 64, PAYOUT + "\n", PAYOUT + " ",
                " " + PAYOUT]:
        assert not is_solana_address(bad)


GPU_BAD: list[tuple[str, dict[str, Any]]] = [
    ("empty model", {"model": ""}),
    ("long model", {"model": "x" * 65}),
    ("zero memory", {"memory_mb": 0}),
    ("huge memory", {"memory_mb": _advert.memory_mb_max + 1}),
    ("bad cc", {"compute_capability": "sm_90"}),
    ("cc with newline", {"compute_capability": "8.0\n"}),
    ("long driver", {"driver_version": "1" * 33}),
    ("long cuda", {"cuda_version": "1" * 17}),
    ("long uuid hash", {"uuid_hash": "a" * 65}),
    ("utilization 101", {"utilization_pct": 101}),
    ("utilization -1", {"utilization_pct": -1}),
]


@pytest.mark.parametrize("over", [r[1] for r in GPU_BAD], ids=[r[0] for r in GPU_BAD])
def test_gpu_info_validates(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(H100, **over)
    obj = {**H100.to_obj(), **over}
    assert reason_of(lambda: GpuInfo.from_obj(obj)) is Reason.BAD_SCHEMA


@pytest.mark.parametrize(
    "obj",
    [None, [], "gpu", {"model": "x"}, {**H100.to_obj(), "extra": 1}, {**H100.to_obj(), "memory_mb": True},
     {**H100.to_obj(), "memory_mb": "80"}, {**H100.to_obj(), "model": b"bytes"}, {**H100.to_obj(), 1: 2}],
    ids=repr,
)
def test_gpu_info_from_bad_obj(obj: Any) -> None:
    assert reason_of(lambda: GpuInfo.from_obj(obj)) is Reason.BAD_SCHEMA


def test_gpu_info_optional_fields_default() -> None:
    g = GpuInfo.from_obj({"model": "T4", "memory_mb": 15360, "compute_capability": "7.5"})
    assert (g.driver_version, g.cuda_version, g.uuid_hash, g.utilization_pct) == ("", "", "", 0)


ADVERT_BAD: list[tuple[str, dict[str, Any]]] = [
    ("too many gpus", {"gpus": (H100,) * 17, "gpus_free": 0}),
    ("too many addrs", {"addrs": ("/ip4/1.2.3.4/tcp/1",) * 9}),
    ("more free than gpus", {"gpus_free": 3}),
    ("negative free", {"gpus_free": -1}),
    ("zero lifetime", {"expires_at_ms": T0}),
    ("expires before issue", {"expires_at_ms": T0 - 1}),
    ("lifetime over the max", {"expires_at_ms": T0 + _advert.ttl_ms_max + 1}),
    ("seq 0", {"seq": 0}),
    ("bad payout", {"payout_address": "not-an-address"}),
    ("negative price", {"price_per_gpu_hour": -1}),
    ("unknown runtime", {"runtimes": ("docker",)}),
]


@pytest.mark.parametrize("over", [r[1] for r in ADVERT_BAD], ids=[r[0] for r in ADVERT_BAD])
def test_advert_validates_when_built(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_advert(**over)


def test_empty_payout_and_no_gpus_are_allowed() -> None:
    adv = make_advert(payout_address="", gpus=(), gpus_free=0)
    assert verify_advert(sign_advert(ALICE, adv).wire, now_ms=T0).advert == adv


def _body(**over: Any) -> dict[str, Any]:
    body = make_advert().to_obj()
    body.update(over)
    return body


BODY_BAD: list[tuple[str, Any]] = [
    ("not a map", ["advert"]),
    ("missing seq", {k: v for k, v in _body().items() if k != "seq"}),
    ("unknown field", _body(extra=1)),
    ("seq 0", _body(seq=0)),
    ("seq as str", _body(seq="1")),
    ("seq as bool", _body(seq=True)),
    ("seq over int64", _body(seq=2**63)),
    ("negative issue time", _body(issued_at_ms=-1)),
    ("gpus not a list", _body(gpus={"model": "x"})),
    ("17 gpus", _body(gpus=[H100.to_obj()] * 17)),
    ("gpu missing memory", _body(gpus=[{"model": "x", "compute_capability": "8.0"}])),
    ("gpu float-free check: memory str", _body(gpus=[{**H100.to_obj(), "memory_mb": "1"}])),
    ("gpus_free over gpus", _body(gpus_free=3)),
    ("gpus_free over max", _body(gpus_free=17)),
    ("empty network", _body(network="")),
    ("long network", _body(network="n" * 33)),
    ("empty peer id", _body(peer_id="")),
    ("empty region", _body(region="")),
    ("empty currency", _body(currency="")),
    ("bad payout", _body(payout_address="0" * 44)),
    ("addr empty", _body(addrs=[""])),
    ("addr not str", _body(addrs=[b"/ip4"])),
    ("addr too long", _body(addrs=["a" * 257])),
    ("9 addrs", _body(addrs=["/ip4/1.2.3.4/tcp/1"] * 9)),
    # #14: an advert's addresses are TCP multiaddrs someone can dial that name
    # no peer but their owner (and, through a relay, the relay).
    ("addr not a multiaddr", _body(addrs=["a"])),
    ("addr not tcp", _body(addrs=["/ip4/1.2.3.4/udp/1/quic-v1"])),
    ("addr port 0", _body(addrs=["/ip4/1.2.3.4/tcp/0"])),
    ("addr unspecified", _body(addrs=["/ip4/0.0.0.0/tcp/4001"])),
    ("addr multicast", _body(addrs=["/ip6/ff02::1/tcp/4001"])),
    ("addr names another peer", _body(addrs=[f"/ip4/1.2.3.4/tcp/1/p2p/{BOB.peer_id}"])),
    ("addr through itself", _body(addrs=[f"/ip4/1.2.3.4/tcp/1/p2p/{ALICE.peer_id}/p2p-circuit"])),
    ("relay addr for another peer",
     _body(addrs=[f"/ip4/1.2.3.4/tcp/1/p2p/{BOB.peer_id}/p2p-circuit/p2p/{BOB.peer_id}"])),
    ("runtime unknown", _body(runtimes=["docker"])),
    ("9 runtimes", _body(runtimes=["process"] * 9)),
    ("simulated as int", _body(simulated=0)),
    ("ttl over max", _body(expires_at_ms=T0 + _advert.ttl_ms_max + 1)),
    ("expires before issue", _body(expires_at_ms=T0 - 1)),
]


@pytest.mark.parametrize("body", [r[1] for r in BODY_BAD], ids=[r[0] for r in BODY_BAD])
def test_malformed_advert_body_is_bad_schema(body: Any) -> None:
    assert reason_of(lambda: verify_advert(signed_body(body), now_ms=T0)) is Reason.BAD_SCHEMA
    if isinstance(body, dict):
        assert reason_of(lambda: Advert.from_obj(body)) is Reason.BAD_SCHEMA


# --- verification ----------------------------------------------------------------


def _resign_as(ident: Identity, data: bytes) -> bytes:
    """Mallory re-signs Alice's advert body with her own key (a forgery)."""
    body = verify_advert(data, now_ms=T0).advert.to_obj()
    return signed_body(body, ident)


def _flip_signature(data: bytes) -> bytes:
    obj = sign_advert(ALICE, make_advert()).envelope.to_obj()
    assert encode(obj) == data
    obj["g"] = obj["g"][:-1] + bytes([obj["g"][-1] ^ 1])
    return encode(obj)


VERIFY_BAD: list[tuple[str, Callable[[], bytes], int, Reason]] = [
    ("garbage", lambda: b"\xc1\x00garbage", T0, Reason.MALFORMED),
    ("empty", lambda: b"", T0, Reason.MALFORMED),
    ("truncated", lambda: wire()[:-10], T0, Reason.MALFORMED),
    ("oversized", lambda: b"\x00" * (Kind.ADVERT.bytes_max + 1), T0, Reason.OVERSIZED),
    ("not an envelope", lambda: encode({"peer_id": "x"}), T0, Reason.BAD_SCHEMA),
    ("forged: signed by another key", lambda: _resign_as(MALLORY, wire()), T0, Reason.SIGNER_MISMATCH),
    ("forged: signature flipped", lambda: _flip_signature(wire()), T0, Reason.BAD_SIGNATURE),
    ("other kind", lambda: seal(ALICE, Kind.OFFER, make_advert().to_obj()).to_bytes(), T0, Reason.WRONG_KIND),
    ("expired", lambda: wire(), T0 + TTL, Reason.EXPIRED),
    ("long expired", lambda: wire(), T0 + 10 * TTL, Reason.EXPIRED),
    ("not yet valid", lambda: wire(), T0 - _advert.clock_skew_ms_max - 1, Reason.NOT_YET_VALID),
    ("non-canonical envelope", lambda: msgpack.packb(
        dict(reversed(list(sign_advert(ALICE, make_advert()).envelope.to_obj().items()))), use_bin_type=True),
     T0, Reason.NON_CANONICAL),
]


@pytest.mark.parametrize(("make", "now_ms", "reason"), [r[1:] for r in VERIFY_BAD],
                         ids=[r[0] for r in VERIFY_BAD])
def test_verify_advert_rejects(make: Callable[[], bytes], now_ms: int, reason: Reason) -> None:
    assert reason_of(lambda: verify_advert(make(), now_ms=now_ms)) is reason


def test_validity_window_edges() -> None:
    data = wire()
    verify_advert(data, now_ms=T0 - _advert.clock_skew_ms_max)  # within the allowed skew
    verify_advert(data, now_ms=T0 + TTL - 1)  # last valid millisecond
    assert reason_of(lambda: verify_advert(data, now_ms=T0 + TTL)) is Reason.EXPIRED
    assert reason_of(lambda: verify_advert(data, now_ms=T0 - 1, clock_skew_ms=0)) is Reason.NOT_YET_VALID


def test_time_is_judged_apart_from_the_bytes() -> None:
    # What depends on the bytes can be cached; time is each node's own.
    data = wire()
    sa = verify_advert_bytes(data)
    assert sa.advert.peer_id == ALICE.peer_id
    adv = sa.advert
    assert advert_time_reason(adv.issued_at_ms, adv.expires_at_ms, T0) is None
    assert advert_time_reason(adv.issued_at_ms, adv.expires_at_ms, T0 + TTL) is Reason.EXPIRED
    assert advert_time_reason(adv.issued_at_ms, adv.expires_at_ms, T0 - 60_001) is Reason.NOT_YET_VALID
    assert advert_time_reason(adv.issued_at_ms, adv.expires_at_ms, T0 - 1, 0) is Reason.NOT_YET_VALID
    assert reason_of(lambda: verify_advert_bytes(b"\x80" * 9000)) is Reason.OVERSIZED
    assert reason_of(lambda: verify_advert_bytes(_resign_as(MALLORY, data))) is Reason.SIGNER_MISMATCH


def test_envelope_version_is_checked() -> None:
    obj = sign_advert(ALICE, make_advert()).envelope.to_obj()
    obj["v"] = protocol_version + 1
    assert reason_of(lambda: verify_advert(encode(obj), now_ms=T0)) is Reason.UNSUPPORTED_VERSION


# --- the book --------------------------------------------------------------------


def book(**kw: Any) -> AdvertBook:
    return AdvertBook(network=kw.pop("network", "local"), allow_simulated=kw.pop("allow_simulated", True),
                      **kw)


def test_book_ingests_and_lists() -> None:
    b = book()
    b.ingest(wire(ALICE), T0)
    b.ingest(wire(BOB, gpus=(A10,), gpus_free=1), T0)
    assert [a.peer_id for a in b.live(T0)] == sorted([ALICE.peer_id, BOB.peer_id])
    assert b.accepted == 2 and b.rejections == {}


def test_book_check_does_not_store() -> None:
    b = book()
    assert b.check(wire(), T0).advert.peer_id == ALICE.peer_id
    assert b.adverts == {}


def test_replays_are_refused_and_counted() -> None:
    b = book()
    b.ingest(wire(seq=5), T0)
    for seq in (5, 4, 1):
        assert reason_of(lambda s=seq: b.ingest(wire(seq=s), T0)) is Reason.REPLAYED
    assert b.rejections == {Reason.REPLAYED: 3}
    b.ingest(wire(seq=6, gpus_free=1), T0 + 1)
    assert b.adverts[ALICE.peer_id].advert.seq == 6
    assert b.adverts[ALICE.peer_id].advert.gpus_free == 1
    # The very same bytes again: a replay.
    same = wire(seq=7)
    b.ingest(same, T0)
    assert reason_of(lambda: b.ingest(same, T0)) is Reason.REPLAYED


BOOK_BAD: list[tuple[str, dict[str, Any], Callable[[], bytes], Reason]] = [
    ("simulated on a real network", {"network": "local", "allow_simulated": False},
     lambda: wire(simulated=True), Reason.SIMULATED_FORBIDDEN),
    ("wrong network", {"network": "mainnet"}, lambda: wire(network="devnet"), Reason.WRONG_NETWORK),
    ("forged", {}, lambda: _resign_as(MALLORY, wire()), Reason.SIGNER_MISMATCH),
    ("expired", {}, lambda: wire(issued_at_ms=T0 - TTL, expires_at_ms=T0), Reason.EXPIRED),
    ("not yet valid", {}, lambda: wire(issued_at_ms=T0 + 10 * 60_000, expires_at_ms=T0 + TTL * 2),
     Reason.NOT_YET_VALID),
    ("oversized", {}, lambda: b"\x80" * 9000, Reason.OVERSIZED),
    ("malformed", {}, lambda: b"\xdd\xff\xff\xff\xff", Reason.MALFORMED),
]


@pytest.mark.parametrize(("kw", "make", "reason"), [r[1:] for r in BOOK_BAD], ids=[r[0] for r in BOOK_BAD])
def test_book_rejections_are_counted_by_reason(kw: dict[str, Any], make: Callable[[], bytes],
                                               reason: Reason) -> None:
    b = book(**kw)
    data = make()
    assert reason_of(lambda: b.ingest(data, T0)) is reason
    assert reason_of(lambda: b.ingest(data, T0)) is reason
    assert b.rejections == {reason: 2}
    assert b.adverts == {} and b.accepted == 0


def test_check_record_skips_only_the_seq_rule() -> None:
    # A DHT record is checked for everything but freshness against our book.
    b = book(allow_simulated=False)
    b.ingest(wire(seq=5), T0)
    assert b.check_record(wire(seq=5), T0).advert.seq == 5
    assert b.check_record(wire(seq=4), T0).advert.seq == 4
    assert reason_of(lambda: b.check_record(wire(simulated=True), T0)) is Reason.SIMULATED_FORBIDDEN
    assert reason_of(lambda: b.check_record(wire(network="x"), T0)) is Reason.WRONG_NETWORK
    assert reason_of(lambda: b.check_record(wire(), T0 + TTL)) is Reason.EXPIRED
    assert b.rejections == {}  # check_record counts nothing


def test_ingest_can_leave_replays_uncounted() -> None:
    b = book()
    b.ingest(wire(seq=5), T0)
    assert reason_of(lambda: b.ingest(wire(seq=5), T0, count_replays=False)) is Reason.REPLAYED
    assert b.rejections == {}
    assert reason_of(lambda: b.ingest(wire(seq=5, network="x"), T0,
                                      count_replays=False)) is Reason.WRONG_NETWORK
    assert b.rejections == {Reason.WRONG_NETWORK: 1}


def test_simulated_allowed_where_the_network_allows() -> None:
    b = book(allow_simulated=True)
    assert b.ingest(wire(simulated=True), T0).advert.simulated


def test_expire_drops_stale_adverts_in_order() -> None:
    b = book()
    b.ingest(wire(ALICE, expires_at_ms=T0 + 1000), T0)
    b.ingest(wire(BOB, expires_at_ms=T0 + 2000), T0)
    b.ingest(wire(MALLORY, expires_at_ms=T0 + 1000), T0)
    assert b.expire(T0 + 999) == []
    assert len(b.live(T0 + 999)) == 3
    # live() hides expired adverts even before expire() runs.
    assert [a.peer_id for a in b.live(T0 + 1000)] == [BOB.peer_id]
    assert b.expire(T0 + 1000) == sorted([ALICE.peer_id, MALLORY.peer_id])
    assert list(b.adverts) == [BOB.peer_id]
    assert b.expire(T0 + 5000) == [BOB.peer_id]
    assert b.adverts == {}


def test_after_expiry_a_lower_seq_is_accepted_again() -> None:
    # Once forgotten, a peer that restarted with a lower seq can rejoin.
    b = book()
    b.ingest(wire(seq=10, expires_at_ms=T0 + 1000), T0)
    b.expire(T0 + 1000)
    b.ingest(wire(seq=3, issued_at_ms=T0 + 1000, expires_at_ms=T0 + 5000), T0 + 1000)
    assert b.adverts[ALICE.peer_id].advert.seq == 3


# --- the book under a flood: eviction is table-driven -------------------------------
#
# Peers are named p1, p2, ...; forwarders F, G, H.  Each step is one of
#   ("in", peer, forwarder)       ingest succeeds
#   ("full", peer, forwarder)     ingest is refused with LIMIT_EXCEEDED
#   ("own", peer)                 add_own (never refused)
#   ("protect", peer) / ("unprotect", peer)
#   ("update", peer, forwarder)   a newer advert of a known peer (never refused)
# and the row names the peers the book holds at the end.

POOL = {f"p{i}": Identity.from_rng(random.Random(1000 + i)) for i in range(1, 13)}
_SEQ = iter(range(1, 1_000_000))


def _step(b: AdvertBook, step: tuple[str, ...]) -> None:
    op, name = step[0], step[1]
    ident = POOL[name]
    if op == "in" or op == "update":
        b.ingest(wire(ident, seq=next(_SEQ)), T0, forwarder=step[2])
    elif op == "full":
        assert reason_of(lambda: b.ingest(wire(ident, seq=next(_SEQ)), T0, forwarder=step[2])) \
            is Reason.LIMIT_EXCEEDED
    elif op == "own":
        b.add_own(sign_advert(ident, make_advert(ident, seq=next(_SEQ))))
    elif op == "protect":
        assert b.protect(ident.peer_id)
    elif op == "unprotect":
        b.unprotect(ident.peer_id)
    else:
        raise AssertionError(op)


EVICTION: list[tuple[str, dict[str, int], list[tuple[str, ...]], list[str]]] = [
    ("a lighter forwarder's newcomer evicts the heaviest forwarder's newest", {"adverts_max": 4, "adverts_per_forwarder_max": 4},
     [("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "F"), ("in", "p4", "G"), ("in", "p5", "G")],
     ["p1", "p2", "p4", "p5"]),
    ("equally heavy: the newcomer is the newest, it is refused", {"adverts_max": 4, "adverts_per_forwarder_max": 4},
     [("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "G"), ("in", "p4", "G"), ("full", "p5", "G"),
      ("full", "p5", "F")],
     ["p1", "p2", "p3", "p4"]),
    ("a new forwarder gets a share: two lighter than the heaviest is enough", {"adverts_max": 4,
                                                                              "adverts_per_forwarder_max": 4},
     [("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "G"), ("in", "p4", "G"), ("in", "p5", "H")],
     ["p1", "p2", "p3", "p5"]),
    ("one forwarder's share is capped even with room left", {"adverts_max": 10, "adverts_per_forwarder_max": 2},
     [("in", "p1", "F"), ("in", "p2", "F"), ("full", "p3", "F"), ("in", "p3", "G")],
     ["p1", "p2", "p3"]),
    ("the default share is a quarter of the book", {"adverts_max": 8},
     [("in", "p1", "F"), ("in", "p2", "F"), ("full", "p3", "F"), ("in", "p3", "G")],
     ["p1", "p2", "p3"]),
    ("our own advert is never refused and takes no one's place", {"adverts_max": 2, "adverts_per_forwarder_max": 2},
     [("in", "p1", "F"), ("in", "p2", "G"), ("own", "p9"), ("own", "p9"), ("full", "p3", "H")],
     ["p1", "p2", "p9"]),
    ("our own advert, first heard from the network, leaves the forwarder's share", {"adverts_max": 8},
     [("in", "p9", "F"), ("in", "p1", "F"), ("own", "p9"), ("in", "p2", "F")],
     ["p1", "p2", "p9"]),
    ("a known peer's update is never refused for space", {"adverts_max": 4, "adverts_per_forwarder_max": 4},
     [("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "G"), ("in", "p4", "G"), ("update", "p1", "H"),
      ("update", "p4", "F")],
     ["p1", "p2", "p3", "p4"]),
    ("a protected peer is never evicted: the forwarder's next newest goes", {"adverts_max": 4, "adverts_per_forwarder_max": 4},
     [("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "F"), ("protect", "p3"), ("in", "p4", "G"),
      ("full", "p5", "G"), ("in", "p6", "H")],
     ["p1", "p3", "p4", "p6"]),
    ("a protected newcomer takes the heaviest forwarder's newest place", {"adverts_max": 4, "adverts_per_forwarder_max": 4},
     [("protect", "p5"), ("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "F"), ("in", "p4", "G"),
      ("in", "p5", "G")],
     ["p1", "p2", "p4", "p5"]),
    ("unprotected again, a peer is its forwarder's newest", {"adverts_max": 4, "adverts_per_forwarder_max": 4},
     [("in", "p1", "F"), ("protect", "p1"), ("in", "p2", "F"), ("in", "p3", "F"), ("unprotect", "p1"),
      ("in", "p4", "G"), ("in", "p5", "G")],
     ["p2", "p3", "p4", "p5"]),
    ("ties go against the forwarder that grew last", {"adverts_max": 6, "adverts_per_forwarder_max": 6},
     [("in", "p1", "F"), ("in", "p2", "F"), ("in", "p3", "G"), ("in", "p4", "H"), ("in", "p5", "H"),
      ("in", "p6", "G"), ("in", "p7", "K")],
     ["p1", "p2", "p3", "p4", "p5", "p7"]),
]


@pytest.mark.parametrize(("kw", "steps", "kept"), [r[1:] for r in EVICTION], ids=[r[0] for r in EVICTION])
def test_book_eviction(kw: dict[str, int], steps: list[tuple[str, ...]], kept: list[str]) -> None:
    b = book(**kw)
    for step in steps:
        _step(b, step)
    assert sorted(b.adverts) == sorted(POOL[k].peer_id for k in kept)
    refused = sum(1 for s in steps if s[0] == "full")
    assert b.rejections.get(Reason.LIMIT_EXCEEDED, 0) == refused


def test_protected_peers_are_bounded_to_half_the_book() -> None:
    b = book(adverts_max=4, protected_max=100)
    assert b.protected_max == 2
    assert b.protect(POOL["p1"].peer_id) and b.protect(POOL["p2"].peer_id)
    assert not b.protect(POOL["p3"].peer_id)
    assert b.protected() == [POOL["p1"].peer_id, POOL["p2"].peer_id]


@pytest.mark.parametrize("kw", [{"adverts_max": 1}, {"adverts_max": 4, "adverts_per_forwarder_max": 5},
                                {"adverts_per_forwarder_max": -1}])
def test_book_limits_are_checked(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        book(**kw)


def test_a_flood_through_one_forwarder_keeps_every_honest_advert() -> None:
    """#12.2: 10,000 valid adverts from fresh identities, all through one
    peer, against a book of the default size that already holds 40 honest
    adverts from four honest forwarders.  The flood takes its forwarder's share
    only; every honest advert stays; our own refresh and a new honest peer are
    still accepted."""
    b = book()
    honest = [Identity.from_rng(random.Random(5000 + i)) for i in range(41)]
    for i, ident in enumerate(honest[:40]):
        b.ingest(wire(ident), T0, forwarder=f"honest{i % 4}")
    b.add_own(sign_advert(ALICE, make_advert(ALICE, seq=1)))
    base = sign_advert(MALLORY, make_advert(MALLORY)).envelope
    flooded = refused = 0
    rng = random.Random(99)
    for _ in range(10_000):
        fake = Identity.from_rng(rng)
        try:
            b.ingest(wire(fake, expires_at_ms=T0 + 3_600_000), T0, forwarder="attacker")
            flooded += 1
        except PeerMisbehaved as exc:
            assert exc.reason is Reason.LIMIT_EXCEEDED
            refused += 1
    assert base is not None
    assert flooded == b.adverts_per_forwarder_max == 2_500 and refused == 7_500
    assert all(ident.peer_id in b.adverts for ident in honest[:40])
    b.add_own(sign_advert(ALICE, make_advert(ALICE, seq=2)))  # the refresh that used to crash the daemon
    assert b.adverts[ALICE.peer_id].advert.seq == 2
    b.ingest(wire(honest[40]), T0, forwarder="honest0")
    # A market sync serves ours first, then the oldest: the honest peers.
    served = [sa.advert.peer_id for sa in b.by_age(T0, 41)]
    assert served == [ALICE.peer_id] + [i.peer_id for i in honest[:40]]


def test_sybil_forwarders_share_a_full_book_and_honest_shares_survive() -> None:
    """Forty flooding forwarders (Sybil connections) against a full book: the
    heaviest forwarder always pays, so the honest forwarders, each lighter
    than the attackers' share, keep all they had."""
    b = book(adverts_max=200)
    honest = [Identity.from_rng(random.Random(6000 + i)) for i in range(20)]
    for i, ident in enumerate(honest):
        b.ingest(wire(ident), T0, forwarder=f"honest{i % 4}")  # 5 each
    rng = random.Random(7)
    for round_ in range(30):
        for k in range(40):
            try:
                b.ingest(wire(Identity.from_rng(rng)), T0, forwarder=f"sybil{k}")
            except PeerMisbehaved as exc:
                assert exc.reason is Reason.LIMIT_EXCEEDED
    assert len(b.adverts) == 200
    assert all(ident.peer_id in b.adverts for ident in honest)
    assert max(b.held_by(f"sybil{k}") for k in range(40)) <= 5
    forwarders = [*(f"sybil{k}" for k in range(40)), *(f"honest{i}" for i in range(4))]
    assert b.largest_share() == max(b.held_by(f) for f in forwarders) > 0


class _ReferenceBook:
    """The eviction policy written the slow, obvious way (a scan per insert),
    to check the O(1) bookkeeping of :class:`AdvertBook` against."""

    def __init__(self, adverts_max: int, quota: int) -> None:
        self.max, self.quota = adverts_max, quota
        self.stored: set[str] = set()
        self.attached: dict[str, tuple[str, int]] = {}  # evictable pid -> (forwarder, stamp)
        self.origin: dict[str, str] = {}
        self.protected: list[str] = []
        self.moved: dict[str, int] = {}  # forwarder -> when its count last changed
        self.clock = 0
        self.refused = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _attach(self, pid: str, fwd: str) -> None:
        self.attached[pid] = (fwd, self._tick())
        self.moved[fwd] = self.clock

    def _detach(self, pid: str) -> None:
        fwd, _ = self.attached.pop(pid)
        self.moved[fwd] = self._tick()

    def _counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fwd, _ in self.attached.values():
            out[fwd] = out.get(fwd, 0) + 1
        return out

    def _evict_heaviest(self) -> None:
        counts = self._counts()
        top = max(counts.values())
        heavy = max((f for f, c in counts.items() if c == top), key=lambda f: self.moved[f])
        victim = max((p for p, (f, _) in self.attached.items() if f == heavy), key=lambda p: self.attached[p][1])
        self._detach(victim)
        self.stored.discard(victim)

    def ingest(self, pid: str, fwd: str) -> None:
        if pid in self.stored:
            return
        if pid not in self.protected:
            held = self._counts().get(fwd, 0)
            if held >= self.quota:
                self.refused += 1
                return
            if len(self.stored) >= self.max:
                if max(self._counts().values()) < held + 2:
                    self.refused += 1
                    return
                self._evict_heaviest()
        elif len(self.stored) >= self.max:
            self._evict_heaviest()
        self.stored.add(pid)
        self.origin[pid] = fwd
        if pid not in self.protected:
            self._attach(pid, fwd)

    def protect(self, pid: str) -> None:
        if pid in self.protected or len(self.protected) >= self.max // 2:
            return
        self.protected.append(pid)
        if pid in self.attached:
            self._detach(pid)

    def unprotect(self, pid: str) -> None:
        if pid in self.protected:
            self.protected.remove(pid)
            if pid in self.stored:
                self._attach(pid, self.origin[pid])


_OPS = st.lists(st.tuples(st.sampled_from(["in", "in", "in", "protect", "unprotect"]),
                          st.sampled_from(sorted(POOL)), st.sampled_from("FGH")), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, adverts_max=st.integers(2, 6), quota=st.integers(1, 6))
def test_book_matches_the_reference_policy(ops: list[tuple[str, str, str]], adverts_max: int, quota: int) -> None:
    quota = min(quota, adverts_max)
    b = book(adverts_max=adverts_max, adverts_per_forwarder_max=quota, protected_max=adverts_max)
    ref = _ReferenceBook(adverts_max, quota)
    for op, name, fwd in ops:
        pid = POOL[name].peer_id
        if op == "in":
            try:
                b.ingest(wire(POOL[name], seq=next(_SEQ)), T0, forwarder=fwd)
            except PeerMisbehaved as exc:
                assert exc.reason is Reason.LIMIT_EXCEEDED
            ref.ingest(pid, fwd)
        elif op == "protect":
            b.protect(pid)
            ref.protect(pid)
        else:
            b.unprotect(pid)
            ref.unprotect(pid)
        assert set(b.adverts) == ref.stored
        assert b.rejections.get(Reason.LIMIT_EXCEEDED, 0) == ref.refused
        assert len(b.adverts) <= adverts_max
        for f in "FGH":
            assert b.held_by(f) == ref._counts().get(f, 0)


def test_add_own_follows_the_seq_rule() -> None:
    b = book()
    b.add_own(sign_advert(ALICE, make_advert(seq=2)))
    b.add_own(sign_advert(ALICE, make_advert(seq=1, gpus_free=0)))
    assert b.adverts[ALICE.peer_id].advert.seq == 2
    b.add_own(sign_advert(ALICE, make_advert(seq=3, gpus_free=0)))
    assert b.adverts[ALICE.peer_id].advert.gpus_free == 0
    assert reason_of(lambda: b.ingest(wire(seq=3), T0)) is Reason.REPLAYED


def test_market_filters() -> None:
    b = book()
    b.ingest(wire(ALICE, gpus=(H100,), gpus_free=1), T0)
    b.ingest(wire(BOB, gpus=(A10, A10), gpus_free=2), T0)
    b.ingest(wire(MALLORY, gpus=(), gpus_free=0, expires_at_ms=T0 + 10), T0)
    ids = lambda rows: [a.peer_id for a in rows]
    assert ids(b.market(T0)) == sorted([ALICE.peer_id, BOB.peer_id])  # no GPUs: not on the market
    assert ids(b.market(T0, model="h100")) == [ALICE.peer_id]
    assert ids(b.market(T0, model="A10")) == [BOB.peer_id]
    assert ids(b.market(T0, model="V100")) == []
    assert ids(b.market(T0, memory_mb_min=24_000)) == [ALICE.peer_id]
    assert ids(b.market(T0, model="a10", memory_mb_min=24_000)) == []
    assert ids(b.market(T0 + TTL)) == []  # expired adverts leave the market


@pytest.mark.parametrize(("prev", "now", "expected"), [(0, T0, T0), (T0 + 5, T0, T0 + 6), (T0, T0, T0 + 1),
                                                       (7, 3, 8)])
def test_next_seq(prev: int, now: int, expected: int) -> None:
    assert next_seq(prev, now) == expected
