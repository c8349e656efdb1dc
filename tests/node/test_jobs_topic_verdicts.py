"""The jobs topic's verdicts (#13): the node's GossipSub validator answers
what ``core/_verdict.py`` maps the host's refusal to.

A submitter over its formation quota (``LIMIT_EXCEEDED``) is this node's
limit, not the forwarder's fault: the message is ignored (dropped, no score
lost), where a ``False`` from py-libp2p's validator would have cost every
honest relay of a busy submitter its score.  Bytes that are not a message at
all are still rejected.  The node's ``JobsService`` and its host are real;
only the node around them is a stand-in (no network: nothing is sent).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from random import Random
from types import SimpleNamespace
from typing import Any

from p2pgpu.core import Advert, FormationConfig, GossipVerdict, GpuInfo, Identity, sign_advert
from p2pgpu.core._manifest import Manifest, sign_manifest
from p2pgpu.node._jobs import JobsService
from p2pgpu.store import open_db

T0 = 1_767_225_600_000
WORKER = Identity(bytes([71]) * 32)
BUSY = Identity(bytes([72]) * 32)
OTHER = Identity(bytes([73]) * 32)
A100 = GpuInfo(model="NVIDIA A100", memory_mb=40960, compute_capability="8.0")
RNG = Random(5)


def _service(tmp_path: Path) -> tuple[JobsService, Counter[str]]:
    counts: Counter[str] = Counter()
    adv = Advert(peer_id=WORKER.peer_id, network="sim", addrs=(), seq=1, issued_at_ms=T0, expires_at_ms=T0 + 600_000,
                 gpus=(A100,), gpus_free=1, price_per_gpu_hour=1, currency="SOL", payout_address="",
                 region="local", runtimes=("process",), simulated=True)
    sa = sign_advert(WORKER, adv)
    book = SimpleNamespace(adverts={WORKER.peer_id: sa}, network="sim", live=lambda now: [adv])
    ports = SimpleNamespace(identity=WORKER, counts=counts, now_ms=lambda: T0 + 1, payout_address="",
                            book=book, payouts_due=lambda: None, capacity_changed=lambda: None, gpus_reserved=0,
                            inventory=SimpleNamespace(gpus=[A100], simulated=True), stack=None, blobs=None)
    jobs = JobsService(ports, rng=Random(0))  # type: ignore[arg-type]
    jobs.db = open_db(tmp_path / "node.db")
    jobs.on_advert(sa)
    return jobs, counts


def _manifest_wire(submitter: Identity) -> bytes:
    m = Manifest(name="q", submitter=submitter.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000,
                 nonce=RNG.randbytes(16), nodes=1, gpus_per_node=1, command=("true",), duration_s_max=60,
                 price_per_gpu_hour_max=3_600_000, payer="11111111111111111111111111111111")
    return sign_manifest(submitter, m).wire


def _gossip(jobs: JobsService, data: bytes) -> GossipVerdict:
    msg: Any = SimpleNamespace(data=data, from_id=b"a relay")
    return jobs._validate(SimpleNamespace(), msg)  # type: ignore[arg-type]


def test_a_submitter_over_its_quota_is_ignored_not_held_against_the_relay(tmp_path: Path) -> None:
    jobs, counts = _service(tmp_path)
    quota = FormationConfig().quotas.jobs_per_submitter_max
    verdicts = [_gossip(jobs, _manifest_wire(BUSY)) for _ in range(quota + 5)]
    assert verdicts[:quota] == [GossipVerdict.ACCEPT] * quota
    assert verdicts[quota:] == [GossipVerdict.IGNORE] * 5
    assert counts["jobs:limit_exceeded"] == 5
    # another submitter's job still gets in
    assert _gossip(jobs, _manifest_wire(OTHER)) is GossipVerdict.ACCEPT


def test_bytes_that_are_no_message_are_rejected(tmp_path: Path) -> None:
    jobs, counts = _service(tmp_path)
    assert _gossip(jobs, b"\xc1 not msgpack") is GossipVerdict.REJECT
    assert _gossip(jobs, b"\x80" * 70_000) is GossipVerdict.REJECT  # over every message's size
    assert sum(counts.values()) >= 2
