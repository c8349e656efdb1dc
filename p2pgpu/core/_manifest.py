"""Job manifests: the TOML a person writes, its canonical signed form, and replays.

A person writes a TOML file (see ``docs/manifest.md`` and ``examples/jobs/``);
:func:`manifest_from_toml` turns it into a :class:`Manifest`, or raises
:class:`ManifestError` naming the field that is wrong, in words a person can
act on.  The same :class:`Manifest` validates itself when built from the wire
(:meth:`Manifest.from_obj`), where a mistake is the sender's and raises
``PeerMisbehaved``.  :func:`sign_manifest` seals it in a ``Kind.MANIFEST``
envelope signed by the submitter's node identity; the job id is the sha256 of
the canonical body (:attr:`Envelope.digest`), so two different manifests can
never share an id and the nonce makes two submissions of one file differ.
:class:`ReplayGuard` remembers job ids until their manifests expire, which is
what makes the expiry and the nonce enough to stop replays with bounded memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import re
import tomllib
from dataclasses import dataclass, field
from random import Random
from typing import Any

from . import _limits as limits
from . import _schema as s
from ._advert import RUNTIMES, is_solana_address, parse_compute_capability
from ._codec import decode, encode
from ._envelope import Envelope, Kind, body_of, envelope_from_obj, seal
from ._errors import PeerMisbehaved, Reason
from ._identity import Identity, Verifier, public_key_from_peer_id
from ._ipfs import parse_cid
from ._matching import Requirements, nodes_max

#: Members of one cluster (nodes x replicas) at most.
members_max = limits.members_per_cluster_max
replicas_max = limits.replicas_max
gpus_per_node_max = limits.gpus_per_node_max
name_len_max = 64
argv_len_max = 64
arg_len_max = 4096
env_len_max = 64
env_value_len_max = 4096
inputs_max = 32
input_name_len_max = 128
inline_bytes_max = 48 * 1024
input_size_bytes_max = 1 << 40
duration_s_max_max = 7 * 24 * 3600
ttl_ms_max = 24 * 3600 * 1000
ttl_ms_default = 10 * 60 * 1000
clock_skew_ms_max = limits.clock_skew_ms_max
nonce_bytes = 16
models_max = 16
regions_max = 16
#: Arrays and tables nested deeper than this, or keys of more parts, are refused
#: before parsing (see :func:`toml_depth`); a manifest needs three levels.
toml_nesting_max = 16
MEMBER_LOSS_POLICIES = ("fail", "continue")
#: ``payment.interval_s``: pay as you go every this many seconds (0: at the end
#: only).  The minimum keeps anyone from asking for a payment every
#: millisecond; the intervals of one job are bounded (``intervals_max``).
interval_s_min = 10
#: When a manifest file names no interval: one every five minutes for jobs
#: longer than that (a network may set its own, e.g. the devnet's 10 s).
interval_s_default = 300
#: Installments one job may have at most (``duration_s_max // interval_s``).
intervals_max = 4_096
#: The body must leave room for the envelope in ``Kind.MANIFEST.bytes_max``.
body_bytes_max = Kind.MANIFEST.bytes_max - 512

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_INPUT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
url_len_max = 2048
_URL_RE = re.compile(r"^https?://[^\s/?#@]+(/[^\s#]*)?$")
image_ref_len_max = 512
#: ``providers`` of an input by IPFS CID: peers that serve it over Bitswap.
cid_providers_max = 8
provider_addr_len_max = 256
#: A provider: an IP or DNS address, a TCP port and the peer id (the peer's
#: key checks that we reached the peer the submitter named).
_PROVIDER_RE = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/[0-9A-Za-z.:_-]{1,253}/tcp/[0-9]{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{40,60}$")
#: ``REGISTRY/NAME@sha256:DIGEST``: a registry host (with a dot, a port or
#: ``localhost``), a repository path of lowercase components, a digest.  By
#: digest only, so what runs is exactly what was signed.
_IMAGE_RE = re.compile(
    r"^(?P<registry>(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::[0-9]{1,5})?)/"
    r"(?P<name>[a-z0-9]+(?:[._-]{1,2}[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]{1,2}[a-z0-9]+)*)*)"
    r"@sha256:(?P<digest>[0-9a-f]{64})$")


def parse_image_ref(ref: str) -> tuple[str, str, str]:
    """``(registry, name, digest hex)`` of ``REGISTRY/NAME@sha256:DIGEST``, or ``ValueError``."""
    m = _IMAGE_RE.match(ref) if len(ref) <= image_ref_len_max else None
    if m is None:
        raise ValueError("an image by digest: REGISTRY/NAME@sha256:<64 hex>, e.g. "
                         "registry.example.org/team/pytorch@sha256:9f86...; tags are not accepted")
    registry = m.group("registry")
    if "." not in registry and ":" not in registry and registry != "localhost":
        raise ValueError(f"{registry!r} is not a registry host (name one with a dot, a port or localhost)")
    return registry, m.group("name"), m.group("digest")


class ManifestError(ValueError):
    """A person's mistake in a manifest file; ``field`` names where it is."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True, kw_only=True, slots=True)
