"""Issue #14, "Done when": real nodes across emulated NATs, in network namespaces.

The lab (``p2pgpu.natlab``, built by ``natnet.build``): an internet on
198.51.100.0/24 with two public nodes (bootstrap, and a relay) and the
ledger; two NAT routers doing iptables MASQUERADE, ``home1`` keeping one
public port per mapping (hole punching can work) and ``home2`` with
``--random-fully`` (a new random port per destination: punching fails);
two private nodes behind each.  Every node is a real ``p2pgpu node run``
process listening on all interfaces.

The test checks that every node's market lists every GPU, that no private
node advertises an address nobody can dial (its LAN or loopback addresses),
that the private nodes hold relay slots and are reached through them, and
that a 2-node job with one member behind each NAT forms, runs, returns its
results to a submitter that is itself behind a NAT, and is paid.  It
reports how many NAT-to-NAT connections became direct and how many stayed
relayed; the job succeeds either way.  Where namespaces cannot be made
(not root, no iptables) it skips and says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from natnet import MEMBER_GPU, LabNode, NatNet, build, connection_kinds, wait_until

from p2pgpu import natlab
from p2pgpu.core import Scope, parse_addr

pytestmark = pytest.mark.processes
WHY_NOT = natlab.unavailable()

PAIR = f"""
name = "pair-across-nats"
expires_in_s = 600
[requirements]
nodes = 2
gpus_per_node = 1
models = ["{MEMBER_GPU[0]}"]
[runtime]
kind = "process"
command = ["python3", "-c", "import os; r = os.environ['P2PGPU_RANK']; open(f'result-{{r}}.txt', 'w').write(f'rank {{r}} done' + chr(10)); print('rank', r)"]
duration_s_max = 60
network = false
[payment]
price_per_gpu_hour_max = 10000000
currency = "SOL"
[verification]
replicas = 1
on_member_loss = "fail"
"""


@pytest.fixture
def natnet(tmp_path: Path) -> Iterator[NatNet]:
    if WHY_NOT is not None:
        pytest.skip(f"network namespaces unavailable: {WHY_NOT}")
    lab = natlab.NatLab(tag=f"t{os.getpid() % 10000}", delay_ms=5)
    net = None
    try:
        lab.open()
        net = build(lab, tmp_path)
        yield net
    except BaseException:
        if net is not None:
            for n in net.nodes.values():
                print(f"--- {n.name} ({n.host.ip}) log tail ---\n{n.log_tail(60)}")
        raise
    finally:
        if net is not None:
            net.stop()
        lab.close()
        assert not [ns for ns in natlab.lab_namespaces() if ns.startswith(lab.run_id)]


def _advertised(node: LabNode) -> list[str]:
    return node.call("status")["reachability"]["advertised_addrs"]


def test_job_across_two_nats_forms_runs_returns_results_and_is_paid(natnet: NatNet, tmp_path: Path) -> None:
    nodes = natnet.nodes
    private = [nodes[n] for n in ("a1", "a2", "b1", "b2")]
    everyone = list(nodes.values())

    # Private nodes hold relay slots and advertise relay addresses only.
    for n in private:
        addrs = wait_until(lambda n=n: [a for a in _advertised(n) if "/p2p-circuit" in a], timeout_s=90,
                           what=f"{n.name} to hold a relay slot")
        assert addrs
    for n in private:
        for a in _advertised(n):
            p = parse_addr(a)
            assert p is not None and p.scope is Scope.PUBLIC, f"{n.name} advertises {a}"
            assert p.is_relay, f"{n.name} behind a NAT advertises a direct address {a}"
    # Public nodes: public, their own public address only.
    def public(n: LabNode) -> dict | None:
        st = n.call("status")["reachability"]
        return st if st["reachability"] == "public" else None

    for n in (nodes["boot"], nodes["relay"]):
        st = wait_until(lambda n=n: public(n), timeout_s=90, what=f"{n.name} to be found public")
        assert st["advertised_addrs"] == [f"/ip4/{n.host.ip}/tcp/4001/p2p/{n.peer_id}"]

    # AutoNAT: the two public servers could not dial the private nodes back.
    def verdict(n: LabNode) -> dict | None:
        st = n.call("status")["reachability"]
        return st if st["reachability"] != "unknown" else None

    for n in private:
        st = wait_until(lambda n=n: verdict(n), timeout_s=90, what=f"{n.name}'s AutoNAT verdict")
        assert st["reachability"] == "private", st
        assert "could not dial us back" in st["why"]

    # Every node's market lists every GPU.
    want = {n.peer_id for n in everyone}
    for n in everyone:
        wait_until(lambda n=n: {r["peer_id"] for r in n.call("market")} >= want, timeout_s=120,
                   what=f"{n.name}'s market to list every node")

    # A 2-node job, one member behind each NAT, submitted from behind a NAT.
    submitter = nodes["a2"]
    for n in everyone:  # accounts exist (rent-exempt minimum)
        natnet.rpc("requestAirdrop", [n.call("wallet")["payout_address"], 1_000_000_000])
    natnet.rpc("requestAirdrop", [submitter.call("wallet")["address"], 50_000_000_000])
    job = submitter.call("job.submit", {"manifest": PAIR})["job_id"]

    def settled() -> dict | None:
        d = submitter.call("job.status", {"job_id": job})
        done = d["state"] in ("succeeded", "failed") and d["payouts"] and all(
            p["status"] == "paid" for p in d["payouts"])
        return d if done or d["state"] == "failed" else None

    doc = wait_until(settled, timeout_s=240, what="the job to run and be paid")
    assert doc["state"] == "succeeded", doc
    assert sorted(doc["cluster"]["members"]) == sorted([nodes["a1"].peer_id, nodes["b1"].peer_id])
    out = tmp_path / "results"
    got = submitter.call("job.results", {"job_id": job, "out": str(out)}, timeout_s=120)
    texts = sorted(p.read_text() for p in out.rglob("result-*.txt"))
    assert texts == ["rank 0 done\n", "rank 1 done\n"], got
    for p in doc["payouts"]:
        assert natnet.rpc("getBalance", [p["payout_address"]])["value"] >= 1_000_000_000 + p["amount"]

    # How NAT-to-NAT connections ended up.
    report = {}
    for n in (nodes["a1"], nodes["a2"]):
        report[n.name] = connection_kinds(n, [nodes["b1"], nodes["b2"]])
    direct = sum(k.count("direct") for row in report.values() for k in row.values())
    relayed = sum(k.count("relayed") for row in report.values() for k in row.values())
    punches = {n.name: n.call("status")["reachability"]["hole_punch"] for n in private}
    print(f"NAT-to-NAT connections: {direct} direct, {relayed} relayed; {report}; hole punches: {punches}")
    # home2 allocates a random port per destination: nothing from home1 can
    # have punched through to it.
    assert direct == 0
    assert relayed >= 1


@pytest.fixture
def punchnet(tmp_path: Path) -> Iterator[NatNet]:
    """A public bootstrap node (the relay) and one node behind each of two
    NATs that keep one public port per inside port: hole punching can work."""
    if WHY_NOT is not None:
        pytest.skip(f"network namespaces unavailable: {WHY_NOT}")
    lab = natlab.NatLab(tag=f"p{os.getpid() % 10000}", delay_ms=5)
    net = None
    try:
        lab.open()
        lab.add_public("boot")
        for i, name in ((1, "x"), (2, "y")):
            lab.add_private(lab.add_nat(f"home{i}"), name)
        net = NatNet(lab=lab, root=tmp_path)
        net.start_ledger()
        boot = net.start_node("boot", MEMBER_GPU, bootstrap=[], config='relay_service = "on"')
        for name in ("x", "y"):
            net.start_node(name, MEMBER_GPU, bootstrap=[boot.bootstrap_addr])
        yield net
    except BaseException:
        if net is not None:
            for n in net.nodes.values():
                print(f"--- {n.name} ({n.host.ip}) log tail ---\n{n.log_tail(60)}")
        raise
    finally:
        if net is not None:
            net.stop()
        lab.close()
        assert not [ns for ns in natlab.lab_namespaces() if ns.startswith(lab.run_id)]


def test_hole_punching_turns_a_relayed_connection_direct(punchnet: NatNet) -> None:
    x, y = punchnet.nodes["x"], punchnet.nodes["y"]
    # They find each other in the market and connect through the relay; the
    # side that accepted the relayed connection punches.
    wait_until(lambda: x.peer_id in {r["peer_id"] for r in y.call("market")}
               and y.peer_id in {r["peer_id"] for r in x.call("market")}, timeout_s=90, what="both markets")
    def direct() -> dict[str, list[str]] | None:
        k = connection_kinds(x, [y])
        return k if "direct" in k["y"] else None

    kinds = wait_until(direct, timeout_s=120, what="a direct connection between the two NATed nodes")
    print(f"x-y connections: {kinds}; hole punches: x {x.call('status')['reachability']['hole_punch']}, "
          f"y {y.call('status')['reachability']['hole_punch']}")
    # The punch that made it is counted when it returns (a moment after the
    # connection appears).
    wait_until(lambda: sum(n.call("status")["reachability"]["hole_punch"]["succeeded"] for n in (x, y)) >= 1,
               timeout_s=60, what="the punch to be counted")
    # Neither advertises a direct address: the punch needs none.
    for n in (x, y):
        assert all("/p2p-circuit" in a for a in _advertised(n))
