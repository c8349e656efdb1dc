"""#12.5 (with #12.6): a `node run` that has children leaves nothing behind when it is stopped.

A node running a job has children: the job's sandbox (its keeper, two
bubblewrap processes, the job's shell and its ``sleep``).  The node is
started as ``localnet`` starts it (through ``p2pgpu.children``), a job that
sleeps is submitted to it, and once the sandbox runs the node is signalled.
Every process of its tree must be gone, and its ports closed, within a bound.

SIGTERM: the node's own shutdown stops the sandbox (this held before #12.5;
kept as a guard).  SIGKILL: nothing in the node runs; the sandbox's parent,
its keeper (``runtime/_keeper.py``, #12.6: single-threaded, so bubblewrap's
``--die-with-parent`` follows it), watches the node through a pidfd and kills
the sandbox when the node dies.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from procs_helpers import kill_all, listeners_on, listening_ports, naming, process_tree, wait_gone

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes

SLEEPER = """
name = "sleeper"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "echo started; sleep 120"]
duration_s_max = 150
[payment]
price_per_gpu_hour_max = 36000000
"""
#: node run, the keeper, bubblewrap (outer and the pid namespace's init), sh, sleep.
sandboxed_tree_min = 6
gone_within_s: dict[int, float] = {signal.SIGTERM: 20.0, signal.SIGKILL: 10.0}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_node_run_with_a_running_job_leaves_no_process_and_no_port(tmp_path: Path, sig: int) -> None:
    root = tmp_path / "net"
    tree: list[int] = []
    with LocalNet(root, 1) as net:
        node = net.nodes[0]
        try:
            node.call("job.submit", {"manifest": SLEEPER})
            deadline = time.monotonic() + 90
            while len(process_tree(node.proc.pid)) < sandboxed_tree_min:
                assert time.monotonic() < deadline, f"the job's sandbox did not start:\n{node.log_tail()}"
                time.sleep(0.2)
            time.sleep(0.5)  # the job is past its first line
            tree = process_tree(node.proc.pid)
            ports = listening_ports(tree)
            assert len(ports) >= 2, ports  # libp2p and the control API

            node.proc.send_signal(sig)
            left = wait_gone(tree, gone_within_s[sig])
            assert left == [], f"{len(left)} of {len(tree)} processes still running after {sig!r}: {left}"
            assert listeners_on(set(ports)) == {}, "the node's ports still listening"
            assert naming(str(root)) == [], "processes naming the node's home are still running"
        finally:
            kill_all(tree, str(root))