class JobInput:
    """A file placed in the job's work directory: inline ``data``, or named by
    ``sha256`` (hex) and ``size_bytes`` for the runtime to fetch from peers
    (``tree``: the root of its chunk tree, hex, so every chunk is checked as
    it arrives; ``core/_chunks.py``), or from ``url`` (checked against
    ``sha256`` and ``size_bytes``), or by IPFS ``cid`` (``size_bytes`` and
    the Bitswap ``providers`` to fetch it from; ``core/_ipfs.py``)."""

    name: str
    data: bytes | None = None
    sha256: str = ""
    size_bytes: int = 0
    tree: str = ""
    url: str = ""
    cid: str = ""
    providers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _INPUT_NAME_RE.match(self.name) or ".." in self.name:
            raise ManifestError(f"inputs.{self.name}", "a file name of letters, digits, '.', '_', '-' "
                                "(no slashes, not starting with '.'), at most 128 characters")
        where = f"inputs.{self.name}"
        if self.data is not None:
            if self.sha256 or self.size_bytes or self.tree or self.url or self.cid or self.providers:
                raise ManifestError(where, "give either inline data or sha256, not both")
            if len(self.data) > inline_bytes_max:
                raise ManifestError(where, f"inline data is over {inline_bytes_max} bytes; pass it by sha256")
        elif self.cid or self.providers:
            self._check_cid(where)
        else:
            if not _SHA256_RE.match(self.sha256):
                raise ManifestError(where, "sha256 must be 64 lowercase hex digits")
            if not 0 <= self.size_bytes <= input_size_bytes_max:
                raise ManifestError(where, "size_bytes out of range")
            if self.tree and not _SHA256_RE.match(self.tree):
                raise ManifestError(f"{where}.tree", "the chunk tree root: 64 lowercase hex digits")
            if self.url and (len(self.url) > url_len_max or not _URL_RE.match(self.url)):
                raise ManifestError(f"{where}.url", f"an http:// or https:// URL of at most {url_len_max} "
                                    "characters, without credentials")
            if self.url and self.tree:
                raise ManifestError(f"{where}.tree", "a URL input is checked by its sha256; give no tree")

    def _check_cid(self, where: str) -> None:
        if self.sha256 or self.tree or self.url:
            raise ManifestError(where, "an input by cid is checked by its CID; give no sha256, tree or url")
        try:
            parse_cid(self.cid)
        except ValueError as exc:
            raise ManifestError(f"{where}.cid", f"{exc}") from None
        if not 0 < self.size_bytes <= input_size_bytes_max:
            raise ManifestError(f"{where}.size_bytes", "the file's size in bytes: more than 0 and at most "
                                f"{input_size_bytes_max}")
        if not 0 < len(self.providers) <= cid_providers_max:
            raise ManifestError(f"{where}.providers", f"1 to {cid_providers_max} peers that serve it over "
                                "Bitswap, as /ip4/ADDRESS/tcp/PORT/p2p/PEER_ID")
        for i, addr in enumerate(self.providers):
            if len(addr) > provider_addr_len_max or not _PROVIDER_RE.match(addr):
                raise ManifestError(f"{where}.providers[{i}]", "a multiaddr /ip4|ip6|dns/HOST/tcp/PORT/p2p/PEER_ID "
                                    f"of at most {provider_addr_len_max} characters")

    @property
    def digest(self) -> str:
        """The input's sha256 (hex), computed for inline data ("" for an input by CID)."""
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else self.sha256

    def to_obj(self) -> dict[str, Any]:
        if self.data is not None:
            return {"name": self.name, "data": self.data}
        if self.cid:
            return {"name": self.name, "cid": self.cid, "size_bytes": self.size_bytes,
                    "providers": list(self.providers)}
        obj: dict[str, Any] = {"name": self.name, "sha256": self.sha256, "size_bytes": self.size_bytes}
        if self.tree:
            obj["tree"] = self.tree
        if self.url:
            obj["url"] = self.url
        return obj


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """A job: what it needs, what it runs, what it pays, how it is verified.

    Fields are documented in ``docs/manifest.md``.  Building one checks every
    limit and raises :class:`ManifestError` (a ``ValueError``) naming the field.
    """

    name: str
    submitter: str
    created_at_ms: int
    expires_at_ms: int
    nonce: bytes
    nodes: int = 1
    gpus_per_node: int = 1
    memory_mb_min: int = 0
    models: tuple[str, ...] = ()
    compute_capability_min: str = "0.0"
    regions: tuple[str, ...] = ()
    allow_simulated: bool = True
    runtime: str = "process"
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    network: bool = False
    duration_s_max: int = 60
    #: ``REGISTRY/NAME@sha256:DIGEST`` for ``runtime = "oci"`` (docs/sandbox.md).
    image: str = ""
    inputs: tuple[JobInput, ...] = ()
    price_per_gpu_hour_max: int = 0
    currency: str = "SOL"
    payer: str = ""
    replicas: int = 1
    quorum: int = 1
    on_member_loss: str = "fail"
    #: ``payment.interval_s``: pay as you go (docs/payouts.md); 0 = at the end only.
    interval_s: int = 0

    def __post_init__(self) -> None:
        _check_manifest(self)

    @property
    def members(self) -> int:
        """How many peers the cluster has: ``nodes * replicas``."""
        return self.nodes * self.replicas

    @property
    def requirements(self) -> Requirements:
        return Requirements(
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            memory_mb_min=self.memory_mb_min,
            models=self.models,
            compute_capability_min=self.compute_capability_min,
            price_per_gpu_hour_max=self.price_per_gpu_hour_max,
            currency=self.currency,
            regions=self.regions,
            runtime=self.runtime,
            allow_simulated=self.allow_simulated,
        )

    def to_obj(self) -> dict[str, Any]:
        """The canonical body (what is signed and hashed into the job id)."""
        return {
            "name": self.name,
            "submitter": self.submitter,
            "created_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "nonce": self.nonce,
            "requirements": {
                "nodes": self.nodes,
                "gpus_per_node": self.gpus_per_node,
                "memory_mb_min": self.memory_mb_min,
                "models": list(self.models),
                "compute_capability_min": self.compute_capability_min,
                "regions": list(self.regions),
                "allow_simulated": self.allow_simulated,
            },
            "runtime": {
                "kind": self.runtime,
                "command": list(self.command),
                "env": dict(self.env),
                "network": self.network,
                "duration_s_max": self.duration_s_max,
                **({"image": self.image} if self.image else {}),
            },
            "inputs": [i.to_obj() for i in self.inputs],
            "payment": {
                "price_per_gpu_hour_max": self.price_per_gpu_hour_max,
                "currency": self.currency,
                "payer": self.payer,
                # Only when set: manifests without it keep their job ids.
                **({"interval_s": self.interval_s} if self.interval_s else {}),
            },
            "verification": {"replicas": self.replicas, "quorum": self.quorum, "on_member_loss": self.on_member_loss},
        }

    @classmethod
    def from_obj(cls, body: Any) -> Manifest:
        """A manifest from a decoded wire body, or ``PeerMisbehaved(BAD_SCHEMA)``."""
        if not isinstance(body, dict):
            raise s.fail("manifest", "must be a map")
        s.exact_keys(body, {"name", "submitter", "created_at_ms", "expires_at_ms", "nonce", "requirements",
                            "runtime", "inputs", "payment", "verification"})
        req, rt, pay, ver = (s.get_map(body, k) for k in ("requirements", "runtime", "payment", "verification"))
        s.exact_keys(req, {"nodes", "gpus_per_node", "memory_mb_min", "models", "compute_capability_min",
                           "regions", "allow_simulated"})
        s.exact_keys(rt, {"kind", "command", "env", "network", "duration_s_max"}, frozenset({"image"}))
        s.exact_keys(pay, {"price_per_gpu_hour_max", "currency", "payer"}, frozenset({"interval_s"}))
        s.exact_keys(ver, {"replicas", "quorum", "on_member_loss"})
        env = s.get_map(rt, "env")
        if len(env) > env_len_max or not all(isinstance(v, str) for v in env.values()):
            raise s.fail("runtime.env", f"at most {env_len_max} string values")
        inputs: list[tuple[str, bytes | None, str, int, str, str, str, tuple[str, ...]]] = []
        for i, item in enumerate(s.get_list(body, "inputs", inputs_max)):
            if not isinstance(item, dict):
                raise s.fail(f"inputs[{i}]", "must be a map")
            if "data" in item:
                s.exact_keys(item, {"name", "data"})
                inputs.append((s.get_str(item, "name", input_name_len_max), s.get_bytes(item, "data", inline_bytes_max),
                               "", 0, "", "", "", ()))
            elif "cid" in item:
                s.exact_keys(item, {"name", "cid", "size_bytes", "providers"})
                inputs.append((s.get_str(item, "name", input_name_len_max), None, "",
                               s.get_int(item, "size_bytes", 0, input_size_bytes_max), "", "",
                               s.get_str(item, "cid", 128),
                               s.get_str_list(item, "providers", cid_providers_max, provider_addr_len_max)))
            else:
                s.exact_keys(item, {"name", "sha256", "size_bytes"}, frozenset({"tree", "url"}))
                inputs.append((s.get_str(item, "name", input_name_len_max), None, s.get_str(item, "sha256", 64),
                               s.get_int(item, "size_bytes", 0, input_size_bytes_max),
                               s.get_str(item, "tree", 64) if "tree" in item else "",
                               s.get_str(item, "url", url_len_max) if "url" in item else "", "", ()))
        try:
            return cls(
                name=s.get_str(body, "name", name_len_max),
                submitter=s.get_str(body, "submitter", 64, len_min=1),
                created_at_ms=s.get_int(body, "created_at_ms"),
                expires_at_ms=s.get_int(body, "expires_at_ms"),
                nonce=s.get_bytes(body, "nonce", nonce_bytes, len_min=nonce_bytes),
                nodes=s.get_int(req, "nodes", 1, nodes_max),
                gpus_per_node=s.get_int(req, "gpus_per_node", 1, gpus_per_node_max),
                memory_mb_min=s.get_int(req, "memory_mb_min", 0, 1 << 22),
                models=s.get_str_list(req, "models", models_max, 64),
                compute_capability_min=s.get_str(req, "compute_capability_min", 5),
                regions=s.get_str_list(req, "regions", regions_max, 32),
                allow_simulated=s.get_bool(req, "allow_simulated"),
                runtime=s.get_str(rt, "kind", 16),
                command=s.get_str_list(rt, "command", argv_len_max, arg_len_max),
                env=tuple(sorted((str(k), v) for k, v in env.items())),
                network=s.get_bool(rt, "network"),
                duration_s_max=s.get_int(rt, "duration_s_max", 1, duration_s_max_max),
                image=s.get_str(rt, "image", image_ref_len_max, len_min=1) if "image" in rt else "",
                inputs=tuple(JobInput(name=n, data=d, sha256=h, size_bytes=z, tree=t, url=u, cid=c, providers=pr)
                             for n, d, h, z, t, u, c, pr in inputs),
                price_per_gpu_hour_max=s.get_int(pay, "price_per_gpu_hour_max"),
                currency=s.get_str(pay, "currency", 64, len_min=1),
                payer=s.get_str(pay, "payer", 64),
                interval_s=s.get_int(pay, "interval_s", interval_s_min, duration_s_max_max)
                if "interval_s" in pay else 0,
                replicas=s.get_int(ver, "replicas", 1, replicas_max),
                quorum=s.get_int(ver, "quorum", 1, replicas_max),
                on_member_loss=s.get_str(ver, "on_member_loss", 16),
            )
        except ValueError as exc:  # ManifestError included: the sender's fault here
            raise PeerMisbehaved(Reason.BAD_SCHEMA, str(exc)) from None


