"""The miner process: follows the log's checkpoints over MQTT, fetches proofs and entries, cosigns or
publishes evidence. Thin shell around the sans-IO `Witness` (the bridge's half, answering proof requests,
is `chain_bridge.proof_responder`). With `miner.tiles_url` the proofs, entries and checkpoints come from the
log's tiles over HTTP instead, the bridge asked only when they cannot serve (`chain_miner.tile_feed`).

Order matters for safety: the new witness state is written (atomically, fsynced) *before* the
cosignature is published, so a miner restarted at any point never cosigns a view inconsistent with one
it already vouched for.

Trust (docs/miners.md "Signed messages"): the miner acts only on proof answers the log key signed — an
answer from anyone else on its response topic is dropped, never judged — and signs everything it
publishes (hello, cosignatures, evidence) with its own key. Its hello is retained, and its last will
empties it, so a miner that dies disappears from discovery.

Run one with `carechain miner` (assembled from config by `chain_miner.assembly`).
"""

from __future__ import annotations

import importlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from carechain import miner_messages as messages
from carechain import topics
from carechain.config import BrokerConfig
from carechain.cosignature import Cosigner
from carechain.evidence import Evidence, EvidenceError, EvidenceKind, shrink_violation, verify_evidence
from carechain.files import PUBLIC, write_atomic
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from carechain.proofs import VerificationError, verify_checkpoint
from carechain.tile_client import TileFetchError
from carechain.transport import connect_client
from chain_miner.witness import (
    Cosigned,
    CosignRefused,
    EntryVerifier,
    ProofRequest,
    RefusalReason,
    Witness,
    WitnessState,
    verify_entries,
)

if TYPE_CHECKING:
    from carechain.evidence import Violation

if TYPE_CHECKING:
    from chain_miner.reencryptor import AccessReleaser, Reencryptor
    from chain_miner.snapshots import MinerSnapshots
    from chain_miner.study_runner import StudyRunner
    from chain_miner.tile_feed import TileFeed
    from chain_miner.trial_runner import TrialRunner
    from contract_rules import ContractWitness, Genesis, Replica

log = logging.getLogger("carechain.miner")
STATE_FILE = "witness.json"
STATE_VERSION = 1
MAX_RATE_RETRIES = 20  # asked to come back later this many times in a row: give up until the next checkpoint


MAX_VOID_EVIDENCE = 16  # void leaves reported per cosigned range; the ledger's `void` table lists them all
TILES_POLL_S = 1.0  # with `miner.tiles_url`: how often the served checkpoint is read
# Refusals that may be the tile server's fault, not the log's: asked again of the bridge. (A violation is not:
# the witness checked the entries against the signed root before running them.)
_TILE_REFUSALS = frozenset({RefusalReason.FORK, RefusalReason.BAD_ENTRIES, RefusalReason.BAD_RESPONSE})


@dataclass(frozen=True)
class Fetched:
    """What judging a move between two tree sizes needs, from the bridge (with its signed attestation of the
    path) or from the log's tiles (`proof` None: tiles are not signed, so they never make evidence)."""

    consistency_path: list[bytes]
    entries: list[bytes]
    proof: messages.ProofAttestation | None


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
    write_atomic(path, json.dumps(data, indent=1).encode())  # 0600, like everything in a data dir


