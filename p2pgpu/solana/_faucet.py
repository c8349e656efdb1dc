"""The local ledger's faucet: a key made for each ledger, and limits on airdrops.

A local ledger (embedded, or ``p2pgpu ledger serve``) funds test wallets from
a faucet account through ``requestAirdrop``.  Two rules keep a stranger who
reaches the RPC port from taking its funds (issue #18.7):

* **The faucet's key is made for each ledger and kept private.**  It is drawn
  from the OS's randomness when the ledger is created and kept beside the
  state in ``STATE.faucet`` (a Solana CLI keypair file, mode 0600); a ledger
  without state keeps it in memory only.  Earlier ledgers derived it from a
  constant in the source, so anyone could sign transfers out of it: on open,
  whatever that derivable account still holds is moved to the ledger's own
  faucet and the derivable account is left empty (:data:`LEGACY_FAUCET_SEED`
  is kept only to find it).
* **Airdrops are limited** per request, per address (an airdrop is refused
  when the recipient would then hold more than ``address_lamports_max``), and
  in total over the ledger's life (``total_lamports_max``, persisted with the
  state).  A refusal is a JSON-RPC error -32600 ("invalid request", what an
  Agave node answers when it has no faucet) whose message says which limit
  and how to raise it.  Not 429, as Solana's public devnet answers: solders
  parses an error code it does not know into a bare integer, so solana-py
  would return it as if it were a result instead of raising.

Pure: :meth:`AirdropLimits.check` takes the balances and totals it decides on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from solders.keypair import Keypair

from ._keys import load_keypair, save_keypair

#: The JSON-RPC error code of a refused airdrop (see the module docstring).
AIRDROP_REFUSED_CODE = -32600
#: Earlier ledgers derived their faucet from this and the genesis text; never used to sign again.
LEGACY_FAUCET_SEED = b"faucet"
FAUCET_SUFFIX = "faucet"

#: Defaults: far above what a devnet of 64 nodes (100 SOL each) or the tests
#: need, far below the faucet's 10^18 lamports.
airdrop_request_lamports_max_default = 10**15
airdrop_address_lamports_max_default = 10**14
airdrop_total_lamports_max_default = 10**16


class AirdropRefused(Exception):
    """An airdrop over one of the ledger's limits; the message says which."""


@dataclass(frozen=True, kw_only=True)
class AirdropLimits:
    """What one ledger's faucet gives: per request, per address, in total (lamports)."""

    request_lamports_max: int = airdrop_request_lamports_max_default
    address_lamports_max: int = airdrop_address_lamports_max_default
    total_lamports_max: int = airdrop_total_lamports_max_default

    def __post_init__(self) -> None:
        for name in ("request_lamports_max", "address_lamports_max", "total_lamports_max"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")

    def check(self, *, lamports: int, recipient_balance: int, airdropped_total: int, faucet_balance: int) -> None:
        """Raise :class:`AirdropRefused` unless ``lamports`` may go to this recipient now."""
        if self.total_lamports_max == 0:
            raise AirdropRefused("airdrops are disabled on this ledger")
        if lamports > self.request_lamports_max:
            raise AirdropRefused(f"airdrop of {lamports} lamports refused: at most {self.request_lamports_max} "
                                 "per request on this ledger")
        if recipient_balance + lamports > self.address_lamports_max:
            raise AirdropRefused(
                f"airdrop refused: the address would hold {recipient_balance + lamports} lamports, over this "
                f"ledger's limit of {self.address_lamports_max} per address (it holds {recipient_balance}); "
                "`p2pgpu ledger serve --airdrop-address-max` raises it")
        if airdropped_total + lamports > self.total_lamports_max:
            raise AirdropRefused(
                f"airdrop refused: this ledger's faucet has given {airdropped_total} of its "
                f"{self.total_lamports_max} lamports in total; `p2pgpu ledger serve --airdrop-total-max` raises it")
        if lamports > faucet_balance:
            raise AirdropRefused(f"airdrop refused: the faucet holds only {faucet_balance} lamports")


def legacy_faucet(genesis: bytes) -> Keypair:
    """The faucet earlier ledgers derived from a constant: known to everyone."""
    return Keypair.from_seed(hashlib.sha256(LEGACY_FAUCET_SEED + genesis).digest())


def faucet_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + "." + FAUCET_SUFFIX)


def load_or_create_faucet(state_path: Path | None, *, create: bool) -> Keypair:
    """The faucet key of the ledger at ``state_path``: read from its 0600 file,
    or made from the OS's randomness (and saved, with ``create``)."""
    if state_path is None:
        return Keypair()
    path = faucet_path(state_path)
    if path.exists():
        return load_keypair(path)
    kp = Keypair()
    if create:
        save_keypair(path, kp)  # O_EXCL, mode 0600, fsynced before anything can depend on it
    return kp
