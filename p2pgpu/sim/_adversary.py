"""Adversaries: each a small class that changes what some nodes do.

An adversary picks its nodes (``count`` or ``fraction`` of the eligible ones,
drawn from its own stream) and answers the few questions the world and the
job flow ask at decision points: does the node claim capacity it lacks, does
it accept, does it run, what result does it report, does it pay.  Adding an
adversary is one subclass and one line in ``KINDS``.  Those that need a core
that does not exist yet (leaders need the formation core) say so in
``requires`` and are reported as inactive rather than silently doing nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pgpu.core import GpuInfo

from ._scenario import AdversarySection, ScenarioError

if TYPE_CHECKING:
    from ._world import World


class Adversary:
    kind = "base"
    #: "workers" (nodes with a real identity that are not submitters) or "submitters"
    pool = "workers"
    requires = ""
    replaces_adverts = False
    claims_capacity = False
    never_accepts = False
    never_runs = False
    never_pays = False
    silent_leader = False
    #: Advertises a GPU model it does not have (hardware challenges catch it: sim/_trust.py).
    lies_about_gpu = False
    params_known: tuple[str, ...] = ()

    def __init__(self, world: World, cfg: AdversarySection) -> None:
        self.world = world
        self.cfg = cfg
        for key in cfg.params:
            if key not in self.params_known:
                raise ScenarioError(f"adversary {self.kind}: unknown param {key!r} (known: {self.params_known})")
        self.rng = world.engine.stream(f"adversary/{self.kind}")
        self.nodes: list[int] = []
        self.active = not self.requires

    def pick(self, taken: dict[int, bool]) -> None:
        w = self.world
        if self.pool == "submitters":
            pool = [i for i in w.jobs.submitters if i not in taken]
        else:
            pool = [i for i in range(w.n) if w.nodes[i].real and not w.nodes[i].submitter
                    and i not in taken]
        k = self.cfg.count or round(self.cfg.fraction * len(pool))
        self.nodes = sorted(self.rng.sample(pool, min(k, len(pool))))
        for i in self.nodes:
            taken[i] = True
            w.nodes[i].adversary = self

    # -- hooks (honest defaults) ----------------------------------------------------------------
    def on_up(self, node: int) -> None:
        """Called when one of its nodes joins or rejoins."""

    def advertise(self, node: int) -> None:
        """Only for ``replaces_adverts``: publish instead of the honest advert."""

    def proof_claim(self, claim: dict[str, Any], duration_ms_max: int) -> dict[str, Any]:
        """What goes into the proof it signs (``started_at_ms``, ``ended_at_ms``,
        ``gpu_ms``, ``output_digest``); honest by default."""
        return claim

    def real_gpus(self, claimed: int) -> int:
        """GPUs the node really has (the checker's ground truth)."""
        return claimed

    def real_gpu_model(self, advertised: str) -> str:
        """The device it really computes a hardware challenge on (ground truth)."""
        return advertised


class FakeCapability(Adversary):
    """Advertises eight H100s it does not have, volunteers, and cannot run."""

    kind = "fake_capability"
    replaces_adverts = True
    claims_capacity = True
    never_runs = True
    lies_about_gpu = True
    params_known = ("gpus",)
    _gpu = GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_capability="9.0")

    def advertise(self, node: int) -> None:
        w = self.world
        gpus = (self._gpu,) * int(self.cfg.params.get("gpus", 8))
        w.publish_advert(node, w.make_advert(node, gpus=gpus, gpus_free=len(gpus)))

    def real_gpus(self, claimed: int) -> int:
        return 0

    def real_gpu_model(self, advertised: str) -> str:
        return "cpu"


class GpuLiar(Adversary):
    """Advertises its GPUs as a better model (``model``, an H100 by default)
    than the device it really has (``real_model``: a CPU by default), and runs
    the jobs it wins.  Submitters' hardware challenges (``jobs.challenge_every_s``)
    time its answer against the claimed model's deadline and refuse the claim;
    their matching then no longer sees its GPUs."""

    kind = "gpu_liar"
    replaces_adverts = True
    lies_about_gpu = True
    params_known = ("model", "real_model")

    def advertise(self, node: int) -> None:
        w = self.world
        sn = w.nodes[node]
        fake = GpuInfo(model=str(self.cfg.params.get("model", "NVIDIA H100 80GB HBM3")), memory_mb=81559,
                       compute_capability="9.0")
        w.publish_advert(node, w.make_advert(node, gpus=(fake,) * len(sn.gpus)))

    def real_gpu_model(self, advertised: str) -> str:
        return str(self.cfg.params.get("real_model", "cpu"))


