"""What the node's services see of the node: its ports, not the daemon.

The daemon (``_daemon.py``) wires the node together: it owns the libp2p
stack, the advert book, the wallet, the store and the services, and hands
each service the node as a :class:`NodePorts`.  The services (the jobs
service and its runner and settlement store, the blob and image stores, the
control methods, the results protocol) type the node against this protocol
and never import the daemon, so the daemon is the top of the node's import
graph and a service can be driven by anything that has these ports (a test
fakes only the ones it uses).  ``tests/test_import_graph.py`` checks that no
module of ``p2pgpu/node/`` names ``_daemon`` and that there are no import
cycles.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from p2pgpu.core import AdvertBook, Identity
    from p2pgpu.gpu import Inventory
    from p2pgpu.home import Config, Home, NetworkSpec
    from p2pgpu.wallet import Wallet

    from ._bitswap import BitswapService
    from ._blobs import BlobService
    from ._jobs import JobsService
    from ._runner import Runner
    from ._stack import Stack


class NodePorts(Protocol):
    """The node as its services see it (``_daemon.Node`` is one)."""

    identity: Identity
    config: Config
    network: NetworkSpec
    home: Home | None
    inventory: Inventory
    book: AdvertBook
    counts: Counter[str]
    rng: random.Random
    stack: Stack | None
    jobs: JobsService
    runner: Runner | None
    blobs: BlobService | None
    #: Inputs by IPFS CID (``_bitswap.py``); None until the host runs.
    bitswap: BitswapService | None
    images: Any
    #: The wallet, the ledger and the payout address, in one place (``p2pgpu/wallet.py``).
    wallet: Wallet
    #: How many of our GPUs the formation core has promised (the advert's free count follows).
    gpus_reserved: int
    #: The daemon's nursery, for tasks that outlive one request (announcing blobs).
    _nursery: trio.Nursery

    def now_ms(self) -> int: ...

    @property
    def payout_address(self) -> str: ...

    @property
    def ledger_spec(self) -> str: ...

    def capacity_changed(self) -> None: ...

    def payouts_due(self) -> None: ...

    async def dial_peer(self, peer_id: str) -> bool: ...


#: A function the node hands a service to learn its time (wall-clock ms).
Clock = Callable[[], int]
