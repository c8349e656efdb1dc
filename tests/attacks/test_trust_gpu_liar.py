"""#16.1, attack: a node claims a GPU it does not have.

Real ``p2pgpu node run`` processes on 127.0.0.1, on a network that refuses
simulated GPUs (so the liar cannot hide behind a simulated advert):

- node 0, an honest node without GPUs, challenges on request only;
- node 1, the liar: a fake NVML makes it sign a non-simulated advert for an
  NVIDIA H100 (``_gpu_liar.py``); it runs the ordinary prover on this CPU;
- node 2, an honest node without GPUs, challenges on its own (the default
  on such a network).

Node 2 refuses the liar's H100 claim without being asked.  Node 0, which has
not challenged yet, matches the liar for an H100 job; its own challenge of
the claim ends late and refuses it, after which neither ``market.match`` nor
the job dry run offers the liar for H100 work.  Node 0's challenge of node 2 for the CPU
entry passes: an honest CPU backend passes a challenge sized for it.

Then node 0 submits a real H100 job (#16.1).  Its matching no longer offers
the liar, but the liar reads the manifest itself, volunteers on its own rank,
leads (it is the only volunteer) and proposes itself with its signed accept.
Before #16.1 node 0 confirmed that certificate: its claim verdicts shaped
only its market.  Now its submitter core refuses it (``claim_refused``) and
the liar never runs the job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pgpu import children
from p2pgpu.localnet import LocalNet, NodeProc, _override_config

pytestmark = pytest.mark.processes

LIAR = Path(__file__).with_name("_gpu_liar.py")
NETWORKS = """
[networks.strict]
bootstrap = []
allow_simulated = false
ledger = "embedded"
currency = "SOL"
"""
H100_JOB = {"nodes": 1, "gpus_per_node": 1, "models": ["H100"], "price_per_gpu_hour_max": 10**9}


class StrictNet(LocalNet):
    """A LocalNet on the strict network: no ``--gpus-from`` (NVML, i.e. none
    here), and node 1 runs the liar."""

    def start_node(self, i: int, *, bootstrap: list[str], wait: bool = True) -> NodeProc:
        home = self.home(i)
        if not home.exists():
            home.init(network="strict")
            _override_config(home.config_path, self.node_config.get(i, ""))
        home.control_path.unlink(missing_ok=True)
        entry = [str(LIAR)] if i == 1 else ["-m", "p2pgpu.cli"]
        args = [sys.executable, *entry, "node", "run", "--home", str(home.path), "--listen", "/ip4/127.0.0.1/tcp/0"]
        for b in bootstrap[:1]:
            args += ["--bootstrap", b]
        log_path = self.root / f"node{i}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(log_path, "ab") as log:
            proc = children.spawn(args, stdout=log, stderr=subprocess.STDOUT, env=env)  # dies with us
        node = NodeProc(index=i, home=home, proc=proc, log_path=log_path)
        if wait:
            self.wait_ready(node)
        return node


def _matched(node: NodeProc) -> list[str]:
    return [row["peer_id"] for row in node.call("market.match", {"requirements": H100_JOB})]


def test_a_gpu_liar_fails_its_challenge_and_is_not_chosen(tmp_path: Path, monkeypatch: Any) -> None:
    networks = tmp_path / "networks.toml"
    networks.write_text(NETWORKS)
    monkeypatch.setenv("P2PGPU_NETWORKS", str(networks))
    config = {0: "challenge_auto = false", 1: "challenge_auto = false"}
    with StrictNet(tmp_path, 3, env={"P2PGPU_NETWORKS": str(networks)}, node_config=config) as net:
        honest, liar, watcher = net.nodes
        gpus = liar.call("gpus")
        assert gpus["simulated"] is False and gpus["gpus"][0]["model"] == "NVIDIA H100 80GB HBM3"
        # The liar's advert reaches node 0 and is believed while untested.
        net.wait_until(lambda: _matched(honest) == [liar.peer_id], timeout_s=60, what="the liar's advert")

        # Node 2 challenges claims on its own on this network, and refuses the claim.
        def refused_by(node: NodeProc) -> bool:
            claims = node.call("challenge.claims")["claims"]
            return any(c["peer_id"] == liar.peer_id and c["model"] == "h100" and c["verdict"] == "refused"
                       for c in claims)

        net.wait_until(lambda: refused_by(watcher), timeout_s=120, what="node 2's own challenge of the liar")
        assert _matched(watcher) == []
        # The liar gave up computing at its deadline (one challenge at a time: wait for it to be free).
        net.wait_until(lambda: liar.call("status")["counters"].get("challenge:served_abandoned", 0) >= 1,
                       timeout_s=60, what="the liar to give up")
        assert _matched(honest) == [liar.peer_id]  # node 0 has not challenged yet: untested, believed

        row = honest.call("challenge.issue", {"peer_id": liar.peer_id, "model": "h100"}, timeout_s=120)
        assert row["n"] == 8192 and row["outcome"] == "late" and row["verdict"] == "refused", row
        assert row["elapsed_ms"] >= row["deadline_ms"]
        assert refused_by(honest)

        assert _matched(honest) == []
        manifest = {"requirements": {"nodes": 1, "gpus_per_node": 1, "models": ["H100"]},
                    "runtime": {"command": ["true"]}, "payment": {"price_per_gpu_hour_max": 10**9}}
        dry = honest.call("job.submit", {"manifest": manifest, "dry_run": True})
        assert dry["matching_peers"] == [] and not dry["enough"], dry
        market = {r["peer_id"]: r for r in honest.call("market")}
        assert liar.peer_id not in market  # no GPU left to offer

        # An honest CPU passes a challenge sized for the CPU entry.
        cpu = honest.call("challenge.issue", {"peer_id": watcher.peer_id, "model": "cpu"}, timeout_s=120)
        assert cpu["n"] == 832 and cpu["outcome"] == "passed" and cpu["verdict"] == "believed", cpu
        assert liar.proc.poll() is None  # the liar was refused, not crashed

        # A real H100 job from node 0: the refused liar volunteers on its own and
        # proposes itself; node 0 refuses the certificate and never confirms it.
        job_id = honest.call("job.submit", {"manifest": manifest})["job_id"]

        def decided() -> dict[str, Any] | None:
            doc: dict[str, Any] = honest.call("job.status", {"job_id": job_id})
            f = doc["formation"]
            return doc if f["certificates_refused"] >= 1 or f["state"] != "published" else None

        doc = net.wait_until(decided, timeout_s=90, what="the liar's certificate to reach node 0")
        assert doc["formation"]["last_refusal_code"] == "claim_refused", doc
        assert liar.peer_id[:16] in doc["formation"]["last_refusal"] and not doc["cluster"]["members"], doc
        # The liar did lead, and keeps trying: every certificate it makes is refused.
        net.wait_until(lambda: honest.call("job.status", {"job_id": job_id})["formation"]["certificates_refused"]
                       >= 2, timeout_s=60, what="the liar's next certificate")
        final = honest.call("job.status", {"job_id": job_id})
        assert final["formation"]["state"] in ("published", "failed") and not final["cluster"]["members"], final
        theirs = liar.call("job.status", {"job_id": job_id})
        assert theirs["state"] not in ("confirmed", "running", "succeeded") and not theirs["cluster"]["members"], theirs
