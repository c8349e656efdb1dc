"""Every decoder either parses its input or raises PeerMisbehaved, never another exception.

Hypothesis feeds each decoder of ``p2pgpu.core`` (``decode``,
``open_envelope``, ``envelope_from_obj``, ``verify_advert``,
``AdvertBook.ingest``, ``Advert.from_obj``, ``GpuInfo.from_obj``) three kinds
of input: arbitrary bytes; arbitrary msgpack-able structures (raw and
encoded); and structured mutations of a valid signed advert (byte flips,
insertions, deletions, truncation, and fields replaced by arbitrary values).
Where a decoder accepts, the result must be consistent: canonical bytes
re-encode to themselves, and a mutated advert that still verifies must be the
original one byte for byte (signatures and canonical form leave no slack).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pgpu.core import (
    Advert,
    AdvertBook,
    Envelope,
    GpuInfo,
    Identity,
    Kind,
    LocalProtocolError,
    PeerMisbehaved,
    Reason,
    SignedAdvert,
    decode,
    encode,
    envelope_from_obj,
    is_solana_address,
    open_envelope,
    parse_compute_capability,
    peer_id_from_public_key,
    public_key_from_peer_id,
    seal,
    sign_advert,
    verify_advert,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000_000
ALICE = Identity.from_rng(random.Random(7))
GPU = GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_capability="9.0",
              driver_version="550.54.15", cuda_version="12.4", uuid_hash="ab" * 16, utilization_pct=3)
ADVERT = Advert(
    peer_id=ALICE.peer_id, network="local", addrs=("/ip4/127.0.0.1/tcp/4001",), seq=3, issued_at_ms=T0,
    expires_at_ms=T0 + 600_000, gpus=(GPU, GPU), gpus_free=1, price_per_gpu_hour=1_000_000, currency="SOL",
    payout_address="11111111111111111111111111111111", region="eu-west", runtimes=("process", "ray"),
    simulated=True,
)
SIGNED = sign_advert(ALICE, ADVERT)
WIRE = SIGNED.wire


def outcome(fn: Callable[[], Any]) -> tuple[Any, Reason | None]:
    """Run a decoder: its value, or the reason it refused.  Any other
    exception propagates and fails the test (that is the point)."""
    try:
        return fn(), None
    except PeerMisbehaved as exc:
        assert isinstance(exc.reason, Reason)
        return None, exc.reason


# --- strategies -------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=80),
)
keys = st.one_of(st.text(max_size=12), st.sampled_from(["k", "v", "b", "s", "g", "model", "memory_mb",
                                                        "seq", "gpus"]))
msgpackable = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=30,
)
# Python objects a careless caller might hand over (not encodable, wrong key types).
pythonish = st.recursive(
    st.one_of(scalars, st.floats(allow_nan=True), st.integers()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(keys, st.integers(), st.binary(max_size=4)), inner, max_size=5),
    ),
    max_leaves=20,
)


# --- raw bytes ----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048), st.booleans())
def test_decode_arbitrary_bytes(data: bytes, canonical: bool) -> None:
    value, reason = outcome(lambda: decode(data, canonical=canonical, size_max=1024))
    if reason is None and canonical:
        assert encode(value) == data


@FUZZ
@given(st.binary(max_size=512))
def test_decode_prefixed_noise(tail: bytes) -> None:
    # Start with a container or length header so the fuzzer reaches deep paths.
    for head in (b"\xdd\x00\x00\x10\x00", b"\xdf\x00\x00\x00\x03", b"\x91" * 20, b"\x85",
                 b"\xc6\x00\x00\x00\x10"):
        outcome(lambda: decode(head + tail))


@FUZZ
@given(st.binary(max_size=1024), st.sampled_from([None, *Kind]))
def test_open_envelope_arbitrary_bytes(data: bytes, kind: Kind | None) -> None:
    outcome(lambda: open_envelope(data, expected=kind))


@FUZZ
@given(st.binary(max_size=1024))
def test_verify_advert_arbitrary_bytes(data: bytes) -> None:
    outcome(lambda: verify_advert(data, now_ms=T0))


@FUZZ
@given(st.lists(st.binary(max_size=256), max_size=5))
def test_book_ingest_arbitrary_bytes(items: list[bytes]) -> None:
    book = AdvertBook(network="local", allow_simulated=True)
    for data in [*items, WIRE]:
        outcome(lambda: book.ingest(data, T0))
    assert list(book.adverts) == [ALICE.peer_id]
    assert sum(book.rejections.values()) == len(items)


# --- msgpack-able structures -----------------------------------------------------------


@FUZZ
@given(msgpackable)
def test_structures_through_every_decoder(obj: Any) -> None:
    outcome(lambda: envelope_from_obj(obj))
    outcome(lambda: envelope_from_obj(obj, expected=Kind.ADVERT))
    outcome(lambda: Advert.from_obj(obj))
    outcome(lambda: GpuInfo.from_obj(obj))
    try:
        data = encode(obj)
    except LocalProtocolError:
        return  # bytes map keys have no canonical form: nothing to send
    value, reason = outcome(lambda: decode(data, canonical=True))
    assert reason is Reason.MALFORMED or value == obj  # MALFORMED only for depth
    outcome(lambda: open_envelope(data))
    outcome(lambda: verify_advert(data, now_ms=T0))


@FUZZ
@given(pythonish)
def test_python_objects_through_from_obj(obj: Any) -> None:
    outcome(lambda: Advert.from_obj(obj))
    outcome(lambda: GpuInfo.from_obj(obj))
    outcome(lambda: envelope_from_obj(obj))


@FUZZ
@given(st.dictionaries(st.text(max_size=8), msgpackable, max_size=4))
def test_envelope_shaped_maps(extra: dict[str, Any]) -> None:
    base = SIGNED.envelope.to_obj()
    obj = {**base, **extra}
    env, reason = outcome(lambda: envelope_from_obj(obj))
    if reason is None:
        assert isinstance(env, Envelope) and env == SIGNED.envelope


# --- structured: a valid advert, mutated ---------------------------------------------------------


def _check_mutant(data: bytes) -> None:
    value, reason = outcome(lambda: verify_advert(data, now_ms=T0))
    if reason is None:
        assert isinstance(value, SignedAdvert)
        assert data == WIRE and value.advert == ADVERT


@FUZZ
@given(st.integers(0, len(WIRE) - 1), st.integers(1, 255))
def test_flip_one_byte(pos: int, xor: int) -> None:
    _check_mutant(WIRE[:pos] + bytes([WIRE[pos] ^ xor]) + WIRE[pos + 1 :])


@FUZZ
@given(st.integers(0, len(WIRE)), st.binary(min_size=1, max_size=16))
def test_insert_bytes(pos: int, junk: bytes) -> None:
    _check_mutant(WIRE[:pos] + junk + WIRE[pos:])


@FUZZ
@given(st.integers(0, len(WIRE) - 1), st.integers(1, 16))
def test_delete_bytes(pos: int, n: int) -> None:
    _check_mutant(WIRE[:pos] + WIRE[pos + n :])


@FUZZ
@given(st.integers(0, len(WIRE)))
def test_truncate(n: int) -> None:
    _check_mutant(WIRE[:n])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(WIRE) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_overwrite_several_bytes(edits: list[tuple[int, int]]) -> None:
    data = bytearray(WIRE)
    for pos, b in edits:
        data[pos] = b
    _check_mutant(bytes(data))


ADVERT_FIELDS = sorted(ADVERT.to_obj())
GPU_FIELDS = sorted(GPU.to_obj())


@FUZZ
@given(st.sampled_from(ADVERT_FIELDS), msgpackable, st.booleans())
def test_advert_field_replaced_then_signed(field: str, value: Any, drop: bool) -> None:
    # Signed by the right key, so only the schema and the rules stand between
    # the body and the book: they must refuse with a reason or accept a valid advert.
    body = ADVERT.to_obj()
    if drop:
        del body[field]
    else:
        body[field] = value
    _sign_and_check(body)


@FUZZ
@given(st.integers(0, 1), st.sampled_from(GPU_FIELDS), msgpackable, st.booleans())
def test_gpu_field_replaced_then_signed(index: int, field: str, value: Any, drop: bool) -> None:
    body = ADVERT.to_obj()
    gpu = body["gpus"][index]
    if drop:
        del gpu[field]
    else:
        gpu[field] = value
    _sign_and_check(body)


def _sign_and_check(body: dict[str, Any]) -> None:
    try:
        data = seal(ALICE, Kind.ADVERT, body).to_bytes()
    except LocalProtocolError:
        return  # we would never send it (no canonical form, or over the limit)
    value, reason = outcome(lambda: verify_advert(data, now_ms=T0))
    if reason is None:
        assert Advert.from_obj(body) == value.advert
        book = AdvertBook(network=value.advert.network, allow_simulated=True)
        book.ingest(data, T0)


# --- text decoders -------------------------------------------------------------------------

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@FUZZ
@given(st.one_of(st.text(max_size=60), st.text(alphabet=B58 + " \n", max_size=60)))
def test_text_decoders(text: str) -> None:
    key, reason = outcome(lambda: public_key_from_peer_id(text))
    if reason is None:
        assert peer_id_from_public_key(key) == text
    if is_solana_address(text):
        assert len(text) in range(32, 45) and text.strip() == text
    try:
        major, minor = parse_compute_capability(text)
        assert text.isascii() and "\n" not in text and 0 <= major <= 99 and 0 <= minor <= 99
    except ValueError:
        pass  # the documented refusal
