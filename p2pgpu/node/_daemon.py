"""The node daemon: adverts over GossipSub and the DHT, the market, control.

The daemon is a driver: the advert book (``p2pgpu.core.AdvertBook``) decides
what is valid and what is kept; this module carries bytes between it and
libp2p, runs the timers, and answers the control API.  Every task lives in
the one nursery that :meth:`Node.run` owns; cancelling it (SIGINT/SIGTERM in
``node run``) stops everything and removes ``control.json``.

Loops, each small and bounded:
- advert: sign and publish our advert, again at half its lifetime or when our
  free capacity changes;
- dht: store our advert under its key and announce us as a provider of our
  GPU classes, after each new advert;
- connect: keep up to ``peers_target`` peers, dialing addresses learnt from
  adverts, retrying the bootstrap list while we have no peer, and syncing the
  market from each new peer (``/p2pgpu/market/1.0.0``) so a newcomer sees
  every advert at once instead of waiting for the next refresh;
- expire: drop expired adverts; ping: measure peer latency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from p2pgpu.core import (
    Advert,
    AdvertBook,
    ConnectionLimits,
    GossipVerdict,
    Identity,
    PeerMisbehaved,
    Reason,
    SignedAdvert,
    advert_key,
    class_key,
    decode,
    encode,
    next_seq,
    sign_advert,
    verdict_for,
    verify_advert,
)
from p2pgpu.core._challenge import n_max as n_max_challenge
from p2pgpu.core._reputation import job_value_max
from p2pgpu.gpu import Inventory
from p2pgpu.home import Config, Home, HomeError, NetworkSpec, config_changes
from p2pgpu.wallet import Wallet

from ._bitswap import BITSWAP_PROTOCOLS, BitswapService
from ._blobs import BLOBS_PROTOCOL, BlobService, blob_handlers
from ._challenge import CHALLENGE_PROTOCOL, ChallengeService, challenge_handlers, serve_timeout_s
from ._connmgr import ConnectionManager
from ._reach import ReachService
from ._reach_node import attach as attach_reach
from ._reach_node import peer_connections, reach_config
from ._control import ControlError, ControlServer
from ._images import advertised_images
from ._inputs import input_pins_loop
from ._job_api import inclusion_doc, job_handlers
from ._jobs import DIRECT_PROTOCOL, JOBS_TOPIC, JobsService
from ._receipts import RECEIPTS_TOPIC, P2pgpuRecordValidator, ReceiptRecordValidator, ReceiptService
from ._linkdelay import link_delay_from_config
from ._market import market_row
from ._results import RESULTS_PROTOCOL, serve_results
from ._stack import Stack, StackConfig, library_handler_errors, open_stack
from ._streams import StreamGone, guarded, read_frame, request, write_frame
from ._supervise import supervise

log = logging.getLogger("p2pgpu.node")

ADVERTS_TOPIC = "/p2pgpu/adverts/1"
PING_PROTOCOL = TProtocol("/ipfs/ping/1.0.0")
MARKET_PROTOCOL = "/p2pgpu/market/1.0.0"
#: Every stream protocol and topic the node serves (the garbage test walks them).
STREAM_PROTOCOLS: list[str] = [MARKET_PROTOCOL, DIRECT_PROTOCOL, RESULTS_PROTOCOL, CHALLENGE_PROTOCOL,
                               BLOBS_PROTOCOL, *BITSWAP_PROTOCOLS]
TOPICS: list[str] = [ADVERTS_TOPIC, JOBS_TOPIC, RECEIPTS_TOPIC]
market_request_bytes_max = 1024
#: Paid notices remembered (against telling one twice in a loop of the payer).
paid_notices_remembered_max = 20_000
advert_republish_s_min = 1.0
market_sync_adverts_max = 2000
#: How often the advert book is told which peers the node works with.
protect_interval_s = 5.0
#: Limits an operator may set in config.toml (docs/operating.md): name ->
#: (default, lowest, highest).  A forwarder's share of 0 means a quarter of
#: the book.
BOOK_LIMITS: dict[str, tuple[int, int, int]] = {"adverts_max": (10_000, 16, 1_000_000),
                                                "adverts_per_forwarder_max": (0, 1, 1_000_000)}
_CL = ConnectionLimits()
CONNECTION_LIMITS: dict[str, tuple[int, int, int]] = {
    "connections_max": (_CL.connections_max, 8, 100_000),
    "newcomer_headroom": (_CL.newcomer_headroom, 0, 10_000),
    "inbound_per_ip_max": (_CL.inbound_per_ip_max, 1, 100_000),
    "inbound_per_subnet_max": (_CL.inbound_per_subnet_max, 1, 100_000),
}
#: How long a payer's balance, looked up on a shared ledger, is believed
#: (the payer gate: ``solana.PayerCheck`` and ``core.PayerChecks``).  Longer
#: saves lookups; shorter notices a payer funded (or drained) sooner.
PAYER_LIMITS: dict[str, tuple[int, int, int]] = {"payer_balance_ttl_s": (30, 1, 3600)}


def config_limits(extra: dict[str, Any], spec: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """The limits in ``spec`` as config.toml sets them, checked (``HomeError``
    says what is wrong)."""
    got: dict[str, int] = {}
    for key, (default, low, high) in spec.items():
        value = extra.get(key, default)
        if value != default and (type(value) is not int or not low <= value <= high):
            raise HomeError(f"config.toml: {key} must be an integer from {low} to {high}, not {value!r}")
        got[key] = value
    return got


def make_book(network: NetworkSpec, extra: dict[str, Any]) -> AdvertBook:
    """The node's advert book, with the limits set in config.toml."""
    got = config_limits(extra, BOOK_LIMITS)
    if got["adverts_per_forwarder_max"] > got["adverts_max"]:
        raise HomeError("config.toml: adverts_per_forwarder_max must not exceed adverts_max")
    return AdvertBook(network=network.name, allow_simulated=network.allow_simulated,
                      adverts_max=got["adverts_max"], adverts_per_forwarder_max=got["adverts_per_forwarder_max"])


