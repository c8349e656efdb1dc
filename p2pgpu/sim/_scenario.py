"""Scenario files: what a researcher writes, checked before anything runs.

A scenario is a TOML file of sections (``[run]``, ``[network]``,
``[gossipsub]``, ``[kademlia]``, ``[adverts]``, ``[churn]``, ``[jobs]``,
``[[partition]]``, ``[[adversary]]``); each section is a frozen dataclass
below with a default for every field, so a file only says what differs.
Unknown keys and wrong types are refused with the section and key named (a
typo must not silently run the default), and every size has a limit.
``simulations/README.md`` documents each key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

nodes_max = 2_000_000
duration_s_max = 30 * 24 * 3600


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the key."""


@dataclass(frozen=True, kw_only=True)
class RunSection:
    name: str = "unnamed"
    nodes: int = 100
    duration_s: float = 60.0
    #: Quiet time at the end with no new publishes/jobs, so the network settles
    #: before the settlement invariants are checked.
    settle_s: float = 10.0
    progress_every_s: float = 10.0
    network_name: str = "sim"
    #: The wall-clock time (Unix ms) at simulated time 0: node clocks read
    #: this plus the simulated time plus their skew, so a node skewed back
    #: still signs times after 1970 (clocks once started at 0, and a node with
    #: negative skew signed a negative ``issued_at_ms`` every peer refused).
    #: Default: 2026-01-01T00:00:00Z.
    start_epoch_ms: int = 1_767_225_600_000


@dataclass(frozen=True, kw_only=True)
class NetworkSection:
    #: "regions": RTT from the shipped region matrix; "uniform": every link link_ms.
    latency: str = "regions"
    link_ms: float = 25.0
    jitter_pct: float = 10.0
    loss_pct: float = 0.0
    duplicate_pct: float = 0.0
    #: share of messages held back by an extra 0..reorder_ms (overtaken by later ones)
    reorder_pct: float = 0.0
    reorder_ms: float = 50.0
    bandwidth_mbps: float = 100.0
    intra_region_rtt_ms: float = 2.0
    #: region -> weight; empty means the shipped default shares
    regions: dict[str, int] = field(default_factory=dict)
    #: extra RTT table "a|b" -> ms overriding the shipped one
    rtt_ms: dict[str, float] = field(default_factory=dict)
    #: connections each node opens at join (the rest arrive from others)
    peers_target: int = 16
    peers_max: int = 64
    #: time until a peer notices a dead or cut connection (ping timeout)
    detect_ms: float = 5000.0
    #: how often a node runs discovery: below peers_target it dials until it
    #: has enough; otherwise it dials one random node (the DHT random walk) and,
    #: above peers_high, closes one non-mesh connection (the connection manager)
    discovery_s: float = 10.0
    #: connection manager high watermark; 0 means peers_target + 8
    peers_high: int = 0
    #: NAT (``_nat.py``): share of nodes behind NATs, share of those behind
    #: symmetric ones (hole punching fails), the chance a punch between two
    #: port-keeping NATs works, circuits a public node relays, relay slots
    #: each private node holds
    nat_pct: float = 0.0
    nat_symmetric_pct: float = 30.0
    punch_success_pct: float = 70.0
    relay_circuits_max: int = 64
    relays_per_private: int = 2


@dataclass(frozen=True, kw_only=True)
class GossipSection:
    """Defaults: the node's GossipSub (``node/_stack.py``'s ``StackConfig`` and
    py-libp2p 0.8.1's own defaults for what it does not set); a test keeps
    them equal (``tests/sim/test_defaults.py``).  The node publishes to its
    mesh only (py-libp2p has no flood publishing)."""

    D: int = 6
    D_lo: int = 4
    D_hi: int = 12
    D_lazy: int = 6
    heartbeat_ms: float = 1000.0
    history_length: int = 5
    history_gossip: int = 3
    flood_publish: bool = False
    seen_ttl_s: float = 120.0
    #: message ids per IHAVE at most
    ihave_ids_max: int = 5000
    #: a peer whose score falls below this is pruned and ignored (graylist)
    graylist_score: float = -10.0
    invalid_message_penalty: float = 1.0
    control_bytes: int = 64
    #: CPU a node spends validating and handling one new message before it is
    #: delivered and forwarded (one queue per node); 0 = instant.  Calibrate it
    #: against the real node (docs/calibration.md): ~1.9 ms upstream py-libp2p,
    #: ~0.3 ms with the node's patches.
    processing_ms: float = 0.0
    #: 0: every node has its own CPU; k > 0: all nodes share k cores (several
    #: node processes on one machine, as in a loopback calibration run)
    shared_cores: int = 0