class WitnessMiner:
    """One witness miner: own key, own data dir, one witness state for the log whose key it is given."""

    def __init__(self, data_dir: Path, broker_cfg: BrokerConfig, log_public_key: bytes, miner_key: Identity, *,
                 name: str | None = None, entry_verifier: EntryVerifier = verify_entries,
                 request_timeout_s: float = 10.0, verifier_size: Callable[[], int] | None = None,
                 replica: Replica | None = None, reencryptor: Reencryptor | None = None,
                 tiles: TileFeed | None = None) -> None:
        """`verifier_size`: for an entry verifier that keeps state from leaf 0 (the contracts'
        `ContractWitness`), how many leaves it has seen; before judging, the miner replays into it the
        tree it already cosigned (fetched from the log and checked against that tree's root).

        `replica`: that verifier's contract state. With it the miner also serves the access grants that
        name it (`chain_miner.reencryptor`), through `reencryptor` (default: one for this miner's key); and
        when it is the entry verifier (a `ContractWitness`), the miner keeps contract snapshots in its data
        dir (`chain_miner.snapshots`), so a restart replays only the leaves after the newest one.

        `tiles` (`miner.tiles_url`): read proofs and entries from the log's tiles over HTTP, and its checkpoint
        every TILES_POLL_S, asking the bridge over MQTT only when the tiles cannot serve (`chain_miner.tile_feed`)."""
        self.data_dir = Path(data_dir)
        self.broker = broker_cfg
        self.id = miner_key.device_id
        self._key = miner_key
        self.cosigner = Cosigner(name or f"carechain.miner/{self.id}", miner_key.public_key)
        self.state_path = self.data_dir / STATE_FILE
        self.witness = Witness(self.cosigner, miner_key.sign, log_public_key, load_state(self.state_path),
                               entry_verifier)
        self.request_timeout_s = request_timeout_s
        self.entry_verifier = entry_verifier
        self.verifier_size = verifier_size
        self.tiles = tiles
        self._polled_note: str | None = None
        self.stats: Counter[str] = Counter()
        self.log_size = 0  # the largest tree size of a checkpoint the log key signed, heard of (metrics: lag)
        self.connected = threading.Event()
        self.ever_connected = threading.Event()  # `connected` is cleared at every disconnect (and at stop)
        self._notes: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()  # (topic, note)
        self._responses: queue.SimpleQueue[messages.ProofResponseMessage] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self.access: AccessReleaser | None = None
        self.snapshots: MinerSnapshots | None = None
        self._hello_due = threading.Event()  # set at every (re)connect; the worker publishes the hello
        self._hello_json = b""  # the signed hello it publishes (made again when the MPC certificate is renewed)
        # The data-market work of the studies this miner aggregates (`chain_miner.study_runner`); set by
        # `chain_miner.assembly` before `start` when `miner.mpc_listen` is.
        self.studies: StudyRunner | None = None
        # A labelling miner's part of the clinical trials it is drawn for (`chain_miner.trial_runner`); set by
        # `chain_miner.assembly` whenever the miner re-executes the contracts (no MPC port needed).
        self.trials: TrialRunner | None = None
        if replica is not None:
            from chain_miner.reencryptor import DONE_FILE, AccessReleaser, Reencryptor, load_done
            from chain_miner.snapshots import MinerSnapshots
            from contract_rules import ContractWitness

            if isinstance(replica, ContractWitness) and replica is entry_verifier:
                self.snapshots = MinerSnapshots(self.data_dir, replica)

            core = reencryptor or Reencryptor(
                miner_key, log_public_key, load_done(self.data_dir / DONE_FILE), stats=self.stats,
                max_message_bytes=messages.payload_budget(broker_cfg.max_packet_bytes, topics.party_inbox("a" * 16)))
            self.access = AccessReleaser(core, self.data_dir, lambda: replica.state, self._leaves, self._publish_once)

    def hello(self) -> messages.MinerHello:
        """This miner's signed announcement."""
        return messages.MinerHello(miner=self.id, name=self.cosigner.name, public_key=self.cosigner.public_key.hex(),
                                   ts=int(time.time() * 1000),
                                   mpc=self.studies.mpc_listen if self.studies is not None else None,
                                   mpc_cert=self.studies.tls.cert_pem if self.studies is not None else None,
                                   ).signed(self._key)

    def start(self) -> None:
        subscriptions = [(topics.CHECKPOINT, 1), (messages.response(self.id), 1)]
        if self.access is not None:  # finality, counted by this miner itself (chain_miner.reencryptor)
            subscriptions += [(topics.FINAL_CHECKPOINT, 1), (topics.MINER_COSIG_WILDCARD, 1)]
        if self.studies is not None:  # the other aggregators' MPC addresses, from their signed hellos
            subscriptions += [(messages.MINER_HELLO_WILDCARD, 1)]
            self.studies.start()
        if self.snapshots is not None:
            restored = self.snapshots.restore(self.witness.state)
            if restored:
                log.info("miner %s: contract state restored at leaf %d from %s", self.id, restored,
                         self.snapshots.path)

        def on_state(_client: mqtt.Client, up: bool) -> None:
            if up:  # (again) after every reconnect: the will may have emptied the topic meanwhile
                self.ever_connected.set()
                self._hello_due.set()

        self._client = connect_client(
            self.broker, f"carechain-miner-{self.id}", on_message=self._on_message, connected=self.connected,
            subscriptions=subscriptions, on_state=on_state, will=(messages.hello(self.id), b""))
        self._worker = threading.Thread(target=self._run, name=f"miner-{self.id}", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker:
            self._worker.join(timeout=10)
        if self.studies is not None:
            self.studies.stop()
        if self.snapshots is not None and not (self._worker and self._worker.is_alive()):
            self.snapshots.save(self.witness.state)  # the next start replays nothing it already judged
        if self._client:
            if self._client.is_connected():  # a clean stop says goodbye itself (the will fires only on a loss)
                self._client.publish(messages.hello(self.id), b"", qos=1, retain=True).wait_for_publish(5)
            self._client.disconnect()
            self._client.loop_stop()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic in (topics.CHECKPOINT, topics.FINAL_CHECKPOINT):
            if msg.payload:  # an empty retained message clears the topic
                note = msg.payload.decode("utf-8", errors="replace")
                if msg.topic == topics.CHECKPOINT:
                    self._heard(note)
                self._notes.put((msg.topic, note))
            return
        miner = topics.miner_of_topic(msg.topic)
        if miner is not None and miner[1] == "hello" and self.studies is not None:
            self._on_hello(miner[0], bytes(msg.payload))
            return
        if miner is not None and miner[1] == "cosig":  # another miner's line: finality counted here too
            if msg.payload:
                try:
                    cosig = messages.CosignatureMessage.model_validate_json(msg.payload)
                except ValidationError:
                    return
                if not messages.from_miner(cosig, miner[0]):
                    self.stats["unsigned_cosignature"] += 1
                    return
                self._notes.put((topics.FINAL_CHECKPOINT, cosig.checkpoint + cosig.cosignature))
            return
        if miner != (self.id, "resp"):
            return
        try:
            self._responses.put(messages.ProofResponseMessage.model_validate_json(msg.payload))
        except ValidationError as exc:
            log.warning("miner %s: malformed proof response: %s", self.id, exc.errors()[:1])

    def _heard(self, note: str) -> None:
        """Note the log's size from a checkpoint as it arrives, judged or not: how far behind the log this miner
        is shows even while its worker is busy (metrics)."""
        try:
            size = verify_checkpoint(note, self.witness.log_public_key).tree_size
        except VerificationError:
            return  # not the log's: judged (and refused) by the worker
        self.log_size = max(self.log_size, size)

    def alive(self) -> bool:
        """Whether the worker that judges checkpoints is running (the systemd watchdog's health check)."""
        return self._worker is not None and self._worker.is_alive()

    def _on_hello(self, miner: str, payload: bytes) -> None:
        """Another miner's hello (empty: it left): its MPC address and certificate, only from a hello its own key
        signed."""
        assert self.studies is not None
        if not payload:
            self.studies.on_hello(miner, None, None)
            return
        try:
            hello = messages.MinerHello.model_validate_json(payload)
        except ValidationError:
            self.stats["bad_hello"] += 1
            return
        if not messages.from_miner(hello, miner):
            self.stats["unsigned_hello"] += 1
            return
        self.studies.on_hello(miner, hello.mpc, hello.mpc_cert)

    def _run(self) -> None:
        self._hello_json = self.hello().model_dump_json().encode()
        next_poll = 0.0
        while not self._stop.is_set():
            if self._hello_due.is_set():
                self._hello_due.clear()
                self._publish(messages.hello(self.id), self._hello_json)
            if self.tiles is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + TILES_POLL_S
                self._poll_tiles()
            try:
                topic, note = self._notes.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if topic == topics.CHECKPOINT:
                    self.handle(note)
                elif self.access is not None:
                    self.access.on_note(note)
            except Exception:  # keep following the log; the next checkpoint is judged afresh
                log.exception("miner %s: handling %s failed", self.id, topic)

    def _poll_tiles(self) -> None:
        """Queue the checkpoint the tile server serves when it is newer than the cosigned tree (the same note the
        bridge publishes on MQTT: whichever comes first is judged)."""
        assert self.tiles is not None
        if not self.tiles.available():
            return
        try:
            cp, note = self.tiles.checkpoint()
        except TileFetchError as exc:
            self.stats["tiles_unavailable"] += 1
            if self.stats["tiles_unavailable"] & (self.stats["tiles_unavailable"] - 1) == 0:
                log.warning("miner %s: reading the checkpoint from the tiles failed (%d so far): %s", self.id,
                            self.stats["tiles_unavailable"], exc)
            return
        self.log_size = max(self.log_size, cp.tree_size)
        if cp.tree_size > self.witness.state.tree_size and note != self._polled_note:
            self._polled_note = note
            self._notes.put((topics.CHECKPOINT, note))

    def handle(self, note: str) -> Cosigned | CosignRefused | None:
        """Judge one checkpoint note: fetch what is needed, decide, persist, publish."""
        if not self._replay_cosigned():
            return None
        plan = self.witness.plan(note)
        if isinstance(plan, CosignRefused):
            return self._refused(plan)
        fetched = self._fetch(plan)
        if fetched is None:
            self.stats["no_response"] += 1
            log.warning("miner %s: no proof for %d → %d; will judge the next checkpoint", self.id,
                        plan.old_size, plan.new_size)
            return None
        before = self.witness.state
        now = int(time.time())
        decision = self.witness.observe(note, fetched.consistency_path, fetched.entries, now, fetched.proof)
        if isinstance(decision, CosignRefused) and fetched.proof is None and decision.reason in _TILE_REFUSALS:
            # Tiles are unsigned: what they failed to prove is asked of the bridge, whose answer can be evidence.
            assert self.tiles is not None
            self.tiles.failed()
            self.stats["tiles_refused"] += 1
            log.warning("miner %s: the tiles did not prove %d → %d (%s); asking the bridge", self.id,
                        plan.old_size, plan.new_size, decision.detail)
            fetched = self._fetch_from_bridge(plan)
            if fetched is None:
                self.stats["no_response"] += 1
                return None
            decision = self.witness.observe(note, fetched.consistency_path, fetched.entries, now, fetched.proof)
        if isinstance(decision, CosignRefused):
            return self._refused(decision)
        entries = fetched.entries
        save_state(self.state_path, decision.state)  # before the cosignature leaves this process
        if self.snapshots is not None:
            self.snapshots.after_cosign(decision.state)
        self.stats["cosigned"] += 1
        msg = messages.CosignatureMessage(miner=self.cosigner.name, public_key=self.cosigner.public_key.hex(),
                                          tree_size=decision.checkpoint.tree_size, checkpoint=note,
                                          cosignature=decision.cosignature.line()).signed(self._key)
        self._publish(messages.cosignature(self.id), msg.model_dump_json().encode())
        if decision.state.tree_size > before.tree_size:
            self._report_voids(before, note, entries, now)
        if self.access is not None and decision.state.tree_size > before.tree_size:
            self.access.after_cosign(before.tree_size, before.frontier, entries)
        grown = decision.state.tree_size > before.tree_size
        self._study_jobs(entries if grown else [])
        self._trial_jobs(before.tree_size, entries if grown else [])
        return decision

    def _study_jobs(self, entries: list[bytes]) -> None:
        """Hand the cosigned entries to the study runner: what its studies need now (never fails the cosign)."""
        if self.studies is None:
            return
        try:
            if self.studies.renew_tls():  # its peers learn the new certificate from the new hello
                self._hello_json = self.hello().model_dump_json().encode()
                self._hello_due.set()
            self.studies.after_cosign(entries)
        except Exception:
            log.exception("miner %s: planning the study jobs failed; trying again at the next checkpoint", self.id)

    def _trial_jobs(self, first: int, entries: list[bytes]) -> None:
        """Hand the cosigned entries (leaves `first`…) to the trial runner, which does what its trials need now
        (never fails the cosign)."""
        if self.trials is None:
            return
        try:
            self.trials.after_cosign(first, entries)
        except Exception:
            log.exception("miner %s: the trial jobs failed; trying again at the next checkpoint", self.id)

    def publish_entry(self, entry: bytes, timeout: float = 10.0) -> bool:
        """Send one signed entry to the bridge on this miner's study topic over the miner's own session (QoS 1,
        not retained): what a labelling miner's trial entries travel on. True once the broker took it."""
        client = self._client
        if client is None or not client.is_connected():
            return False
        info = client.publish(topics.miner_study(self.id), entry, qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            log.warning("miner %s: publishing an entry on its study topic failed: %s", self.id, exc)
            return False
        return info.is_published()

    def cosigned_leaves(self) -> list[bytes] | None:
        """Every leaf of the tree this miner cosigned, from the log, proven against that tree's root; None when
        the log did not serve them or served others (what the audits read the anchored data from)."""
        cosigned = self.witness.state
        leaves = self._leaves(0, cosigned.tree_size)
        if leaves is None:
            return None
        if MerkleTree(leaf_hash(e) for e in leaves).root() != cosigned.root_hash:
            self.stats["bad_leaves"] += 1
            log.warning("miner %s: the served leaves 0..%d are not the tree it cosigned", self.id,
                        cosigned.tree_size - 1)
            return None
        return leaves

    def _report_voids(self, before: WitnessState, note: str, entries: list[bytes], now: int) -> None:
        """Publish evidence of the void leaves the contracts found in a range just cosigned: a void leaf changes
        no contract state, so the log goes on finalizing, but an honest operator never appends one."""
        voids: list[Violation] = list(getattr(self.entry_verifier, "voids", None) or ())
        for void in voids[:MAX_VOID_EVIDENCE]:
            self.stats["void_evidence"] += 1
            log.warning("miner %s: leaf %d is void (%s): publishing evidence", self.id, void.leaf_index, void.rule)
            payload = self._evidence_payload(self.witness.void_evidence(before, note, entries, void, now), before)
            if payload is not None:
                self.stats["evidence_published"] += 1
                self._publish(messages.evidence(self.id), payload)

    def _replay_cosigned(self) -> bool:
        """Bring a stateful entry verifier up to the cosigned tree; False when the log did not serve it."""
        if self.snapshots is not None:
            return self._catch_up(self.snapshots)
        if self.verifier_size is None:
            return True
        done, cosigned = self.verifier_size(), self.witness.state.tree_size
        if done >= cosigned:
            return True
        if done != 0:
            raise StateError(f"the entry verifier is at leaf {done}, the cosigned tree at {cosigned}")
        entries = self._leaves(0, cosigned)
        if entries is None:
            self.stats["no_replay"] += 1
            log.warning("miner %s: could not fetch leaves 0..%d to replay the contracts; retrying with the next "
                        "checkpoint", self.id, cosigned - 1)
            return False
        if MerkleTree(leaf_hash(e) for e in entries).root() != self.witness.state.root_hash:
            self.stats["bad_replay"] += 1
            log.warning("miner %s: the served leaves 0..%d are not the tree it cosigned", self.id, cosigned - 1)
            return False
        violation = self.entry_verifier(0, cosigned, entries)
        if violation is not None:  # only if the contract code or genesis changed under this miner
            raise StateError(f"replaying the cosigned tree ({cosigned} leaves) breaks a contract rule at leaf "
                             f"{violation.leaf_index}: {violation.rule}; check the genesis file")
        log.info("miner %s: replayed %d cosigned leaves into the contracts", self.id, cosigned)
        if self.access is not None:
            self.access.after_cosign(0, (), entries)
        self._study_jobs(entries)
        self._trial_jobs(0, entries)
        return True

    def _catch_up(self, snapshots: MinerSnapshots) -> bool:
        """`_replay_cosigned` from the contract snapshot: only the cosigned leaves after it are fetched."""
        from chain_miner.snapshots import ContractReplayError

        cosigned = self.witness.state
        if snapshots.witness.size == cosigned.tree_size:
            return True
        try:
            tail = snapshots.catch_up(cosigned, self._leaves)
        except ContractReplayError as exc:
            raise StateError(str(exc)) from None
        if tail is None:
            self.stats["no_replay"] += 1
            log.warning("miner %s: could not replay the cosigned leaves into the contracts; retrying with the next "
                        "checkpoint", self.id)
            return False
        log.info("miner %s: replayed %d cosigned leaves into the contracts (re-executed from leaf %d)", self.id,
                 len(tail.entries), tail.old_size)
        if self.access is not None and tail.entries:
            self.access.after_cosign(tail.old_size, tail.old_frontier, tail.entries)
        if tail.entries:
            self._study_jobs(tail.entries)
            self._trial_jobs(tail.old_size, tail.entries)
        return True

    def _refused(self, r: CosignRefused) -> CosignRefused:
        self.stats[f"refused_{r.reason}"] += 1
        log.log(logging.WARNING if r.evidence else logging.INFO, "miner %s refused: %s: %s", self.id, r.reason,
                r.detail)
        if r.evidence is not None:
            payload = self._evidence_payload(r.evidence, self.witness.state)  # a refusal leaves the state as it was
            if payload is not None:
                self.stats["evidence_published"] += 1
                self._publish(messages.evidence(self.id), payload)
        return r

    def _evidence_payload(self, ev: Evidence, before: WitnessState) -> bytes | None:
        """`ev`, signed by this miner, as one packet under the broker's limit: a violation over many entries
        (its range starting at `before`) is cut after the violating leaf (with the log's proof that the prefix
        is its tree's); what still does not fit is kept in DATA_DIR/evidence/ and logged, never queued for a
        broker that would refuse it."""
        budget = messages.payload_budget(self.broker.max_packet_bytes, messages.evidence(self.id))
        ev = ev.model_copy(update={"miner_key": self.cosigner.public_key.hex()}).signed(self._key)
        payload = ev.model_dump_json().encode()
        if len(payload) <= budget:
            return payload
        old_size = before.tree_size
        new_size = old_size + len(ev.entries)
        if (ev.kind in (EvidenceKind.VIOLATION, EvidenceKind.VOID) and ev.violation_leaf is not None
                and ev.violation_leaf + 1 < new_size):
            proof = self._ask(new_size, ev.violation_leaf + 1)  # the proof (leaf + 1) → new; no entries
            try:
                if proof is not None:
                    shrunk = shrink_violation(ev, old_size, [bytes.fromhex(h) for h in proof.consistency_path])
                    verify_evidence(shrunk, self.witness.log_public_key)
                    payload = shrunk.signed(self._key).model_dump_json().encode()
                    if len(payload) <= budget:
                        self.stats["evidence_shrunk"] += 1
                        return payload
            except (ValueError, EvidenceError) as exc:
                log.warning("miner %s: the log's proof for shortened evidence does not verify: %s", self.id, exc)
        kept = self.data_dir / "evidence" / f"{ev.kind}-{new_size}.json"
        kept.parent.mkdir(exist_ok=True)
        write_atomic(kept, ev.model_dump_json().encode(), PUBLIC)
        self.stats["evidence_unsent"] += 1
        log.error("miner %s: %s evidence for tree size %d is %d bytes, above broker.max_packet_bytes (%d): not "
                  "published; it is kept in %s — hand it to an auditor (carechain.evidence.verify_evidence checks "
                  "it)", self.id, ev.kind, new_size, len(payload), self.broker.max_packet_bytes, kept)
        return None

    def _fetch(self, plan: ProofRequest) -> Fetched | None:
        """The proof and every entry `plan` needs: from the tiles when the miner has them and they serve that
        tree, else from the bridge."""
        if self.tiles is not None and self.tiles.available():
            try:
                got = self.tiles.fetch(plan.old_size, plan.new_size)
            except TileFetchError as exc:
                self.stats["tiles_unavailable"] += 1
                log.info("miner %s: %d → %d not from the tiles (%s); asking the bridge", self.id, plan.old_size,
                         plan.new_size, exc)
            else:
                self.stats["tile_fetches"] += 1
                return Fetched(got.consistency_path, got.entries, None)
        return self._fetch_from_bridge(plan)

    def _fetch_from_bridge(self, plan: ProofRequest) -> Fetched | None:
        """The proof and every entry `plan` needs, asked page by page: the log answers with as many entries
        as fit one packet under the broker's limit, and this miner asks again from where a page ended. With
        the pages joined comes the log's signed attestation of the first page (the one with the path)."""
        first = self._ask(plan.old_size, plan.new_size)
        if first is None:
            return None
        proof = first.attestation()
        entries = list(first.entries)
        while plan.old_size + len(entries) < plan.new_size:
            page = self._ask(plan.old_size + len(entries), plan.new_size)
            if page is None:
                return None
            if not page.entries:  # an answer that makes no progress would loop forever
                self.stats["bad_response"] += 1
                log.warning("miner %s: the log sent no entries from %d; will judge the next checkpoint", self.id,
                            plan.old_size + len(entries))
                return None
            entries.extend(page.entries)
            self.stats["pages"] += 1
        try:
            return Fetched([bytes.fromhex(h) for h in first.consistency_path], [bytes.fromhex(e) for e in entries],
                           proof)
        except ValueError:
            self.stats["bad_response"] += 1
            return None

    def _ask(self, old_size: int, new_size: int, attempts: int = 0) -> messages.ProofResponseMessage | None:
        """One request, one answer signed by the log key (or None: timeout, or the log's error). Answers
        nobody signed, or someone else did, are dropped: the genuine one may still come."""
        if self._client is None:
            return None
        while True:  # drop late answers to earlier requests
            try:
                self._responses.get_nowait()
            except queue.Empty:
                break
        req = messages.ProofRequestMessage(id=uuid.uuid4().hex, old_size=old_size, new_size=new_size)
        self._client.publish(messages.request(self.id), req.model_dump_json().encode(), qos=1)
        deadline = time.monotonic() + self.request_timeout_s
        while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
            try:
                resp = self._responses.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if resp.id == req.id:
                if not resp.signed_by(self.witness.log_public_key):
                    self.stats["unsigned_response"] += 1
                    if self.stats["unsigned_response"] & (self.stats["unsigned_response"] - 1) == 0:
                        log.warning("miner %s: dropped a proof answer the log key did not sign (%d so far)",
                                    self.id, self.stats["unsigned_response"])
                    continue
                if resp.error and resp.error.startswith(messages.RATE_LIMITED) and attempts < MAX_RATE_RETRIES:
                    self.stats["rate_limited"] += 1
                    match = re.search(r"retry in ([0-9.]+) s", resp.error)
                    self._stop.wait(min(float(match.group(1)) if match else 1.0, 5.0))
                    return self._ask(old_size, new_size, attempts + 1)
                if resp.error:
                    log.warning("miner %s: the log could not prove %d → %d: %s", self.id, old_size, new_size,
                                resp.error)
                    return None
                return resp
        return None

    def _publish(self, topic: str, payload: bytes) -> None:
        if self._client is not None:
            self._client.publish(topic, payload, qos=1, retain=True)

    def _publish_once(self, topic: str, payload: bytes) -> None:
        """QoS 1, not retained: capsule fragments for one requester's inbox."""
        if self._client is not None:
            self._client.publish(topic, payload, qos=1)

    def _leaves(self, old_size: int, new_size: int) -> list[bytes] | None:
        """Leaves `old_size`..`new_size - 1` from the log (unverified: the caller proves them against a root)."""
        fetched = self._fetch(ProofRequest(old_size, new_size))
        if fetched is None or len(fetched.entries) != new_size - old_size:
            return None
        return fetched.entries


def load_entry_verifier(spec: str) -> EntryVerifier:
    """The hook named `module:function` (e.g. the contract runtime's), imported by name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--entry-verifier {spec!r} must be MODULE:FUNCTION")
    func = getattr(importlib.import_module(module_name), attr, None)
    if not callable(func):
        raise ValueError(f"--entry-verifier: {module_name} has no function {attr}")
    return func


def contract_verifier(genesis: Genesis) -> tuple[ContractWitness, Callable[[], int]]:
    """Contract re-execution as the miner's entry verifier, and how many leaves it has replayed (see `WitnessMiner`)."""
    from contract_rules import ContractWitness

    witness = ContractWitness(genesis)
    return witness, lambda: witness.state.size
