"""A stranger's share of a node (#18.3, #18.4): quotas per submitter and per
payer in the formation table and its replay memory, unconfirmed holds per
submitter, and the can-it-pay check that counts what a payer has open."""

from __future__ import annotations

from dataclasses import replace
from random import Random

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason
from p2pgpu.core._actions import Action, Publish, Reserved, Send, TimerKey, TimerOwner
from p2pgpu.core._formation import FormationConfig, FormationNode
from p2pgpu.core._formation_messages import (
    Accept,
    Cancel,
    Certificate,
    Confirm,
    Offer,
    Proposal,
    decode_message,
)
from p2pgpu.core._formation_quota import Admission, Gate, PayerChecks, Quotas, job_ceiling
from p2pgpu.core._manifest import Manifest, SignedManifest, sign_manifest
from p2pgpu.core._payout import payer_covers


def fkey(job_id: str, name: str) -> TimerKey:
    """A formation timer's key."""
    return TimerKey(TimerOwner.FORMATION, job_id, name)

try:
    from .swarm import make_advert
except ImportError:
    from swarm import make_advert  # type: ignore[no-redef]

T0 = 1_000_000
PAYER = "11111111111111111111111111111111"
OTHER_PAYER = "So11111111111111111111111111111111111111112"
FLOODER = Identity(bytes([66]) * 32)
HONEST = Identity(bytes([67]) * 32)
WORKER = Identity(bytes([68]) * 32)
RNG = Random(3)


def manifest(submitter: Identity, *, payer: str = PAYER, now_ms: int = T0, price: int = 3_600_000,
             duration_s: int = 60) -> SignedManifest:
    m = Manifest(name="q", submitter=submitter.peer_id, created_at_ms=now_ms, expires_at_ms=now_ms + 600_000,
                 nonce=RNG.randbytes(16), nodes=1, gpus_per_node=1, command=("true",), duration_s_max=duration_s,
                 price_per_gpu_hour_max=price, payer=payer)
    return sign_manifest(submitter, m)


def worker(gpus: int = 1, config: FormationConfig | None = None) -> FormationNode:
    return FormationNode(WORKER, make_advert(WORKER, gpus=gpus, model="NVIDIA A100"), config or FormationConfig())


def offers(actions: list[Action]) -> list[Offer]:
    return [m for a in actions if isinstance(a, (Send, Publish))
            for m in [decode_message(a.data)] if isinstance(m, Offer)]


def test_one_identitys_flood_leaves_room_for_an_honest_job() -> None:
    """The attack: 5,000 signed manifests from one identity.  They filled the
    table (1,024 jobs for all strangers), and a real job was refused."""
    node = worker()
    refused = 0
    for _ in range(5_000):
        try:
            node.on_manifest(manifest(FLOODER), T0)
        except PeerMisbehaved as exc:
            assert exc.reason is Reason.LIMIT_EXCEEDED
            refused += 1
    quota = FormationConfig().quotas.jobs_per_submitter_max
    assert refused == 5_000 - quota and len(node.jobs) == quota
    honest = manifest(HONEST, payer=OTHER_PAYER)
    assert offers(node.on_manifest(honest, T0 + 1)), "the honest job is seen and volunteered for"


def test_one_payer_shared_by_many_identities_has_a_quota() -> None:
    cfg = FormationConfig(quotas=Quotas(jobs_per_submitter_max=4, jobs_per_payer_max=6))
    node = worker(config=cfg)
    sybils = [Identity(bytes([100 + i]) * 32) for i in range(5)]
    admitted = 0
    for ident in sybils:
        for _ in range(4):
            try:
                node.on_manifest(manifest(ident), T0)
                admitted += 1
            except PeerMisbehaved as exc:
                assert exc.reason is Reason.LIMIT_EXCEEDED and "payer" in exc.detail
    assert admitted == 6
    node.on_manifest(manifest(HONEST, payer=OTHER_PAYER), T0)