def _check_manifest(m: Manifest) -> None:
    def need(ok: bool, where: str, why: str) -> None:
        if not ok:
            raise ManifestError(where, why)

    need(len(m.name) <= name_len_max, "name", f"at most {name_len_max} characters")
    try:
        public_key_from_peer_id(m.submitter)
    except PeerMisbehaved:
        raise ManifestError("submitter", "not an Ed25519 peer id") from None
    need(len(m.nonce) == nonce_bytes, "nonce", f"must be {nonce_bytes} bytes")
    need(0 <= m.created_at_ms < m.expires_at_ms, "expires_in_s", "the manifest must expire after it is made")
    need(m.expires_at_ms - m.created_at_ms <= ttl_ms_max, "expires_in_s", f"at most {ttl_ms_max // 1000} s")
    need(1 <= m.nodes <= nodes_max, "requirements.nodes", f"between 1 and {nodes_max}")
    need(1 <= m.gpus_per_node <= gpus_per_node_max, "requirements.gpus_per_node",
         f"between 1 and {gpus_per_node_max}")
    need(0 <= m.memory_mb_min <= 1 << 22, "requirements.vram_gb_min", "out of range")
    need(len(m.models) <= models_max and all(0 < len(x) <= 64 for x in m.models), "requirements.models",
         f"at most {models_max} names of 1 to 64 characters")
    need(len(m.regions) <= regions_max and all(0 < len(x) <= 32 for x in m.regions), "requirements.regions",
         f"at most {regions_max} names of 1 to 32 characters")
    try:
        parse_compute_capability(m.compute_capability_min)
    except ValueError as exc:
        raise ManifestError("requirements.compute_capability_min", str(exc)) from None
    need(m.runtime in RUNTIMES, "runtime.kind", f"one of {', '.join(RUNTIMES)}")
    if m.runtime == "oci" or m.image:
        need(m.runtime == "oci", "runtime.image", "an image is run by kind = \"oci\"")
        need(bool(m.image), "runtime.image", "kind = \"oci\" needs image = \"REGISTRY/NAME@sha256:DIGEST\"")
        try:
            parse_image_ref(m.image)
        except ValueError as exc:
            raise ManifestError("runtime.image", str(exc)) from None
    need(1 <= len(m.command) <= argv_len_max, "runtime.command",
         f"a list of 1 to {argv_len_max} strings (the argv), e.g. [\"sh\", \"-c\", \"echo hello\"]")
    need(all(0 < len(a) <= arg_len_max for a in m.command), "runtime.command",
         f"each argument is 1 to {arg_len_max} characters")
    need(len(m.env) <= env_len_max, "runtime.env", f"at most {env_len_max} variables")
    keys = [k for k, _ in m.env]
    need(keys == sorted(set(keys)), "runtime.env", "variables must be unique")
    for k, v in m.env:
        need(bool(_ENV_KEY_RE.match(k)), f"runtime.env.{k}", "names are letters, digits and '_', not starting "
             "with a digit")
        need(len(v) <= env_value_len_max, f"runtime.env.{k}", f"at most {env_value_len_max} characters")
    need(1 <= m.duration_s_max <= duration_s_max_max, "runtime.duration_s_max",
         f"between 1 and {duration_s_max_max} seconds")
    need(len(m.inputs) <= inputs_max, "inputs", f"at most {inputs_max} files")
    names = [i.name for i in m.inputs]
    need(len(set(names)) == len(names), "inputs", "file names must be unique")
    need(sum(len(i.data or b"") for i in m.inputs) <= inline_bytes_max, "inputs",
         f"inline inputs total over {inline_bytes_max} bytes; pass large files by sha256")
    need(0 <= m.price_per_gpu_hour_max <= s.int_max, "payment.price_per_gpu_hour_max",
         "a whole number of the currency's smallest units (lamports for SOL)")
    need(0 < len(m.currency) <= 64, "payment.currency", "\"SOL\" or an SPL token mint address")
    need(is_solana_address(m.payer), "payment.payer", "a Solana address (base58) that pays for the job")
    need(m.interval_s == 0 or interval_s_min <= m.interval_s <= duration_s_max_max, "payment.interval_s",
         f"0 (pay at the end only) or at least {interval_s_min} seconds between payments")
    need(m.interval_s == 0 or m.duration_s_max // m.interval_s <= intervals_max, "payment.interval_s",
         f"at most {intervals_max} intervals in runtime.duration_s_max; choose a longer interval")
    need(1 <= m.replicas <= replicas_max, "verification.replicas", f"between 1 and {replicas_max}")
    need(1 <= m.quorum <= m.replicas, "verification.quorum", "between 1 and replicas")
    need(m.nodes * m.replicas <= members_max, "verification.replicas",
         f"nodes x replicas must be at most {members_max}")
    need(m.on_member_loss in MEMBER_LOSS_POLICIES, "verification.on_member_loss",
         f"one of {', '.join(MEMBER_LOSS_POLICIES)}")


