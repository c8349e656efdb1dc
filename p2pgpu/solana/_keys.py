"""Solana keypairs in the Solana CLI's JSON format (a list of 64 byte values).

The payer signs with such a file: ``payer_keypair`` in the home's
``config.toml`` names it, else ``payer.json`` in the home is used (created
with mode 0600 on first need).  ``~/.config/solana/id.json`` works as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from solders.keypair import Keypair

PAYER_FILE = "payer.json"


class KeyfileError(Exception):
    """A keypair file is missing or malformed; the message says which."""


def load_keypair(path: Path) -> Keypair:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise KeyfileError(f"{path}: cannot read a Solana keypair: {exc}") from None
    if not isinstance(raw, list) or len(raw) != 64 or not all(type(b) is int and 0 <= b < 256 for b in raw):
        raise KeyfileError(f"{path}: not a Solana CLI keypair (a JSON list of 64 byte values)")
    try:
        return Keypair.from_bytes(bytes(raw))
    except ValueError as exc:
        raise KeyfileError(f"{path}: {exc}") from None


def save_keypair(path: Path, kp: Keypair) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(list(bytes(kp)), f)
        f.flush()
        os.fsync(f.fileno())


def payer_keypair_path(home_path: Path, extra: dict[str, Any] | None = None) -> Path:
    configured = (extra or {}).get("payer_keypair")
    if configured:
        return Path(str(configured)).expanduser()
    return Path(home_path) / PAYER_FILE


def load_or_create_keypair(path: Path) -> Keypair:
    if path.exists():
        return load_keypair(path)
    kp = Keypair()
    save_keypair(path, kp)
    return kp
