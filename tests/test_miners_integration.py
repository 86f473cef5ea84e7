"""Five miner processes on a real broker witness a growing log: its checkpoints become final at 3-of-5;
a checkpoint inconsistent with an earlier one never does, and every honest miner publishes evidence. A rogue
answering proof requests in the log's place cannot make a miner publish evidence, and a miner that dies
disappears from discovery (its last will)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from carechain import miner_messages as messages
from carechain import topics
from carechain.checkpoint import parse_note
from carechain.cosignature import Cosigner
from carechain.evidence import Evidence, EvidenceKind, verify_evidence
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.bridge import default_origin
from chain_bridge.finality import FinalityPolicy, FinalityTracker
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.proof_responder import ProofResponder
from chain_miner.witness import Violation
from simulators.miners import CARECHAIN

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
N_MINERS, THRESHOLD = 5, 3
DEADLINE_S = 60  # a bound so a broken run fails instead of hanging; nothing asserts on timing


def wait_for(what: str, cond: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class MinerProcess:
    def __init__(self, data_dir: Path, broker: str, log_public_key: bytes, *extra: str) -> None:
        self.key = Identity.generate()
        self.key.save(data_dir / "miner.key")
        self.data_dir = data_dir
        self.args = [*CARECHAIN, "miner", "--data-dir", str(data_dir), "--broker", broker,
                     "--log-public-key", log_public_key.hex(), *extra]
        self.cosigner = Cosigner(f"carechain.miner/{self.key.device_id}", self.key.public_key)
        self.proc: subprocess.Popen[str] | None = None
        self.ready: queue.SimpleQueue[str] = queue.SimpleQueue()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # cwd: the miner's folder, so that no carechain-data/ of the checkout is taken for a bridge's genesis
        self.proc = subprocess.Popen(self.args, cwd=self.data_dir, env=env, stdout=subprocess.PIPE, text=True)
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [self.ready.put(line) for line in stdout], daemon=True).start()

    def wait_ready(self) -> None:
        line = self.ready.get(timeout=DEADLINE_S)
        assert json.loads(line)["miner"] == self.key.device_id

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Observer:
    """An auditor on the broker: collects cosignatures (finality) and evidence from all miners."""

    def __init__(self, broker, policy: FinalityPolicy) -> None:  # type: ignore[no-untyped-def]
        self.tracker = FinalityTracker(policy)
        self.evidence: dict[str, list[Evidence]] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = connect_client(broker, f"miner-observer-{os.getpid()}", on_message=self._on_message,
                                     connected=self.connected,
                                     subscriptions=[(messages.MINER_COSIG_WILDCARD, 1),
                                                    (messages.MINER_EVIDENCE_WILDCARD, 1)])

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        parsed = messages.miner_of_topic(msg.topic)
        if parsed is None or not msg.payload:
            return
        with self._lock:
            if parsed[1] == "cosig":
                m = messages.CosignatureMessage.model_validate_json(msg.payload)
                body, _ = parse_note(m.checkpoint)
                _, lines = parse_note(m.checkpoint + m.cosignature)
                self.tracker.add(body, lines[-1])
            elif parsed[1] == "evidence":
                ev = Evidence.model_validate_json(msg.payload)
                self.evidence.setdefault(ev.new_checkpoint, []).append(ev)

    def is_final(self, note: str) -> bool:
        with self._lock:
            return parse_note(note)[0] in self.tracker.final

    def cosigners(self, note: str) -> int:
        with self._lock:
            return len(self.tracker.cosigners(parse_note(note)[0]))

    def evidence_from(self, note: str) -> set[str]:
        with self._lock:
            return {ev.miner for ev in self.evidence.get(note, [])}

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reject_evil_sale(old_size: int, new_size: int, entries: Sequence[bytes]) -> Violation | None:
    """A stand-in for contract re-execution (contract_rules): an `evil sale` leaf breaks the rules."""
    for i, e in enumerate(entries):
        if e.startswith(b"evil sale"):
            return Violation(old_size + i, "rx.sale_requires_valid_rx", "Rx-only sale without a valid Rx")
    return None


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path, broker) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    extra = getattr(request, "param", ())
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    log_key = Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    lock = threading.Lock()
    responder_ready = threading.Event()
    responder = ProofResponder.connect(ledger, broker.config, f"proof-responder-{tmp_path.name}", lock,
                                       responder_ready, log_key=log_key)
    publisher_ready = threading.Event()
    publisher = connect_client(broker.config, f"log-publisher-{tmp_path.name}", connected=publisher_ready)
    procs = [MinerProcess(tmp_path / f"miner{i}", f"{broker.host}:{broker.port}", log_key.public_key, *extra)
             for i in range(N_MINERS)]
    observer = Observer(broker.config, FinalityPolicy(tuple(p.cosigner for p in procs), THRESHOLD))
    try:
        assert responder_ready.wait(30) and publisher_ready.wait(30) and observer.connected.wait(30)
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready()
        yield {"log_key": log_key, "ledger": ledger, "lock": lock, "responder": responder,
               "publisher": publisher, "procs": procs, "observer": observer, "tmp": tmp_path}
    finally:
        for p in procs:
            p.stop()
        for topic in [topics.CHECKPOINT] + [t(p.key.device_id) for p in procs
                                            for t in (topics.miner_cosignature, topics.miner_evidence)]:
            publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # leave nothing retained
        for c in (publisher, observer.client):
            c.disconnect()
            c.loop_stop()
        responder.stop()
        ledger.close()


def append_and_checkpoint(ledger: Ledger, log_key: Identity, lock: threading.Lock, leaves: list[bytes],
                          first_seq: int) -> str:
    with lock:
        ledger.append_events([EventCandidate("dev", first_seq + i, leaf) for i, leaf in enumerate(leaves)])
        return ledger.issue_checkpoint(log_key, default_origin(log_key))


def publish(client: mqtt.Client, note: str) -> None:
    client.publish(topics.CHECKPOINT, note.encode(), qos=1, retain=True).wait_for_publish(10)


def test_checkpoints_of_a_growing_log_become_final_and_a_fork_never_does(world: dict) -> None:  # type: ignore[type-arg]
    log_key, ledger, lock = world["log_key"], world["ledger"], world["lock"]
    publisher, observer, procs = world["publisher"], world["observer"], world["procs"]

    # An honest, growing log: each checkpoint is cosigned by the miners and becomes final at 3-of-5.
    seq = 0
    notes = []
    for batch in (3, 1, 6):
        note = append_and_checkpoint(ledger, log_key, lock, [b"honest %d" % (seq + i) for i in range(batch)], seq)
        seq += batch
        publish(publisher, note)
        wait_for(f"checkpoint {seq} to become final", lambda n=note: observer.is_final(n))
        notes.append(note)
    last = notes[-1]
    wait_for("all five miners to cosign the latest checkpoint", lambda: observer.cosigners(last) == N_MINERS)

    # A dishonest log: same key, history rewritten from leaf 4, grown past the last final checkpoint. It
    # serves proofs and entries from its forked tree.
    forked = Ledger(world["tmp"] / "forked" / "ledger.db")
    try:
        forked.append_events([EventCandidate("dev", i, ledger.entry(i)) for i in range(4)])
        evil = append_and_checkpoint(forked, log_key, lock, [b"rewritten %d" % i for i in range(9)], 4)
        with lock:
            world["responder"].ledger = forked
        publish(publisher, evil)
        wait_for("every miner to publish evidence", lambda: len(observer.evidence_from(evil)) == N_MINERS)
        keys = {p.key.public_key.hex(): p for p in procs}
        for ev in observer.evidence[evil]:
            assert ev.kind is EvidenceKind.FORK and ev.old_checkpoint == last
            assert ev.proof is not None and ev.proof.signed_by(log_key.public_key)  # the log's own failing answer
            assert "inconsistent" in verify_evidence(ev, log_key.public_key)
            assert ev.miner_key in keys and ev.signed_by(bytes.fromhex(ev.miner_key))  # signed by its reporter

        # A miner restarted from its data dir still holds the honest view and refuses the retained fork.
        restarted = procs[0]
        restarted.stop()
        with observer._lock:
            observer.evidence[evil] = []
        restarted.start()
        restarted.wait_ready()
        wait_for("the restarted miner to refuse the fork again", lambda: len(observer.evidence_from(evil)) == 1)
        assert not observer.is_final(evil) and observer.cosigners(evil) == 0
    finally:
        forked.close()


@pytest.mark.parametrize("world", [("--entry-verifier", "tests.test_miners_integration:reject_evil_sale")],
                         indirect=True, ids=["contract-hook"])
def test_a_checkpoint_with_a_violating_sale_never_becomes_final(world: dict) -> None:  # type: ignore[type-arg]
    log_key, ledger, lock = world["log_key"], world["ledger"], world["lock"]
    publisher, observer = world["publisher"], world["observer"]
    good = append_and_checkpoint(ledger, log_key, lock, [b"sale %d" % i for i in range(4)], 0)
    publish(publisher, good)
    wait_for("the honest checkpoint to become final", lambda: observer.is_final(good))

    # The dishonest bridge appends a violating sale; the log itself stays consistent.
    bad = append_and_checkpoint(ledger, log_key, lock, [b"sale 4", b"evil sale 5", b"sale 6"], 4)
    publish(publisher, bad)
    wait_for("every miner to publish evidence", lambda: len(observer.evidence_from(bad)) == N_MINERS)
    for ev in observer.evidence[bad]:
        assert ev.kind is EvidenceKind.VIOLATION and ev.violation_leaf == 5
        assert "leaf 5" in verify_evidence(ev, log_key.public_key, reject_evil_sale)
    # Later checkpoints contain the sale too: none of them becomes final either.
    later = append_and_checkpoint(ledger, log_key, lock, [b"sale 7"], 7)
    publish(publisher, later)
    wait_for("evidence on the later checkpoint", lambda: len(observer.evidence_from(later)) == N_MINERS)
    assert observer.cosigners(bad) == 0 and observer.cosigners(later) == 0
    assert not observer.is_final(bad) and not observer.is_final(later)


class SlowResponder(ProofResponder):
    """The genuine, signing responder, answering a little late: a rogue on the same topic always answers first."""

    def serve(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        time.sleep(0.3)
        super().serve(client, msg)


def test_a_rogue_answering_proof_requests_cannot_make_a_miner_publish_fork_evidence(
        tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    """Regression: on a broker where anyone may publish on a miner's response topic, a rogue that answered
    first with a junk consistency path made an honest miner publish fork evidence against an honest log (and
    the evidence verified). Miners now act only on answers the log key signed."""
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    from chain_miner.service import WitnessMiner

    log_key, miner_key = Identity.generate(), Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    lock = threading.Lock()
    ready = [threading.Event() for _ in range(4)]
    responder = SlowResponder.connect(ledger, broker.config, f"slow-responder-{tmp_path.name}", lock, ready[0],
                                      log_key=log_key)
    publisher = connect_client(broker.config, f"log-publisher-{tmp_path.name}", connected=ready[1])
    seen: dict[str, list[bytes]] = {"cosig": [], "evidence": []}
    forged: list[str] = []
    rogue_on = threading.Event()

    def on_watch(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        parsed = messages.miner_of_topic(msg.topic)
        if parsed is not None and parsed[1] in seen and msg.payload:
            seen[parsed[1]].append(bytes(msg.payload))

    watch = connect_client(broker.config, f"watch-{tmp_path.name}", on_message=on_watch, connected=ready[2],
                           subscriptions=[(messages.cosignature(miner_key.device_id), 1),
                                          (messages.evidence(miner_key.device_id), 1)])

    def on_request(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not rogue_on.is_set():
            return
        req = messages.ProofRequestMessage.model_validate_json(msg.payload)
        lo, hi = sorted((req.old_size, req.new_size))
        junk = [os.urandom(32).hex() for _ in range(max(1, (hi - 1).bit_length()))]
        for sig in (None, Identity.generate().sign(b"x").hex()):  # unsigned (as answers were), and signed by another
            answer = messages.ProofResponseMessage(id=req.id, old_size=req.old_size, new_size=req.new_size,
                                                   consistency_path=junk, sig=sig)
            c.publish(messages.response(miner_key.device_id), answer.model_dump_json(exclude_none=True).encode(), qos=1)
            forged.append(req.id)

    rogue = connect_client(broker.config, f"rogue-{tmp_path.name}", on_message=on_request, connected=ready[3],
                           subscriptions=[(messages.request(miner_key.device_id), 1)])
    miner = WitnessMiner(tmp_path / "miner", broker.config, log_key.public_key, miner_key, request_timeout_s=20)
    try:
        assert all(e.wait(30) for e in ready)
        miner.start()
        assert miner.connected.wait(30)
        first = append_and_checkpoint(ledger, log_key, lock, [b"leaf %d" % i for i in range(5)], 0)
        publish(publisher, first)
        wait_for("the first checkpoint to be cosigned", lambda: miner.stats["cosigned"] >= 1)
        rogue_on.set()
        second = append_and_checkpoint(ledger, log_key, lock, [b"leaf %d" % i for i in range(5, 12)], 5)
        publish(publisher, second)
        wait_for("the second checkpoint to be cosigned", lambda: miner.stats["cosigned"] >= 2)
        assert forged and miner.stats["unsigned_response"] >= 2  # the rogue answered first, and was dropped
        assert miner.witness.state.tree_size == 12
        wait_for("the cosignature on the broker", lambda: any(
            messages.CosignatureMessage.model_validate_json(p).tree_size == 12 for p in seen["cosig"]))
        cosig = messages.CosignatureMessage.model_validate_json(seen["cosig"][-1])
        assert messages.from_miner(cosig, miner_key.device_id)
        assert seen["evidence"] == [] and miner.stats["refused_fork"] == 0
    finally:
        miner.stop()
        publisher.publish(topics.CHECKPOINT, b"", qos=1, retain=True).wait_for_publish(10)
        for c in (publisher, watch, rogue):
            c.disconnect()
            c.loop_stop()
        responder.stop()
        ledger.close()


def _retained_hello(broker, miner_id: str, client_id: str) -> bytes | None:  # type: ignore[no-untyped-def]
    """The retained hello a newcomer sees on a miner's hello topic (None: none)."""
    got: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    ready = threading.Event()
    c = connect_client(broker.config, client_id, on_message=lambda _c, _u, m: got.put(bytes(m.payload)),
                       connected=ready, subscriptions=[(messages.hello(miner_id), 1)])
    try:
        assert ready.wait(30)
        try:
            return got.get(timeout=1.5) or None  # a retained message comes right after the SUBACK
        except queue.Empty:
            return None
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_killed_miner_disappears_from_discovery(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    """Each miner announces itself with a signed, retained hello; its last will empties it, so a miner that
    dies without a goodbye (SIGKILL) drops out of discovery as soon as the broker notices, and one stopped
    cleanly empties it itself."""
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    log_key = Identity.generate()
    address = f"{broker.host}:{broker.port}"
    killed, stopped = (MinerProcess(tmp_path / f"m{i}", address, log_key.public_key) for i in range(2))
    for m in (killed, stopped):
        m.start()
        m.wait_ready()
    try:
        for m in (killed, stopped):
            mid = m.key.device_id
            wait_for(f"miner {mid}'s hello", lambda mid=mid: _retained_hello(broker, mid, f"see-{mid}") is not None)
            hello = messages.MinerHello.model_validate_json(_retained_hello(broker, mid, f"read-{mid}") or b"")
            assert hello.miner == mid and messages.from_miner(hello, mid)
        assert killed.proc is not None
        killed.proc.kill()  # no DISCONNECT: the broker publishes the will
        killed.proc.wait(10)
        wait_for("the killed miner's hello to disappear",
                 lambda: _retained_hello(broker, killed.key.device_id, f"gone-{killed.key.device_id}") is None)
        stopped.stop()
        wait_for("the stopped miner's hello to disappear",
                 lambda: _retained_hello(broker, stopped.key.device_id, f"bye-{stopped.key.device_id}") is None)
    finally:
        killed.stop()
        stopped.stop()