# -- TOML ---------------------------------------------------------------------

_TOML_TOP = {"name", "expires_in_s", "requirements", "runtime", "inputs", "payment", "verification"}
_TOML_SECTIONS = {
    "requirements": {"nodes", "gpus_per_node", "vram_gb_min", "memory_mb_min", "models",
                     "compute_capability_min", "regions", "allow_simulated"},
    "runtime": {"kind", "command", "env", "network", "duration_s_max", "image"},
    "payment": {"price_per_gpu_hour_max", "currency", "payer", "interval_s"},
    "verification": {"replicas", "quorum", "on_member_loss"},
}


def _t_int(sec: dict[str, Any], where: str, key: str, default: int) -> int:
    v = sec.get(key, default)
    if type(v) is not int:
        raise ManifestError(f"{where}{key}", f"must be a whole number, not {v!r}")
    return v


def _t_str(sec: dict[str, Any], where: str, key: str, default: str) -> str:
    v = sec.get(key, default)
    if not isinstance(v, str):
        raise ManifestError(f"{where}{key}", f"must be a string, not {v!r}")
    return v


def _t_bool(sec: dict[str, Any], where: str, key: str, default: bool) -> bool:
    v = sec.get(key, default)
    if type(v) is not bool:
        raise ManifestError(f"{where}{key}", f"must be true or false, not {v!r}")
    return v


