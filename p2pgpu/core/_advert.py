"""GPU capability adverts: the signed message, its rules, and the market book.

An advert says what a node offers: its GPUs, how many are free, price, payout
address, region and runtimes, with a sequence number and an expiry.  A
:class:`SignedAdvert` can only be made by signing (:func:`sign_advert`) or by
verifying received bytes (:func:`verify_advert`), so holding one means its
signature, schema and limits were checked.  :class:`AdvertBook` is the pure
core of the local market view: bytes and ``now_ms`` in, an accepted advert or a
typed rejection out; it drops expired adverts and refuses replays.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import base58

from . import _limits as limits
from . import _schema as s
from ._codec import decode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import LocalProtocolError, PeerMisbehaved, Reason
from ._identity import Identity, Verifier
from ._reach import check_advert_addr

gpus_max = limits.gpus_per_node_max
addrs_max = 8
addr_len_max = 256
runtimes_max = 8
#: OCI images a node says it has cached (manifest digests, 64 hex each), so
#: that matching can prefer warm nodes: 8 x 66 bytes keeps the largest
#: advert (7.7 KiB) under its 8 KiB limit (tests/core/test_advert_images.py;
#: 16 would not fit).
images_max = 8
ttl_ms_max = 60 * 60 * 1000
clock_skew_ms_max = limits.clock_skew_ms_max
memory_mb_max = 1 << 22
#: Runtimes a manifest can ask for.
RUNTIMES = ("process", "ray", "oci")
_CC_RE = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")


@lru_cache(maxsize=256)
def parse_compute_capability(text: str) -> tuple[int, int]:
    """``"8.6"`` -> ``(8, 6)``; raises ``ValueError`` on anything else."""
    if not isinstance(text, str) or not _CC_RE.fullmatch(text):  # fullmatch: "$" accepts "8.0\n"
        raise ValueError(f"compute capability must look like '8.0', not {text!r}")
    major, minor = text.split(".")
    return int(major), int(minor)


@lru_cache(maxsize=4096)
def is_solana_address(text: str) -> bool:
    try:
        raw = base58.b58decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    # The base58 package strips trailing whitespace: only the canonical
    # spelling of an address is one.
    return len(raw) == 32 and base58.b58encode(raw).decode("ascii") == text


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuInfo:
    """One GPU as an advert carries it.  ``uuid_hash`` is a hash of the NVML
    UUID, never the UUID itself."""

    model: str
    memory_mb: int
    compute_capability: str
    driver_version: str = ""
    cuda_version: str = ""
    uuid_hash: str = ""
    utilization_pct: int = 0

    def __post_init__(self) -> None:
        if not 0 < len(self.model) <= 64:
            raise ValueError("model must be 1 to 64 characters")
        if not 0 < self.memory_mb <= memory_mb_max:
            raise ValueError("memory_mb out of range")
        parse_compute_capability(self.compute_capability)
        if len(self.driver_version) > 32 or len(self.cuda_version) > 16 or len(self.uuid_hash) > 64:
            raise ValueError("version or uuid_hash too long")
        if not 0 <= self.utilization_pct <= 100:
            raise ValueError("utilization_pct must be 0..100")

    @property
    def vram_gb(self) -> int:
        return round(self.memory_mb / 1024)

    @property
    def gpu_class(self) -> str:
        """``nvidia-h100-80gb-hbm3/80gb``: model slug and VRAM bucket, the key
        under which providers of this class register in the DHT."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.model.lower()).strip("-")
        return f"{slug}/{self.vram_gb}gb"

    def to_obj(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "memory_mb": self.memory_mb,
            "compute_capability": self.compute_capability,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "uuid_hash": self.uuid_hash,
            "utilization_pct": self.utilization_pct,
        }

    @classmethod
    def from_obj(cls, obj: Any, where: str = "gpu") -> GpuInfo:
        # Types are checked here, ranges and lengths once in __post_init__
        # (this is on the advert-verify hot path: one pass, no re-checks).
        if not isinstance(obj, dict):
            raise s.fail(where, "must be a map")
        if not _GPU_REQUIRED <= obj.keys() <= _GPU_FIELDS:
            s.exact_keys(obj, set(_GPU_REQUIRED), _GPU_FIELDS - _GPU_REQUIRED)  # names the field
        for key, value in obj.items():
            if type(value) is not _GPU_TYPES[key]:
                raise s.fail(f"{where}.{key}", f"must be {'an integer' if _GPU_TYPES[key] is int else 'a string'}")
        try:
            return cls(**obj)
        except ValueError as exc:
            raise s.fail(where, str(exc)) from None