@dataclass(frozen=True, kw_only=True)
class KademliaSection:
    enabled: bool = True
    k: int = 20
    alpha: int = 3
    id_bits: int = 64
    lookups_per_s: float = 1.0
    rpc_timeout_ms: float = 1000.0
    message_bytes: int = 300


@dataclass(frozen=True, kw_only=True)
class AdvertSection:
    #: false: nodes publish no adverts (a pure DHT or job study)
    publish: bool = True
    refresh_s: float = 300.0
    ttl_s: float = 600.0
    #: the nodes present at the start publish their first advert within this
    #: many seconds (0: spread over the whole refresh_s, a network in steady state)
    initial_spread_s: float = 10.0
    #: nodes that keep a real AdvertBook besides submitters ("all" = every node)
    observers: int = 5
    books: str = "observers"
    #: "cached": real Ed25519 verify once per unique signature, memoised after
    #: (a pure function, so no decision changes); "every": verify every time.
    verify: str = "cached"
    #: share of nodes whose adverts are really signed and carried as bytes;
    #: the others gossip a modelled message of the same size.
    real_fraction: float = 1.0
    gpu_catalog: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ChurnSection:
    #: share of nodes that come and go (the others stay up)
    fraction: float = 0.0
    #: "exponential", "weibull" or "pareto" session lengths
    session: str = "exponential"
    session_mean_s: float = 600.0
    weibull_shape: float = 0.6
    pareto_alpha: float = 2.0
    downtime_mean_s: float = 60.0
    #: share of departures that lose their state (disk gone); others restart with it
    state_loss_pct: float = 50.0
    #: share of departures that are crashes (peers notice after detect_ms) vs clean leaves
    crash_pct: float = 50.0
    #: each node's clock is off by a uniform draw in +-clock_skew_ms
    clock_skew_ms: float = 0.0


@dataclass(frozen=True, kw_only=True)
class JobSection:
    """Defaults: the node's formation and membership settings
    (``node/_jobs.py``'s ``NODE_FORMATION``, ``core/_member.py``'s
    ``DEFAULT_MEMBER``); a test keeps them equal."""

    submitters: int = 0
    rate_per_s: float = 0.0
    duration_s: float = 20.0
    nodes_choices: list[int] = field(default_factory=lambda: [1])
    gpus_per_node_choices: list[int] = field(default_factory=lambda: [1])
    #: replicas per job (the same work on k members, majority quorum)
    replicas_choices: list[int] = field(default_factory=lambda: [1])
    price_max: int = 2_000_000
    #: What the members do when one of them is lost ("fail" or "continue").
    on_member_loss: str = "fail"
    #: FormationConfig, as the node sets it
    offer_window_ms: int = 200
    leader_timeout_ms: int = 1500
    member_timeout_ms: int = 600
    lease_ms: int = 10_000
    formation_timeout_ms: int = 60_000
    #: Formation messages on one shared jobs topic (the node's choice), or on
    #: a topic per job.
    per_job_topics: bool = False
    #: Membership while a job runs: heartbeats between members, and silence
    #: after which a member is lost.
    heartbeat_interval_ms: int = 500
    member_loss_timeout_ms: int = 3_000
    #: Hand the cores candidate lists as the node does (the matching adverts
    #: with free GPUs, here from the network-wide set of current adverts): a
    #: job draws members + spare_volunteers offers, the rest volunteer late.
    candidates: bool = True
    spare_volunteers: int = 2
    late_volunteer_ms: int = 600
    #: Pay as you go (``payment.interval_s`` of every job; 0: at the end only)
    #: and the workers' grace before they stop an unpaid job (the node's
    #: ``InstallmentConfig.grace_ms``).
    interval_s: int = 0
    payment_grace_s: int = 30
    #: Submitters challenge the GPU claims of live adverts this often (seconds;
    #: 0: never): hardware challenges, ``sim/_trust.py``.
    challenge_every_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PartitionSection:
    at_s: float
    heal_s: float
    #: "regions:a,b" puts those regions on one side; "fraction:0.5" cuts a seeded half
    split: str = "fraction:0.5"