def _t_strs(sec: dict[str, Any], where: str, key: str) -> tuple[str, ...]:
    v = sec.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ManifestError(f"{where}{key}", "must be a list of strings")
    return tuple(v)


def _section(doc: dict[str, Any], name: str) -> dict[str, Any]:
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        raise ManifestError(name, f"must be a [{name}] table")
    for key in sorted(sec):
        if key not in _TOML_SECTIONS[name]:
            raise ManifestError(f"{name}.{key}", f"unknown field; [{name}] takes "
                                f"{', '.join(sorted(_TOML_SECTIONS[name]))}")
    return sec


def _toml_inputs(doc: dict[str, Any]) -> tuple[JobInput, ...]:
    table = doc.get("inputs", {})
    if not isinstance(table, dict):
        raise ManifestError("inputs", "must be a table of file name = { text | base64 | sha256 | url | cid | path }")
    out = []
    for name in sorted(table):
        spec, where = table[name], f"inputs.{name}"
        if isinstance(spec, dict) and "path" in spec:
            raise ManifestError(f"{where}.path", "a local file is read and hashed by `p2pgpu job submit` (or the "
                                "SDK's submit) on the submitter's machine; this form takes sha256 and size_bytes")
        if isinstance(spec, dict) and "url" in spec and "sha256" not in spec:
            raise ManifestError(f"{where}.sha256", "a URL input needs its sha256 (and size_bytes): what the URL "
                                "serves is checked against them")
        if isinstance(spec, dict) and "cid" in spec:
            extra = sorted(set(spec) - {"cid", "size_bytes", "providers"})
            if extra:
                raise ManifestError(f"{where}.{extra[0]}", "an input by cid takes cid, size_bytes and providers")
            out.append(JobInput(name=name, cid=_t_str(spec, where + ".", "cid", ""),
                                size_bytes=_t_int(spec, where + ".", "size_bytes", 0),
                                providers=_t_strs(spec, where + ".", "providers")))
            continue
        if not isinstance(spec, dict) or len([k for k in ("text", "base64", "sha256") if k in spec]) != 1:
            raise ManifestError(where, "give exactly one of text = \"...\", base64 = \"...\", sha256 = \"...\" "
                                "(with size_bytes, and url = \"...\" to fetch it from there), cid = \"...\" "
                                "(with size_bytes and providers) or path = \"...\"")
        extra = sorted(set(spec) - {"text", "base64", "sha256", "size_bytes", "tree", "url"})
        if extra:
            raise ManifestError(f"{where}.{extra[0]}", "unknown field")
        if "text" in spec:
            out.append(JobInput(name=name, data=_t_str(spec, where + ".", "text", "").encode()))
        elif "base64" in spec:
            try:
                data = base64.b64decode(_t_str(spec, where + ".", "base64", ""), validate=True)
            except binascii.Error:
                raise ManifestError(f"{where}.base64", "is not valid base64") from None
            out.append(JobInput(name=name, data=data))
        else:
            out.append(JobInput(name=name, sha256=_t_str(spec, where + ".", "sha256", "").lower(),
                                size_bytes=_t_int(spec, where + ".", "size_bytes", 0),
                                tree=_t_str(spec, where + ".", "tree", "").lower(),
                                url=_t_str(spec, where + ".", "url", "")))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TomlDepth:
    """How deep a TOML text nests, read without parsing it (:func:`toml_depth`)."""

    nesting: int  # arrays and tables inside each other (an open table header counts)
    nesting_line: int  # where that depth is first reached
    key_dots: int  # dots in the longest dotted key (a.b.c: 2)
    key_dots_line: int


