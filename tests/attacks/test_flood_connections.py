"""#18.6: cheap identities cannot fill every connection slot.

The attack, as reported: 260 fresh identities, each holding one connection,
took 249 of the node's 250 inbound slots; a new honest node bootstrapping
from it had no peers for 40 s, and still none after the attackers left
(py-libp2p held each inbound slot until the node exited).

Here node 0 runs with small limits (40 connections, 8 kept free for
newcomers, 8 per IP, 24 per /24 subnet).  Sybils connect from 127.0.1.x (one
subnet) and then from 127.0.2.x to 127.0.31.x (many subnets): the per-IP and
per-subnet limits hold, the total cap holds, the manager frees the
newcomers' room, an honest newcomer (127.0.0.1) connects and sees the market,
and once the Sybils leave their slots are free again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pgpu.localnet import LocalNet
from p2pgpu.node import _patches
from p2pgpu.node._stack import open_stack

pytestmark = pytest.mark.processes

MIX = [("NVIDIA L4", 23034, "8.9", 1)]
LIMITS = "connections_max = 40\nnewcomer_headroom = 8\ninbound_per_ip_max = 8\ninbound_per_subnet_max = 24\n"
HERE = Path(__file__).parent


def _spawn(target: str, seed: int, plan: list[tuple[str, int]]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE / "sybil_process.py"), target, str(seed),
                             *[f"{ip}:{n}" for ip, n in plan]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(HERE)})


def _connected(proc: subprocess.Popen[bytes]) -> list[int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the Sybil process died"
    return json.loads(line)["connected"]  # type: ignore[no-any-return]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@contextmanager
def sybils(target: str, seed: int, plan: list[tuple[str, int]]) -> Iterator[tuple[list[int], subprocess.Popen[bytes]]]:
    """A child process holding Sybil connections (``sybil_process.py``);
    killed on exit, which is how the attackers leave."""
    proc = _spawn(target, seed, plan)
    try:
        yield _connected(proc), proc
    finally:
        _kill(proc)
        proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _status(node: Any) -> dict[str, Any]:
    return node.call("status")  # type: ignore[no-any-return]


def test_sybil_connections_leave_room_for_an_honest_newcomer(tmp_path: Path) -> None:
    with LocalNet(tmp_path, 1, gpu_mix=MIX, node_config={0: LIMITS}) as net:
        node0 = net.nodes[0]
        target = node0.addrs[0]
        # One subnet: 8 per IP, 24 for the whole /24.
        one_subnet = [("127.0.1.2", 12), ("127.0.1.3", 12), ("127.0.1.4", 12), ("127.0.1.5", 12)]
        with sybils(target, 100, one_subnet) as (got, _a):
            assert got == [8, 8, 8, 0]
            st = _status(node0)
            assert st["counters"]["connections_refused:per_ip"] >= 12
            assert st["counters"]["connections_refused:per_subnet"] >= 12
            # Many subnets (260 identities in all): the total cap (40) holds.
            with sybils(target, 200, [(f"127.0.{k + 2}.2", 7) for k in range(30)]) as (more, _b):
                st = _status(node0)
                # The gate's cap is exact: never more than 40 inbound slots held.
                assert st["connections"]["inbound_admitted"] <= 40
                # The table of peers can count one more for a moment: a closed
                # connection's slot is released before its peer's "disconnected"
                # notification is handled (seen: 41 under load); it settles.
                assert st["connections"]["open"] <= 41
                net.wait_until(lambda: _status(node0)["connections"]["open"] <= 40, timeout_s=10,
                               what="the peer table within the cap")
                # (more connect than 40 - 24 over the run: the manager closes the
                # oldest idle ones to keep room, and the next get in; with every
                # one admitted in time — a slow machine — none is refused "full")
                assert st["counters"].get("connections_refused:full", 0) >= 210 - sum(more) - 8
                # The manager frees the newcomers' room (the Sybils are unknown and idle) ...
                net.wait_until(lambda: _status(node0)["connections"]["open"] <= 32, timeout_s=30,
                               what="room for newcomers")
                # ... and an honest newcomer gets in and sees the market at once.
                newcomer = net.start_node(1, bootstrap=node0.addrs)
                net.nodes.append(newcomer)
                net.wait_until(lambda: node0.peer_id in {r["peer_id"] for r in newcomer.call("market")},
                               timeout_s=30, what="the newcomer sees node 0's advert")
                assert _status(newcomer)["peers"] >= 1
                assert _status(node0)["counters"]["connections_closed_for_room"] >= 1
        # The Sybils left: their slots are free again (no slot outlives its connection).
        net.wait_until(lambda: _status(node0)["connections"]["inbound_admitted"] <= 2, timeout_s=30,
                       what="inbound slots released")
        with sybils(target, 999, [("127.0.1.2", 8)]) as (again, _c):
            assert again == [8]
        assert node0.proc.poll() is None


async def test_an_inbound_slot_is_released_when_its_peer_leaves() -> None:
    """py-libp2p held each inbound connection's slot until the node exited
    (#18.6: "still none after the attackers left"); ``inbound_slot_release``
    ties it to the connection."""
    async with open_stack(b"s" * 32, ["/ip4/127.0.0.1/tcp/0"], dht_validators={}) as node:
        assert "inbound_slot_release" in _patches.apply_fixes()
        swarm = node.host.get_network()
        proc = _spawn(node.addrs()[0], 7, [("127.0.1.9", 5)])
        try:
            assert await trio.to_thread.run_sync(_connected, proc) == [5]
            assert swarm._inbound_limiter.borrowed_tokens == 5
        finally:
            _kill(proc)
        with trio.fail_after(20):
            while swarm._inbound_limiter.borrowed_tokens or swarm.get_connections():
                await trio.sleep(0.1)