def test_cancelled_floods_do_not_fill_the_replay_memory() -> None:
    """Manifest-and-cancel pairs close each job at once, so the table never
    fills, but every id stays remembered until it expires: without a quota
    per submitter the node's replay memory filled and it refused everyone."""
    cfg = FormationConfig(jobs_max=16, quotas=Quotas(remembered_per_submitter_max=100))
    node = worker(config=cfg)  # replay memory: 16 * 64 = 1,024 ids
    refused = 0
    for i in range(1_100):
        sm = manifest(FLOODER, now_ms=T0 + i)
        try:
            node.on_manifest(sm, T0 + i)
        except PeerMisbehaved as exc:
            assert exc.reason is Reason.LIMIT_EXCEEDED
            refused += 1
            continue
        node.on_message(Cancel.sign(FLOODER, job_id=sm.job_id, reason="x", cancelled_at_ms=T0 + i), T0 + i)
    assert refused == 1_000
    node.on_manifest(manifest(HONEST, now_ms=T0 + 2_000), T0 + 2_000)  # the honest job is still taken


def test_ids_are_forgotten_per_submitter_as_they_expire() -> None:
    adm = Admission(Quotas(remembered_per_submitter_max=2))
    a, b = manifest(FLOODER, now_ms=T0), manifest(FLOODER, now_ms=T0)
    adm.admit(a)
    adm.admit(b)
    adm.close(a)
    adm.close(b)
    with pytest.raises(PeerMisbehaved):
        adm.check(manifest(FLOODER), T0 + 1)
    adm.check(manifest(FLOODER), a.manifest.expires_at_ms)  # both expired: room again
    assert adm.remembered == {}


def test_open_ceilings_are_summed_per_payer() -> None:
    node = worker()
    jobs = [manifest(Identity(bytes([110 + i]) * 32)) for i in range(3)]
    for sm in jobs:
        node.on_manifest(sm, T0)
    one = job_ceiling(jobs[0].manifest)
    assert one == 60_000 and node.open_ceiling(PAYER, "SOL") == 3 * one
    node.on_message(Cancel.sign(Identity(bytes([110]) * 32), job_id=jobs[0].job_id, reason="x", cancelled_at_ms=T0),
                    T0 + 1)
    assert node.open_ceiling(PAYER, "SOL") == 2 * one
    assert node.open_ceiling(OTHER_PAYER, "SOL") == 0


def _propose(node: FormationNode, sm: SignedManifest, now: int) -> list[Action]:
    """This node leads its own view-0 proposal of itself (the only volunteer)."""
    node.on_manifest(sm, now)
    return node.on_timer(fkey(sm.job_id, "window"), now + node.config.offer_window_ms)


def test_a_submitter_holds_at_most_one_unconfirmed_lease_here() -> None:
    """A node with 2 GPUs offered for two jobs of one submitter (offers hold
    nothing) and leads both: it holds a GPU for the first, and for the
    second it declines its own proposal rather than hold a second GPU for
    the same unconfirmed submitter.  A third job of that submitter gets no
    offer at all; another submitter's job is served."""
    node = worker(gpus=2)
    first, second, third = manifest(FLOODER), manifest(FLOODER), manifest(FLOODER)
    assert offers(node.on_manifest(first, T0)) and offers(node.on_manifest(second, T0))
    window = T0 + node.config.offer_window_ms
    assert any(isinstance(a, Reserved) for a in node.on_timer(fkey(first.job_id, "window"), window))
    acts = node.on_timer(fkey(second.job_id, "window"), window)
    assert not any(isinstance(a, Reserved) for a in acts) and node.gpus_free == 1
    assert node.jobs[second.job_id].proposal is None  # it leads, but proposes nobody yet
    assert not offers(node.on_manifest(third, T0 + 1)), "no offer while the quota is used"
    assert offers(node.on_manifest(manifest(HONEST, payer=OTHER_PAYER), T0 + 2))