#: What may continue a dotted key besides dots and quoted parts.
_KEY_RUN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_- \t")


def toml_depth(text: str) -> TomlDepth:
    """How deep arrays, tables and dotted keys nest in TOML ``text``, read
    without parsing it, so without recursion and in linear time.

    Python's TOML parser recurses once per nested array or inline table
    (deep nesting ends in RecursionError) and keeps every prefix of a dotted
    key (a key 10,000 parts deep took 400 MB).  Brackets and braces are
    counted outside strings and comments; a table header counts while it is
    open.  A dotted key is a run of bare-key characters, quoted parts and
    dots; anything else ends it, so a value adds at most one dot (``1.5``).
    Strings follow TOML's rules closely enough to agree with a parser on
    valid TOML: basic strings with backslash escapes, literal strings
    without, their multi-line forms (which may end with up to two extra
    quotes), single-line strings ending at their line's end at the latest.
    """
    depth = deepest = dots = most_dots = 0
    line = deepest_line = dots_line = 1
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            i, line = _skip_toml_string(text, i, line)
            continue  # a quoted part of a dotted key does not end it
        if c == ".":
            dots += 1
            if dots > most_dots:
                most_dots, dots_line = dots, line
        elif c not in _KEY_RUN_CHARS:
            dots = 0
            if c == "\n":
                line += 1
            elif c == "#":
                end = text.find("\n", i)
                i = n if end < 0 else end
                continue  # the newline is counted on the next turn
            elif c in "[{":
                depth += 1
                if depth > deepest:
                    deepest, deepest_line = depth, line
            elif c in "]}":
                depth = max(0, depth - 1)
        i += 1
    return TomlDepth(nesting=deepest, nesting_line=deepest_line, key_dots=most_dots, key_dots_line=dots_line)


def _skip_toml_string(text: str, i: int, line: int) -> tuple[int, int]:
    """The index just after the string that starts at ``i``, and the line there."""
    q, n = text[i], len(text)
    escapes = q == '"'
    if text.startswith(q * 3, i):
        j = i + 3
        while j < n:
            if escapes and text[j] == "\\":
                if j + 1 < n and text[j + 1] == "\n":
                    line += 1
                j += 2
                continue
            if text.startswith(q * 3, j):
                j += 3
                extra = 0
                while extra < 2 and j < n and text[j] == q:  # ''''' ends with two quotes of content
                    j, extra = j + 1, extra + 1
                return j, line
            if text[j] == "\n":
                line += 1
            j += 1
        return n, line
    j = i + 1
    while j < n and text[j] != "\n":
        if escapes and text[j] == "\\":
            j += 2
            continue
        if text[j] == q:
            return j + 1, line
        j += 1
    return j, line  # unterminated at the line's end: the parser refuses it; keep counting after it


