"""Payments as the ledger shows them (solana/_verify.py), on a real embedded
ledger: a landed SOL transfer verifies as what it moved from its fee payer;
a signature the ledger does not know verifies nothing and is asked again
only after the miss TTL; a transfer not from the fee payer is not counted."""

from __future__ import annotations

import trio
from solders.keypair import Keypair
from solders.message import Message
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from p2pgpu.solana import EmbeddedLedger
from p2pgpu.solana._verify import PaymentLookup, system_transfers


class Clock:
    def __init__(self) -> None:
        self.s = 0.0

    def __call__(self) -> float:
        return self.s


async def _pay(ledger: EmbeddedLedger, payer: Keypair, to: list[tuple[Keypair, int]],
               other: Keypair | None = None) -> str:
    blockhash, _ = await ledger.latest_blockhash()
    ixs = [transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=k.pubkey(), lamports=n)) for k, n in to]
    signers = [payer]
    if other is not None:  # a second signer moves its own lamports in the same transaction
        ixs.append(transfer(TransferParams(from_pubkey=other.pubkey(), to_pubkey=to[0][0].pubkey(),
                                           lamports=5_000_000)))
        signers.append(other)
    tx = Transaction(signers, Message(ixs, payer.pubkey()), blockhash)
    return await ledger.send(bytes(tx))


def test_a_landed_transfer_verifies_as_what_it_moved() -> None:
    async def main() -> None:
        ledger = EmbeddedLedger(None, slot_ms=0)
        payer, a, b, other = Keypair(), Keypair(), Keypair(), Keypair()
        for k in (payer, other):
            await ledger.airdrop(k.pubkey(), 10_000_000_000)
        sig = await _pay(ledger, payer, [(a, 1_000_000), (b, 2_000_000)], other=other)
        clock = Clock()
        lookup = PaymentLookup(ledger, clock=clock, miss_ttl_s=10)
        found = await lookup.payments([sig, "1" * 87])
        assert list(found) == [sig]
        pay = found[sig]
        assert pay.payer == str(payer.pubkey())
        # The second signer's transfer to a is not the payer's: not counted.
        assert dict(pay.transfers) == {str(a.pubkey()): 1_000_000, str(b.pubkey()): 2_000_000}
        asked = lookup.lookups
        await lookup.payments([sig, "1" * 87])
        assert lookup.lookups == asked  # both cached (the miss until its TTL)
        clock.s = 11
        await lookup.payments([sig, "1" * 87])
        assert lookup.lookups == asked + 1  # only the miss is asked again
        raw = await ledger.transaction(sig)
        assert raw is not None and system_transfers(raw)[0] == str(payer.pubkey())
        await ledger.aclose()

    trio.run(main)
