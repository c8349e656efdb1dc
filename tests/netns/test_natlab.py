"""The NAT lab itself (``p2pgpu/natlab.py``): a private host reaches the
internet through its NAT but nobody outside reaches it; the machine's own
namespace is not part of the lab; a lab is removed on close, and one left
behind by a killed run is swept."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from p2pgpu import natlab

WHY_NOT = natlab.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"network namespaces unavailable: {WHY_NOT}")


def _try_connect(ip: str, port: int) -> str:
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((ip, port))
        return "connected"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        s.close()


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4)
    return s


def test_nat_lets_out_and_keeps_out_and_the_lab_goes_away() -> None:
    with natlab.NatLab(tag="labt") as lab:
        pub = lab.add_public("pub")
        nat = lab.add_nat("home")
        priv = lab.add_private(nat, "priv")
        names = natlab.lab_namespaces()
        assert {pub.netns, nat.netns, priv.netns, lab.inet} <= set(names)
        srv_pub = lab.call_in(pub, _listen, 7001)
        srv_priv = lab.call_in(priv, _listen, 7001)
        try:
            assert lab.call_in(priv, _try_connect, pub.ip, 7001) == "connected"  # out through the NAT
            assert lab.call_in(pub, _try_connect, nat.wan_ip, 7001) == "timeout"  # dropped, not refused
            assert lab.call_in(pub, _try_connect, priv.ip, 7001) != "connected"  # no route to 10.0.x
        finally:
            srv_pub.close()
            srv_priv.close()
    assert not [n for n in natlab.lab_namespaces() if n.startswith(lab.run_id)]


def test_a_lab_left_by_a_dead_process_is_swept() -> None:
    dead = f"{natlab.PREFIX}{os.getpid() + 4_000_000}-stale-inet"  # above any pid_max: never alive
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        assert dead in natlab.lab_namespaces()
        assert dead in natlab.sweep_stale()
        assert dead not in natlab.lab_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", dead], check=False, capture_output=True)