def check_toml_depth(text: str, limit: int) -> None:
    """Raise :class:`ManifestError` if ``text`` nests arrays and tables, or
    dots a key, more than ``limit`` levels deep."""
    d = toml_depth(text)
    if d.nesting > limit:
        raise ManifestError("toml", f"arrays or tables nested more than {limit} levels deep (line "
                            f"{d.nesting_line}); a manifest needs no more than three")
    if d.key_dots >= limit:
        raise ManifestError("toml", f"a dotted key more than {limit} parts long (line {d.key_dots_line}); "
                            "a manifest's keys have at most three")


def manifest_from_toml(
    text: str,
    *,
    submitter: str,
    now_ms: int,
    rng: Random,
    payer: str | None = None,
    interval_s_default: int = interval_s_default,
) -> Manifest:
    """Parse a person's manifest file.

    ``submitter`` is the signing node's peer id; ``payer`` (the submitter's
    wallet address) is used when the file names none; ``rng`` draws the nonce.
    Raises :class:`ManifestError` naming the field at fault.
    """
    return manifest_from_doc(toml_doc(text), submitter=submitter, now_ms=now_ms, rng=rng, payer=payer,
                             interval_s_default=interval_s_default)


def toml_doc(text: str) -> dict[str, Any]:
    """A manifest file's document (depth-checked before parsing), or ``ManifestError``."""
    check_toml_depth(text, toml_nesting_max)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError("toml", str(exc)) from None