def test_the_quota_frees_when_the_hold_is_confirmed() -> None:
    node = worker(gpus=2)
    first, second = manifest(FLOODER), manifest(FLOODER)
    acts = _propose(node, first, T0)
    prop = next(m for a in acts if isinstance(a, Publish) for m in [decode_message(a.data)] if isinstance(m, Proposal))
    accept = next(m for a in acts if isinstance(a, Send) for m in [decode_message(a.data)] if isinstance(m, Accept))
    node.on_manifest(second, T0 + 1)
    third = manifest(FLOODER)
    node.on_manifest(third, T0 + 1)
    confirm = Confirm.sign(FLOODER, Certificate(proposal=prop, accepts=(accept,)), confirmed_at_ms=T0 + 50)
    after = node.on_message(confirm, T0 + 50)
    # It volunteers again, for one of that submitter's waiting jobs at a time.
    assert len(offers(after)) == 1 and offers(after)[0].job_id in (second.job_id, third.job_id)


def test_a_leader_that_could_not_propose_proposes_once_the_quota_frees() -> None:
    node = worker(gpus=2)
    first, second = manifest(FLOODER), manifest(FLOODER)
    node.on_manifest(first, T0)
    node.on_manifest(second, T0)
    window = T0 + node.config.offer_window_ms
    acts = node.on_timer(fkey(first.job_id, "window"), window)
    prop = next(m for a in acts if isinstance(a, Publish) for m in [decode_message(a.data)] if isinstance(m, Proposal))
    accept = next(m for a in acts if isinstance(a, Send) for m in [decode_message(a.data)] if isinstance(m, Accept))
    node.on_timer(fkey(second.job_id, "window"), window)
    confirm = Confirm.sign(FLOODER, Certificate(proposal=prop, accepts=(accept,)), confirmed_at_ms=window + 5)
    after = node.on_message(confirm, window + 5)
    assert any(isinstance(a, Reserved) and a.job_id == second.job_id for a in after)
    assert node.gpus_free == 0


# balance, open, needed, ok?
COVERS = [(100, 0, 100, True), (100, 1, 100, False), (250, 150, 100, True), (249, 150, 100, False),
          (None, 0, 1, False)]


@pytest.mark.parametrize(("balance", "open_", "needed", "ok"), COVERS)
def test_payer_covers_counts_what_is_open(balance: int | None, open_: int, needed: int, ok: bool) -> None:
    v = payer_covers(balance_lamports=balance, needed=needed, open_lamports=open_)
    assert v.ok is ok
    if not ok and balance is not None and open_:
        assert "other open jobs" in v.reason


def test_payer_checks_hold_few_manifests_and_look_each_payer_up_once() -> None:
    pc = PayerChecks(waiting_per_payer_max=2, payers_waiting_max=2)
    a, b, c = (manifest(FLOODER) for _ in range(3))
    assert pc.gate(a, T0, open_lamports=0).lookup
    v = pc.gate(b, T0, open_lamports=0)
    assert v.gate is Gate.WAIT and not v.lookup
    assert pc.gate(c, T0, open_lamports=0).gate is Gate.REFUSE  # a third manifest of that payer waits no more
    honest = manifest(HONEST, payer=OTHER_PAYER)
    assert pc.gate(honest, T0, open_lamports=0).lookup  # another payer is still looked up
    third = manifest(HONEST, payer="Vote111111111111111111111111111111111111111")
    assert pc.gate(third, T0, open_lamports=0).gate is Gate.REFUSE  # too many payers waiting
    ceiling = job_ceiling(a.manifest)
    assert pc.resolved(PAYER, "SOL", ceiling * 2, T0 + 5) == [a, b]
    assert pc.gate(a, T0 + 6, open_lamports=0).gate is Gate.ADMIT
    assert pc.gate(b, T0 + 6, open_lamports=ceiling).gate is Gate.ADMIT
    refused = pc.gate(c, T0 + 6, open_lamports=2 * ceiling)
    assert refused.gate is Gate.REFUSE and "other open jobs" in refused.reason
    assert pc.gate(c, T0 + 6 + pc.verdict_ttl_ms, open_lamports=0).lookup  # the cached balance went stale


def test_quotas_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Quotas(jobs_per_submitter_max=0)
    assert replace(Quotas(), jobs_per_payer_max=5).jobs_per_payer_max == 5
