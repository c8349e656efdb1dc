"""Payouts on Solana: ledgers, the JSON-RPC ledger server, the payer.

* :class:`Ledger` is what a payer talks to; :class:`EmbeddedLedger` (LiteSVM
  in process, persisted in the home) and :class:`RpcLedger` (solana-py's
  AsyncClient, any endpoint) implement it; :func:`open_ledger` picks one from
  a network's ``ledger`` setting.
* :class:`Payer` turns the outbox's owed rows into batched transactions and
  settles them exactly once (``docs/payouts.md``).
* :class:`PayerCheck` answers "can this submitter pay?" from a cached balance.
* :class:`LedgerServer` / :func:`serve_ledger` are ``p2pgpu ledger serve``.

Importing this package loads solders and solana-py; the CLI imports it lazily.
"""

from ._check import PayerCheck
from ._faucet import AirdropLimits
from ._keys import load_keypair, load_or_create_keypair, payer_keypair_path
from ._ledger import (
    EmbeddedLedger,
    Ledger,
    LedgerRejected,
    LedgerUnavailable,
    RpcLedger,
    SigStatus,
    open_ledger,
)
from ._lookup import create_lookup_table, load_lookup_table
from ._payer import Payer, PayerUnderfunded, PayReport
from ._server import LedgerServer, ServerLimits, serve_ledger
from ._svm import LedgerLocked, SvmLedger
from ._tx import TokenInfo, ata, blame, build_batch, memo_root

__all__ = [
    "AirdropLimits",
    "EmbeddedLedger",
    "Ledger",
    "LedgerLocked",
    "LedgerRejected",
    "LedgerServer",
    "LedgerUnavailable",
    "PayReport",
    "Payer",
    "PayerCheck",
    "PayerUnderfunded",
    "RpcLedger",
    "ServerLimits",
    "SigStatus",
    "SvmLedger",
    "TokenInfo",
    "ata",
    "blame",
    "build_batch",
    "create_lookup_table",
    "load_keypair",
    "load_lookup_table",
    "load_or_create_keypair",
    "memo_root",
    "open_ledger",
    "payer_keypair_path",
    "serve_ledger",
]
