"""Fixtures of the SDK tests: one LocalNet of real node daemons per module.

Two ``p2pgpu node run`` processes on 127.0.0.1, one simulated GPU each, so
one-node jobs land on either and two-node jobs use both.  Node 0 submits
(its wallet pays on its embedded ledger).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from p2pgpu.localnet import LocalNet

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNet]:
    root = tmp_path_factory.mktemp("sdk-net")
    with LocalNet(root, 2, gpu_mix=ONE_GPU) as net:
        net.wait_until(lambda: all(n.call("status")["adverts_known"] == 2 for n in net.nodes), timeout_s=60,
                       what="both nodes see both adverts")
        yield net
