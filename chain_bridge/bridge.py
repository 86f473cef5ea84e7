"""The bridge service: MQTT in, verify, dedup, append in batches, receipts after commit, checkpoints.

Thin threaded shell around the ingest spine (chain_bridge.ingest) and the `Ledger`. Events are received
and checked either in this process (paho's thread enqueues, the sequencer thread drains a `Receiver`) or,
with `ingest_workers > 0`, by worker processes on a shared subscription (chain_bridge.workers), each
running the same `Receiver`. Either way one sequencer thread commits each batch in one transaction (group
commit), then publishes receipts: a receipt is never sent for an event that is not durable.

Several bridge hosts on one PostgreSQL ledger all ingest (one MQTT shared subscription group, or one JetStream
consumer) and append; only the holder of the sequencer lease also leads: checkpoints, finality, anchoring,
archiving, deadline attestations, evidence and study intakes, proofs and records (`_lead`). A host that gains
the lease takes those on from its sequencer thread, without restarting its ingest (docs/ledger-stores.md).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from carechain import topics
from carechain.checkpoint import NoteError, parse_note
from carechain.config import BridgeConfig, BrokerConfig, ConfigError
from carechain.cosignature import Cosigner
from carechain.crash_points import crash_point
from carechain.errors import Reason
from carechain.identity import Identity, parse_public_key_hex
from carechain.miner_messages import CosignatureMessage, from_miner
from carechain.proofs import VerificationError, verify_checkpoint
from carechain.receipts import Receipt
from carechain.retry import Backoff, ReconnectPolicy
from carechain.transport import connect_client
from chain_bridge.broker import archive_broker
from chain_bridge.finality import FinalityPolicy, FinalityTracker, is_final_note, ledger_policy
from chain_bridge.ingest import Ingest, RateGuard, Receiver, Rejection, SeqGuard, Sequencer, Verdict, VerdictSource
from chain_bridge.ingest.receive import wall_clock_ms
from chain_bridge.ledger.sql import SqliteLocation
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.metrics import LatencyWindow
from chain_bridge.proof_responder import ProofResponder
from chain_bridge.status_intake import DeviceStatusBook

if TYPE_CHECKING:
    from chain_bridge.anchoring import Anchorer
    from chain_bridge.archiver import Archiver
    from chain_bridge.contract_gate import ContractGate
    from chain_bridge.evidence_intake import EvidenceIntake
    from chain_bridge.ingest.nats_source import NatsSource
    from chain_bridge.lease import LeaseLost, SequencerLease
    from chain_bridge.ledger.tiles import TileWriter
    from chain_bridge.record_server import RecordServer
    from chain_bridge.study_intake import StudyIntake
    from chain_bridge.workers import WorkerPool

log = logging.getLogger("carechain.bridge")
# Checkpoints whose cosignatures are still collected; miners cosign within a few intervals.
MAX_PENDING_CHECKPOINTS = 256
# The active miner set is re-read from the ledger at checkpoints; the gate replays what other processes appended
# (party and bond entries) at most this often, since replaying costs per leaf.
MINER_SET_REFRESH_S = 5.0
# A final checkpoint is recorded on the ledger (`checkpoint.final`, for rewards and for readers of the log who
# ask what is final) at most this often: each record is a leaf, which the next checkpoint covers.
FINAL_RECORD_EVERY_S = 10.0
# A store that cannot be written (disk full, I/O error) is retried with this backoff, the same batch again.
STORAGE_RETRY = ReconnectPolicy(initial_s=0.5, max_s=5.0, stable_s=0.0)
# The exit status when the sequencer thread dies: nothing would be anchored any more, so the process ends
# and its supervisor (systemd `Restart=on-failure`) starts a fresh one, which resumes from the ledger.
EXIT_SEQUENCER_DIED = 70
# The sequencer loop turns at least every 0.2 s (5 s while the store is down); stuck this long, it is hung, and the
# systemd watchdog stops being pinged (`Bridge.healthy`) so that the bridge is restarted.
SEQUENCER_STALL_S = 120.0


def _exit_process() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_SEQUENCER_DIED)  # from a thread: sys.exit would end only the thread


@dataclass
class BridgeStats:
    received: int = 0
    anchored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0  # in the ledger: those found at start and those this bridge issued since
    checkpoints_issued: int = 0  # by this bridge (only a leader issues any)
    tree_size: int = 0
    batches: int = 0
    final_checkpoints: int = 0
    final_recorded: int = 0  # checkpoint.final entries this bridge appended
    deadline_attests: int = 0  # clock.attest entries appended because a contract deadline passed while idle
    storage_errors: int = 0  # batches and checkpoints that failed to write (disk full, I/O error), then retried
    unreceipted: int = 0  # refusals of unregistered ids not receipted (over the unregistered-receipt budget)
    records: Counter[str] = field(default_factory=Counter)  # record server: answered, pages, refusals by reason
    archive: Counter[str] = field(default_factory=Counter)  # archiver: planned, uploaded, committed, pruned, ...
    evidence: Counter[str] = field(default_factory=Counter)  # access.fault from requesters: appended, refusals
    studies: Counter[str] = field(default_factory=Counter)  # study.result from aggregators: appended, refusals
    anchors: Counter[str] = field(default_factory=Counter)  # anchorer: sent, mined, confirmed, gas_used, errors
    status: Counter[str] = field(default_factory=Counter)  # device status reports: accepted, refusals by reason
    role: str = "leader"  # "ingest" while another bridge host holds the sequencer lease (docs/ledger-stores.md)
    ingest_host_anchored: int = 0  # of `anchored`, appended while another host held the lease
    # For the metrics (chain_bridge.metrics): sign→receipt latency of anchored events, the latest checkpoint this
    # bridge issued (tree size, wall-clock ms), and the largest tree size each miner (by id) cosigned since start.
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    checkpoint_size: int = -1
    checkpoint_ms: int | None = None
    cosigned: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "received": self.received, "anchored": self.anchored, "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected),
            "checkpoints": self.checkpoints, "checkpoints_issued": self.checkpoints_issued,
            "tree_size": self.tree_size, "batches": self.batches,
            "final_checkpoints": self.final_checkpoints, "final_recorded": self.final_recorded,
            "deadline_attests": self.deadline_attests,
            "storage_errors": self.storage_errors,
            "unreceipted": self.unreceipted, "records": dict(self.records), "archive": dict(self.archive),
            "evidence": dict(self.evidence), "studies": dict(self.studies), "anchors": dict(self.anchors),
            "status": dict(self.status),
            "role": self.role, "ingest_host_anchored": self.ingest_host_anchored,
            "latency_ms_last_60s": dict(zip(("count", "p50", "p99"), self.latency.recent(60), strict=True)),
        }


def default_origin(log_key: Identity) -> str:
    return f"carechain.log/{log_key.device_id}"


def _tile_writer(cfg: BridgeConfig) -> TileWriter | None:
    if cfg.tiles_dir is None:
        return None
    from chain_bridge.ledger.tiles import TileWriter, TileWriterError

    try:
        return TileWriter(cfg.tiles_dir)
    except (TileWriterError, OSError) as exc:
        raise ConfigError(f"bridge.tiles_dir: {exc}") from None


class Bridge:
    def __init__(self, cfg: BridgeConfig, broker: BrokerConfig, log_key: Identity, ledger: Ledger,
                 client_id: str = "carechain-bridge", contracts: ContractGate | None = None,
                 on_fatal: Callable[[], None] = _exit_process, lease: SequencerLease | None = None) -> None:
        self.cfg = cfg
        self.broker = broker
        self.log_key = log_key
        self.ledger = ledger
        # Several bridge hosts on one PostgreSQL ledger: only the holder of this lease leads (checkpoints and
        # the rest of `_lead`); the others ingest and append (`bridge.store.standby_ingest`), or wait idle as hot
        # standbys (`await_lease` before `start`).
        self.lease = lease
        self.leading = threading.Event()  # set once this bridge does the leader duties
        self._lease_gained = threading.Event()  # set by the lease waiter; the sequencer thread then leads
        self._lease_waiter: threading.Thread | None = None
        self._subscriptions: list[tuple[str, int]] = []  # what a reconnect subscribes again (grows at take-over)
        self.origin = cfg.origin or default_origin(log_key)
        self.client_id = client_id
        # With contracts, every sale is checked before it is appended (docs/contracts.md); replay now.
        self.contracts = contracts
        if contracts is not None:
            started = time.monotonic()
            contracts.catch_up(ledger)
            log.info("contract state ready: %d of %d leaves replayed in %.2f s (the rest from a snapshot)",
                     contracts.replayed, ledger.size, time.monotonic() - started)
        self.stats = BridgeStats(tree_size=ledger.size, checkpoints=ledger.checkpoint_count())
        self._stop = threading.Event()
        self._last_checkpoint_size, note = ledger.latest_checkpoint() or (-1, "")
        # The newest signed checkpoint, published again (retained) each time the link comes up: one issued while
        # the link was still down (the first tick races the connect) or lost with a broker restart would otherwise
        # stay unseen until the log grows, and miners on an idle log would never cosign it.
        self._latest_note: str | None = note or None
        # receive → check in this process (unless ingest workers do it), then guards → sequence → append.
        self.receiver = Receiver(ledger, cfg.limits, cfg.batch_max, cfg.batch_wait_ms / 1000,
                                 max_message_bytes=broker.max_packet_bytes)
        # Devices' signed status reports (outbox depth, battery) for the console; never on the ledger.
        self.device_status = DeviceStatusBook(self.receiver.registry.lookup)
        self.stats.status = self.device_status.counters  # its keys are all there from the start
        # Held by the sequencer while it extends the ledger; miners' proof requests are answered from the
        # MQTT thread and must never read the in-memory tree mid-append.
        self.ledger_lock = threading.Lock()
        self.tiles = _tile_writer(cfg)  # the log as static tiles (docs/tiles.md), or None (the default)
        self.sequencer = Sequencer(ledger, cfg.limits, contracts, self.ledger_lock, self.receiver.registry)
        self._pool: WorkerPool | None = None
        self._nats: NatsSource | None = None  # bridge.ingest nats: events from a JetStream consumer (docs/nats.md)
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._sequencer_turned = time.monotonic()
        self.connected = threading.Event()
        # Every answer signed by the log key: miners act only on signed answers (carechain.miner_messages).
        self.proofs = ProofResponder(ledger, None, self.ledger_lock, max_packet_bytes=self.broker.max_packet_bytes,
                                     requests_per_s=cfg.proof_requests_per_s, burst=cfg.proof_request_burst,
                                     log_key=log_key)
        # Who makes a checkpoint final: with contracts, a majority of the ledger's active miners (registered,
        # bonded, not suspended, no failed audit this epoch), re-read as the ledger changes; `bridge.miners` and
        # `bridge.finality_threshold` then decide nothing. Without contracts there is no miner set on the
        # ledger, and the configured cosigners still count (a lab setting: docs/miners.md).
        self.finality: FinalityTracker | None = None
        if contracts is not None:
            if cfg.miners or cfg.finality_threshold:
                log.warning("bridge.miners and bridge.finality_threshold are ignored: with contracts, a majority of "
                            "the ledger's active miners makes a checkpoint final (register and bond miners with "
                            "`carechain party register miner` and `carechain bond post`; docs/miners.md)")
            self.finality = FinalityTracker(ledger_policy(contracts.state))
        elif cfg.finality_threshold:
            self.finality = FinalityTracker(FinalityPolicy(
                tuple(Cosigner(m.name, parse_public_key_hex(m.public_key, f"miner {m.name}")) for m in cfg.miners),
                cfg.finality_threshold))
        self.miner_refresh_s = MINER_SET_REFRESH_S
        self.final_record_every_s = FINAL_RECORD_EVERY_S
        self._miners_read_at = time.monotonic()  # the gate caught up just above
        self._final_recorded_at: float | None = None
        self._awaiting_final: dict[str, int] = {}  # device -> its highest receipted leaf not known final yet
        self._final_note: tuple[int, str] | None = None  # the latest final checkpoint (size, note with cosigs)
        self._recorded_covers = 0  # leaves covered by the latest checkpoint.final this bridge appended, + 1
        self._finality_lock = threading.Lock()
        self.ever_connected = threading.Event()  # `connected` is cleared at every disconnect, this is not
        self._issued: dict[str, tuple[int, str]] = {}  # recent checkpoint body -> (tree size, note)
        self._last_final_size = -1
        self._on_fatal = on_fatal  # the sequencer thread died: by default the process exits non-zero
        self._storage_backoff = Backoff(STORAGE_RETRY)
        # Sealed readings for requesters named in a final access record (needs the contracts and finality).
        self.records: RecordServer | None = None
        # Ciphertexts of ended epochs archived to the storage miners, then pruned here (needs the contracts'
        # storage rule and the operator key that signs the commits).
        self.archiver: Archiver | None = None
        if cfg.archive.enabled:
            if contracts is None or "storage" not in contracts.genesis.contracts:
                raise ConfigError("bridge.archive needs bridge.contracts and a genesis with the storage contract: "
                                  "each archive's manifest is committed on the ledger")
            from chain_bridge.archiver import Archiver

            # Its own MQTT session: under a locked broker (client id = login) it must never take the bridge's.
            self.archiver = Archiver(ledger, self.ledger_lock, contracts, self.final_size, cfg.archive,
                                     archive_broker(broker), cfg.data_dir, client_id=f"{client_id}-archive")
            self.stats.archive = self.archiver.stats
            if self.finality is None:
                log.warning("no checkpoint can become final: ciphertexts are archived but never pruned (only an "
                            "archive committed under a final checkpoint is)")
        # Checkpoints anchored on an Ethereum-compatible chain, on the anchorer's own thread (docs/anchoring.md).
        self.anchorer: Anchorer | None = None
        if cfg.anchor.enabled:
            from chain_bridge.anchoring import Anchorer

            self.anchorer = Anchorer(cfg.anchor, cfg.data_dir)
            self.stats.anchors = self.anchorer.stats
        # Requesters' evidence against miners (access.fault), decided by the contracts on the sequencer's thread.
        self.evidence: EvidenceIntake | None = None
        if contracts is not None:
            from chain_bridge.evidence_intake import EvidenceIntake

            self.evidence = EvidenceIntake()
            self.stats.evidence = self.evidence.stats
        # Aggregators' study results (study.result), decided by the contracts on the sequencer's thread.
        self.studies: StudyIntake | None = None
        if contracts is not None:
            from chain_bridge.study_intake import StudyIntake

            self.studies = StudyIntake()
            self.stats.studies = self.studies.stats
        if contracts is not None:
            from chain_bridge.record_server import RecordServer

            self.records = RecordServer(ledger.location, contracts.genesis, self.final_size, log_key,
                                        max_packet_bytes=broker.max_packet_bytes,
                                        requests_per_s=cfg.records_requests_per_s, burst=cfg.records_request_burst,
                                        archive=self.archiver.fetcher if self.archiver else None)
            self.stats.records = self.records.stats  # one counter: `carechain bridge` prints it with the rest
            if self.finality is None or self.finality.policy is None:
                log.warning("no miner is active on the ledger yet: no checkpoint becomes final, so no sealed "
                            "record is served until miners are registered and bonded")

    # The stages, by name (tests and tools reach them here).
    @property
    def ingest(self) -> Ingest:
        return self.receiver.ingest

    @property
    def seq_guard(self) -> SeqGuard:
        return self.sequencer.seq_guard

    @property
    def rate_guard(self) -> RateGuard:
        return self.sequencer.rate_guard

    # -- lifecycle ---------------------------------------------------------------------------------

    def await_lease(self, stopping: Callable[[], bool]) -> bool:
        """With a sequencer lease: wait as a hot standby until this bridge holds it (True), or `stopping()`
        (False). Meanwhile the ledger and the contracts follow what the active sequencer appends, so the
        take-over does not start with a replay. Without a lease: True at once."""
        if self.lease is None:
            return True
        return self.lease.wait(stopping, while_waiting=self._follow_the_log)

    def try_lead(self) -> bool:
        """Ask for the sequencer lease once, without waiting: True if this bridge holds it (or there is none)."""
        return self.lease is None or self.lease.held or self.lease.try_acquire()

    @property
    def leads(self) -> bool:
        """True while this host does the leader duties: always without a lease, else once it took the lease."""
        return self.lease is None or self.leading.is_set()

    def _follow_the_log(self) -> None:
        with self.ledger_lock:
            self.ledger.refresh()
            if self.contracts is not None:
                self.contracts.catch_up(self.ledger)
        self.stats.tree_size = self.ledger.size

    def _lease_lost(self, exc: LeaseLost) -> None:
        """Another bridge may be the sequencer now: stop sequencing at once, and end the process (non-zero) so
        that its supervisor restarts it as a standby. What was not receipted, the agents resend."""
        self._stop.set()
        log.critical("lost the sequencer lease: %s. Stopping at once: this bridge no longer ingests, appends or "
                     "checkpoints; exiting with status %d (restarted, it ingests or stands by until it holds the "
                     "lease again)", exc,
                     EXIT_SEQUENCER_DIED)
        self._on_fatal()

    @property
    def ingests_without_lease(self) -> bool:
        """Several bridge hosts ingest at once: this one may start before it holds the sequencer lease."""
        return self.lease is not None and self.cfg.store.standby_ingest

    def start(self) -> None:
        if self.lease is not None and not self.lease.held and not self.ingests_without_lease:
            raise RuntimeError("a bridge with a sequencer lease starts only once it holds it (await_lease), "
                               "unless bridge.store.standby_ingest")
        workers = self.cfg.ingest_workers
        if workers:
            from chain_bridge.workers import WorkerPool, worker_specs

            nats = self.cfg.nats if self.cfg.ingest == "nats" else None  # the workers pull from JetStream
            self._pool = WorkerPool(worker_specs(workers, self.broker, self.ledger.location, self.cfg.limits,
                                                 self.cfg.batch_max, self.client_id, nats))
            self._pool.start()
        if self.cfg.ingest == "nats":
            from chain_bridge.ingest.nats_source import NatsSource

            # With workers it only acknowledges what they pulled, once committed.
            self._nats = NatsSource(self.cfg.nats, self.receiver, self.broker, name=self.client_id,
                                    workers=self._pool)
            self._nats.start()  # a ConfigError if the cluster cannot be reached or set up
        # Leader topics are in the subscription list so that a reconnect re-subscribes them too.
        self._subscriptions = [] if workers or self._nats else [(self._events_subscription(), 1)]
        leads_now = self.lease is None or self.lease.held
        if leads_now:
            self._subscriptions += self._leader_subscriptions()
        elif self.finality is not None:  # an ingest host learns finality from the leader (`_follow_finality`)
            self._subscriptions.append((topics.FINAL_CHECKPOINT, 1))
        self._client = connect_client(
            self.broker, self.client_id, clean_session=False, on_message=self._on_message,
            subscriptions=self._subscriptions, connected=self.connected, on_state=self._on_link,
            # Every host keeps its own book of device statuses; a broker whose ACL predates them (generated by an
            # older `carechain bridge acl`) refuses the topic, and the bridge runs on without them, warned.
            optional=[(topics.STATUS_WILDCARD, 0)],
        )
        self.proofs.client = self._client
        if leads_now:
            self._lead()
        else:
            self.stats.role = "ingest"
            self._lease_waiter = threading.Thread(target=self._await_lease_while_ingesting, name="sequencer-lease",
                                                  daemon=True)
            self._lease_waiter.start()
        self._worker = threading.Thread(target=self._run, name="bridge-sequencer", daemon=True)
        self._worker.start()

    def _events_subscription(self) -> str:
        """Device events: all of them, or this host's turn of them when several bridge hosts ingest (the one
        shared subscription group of the deployment, as its ingest workers use)."""
        if not self.ingests_without_lease:
            return topics.EVENTS_WILDCARD
        from chain_bridge.workers import shared_subscription

        return shared_subscription(self.broker)

    def _leader_subscriptions(self) -> list[tuple[str, int]]:
        """What only the lease holder answers or decides: proof requests, cosignatures, record requests,
        evidence and study entries."""
        subscriptions = [(topics.MINER_REQUEST_WILDCARD, 1)]
        if self.finality is not None:
            subscriptions.append((topics.MINER_COSIG_WILDCARD, 1))
        if self.records is not None:
            subscriptions.append((topics.ACCESS_RECORDS, 1))
        if self.evidence is not None:
            subscriptions.append((topics.ACCESS_EVIDENCE, 1))
        if self.studies is not None:
            subscriptions.append((topics.MINER_STUDY_WILDCARD, 1))
        return subscriptions

    def _await_lease_while_ingesting(self) -> None:
        """The lease waiter of an ingest host: once the lease is ours, the sequencer thread takes the lead."""
        assert self.lease is not None
        if self.lease.wait(self._stop.is_set):
            self._lease_gained.set()

    def _lead(self) -> None:
        """Start the leader duties: the lease watch, the record server, the archiver and the anchorer; the
        periodic ones (checkpoints, finality, deadlines, intakes) run in the sequencer loop once `leading`."""
        assert self._client is not None
        if self.lease is not None:
            self.lease.watch(self._lease_lost)
        if self.records is not None:
            self.records.start(self._client)
        if self.archiver is not None:
            self.archiver.start()
        if self.anchorer is not None:
            self.anchorer.start(self.ledger.latest_checkpoint())
        self.stats.role = "leader"
        self.leading.set()

    def _take_lead(self) -> None:
        """On the sequencer thread, when an ingest host gains the lease: follow the log to where the previous
        leader left it, subscribe to the leader topics, and lead; ingest goes on as it was."""
        assert self._client is not None
        with self.ledger_lock:
            self.ledger.refresh()
            self._last_checkpoint_size = (self.ledger.latest_checkpoint() or (-1, ""))[0]
            if self.contracts is not None:
                self.contracts.catch_up(self.ledger)
        self._miners_read_at = time.monotonic() - self.miner_refresh_s  # the miner set is read at the next tick
        leader = self._leader_subscriptions()
        self._subscriptions += leader
        self._client.subscribe(leader)  # if the link is down now, the reconnect subscribes the whole list
        self._lead()
        log.warning("this bridge now leads: checkpoints, finality, anchoring and the other leader duties (it "
                    "keeps ingesting as before)")

    def _on_link(self, client: mqtt.Client, up: bool) -> None:
        if up:
            self.ever_connected.set()
            note = self._latest_note
            if note is not None and self.leads:
                client.publish(topics.CHECKPOINT, note.encode(), qos=0, retain=True)

    def healthy(self) -> bool:
        """The systemd watchdog's check: true before `start` (a standby waiting for the sequencer lease), then
        while the sequencer thread lives and its loop has turned within SEQUENCER_STALL_S."""
        if self._worker is None:
            return True
        return self._worker.is_alive() and time.monotonic() - self._sequencer_turned < SEQUENCER_STALL_S

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once the bridge (and every ingest worker) is subscribed: events sent later are not missed."""
        deadline = time.monotonic() + timeout
        if not self.connected.wait(timeout):
            return False
        return self._pool is None or self._pool.wait_subscribed(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._worker:
            self._worker.join(timeout=10)
        if self._lease_waiter is not None:
            self._lease_waiter.join(timeout=10)  # it sees `_stop` within a poll
        if self._pool:
            self._pool.stop()
        if self._nats is not None:
            self._nats.stop()  # what was pulled and not committed is delivered again (to the next bridge)
        if self._client:
            self._client.disconnect()
            self.receiver.inbox.close()  # a network thread waiting for room returns without acknowledging
            self._client.loop_stop()
        if self.records is not None:
            self.records.stop()
        if self.archiver is not None:
            self.archiver.stop()
        if self.anchorer is not None:
            self.anchorer.stop()
        if self.lease is not None:
            self.lease.release()  # after the last checkpoint: a standby takes over at its next poll

    def _on_message(self, client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.ACCESS_RECORDS:
            if self.records is not None:
                self.records.submit(msg.payload)  # answered on the record server's own thread
            return
        if msg.topic == topics.FINAL_CHECKPOINT:
            self._follow_finality(bytes(msg.payload))
            return
        if msg.topic == topics.ACCESS_EVIDENCE:
            if self.evidence is not None:
                self.evidence.submit(bytes(msg.payload))  # decided on the sequencer's thread
            return
        if msg.topic.endswith("/status"):  # a cheap test first: events take the path below
            device = topics.device_of_status_topic(msg.topic)
            if device is not None:
                self.device_status.receive(device, bytes(msg.payload))
            return
        miner = topics.miner_of_topic(msg.topic)
        if miner is None:
            self.receiver.inbox.on_message(client, _userdata, msg)  # waits for room: back-pressure, not loss
        elif miner[1] == "req":
            self.proofs.serve(client, msg)
        elif miner[1] == "cosig" and msg.payload:
            self._on_cosignature(bytes(msg.payload), miner[0])
        elif miner[1] == "study" and self.studies is not None:
            self.studies.submit(miner[0], bytes(msg.payload))  # decided on the sequencer's thread

    # -- finality ------------------------------------------------------------------------------------

    def final_size(self) -> int:
        """The tree size of the latest checkpoint this bridge saw become final (-1: none since it started)."""
        with self._finality_lock:
            return self._last_final_size

    def _follow_finality(self, payload: bytes) -> None:
        """An ingest host: the leader published a final checkpoint. If the log key signed it and the active
        miners it knows cosigned it, its receipts carry that `fin` from now on, and the devices it receipted
        below it are told, as the leader tells its own."""
        if self.leading.is_set() or self.finality is None or self.finality.policy is None or not payload:
            return
        try:
            note = payload.decode()
            checkpoint = verify_checkpoint(note, self.log_key.public_key)
        except (UnicodeDecodeError, VerificationError) as exc:
            log.warning("ignored a final checkpoint not signed by this log's key: %s", exc)
            return
        if checkpoint.origin != self.origin or not is_final_note(note, self.finality.policy):
            log.info("ignored a final checkpoint at size %d: another origin, or not cosigned by a majority of the "
                     "active miners this bridge knows", checkpoint.tree_size)
            return
        with self._finality_lock:
            if checkpoint.tree_size <= self._last_final_size:
                return
            self._last_final_size = checkpoint.tree_size
        self._notify_final(checkpoint.tree_size)

    def _on_cosignature(self, payload: bytes, miner_id: str) -> None:
        """Count one miner's cosignature; publish the checkpoint, retained, once t-of-n cosigned it."""
        if self.finality is None:
            return
        try:
            m = CosignatureMessage.model_validate_json(payload)
            if not from_miner(m, miner_id):  # the line is checked against the ledger's keys too: defence in depth
                log.info("ignored a cosignature message on miner %s's topic not signed by that miner", miner_id)
                return
            body, _ = parse_note(m.checkpoint)
            _, lines = parse_note(m.checkpoint + m.cosignature)
        except (ValidationError, NoteError) as exc:
            log.info("ignored a malformed cosignature: %s", exc)
            return
        with self._finality_lock:
            if body not in self._issued:
                return  # not a recent checkpoint of ours
            self._note_cosigned(miner_id, bytes.fromhex(m.public_key), self._issued[body][0])
            if not self.finality.add(body, lines[-1]):
                return  # not a valid active cosigner, or already final
            final = self._became_final(body)
        if final is not None:
            self._publish_final(final)

    def _note_cosigned(self, miner_id: str, key: bytes, size: int) -> None:
        """For the cosignature-lag metric: an active miner's signed message says it cosigned tree size `size`."""
        policy = self.finality.policy if self.finality is not None else None
        if policy is None or not any(c.public_key == key for c in policy.cosigners):
            return  # only the active set: a stranger's key must not add a series
        if size > self.stats.cosigned.get(miner_id, -1):
            self.stats.cosigned[miner_id] = size

    def _became_final(self, body: str) -> str | None:
        """With the finality lock held: `body` just became final; its note if it is the newest final one."""
        assert self.finality is not None
        size, note = self._issued[body]
        final = self.finality.final_note(note)
        if final is None or size <= self._last_final_size:
            return None
        self._last_final_size = size
        self._final_note = (size, final)
        self.stats.final_checkpoints += 1
        return final

    def _publish_final(self, final: str) -> None:
        """Publish the final checkpoint, and tell each device whose receipted leaves it now covers.

        Devices cannot read the final-checkpoint topic under a locked-down broker, so they hear of finality
        on their own receipt topic: a receipt with no entries whose `fin` covers their last receipted leaf.
        """
        client = self._client
        if client is None:
            return
        client.publish(topics.FINAL_CHECKPOINT, final.encode(), qos=1, retain=True)
        self._notify_final(self.final_size())

    def _notify_final(self, size: int) -> None:
        """Tell each device whose receipted leaves now lie below `size` (a receipt with no entries, `fin`)."""
        client = self._client
        if client is None:
            return
        with self._finality_lock:
            covered = sorted(d for d, highest in self._awaiting_final.items() if highest < size)
            for device in covered:
                del self._awaiting_final[device]
        now = wall_clock_ms()
        for device in covered:
            client.publish(topics.receipts(device), Receipt(device, now, final_size=size).seal(self.log_key), qos=1)

    def refresh_miners(self) -> None:
        """Judge cosignatures by the ledger's active miner set as it is now (on the sequencer's thread).

        The gate replays what it has not applied (entries other processes appended: party registrations,
        bonds) at most every `miner_refresh_s`; between those, its state moves with the sales it decides.
        """
        if self.contracts is None or self.finality is None:
            return
        now = time.monotonic()
        with self.ledger_lock:
            if now >= self._miners_read_at + self.miner_refresh_s:
                self.ledger.refresh()
                self.contracts.catch_up(self.ledger)
                self._miners_read_at = now
            policy = ledger_policy(self.contracts.state)
        with self._finality_lock:
            finals = [self._became_final(body) for body in self.finality.set_policy(policy) if body in self._issued]
        for final in finals:
            if final is not None:
                self._publish_final(final)

    def record_final(self) -> int | None:
        """Append an operator-signed `checkpoint.final` for the newest final checkpoint; its leaf index.

        At most once every `final_record_every_s`, and only for a checkpoint that covers more than the
        previous record: the record is itself a leaf, and the checkpoint that covers just it must not be
        recorded again, or an idle log would never stop growing. The contracts check the entry first (the
        same gate as any entry); one they refuse is logged and not appended.
        """
        if self.contracts is None or self.finality is None:
            return None
        from contract_rules import transactions as ce
        from contract_rules.runtime import OK

        with self._finality_lock:
            latest = self._final_note
        now = time.monotonic()
        if latest is None or latest[0] <= self._recorded_covers:
            return None
        if self._final_recorded_at is not None and now < self._final_recorded_at + self.final_record_every_s:
            return None
        self._final_recorded_at = now
        entry = ce.signed(self.contracts.operator, ce.CHECKPOINT_FINAL, ce.CheckpointFinal(v=1, note=latest[1]))
        with self.ledger_lock:
            self.ledger.refresh()
            self.contracts.catch_up(self.ledger)
            reason = self.contracts.runtime.check(entry)
            if reason != OK:
                log.warning("final checkpoint at tree size %d not recorded: the contracts refuse it (%s)",
                            latest[0], reason)
                return None
            [index] = self.ledger.append_entries([entry])
        self._recorded_covers = index + 1
        self.stats.final_recorded += 1
        return index

    def attest_deadlines(self) -> int | None:
        """Append a `clock.attest` when the wall clock has passed a contract deadline that attested time has not
        (`contract_rules.market.deadlines`: a study's close, its grace, an audit window;
        `contract_rules.trials.deadlines`: a trial's enrolment close, its reveal window's end); its leaf index.

        Attested time otherwise moves only with gated events and submitted entries, so on a quiet ledger a
        closed study would wait for its aggregators forever, and a trial's missing seed would never be recovered.
        One leaf per passed deadline, never a heartbeat.
        """
        if self.contracts is None:
            return None
        from chain_bridge.contract_gate import clock_attestation
        from contract_rules import market, trials
        from contract_rules.clock import attested_ms
        from contract_rules.runtime import OK

        now = wall_clock_ms()
        with self.ledger_lock:
            self.ledger.refresh()
            self.contracts.catch_up(self.ledger)
            state = self.contracts.runtime.state
            last = attested_ms(state) or 0
            passed = [*market.deadlines(state), *trials.deadlines(state)]
            if not any(last < deadline <= now for deadline in passed):
                return None
            entry = clock_attestation(self.contracts.operator, state, now)
            if entry is None or self.contracts.runtime.check(entry) != OK:
                return None
            [index] = self.ledger.append_entries([entry])
        self.stats.deadline_attests += 1
        return index

    def _remember_checkpoint(self, note: str, size: int) -> None:
        if self.finality is None:
            return
        body, _ = parse_note(note)
        with self._finality_lock:
            self._issued[body] = (size, note)
            while len(self._issued) > MAX_PENDING_CHECKPOINTS:
                oldest = next(iter(self._issued))
                del self._issued[oldest]
                self.finality.forget(oldest)

    # -- sequencer -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._sequence_forever()
        except BaseException:
            log.critical("the bridge's sequencer thread died: nothing will be anchored or receipted any more; "
                         "exiting with status %d so that the supervisor restarts the bridge (agents keep and "
                         "resend their events)", EXIT_SEQUENCER_DIED, exc_info=True)
            self._on_fatal()

    def _sequence_forever(self) -> None:
        next_checkpoint = time.monotonic()
        source: VerdictSource = self._nats or self._pool or self.receiver
        retry: list[Verdict] = []  # a batch the store could not take: sequenced again, not dropped
        while not self._stop.is_set():
            self._sequencer_turned = time.monotonic()  # for `healthy`
            timeout = min(0.2, max(0.001, next_checkpoint - time.monotonic()))
            verdicts, retry = retry, []
            try:
                if self._lease_gained.is_set() and not self.leading.is_set():
                    self._take_lead()  # a store error here: tried again at the next turn
                    next_checkpoint = time.monotonic()
                if not verdicts:
                    verdicts = source.receive(timeout)
                if verdicts:
                    retry = verdicts  # until it is committed
                    self.sequence(verdicts)
                    retry = []
                    if self._nats is not None:
                        self._nats.settle()  # committed and receipted: JetStream may forget them now
                if time.monotonic() >= next_checkpoint:
                    self.receiver.registry.refresh()  # status reports are judged by it, with or without workers
                    if self.leading.is_set():
                        self._leader_tick()
                    else:
                        self.refresh_miners()  # an ingest host judges the leader's final checkpoints by them
                    next_checkpoint = time.monotonic() + self.cfg.checkpoint_interval_s
                self._storage_ok()
            except self.ledger.transient_errors as exc:
                self._stop.wait(self._storage_failed(exc, len(retry)))
            except Exception:  # keep serving: agents resend what was not receipted
                retry = []
                log.exception("a batch failed; nothing from it was receipted")
        if not self.leading.is_set():
            return
        try:
            self.maybe_checkpoint()
        except self.ledger.transient_errors as exc:  # stopping anyway: the next start checkpoints
            self._storage_failed(exc, len(retry))

    def _follow_contracts(self, appended: Sequence[tuple[int, EventCandidate]] = ()) -> None:
        """Bring the contracts' replica up to the batch just committed and receipted. Left to the checkpoint
        tick, it replayed a whole interval's events at once while commits waited: the p99 of sign → receipt.
        A store error leaves it to the next batch or tick: the batch is committed and must not be retried."""
        if self.contracts is None or not self.leads:
            return  # an ingest host's gate catches up only when a batch holds a sale
        try:
            with self.ledger_lock:
                self.contracts.follow(self.ledger, appended)
        except self.ledger.transient_errors as exc:
            log.warning("the contracts could not read the batch just committed (%s); they catch up later",
                        str(exc).strip())

    def _leader_tick(self) -> None:
        """The lease holder's periodic duties, every checkpoint interval."""
        if self.evidence is not None and self.contracts is not None:
            self.evidence.drain(self.ledger, self.contracts, self.ledger_lock)
        if self.studies is not None and self.contracts is not None:
            self.studies.drain(self.ledger, self.contracts, self.ledger_lock)
        self.attest_deadlines()
        self.maybe_checkpoint()
        self.refresh_miners()
        self.record_final()

    def _storage_failed(self, exc: BaseException, pending: int) -> float:
        """Log and count a failed write to the ledger store; the seconds to wait before trying again."""
        self.stats.storage_errors += 1
        wait = self._storage_backoff.failed()
        log.error("cannot write the ledger %s: %s. %d event(s) wait, unreceipted (agents keep them); retrying in "
                  "%.1f s and resuming by itself. %s", self.ledger.describe(), str(exc).strip(), pending, wait,
                  self._storage_advice())
        return wait

    def _storage_advice(self) -> str:
        if isinstance(self.ledger.location, SqliteLocation):
            return (f"If the disk is full, free space on the filesystem of {self.ledger.path.parent}; if it is an "
                    "I/O error, check the disk (dmesg).")
        return ("Check that the PostgreSQL server is up, reachable from this host and has disk space; the "
                "connection is reopened by itself.")

    def _storage_ok(self) -> None:
        if self._storage_backoff.failures:
            log.warning("the ledger %s is writable again after %d failed attempt(s): anchoring resumed",
                        self.ledger.describe(), self._storage_backoff.failures)
            self._storage_backoff.failures = 0

    def process(self, batch: list[tuple[str, bytes]]) -> None:
        """Check, append and receipt one batch of raw (topic, payload) messages in this process."""
        self.sequence(self.receiver.check(batch))

    def sequence(self, verdicts: list[Verdict]) -> None:
        """The sequencer's half: guards, durable append (one transaction), then receipts."""
        now_ms = wall_clock_ms()
        self.stats.received += len(verdicts)
        batch = self.sequencer.sequence(verdicts, now_ms)
        crash_point("bridge.after_append")  # committed, no receipt out yet: agents must resend, we dedup
        self.stats.anchored += batch.anchored
        # Sign→receipt latency of the new leaves: committed now, receipted just below.
        self.stats.latency.observe_many([wall_clock_ms() - ts for ts in batch.anchored_ts],
                                        time.monotonic())
        if not self.leading.is_set():
            self.stats.ingest_host_anchored += batch.anchored
        self.stats.duplicates += batch.duplicates
        self.stats.unreceipted += batch.unreceipted
        for r in batch.rejections:
            self._count(r)
        self.stats.tree_size = self.ledger.size
        self.stats.batches += 1
        if self._client is not None:
            # An ingest host's final size is the leader's latest final checkpoint it saw (`_follow_finality`).
            final = None if self.finality is None else max(self.final_size(), 0)
            for device, rcpt in batch.receipts.items():
                for part in rcpt.split():
                    part.final_size = final  # leaves below it are final: the agent marks them so
                    if self._nats is not None:  # through whichever node of the cluster is up
                        self._nats.publish(topics.receipts(device), part.seal(self.log_key))
                    else:
                        self._client.publish(topics.receipts(device), part.seal(self.log_key), qos=1)
            if final is not None:
                with self._finality_lock:
                    for device, rcpt in batch.receipts.items():
                        if rcpt.ok:
                            highest = max(index for _, index in rcpt.ok)
                            self._awaiting_final[device] = max(highest, self._awaiting_final.get(device, -1))
        self._follow_contracts(batch.appended)

    def _count(self, r: Rejection) -> None:
        self.stats.rejected[str(r.reason)] += 1  # plain text: the counts are printed and serialised
        if r.reason == Reason.BAD_TOPIC:
            log.warning("rejected %s: %s", r.reason, r.detail)
        else:
            log.info("rejected %s from %s seq %s: %s", r.reason, r.device_id, r.seq, r.detail)

    def _publish_tiles(self, note: str, size: int) -> None:
        """Bring the tile directory up to this checkpoint. Tiles are a copy of the ledger for readers: a failure
        is logged and retried at the next checkpoint, and never stops anchoring."""
        if self.tiles is None:
            return
        try:
            with self.ledger_lock:
                self.tiles.publish(note, size, self.ledger.leaves)
        except Exception:
            log.exception("could not bring the tiles in %s up to the checkpoint at size %d; retrying at the "
                          "next checkpoint", self.tiles.directory, size)

    def maybe_checkpoint(self) -> str | None:
        """Sign a checkpoint if the log grew since the last one (by ingest, or by entries another process
        appended: an access grant on an idle log must still become final); publish it retained."""
        with self.ledger_lock:
            size = self.ledger.refresh()
        if size == self._last_checkpoint_size:
            return None
        with self.ledger_lock:
            note = self.ledger.issue_checkpoint(self.log_key, self.origin)
            self._last_checkpoint_size = self.ledger.size
        self._remember_checkpoint(note, self._last_checkpoint_size)
        self.stats.checkpoint_size, self.stats.checkpoint_ms = self._last_checkpoint_size, wall_clock_ms()
        self.stats.checkpoints += 1
        self.stats.checkpoints_issued += 1
        self._publish_tiles(note, self._last_checkpoint_size)
        if self.anchorer is not None:
            self.anchorer.offer(note, self._last_checkpoint_size)
        self._latest_note = note
        if self._client is not None:
            # QoS 0: retained for whoever subscribes, never queued for an offline device's session.
            self._client.publish(topics.CHECKPOINT, note.encode(), qos=0, retain=True)
        if self.contracts is not None:
            with self.ledger_lock:  # no batch in flight: the gate's state covers committed leaves only
                self.contracts.save_snapshot(self.ledger)  # restarts and aborts replay from here on
        return note
