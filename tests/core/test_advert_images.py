"""Cached OCI images in the advert, and matching that prefers warm nodes.

The advert's ``images`` (manifest digests a node has unpacked) is bounded
(``images_max``), strict (64 lowercase hex, sorted, distinct), absent on the
wire when empty (older peers refuse unknown keys), and the largest advert
still fits its 8 KiB limit.  A leader chooses members among eligible
volunteers warm-first (rank order otherwise); a warm node that is not
eligible is never chosen for being warm, and a cold one is chosen when there
are not enough warm ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
from random import Random

import pytest
from swarm import Swarm, make_manifest

from p2pgpu.core import Identity, PeerMisbehaved, Reason
from p2pgpu.core._advert import (
    Advert,
    GpuInfo,
    addr_len_max,
    addrs_max,
    gpus_max,
    images_max,
    sign_advert,
    verify_advert,
)
from p2pgpu.core._envelope import Kind
from p2pgpu.core._formation import FormationConfig, FormationNode
from p2pgpu.core._manifest import sign_manifest
from p2pgpu.core._matching import image_digest, is_warm, warm_first

PAYER = "11111111111111111111111111111111"


def digest(i: int) -> str:
    return hashlib.sha256(b"image-%d" % i).hexdigest()


def ref(i: int) -> str:
    return f"registry.example/img@sha256:{digest(i)}"


def advert(identity: Identity, **over: object) -> Advert:
    base: dict[str, object] = {
        "peer_id": identity.peer_id, "network": "local", "addrs": (), "seq": 1, "issued_at_ms": 0,
        "expires_at_ms": 3_600_000, "gpus": (GpuInfo(model="NVIDIA L4", memory_mb=23034, compute_capability="8.9"),),
        "gpus_free": 1, "price_per_gpu_hour": 1000, "currency": "SOL", "payout_address": PAYER, "region": "local",
        "runtimes": ("process", "oci"), "simulated": True}
    base.update(over)
    return Advert(**base)  # type: ignore[arg-type]


def test_images_round_trip_and_are_absent_when_empty() -> None:
    ident = Identity.from_rng(Random(1))
    warm = sign_advert(ident, advert(ident, images=tuple(sorted(digest(i) for i in range(3)))))
    back = verify_advert(warm.wire, now_ms=1)
    assert back.advert.images == tuple(sorted(digest(i) for i in range(3)))
    cold = sign_advert(ident, advert(ident))
    assert "images" not in cold.advert.to_obj()  # what an older peer accepts
    assert verify_advert(cold.wire, now_ms=1).advert.images == ()


@pytest.mark.parametrize("images, why", [
    (tuple(sorted(digest(i) for i in range(images_max + 1))), "at most"),
    (tuple(sorted((digest(1), digest(2)), reverse=True)), "sorted"),
    ((digest(1), digest(1)), "distinct"),
    (("A" * 64,), "hex"),
    (("ab" * 31,), "hex"),
    (("0" * 63 + "X",), "hex"),  # any character outside 0-9a-f
])
def test_bad_image_lists_are_refused_when_built(images: tuple[str, ...], why: str) -> None:
    ident = Identity.from_rng(Random(2))
    with pytest.raises(ValueError, match=why):
        advert(ident, images=images)


@pytest.mark.parametrize("images", [
    [digest(i) for i in range(images_max + 1)],   # too many
    ["g" * 64],                                   # not hex
    [digest(1), digest(1)],                       # duplicate
    [digest(1) + "00"],                           # too long
    "not-a-list",
])
def test_a_peer_advert_with_a_bad_image_list_is_refused(images: object) -> None:
    ident = Identity.from_rng(Random(3))
    body = advert(ident).to_obj() | {"images": sorted(images) if isinstance(images, list) else images}
    with pytest.raises(PeerMisbehaved) as err:
        Advert.from_obj(body)
    assert err.value.reason is Reason.BAD_SCHEMA


def test_the_largest_advert_fits_its_limit() -> None:
    ident = Identity.from_rng(Random(4))
    gpu = GpuInfo(model="M" * 64, memory_mb=1 << 22, compute_capability="12.9", driver_version="d" * 32,
                  cuda_version="c" * 16, uuid_hash="u" * 64, utilization_pct=100)
    # The longest address an advert may carry: a DNS name (core/_reach.py
    # checks that each address is a dialable TCP multiaddr naming its owner).
    tail = f"/tcp/65535/p2p/{ident.peer_id}"
    longest = "/dns4/" + "h" * (addr_len_max - len("/dns4/") - len(tail)) + tail
    assert len(longest) == addr_len_max
    big = advert(ident, network="n" * 32, addrs=(longest,) * addrs_max,
                 seq=2**62, issued_at_ms=2**50, expires_at_ms=2**50 + 3_600_000, gpus=(gpu,) * gpus_max,
                 gpus_free=gpus_max, price_per_gpu_hour=2**62, region="r" * 32, currency="c" * 64,
                 runtimes=("process", "ray", "oci"), images=tuple(sorted(digest(i) for i in range(images_max))))
    wire = sign_advert(ident, big).wire
    assert len(wire) <= Kind.ADVERT.bytes_max, len(wire)
    assert verify_advert(wire, now_ms=2**50 + 1).advert == big


def test_warm_first_is_a_stable_tie_breaker() -> None:
    ids = [Identity.from_rng(Random(10 + i)) for i in range(5)]
    book = {i.peer_id: advert(i, images=(digest(7),) if n in (1, 3) else ()) for n, i in enumerate(ids)}
    order = [i.peer_id for i in ids]
    assert warm_first(order, book, ref(7)) == [order[1], order[3], order[0], order[2], order[4]]
    assert warm_first(order, book, ref(8)) == order           # nobody has it: rank order
    assert warm_first(order, book, "") == order               # not an image job
    assert warm_first(order, {}, ref(7)) == order             # no adverts known
    assert image_digest(ref(7)) == digest(7) and image_digest("busybox:latest") == ""
    assert is_warm(book[order[1]], ref(7)) and not is_warm(None, ref(7))


def _oci_swarm(seed: int, warm: set[int], eligible_warm: bool = True) -> tuple[Swarm, list[str]]:
    """Eight one-GPU workers that run ``oci``; those in ``warm`` have image 7
    cached (and, unless ``eligible_warm``, ask more than the job pays)."""
    # Every candidate volunteers at once (spare_volunteers) and the leader
    # waits long enough to hear them all (messages take 1-20 ms here), so the
    # choice among them is what is tested.
    sw = Swarm(seed, workers=8, submitters=1, gpus=(1,),
               config=FormationConfig(spare_volunteers=8, offer_window_ms=200))
    for n, pid in enumerate(sw.workers):
        over: dict[str, object] = {"runtimes": ("process", "oci")}
        if n in warm:
            over["images"] = (digest(7),)
            if not eligible_warm:
                over["price_per_gpu_hour"] = 10_000_000  # over the job's ceiling: not eligible
        new = dataclasses.replace(sw.book[pid], **over)
        sw.book[pid] = new
        node = sw.peers[pid].node
        assert node is not None
        node.update_advert(new, 0)
    return sw, [sw.workers[n] for n in sorted(warm)]


def _submit_oci(sw: Swarm, nodes: int) -> str:
    sub = sw.submitter_ids[0]
    base = make_manifest(sw.peers[sub].identity, sw.rng, now_ms=1, nodes=nodes).manifest
    sm = sign_manifest(sw.peers[sub].identity, dataclasses.replace(base, runtime="oci", image=ref(7)))
    sw.manifests[sm.job_id] = sm
    sw.submitted_at[sm.job_id] = 1
    sw._push(1, "submit", (sub, sm))
    return sm.job_id


def _record_choices(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], set[str], list[str]]]:
    """Observe every leader's choice: (leader, volunteers it heard in rank
    order, the warm ones among them, the members it chose)."""
    calls: list[tuple[str, list[str], set[str], list[str]]] = []
    original = FormationNode._choose_members

    def choose(self: FormationNode, job: object, now_ms: int) -> list[str]:
        chosen = original(self, job, now_ms)
        heard = self._ranked(job)  # type: ignore[arg-type]
        adverts = job.adverts  # type: ignore[attr-defined]
        warm = {p for p in heard if adverts.get(p) is not None and digest(7) in adverts[p].images}
        calls.append((self.peer_id, heard, warm, chosen))
        return chosen

    monkeypatch.setattr(FormationNode, "_choose_members", choose)
    return calls


def test_the_leader_chooses_warm_volunteers_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_choices(monkeypatch)
    for seed in range(12):
        start = len(calls)
        sw, warm = _oci_swarm(seed, {2, 5, 6})
        job = _submit_oci(sw, nodes=3)
        sw.run(until_ms=60_000)
        assert job in sw.confirmed
        for leader, _heard, heard_warm, chosen in calls[start:]:
            others = [p for p in chosen if p != leader]
            # The leader itself comes first (when it can serve); then every
            # warm volunteer it heard, before any cold one.
            want = min(len(heard_warm - {leader}), len(others))
            assert set(others[:want]) <= heard_warm, (seed, others, heard_warm)
            assert heard_warm <= set(warm)
        assert len(calls) > start
    # Warm volunteers were heard and chosen (the check above is not vacuous).
    assert sum(1 for c in calls if set(c[3]) & (c[2] - {c[0]})) >= 3


@pytest.mark.parametrize("seed", range(4))
def test_cold_volunteers_fill_in_when_too_few_are_warm(seed: int) -> None:
    sw, _warm = _oci_swarm(seed, {4})
    job = _submit_oci(sw, nodes=4)
    sw.run(until_ms=60_000)
    # (The warm one is among them only if the leader heard it in time.)
    assert len(sw.confirmed[job].members) == 4


@pytest.mark.parametrize("seed", range(4))
def test_a_warm_but_ineligible_node_is_never_chosen(seed: int) -> None:
    sw, warm = _oci_swarm(seed, {1, 3}, eligible_warm=False)
    job = _submit_oci(sw, nodes=3)
    sw.run(until_ms=60_000)
    assert not set(sw.confirmed[job].members) & set(warm)

