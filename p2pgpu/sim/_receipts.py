"""Receipts and reputation in the simulator, and receipt forgers.

The twin of ``p2pgpu/node/_receipts.py`` (issue #16), run when a scenario
has a ``receipt_forger`` adversary.  The modelled ledger gives each payout
batch a transaction signature and records what it moved to whom
(``VerifiedPayment``, paid by the submitter's payer key: an Ed25519 key of
its own, :meth:`SimReceipts.payer_key`, whose public key is the payer's
address).  At the end of the run every settled job gets the receipt its
submitter's node would sign (the core's ``build_receipt`` from the
settlement's lines and every payment of each member, installments included,
co-signed by the payer key with ``cosign`` and signed with
``sign_receipt``), bound to the payout addresses of its confirmed
certificate.  Each forger then signs receipts of its own (sybil submitters,
made-up jobs and certificates whose accept binds the forger to its own
address):

- ``invented``: a line paying the forger, citing a transaction the ledger
  never saw;
- ``borrowed``: a line paying the forger, citing a real payout to another
  member at that member's address (its certificate binds the forger to its
  own address);
- ``backdated``: the forger's own accept names a victim's payout address,
  and its receipt, dated before the victim's, cites the victim's real payout
  under the genuine payer (#16.2: it lacks the payer's co-signature);
- ``tampered``: a genuine receipt with one byte of its signature changed.

Reputation is computed twice with the core's ``compute_reputation``: from the
genuine receipts alone and from all of them.  ``receipts_forged_refused``
counts the forged receipts refused (``Reputation.refused``);
``forger_score_gain_lamports`` is what the forgeries added to any score
(0 when every one is refused).  The test-only mutation ``forgery_blind``
(a verifier that believes every cited payment, as if it had no ledger, and
every receipt co-signed, as if it did not check co-signatures) shows the
forgers gaining.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import base58

from p2pgpu.core import Identity
from p2pgpu.core._formation_messages import Certificate
from p2pgpu.core._receipt import Receipt, ReceiptLine, SettledLine, build_receipt, cosign, sign_receipt
from p2pgpu.core._reputation import VerifiedPayment, compute_reputation

if TYPE_CHECKING:
    from ._jobs import JobFlow


def _tx(seed: bytes) -> str:
    return base58.b58encode(hashlib.sha512(b"p2pgpu-sim/tx/" + seed).digest()).decode()


class SimReceipts:
    """The modelled ledger's payments, the receipts, and the forgers (module doc)."""

    def __init__(self, flow: JobFlow) -> None:
        self.flow = flow
        self.enabled = any(a.kind == "receipt_forger" for a in flow.world.scenario.adversary)
        self.ledger: dict[str, VerifiedPayment] = {}
        #: (job jid, member node) -> [(proof hash, tx, amount)]
        self.paid_rows: dict[tuple[int, int], list[tuple[bytes, str, int]]] = {}
        self.certs: dict[int, Certificate] = {}
        self._batches = 0
        self._payer_keys: dict[int, Identity] = {}

    def payer_key(self, submitter: int) -> Identity:
        """The submitter's payer keypair (derived from its payout key: no
        draw from the run's random streams, so runs stay as they were)."""
        key = self._payer_keys.get(submitter)
        if key is None:
            seed = hashlib.sha256(b"p2pgpu-sim/payer/" + self.flow.world.nodes[submitter].payout_address.encode())
            key = self._payer_keys[submitter] = Identity(seed.digest())
        return key

    def payer(self, submitter: int) -> str:
        return base58.b58encode(self.payer_key(submitter).public_key).decode()

    def on_confirmed(self, jid: int, cert: Certificate) -> None:
        if self.enabled:
            self.certs[jid] = cert

    def batch(self, submitter: int, root: bytes, transfers: list[tuple[str, int]]) -> str:
        """A payout batch confirmed on the modelled ledger: its signature."""
        if not self.enabled:
            return ""
        self._batches += 1
        tx = _tx(root + self._batches.to_bytes(8, "big"))
        moved: dict[str, int] = {}
        for addr, amount in transfers:
            moved[addr] = moved.get(addr, 0) + amount
        self.ledger[tx] = VerifiedPayment(tx_signature=tx, payer=self.payer(submitter), transfers=moved)
        return tx

    def paid(self, jid: int, member: int, proof_hash: bytes, tx: str, amount: int) -> None:
        if self.enabled and tx:
            self.paid_rows.setdefault((jid, member), []).append((proof_hash, tx, amount))

    # -- at the end of the run ----------------------------------------------------------------
    def _genuine(self) -> list[Any]:
        w, flow = self.flow.world, self.flow
        out = []
        for jid, job in sorted(flow.jobs.items()):
            cert = self.certs.get(jid)
            s = getattr(job, "settled", None)
            sub = w.nodes[job.submitter]
            if cert is None or s is None or sub.identity is None:
                continue
            lines = []
            for ln in s.lines:
                m = w.by_peer[ln.peer_id]
                rows = self.paid_rows.get((jid, m), [])
                final = next((tx for h, tx, _ in rows if h == ln.proof_hash and ln.proof_hash), "")
                inst = tuple((tx, a) for h, tx, a in rows if h != ln.proof_hash)
                lines.append(SettledLine(peer_id=ln.peer_id, status=ln.status, amount=ln.amount,
                                         address=w.nodes[m].payout_address, proof_hash=ln.proof_hash,
                                         tx_signature=final, installments=inst))
            r = build_receipt(job_id=job.job_id, cert_hash=cert.digest, submitter=sub.identity.peer_id,
                              payer=self.payer(job.submitter), currency="SOL", settled_at_ms=w.node_now_ms(job.submitter),
                              lines=lines)
            if r is not None:
                if r.payer:
                    r = cosign(r, self.payer_key(job.submitter).sign)
                out.append((sign_receipt(sub.identity, r), cert))
        return out

    def _forged(self, genuine: list[Any]) -> tuple[list[Any], dict[bytes, dict[str, str]], int]:
        """The forgers' receipts (signed ones, and tampered bytes), their
        certificates' bindings, and how many were made."""
        w = self.flow.world
        out: list[Any] = []
        bound: dict[bytes, dict[str, str]] = {}
        made = 0
        keys = {self.payer(s): self.payer_key(s) for s in self.flow.submitters}
        for adv in w.adversaries:
            if adv.kind != "receipt_forger":
                continue
            for node in adv.nodes:
                me = w.nodes[node]
                assert me.identity is not None
                sybil = Identity.from_rng(adv.rng)
                now = w.node_now_ms(node)
                victim = next(((sr, ln) for sr, _c in genuine for ln in sr.receipt.lines
                               if ln.payments and ln.peer_id != me.identity.peer_id), None)
                cites = [("invented", _tx(b"never-paid/" + me.identity.peer_id.encode()), 10**9, me.payout_address)]
                if victim is not None:
                    tx, amount = victim[1].payments[0]
                    cites.append(("borrowed", tx, amount, me.payout_address))
                    cites.append(("backdated", tx, amount, victim[1].address))  # its own accept names the victim's
                for kind, tx, amount, addr in cites:
                    job = hashlib.sha256(f"forged/{kind}/{node}".encode()).hexdigest()
                    cert_hash = hashlib.sha256(b"cert/" + job.encode()).digest()
                    line = ReceiptLine(peer_id=me.identity.peer_id, outcome="paid", amount=amount,
                                       address=addr, payments=((tx, amount),), proof_hash=b"")
                    payer = victim[0].receipt.payer if victim is not None else self.payer(node)
                    at = victim[0].receipt.settled_at_ms - 1 if kind == "backdated" and victim is not None else now
                    r = Receipt(job_id=job, cert_hash=cert_hash, submitter=sybil.peer_id, payer=payer,
                                currency="SOL", settled_at_ms=max(0, at), lines=(line,))
                    if w.mutation == "forgery_blind" and payer in keys:
                        # test-only breakage: as if co-signatures were not checked
                        r = cosign(r, keys[payer].sign)
                    out.append(sign_receipt(sybil, r))
                    bound[cert_hash] = {me.identity.peer_id: addr}
                    made += 1
                if genuine:
                    wire = bytearray(genuine[0][0].wire)
                    wire[-5] ^= 0xFF  # inside the signature
                    out.append(bytes(wire))
                    made += 1
        return out, bound, made

    def stats(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        w = self.flow.world
        genuine = self._genuine()
        forged, forged_bound, made = self._forged(genuine)
        bound = {c.digest: {a.peer_id: a.payout_address for a in c.accepts} for _sr, c in genuine}
        now = w.network_now_ms()
        payments: dict[str, VerifiedPayment] = dict(self.ledger)
        if w.mutation == "forgery_blind":
            # test-only breakage: a verifier that believes every cited payment
            for item in forged:
                if not isinstance(item, bytes):
                    for ln in item.receipt.lines:
                        for tx, amount in ln.payments:
                            payments[tx] = VerifiedPayment(tx_signature=tx, payer=item.receipt.payer,
                                                           transfers={ln.address: amount})
        signed = [sr for sr, _c in genuine]
        base = compute_reputation(signed, payments=payments, now_ms=now, cert_addresses=bound)
        both = compute_reputation([*signed, *forged], payments=payments, now_ms=now,
                                  cert_addresses={**bound, **forged_bound})
        gain = sum(max(0, both.score(p).good - base.score(p).good) for p in both.scores)
        return {
            "receipts_signed": len(genuine),
            "receipts_forged": made,
            "receipts_forged_refused": len(both.refused) - len(base.refused),
            "forger_score_gain_lamports": gain,
            "paid_peers_with_a_score": sum(1 for s in base.scores.values() if s.good > 0),
        }
