"""The bridge service: MQTT in, verify, dedup, append in batches, receipts after commit, checkpoints.

Thin threaded shell around the sans-IO `Ingest` and the `Ledger`. Events are checked either in this
process (paho's thread enqueues, the worker thread checks) or, with `ingest_workers > 0`, by worker
processes on a shared subscription (chain_bridge.workers). Either way one sequencer thread commits each
batch in one transaction (group commit), then publishes receipts: a receipt is never sent for an event
that is not durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from carechain import topics
from carechain.checkpoint import NoteError, parse_note
from carechain.config import BridgeConfig, BrokerConfig
from carechain.cosignature import Cosigner
from carechain.crash_points import crash_point
from carechain.identity import Identity
from carechain.miner_messages import CosignatureMessage
from carechain.receipts import Receipt, Rejected
from carechain.transport import connect_client
from chain_bridge.finality import FinalityPolicy, FinalityTracker
from chain_bridge.ingest import Ingest, RateGuard, Rejection, SeqGuard
from chain_bridge.ledger.store import Appended, DeviceRecord, DeviceRevoked, EventCandidate, Ledger, Refused
from chain_bridge.proof_responder import ProofResponder

if TYPE_CHECKING:
    from chain_bridge.contract_gate import ContractGate
    from chain_bridge.workers import WorkerPool

log = logging.getLogger("carechain.bridge")
# Checkpoints whose cosignatures are still collected; miners cosign within a few intervals.
MAX_PENDING_CHECKPOINTS = 256


@dataclass
class BridgeStats:
    received: int = 0
    anchored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0
    tree_size: int = 0
    batches: int = 0
    final_checkpoints: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "received": self.received, "anchored": self.anchored, "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected),
            "checkpoints": self.checkpoints, "tree_size": self.tree_size, "batches": self.batches,
            "final_checkpoints": self.final_checkpoints,
        }


def default_origin(log_key: Identity) -> str:
    return f"carechain.log/{log_key.device_id}"


class Bridge:
    def __init__(self, cfg: BridgeConfig, broker: BrokerConfig, log_key: Identity, ledger: Ledger,
                 client_id: str = "carechain-bridge", contracts: ContractGate | None = None) -> None:
        self.cfg = cfg
        self.broker = broker
        self.log_key = log_key
        self.ledger = ledger
        self.origin = cfg.origin or default_origin(log_key)
        self.client_id = client_id
        # With contracts, every sale is checked before it is appended (docs/contracts.md); replay now.
        self.contracts = contracts
        if contracts is not None:
            contracts.catch_up(ledger)
        self.stats = BridgeStats(tree_size=ledger.size, checkpoints=ledger.checkpoint_count())
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._registry: dict[str, DeviceRecord] = {}
        self._registry_version = -1
        self._reload_registry()
        self._last_checkpoint_size = (ledger.latest_checkpoint() or (-1, ""))[0]
        self.ingest = Ingest(cfg.limits, self._lookup)
        self.seq_guard = SeqGuard(cfg.limits.max_seq_gap, ledger.last_seq)
        self.rate_guard = RateGuard(cfg.limits.max_events_per_s, cfg.limits.burst)
        self._pool: WorkerPool | None = None
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self.connected = threading.Event()
        # Held by the sequencer while it extends the ledger; miners' proof requests are answered from the
        # MQTT thread and must never read the in-memory tree mid-append.
        self.ledger_lock = threading.Lock()
        self.proofs = ProofResponder(ledger, None, self.ledger_lock)
        self.finality: FinalityTracker | None = None
        if cfg.finality_threshold:
            self.finality = FinalityTracker(FinalityPolicy(
                tuple(Cosigner(m.name, bytes.fromhex(m.public_key)) for m in cfg.miners), cfg.finality_threshold))
        self._finality_lock = threading.Lock()
        self._issued: dict[str, tuple[int, str]] = {}  # recent checkpoint body -> (tree size, note)
        self._last_final_size = -1

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        workers = self.cfg.ingest_workers
        if workers:
            from chain_bridge.workers import WorkerPool, WorkerSpec

            self._pool = WorkerPool([
                WorkerSpec(i, self.broker, self.ledger.path, self.cfg.limits, self.cfg.batch_max,
                           f"{self.client_id}-w{i}") for i in range(workers)])
            self._pool.start()
        # Miner topics are in the subscription list so that a reconnect re-subscribes them too.
        subscriptions = [] if workers else [(topics.EVENTS_WILDCARD, 1)]
        subscriptions.append((topics.MINER_REQUEST_WILDCARD, 1))
        if self.finality is not None:
            subscriptions.append((topics.MINER_COSIG_WILDCARD, 1))
        self._client = connect_client(
            self.broker, self.client_id, clean_session=False, on_message=self._on_message,
            subscriptions=subscriptions, connected=self.connected,
        )
        self.proofs.client = self._client
        self._worker = threading.Thread(target=self._run, name="bridge-sequencer", daemon=True)
        self._worker.start()

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
        if self._pool:
            self._pool.stop()
        if self._client:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_message(self, client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        miner = topics.miner_of_topic(msg.topic)
        if miner is None:
            self._inbox.put((msg.topic, msg.payload))
        elif miner[1] == "req":
            self.proofs.serve(client, msg)
        elif miner[1] == "cosig" and msg.payload:
            self._on_cosignature(msg.payload)

    # -- finality ------------------------------------------------------------------------------------

    def _on_cosignature(self, payload: bytes) -> None:
        """Count one miner's cosignature; publish the checkpoint, retained, once t-of-n cosigned it."""
        if self.finality is None:
            return
        try:
            m = CosignatureMessage.model_validate_json(payload)
            body, _ = parse_note(m.checkpoint)
            _, lines = parse_note(m.checkpoint + m.cosignature)
        except (ValidationError, NoteError) as exc:
            log.info("ignored a malformed cosignature: %s", exc)
            return
        with self._finality_lock:
            issued = self._issued.get(body)
            if issued is None or not self.finality.add(body, lines[-1]):
                return  # not a recent checkpoint of ours, not a valid registered cosigner, or already final
            size, note = issued
            final = self.finality.final_note(note)
            if final is None or size <= self._last_final_size:
                return
            self._last_final_size = size
            self.stats.final_checkpoints += 1
        if self._client is not None:
            self._client.publish(topics.FINAL_CHECKPOINT, final.encode(), qos=1, retain=True)

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
        next_checkpoint = time.monotonic()
        while not self._stop.is_set():
            timeout = min(0.2, max(0.001, next_checkpoint - time.monotonic()))
            try:
                if self._pool:
                    verdicts = self._drain_workers(timeout)
                    if verdicts:
                        self.sequence(verdicts)
                else:
                    batch = self._drain(timeout)
                    if batch:
                        self.process(batch)
            except Exception:  # keep serving: agents resend what was not receipted
                log.exception("a batch failed; nothing from it was receipted")
            if time.monotonic() >= next_checkpoint:
                self.maybe_checkpoint()
                next_checkpoint = time.monotonic() + self.cfg.checkpoint_interval_s
        self.maybe_checkpoint()

    def _drain(self, timeout: float) -> list[tuple[str, bytes]]:
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while len(batch) < self.cfg.batch_max:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.001)
        return batch

    def _drain_workers(self, timeout: float) -> list[object]:
        assert self._pool is not None
        try:
            verdicts = list(self._pool.results.get(timeout=timeout))
        except queue.Empty:
            return []
        while len(verdicts) < self.cfg.batch_max:
            try:
                verdicts.extend(self._pool.results.get_nowait())
            except queue.Empty:
                break
        return verdicts

    def process(self, batch: list[tuple[str, bytes]]) -> None:
        """Check, append and receipt one batch of raw (topic, payload) messages in this process."""
        if self.ledger.registry_version() != self._registry_version:
            self._reload_registry()  # `carechain register` or a revocation, possibly by another process
        now_ms = int(time.time() * 1000)
        verdicts: list[object] = []
        for topic, payload in batch:
            device = topics.device_of_event_topic(topic)
            verdicts.append(("bad_topic", topic[:100]) if device is None
                            else self.ingest.check(device, payload, now_ms))
        self.sequence(verdicts)

    def sequence(self, verdicts: list[object]) -> None:
        """The sequencer's half: seq limits, durable append (one transaction), then receipts."""
        now_ms = int(time.time() * 1000)
        receipts: dict[str, Receipt] = {}
        candidates: list[EventCandidate] = []
        charged: list[bool] = []  # took a rate token (given back if it turns out a duplicate)
        self.stats.received += len(verdicts)
        for v in verdicts:
            if isinstance(v, tuple):
                self.stats.rejected["bad_topic"] += 1
                log.warning("rejected bad_topic: %r is not a device event topic", v[1])
            elif isinstance(v, Rejection):
                self._reject(receipts, now_ms, v)
            elif (gap := self.seq_guard.check(v)) is not None:
                self._reject(receipts, now_ms, gap)
            elif (limited := self.rate_guard.check(v)) is None:
                candidates.append(v)
                charged.append(True)
            elif self.ledger.event_index(v.device_id, v.seq) is not None:  # a resend: re-ack it, no token
                candidates.append(v)
                charged.append(False)
            else:
                self._reject(receipts, now_ms, limited)
        with self.ledger_lock:  # miners' proof requests read the tree from the MQTT thread
            # Only a batch holding a sale pays for the contracts; the gate catches up on the rest then.
            gate = self.contracts if self.contracts and any(c.kind == "purchase" for c in candidates) else None
            results = self.ledger.append_events(candidates, gate) if candidates else []
        for cand, result, took in zip(candidates, results, charged, strict=True):
            rcpt = receipts.setdefault(cand.device_id, Receipt(cand.device_id, now_ms))
            if isinstance(result, Appended):
                rcpt.ok.append((cand.seq, result.index))
                if result.duplicate:
                    self.stats.duplicates += 1
                    if took:
                        self.rate_guard.refund(cand.device_id)
                else:
                    self.stats.anchored += 1
                    self.seq_guard.anchored(cand)
            elif isinstance(result, Refused):
                where = "nothing appended" if result.index is None else f"recorded at leaf {result.index}"
                self._reject(receipts, now_ms, Rejection(
                    cand.device_id, cand.seq, f"contract:{result.reason}",
                    f"the contracts refuse this sale ({result.reason}); {where}", cand.digest))
                if result.index is not None:
                    self.seq_guard.anchored(cand)
            elif isinstance(result, DeviceRevoked):
                self._reject(receipts, now_ms, Rejection(
                    cand.device_id, cand.seq, "revoked", f"device revoked at leaf {result.index}", cand.digest))
            else:
                self._reject(receipts, now_ms, Rejection(
                    cand.device_id, cand.seq, "seq_reused",
                    f"seq {cand.seq} is already anchored at leaf {result.index} with different content",
                    cand.digest))
        crash_point("bridge.after_append")  # committed, no receipt out yet: agents must resend, we dedup
        self.stats.tree_size = self.ledger.size
        self.stats.batches += 1
        if self._client is not None:
            for device, rcpt in receipts.items():
                for part in rcpt.split():
                    self._client.publish(topics.receipts(device), part.seal(self.log_key), qos=1)

    def _reject(self, receipts: dict[str, Receipt], now_ms: int, r: Rejection) -> None:
        self.stats.rejected[r.reason] += 1
        log.info("rejected %s from %s seq %s: %s", r.reason, r.device_id, r.seq, r.detail)
        if r.device_id is not None:
            receipts.setdefault(r.device_id, Receipt(r.device_id, now_ms)).rejected.append(
                Rejected(r.seq, r.reason, r.detail, r.retryable, r.digest))

    def maybe_checkpoint(self) -> str | None:
        """Sign a checkpoint if the log grew since the last one; publish it retained."""
        if self.ledger.size == self._last_checkpoint_size:
            return None
        with self.ledger_lock:
            note = self.ledger.issue_checkpoint(self.log_key, self.origin)
            self._last_checkpoint_size = self.ledger.size
        self._remember_checkpoint(note, self._last_checkpoint_size)
        self.stats.checkpoints += 1
        if self._client is not None:
            self._client.publish(topics.CHECKPOINT, note.encode(), qos=1, retain=True)
        return note

    # -- registry and seq hints ----------------------------------------------------------------------

    def _lookup(self, device_id: str) -> DeviceRecord | None:
        return self._registry.get(device_id)

    def _reload_registry(self) -> None:
        self._registry_version = self.ledger.registry_version()
        self._registry = self.ledger.devices()

