"""The host at its edges (#19, written against the first mutation sample of
``core/_host.py``): what it wires together.  Its settlement must subtract
what the host's own installments already owed (else the final line pays a
member's installments a second time), look payout addresses up through the
host, and check signatures with the verifier the host was given."""

from __future__ import annotations

from test_installments import CFG, S

from p2pgpu.core._host import Host, HostConfig
from p2pgpu.core._identity import verify_signature


def test_the_settlement_is_wired_to_the_hosts_installments_addresses_and_verifier() -> None:
    def verify(key: bytes, message: bytes, signature: bytes) -> None:
        verify_signature(key, message, signature)

    host = Host(S, HostConfig(installments=CFG), verify=verify)
    assert host.settlement.prepaid == host.installments.prepaid
    assert host.settlement.payout_address_of == host._payout_address_of
    assert host.settlement.verify is verify
