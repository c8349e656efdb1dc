"""The advert book keeps peers with a record (#16): the daemon's list of peers
to protect from eviction names them after its bootstrap peers, best first,
within half the room, before the peers of its jobs."""

from __future__ import annotations

from types import SimpleNamespace

from p2pgpu.core._reputation import Reputation, Score
from p2pgpu.node._daemon import Node


def test_peers_with_a_record_are_protected_after_bootstrap_and_before_job_peers() -> None:
    scores = {p: Score(peer_id=p, good=g) for p, g in (("good", 500), ("best", 900), ("none", 0))}
    scores["bad"] = Score(peer_id="bad", bad=10)
    job = SimpleNamespace(members=["member"], roles=["submitter"], manifest=None)
    node = SimpleNamespace(
        network=SimpleNamespace(bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/boot"]), options=SimpleNamespace(bootstrap=[]),
        book=SimpleNamespace(protected_max=8), identity=SimpleNamespace(peer_id="me"),
        receipts=SimpleNamespace(last=Reputation(scores=scores, refused=[])),
        jobs=SimpleNamespace(records=SimpleNamespace(ours_newest_first=lambda: [job]), ended={}))
    assert Node.peers_we_work_with(node) == ["boot", "best", "good", "member"]  # type: ignore[arg-type]
    node.book.protected_max = 2
    assert Node.peers_we_work_with(node) == ["boot", "best"]  # type: ignore[arg-type]
