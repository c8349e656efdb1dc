"""Fixtures of the explorer tests (helpers in explorer_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from browser_helpers import open_driver
from explorer_helpers import MIX, Explorer, prepare_homes, start_explorer, stop_explorer

from p2pgpu.localnet import LocalNet


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNet]:
    root = tmp_path_factory.mktemp("explorer-net")
    prepare_homes(root, 3)
    net = LocalNet(root, 2, gpu_mix=MIX)
    with net:
        yield net


@pytest.fixture(scope="module")
def explorer(net: LocalNet) -> Iterator[Explorer]:
    ex = start_explorer(net.nodes[0].home)
    try:
        yield ex
    finally:
        assert stop_explorer(ex) == 0


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """Headless Chromium; skipped only where Debian's chromium or chromium-driver is missing."""
    yield from open_driver()