_GPU_TYPES: dict[str, type] = {"model": str, "memory_mb": int, "compute_capability": str, "driver_version": str,
                               "cuda_version": str, "uuid_hash": str, "utilization_pct": int}
_GPU_FIELDS = frozenset(_GPU_TYPES)
_GPU_REQUIRED = frozenset({"model", "memory_mb", "compute_capability"})


def class_key(gpu_class: str) -> str:
    """DHT provider key of a GPU class: the hex of a sha256 multihash
    (``1220`` + digest) of ``/p2pgpu/class/<class>``.  py-libp2p reads provider
    keys as hex multihashes and refuses other keys over 50 bytes."""
    return "1220" + hashlib.sha256(f"/p2pgpu/class/{gpu_class}".encode()).hexdigest()


def advert_key(peer_id: str) -> str:
    """DHT key under which a node stores its signed advert (42 bytes)."""
    return "/p2pgpu/a/" + hashlib.sha256(peer_id.encode()).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True, slots=True)
class Advert:
    peer_id: str
    network: str
    addrs: tuple[str, ...]
    seq: int
    issued_at_ms: int
    expires_at_ms: int
    gpus: tuple[GpuInfo, ...]
    gpus_free: int
    price_per_gpu_hour: int
    currency: str
    payout_address: str
    region: str
    runtimes: tuple[str, ...]
    simulated: bool
    #: Cached OCI images (sha256 manifest digests, hex), at most ``images_max``,
    #: sorted, distinct; on the wire only when not empty (older peers refuse
    #: unknown keys).
    images: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.gpus) > gpus_max or len(self.addrs) > addrs_max:
            raise ValueError("too many gpus or addrs")
        if not 0 <= self.gpus_free <= len(self.gpus):
            raise ValueError("gpus_free must be between 0 and the number of GPUs")
        if not 0 < self.expires_at_ms - self.issued_at_ms <= ttl_ms_max:
            raise ValueError(f"an advert lives between 1 ms and {ttl_ms_max} ms")
        if self.seq < 1:
            raise ValueError("seq starts at 1")
        if self.payout_address and not is_solana_address(self.payout_address):
            raise ValueError("payout_address is not a Solana address")
        if self.price_per_gpu_hour < 0:
            raise ValueError("price must not be negative")
        for r in self.runtimes:
            if r not in RUNTIMES:
                raise ValueError(f"unknown runtime {r!r}")
        for a in self.addrs:
            # A TCP multiaddr (maybe through a relay) that names no other
            # peer and that someone can dial (core/_reach.py).
            why = check_advert_addr(a, self.peer_id)
            if why is not None:
                raise ValueError(f"addrs: {why}")
        if len(self.images) > images_max:
            raise ValueError(f"at most {images_max} cached images")
        if list(self.images) != sorted(set(self.images)) or not all(_is_digest(d) for d in self.images):
            raise ValueError("images: distinct sha256 digests (64 lowercase hex), sorted")

    @property
    def gpu_classes(self) -> tuple[str, ...]:
        return tuple(sorted({g.gpu_class for g in self.gpus}))

    def to_obj(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "network": self.network,
            "addrs": list(self.addrs),
            "seq": self.seq,
            "issued_at_ms": self.issued_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "gpus": [g.to_obj() for g in self.gpus],
            "gpus_free": self.gpus_free,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "currency": self.currency,
            "payout_address": self.payout_address,
            "region": self.region,
            "runtimes": list(self.runtimes),
            "simulated": self.simulated,
        } | ({"images": list(self.images)} if self.images else {})

    @classmethod
    def from_obj(cls, body: dict[str, Any]) -> Advert:
        if not isinstance(body, dict):
            raise s.fail("advert", "must be a map")
        s.exact_keys(body, set(_ADVERT_FIELDS), frozenset({"images"}))
        gpus = tuple(GpuInfo.from_obj(g, f"gpus[{i}]") for i, g in enumerate(s.get_list(body, "gpus", gpus_max)))
        try:
            return cls(
                peer_id=s.get_str(body, "peer_id", 64, len_min=1),
                network=s.get_str(body, "network", 32, len_min=1),
                addrs=s.get_str_list(body, "addrs", addrs_max, addr_len_max),
                seq=s.get_int(body, "seq", 1),
                issued_at_ms=s.get_int(body, "issued_at_ms"),
                expires_at_ms=s.get_int(body, "expires_at_ms"),
                gpus=gpus,
                gpus_free=s.get_int(body, "gpus_free", 0, gpus_max),
                price_per_gpu_hour=s.get_int(body, "price_per_gpu_hour"),
                currency=s.get_str(body, "currency", 64, len_min=1),
                payout_address=s.get_str(body, "payout_address", 64),
                region=s.get_str(body, "region", 32, len_min=1),
                runtimes=s.get_str_list(body, "runtimes", runtimes_max, 16),
                simulated=s.get_bool(body, "simulated"),
                images=s.get_str_list(body, "images", images_max, 64) if "images" in body else (),
            )
        except ValueError as exc:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