@dataclass(frozen=True, kw_only=True)
class AdversarySection:
    kind: str
    fraction: float = 0.0
    count: int = 0
    #: kind-specific knobs (e.g. spam rate), checked by the adversary class
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    run: RunSection = RunSection()
    network: NetworkSection = NetworkSection()
    gossipsub: GossipSection = GossipSection()
    kademlia: KademliaSection = KademliaSection()
    adverts: AdvertSection = AdvertSection()
    churn: ChurnSection = ChurnSection()
    jobs: JobSection = JobSection()
    partition: tuple[PartitionSection, ...] = ()
    adversary: tuple[AdversarySection, ...] = ()
    source: str = ""

    def check(self) -> Scenario:
        r, n, g = self.run, self.network, self.gossipsub
        _need(1 <= r.nodes <= nodes_max, "run.nodes", f"must be 1..{nodes_max}")
        _need(0 < r.duration_s <= duration_s_max, "run.duration_s", "out of range")
        _need(0 <= r.settle_s < r.duration_s, "run.settle_s", "must be below duration_s")
        _need(n.latency in ("regions", "uniform"), "network.latency", "is 'regions' or 'uniform'")
        for k in ("loss_pct", "duplicate_pct", "reorder_pct", "jitter_pct"):
            _need(0 <= getattr(n, k) <= 100, f"network.{k}", "is a percentage")
        _need(n.bandwidth_mbps > 0 and n.link_ms >= 0, "network", "bandwidth and link_ms must be positive")
        _need(1 <= n.peers_target <= n.peers_max <= 1000, "network.peers_target", "1 <= target <= max <= 1000")
        for k in ("nat_pct", "nat_symmetric_pct", "punch_success_pct"):
            _need(0 <= getattr(n, k) <= 100, f"network.{k}", "is a percentage")
        _need(0 <= n.relay_circuits_max <= 100_000, "network.relay_circuits_max", "0..100000")
        _need(1 <= n.relays_per_private <= 8, "network.relays_per_private", "1..8")
        _need(1 <= g.D_lo <= g.D <= g.D_hi <= 100, "gossipsub.D", "needs 1 <= D_lo <= D <= D_hi <= 100")
        _need(g.heartbeat_ms >= 10 and 1 <= g.history_gossip <= g.history_length <= 100,
              "gossipsub", "heartbeat_ms >= 10 and history_gossip <= history_length")
        _need(1 <= self.kademlia.k <= 64 and 1 <= self.kademlia.alpha <= 16, "kademlia", "k 1..64, alpha 1..16")
        _need(16 <= self.kademlia.id_bits <= 256, "kademlia.id_bits", "16..256")
        a = self.adverts
        _need(a.books in ("observers", "all"), "adverts.books", "is 'observers' or 'all'")
        _need(a.verify in ("cached", "every"), "adverts.verify", "is 'cached' or 'every'")
        # refresh_s >= ttl_s is allowed (adverts then lapse between refreshes):
        # benchmarks use it to hold the network-wide advert rate fixed.
        _need(0 < a.refresh_s and 0 < a.ttl_s <= 3600, "adverts", "needs refresh_s > 0 and 0 < ttl_s <= 3600")
        _need(0 <= a.real_fraction <= 1, "adverts.real_fraction", "0..1")
        c = self.churn
        _need(0 <= c.fraction <= 1, "churn.fraction", "0..1")
        _need(c.session in ("exponential", "weibull", "pareto"), "churn.session", "exponential|weibull|pareto")
        _need(c.session_mean_s > 0 and c.downtime_mean_s > 0, "churn", "means must be positive")
        _need(c.pareto_alpha > 1 and c.weibull_shape > 0, "churn", "pareto_alpha > 1, weibull_shape > 0")
        j = self.jobs
        _need(0 <= j.submitters <= min(r.nodes, 10_000), "jobs.submitters", "0..nodes")
        _need(j.rate_per_s >= 0 and j.duration_s > 0, "jobs", "rate >= 0, duration > 0")
        _need(bool(j.nodes_choices) and all(1 <= x <= 64 for x in j.nodes_choices), "jobs.nodes_choices", "1..64")
        _need(bool(j.gpus_per_node_choices) and all(1 <= x <= 16 for x in j.gpus_per_node_choices),
              "jobs.gpus_per_node_choices", "1..16")
        _need(bool(j.replicas_choices) and all(1 <= x <= 8 for x in j.replicas_choices),
              "jobs.replicas_choices", "1..8")
        _need(j.on_member_loss in ("fail", "continue"), "jobs.on_member_loss", "is 'fail' or 'continue'")
        _need(j.interval_s == 0 or 10 <= j.interval_s <= 86_400, "jobs.interval_s",
              "0 (pay at the end) or 10..86400 seconds")
        _need(1 <= j.payment_grace_s <= 86_400, "jobs.payment_grace_s", "1..86400 seconds")
        _need(j.challenge_every_s == 0 or 1 <= j.challenge_every_s <= 3600, "jobs.challenge_every_s",
              "0 (no challenges) or 1..3600 seconds")
        _need(0 < j.heartbeat_interval_ms < j.member_loss_timeout_ms <= 600_000, "jobs.heartbeat_interval_ms",
              "needs 0 < heartbeat_interval_ms < member_loss_timeout_ms <= 600000")
        _need(0 <= r.start_epoch_ms <= 2**52, "run.start_epoch_ms", "a Unix time in ms")
        _need(len(self.partition) <= 100 and len(self.adversary) <= 100, "scenario", "at most 100 entries")
        for i, p in enumerate(self.partition):
            _need(0 <= p.at_s < p.heal_s, f"partition[{i}]", "needs at_s < heal_s")
            _need(p.split.startswith(("regions:", "fraction:")), f"partition[{i}].split", "regions:... or fraction:x")
        for i, adv in enumerate(self.adversary):
            _need(0 <= adv.fraction <= 1 and 0 <= adv.count <= r.nodes, f"adversary[{i}]", "fraction 0..1, count 0..nodes")
        return self


