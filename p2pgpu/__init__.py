"""p2pgpu: an open, peer-to-peer GPU compute network.

Layers (see docs/architecture.md): ``core`` (pure protocol logic), ``node``
(the trio + libp2p driver), ``gpu`` (NVML inventory), ``runtime`` (sandbox,
Ray), ``store`` (SQLite), ``solana`` (payouts), ``sim`` (the simulator driver),
``explorer`` and ``cli``.
"""

__version__ = "0.1.0"
