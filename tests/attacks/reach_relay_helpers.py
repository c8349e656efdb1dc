"""Real libp2p hosts on 127.0.0.1 wired as a relay, a private node holding a
slot on it, and clients that dial the private node through the relay
(``p2pgpu/node/_relay.py``).  Shared by the relay tests and the relay-limit
attack tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pgpu.core import RelayLimits
from p2pgpu.node._holepunch import install_trim_fix
from p2pgpu.node._relay import HOP_PROTOCOL, STOP_PROTOCOL, RelayClient, RelayService, StopHandler
from p2pgpu.node._stack import Stack, open_stack
from p2pgpu.node._streams import guarded

ECHO = "/p2pgpu/test-echo/1.0.0"


async def echo(stream: Any) -> None:
    """Echo every byte back until the writer closes its side."""
    while True:
        data = await stream.read(65536)
        if not data:
            break
        await stream.write(data)
    await stream.close()


@dataclass
class Relayed:
    relay: Stack
    dest: Stack
    service: RelayService
    dest_client: RelayClient
    counts: Counter[str]
    admitted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    @property
    def circuit(self) -> str:
        """The destination's circuit address through the relay."""
        return self.dest_client.circuit_addrs()[0]

    async def client(self, ex: AsyncExitStack, seed: bytes) -> tuple[Stack, RelayClient]:
        s = await ex.enter_async_context(open_stack(seed, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
        return s, RelayClient(s.host, self.counts)


@asynccontextmanager
async def relayed(limits: RelayLimits, *, ex: AsyncExitStack) -> AsyncIterator[Relayed]:
    install_trim_fix()
    counts: Counter[str] = Counter()
    relay = await ex.enter_async_context(open_stack(b"r" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
    dest = await ex.enter_async_context(open_stack(b"p" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}))
    relay_addr = relay.addrs()[0].split("/p2p/")[0]
    service = RelayService(relay.host, limits, counts, now_ms=lambda: int(trio.current_time() * 1000),
                           enabled=lambda: True, public_addrs=lambda: [relay_addr])
    relay.host.set_stream_handler(HOP_PROTOCOL, guarded("relay", service.serve, counts, timeout_s=600))
    dest_client = RelayClient(dest.host, counts)
    setup = Relayed(relay=relay, dest=dest, service=service, dest_client=dest_client, counts=counts)

    def admit(peer: str) -> str | None:
        setup.admitted.append(peer)
        return None

    stop = StopHandler(dest.host, counts, holding=lambda r: r in dest_client.holding, admit=admit,
                       release=setup.released.append)
    dest.host.set_stream_handler(STOP_PROTOCOL, guarded("relayed_in", stop.serve, counts, timeout_s=600))
    dest.host.set_stream_handler(ECHO, guarded("echo", echo, counts, timeout_s=600))
    await dest.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(relay.addrs()[0])))
    why = await dest_client.reserve(relay.host.get_id(), [relay_addr])
    assert why is None, why
    yield setup


async def echo_through(host: Any, peer: Any, payload: bytes) -> bytes:
    """Open an echo stream to ``peer`` (over whatever connection the swarm
    has), send ``payload``, and return what came back."""
    with trio.fail_after(20):
        stream = await host.new_stream(peer, [ECHO])
        await stream.write(payload)
        got = b""
        while len(got) < len(payload):
            chunk = await stream.read(65536)
            if not chunk:
                break
            got += chunk
        await stream.close()
    return got
