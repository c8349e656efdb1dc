"""What the SDK reads from the node home itself, daemon or not.

``payouts`` and ``earnings`` are in the home's SQLite store, so they answer
after the daemon stopped (the devnet reads them once its nodes are gone);
the wallet is the home's payer keypair and its balance on the home's ledger
(the network's ``ledger``, or ``ledger = "..."`` in ``config.toml``), which
the daemon does not report.  The embedded ledger is opened read-only when the
daemon holds it.  Solana and SQLite modules are imported only here, when
asked, so a client that only talks to the daemon stays light.
"""

from __future__ import annotations

from typing import Any

from p2pgpu.home import Home
from p2pgpu.wallet import home_ledger_spec

from ._errors import P2pgpuError


class LedgerUnreachable(P2pgpuError):
    """The home's ledger does not answer (or refused the request)."""


def ledger_spec(home: Home) -> str:
    """The home's ledger: ``ledger`` in ``config.toml``, else the network's (``p2pgpu/wallet.py``)."""
    return home_ledger_spec(home)


def open_home_ledger(home: Home, *, write: bool) -> Any:
    from p2pgpu.solana import LedgerLocked, open_ledger

    spec = ledger_spec(home)
    try:
        if write or spec != "embedded":
            return open_ledger(spec, home_path=home.path, readonly=False)
        try:
            return open_ledger("embedded", home_path=home.path)
        except LedgerLocked:
            return open_ledger("embedded", home_path=home.path, readonly=True)
    except LedgerLocked:
        raise P2pgpuError("the node daemon holds the embedded ledger: stop it, or run `p2pgpu ledger serve` and "
                          'set ledger = "http://127.0.0.1:8899" in config.toml to share one') from None
    except ValueError as exc:
        raise P2pgpuError(str(exc)) from None


def is_local_ledger(spec: str) -> bool:
    return spec == "embedded" or "127.0.0.1" in spec or "localhost" in spec


async def wallet(home: Home, *, airdrop_lamports: int | None = None) -> dict[str, Any]:
    """The payer address, its balance on the home's ledger, and an airdrop on a local ledger."""
    from p2pgpu.solana import LedgerRejected, LedgerUnavailable, load_or_create_keypair, payer_keypair_path

    _need_home(home)
    kp = load_or_create_keypair(payer_keypair_path(home.path, home.config().extra))
    spec = ledger_spec(home)
    if airdrop_lamports is not None:
        if not is_local_ledger(spec):
            raise P2pgpuError(f"an airdrop works on local ledgers only; {spec} is not one")
        if airdrop_lamports <= 0:
            raise P2pgpuError("an airdrop must be a positive number of lamports")
    ledger = open_home_ledger(home, write=airdrop_lamports is not None)
    try:
        sig = None
        if airdrop_lamports is not None:
            sig = await ledger.airdrop(kp.pubkey(), airdrop_lamports)
        (balance,) = await ledger.balances([kp.pubkey()])
        return {"address": str(kp.pubkey()), "balance": balance, "ledger": spec, "currency": "SOL",
                "airdrop_signature": sig}
    except LedgerUnavailable as exc:
        raise LedgerUnreachable(f"ledger unreachable: {exc}; is `p2pgpu ledger serve` running?") from None
    except LedgerRejected as exc:
        raise LedgerUnreachable(f"the ledger refused: {exc}") from None
    finally:
        await ledger.aclose()


def _need_home(home: Home) -> None:
    if not home.exists():
        raise P2pgpuError(f"no node home at {home.path}: run `p2pgpu init --home {home.path}` first")


def store_rows(home: Home, what: str) -> list[dict[str, Any]]:
    """``payouts`` or ``earnings`` rows from the home's store (as the daemon would answer)."""
    from p2pgpu.store import db_path, earnings, open_db, payouts

    _need_home(home)
    conn = open_db(db_path(home.path))
    try:
        return payouts(conn) if what == "payouts" else earnings(conn)
    finally:
        conn.close()