def _need(ok: bool, where: str, why: str) -> None:
    if not ok:
        raise ScenarioError(f"{where}: {why}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"{where}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}: expected an integer")
        return value
    if tp in (str, bool):
        if type(value) is not tp:
            raise ScenarioError(f"{where}: expected {tp.__name__}")
        return value
    if origin is list:
        if not isinstance(value, list) or len(value) > 10_000:
            raise ScenarioError(f"{where}: expected a list")
        (inner,) = typing.get_args(tp)
        return [value[i] if inner is Any else _coerce(value[i], inner, f"{where}[{i}]") for i in range(len(value))]
    if origin is dict:
        if not isinstance(value, dict):
            raise ScenarioError(f"{where}: expected a table")
        _, inner = typing.get_args(tp)
        return {k: v if inner is Any else _coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    raise ScenarioError(f"{where}: unsupported type {tp}")  # pragma: no cover - our own table


def _section(cls: type, obj: Any, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ScenarioError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in obj:
        if key not in names:
            raise ScenarioError(f"{where}.{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in obj.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


_SECTIONS: dict[str, type] = {
    "run": RunSection, "network": NetworkSection, "gossipsub": GossipSection, "kademlia": KademliaSection,
    "adverts": AdvertSection, "churn": ChurnSection, "jobs": JobSection,
}
_LISTS: dict[str, type] = {"partition": PartitionSection, "adversary": AdversarySection}


def scenario_from_obj(obj: dict[str, Any], source: str = "") -> Scenario:
    kwargs: dict[str, Any] = {"source": source}
    for key, value in obj.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value, key)
        elif key in _LISTS:
            if not isinstance(value, list):
                raise ScenarioError(f"{key}: use [[{key}]] tables")
            kwargs[key] = tuple(_section(_LISTS[key], v, f"{key}[{i}]") for i, v in enumerate(value))
        else:
            raise ScenarioError(f"{key}: unknown section (known: {', '.join([*_SECTIONS, *_LISTS])})")
    return Scenario(**kwargs).check()


def load_scenario(path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read and check a scenario file; ``overrides`` maps "section.key" to a value."""
    p = Path(path)
    try:
        obj = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        obj.setdefault(section, {})[key] = value
    return scenario_from_obj(obj, str(p))


def describe(s: Scenario) -> dict[str, Any]:
    """The scenario as plain data (written next to the metrics)."""
    out = dataclasses.asdict(s)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

