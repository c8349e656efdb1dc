"""SPL-token set-up on a running ``p2pgpu ledger serve``, through its JSON-RPC only.

The end-to-end tests drive the ledger the way an outside operator would: a
mint authority created here, funded by ``requestAirdrop``, creates a mint and
mints tokens into an owner's associated token account in one transaction sent
with ``sendTransaction``; balances are read back with
``getTokenAccountBalance``.  Instructions come from solana-py's ``spl``
package (as in tests/solana/test_payer.py, which builds the same mint against
an in-process ledger); addresses of token accounts come from
:func:`p2pgpu.solana.ata`, the function the payer itself uses.
"""

from __future__ import annotations

import base64

from solders.hash import Hash
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import Transaction
from spl.token.constants import MINT_LEN, TOKEN_PROGRAM_ID
from spl.token.instructions import create_idempotent_associated_token_account, initialize_mint2, mint_to
from spl.token.models import InitializeMint2Params, MintToParams

from p2pgpu.devnet import DevnetError, rpc
from p2pgpu.solana import TokenInfo, ata


def send(url: str, tx: Transaction) -> str:
    """Send a signed transaction and check that it executed without error
    (the server executes a transaction as it accepts it)."""
    sig = rpc(url, "sendTransaction", [base64.b64encode(bytes(tx)).decode(), {"encoding": "base64"}])
    (status,) = rpc(url, "getSignatureStatuses", [[sig]])["value"]
    assert status is not None and status["err"] is None, f"{sig}: {status}"
    return sig


def create_mint(url: str, owner: str, supply: int, *, decimals: int = 6) -> TokenInfo:
    """A new mint with ``decimals``, and ``supply`` base units in ``owner``'s
    associated token account (created here; its rent is paid by the mint
    authority, a throwaway keypair funded by airdrop)."""
    authority, mint = Keypair(), Keypair()
    rpc(url, "requestAirdrop", [str(authority.pubkey()), 1_000_000_000])
    token = TokenInfo(mint=mint.pubkey(), decimals=decimals)
    holder = Pubkey.from_string(owner)
    rent = int(rpc(url, "getMinimumBalanceForRentExemption", [MINT_LEN]))
    ixs = [
        create_account(CreateAccountParams(from_pubkey=authority.pubkey(), to_pubkey=mint.pubkey(), lamports=rent,
                                           space=MINT_LEN, owner=TOKEN_PROGRAM_ID)),
        initialize_mint2(InitializeMint2Params(program_id=TOKEN_PROGRAM_ID, mint=mint.pubkey(), decimals=decimals,
                                               mint_authority=authority.pubkey(), freeze_authority=None)),
        create_idempotent_associated_token_account(authority.pubkey(), holder, mint.pubkey()),
        mint_to(MintToParams(program_id=TOKEN_PROGRAM_ID, mint=mint.pubkey(), dest=ata(holder, token),
                             mint_authority=authority.pubkey(), amount=supply)),
    ]
    blockhash = Hash.from_string(rpc(url, "getLatestBlockhash", [])["value"]["blockhash"])
    send(url, Transaction.new_signed_with_payer(ixs, authority.pubkey(), [authority, mint], blockhash))
    return token


def token_balance(url: str, owner: str, token: TokenInfo) -> int:
    """Base units in ``owner``'s associated token account (0 when it does not exist)."""
    try:
        doc = rpc(url, "getTokenAccountBalance", [str(ata(Pubkey.from_string(owner), token))])
    except DevnetError as exc:
        if "not a Token account" in str(exc):
            return 0
        raise
    assert doc["value"]["decimals"] == token.decimals
    return int(doc["value"]["amount"])