def _is_digest(d: str) -> bool:
    return len(d) == 64 and all(c in "0123456789abcdef" for c in d)


_ADVERT_FIELDS = (
    "peer_id", "network", "addrs", "seq", "issued_at_ms", "expires_at_ms", "gpus", "gpus_free",
    "price_per_gpu_hour", "currency", "payout_address", "region", "runtimes", "simulated",
)


@dataclass(frozen=True, slots=True)
class SignedAdvert:
    """An advert whose envelope verified and whose signer is its peer id."""

    advert: Advert
    envelope: Envelope

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


def sign_advert(identity: Identity, advert: Advert) -> SignedAdvert:
    if advert.peer_id != identity.peer_id:
        raise ValueError("an advert is signed by the peer it describes")
    return SignedAdvert(advert, seal(identity, Kind.ADVERT, advert.to_obj()))


def advert_time_reason(issued_at_ms: int, expires_at_ms: int, now_ms: int,
                       clock_skew_ms: int = clock_skew_ms_max) -> Reason | None:
    """Why an advert is not valid at ``now_ms`` (``NOT_YET_VALID``,
    ``EXPIRED``), or ``None``.  Split from the byte checks so that a driver
    may cache what depends on the bytes alone and still judge time with each
    node's own clock (the simulator does)."""
    if issued_at_ms > now_ms + clock_skew_ms:
        return Reason.NOT_YET_VALID
    if expires_at_ms <= now_ms:
        return Reason.EXPIRED
    return None


def verify_advert_bytes(data: bytes, *, verify: Verifier | None = None) -> SignedAdvert:
    """Decode and verify advert bytes (size, encoding, envelope, signature
    with ``verify``, schema, signer), without the time check, or raise
    ``PeerMisbehaved``."""
    obj = decode(data, size_max=Kind.ADVERT.bytes_max, canonical=True)
    env = envelope_from_obj(obj, expected=Kind.ADVERT, verify=verify)
    advert = Advert.from_obj(body_of(env))
    if env.signer_peer_id != advert.peer_id:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "advert not signed by its peer")
    return SignedAdvert(advert, env)


def verify_advert(data: bytes, *, now_ms: int, clock_skew_ms: int = clock_skew_ms_max,
                  verify: Verifier | None = None) -> SignedAdvert:
    """Decode, verify and time-check advert bytes, or raise ``PeerMisbehaved``."""
    sa = verify_advert_bytes(data, verify=verify)
    reason = advert_time_reason(sa.advert.issued_at_ms, sa.advert.expires_at_ms, now_ms, clock_skew_ms)
    if reason is Reason.NOT_YET_VALID:
        raise PeerMisbehaved(reason, "issued in the future")
    if reason is Reason.EXPIRED:
        raise PeerMisbehaved(reason, "advert has expired")
    return sa


