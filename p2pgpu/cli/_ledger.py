"""Ledger and payout commands: ``ledger serve``, ``wallet``, ``payouts``, ``earnings``, ``proof``.

``wallet``, ``payouts`` and ``earnings`` are the SDK's (``p2pgpu.Client``):
payouts and earnings from the daemon, or from the home's SQLite store when
none runs; the wallet is the home's payer keypair and its balance on the
home's ledger: the network's ``ledger`` setting, or ``ledger = "..."`` in
``config.toml``.  The embedded ledger is opened read-only when the daemon
holds it.  ``proof
inclusion`` prints the Merkle inclusion proof of one paid proof hash (on the
payer's node); ``proof check`` verifies such a proof and, given a ledger,
that its root is the memo of the transaction that paid it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from p2pgpu.home import Home

from ._common import CliError, add_home, add_json, emit, home_of, read_path, table, wrap_home_errors
from ._sdk import client_of, wrap_sdk_errors


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ledger = sub.add_parser("ledger", help="a local Solana ledger").add_subparsers(dest="ledger_command",
                                                                                  metavar="SUBCOMMAND")
    ledger.required = True
    p = ledger.add_parser(
        "serve",
        help="serve a local Solana JSON-RPC endpoint over an embedded SVM",
        description="A local Solana JSON-RPC node over LiteSVM: HTTP JSON-RPC on --port, websocket subscriptions "
        "on --port + 1. Several processes (nodes, solana-py, @solana/web3.js) share one ledger through it. "
        "Runs until SIGINT/SIGTERM; state persists in --state. Anyone who reaches the ports may use it, so every "
        "connection is bounded (idle and request timeouts, a connection cap that closes the longest-idle "
        "connection to admit a new one) and so are airdrops (per address and in total; the faucet's key is "
        "made for this ledger and kept in FILE.faucet, mode 0600). On an address other than loopback, airdrops "
        "are off unless --airdrop-total-max is given.",
    )
    p.add_argument("--port", type=int, default=8899, help="JSON-RPC port (default 8899; websocket on port + 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--state", metavar="FILE", help="state file (snapshot; FILE.journal beside it); none: in memory")
    p.add_argument("--slot-ms", type=int, default=400, help="milliseconds per block (default 400)")
    p.add_argument("--connections-max", type=int, default=1024, metavar="N",
                   help="connections held at once, HTTP and websocket together (default 1024; fewer if ulimit -n "
                        "is lower); when full, the longest-idle one is closed to admit a new one")
    p.add_argument("--idle-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection with no request under way (or a websocket without subscriptions) "
                        "after this long (default 30)")
    p.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request must arrive whole within this long of its first byte (default 10)")
    p.add_argument("--airdrop-address-max", type=int, default=None, metavar="LAMPORTS",
                   help="refuse an airdrop that would leave the address holding more than this "
                        "(default 10^14, i.e. 100,000 SOL)")
    p.add_argument("--airdrop-total-max", type=int, default=None, metavar="LAMPORTS",
                   help="lamports the faucet gives over the ledger's life, at most (default 10^16 on loopback, "
                        "0, i.e. no airdrops, on any other --host); 0 turns airdrops off")
    p.set_defaults(func=cmd_ledger_serve)

    p = sub.add_parser("wallet", help="payer address and balance on the configured ledger",
                       description="The payer keypair of this home (payer.json, or payer_keypair in config.toml; "
                       "created on first use) and its balance on the home's ledger. --airdrop works on local "
                       "ledgers only (embedded or a `p2pgpu ledger serve` endpoint).")
    add_home(p)
    add_json(p)
    p.add_argument("--airdrop", type=int, metavar="LAMPORTS", help="request an airdrop first (local ledgers only)")
    p.set_defaults(func=wrap_sdk_errors(cmd_wallet))

    p = sub.add_parser("payouts", help="what this node owes and paid",
                       description="Payouts this node owes for verified proofs, and the transactions that paid them.")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_payouts))

    p = sub.add_parser("earnings", help="proofs this node produced and what each was paid",
                       description="Proofs this node produced, what each should be paid and the transaction "
                       "that paid it.")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_sdk_errors(cmd_earnings))

    proof = sub.add_parser("proof", help="Merkle inclusion proofs of paid proofs").add_subparsers(
        dest="proof_command", metavar="SUBCOMMAND")
    proof.required = True
    p = proof.add_parser("inclusion", help="the inclusion proof of one paid proof hash (payer side)",
                         description="Print the inclusion proof of PROOF_HASH in the batch that paid it: "
                         "index, size, audit path, root, and the transaction signature.")
    add_home(p)
    p.add_argument("proof_hash", metavar="PROOF_HASH", help="64 hex characters")
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_proof_inclusion))
    p = proof.add_parser("check", help="verify an inclusion proof (and its memo on a ledger)",
                         description="Verify an inclusion proof file (the JSON `proof inclusion --json` prints). "
                         "With --ledger (or --home), also fetch the paying transaction and check that its memo "
                         "is the proof's root. Exits 1 when the proof does not hold.")
    p.add_argument("file", metavar="FILE", help="inclusion proof JSON ('-' for stdin)")
    p.add_argument("--ledger", metavar="URL", help="an http(s) JSON-RPC URL to check the memo against")
    add_home(p)
    add_json(p)
    p.set_defaults(func=wrap_home_errors(cmd_proof_check))


# --- helpers ----------------------------------------------------------------


def _ledger_spec(home: Home) -> str:
    from p2pgpu.sdk._local import ledger_spec

    return ledger_spec(home)


def _db(home: Home) -> Any:
    from p2pgpu.store import db_path, open_db

    if not home.exists():
        raise CliError(f"no node home at {home.path}: run `p2pgpu init --home {home.path}` first")
    return open_db(db_path(home.path))


# --- commands ---------------------------------------------------------------


def cmd_ledger_serve(args: argparse.Namespace) -> int:
    import signal

    import trio

    from p2pgpu.solana import AirdropLimits, LedgerLocked, ServerLimits, serve_ledger

    try:
        limits = ServerLimits(connections_max=args.connections_max, idle_timeout_s=args.idle_timeout,
                              request_timeout_s=args.request_timeout)
        airdrops = AirdropLimits(**_airdrop_limits(args))
    except ValueError as exc:
        raise CliError(f"ledger serve: {exc}") from None

    def ready(server: Any) -> None:
        print(f"ledger ready http://{args.host}:{server.port} ws://{args.host}:{server.ws_port}", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            await serve_ledger(args.port, Path(args.state) if args.state else None, slot_ms=args.slot_ms,
                               host=args.host, ready=ready, limits=limits, airdrop_limits=airdrops)

    try:
        trio.run(main)
    except LedgerLocked as exc:
        raise CliError(f"{exc}: another `ledger serve` uses it") from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port} or {args.port + 1}: {exc.strerror}") from None
    return 0


def _airdrop_limits(args: argparse.Namespace) -> dict[str, int]:
    """The airdrop limits the flags ask for; airdrops are off by default off loopback."""
    import ipaddress

    from p2pgpu.solana._faucet import airdrop_address_lamports_max_default, airdrop_total_lamports_max_default

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False  # a host name: treat it as reachable by others
    total = args.airdrop_total_max
    if total is None:
        total = airdrop_total_lamports_max_default if loopback else 0
    address = args.airdrop_address_max if args.airdrop_address_max is not None else \
        airdrop_address_lamports_max_default
    return {"address_lamports_max": address, "total_lamports_max": total,
            "request_lamports_max": max(address, 0)}


def cmd_wallet(args: argparse.Namespace) -> int:
    doc = client_of(args).wallet(airdrop_lamports=args.airdrop)
    emit(args, doc, lambda d: f"address  {d['address']}\nbalance  {d['balance']} lamports\nledger   {d['ledger']}"
         + (f"\nairdrop  {d['airdrop_signature']}" if d["airdrop_signature"] else ""))
    return 0


def cmd_payouts(args: argparse.Namespace) -> int:
    rows = client_of(args).payouts()
    # --json: a bare list of rows, as `market` and `job list` print.
    emit(args, rows, lambda d: table(
        [[r["proof_hash"][:16], r["worker"][:16], str(r["amount"]), r["currency"][:8], r["status"],
          r["tx_signature"] or ""] for r in d],
        ["PROOF", "WORKER", "AMOUNT", "CURRENCY", "STATUS", "TX"]) or "no payouts")
    return 0


def cmd_earnings(args: argparse.Namespace) -> int:
    rows = client_of(args).earnings()
    emit(args, rows, lambda d: table(
        [[r["job_id"][:16], str(r["amount"]), r["currency"][:8], r["status"], r["tx_signature"] or ""]
         for r in d],
        ["JOB", "AMOUNT", "CURRENCY", "STATUS", "TX"]) or "no earnings")
    return 0


def cmd_proof_inclusion(args: argparse.Namespace) -> int:
    from p2pgpu.core._payout import inclusion_proof
    from p2pgpu.store import batch_of_proof, batch_plan

    conn = _db(home_of(args))
    try:
        found = batch_of_proof(conn, args.proof_hash)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if found is None:
        raise CliError(f"proof {args.proof_hash} is not in any batch of this node (see `p2pgpu payouts`)")
    batch_id, signature, state = found
    plan = batch_plan(conn, batch_id)
    proof = inclusion_proof(plan.proof_hashes, bytes.fromhex(args.proof_hash))
    doc = {**proof.to_json(), "tx_signature": signature, "batch_state": state}
    emit(args, doc, lambda d: json.dumps(d, indent=2, sort_keys=True))
    return 0


def cmd_proof_check(args: argparse.Namespace) -> int:
    import trio

    from p2pgpu.core._payout import InclusionProof, verify_inclusion

    text = sys.stdin.read() if args.file == "-" else read_path(args.file).read_text()
    try:
        doc = json.loads(text)
        proof = InclusionProof.from_json(doc)
    except ValueError as exc:
        raise CliError(f"{args.file}: not an inclusion proof: {exc}") from None
    path_ok = verify_inclusion(proof)
    memo_ok = None
    sig = doc.get("tx_signature")
    ledger_spec = args.ledger or (_ledger_spec(Home(Path(args.home))) if args.home else None)
    if sig and ledger_spec:

        async def fetch() -> bytes | None:
            from p2pgpu.solana import LedgerUnavailable, open_ledger

            ledger = open_ledger(ledger_spec, home_path=Path(args.home) if args.home else None, readonly=True)
            try:
                raw: bytes | None = await ledger.transaction(str(sig))
                return raw
            except LedgerUnavailable as exc:
                raise CliError(f"ledger unreachable: {exc}") from None
            finally:
                await ledger.aclose()

        from p2pgpu.solana import memo_root

        raw = trio.run(fetch)
        memo_ok = raw is not None and memo_root(raw) == proof.root
    valid = path_ok and memo_ok is not False
    out = {"valid": valid, "path_valid": path_ok, "memo_matches": memo_ok, "root": proof.root.hex(),
           "tx_signature": sig}
    emit(args, out, lambda d: ("valid" if d["valid"] else "INVALID") + f": audit path {'ok' if d['path_valid'] else 'wrong'}"
         + ("" if d["memo_matches"] is None else f", memo {'matches' if d['memo_matches'] else 'does not match'}"))
    return 0 if valid else 1
