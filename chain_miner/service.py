"""The miner process: follows the log's checkpoints over MQTT, fetches proofs and entries, cosigns or
publishes evidence. Thin shell around the sans-IO `Witness` (the bridge's half, answering proof requests,
is `chain_bridge.proof_responder`).

Order matters for safety: the new witness state is written (atomically, fsynced) *before* the
cosignature is published, so a miner restarted at any point never cosigns a view inconsistent with one
it already vouched for.

Run one with `carechain miner` (assembled from config by `chain_miner.assembly`).
"""

from __future__ import annotations

import importlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from carechain import miner_messages as messages
from carechain import topics
from carechain.config import BrokerConfig
from carechain.cosignature import Cosigner
from carechain.files import PUBLIC, write_atomic
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from carechain.transport import connect_client
from chain_miner.witness import (
    Cosigned,
    CosignRefused,
    EntryVerifier,
    ProofRequest,
    Witness,
    WitnessState,
    verify_entries,
)

if TYPE_CHECKING:
    from contract_rules import Genesis

log = logging.getLogger("carechain.miner")
STATE_FILE = "witness.json"
STATE_VERSION = 1


class StateError(Exception):
    """The miner's state file is unreadable; it is never silently reset (that would forget a view)."""


def load_state(path: Path) -> WitnessState:
    """The persisted witness state, or the empty tree's when the file does not exist yet."""
    if not path.exists():
        return WitnessState(origin=None)
    try:
        raw = json.loads(path.read_text())
        if raw.get("v") != STATE_VERSION:
            raise StateError(f"{path}: state version {raw.get('v')!r}, this miner reads {STATE_VERSION}")
        return WitnessState(raw["origin"], int(raw["tree_size"]), bytes.fromhex(raw["root_hash"]), raw["note"],
                            tuple(bytes.fromhex(h) for h in raw["frontier"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: miner state is damaged ({exc}); restore it from a backup — deleting it "
                         "would let this miner cosign a fork of what it already cosigned") from None


def save_state(path: Path, state: WitnessState) -> None:
    data = {"v": STATE_VERSION, "origin": state.origin, "tree_size": state.tree_size,
            "root_hash": state.root_hash.hex(), "note": state.note, "frontier": [h.hex() for h in state.frontier]}
    write_atomic(path, json.dumps(data, indent=1).encode(), PUBLIC)


class WitnessMiner:
    """One witness miner: own key, own data dir, one witness state for the log whose key it is given."""

    def __init__(self, data_dir: Path, broker_cfg: BrokerConfig, log_public_key: bytes, miner_key: Identity, *,
                 name: str | None = None, entry_verifier: EntryVerifier = verify_entries,
                 request_timeout_s: float = 10.0, verifier_size: Callable[[], int] | None = None) -> None:
        """`verifier_size`: for an entry verifier that keeps state from leaf 0 (the contracts'
        `ContractWitness`), how many leaves it has seen; before judging, the miner replays into it the
        tree it already cosigned (fetched from the log and checked against that tree's root)."""
        self.data_dir = Path(data_dir)
        self.broker = broker_cfg
        self.id = miner_key.device_id
        self.cosigner = Cosigner(name or f"carechain.miner/{self.id}", miner_key.public_key)
        self.state_path = self.data_dir / STATE_FILE
        self.witness = Witness(self.cosigner, miner_key.sign, log_public_key, load_state(self.state_path),
                               entry_verifier)
        self.request_timeout_s = request_timeout_s
        self.entry_verifier = entry_verifier
        self.verifier_size = verifier_size
        self.stats: Counter[str] = Counter()
        self.connected = threading.Event()
        self._notes: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[messages.ProofResponseMessage] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        self._client = connect_client(
            self.broker, f"carechain-miner-{self.id}", on_message=self._on_message, connected=self.connected,
            subscriptions=[(topics.CHECKPOINT, 1), (messages.response(self.id), 1)])
        self._worker = threading.Thread(target=self._run, name=f"miner-{self.id}", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker:
            self._worker.join(timeout=10)
        if self._client:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.CHECKPOINT:
            if msg.payload:  # an empty retained message clears the topic
                self._notes.put(msg.payload.decode("utf-8", errors="replace"))
            return
        try:
            self._responses.put(messages.ProofResponseMessage.model_validate_json(msg.payload))
        except ValidationError as exc:
            log.warning("miner %s: malformed proof response: %s", self.id, exc.errors()[:1])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                note = self._notes.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(note)
            except Exception:  # keep following the log; the next checkpoint is judged afresh
                log.exception("miner %s: judging a checkpoint failed", self.id)

    def handle(self, note: str) -> Cosigned | CosignRefused | None:
        """Judge one checkpoint note: fetch what is needed, decide, persist, publish."""
        if not self._replay_cosigned():
            return None
        plan = self.witness.plan(note)
        if isinstance(plan, CosignRefused):
            return self._refused(plan)
        resp = self._fetch(plan)
        if resp is None:
            self.stats["no_response"] += 1
            log.warning("miner %s: no proof for %d → %d; will judge the next checkpoint", self.id,
                        plan.old_size, plan.new_size)
            return None
        try:
            path = [bytes.fromhex(h) for h in resp.consistency_path]
            entries = [bytes.fromhex(e) for e in resp.entries]
        except ValueError:
            self.stats["bad_response"] += 1
            return None
        decision = self.witness.observe(note, path, entries, int(time.time()))
        if isinstance(decision, CosignRefused):
            return self._refused(decision)
        save_state(self.state_path, decision.state)  # before the cosignature leaves this process
        self.stats["cosigned"] += 1
        msg = messages.CosignatureMessage(miner=self.cosigner.name, public_key=self.cosigner.public_key.hex(),
                                          tree_size=decision.checkpoint.tree_size, checkpoint=note,
                                          cosignature=decision.cosignature.line())
        self._publish(messages.cosignature(self.id), msg.model_dump_json().encode())
        return decision

    def _replay_cosigned(self) -> bool:
        """Bring a stateful entry verifier up to the cosigned tree; False when the log did not serve it."""
        if self.verifier_size is None:
            return True
        done, cosigned = self.verifier_size(), self.witness.state.tree_size
        if done >= cosigned:
            return True
        if done != 0:
            raise StateError(f"the entry verifier is at leaf {done}, the cosigned tree at {cosigned}")
        entries: list[bytes] = []
        while len(entries) < cosigned:
            hi = min(cosigned, len(entries) + messages.MAX_ENTRIES_PER_RESPONSE)
            resp = self._fetch(ProofRequest(len(entries), hi))
            if resp is None or len(resp.entries) != hi - len(entries):
                self.stats["no_replay"] += 1
                log.warning("miner %s: could not fetch leaves %d..%d to replay the contracts; retrying with the "
                            "next checkpoint", self.id, len(entries), hi - 1)
                return False
            entries.extend(bytes.fromhex(e) for e in resp.entries)
        if MerkleTree(leaf_hash(e) for e in entries).root() != self.witness.state.root_hash:
            self.stats["bad_replay"] += 1
            log.warning("miner %s: the served leaves 0..%d are not the tree it cosigned", self.id, cosigned - 1)
            return False
        violation = self.entry_verifier(0, cosigned, entries)
        if violation is not None:  # only if the contract code or genesis changed under this miner
            raise StateError(f"replaying the cosigned tree ({cosigned} leaves) breaks a contract rule at leaf "
                             f"{violation.leaf_index}: {violation.rule}; check the genesis file")
        log.info("miner %s: replayed %d cosigned leaves into the contracts", self.id, cosigned)
        return True

    def _refused(self, r: CosignRefused) -> CosignRefused:
        self.stats[f"refused_{r.reason}"] += 1
        log.log(logging.WARNING if r.evidence else logging.INFO, "miner %s refused: %s: %s", self.id, r.reason,
                r.detail)
        if r.evidence is not None:
            self._publish(messages.evidence(self.id), r.evidence.model_dump_json().encode())
        return r

    def _fetch(self, plan: ProofRequest) -> messages.ProofResponseMessage | None:
        if self._client is None:
            return None
        while True:  # drop late answers to earlier requests
            try:
                self._responses.get_nowait()
            except queue.Empty:
                break
        req = messages.ProofRequestMessage(id=uuid.uuid4().hex, old_size=plan.old_size, new_size=plan.new_size)
        self._client.publish(messages.request(self.id), req.model_dump_json().encode(), qos=1)
        deadline = time.monotonic() + self.request_timeout_s
        while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
            try:
                resp = self._responses.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if resp.id == req.id:
                if resp.error:
                    log.warning("miner %s: the log could not prove %d → %d: %s", self.id, plan.old_size,
                                plan.new_size, resp.error)
                    return None
                return resp
        return None

    def _publish(self, topic: str, payload: bytes) -> None:
        if self._client is not None:
            self._client.publish(topic, payload, qos=1, retain=True)


def load_entry_verifier(spec: str) -> EntryVerifier:
    """The hook named `module:function` (e.g. the contract runtime's), imported by name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--entry-verifier {spec!r} must be MODULE:FUNCTION")
    func = getattr(importlib.import_module(module_name), attr, None)
    if not callable(func):
        raise ValueError(f"--entry-verifier: {module_name} has no function {attr}")
    return func


def contract_verifier(genesis: Genesis) -> tuple[EntryVerifier, Callable[[], int]]:
    """Contract re-execution as the miner's entry verifier, and how many leaves it has replayed (see `WitnessMiner`)."""
    from contract_rules import ContractWitness

    witness = ContractWitness(genesis)
    return witness, lambda: witness.state.size