@dataclass(slots=True)
class AdvertBook:
    """The adverts a node knows, newest per peer; the pure market core.

    ``ingest`` either stores a strictly newer advert or raises; ``expire``
    drops the stale ones.  Everything a stranger sends is bounded, and the
    entries that matter are never what a flood pushes out:

    - our own advert (:meth:`add_own`) is never refused and never evicted, and
      does not count against ``adverts_max``;
    - peers the node was told to keep (:meth:`protect`: peers it works with,
      bootstrap peers, peers with a record: ``Node.peers_we_work_with``) are
      never evicted;
    - every other advert is attributed to the peer that delivered it first
      (its *forwarder*: the GossipSub neighbour, the peer a market sync came
      from), and no forwarder holds more than ``adverts_per_forwarder_max``
      identities; past that, a new identity from it is refused;
    - when the book is full, a new identity evicts the newest identity of the
      forwarder holding the most, if that forwarder holds at least two more
      than the newcomer's own; otherwise the newcomer, the newest identity of
      an equally heavy forwarder, is refused.

    So a flood of fresh identities through one peer costs that peer its own
    share only, long-known peers go last (newest first within a forwarder),
    and honest forwarders keep a share of the book however many identities
    an attacker makes.  Every insert and eviction is O(1): identities are
    kept per forwarder in insertion order, and forwarders in buckets by how
    many they hold (the largest is found without a scan).  Refused and evicted
    adverts are counted (``rejections[LIMIT_EXCEEDED]``, ``evicted``).
    """

    network: str
    allow_simulated: bool
    adverts_max: int = 10_000
    #: Identities one forwarder may hold (default: a quarter of the book).
    adverts_per_forwarder_max: int = 0
    #: Peers that may be protected at once (at most half the book).
    protected_max: int = 1_024
    adverts: dict[str, SignedAdvert] = field(default_factory=dict)
    rejections: dict[Reason, int] = field(default_factory=dict)
    accepted: int = 0
    #: What matching sees of an advert (``live``, ``market``): the hardware
    #: challenges' claim book hides GPUs whose claim was refused
    #: (``ClaimBook.view``, docs/proofs.md).  None: adverts as signed.
    view: Callable[[Advert, int], Advert] | None = None
    evicted: int = 0
    own_peer_id: str = ""
    #: The signature check (default :func:`~p2pgpu.core.verify_signature`;
    #: the simulator hands in a memoised one).
    verify: Verifier | None = None
    #: peer id -> the forwarder it is attributed to ("" for a local source).
    _forwarder_of: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    #: forwarder -> its identities, oldest first (dicts keep insertion order).
    _by_forwarder: dict[str, dict[str, None]] = field(default_factory=dict, init=False, repr=False)
    #: count -> forwarders holding exactly that many identities.
    _buckets: dict[int, dict[str, None]] = field(default_factory=dict, init=False, repr=False)
    _count_max: int = field(default=0, init=False, repr=False)
    #: every stored peer id but ours, oldest first (the order market syncs serve).
    _first_seen: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    _protected: dict[str, None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.adverts_max < 2:
            raise ValueError("adverts_max must be at least 2")
        if not self.adverts_per_forwarder_max:
            self.adverts_per_forwarder_max = max(1, self.adverts_max // 4)
        if not 0 < self.adverts_per_forwarder_max <= self.adverts_max:
            raise ValueError("adverts_per_forwarder_max must be between 1 and adverts_max")
        self.protected_max = max(0, min(self.protected_max, self.adverts_max // 2))

    # ----------------------------------------------------------- validation

    def check_record(self, data: bytes, now_ms: int) -> SignedAdvert:
        """Signature, schema, time and network rules, but not the sequence
        rule: what a DHT record must satisfy to be stored or served."""
        sa = verify_advert(data, now_ms=now_ms, verify=self.verify)
        adv = sa.advert
        if adv.network != self.network:
            raise PeerMisbehaved(Reason.WRONG_NETWORK, f"advert for network {adv.network!r}")
        if adv.simulated and not self.allow_simulated:
            raise PeerMisbehaved(Reason.SIMULATED_FORBIDDEN, f"network {self.network!r} refuses simulated GPUs")
        return sa

    def check(self, data: bytes, now_ms: int) -> SignedAdvert:
        """Validate without storing: every rule, including that ``seq`` must
        be above the one we know for that peer (a replay is refused)."""
        sa = self.check_record(data, now_ms)
        adv = sa.advert
        known = self.adverts.get(adv.peer_id)
        if known is not None and adv.seq <= known.advert.seq:
            raise PeerMisbehaved(Reason.REPLAYED, f"seq {adv.seq} <= known {known.advert.seq}")
        return sa

    def ingest(self, data: bytes, now_ms: int, *, forwarder: str = "", count_replays: bool = True) -> SignedAdvert:
        """Store a newer advert delivered by ``forwarder`` or raise.
        ``count_replays=False`` is for syncing a peer's whole book, where
        already-known adverts are normal."""
        try:
            sa = self.check(data, now_ms)
            self._store(sa, forwarder)
        except PeerMisbehaved as exc:
            if count_replays or exc.reason is not Reason.REPLAYED:
                self.rejections[exc.reason] = self.rejections.get(exc.reason, 0) + 1
            raise
        return sa

    def add_own(self, sa: SignedAdvert) -> None:
        """Our own advert: already trusted, still subject to the seq rule, and
        never refused for space."""
        pid = sa.advert.peer_id
        if self.own_peer_id and pid != self.own_peer_id:
            raise LocalProtocolError("a book holds one own advert: this is another peer's")
        if not self.own_peer_id:
            # It may have come from the network first (an earlier life of ours):
            # keep the advert, drop it from the evictable structures.
            if pid in self._forwarder_of:
                self._detach(pid)
                del self._forwarder_of[pid]
            self._first_seen.pop(pid, None)
            self._protected.pop(pid, None)
            self.own_peer_id = pid
        known = self.adverts.get(pid)
        if known is None or sa.advert.seq > known.advert.seq:
            self.adverts[pid] = sa

    # --------------------------------------------------------- protection

    def protect(self, peer_id: str) -> bool:
        """Never evict ``peer_id``'s advert (a peer the node works with).
        False if ``protected_max`` peers are protected already."""
        if peer_id in self._protected or peer_id == self.own_peer_id:
            return True
        if len(self._protected) >= self.protected_max:
            return False
        self._protected[peer_id] = None
        if peer_id in self._forwarder_of:
            self._detach(peer_id)
        return True

    def unprotect(self, peer_id: str) -> None:
        """Make ``peer_id`` evictable again, as the newest identity of the
        forwarder that delivered it."""
        if peer_id not in self._protected:
            return
        del self._protected[peer_id]
        if peer_id in self._forwarder_of:
            self._attach(peer_id, self._forwarder_of[peer_id])

    def protected(self) -> list[str]:
        return list(self._protected)

    # ------------------------------------------------------------- storing

    def _store(self, sa: SignedAdvert, forwarder: str) -> None:
        pid = sa.advert.peer_id
        if pid in self.adverts or pid == self.own_peer_id:
            self.adverts[pid] = sa  # a known peer's update is never refused for space
            self.accepted += 1
            return
        if pid not in self._protected:
            self._make_room(forwarder)
        elif self._size() >= self.adverts_max:
            self._evict(self._heaviest())  # protected_max <= adverts_max / 2: someone is evictable
        self.adverts[pid] = sa
        self._first_seen[pid] = None
        self._forwarder_of[pid] = forwarder
        if pid not in self._protected:
            self._attach(pid, forwarder)
        self.accepted += 1

    def _make_room(self, forwarder: str) -> None:
        held = len(self._by_forwarder.get(forwarder, ()))
        if held >= self.adverts_per_forwarder_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, "this forwarder's share of the advert book is full")
        if self._size() < self.adverts_max:
            return
        if self._count_max < held + 2:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, "advert book is full")
        self._evict(self._heaviest())

    def _size(self) -> int:
        return len(self.adverts) - (self.own_peer_id in self.adverts)

    def _heaviest(self) -> str:
        # Of equally heavy forwarders, the one that reached that count last:
        # its newest identity is likely the newest of theirs.
        return next(reversed(self._buckets[self._count_max]))

    def _evict(self, forwarder: str) -> None:
        victim = next(reversed(self._by_forwarder[forwarder]))  # its newest identity
        self._forget(victim)
        self.evicted += 1

    def _attach(self, pid: str, forwarder: str) -> None:
        ids = self._by_forwarder.setdefault(forwarder, {})
        n = len(ids)
        if n:
            self._unbucket(forwarder, n)
        ids[pid] = None
        self._buckets.setdefault(n + 1, {})[forwarder] = None
        self._count_max = max(self._count_max, n + 1)

    def _detach(self, pid: str) -> None:
        forwarder = self._forwarder_of[pid]
        ids = self._by_forwarder.get(forwarder)
        if ids is None or pid not in ids:
            return  # protected: in no bucket
        n = len(ids)
        del ids[pid]
        self._unbucket(forwarder, n)
        if n > 1:
            self._buckets.setdefault(n - 1, {})[forwarder] = None
        else:
            del self._by_forwarder[forwarder]
        if not self._buckets.get(self._count_max):
            self._count_max -= 1  # counts move by one: the next bucket down is the largest now
            while self._count_max > 0 and not self._buckets.get(self._count_max):
                self._count_max -= 1  # only when the book empties

    def _unbucket(self, forwarder: str, n: int) -> None:
        bucket = self._buckets[n]
        del bucket[forwarder]
        if not bucket:
            del self._buckets[n]

    def _forget(self, pid: str) -> None:
        if pid in self._forwarder_of:
            self._detach(pid)
            del self._forwarder_of[pid]
        self._first_seen.pop(pid, None)
        self.adverts.pop(pid, None)

    # ----------------------------------------------------------- reading

    def held_by(self, forwarder: str) -> int:
        """How many evictable identities ``forwarder`` holds."""
        return len(self._by_forwarder.get(forwarder, ()))

    def largest_share(self) -> int:
        """The most evictable identities any one forwarder holds (``status``)."""
        return max((len(ids) for ids in self._by_forwarder.values()), default=0)

    def expire(self, now_ms: int) -> list[str]:
        gone = sorted(pid for pid, sa in self.adverts.items()
                      if sa.advert.expires_at_ms <= now_ms and pid != self.own_peer_id)
        for pid in gone:
            self._forget(pid)
        own = self.adverts.get(self.own_peer_id)
        if own is not None and own.advert.expires_at_ms <= now_ms:
            del self.adverts[self.own_peer_id]
            gone.append(self.own_peer_id)
        return gone

    def by_age(self, now_ms: int, limit: int) -> list[SignedAdvert]:
        """Up to ``limit`` live adverts for a peer that syncs our market: ours,
        then protected peers', then the rest oldest first (long-known peers
        before the newest identities a flood brings)."""
        out: list[SignedAdvert] = []
        seen: dict[str, None] = {}
        for source in ([self.own_peer_id], self._protected, self._first_seen):
            for pid in source:
                if len(out) >= limit:
                    return out
                sa = self.adverts.get(pid)
                if sa is not None and pid not in seen and sa.advert.expires_at_ms > now_ms:
                    seen[pid] = None
                    out.append(sa)
        return out

    def live_count(self, now_ms: int) -> int:
        return sum(1 for sa in self.adverts.values() if sa.advert.expires_at_ms > now_ms)

    def live(self, now_ms: int) -> list[Advert]:
        """Unexpired adverts, in peer id order (deterministic), as ``view`` shows them."""
        live = [self.adverts[p].advert for p in sorted(self.adverts) if self.adverts[p].advert.expires_at_ms > now_ms]
        return live if self.view is None else [self.view(a, now_ms) for a in live]

    def market(self, now_ms: int, *, model: str | None = None, memory_mb_min: int = 0) -> list[Advert]:
        rows = []
        for adv in self.live(now_ms):
            gpus = [g for g in adv.gpus if g.memory_mb >= memory_mb_min
                    and (model is None or model.lower() in g.model.lower())]
            if gpus:
                rows.append(adv)
        return rows


def next_seq(prev_seq: int, now_ms: int) -> int:
    """The next advert sequence number: above the previous one and never below
    the wall clock in ms, so a node that lost its state in a crash still issues
    numbers above what it sent before (and is not refused as a replay)."""
    return max(now_ms, prev_seq + 1)
