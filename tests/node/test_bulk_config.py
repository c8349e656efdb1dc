"""Where the bulk side channel listens, or that it is off (``node/_bulk.bulk_config``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from p2pgpu.home import HomeError
from p2pgpu.node._bulk import BULK_LIMITS, bulk_config

LIMITS = {k: v[0] for k, v in BULK_LIMITS.items()}


def opts(listen: list[str], bulk_port: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(listen=listen, bulk_port=bulk_port)


@pytest.mark.parametrize(("extra", "listen", "cli", "want"), [
    ({}, ["/ip4/127.0.0.1/tcp/0"], None, (True, "127.0.0.1", 0)),
    ({"bulk_port": 4002}, ["/ip4/0.0.0.0/tcp/4001"], None, (True, "0.0.0.0", 4002)),
    ({}, ["/ip6/::1/tcp/4001", "/ip4/10.0.0.2/tcp/4001"], None, (True, "::1", 0)),
    ({"bulk_port": 4002}, ["/ip4/127.0.0.1/tcp/0"], 5000, (True, "127.0.0.1", 5000)),   # the flag wins
    ({}, ["/ip4/127.0.0.1/tcp/0"], -1, (False, None, None)),                            # off by flag
    ({"bulk_enabled": False}, ["/ip4/127.0.0.1/tcp/0"], None, (False, None, None)),     # off by config
    ({"bulk_enabled": False}, ["/ip4/127.0.0.1/tcp/0"], 0, (True, "127.0.0.1", 0)),     # on by flag
    ({}, ["/ip4/127.0.0.1/udp/4001/quic-v1"], None, (False, None, None)),               # no TCP listen address
])
def test_bulk_config(extra: dict, listen: list[str], cli: int | None, want: tuple) -> None:
    got = bulk_config(extra, opts(listen, cli), limits=LIMITS)
    assert got.enabled is want[0]
    if got.enabled:
        assert (got.host, got.port, got.offered_port) == (want[1], want[2], 0)


@pytest.mark.parametrize(("extra", "says"), [
    ({"bulk_port": "4002"}, "bulk_port must be a TCP port"),
    ({"bulk_port": 70000}, "bulk_port must be a TCP port"),
    ({"bulk_enabled": "yes"}, "bulk_enabled must be true or false"),
])
def test_bad_bulk_config_says_what_is_wrong(extra: dict, says: str) -> None:
    with pytest.raises(HomeError, match=says):
        bulk_config(extra, opts(["/ip4/127.0.0.1/tcp/0"]), limits=LIMITS)


def test_dead_port_adversary_offers_a_closed_port() -> None:
    got = bulk_config({}, opts(["/ip4/127.0.0.1/tcp/0"]), limits=LIMITS, adversary="bulk_dead_port")
    assert got.enabled and got.offered_port == 1
