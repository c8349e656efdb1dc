"""A node's home directory: identity key, config, control token, state.

``--home DIR``, else ``$P2PGPU_HOME``, else ``~/.p2pgpu``.  The identity is
the libp2p Ed25519 key in libp2p's own file format (``identity.key``, mode
0600), so the host and our envelopes sign with the same key and the peer id
is stable across restarts.  The home is private to the node's user: the
directory 0700, the files written here 0600 (the store makes ``state.db``
and its WAL files 0600 too).  Everything here is file I/O, kept out of the
pure cores.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from p2pgpu.core import Identity, is_solana_address

IDENTITY_FILE = "identity.key"
CONFIG_FILE = "config.toml"
TOKEN_FILE = "control.token"
CONTROL_FILE = "control.json"  # written by a running daemon: its port and pid


class HomeError(Exception):
    """The home is missing, unreadable or inconsistent; the message says what to do."""


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    if home:
        return Path(home).expanduser()
    env = os.environ.get("P2PGPU_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".p2pgpu"


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    name: str
    bootstrap: tuple[str, ...]
    allow_simulated: bool
    ledger: str
    currency: str


def load_networks(path: Path | None = None) -> dict[str, NetworkSpec]:
    """Named networks from ``bootstrap_peers.toml`` (the packaged copy unless
    ``path`` or ``$P2PGPU_NETWORKS`` names another)."""
    env = os.environ.get("P2PGPU_NETWORKS")
    if path is None and env:
        path = Path(env)
    if path is None:
        text = resources.files("p2pgpu").joinpath("data/bootstrap_peers.toml").read_text()
    else:
        text = path.read_text()
    try:
        raw = tomllib.loads(text).get("networks", {})
    except tomllib.TOMLDecodeError as exc:
        raise HomeError(f"bootstrap peers file is not valid TOML: {exc}") from None
    nets = {}
    for name, spec in raw.items():
        nets[name] = NetworkSpec(
            name=name,
            bootstrap=tuple(spec.get("bootstrap", ())),
            allow_simulated=bool(spec.get("allow_simulated", False)),
            ledger=str(spec.get("ledger", "embedded")),
            currency=str(spec.get("currency", "SOL")),
        )
    if "local" not in nets:
        nets["local"] = NetworkSpec(name="local", bootstrap=(), allow_simulated=True, ledger="embedded", currency="SOL")
    return nets


@dataclass(kw_only=True)
class Config:
    network: str = "local"
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    payout_address: str = ""
    region: str = "local"
    price_per_gpu_hour: int = 1_000_000
    currency: str = "SOL"
    advert_ttl_s: int = 600
    control_port: int = 0
    allow_job_network: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_toml(self) -> str:
        listen = ", ".join(f'"{a}"' for a in self.listen)
        return (
            "# p2pgpu node configuration (see docs/operating.md)\n"
            f'network = "{self.network}"\n'
            f"listen = [{listen}]\n"
            "# Solana address that receives this node's payouts (your own wallet).\n"
            f'payout_address = "{self.payout_address}"\n'
            f'region = "{self.region}"\n'
            "# Price per GPU-hour in the currency's smallest unit (lamports for SOL).\n"
            f"price_per_gpu_hour = {self.price_per_gpu_hour}\n"
            f'currency = "{self.currency}"\n'
            f"advert_ttl_s = {self.advert_ttl_s}\n"
            "# Local control API port on 127.0.0.1 (0 picks a free one).\n"
            f"control_port = {self.control_port}\n"
            "# Whether jobs may ever get network access (only if their manifest asks too).\n"
            f"allow_job_network = {'true' if self.allow_job_network else 'false'}\n"
        )

    @classmethod
    def from_toml(cls, text: str) -> "Config":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise HomeError(f"config.toml is not valid TOML: {exc}") from None
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        defaults = cls()
        for k in sorted(known & raw.keys()):  # a typo'd type fails here, not deep in the daemon
            want = type(getattr(defaults, k))
            if type(raw[k]) is not want or (k == "listen" and not all(isinstance(a, str) for a in raw[k])):
                raise HomeError(f"config.toml: {k} must be of type {want.__name__}, not {raw[k]!r}")
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        cfg.extra = {k: v for k, v in raw.items() if k not in known}
        if cfg.payout_address and not is_solana_address(cfg.payout_address):
            raise HomeError(f"payout_address {cfg.payout_address!r} in config.toml is not a Solana address")
        return cfg


#: Settings a running daemon takes on SIGHUP (``node run`` reloads config.toml);
#: the advert is re-signed with them at once.  ``allow_job_network`` applies to
#: jobs started afterwards, ``advert_ttl_s`` to the next advert (unless
#: ``--advert-ttl`` was given on the command line, which wins).
LIVE_KEYS = ("price_per_gpu_hour", "region", "payout_address", "advert_ttl_s", "allow_job_network")
#: Settings that need a restart: the host, the control port, the network and
#: what payments are bound to (the currency, the ledger, the payer keypair and
#: every other key outside the dataclass) are set up once at start.
RESTART_KEYS = ("network", "listen", "control_port", "currency")


@dataclass(frozen=True, kw_only=True)
class ConfigChanges:
    """What a reloaded config.toml changes compared with the running one."""

    live: tuple[str, ...]
    needs_restart: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {"applied": list(self.live), "needs_restart": list(self.needs_restart)}


def config_changes(running: Config, new: Config) -> ConfigChanges:
    """Split the differences between two configs into those a running daemon
    takes at once and those that wait for a restart (pure: no I/O)."""
    live = tuple(k for k in LIVE_KEYS if getattr(running, k) != getattr(new, k))
    restart = [k for k in RESTART_KEYS if getattr(running, k) != getattr(new, k)]
    restart += sorted(k for k in running.extra.keys() | new.extra.keys() if running.extra.get(k) != new.extra.get(k))
    return ConfigChanges(live=live, needs_restart=tuple(restart))


class Home:
    """Paths and files of one node home."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def token_path(self) -> Path:
        return self.path / TOKEN_FILE

    @property
    def control_path(self) -> Path:
        return self.path / CONTROL_FILE

    def exists(self) -> bool:
        return self.identity_path.exists()

    def init(self, *, network: str = "local", payout_address: str = "", seed: bytes | None = None) -> Identity:
        """Create identity, config and control token.  Refuses to overwrite."""
        if self.identity_path.exists():
            raise HomeError(f"{self.identity_path} already exists: refusing to overwrite an identity")
        if payout_address and not is_solana_address(payout_address):
            raise HomeError(f"--payout-address {payout_address!r} is not a Solana address (base58, 32 bytes)")
        nets = load_networks()
        if network not in nets:
            raise HomeError(f"unknown network {network!r}; known: {', '.join(sorted(nets))}")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        seed = seed if seed is not None else secrets.token_bytes(32)
        _write_private(self.identity_path, _libp2p_key_bytes(seed))
        _write_private(self.config_path, Config(network=network, payout_address=payout_address).to_toml().encode(),
                       replace=True)
        if not self.token_path.exists():  # a token left by an earlier home is kept, not a crash
            _write_private(self.token_path, secrets.token_hex(32).encode())
        return Identity(seed)

    def identity(self) -> Identity:
        if not self.identity_path.exists():
            raise HomeError(f"no identity in {self.path}: run `p2pgpu init --home {self.path}` first")
        mode = self.identity_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise HomeError(f"{self.identity_path} has mode {mode:o}; run `chmod 600 {self.identity_path}`")
        return Identity(_seed_from_libp2p_key(self.identity_path.read_bytes()))

    def config(self) -> Config:
        if not self.config_path.exists():
            raise HomeError(f"no config.toml in {self.path}: run `p2pgpu init --home {self.path}` first")
        return Config.from_toml(self.config_path.read_text())

    def token(self) -> str:
        if not self.token_path.exists():
            _write_private(self.token_path, secrets.token_hex(32).encode())
        return self.token_path.read_text().strip()


def _write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a file only the node's user can read (0600); refuse to replace one unless ``replace``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # a replaced file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# libp2p's key file (libp2p.identity_utils.save_identity) is the protobuf
# PrivateKey{Type: Ed25519, Data: 32-byte seed}: 36 bytes.  Written here byte
# for byte so that reading a home needs no libp2p import (0.55 s).
_PB_ED25519_PRIV = b"\x08\x01\x12\x20"


def _libp2p_key_bytes(seed: bytes) -> bytes:
    return _PB_ED25519_PRIV + seed


def _seed_from_libp2p_key(data: bytes) -> bytes:
    if data.startswith(_PB_ED25519_PRIV) and len(data) == 36:
        return data[4:]
    raise HomeError("identity.key is not an Ed25519 libp2p key")