def connection_limits(extra: dict[str, Any]) -> ConnectionLimits:
    got = config_limits(extra, CONNECTION_LIMITS)
    try:
        return ConnectionLimits(**got)
    except ValueError as exc:
        raise HomeError(f"config.toml: {exc}") from None


def wall_ms() -> int:
    """Wall clock in ms: adverts carry signed timestamps that leave the process."""
    return time.time_ns() // 1_000_000


@dataclass(kw_only=True)
class NodeOptions:
    listen: list[str]
    bootstrap: list[str] = field(default_factory=list)
    control_port: int = 0
    advert_ttl_s: int = 600
    peers_target: int = 8
    connect_interval_s: float = 1.0
    ping_interval_s: float = 5.0
    dial_timeout_s: float = 3.0
    #: Transport multiaddrs the world reaches us at (``--announce``, a forwarded port).
    announce: list[str] = field(default_factory=list)
    #: ``--bulk-port`` (None: config.toml's ``bulk_port``; -1: the side channel off).
    bulk_port: int | None = None


class AdvertRecordValidator(Validator):
    """DHT records under ``/p2pgpu/a/...``: a valid signed advert whose key is
    that of its own peer id; ``select`` keeps the highest sequence number."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def _check(self, key: str, value: bytes) -> SignedAdvert:
        try:
            sa = self.node.book.check_record(value, self.node.now_ms())
        except PeerMisbehaved as exc:
            self.node.counts[f"dht:{exc.reason.name.lower()}"] += 1
            raise InvalidRecordType(str(exc)) from None
        if advert_key(sa.advert.peer_id) != key:
            self.node.counts["dht:wrong_key"] += 1
            raise InvalidRecordType("advert stored under another peer's key")
        return sa

    def validate(self, key: str, value: bytes) -> None:
        self._check(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, v in enumerate(values):
            try:
                seq = self._check(key, v).advert.seq
            except InvalidRecordType:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best


class Node:
    def __init__(
        self,
        *,
        identity: Identity,
        config: Config,
        network: NetworkSpec,
        inventory: Inventory,
        options: NodeOptions,
        home: Home | None = None,
        now_ms: Callable[[], int] = wall_ms,
        rng_seed: int | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.network = network
        self.inventory = inventory
        self.options = options
        self.home = home
        self.now_ms = now_ms
        self.book = make_book(network, config.extra)
        self.connection_limits = connection_limits(config.extra)
        self.payer_balance_ttl_s = config_limits(config.extra, PAYER_LIMITS)["payer_balance_ttl_s"]
        self.connmgr: ConnectionManager | None = None
        #: AutoNAT, relays, hole punching, what we advertise (``_reach_node``).
        self.reach_config = reach_config(config.extra, announce=options.announce,
                                         bootstrap=[*network.bootstrap, *options.bootstrap])
        self.reach: ReachService | None = None
        self.counts: Counter[str] = Counter()
        self.latency_ms: dict[str, float] = {}
        self.gpus_reserved = 0
        self.started_at_s = 0.0
        self.control_port = 0
        self.control: ControlServer | None = None
        self.stack: Stack | None = None
        self._seq = 0
        self._own: SignedAdvert | None = None
        self._republish = trio.Event()
        self._dht_due = trio.Event()
        #: Connected peers when our last DHT announcement succeeded (0: none yet).
        self._dht_announced_peers = 0
        self._synced: dict[str, bool] = {}
        self._cancel: trio.CancelScope | None = None
        # Randomness enters here once (manifest nonces): seeded from the OS,
        # or by the caller for a reproducible run.
        self.rng = random.Random(rng_seed if rng_seed is not None else int.from_bytes(os.urandom(16), "big"))
        self.jobs = JobsService(self, rng=self.rng)
        self.sandbox_reason: str | None = None
        self.ray_reason: str | None = "not checked yet"
        self.runner: Any = None
        #: The content store and /p2pgpu/blobs/1.0.0 (opened in run()).
        self.blobs: BlobService | None = None
        self.bitswap: BitswapService | None = None
        #: The OCI image cache (node/_images.py), opened on the first oci job.
        self.images: Any = None
        self._payouts_due = trio.Event()
        #: The payer keypair, the ledger and the payout address (``p2pgpu/wallet.py``).
        self.wallet = Wallet(home.path if home is not None else None, config, network)
        #: Set by a config reload: the advert loop re-signs at once.
        self._advert_stale = False
        #: The outcome of the last SIGHUP reload (``status.config_reload``).
        self.config_reload: dict[str, Any] | None = None
        # Hardware challenges (#16, node/_challenge.py): refused GPU claims are
        # hidden from matching through the book's view hook.
        self.challenges = challenge_service(self)
        self.book.view = self.challenges.view
        # Receipts and reputation (#16, node/_receipts.py).
        self.receipts = ReceiptService(self)
        self.jobs.on_settled = self.receipts.on_settled
        self.jobs.on_paid = self.receipts.on_paid
        self.jobs.standing = self.receipts.standing

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus["Node"] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_at_s = trio.current_time()
        validators: dict[str, Validator] = {"p2pgpu": P2pgpuRecordValidator(
            AdvertRecordValidator(self), ReceiptRecordValidator(self.counts))}
        link = link_delay_from_config(self.config.extra, allow=self.network.allow_simulated,
                                      network=self.network.name, peer_id=self.identity.peer_id)
        async with open_stack(self.identity.seed, self.options.listen, dht_validators=validators,
                              config=StackConfig(link_delay=link, connections_max=self.connection_limits.connections_max),
                              provider_classes=self._provider_classes) as stack:
            self.stack = stack
            self.connmgr = ConnectionManager(stack.host, self.connection_limits,
                                             now_ms=lambda: int(trio.current_time() * 1000), counts=self.counts,
                                             valued=lambda: (self.peers_we_work_with(), list(self.book.adverts)))
            await self.connmgr.install()
            self.reach = attach_reach(self, self.reach_config)
            stack.pubsub.set_topic_verdict_validator(ADVERTS_TOPIC, self._validate_advert)
            sub = await stack.pubsub.subscribe(ADVERTS_TOPIC)
            stack.host.set_stream_handler(TProtocol(MARKET_PROTOCOL), guarded("market", self._serve_market, self.counts))
            stack.host.set_stream_handler(TProtocol(RESULTS_PROTOCOL), guarded(
                "results", lambda s: serve_results(self, s), self.counts, timeout_s=600))
            stack.host.set_stream_handler(CHALLENGE_PROTOCOL, guarded(
                "challenge", self.challenges.serve, self.counts, timeout_s=serve_timeout_s))
            self.blobs = self._open_blobs()
            # A blob stream carries many requests; the service has its own idle timeout.
            stack.host.set_stream_handler(BLOBS_PROTOCOL, guarded(
                "blobs", self.blobs.serve, self.counts, timeout_s=24 * 3600))
            # Inputs by IPFS CID: providers send the blocks we want on streams they open to us.
            self.bitswap = BitswapService(host=stack.host, counts=self.counts)
            for proto in BITSWAP_PROTOCOLS:
                stack.host.set_stream_handler(proto, guarded("bitswap", self.bitswap.serve, self.counts,
                                                             timeout_s=24 * 3600))
            control = ControlServer(token=self.home.token() if self.home else "", handlers=self.control_handlers(),
                                    stream_handlers={})
            self.control = control
            try:
                async with trio.open_nursery() as nursery:
                    self._cancel = nursery.cancel_scope
                    self._nursery = nursery
                    self._start_runner()
                    self._open_store()
                    self.control_port = await nursery.start(control.serve, self.options.control_port)
                    if self.blobs.bulk is not None:
                        await nursery.start(self.blobs.bulk.serve)
                    await nursery.start(self.reach.run)
                    self._write_control_file()
                    await nursery.start(self.jobs.run)
                    await nursery.start(self.challenges.run)
                    await nursery.start(self.receipts.run)
                    for loop in (self._advert_loop, self._dht_loop, self._connect_loop, self._expire_loop,
                                 self._ping_loop, self._payout_loop, self._protect_loop, self.connmgr.run):
                        nursery.start_soon(supervise, loop.__name__.strip("_"), loop, self.counts)
                    nursery.start_soon(supervise, "drain", lambda: self._drain(sub), self.counts)
                    nursery.start_soon(supervise, "input_pins", lambda: input_pins_loop(self), self.counts)
                    task_status.started(self)
            finally:
                self._remove_control_file()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    def _write_control_file(self) -> None:
        if self.home is None:
            return
        doc = {"port": self.control_port, "pid": os.getpid(), "peer_id": self.identity.peer_id,
               "addrs": self.stack.addrs() if self.stack else []}
        # 0600 from the start: other local users need not know our port and
        # pid (the token, not this file, is what guards the API; issue #12).
        tmp = self.home.control_path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc))
        os.replace(tmp, self.home.control_path)

    def _remove_control_file(self) -> None:
        if self.home is not None:
            try:
                doc = json.loads(self.home.control_path.read_text())
            except (OSError, ValueError):
                return
            if doc.get("pid") == os.getpid():
                self.home.control_path.unlink(missing_ok=True)

    # --------------------------------------------------------------- adverts

    def _make_advert(self, config: Config | None = None, advert_ttl_s: int | None = None) -> SignedAdvert:
        assert self.stack is not None
        config = config or self.config
        advert_ttl_s = advert_ttl_s or self.options.advert_ttl_s
        now = self.now_ms()
        self._seq = next_seq(self._seq, now)
        gpus = self.inventory.gpus
        adv = Advert(
            peer_id=self.identity.peer_id,
            network=self.network.name,
            addrs=tuple(self.reach.advertised()[:8]) if self.reach is not None else (),
            seq=self._seq,
            issued_at_ms=now,
            expires_at_ms=now + advert_ttl_s * 1000,
            gpus=gpus,
            gpus_free=max(0, len(gpus) - self.gpus_reserved),
            price_per_gpu_hour=config.price_per_gpu_hour,
            currency=config.currency,
            payout_address=self._payout_address_of(config),
            region=config.region,
            runtimes=self.runtimes,
            simulated=self.inventory.simulated,
            images=advertised_images(self),
        )
        return sign_advert(self.identity, adv)

    def addrs_changed(self) -> None:
        """What we advertise changed (``_reach``): re-sign the advert."""
        self._advert_stale = True
        self._republish.set()

    def reload_config(self, load: Callable[[], Config], *, advert_ttl_fixed: bool = False) -> dict[str, Any]:
        """SIGHUP in ``node run``: read the config again and take its live
        settings (``home.LIVE_KEYS``; the advert is re-signed at once); the
        others wait for a restart.  A config that cannot be read, or whose
        settings would make an advert other nodes refuse, is refused whole and
        the running one kept.  ``advert_ttl_fixed``: ``--advert-ttl`` was given
        and wins over the file.  The outcome is logged and kept in
        ``status.config_reload``."""
        report: dict[str, Any] = {"at_ms": self.now_ms(), "ok": False, "applied": [], "needs_restart": [],
                                  "overridden": [], "error": ""}
        try:
            new = load()
            changes = config_changes(self.config, new)
            live = replace(self.config, **{k: getattr(new, k) for k in changes.live})
            verify_advert(self._make_advert(live, live.advert_ttl_s).wire, now_ms=self.now_ms())
            ttl = self.options.advert_ttl_s if advert_ttl_fixed else live.advert_ttl_s
        except (HomeError, ValueError, PeerMisbehaved) as exc:
            report["error"] = str(exc)
            log.error("config reload refused, the running config is kept: %s", exc)
        else:
            self.config, self.options.advert_ttl_s = live, ttl
            self.wallet = self.wallet.reconfigured(live)
            if self.runner is not None and "allow_job_network" in changes.live:
                self.runner.policy = replace(self.runner.policy, allow_network=live.allow_job_network)
            self._advert_stale = bool(changes.live)
            self._republish.set()
            report.update(ok=True, **changes.to_json())
            if advert_ttl_fixed and "advert_ttl_s" in changes.live:
                report["applied"].remove("advert_ttl_s")
                report["overridden"] = ["advert_ttl_s"]  # --advert-ttl wins over the file
            log.warning("config reloaded: applied %s%s", ", ".join(report["applied"]) or "nothing",
                        f"; needs a restart: {', '.join(changes.needs_restart)}" if changes.needs_restart else "")
        self.config_reload = report
        return report

    @property
    def payer(self) -> Any:
        """This node's Solana keypair in the home (it pays for the jobs it
        submits, and is paid when no other payout address is configured)."""
        return self.wallet.payer

    @property
    def payout_address(self) -> str:
        return self.wallet.payout_address

    def _payout_address_of(self, config: Config) -> str:
        return self.wallet.payout_address_for(config)

    @property
    def ledger_spec(self) -> str:
        return self.wallet.ledger_spec

    def payouts_due(self) -> None:
        self._payouts_due.set()

    async def _payout_loop(self) -> None:
        """Pay what the jobs we submitted owe, and tell each worker its
        transaction signature.  Exactly-once lives in the outbox (see
        p2pgpu.solana's Payer); this loop only drives it."""
        if self.jobs.db is None:
            return
        from p2pgpu.solana import (  # noqa: PLC0415
            LedgerRejected,
            LedgerUnavailable,
            Payer,
            PayerUnderfunded,
            open_ledger,
        )
        from p2pgpu.store import paid_since, unsettled_count  # noqa: PLC0415

        payer = None
        #: Notices are sent once per process for rows paid since ``since``
        #: (their batch's ``updated_ms``); ``told`` remembers the last few so a
        #: row seen again at the same millisecond is not told twice.
        since, told = 0, OrderedDict[str, None]()
        while True:
            with trio.move_on_after(2.0):
                await self._payouts_due.wait()
            self._payouts_due = trio.Event()
            if unsettled_count(self.jobs.db):
                if payer is None:
                    try:
                        ledger = open_ledger(self.ledger_spec, home_path=self.home.path if self.home else None)
                    except (ValueError, OSError) as exc:
                        log.warning("cannot open the ledger %s: %s", self.ledger_spec, exc)
                        continue
                    payer = Payer(self.jobs.db, ledger, self.payer, now_ms=self.now_ms)
                try:
                    report = await payer.pay_once()
                    for err in report.errors:
                        log.warning("payer: %s", err)
                    self.counts["payouts_paid"] += report.paid_rows
                    if report.paid_rows:
                        self.receipts.wake()
                except (LedgerUnavailable, LedgerRejected, PayerUnderfunded, OSError, ValueError) as exc:
                    # A ledger outage or an empty wallet must not stop the node: retried.
                    self.counts["payouts_errors"] += 1
                    log.warning("paying failed (will retry): %s", exc)
                    continue
            for r in paid_since(self.jobs.db, since):
                since = max(since, r["paid_ms"] or 0)
                if r["proof_hash"] in told or not r["tx_signature"]:
                    continue
                told[r["proof_hash"]] = None
                while len(told) > paid_notices_remembered_max:
                    told.popitem(last=False)
                doc = inclusion_doc(self.jobs.db, r["proof_hash"])
                self.jobs.notice_paid(r["job_id"], r["worker"], bytes.fromhex(r["proof_hash"]),
                                      r["tx_signature"], json.dumps(doc, sort_keys=True) if doc else None)

    def _open_store(self) -> None:
        if self.home is None:
            return
        from p2pgpu.store import db_path, open_db  # noqa: PLC0415

        self.jobs.db = open_db(db_path(self.home.path))
        self.jobs.load()
        if self.ledger_spec.startswith(("http://", "https://")):
            from p2pgpu.solana import PayerCheck, open_ledger  # noqa: PLC0415

            ttl_s = self.payer_balance_ttl_s
            self.jobs.set_payer_check(PayerCheck(open_ledger(self.ledger_spec), ttl_s=float(ttl_s)), ttl_s=ttl_s)
            from p2pgpu.solana._verify import PaymentLookup  # noqa: PLC0415

            # A shared ledger: members check payment notices on it (#16.3).
            self.jobs.set_payment_lookup(PaymentLookup(open_ledger(self.ledger_spec, readonly=True)))

    def _open_blobs(self) -> BlobService:
        """The content store in ``<home>/blobs`` (a temporary one without a
        home), with the operator's limits from config.toml."""
        import tempfile  # noqa: PLC0415

        from p2pgpu.content import BlobStore  # noqa: PLC0415
        from p2pgpu.content._store import blob_bytes_max_default, bytes_max_default  # noqa: PLC0415

        from ._blobs import Pacer, serve_bytes_per_s_max  # noqa: PLC0415
        from ._bulk import BULK_LIMITS, bulk_config

        root = self.home.path / "blobs" if self.home is not None else Path(tempfile.mkdtemp(prefix="p2pgpu-blobs-"))
        extra = self.config.extra
        store = BlobStore(root, bytes_max=int(extra.get("blobs_bytes_max", bytes_max_default)),
                          blob_bytes_max=int(extra.get("blob_bytes_max", blob_bytes_max_default)),
                          now_ms=self.now_ms())
        adversary = str(extra.get("adversary", "")) if self.network.allow_simulated else ""
        svc = BlobService(node=self, store=store, counts=self.counts, adversary=adversary,
                          pacer=Pacer(int(extra.get("blobs_serve_bytes_per_s_max", serve_bytes_per_s_max))))
        bulk = bulk_config(extra, self.options, limits=config_limits(extra, BULK_LIMITS), adversary=adversary)
        svc.bulk_fetch = bulk.enabled
        if bulk.enabled:
            svc.bulk = bulk.server(svc, self.counts, adversary=adversary)
        return svc

    def _start_runner(self) -> None:
        from p2pgpu.runtime import (  # noqa: PLC0415
            SandboxPolicy,
            check_sandbox,
            ray_unavailable,  # noqa: PLC0415
        )

        from ._runner import Runner  # noqa: PLC0415

        policy = SandboxPolicy(allow_network=self.config.allow_job_network)
        self.sandbox_reason = check_sandbox(policy)
        self.ray_reason = ray_unavailable(enabled=self.config.extra.get("allow_ray_jobs") is True,
                                          home=self.home.path if self.home is not None else None)
        if self.ray_reason:
            log.info("ray jobs not offered: %s", self.ray_reason)
        if self.sandbox_reason:
            log.warning("jobs refused: the sandbox cannot run here (%s)", self.sandbox_reason)
        root = self.home.path / "jobs" if self.home is not None else None
        adversary = str(self.config.extra.get("adversary", ""))
        if adversary and not self.network.allow_simulated:
            log.warning("config.toml sets adversary = %r: ignored on network %s (test networks only)",
                        adversary, self.network.name)
            adversary = ""
        self.jobs.adversary = adversary
        self.runner = Runner(self.jobs, root=root, policy=policy, adversary=adversary)

    @property
    def runtimes(self) -> tuple[str, ...]:
        """What this node can run: nothing without a sandbox; ``ray`` only
        when the operator turned it on (``allow_ray_jobs = true``), Ray is
        installed and jobs' networks can be confined (docs/ray.md)."""
        if self.sandbox_reason:
            return ()
        # ``oci``: images run under the same bubblewrap (node/_images.py).
        return ("process", "ray", "oci") if self.ray_reason is None else ("process", "oci")

    def capacity_changed(self) -> None:
        """Call when ``gpus_reserved`` changes: the advert is republished."""
        self._republish.set()

    async def _advert_loop(self) -> None:
        """Publish our advert: at once, again at half its lifetime, and when our
        free capacity changes, but at most once per ``advert_republish_s_min``
        (formation reserves and releases GPUs in bursts).  Only the first
        advert and the lifetime refreshes go to the DHT: the free-GPU count
        travels in the gossiped advert, and a DHT put plus provides on every
        reservation cost the whole network CPU (benchmarks/formation.py)."""
        assert self.stack is not None
        refresh = True
        while True:
            sa = self._make_advert()
            self._own = sa
            self.jobs.on_advert(sa)
            self.book.add_own(sa)
            await self.stack.pubsub.publish(ADVERTS_TOPIC, sa.wire)
            self.counts["adverts_published"] += 1
            if refresh:
                self._dht_due.set()
            published_reserved = self.gpus_reserved
            await trio.sleep(advert_republish_s_min)
            refresh_at = trio.current_time() + max(1.0, self.options.advert_ttl_s / 2) - advert_republish_s_min
            while True:
                # A reservation and its release within the same second (a short
                # job, a lease let go) leave the advert as it was: say nothing.
                self._republish = trio.Event()
                if self._advert_stale:  # a config reload: new terms, to the DHT too
                    self._advert_stale, refresh = False, True
                    break
                if self.gpus_reserved != published_reserved:
                    refresh = False
                    break
                with trio.move_on_at(refresh_at) as scope:
                    await self._republish.wait()
                if scope.cancelled_caught:
                    refresh = True
                    break

    def _validate_advert(self, forwarder: ID, msg: Any) -> GossipVerdict:
        """GossipSub validator: only adverts the book accepts are forwarded;
        the rest are counted by reason (``status``'s ``rejections``), and cost
        the forwarder score only when the fault is theirs (``verdict_for``: a
        replay, an expiry or a full share of the book is nobody's fault)."""
        if self.stack is not None and msg.from_id == self.stack.host.get_id().to_bytes():
            return GossipVerdict.ACCEPT  # our own advert, already in the book
        pid = forwarder.to_base58()
        try:
            self.book.ingest(msg.data, self.now_ms(), forwarder=pid)
        except PeerMisbehaved as exc:
            verdict = verdict_for(exc.reason)
            log.debug("advert from %s refused (%s): %s", forwarder, verdict.value, exc)
            return verdict
        if self.connmgr is not None:
            self.connmgr.touch(pid)  # it brought us a new, valid advert
        return GossipVerdict.ACCEPT

    async def _drain(self, sub: Any) -> None:
        # Adverts are stored by the validator; the subscription is drained so
        # its bounded queue never fills (and would drop with a log line).
        while True:
            await sub.get()
            self.counts["adverts_delivered"] += 1

    async def _dht_loop(self) -> None:
        assert self.stack is not None
        while True:
            await self._dht_due.wait()
            self._dht_due = trio.Event()
            sa = self._own
            if sa is None or not self.stack.host.get_connected_peers():
                continue
            with trio.move_on_after(30):
                try:
                    await self.stack.dht.put_value(advert_key(sa.advert.peer_id), sa.wire)
                    for cls in sa.advert.gpu_classes:
                        await self.stack.dht.provide(class_key(cls))
                    self.counts["dht_announcements"] += 1
                    self._dht_announced_peers = max(1, len(self.stack.host.get_connected_peers()))
                except (BaseLibp2pError, ValueError, InvalidRecordType) as exc:
                    self.counts["dht_announce_failed"] += 1
                    log.info("DHT announcement failed: %s", exc)

    def _provider_classes(self, peer_id: str) -> list[bytes] | None:
        """The DHT provider keys ``peer_id``'s advert allows it to announce."""
        sa = self.book.adverts.get(peer_id)
        if sa is None:
            return None
        return [bytes.fromhex(class_key(c)) for c in sa.advert.gpu_classes]

    def peers_we_work_with(self) -> list[str]:
        """The peers this node has reason to keep, most important first: its
        bootstrap peers, then the peers with a record in the receipts it
        holds (best first, at most half the room: #16), then the members (and,
        where we were a member, the submitter) of its jobs, newest job first.
        The advert book never evicts their adverts."""
        out: dict[str, None] = {}
        for addr in [*self.network.bootstrap, *self.options.bootstrap]:
            if "/p2p/" in addr:
                out[addr.rsplit("/p2p/", 1)[1]] = None
        cap = self.book.protected_max
        if self.receipts.last is not None:
            for pid in self.receipts.last.with_record(cap // 2):
                out[pid] = None
        # Strangers' jobs name nobody we work with; our live jobs first, then
        # the ended ones read back lately (the rest are only in the store).
        ended = [rec for rec, _size in reversed(self.jobs.ended.values())]
        for rec in [*self.jobs.records.ours_newest_first(), *ended]:
            if len(out) >= cap:
                break
            if not rec.members:
                continue
            for pid in rec.members:
                out[pid] = None
            if "member" in rec.roles:
                out[rec.manifest.manifest.submitter] = None
        out.pop(self.identity.peer_id, None)
        return list(out)[:cap]

    async def _protect_loop(self) -> None:
        while True:
            want = self.peers_we_work_with()
            keep = set(want)
            for pid in self.book.protected():
                if pid not in keep:
                    self.book.unprotect(pid)
            for pid in want:
                self.book.protect(pid)
            await trio.sleep(protect_interval_s)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            for pid in self.book.expire(self.now_ms()):
                self.counts["adverts_expired"] += 1
                log.debug("advert of %s expired", pid)

    # ------------------------------------------------------------ the market

    async def _serve_market(self, stream: Any) -> None:
        req = decode(await read_frame(stream, market_request_bytes_max), size_max=market_request_bytes_max)
        if not isinstance(req, dict) or req.get("want") != "adverts":
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "market request must be {want: adverts}")
        limit = req.get("limit", market_sync_adverts_max)
        if type(limit) is not int or not 0 < limit <= market_sync_adverts_max:
            raise PeerMisbehaved(Reason.BAD_SCHEMA, "limit out of range")
        # Ours, the peers we work with, then the longest known: a newcomer
        # syncing from us during a flood of fresh identities still gets the
        # honest market first.
        for sa in self.book.by_age(self.now_ms(), limit):
            await write_frame(stream, sa.wire)

    async def _sync_market(self, peer_id: str) -> None:
        assert self.stack is not None
        try:
            frames = await request(self.stack.host, peer_id, MARKET_PROTOCOL,
                                   encode({"want": "adverts", "limit": market_sync_adverts_max}),
                                   frame_bytes_max=8192, frames_max=market_sync_adverts_max, timeout_s=10.0)
        except (StreamGone, PeerMisbehaved) as exc:
            self.counts["market_sync_failed"] += 1
            log.info("market sync with %s failed: %s", peer_id, exc)
            return
        for wire in frames:
            try:
                self.book.ingest(wire, self.now_ms(), forwarder=peer_id, count_replays=False)
            except PeerMisbehaved:
                continue  # counted by the book; one bad advert spoils nothing else
        self.counts["market_syncs"] += 1
        if self.connmgr is not None:
            self.connmgr.touch(peer_id)

    # ----------------------------------------------------------- connections

    async def _dial(self, addr: str) -> bool:
        assert self.stack is not None
        if self.reach is not None:  # direct, or through the relay the address names
            return await self.reach.dial(addr, self.options.dial_timeout_s)
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except (ValueError, BaseLibp2pError) as exc:
            log.warning("not a dialable multiaddr %r: %s", addr, exc)
            return False
        if info.peer_id == self.stack.host.get_id():
            return False
        with trio.move_on_after(self.options.dial_timeout_s):
            try:
                await self.stack.host.connect(info)
                return True
            except (BaseLibp2pError, OSError) as exc:
                log.info("dial %s failed: %s", addr, exc)
        return False

    async def _connect_loop(self) -> None:
        assert self.stack is not None
        host = self.stack.host
        bootstrap = list(dict.fromkeys([*self.network.bootstrap, *self.options.bootstrap]))
        while True:
            connected = [p.to_base58() for p in host.get_connected_peers()]
            if not connected:
                for addr in bootstrap:
                    await self._dial(addr)
                connected = [p.to_base58() for p in host.get_connected_peers()]
            for pid in connected:
                if pid not in self._synced:
                    self._synced[pid] = True
                    try:
                        await self.stack.dht.add_peer(ID.from_base58(pid))
                    except (BaseLibp2pError, ValueError) as exc:
                        log.debug("DHT add_peer %s: %s", pid, exc)
                    await self._sync_market(pid)
                    if self.jobs.links is not None:
                        self.jobs.links.warm(pid)  # formation's first message to it need not negotiate
                    if len(connected) >= 2 * self._dht_announced_peers:
                        # The part of the DHT we can reach has doubled since our
                        # last announcement (or there was none): announce again.
                        # Not on every new connection: each announcement is a
                        # lookup, a put and a provide per GPU class, and direct
                        # streams make new connections all the time.
                        self._dht_due.set()
            for pid in list(self._synced):
                if pid not in connected:
                    del self._synced[pid]
            if len(connected) < self.options.peers_target:
                await self._dial_from_adverts(connected)
            await trio.sleep(self.options.connect_interval_s)

    async def dial_peer(self, peer_id: str) -> bool:
        """Connect to a peer by the addresses in its advert (a direct message
        to a peer we are not connected to: formation talks to the candidates
        its advert book names, not only to our GossipSub neighbours)."""
        sa = self.book.adverts.get(peer_id)
        if sa is None:
            return False
        order = self.reach.dial_order(sa.advert.addrs[:8]) if self.reach is not None else sa.advert.addrs[:8]
        for addr in order:
            if await self._dial(addr):
                return True
        return False

    async def _dial_from_adverts(self, connected: list[str]) -> None:
        # Prefer peers in an order that differs per node (rank by a hash of
        # both ids) so that nodes do not all dial the same few peers.
        me = self.identity.peer_id
        candidates = [p for p in self.book.adverts if p != me and p not in connected]
        candidates.sort(key=lambda p: hashlib.sha256((me + p).encode()).digest())
        dialed = 0
        for pid in candidates:
            if dialed >= 2 or len(connected) + dialed >= self.options.peers_target:
                break
            if await self.dial_peer(pid):
                dialed += 1

    async def _ping_loop(self) -> None:
        """Round-trip time to each peer over the standard ping protocol, one
        fresh stream per probe (py-libp2p's PingService reuses streams and calls
        ``is_closed()`` on streams where it is a bool: a TypeError that would
        end this loop)."""
        assert self.stack is not None
        while True:
            await trio.sleep(self.options.ping_interval_s)
            for peer in self.stack.host.get_connected_peers()[:32]:
                rtt = await self._ping_once(peer)
                if rtt is not None:
                    self.latency_ms[peer.to_base58()] = rtt

    async def _ping_once(self, peer: ID) -> float | None:
        assert self.stack is not None
        payload = os.urandom(32)
        with trio.move_on_after(2.0):
            try:
                stream = await self.stack.host.new_stream(peer, [PING_PROTOCOL])
            except (BaseLibp2pError, OSError) as exc:
                log.debug("ping %s: %s", peer, exc)
                return None
            try:
                start = trio.current_time()
                await stream.write(payload)
                echo = b""
                while len(echo) < len(payload):
                    chunk = await stream.read(len(payload) - len(echo))
                    if not chunk:
                        break
                    echo += chunk
                if echo == payload:
                    return round((trio.current_time() - start) * 1000, 3)
            except (BaseLibp2pError, OSError) as exc:
                log.debug("ping %s: %s", peer, exc)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.close()
                    except BaseLibp2pError:
                        pass  # the peer already closed it
        return None

    # ---------------------------------------------------------- control API

    def control_handlers(self) -> dict[str, Any]:
        return {
            "status": self._status,
            "peers": self._peers,
            "market": self._market,
            "gpus": self._gpus,
            "dht.providers": self._providers,
            "dht.get_advert": self._dht_get_advert,
            **blob_handlers(self),
            "shutdown": self._shutdown,
            **job_handlers(self),
            **challenge_handlers(self.challenges),
            **self.receipts.handlers(),
        }

    def _bulk_status(self) -> dict[str, Any]:
        """The blob side channel: where it listens, its tickets and connections."""
        bulk = self.blobs.bulk if self.blobs is not None else None
        out: dict[str, Any] = {"enabled": bulk is not None, "bytes_served": self.counts["bulk:bytes_served"],
                               "bytes_fetched": self.counts["blobs:bulk_bytes_fetched"]}
        if bulk is not None:
            out.update(host=bulk.host, port=bulk.port, tickets=len(bulk.book), connections=bulk.gate.open_count())
        return out

    async def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.stack is not None
        rejections: Counter[str] = Counter({r.name.lower(): n for r, n in self.book.rejections.items()})
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.stack.addrs(),
            "peers": len(self.stack.host.get_connected_peers()),
            "adverts_known": self.book.live_count(self.now_ms()),
            "adverts_evicted": self.book.evicted,
            "adverts_share_max": self.book.largest_share(),
            "gossip_ignored": self.stack.pubsub.ignored,
            "jobs": self.jobs.counts_by_state(),
            "jobs_in_memory": self.jobs.memory(),
            "sandbox": self.sandbox_reason or "ok",
            "bulk": self._bulk_status(),
            "uptime_s": round(trio.current_time() - self.started_at_s, 3),
            "network": self.network.name,
            "gpus": len(self.inventory.gpus),
            "gpus_free": max(0, len(self.inventory.gpus) - self.gpus_reserved),
            "rejections": dict(sorted(rejections.items())),
            "counters": dict(sorted(self.counts.items())),
            "library_handler_errors": dict(sorted(library_handler_errors.items())),
            "dht": self._dht_status(),
            "connections": self.connmgr.status() if self.connmgr is not None else {},
            **({"reachability": self.reach.status()} if self.reach is not None else {}),
            "protocols": sorted(str(p) for p in self.stack.host.get_mux().handlers if p),
            "control_port": self.control_port,
            "config_reload": self.config_reload,
            "control_evicted": self.control.evicted if self.control is not None else 0,
        }

    def _dht_status(self) -> dict[str, Any]:
        assert self.stack is not None
        values, providers = self.stack.dht.value_store, self.stack.dht.provider_store
        refused = {f"values:{k}": n for k, n in getattr(values, "refused", {}).items()}
        refused.update({f"providers:{k}": n for k, n in getattr(providers, "refused", {}).items()})
        return {"values": len(values.store), "value_bytes": getattr(values.store, "bytes", 0),
                "provider_keys": len(providers.providers), "refused": dict(sorted(refused.items()))}

    async def _peers(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.stack is not None
        store = self.stack.host.get_peerstore()
        # The last scores (refreshed in the background): peers never waits on the ledger.
        rep = self.receipts.last or await self.receipts.reputation()
        rows = []
        for peer in sorted(self.stack.host.get_connected_peers(), key=lambda p: p.to_base58()):
            pid = peer.to_base58()
            score = rep.score(pid)
            try:
                addrs = [str(a) for a in store.addrs(peer)][:8]
            except PeerStoreError:
                addrs = []  # connected (e.g. relayed, or just now) with no address in the store
            rows.append({"peer_id": pid, "addrs": addrs,
                         "latency_ms": self.latency_ms.get(pid),
                         "connections": peer_connections(self.reach, self.stack.host, peer),
                         # Its record from the receipts this node holds (docs/reputation.md).
                         "reputation": score.to_json() | {"job_value_max": job_value_max(score)}})
        return rows

    async def _market(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        model = params.get("model")
        vram = params.get("min_vram_gb") or 0
        if model is not None and not isinstance(model, str):
            raise ControlError("model must be text")
        if not isinstance(vram, (int, float)) or vram < 0:
            raise ControlError("min_vram_gb must be a non-negative number")
        rows = []
        for adv in self.book.market(self.now_ms(), model=model, memory_mb_min=int(vram * 1024)):
            rows.append(market_row(adv))
        return rows

    async def _gpus(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.inventory.to_json()

    async def _providers(self, params: dict[str, Any]) -> list[str]:
        cls = params.get("gpu_class")
        if not isinstance(cls, str) or not cls:
            raise ControlError("gpu_class is required, e.g. nvidia-h100-80gb-hbm3/80gb")
        return await self.find_providers(cls)

    async def find_providers(self, gpu_class: str) -> list[str]:
        """Peers that announced ``gpu_class`` in the DHT: our own provider store
        plus every connected peer's answer.  (py-libp2p's ``find_providers``
        stops at the first local record it has, so it misses the rest.)"""
        assert self.stack is not None
        dht = self.stack.dht
        key = bytes.fromhex(class_key(gpu_class))
        found = {p.peer_id.to_base58() for p in dht.provider_store.get_providers(key)}
        peers = self.stack.host.get_connected_peers()[:32]

        async def ask(peer: ID) -> None:
            with trio.move_on_after(5.0):
                try:
                    providers, _closer = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
                except (BaseLibp2pError, OSError) as exc:
                    log.debug("GET_PROVIDERS from %s failed: %s", peer, exc)
                    return
                for p in providers or []:
                    found.add(p.peer_id.to_base58())

        async with trio.open_nursery() as n:
            for peer in peers:
                n.start_soon(ask, peer)
        return sorted(found)

    async def _dht_get_advert(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.stack is not None
        pid = params.get("peer_id")
        if not isinstance(pid, str):
            raise ControlError("peer_id is required")
        key = advert_key(pid)
        # get_value answers from a stale local copy when it has one (notes,
        # trap 4): forget it so the lookup goes to the network.
        self.stack.dht.value_store.remove(key.encode())
        with trio.move_on_after(10):
            value = await self.stack.dht.get_value(key)
            if value:
                sa = verify_advert(value, now_ms=self.now_ms())
                return {"found": True, "advert": market_row(sa.advert), "seq": sa.advert.seq}
        return {"found": False}

    async def _shutdown(self, params: dict[str, Any]) -> dict[str, Any]:
        self.stop()
        return {"stopping": True}


def challenge_service(node: Node) -> ChallengeService:
    """The node's hardware-challenge service, from its config: ``challenge_auto``
    (default: on where the network refuses simulated GPUs), ``challenge_backend``
    (auto, numpy, torch, cupy) and ``challenge_n_max`` (the largest size served)."""
    extra = node.config.extra
    return ChallengeService(
        identity=node.identity, book=node.book, allow_simulated=node.network.allow_simulated, now_ms=node.now_ms,
        counts=node.counts, host=lambda: node.stack.host if node.stack else None, dial=node.dial_peer,
        backend=str(extra.get("challenge_backend", "auto")),
        auto=bool(extra.get("challenge_auto", not node.network.allow_simulated)),
        n_max_served=int(extra.get("challenge_n_max", n_max_challenge)))
