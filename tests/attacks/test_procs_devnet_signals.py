"""#12.5: `p2pgpu devnet up` stopped with SIGTERM left its whole network running.

The attack (an accident more than an attack, but the effect is the same: a
machine full of daemons, ports held, reparented to init): SIGTERM is what
systemd, docker and `timeout` send, and `devnet up` only stopped its ledger,
nodes and explorer on Ctrl-C; SIGKILL left them too.  A process the project
starts must never outlive the process that started it, whatever ended it.

Each test starts a real `devnet up` (ledger server, two node daemons, the
explorer), records its process tree and listening ports from /proc, sends the
signal, and checks within a bounded time that no process of the tree is left,
no port of it is still listening, and no process anywhere names the devnet's
directory.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs_helpers import kill_all, listeners_on, listening_ports, naming, process_tree, wait_gone

pytestmark = pytest.mark.processes

#: The devnet must be up (two nodes, ledger, explorer) within this on a loaded machine.
up_timeout_s = 180.0
#: Bounds on how long the whole tree may take to go after each signal: SIGTERM
#: runs the graceful stop (nodes, then explorer and ledger, each bounded by a
#: 10 s grace); SIGKILL relies on the kernel's parent-death signal alone.
gone_within_s: dict[int, float] = {signal.SIGTERM: 40.0, signal.SIGKILL: 10.0}


def _start_devnet(root: Path) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pgpu.cli", "devnet", "up", "--nodes", "2", "--jobs", "0", "--dir", str(root),
         "--timeout", str(int(up_timeout_s))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    up = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "network is up" in line:
                up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + up_timeout_s
    while not up.is_set():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            reader.join()
            assert proc.stderr is not None
            proc.stderr.close()
            raise AssertionError("devnet did not come up:\n" + "".join(lines[-30:]))
        up.wait(0.2)
    return proc, lines, reader


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_devnet_up_stopped_by_a_signal_leaves_no_process_and_no_port(tmp_path: Path, sig: int) -> None:
    root = tmp_path / "devnet"
    proc, lines, reader = _start_devnet(root)
    tree: list[int] = []
    try:
        # devnet itself, the ledger server, two nodes and the explorer; the
        # ledger's two ports, each node's libp2p and control ports, the
        # explorer's (devnet does not wait for the explorer: give it time).
        deadline = time.monotonic() + 60
        while True:
            tree = process_tree(proc.pid)
            ports = listening_ports(tree)
            if (len(tree) >= 5 and len(ports) >= 7) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(tree) >= 5, tree
        assert len(ports) >= 7, ports

        proc.send_signal(sig)
        t0 = time.monotonic()
        left = wait_gone(tree, gone_within_s[sig])
        took = time.monotonic() - t0
        assert left == [], f"{len(left)} of {len(tree)} processes still running {took:.1f} s after {sig!r}"
        assert listeners_on(set(ports)) == {}, "ports of the devnet still listening"
        assert naming(str(root)) == [], "processes naming the devnet's directory are still running"
        proc.wait(timeout=10)
        if sig == signal.SIGTERM:
            # Stopped as Ctrl-C stops it: cleanly, saying why, with a success status.
            assert proc.returncode == 0, "".join(lines[-20:])
            assert any("stopped by SIGTERM" in ln for ln in lines), "".join(lines[-20:])
    finally:
        kill_all(tree, str(root))
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