def manifest_from_doc(
    doc: Any,
    *,
    submitter: str,
    now_ms: int,
    rng: Random,
    payer: str | None = None,
    interval_s_default: int = interval_s_default,
) -> Manifest:
    """A manifest from the document a TOML file parses to (the same tables and
    keys, e.g. sent as JSON by the Python SDK), checked exactly as
    :func:`manifest_from_toml` checks a file."""
    if not isinstance(doc, dict):
        raise ManifestError("manifest", "must be a table of name, requirements, runtime, inputs, payment, ...")
    for key in sorted(doc, key=str):
        if not isinstance(key, str):
            raise ManifestError(str(key), "field names must be text")
        if key not in _TOML_TOP:
            raise ManifestError(key, f"unknown field; a manifest has {', '.join(sorted(_TOML_TOP))}")
    req, rt, pay, ver = (_section(doc, n) for n in ("requirements", "runtime", "payment", "verification"))
    if "vram_gb_min" in req and "memory_mb_min" in req:
        raise ManifestError("requirements.vram_gb_min", "give vram_gb_min or memory_mb_min, not both")
    memory_mb_min = (_t_int(req, "requirements.", "vram_gb_min", 0) * 1024 if "vram_gb_min" in req
                     else _t_int(req, "requirements.", "memory_mb_min", 0))
    if "command" not in rt:
        raise ManifestError("runtime.command", "missing: the argv to run, e.g. [\"sh\", \"-c\", \"echo hello\"]")
    env_t = rt.get("env", {})
    if not isinstance(env_t, dict) or not all(isinstance(v, str) for v in env_t.values()):
        raise ManifestError("runtime.env", "must be a table of NAME = \"value\" strings")
    expires_in_s = _t_int(doc, "", "expires_in_s", ttl_ms_default // 1000)
    if not 1 <= expires_in_s <= ttl_ms_max // 1000:
        raise ManifestError("expires_in_s", f"between 1 and {ttl_ms_max // 1000} seconds")
    replicas = _t_int(ver, "verification.", "replicas", 1)
    payer_text = _t_str(pay, "payment.", "payer", payer or "")
    if not payer_text:
        raise ManifestError("payment.payer", "missing: name the Solana address that pays, or configure a wallet")
    duration_s_max = _t_int(rt, "runtime.", "duration_s_max", 60)
    # Absent: the network's default, for jobs longer than one interval (a
    # shorter job is paid at the end only).  0 asks for the end only.
    interval_s = _t_int(pay, "payment.", "interval_s",
                        interval_s_default if duration_s_max > interval_s_default > 0 else 0)
    m = Manifest(
        name=_t_str(doc, "", "name", ""),
        submitter=submitter,
        created_at_ms=now_ms,
        expires_at_ms=now_ms + expires_in_s * 1000,
        nonce=rng.randbytes(nonce_bytes),
        nodes=_t_int(req, "requirements.", "nodes", 1),
        gpus_per_node=_t_int(req, "requirements.", "gpus_per_node", 1),
        memory_mb_min=memory_mb_min,
        models=_t_strs(req, "requirements.", "models"),
        compute_capability_min=_t_str(req, "requirements.", "compute_capability_min", "0.0"),
        regions=_t_strs(req, "requirements.", "regions"),
        allow_simulated=_t_bool(req, "requirements.", "allow_simulated", True),
        runtime=_t_str(rt, "runtime.", "kind", "process"),
        command=_t_strs(rt, "runtime.", "command"),
        env=tuple(sorted(env_t.items())),
        network=_t_bool(rt, "runtime.", "network", False),
        duration_s_max=duration_s_max,
        image=_t_str(rt, "runtime.", "image", ""),
        inputs=_toml_inputs(doc),
        price_per_gpu_hour_max=_t_int(pay, "payment.", "price_per_gpu_hour_max", 0),
        currency=_t_str(pay, "payment.", "currency", "SOL"),
        payer=payer_text,
        interval_s=interval_s,
        replicas=replicas,
        quorum=_t_int(ver, "verification.", "quorum", replicas // 2 + 1),
        on_member_loss=_t_str(ver, "verification.", "on_member_loss", "fail"),
    )
    size = len(encode(m.to_obj()))
    if size > body_bytes_max:
        raise ManifestError("inputs", f"the manifest is {size} bytes, over the {body_bytes_max} byte limit; "
                            "pass large inputs by sha256")
    return m


# -- signing and verifying ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest whose envelope verified and whose signer is its submitter.
    Only :func:`sign_manifest` and :func:`verify_manifest` make one."""

    manifest: Manifest
    envelope: Envelope
    #: sha256 (hex) of the canonical manifest body, computed once (every core
    #: asks for it on every message: a hot path in #13's profile).
    _job_id: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_job_id", self.envelope.digest.hex())

    @property
    def job_id(self) -> str:
        """sha256 (hex) of the canonical manifest body: the job's name everywhere."""
        return self._job_id

    @property
    def wire(self) -> bytes:
        return self.envelope.to_bytes()


def sign_manifest(identity: Identity, manifest: Manifest) -> SignedManifest:
    if manifest.submitter != identity.peer_id:
        raise ValueError("a manifest is signed by its submitter")
    return SignedManifest(manifest, seal(identity, Kind.MANIFEST, manifest.to_obj()))


def manifest_from_envelope(env: Envelope) -> SignedManifest:
    """Check a verified envelope's body; no time checks (see :func:`verify_manifest`)."""
    if env.kind is not Kind.MANIFEST:
        raise PeerMisbehaved(Reason.WRONG_KIND, f"expected manifest, got {env.kind.value}")
    m = Manifest.from_obj(body_of(env))
    if env.signer_peer_id != m.submitter:
        raise PeerMisbehaved(Reason.SIGNER_MISMATCH, "manifest not signed by its submitter")
    return SignedManifest(m, env)


def check_manifest_time(sm: SignedManifest, now_ms: int, clock_skew_ms: int = clock_skew_ms_max) -> None:
    m = sm.manifest
    if m.created_at_ms > now_ms + clock_skew_ms:
        raise PeerMisbehaved(Reason.NOT_YET_VALID, "manifest made in the future")
    if m.expires_at_ms <= now_ms:
        raise PeerMisbehaved(Reason.EXPIRED, "manifest has expired")


def verify_manifest(data: bytes, *, now_ms: int, clock_skew_ms: int = clock_skew_ms_max,
                    verify: Verifier | None = None) -> SignedManifest:
    """Decode, verify and time-check manifest bytes, or raise ``PeerMisbehaved``
    (OVERSIZED, MALFORMED, BAD_SIGNATURE, BAD_SCHEMA, SIGNER_MISMATCH, EXPIRED...)."""
    obj = decode(data, size_max=Kind.MANIFEST.bytes_max, canonical=True)
    sm = manifest_from_envelope(envelope_from_obj(obj, expected=Kind.MANIFEST, verify=verify))
    check_manifest_time(sm, now_ms, clock_skew_ms)
    return sm


@dataclass(slots=True)
class ReplayGuard:
    """Job ids seen, each kept until its manifest expires (after which the
    manifest is refused as expired anyway).  Bounded: when full, a new id is
    refused with ``LIMIT_EXCEEDED`` rather than forgetting one that could then
    be replayed."""

    ids_max: int = 100_000
    _expiry: dict[str, int] = field(default_factory=dict)
    _heap: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._expiry

    def prune(self, now_ms: int) -> None:
        while self._heap and self._heap[0][0] <= now_ms:
            at, job_id = heapq.heappop(self._heap)
            if self._expiry.get(job_id) == at:
                del self._expiry[job_id]

    def admit(self, job_id: str, expires_at_ms: int, now_ms: int) -> None:
        """Record ``job_id`` or raise ``REPLAYED`` / ``EXPIRED`` / ``LIMIT_EXCEEDED``."""
        self.prune(now_ms)
        if expires_at_ms <= now_ms:
            raise PeerMisbehaved(Reason.EXPIRED, "manifest has expired")
        if job_id in self._expiry:
            raise PeerMisbehaved(Reason.REPLAYED, f"job {job_id[:12]} already seen")
        if len(self._expiry) >= self.ids_max:
            raise PeerMisbehaved(Reason.LIMIT_EXCEEDED, "too many live jobs to remember another")
        self._expiry[job_id] = expires_at_ms
        heapq.heappush(self._heap, (expires_at_ms, job_id))
