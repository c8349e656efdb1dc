"""A home's wallet, ledger and payout address, in one place.

A node pays for the jobs it submits from its payer keypair (``payer_keypair``
in ``config.toml``, else ``payer.json`` in the home, made 0600 on first
need), on its ledger (``ledger`` in ``config.toml``, else its network's in
``bootstrap_peers.toml``: ``embedded``, or a JSON-RPC URL), and is paid at its
payout address (``payout_address`` in ``config.toml``, else the payer's own
address).  The daemon, its control methods, the SDK's home reader, the
explorer's proof check and ``p2pgpu doctor`` all read these three here, so
they cannot disagree (each had its own copy: the explorer imported the
SDK's private module for the ledger).

Solana's modules are imported only when a keypair is needed: reading the
ledger spec of a home stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pgpu.home import Config, Home, NetworkSpec, load_networks

__all__ = ["Wallet", "home_ledger_spec", "ledger_spec"]


def ledger_spec(config: Config, network: NetworkSpec | None) -> str:
    """The ledger: ``ledger`` in ``config.toml``, else the network's, else ``embedded``."""
    spec = config.extra.get("ledger")
    if spec:
        return str(spec)
    return network.ledger if network is not None else "embedded"


def home_ledger_spec(home: Home) -> str:
    """The ledger of a home, read from its ``config.toml`` and the named networks."""
    cfg = home.config()
    return ledger_spec(cfg, load_networks().get(cfg.network))


class Wallet:
    """The payer keypair (made on first need), the ledger and the payout address
    of one home under one config (a config reload hands a new config in)."""

    def __init__(self, home_path: Path | None, config: Config, network: NetworkSpec | None) -> None:
        self.home_path = home_path
        self.config = config
        self.network = network
        self._payer: Any = None

    @property
    def keypair_path(self) -> Path | None:
        if self.home_path is None:
            return None
        from p2pgpu.solana._keys import payer_keypair_path

        return payer_keypair_path(self.home_path, self.config.extra)

    @property
    def payer(self) -> Any:
        """The payer's ``solders`` keypair (``None`` without a home)."""
        path = self.keypair_path
        if self._payer is None and path is not None:
            from p2pgpu.solana._keys import load_or_create_keypair

            self._payer = load_or_create_keypair(path)
        return self._payer

    @property
    def payer_address(self) -> str:
        payer = self.payer
        return str(payer.pubkey()) if payer is not None else ""

    def payout_address_for(self, config: Config) -> str:
        """Where this node is paid under ``config``: its payout address, else the payer's."""
        return config.payout_address or self.payer_address

    @property
    def payout_address(self) -> str:
        return self.payout_address_for(self.config)

    @property
    def ledger_spec(self) -> str:
        return ledger_spec(self.config, self.network)

    def reconfigured(self, config: Config) -> Wallet:
        """The same wallet under a new config (a reload); the keypair is kept
        unless the config names another keypair file."""
        w = Wallet(self.home_path, config, self.network)
        if w.keypair_path == self.keypair_path:
            w._payer = self._payer
        return w
