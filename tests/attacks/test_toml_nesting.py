"""#12 (smaller): a deeply nested TOML manifest broke `job submit` on the daemon.

The attack: a manifest nested thousands of levels deep made the daemon answer
"internal error ... RecursionError" (Python's TOML parser recurses once per
level), and a key dotted 10,000 parts deep (20 KB, well inside the daemon's
512 KiB limit on manifest text) made it build 400 MB of key prefixes.  Both
are now refused before parsing, with a message that says what is wrong, and
the daemon's memory does not move.  Sent to a real node's control API.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pgpu.localnet import LocalNet
from p2pgpu.node import ControlError

pytestmark = pytest.mark.processes

#: The daemon's peak memory may grow this much while refusing (before: ~400 MB for the dotted key).
peak_growth_bytes_max = 50 * 1024 * 1024


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_deep_manifests_are_refused_clearly_and_cheaply(tmp_path: Path) -> None:
    with LocalNet(tmp_path / "net", 1) as net:
        node = net.nodes[0]
        peak = _peak_rss_bytes(node.proc.pid)
        deep = 'name = "deep"\n[runtime]\ncommand = ["true"]\nenv = ' + "[" * 5000 + "]" * 5000 + "\n"
        dotted = 'name = "dotted"\n[runtime]\ncommand = ["true"]\nenv.' + ".".join(["x"] * 10_000) + ' = "v"\n'
        for manifest, why in ((deep, "nested more than 16 levels deep"), (dotted, "more than 16 parts long")):
            with pytest.raises(ControlError) as refused:
                node.call("job.submit", {"manifest": manifest, "dry_run": True})
            assert why in str(refused.value), str(refused.value)
            assert "internal error" not in str(refused.value)
        assert _peak_rss_bytes(node.proc.pid) - peak < peak_growth_bytes_max
        assert node.call("status")["peer_id"] == node.peer_id  # and it still serves