class AdvertSpam(Adversary):
    """Publishes adverts far faster than the refresh interval: valid ones (a new
    seq each time, which the book accepts: there is no per-peer rate limit) or,
    with ``valid = false``, adverts with a broken signature."""

    kind = "advert_spam"
    params_known = ("rate_per_s", "valid")

    def on_up(self, node: int) -> None:
        self.world.engine.after(self._gap(), self._spam, (node, self.world.net.epoch[node]))

    def _gap(self) -> int:
        return int(self.rng.expovariate(float(self.cfg.params.get("rate_per_s", 10.0))) * 1_000_000) + 1

    def _spam(self, arg: tuple[int, int]) -> None:
        node, epoch = arg
        w = self.world
        if not w.net.up[node] or w.net.epoch[node] != epoch or w.engine.now_us >= w.quiet_us:
            return
        if bool(self.cfg.params.get("valid", True)):
            w.publish_advert(node)
        else:
            adv = w.make_advert(node)
            from p2pgpu.core import sign_advert
            ident = w.nodes[node].identity
            assert ident is not None
            wire = bytearray(sign_advert(ident, adv).wire)
            wire[-5] ^= 0xFF  # inside the signature: still decodes, no longer verifies
            w.gossip.publish(node, "/p2pgpu/adverts/1", len(wire), bytes(wire), adv)
        w.engine.after(self._gap(), self._spam, arg)


class NeverAccept(Adversary):
    """Volunteers for every job it matches, then never answers a proposal."""

    kind = "never_accept"
    never_accepts = True


class InflateGpuSeconds(Adversary):
    """Runs the job, then signs a proof claiming ``factor`` times the work:
    ``mode = "gpu_time"`` inflates GPU-milliseconds over the same span (the
    proof core refuses it: OVER_GPU_TIME); ``mode = "duration"`` moves its
    start earlier, up to the manifest's limit, with matching GPU time (the
    submitter's own window refuses it, OVER_WINDOW, and so do the other
    members' co-signatures, OVER_OBSERVED)."""

    kind = "inflate_gpu_seconds"
    params_known = ("factor", "mode")

    def proof_claim(self, claim: dict[str, Any], duration_ms_max: int) -> dict[str, Any]:
        factor = float(self.cfg.params.get("factor", 10.0))
        out = dict(claim)
        span = claim["ended_at_ms"] - claim["started_at_ms"]
        if self.cfg.params.get("mode", "gpu_time") == "duration":
            longer = min(duration_ms_max, int(span * factor))
            gpus = claim["gpu_ms"] // span if span else 1
            out["started_at_ms"] = max(0, claim["ended_at_ms"] - longer)
            out["gpu_ms"] = gpus * (claim["ended_at_ms"] - out["started_at_ms"])
        else:
            out["gpu_ms"] = int(claim["gpu_ms"] * factor) + 1
        return out


class WrongOutput(Adversary):
    """Runs the job (or pretends to) and returns a wrong output digest."""

    kind = "wrong_output"

    def proof_claim(self, claim: dict[str, Any], duration_ms_max: int) -> dict[str, Any]:
        return {**claim, "output_digest": self.rng.randbytes(32)}


class ReceiptForger(Adversary):
    """Signs receipts (as sybil submitters) that say it was paid: citing a
    payment the ledger never saw, or someone else's real payment, and
    tampers with a genuine receipt's bytes (sim/_receipts.py).  Reputation
    refuses them and its score does not move."""

    kind = "receipt_forger"


class NeverPay(Adversary):
    """A submitter that takes the work and never pays for it."""

    kind = "never_pay"
    pool = "submitters"
    never_pays = True


class SilentLeader(Adversary):
    """Volunteers, and when it leads it never sends a proposal or a certificate
    (the next in rank must take over in a higher view)."""

    kind = "silent_leader"
    silent_leader = True


class LyingLeader(Adversary):
    """A leader that certifies members who never accepted.  It cannot sign
    their accepts, so its certificate cannot even be decoded; the formation
    core's table tests cover the forged, missing and foreign accepts.  Kept
    as a placeholder until the simulator can inject a forged envelope."""

    kind = "lying_leader"
    requires = "forged accept envelopes (covered by tests/core/test_formation.py)"


KINDS: dict[str, type[Adversary]] = {c.kind: c for c in (
    FakeCapability, GpuLiar, ReceiptForger, AdvertSpam, NeverAccept, InflateGpuSeconds, WrongOutput, NeverPay, SilentLeader, LyingLeader,
)}


def make_adversaries(world: World, sections: tuple[AdversarySection, ...]) -> list[Adversary]:
    out: list[Adversary] = []
    taken: dict[int, bool] = {}
    for i, sec in enumerate(sections):
        cls = KINDS.get(sec.kind)
        if cls is None:
            raise ScenarioError(f"adversary[{i}].kind: unknown {sec.kind!r} (known: {', '.join(KINDS)})")
        adv = cls(world, sec)
        if adv.active:
            adv.pick(taken)
        out.append(adv)
    return out


def inactive(advs: list[Adversary]) -> list[dict[str, Any]]:
    return [{"kind": a.kind, "requires": a.requires} for a in advs if not a.active]
