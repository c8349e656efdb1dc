"""The explorer against real node daemons: its JSON API and its ``/metrics``.

A ``p2pgpu explorer`` process over node 0 of a LocalNet must report the GPU
supply that the nodes' simulated inventories hold, by model and region; its
``/metrics`` must parse with the Prometheus client's own parser, and its
counters must move when a third node joins and when a job forms a cluster.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from explorer_helpers import (
    MIX,
    REGIONS,
    Explorer,
    ensure_job,
    ensure_third,
    start_explorer,
    stop_explorer,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from p2pgpu.home import Home
from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes


def expected_supply(n: int) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for i in range(n):
        model, _mb, _cc, count = MIX[i]
        out[(model, REGIONS[i])] = out.get((model, REGIONS[i]), 0) + count
    return out


def supply_of(ex: Explorer) -> dict[tuple[str, str], int]:
    return {(r["model"], r["region"]): r["gpus"] for r in ex.get("/api/supply")["rows"]}


def metrics(ex: Explorer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels -> value}, every sample of every family."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(ex.get("/metrics")):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_api_reports_the_nodes_gpus(net: LocalNet, explorer: Explorer) -> None:
    wait_for(lambda: supply_of(explorer) == expected_supply(2), what="the supply of two nodes")
    sup = explorer.get("/api/supply")
    assert sup["available"] is True and sup["gpus_total"] == 10 and sup["nodes"] == 2
    assert [m["model"] for m in sup["by_model"]] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    assert {r["region"]: r["gpus"] for r in sup["by_region"]} == {"eu-west": 8, "us-east": 2}

    nodes = explorer.get("/api/nodes")["rows"]
    by_peer = {n["peer_id"]: n for n in nodes}
    assert set(by_peer) == {net.nodes[0].peer_id, net.nodes[1].peer_id}
    assert by_peer[net.nodes[0].peer_id]["self"] is True
    other = by_peer[net.nodes[1].peer_id]
    assert other["region"] == "us-east" and other["simulated"] is True and other["gpus_total"] == 2
    wait_for(lambda: explorer.get("/api/nodes")["rows"] and any(
        n["connected"] for n in explorer.get("/api/nodes")["rows"]), what="node 1 linked to node 0")

    summary = explorer.get("/api/summary")
    assert summary["daemon_up"] is True and summary["peer_id"] == net.nodes[0].peer_id
    assert summary["network"] == "local" and summary["gpus_total"] == 10 and summary["models"] == 2
    for name in ("clusters", "jobs", "proofs", "payouts"):
        doc = explorer.get(f"/api/{name}")
        assert isinstance(doc["rows"], list) and isinstance(doc["available"], bool)
        assert doc["available"] or doc["missing_methods"], name
    assert explorer.get("/healthz")["daemon_up"] is True
    page = explorer.get("/")
    assert "p2pgpu explorer" in page and "/static/app.js" in page


def test_check_of_an_unknown_proof_says_so(explorer: Explorer) -> None:
    doc = explorer.get("/api/check/" + "ab" * 32, method="POST")
    assert doc["valid"] is False and doc["failed"] is False and doc["known"] is False
    assert [s["name"] for s in doc["steps"]] == ["signature", "inclusion", "memo"]
    with pytest.raises(Exception, match="400"):
        explorer.get("/api/check/not-a-hash")


def test_metrics_parse_and_move_when_a_node_joins(net: LocalNet, explorer: Explorer) -> None:
    wait_for(lambda: supply_of(explorer) == expected_supply(len(net.nodes)), what="the supply before")
    before = metrics(explorer)
    assert before["p2pgpu_up"][()] == 1
    def key(event: str) -> tuple[tuple[str, str], ...]:
        return (("event", event),)

    delivered_before = before["p2pgpu_node_events_total"].get(key("adverts_delivered"), 0)
    polls_before = before["p2pgpu_explorer_polls_total"][()]
    joined = len(net.nodes) < 3
    ensure_third(net)

    def moved() -> Any:
        m = metrics(explorer)
        return m if m["p2pgpu_supply_nodes"][()] == 3 and m["p2pgpu_adverts_known"][()] == 3 else None

    after = wait_for(moved, what="the third node in /metrics")
    assert after["p2pgpu_explorer_polls_total"][()] > polls_before
    if joined:
        assert after["p2pgpu_node_events_total"][key("adverts_delivered")] > delivered_before
    supply = {dict(k)["model"] + "/" + dict(k)["region"]: v for k, v in after["p2pgpu_supply_gpus"].items()}
    assert supply == {"NVIDIA H100 80GB HBM3/eu-west": 8, "NVIDIA GeForce RTX 4090/us-east": 2,
                      "NVIDIA H100 80GB HBM3/us-east": 4}
    assert after["p2pgpu_peers"][()] >= 1
    assert after["p2pgpu_cluster_formation_seconds_count"][()] >= 0
    assert ("method", "status") in [k[0] for k in after["p2pgpu_explorer_control_call_seconds"]]


def test_a_submitted_job_forms_a_cluster_in_api_and_metrics(net: LocalNet, explorer: Explorer) -> None:
    ensure_third(net)
    before = metrics(explorer)
    job_id = ensure_job(net)

    def cluster() -> Any:
        rows = [c for c in explorer.get("/api/clusters")["rows"] if c["job_id"] == job_id]
        return rows[0] if rows else None

    c = wait_for(cluster, what="the job's cluster in /api/clusters")
    peers = {n.peer_id for n in net.nodes}
    assert len(c["members"]) == 1 and set(c["members"]) <= peers and c["name"] == "hello"
    assert len(c["certificate_hash"]) == 64 and int(c["certificate_hash"], 16) >= 0
    assert isinstance(c["formation_ms"], int) and c["formation_ms"] >= 0
    job = next(j for j in explorer.get("/api/jobs")["rows"] if j["job_id"] == job_id)
    assert "submitter" in job["roles"] and job["submitter"] == net.nodes[0].peer_id

    def clustered() -> Any:
        m = metrics(explorer)
        return m if m["p2pgpu_clusters"][()] >= 1 else None

    after = wait_for(clustered, what="p2pgpu_clusters in /metrics")
    assert sum(after["p2pgpu_jobs"].values()) > sum(before.get("p2pgpu_jobs", {}).values())
    assert after["p2pgpu_cluster_formation_seconds_count"][()] > before["p2pgpu_cluster_formation_seconds_count"][()]
    assert explorer.get("/api/summary")["clusters"] >= 1


def test_a_paid_job_passes_the_proof_check(net: LocalNet, explorer: Explorer) -> None:
    job_id = ensure_job(net)

    def paid() -> Any:
        rows = [p for p in explorer.get("/api/payouts")["rows"] if p["job_id"] == job_id and p["paid"]]
        return rows[0] if rows else None

    try:
        pay = wait_for(paid, what="the job's payout with a transaction signature")
    except AssertionError:
        raise AssertionError(f"no paid payout; jobs: {explorer.get('/api/jobs')['rows']}\n"
                             f"payouts: {explorer.get('/api/payouts')}\nnode 0 log:\n{net.nodes[0].log_tail()}") from None
    assert pay["side"] == "owed" and pay["amount"] > 0 and len(pay["tx_signature"]) > 60
    proof = next(p for p in explorer.get("/api/proofs")["rows"] if p["proof_hash"] == pay["proof_hash"])
    assert proof["paid"] is True and proof["tx_signature"] == pay["tx_signature"]

    doc = explorer.get("/api/check/" + pay["proof_hash"], method="POST")
    assert [(s["name"], s["ok"]) for s in doc["steps"]] == [("signature", True), ("inclusion", True), ("memo", True)]
    assert doc["valid"] is True and doc["tx_signature"] == pay["tx_signature"] and doc["job_id"] == job_id
    assert doc["signer"] == pay["worker"] and len(doc["root"]) == 64

    def paid_metrics() -> Any:
        m = metrics(explorer)
        events = m.get("p2pgpu_node_events_total", {})
        settled = events.get((("event", "jobs_settled"),), 0) >= 1 and events.get((("event", "payouts_paid"),), 0)
        return m if m.get("p2pgpu_paid_amount_total") and settled else None

    m = wait_for(paid_metrics, what="paid amount in /metrics")
    assert m["p2pgpu_paid_amount_total"][(("currency", "SOL"),)] >= pay["amount"]
    assert m["p2pgpu_payouts"][(("side", "owed"), ("status", "paid"))] >= 1
    summary = explorer.get("/api/summary")
    assert summary["payouts_paid"] >= 1 and summary["paid_total"]["SOL"] >= pay["amount"]


def test_without_a_daemon_the_explorer_says_so_and_keeps_serving(tmp_path: Path) -> None:
    home = Home(tmp_path / "lonely")
    home.init(network="local")
    ex = start_explorer(home)
    try:
        summary = ex.get("/api/summary")
        assert summary["daemon_up"] is False and summary["nodes"] == 0
        assert "no daemon runs" in ex.get("/api/all")["errors"]["status"]
        with pytest.raises(urllib.error.HTTPError, match="503"):
            ex.get("/healthz")
        assert "p2pgpu_up 0.0" in ex.get("/metrics")
    finally:
        assert stop_explorer(ex) == 0


def test_explorer_command_errors_say_what_to_do(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "p2pgpu.cli", "explorer", *args], capture_output=True,
                              text=True, timeout=60, check=False)

    out = run("--home", str(tmp_path / "nothing"))
    assert out.returncode == 1 and "p2pgpu init" in out.stderr
    home = Home(tmp_path / "h")
    home.init(network="local")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = run("--home", str(home.path), "--port", str(busy.getsockname()[1]))
    assert out.returncode == 1 and "cannot listen on 127.0.0.1" in out.stderr, out.stderr
