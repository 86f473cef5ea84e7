"""The bridge takes sealed (v2) readings: the ciphertext must hash to what the device signed, and it is kept
with its leaf in the same transaction; after the operator's cutover, v1 health readings are refused."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import pytest

from carechain import cbor, envelope, topics
from carechain.config import BridgeConfig, Limits
from carechain.entries import PROTOCOL_CUTOVER, Entry, Registration, registration_entry
from carechain.errors import Reason
from carechain.events import make_payload, make_sealed_payload
from carechain.identity import Identity
from carechain.receipts import event_digest, open_receipt
from carechain.sealed import ciphertext_hash, encode_sealed, epoch_of, seal_body
from chain_bridge.bridge import Bridge
from chain_bridge.ingest import EventCandidate, Receiver, Sequencer
from chain_bridge.ingest.sequence import SequencedBatch
from chain_bridge.ledger.store import Appended, Ledger, LedgerError
from contract_rules import transactions as ce

if TYPE_CHECKING:
    from tests.conftest import TestBroker

OPERATOR = Identity.from_seed(b"\x21" * 32)
DEV = Identity.from_seed(b"\x22" * 32)
TERMINAL = Identity.from_seed(b"\x23" * 32)
KEY = bytes(range(32))  # the (device, epoch) data key; only the agent and an authorized requester hold it
EPOCH_MS = 3_600_000
PURCHASE = {"item_code": "0002-8215", "code_system": "ndc", "rx_only": False, "quantity": 1, "price_minor": 499,
            "currency": "EUR", "patient_token": "tok-1", "payment_method": "card"}


def now_ms() -> int:
    return int(time.time() * 1000)


def sealed(ident: Identity, seq: int, bpm: int = 70, *, ct: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """(wire, cose, ct) of a sealed heart-rate reading; `ct` overrides what goes on the wire."""
    ts = now_ms()
    epoch = epoch_of(ts, EPOCH_MS)
    real = seal_body(KEY, seq.to_bytes(12, "big"), ident.device_id, seq, ts, "heart_rate", epoch, {"bpm": bpm})
    cose = envelope.sign(ident, make_sealed_payload(ident.device_id, seq, ts, "heart_rate", epoch,
                                                    ciphertext_hash(real)))
    wire_ct = real if ct is None else ct
    return encode_sealed(cose, wire_ct), cose, wire_ct


def clear_v1(ident: Identity, seq: int, kind: str = "heart_rate", body: dict | None = None) -> bytes:
    return envelope.sign(ident, make_payload(ident.device_id, seq, now_ms(), kind, body or {"bpm": 70}))


def topic(ident: Identity) -> str:
    return topics.events(ident.device_id)


def register(ledger: Ledger, *idents: Identity) -> None:
    items = []
    for ident in idents:
        reg = Registration(dev=ident.device_id, pk=ident.public_key, profile="heart_rate_band", owner="patient:a",
                           site="ward", ts=now_ms())
        items.append((registration_entry(OPERATOR, reg), reg))
    ledger.append_registrations(items)


def cutover(ledger: Ledger, retire_v1_after: int) -> int:
    entry = ce.signed(OPERATOR, PROTOCOL_CUTOVER, ce.ProtocolCutover(retire_v1_after=retire_v1_after, ts=now_ms()))
    [index] = ledger.append_entries([entry])
    return index


def stored_ciphertexts(path: Path) -> list[tuple[int, str, int, int, bytes]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(i, d, s, e, bytes(c)) for i, d, s, e, c in db.execute("SELECT * FROM ciphertexts ORDER BY idx")]
    finally:
        db.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    register(led, DEV, TERMINAL)
    yield led
    led.close()


def run(ledger: Ledger, messages: list[tuple[str, bytes]]) -> SequencedBatch:
    receiver = Receiver(ledger, Limits(), batch_max=100)
    return Sequencer(ledger, Limits(), registry=receiver.registry).sequence(receiver.check(messages), now_ms())


# -- check + append ----------------------------------------------------------------------------------

def test_a_sealed_reading_is_anchored_with_its_ciphertext_and_receipted_over_its_cose(ledger: Ledger) -> None:
    wire, cose, ct = sealed(DEV, 0)
    out = run(ledger, [(topic(DEV), wire)])
    assert out.anchored == 1 and not out.rejections
    [(seq, index)] = out.receipts[DEV.device_id].ok
    assert seq == 0 and Entry.decode(ledger.entry(index)).cose == cose  # the ledger holds the COSE, not the map
    assert out.receipts[DEV.device_id].ok_digests == [event_digest(cose)]
    assert ledger.ciphertext(index) == ct
    [(idx, dev, s, epoch, stored)] = stored_ciphertexts(ledger.path)
    assert (idx, dev, s, epoch, stored) == (index, DEV.device_id, 0, epoch_of(now_ms(), EPOCH_MS), ct)
    for path in (ledger.path, ledger.path.with_name(ledger.path.name + "-wal")):
        assert b"bpm" not in path.read_bytes()  # the reading itself is nowhere in the ledger's files


def test_a_sealed_reading_without_the_right_ciphertext_is_refused_and_nothing_is_stored(ledger: Ledger) -> None:
    _, cose, _ = sealed(DEV, 0)
    _, _, other = sealed(DEV, 1, bpm=71)
    wrong = encode_sealed(cose, other)  # another reading's (valid) ciphertext
    v1 = clear_v1(DEV, 2)
    with_ct = encode_sealed(v1, b"\x00" * 40)  # a clear event does not carry one
    not_sealed_map = cbor.encode({"ct": b"x", "zz": b""})  # a two-entry map, not the sealed one
    out = run(ledger, [(topic(DEV), cose), (topic(DEV), wrong), (topic(DEV), with_ct),
                            (topic(DEV), not_sealed_map)])
    assert out.anchored == 0
    assert [(r.reason, r.seq) for r in out.rejections] == [
        (Reason.CIPHERTEXT_MISSING, 0), (Reason.CIPHERTEXT_MISMATCH, 0), (Reason.CIPHERTEXT_MISMATCH, 2),
        (Reason.BAD_ENVELOPE, None)]
    rejected = out.receipts[DEV.device_id].rejected
    assert [r.reason for r in rejected] == [r.reason for r in out.rejections]  # sent back like other refusals
    assert rejected[1].digest == event_digest(cose)  # digest over the COSE part, as the agent computes it
    assert ledger.size == 2 and stored_ciphertexts(ledger.path) == []


def test_a_resent_sealed_reading_is_re_acknowledged_and_keeps_its_first_ciphertext(ledger: Ledger) -> None:
    wire, _, ct = sealed(DEV, 0)
    receiver = Receiver(ledger, Limits(), batch_max=100)
    sequencer = Sequencer(ledger, Limits(), registry=receiver.registry)
    first = sequencer.sequence(receiver.check([(topic(DEV), wire)]), now_ms())
    again = sequencer.sequence(receiver.check([(topic(DEV), wire), (topic(DEV), wire)]), now_ms())
    assert (first.anchored, again.anchored, again.duplicates) == (1, 0, 2)
    assert again.receipts[DEV.device_id].ok[0] == first.receipts[DEV.device_id].ok[0]
    assert [row[4] for row in stored_ciphertexts(ledger.path)] == [ct]


class _FailingGate:
    """A gate that fails at its second event: the batch's transaction must roll back as a whole."""

    def __init__(self) -> None:
        self.seen = 0

    def catch_up(self, ledger: Ledger) -> None:
        pass

    def admit(self, index: int, candidate: EventCandidate) -> None:
        self.seen += 1
        if self.seen == 2:
            raise sqlite3.OperationalError("database or disk is full")

    def abort(self) -> None:
        pass


def test_a_ciphertext_is_committed_in_the_same_transaction_as_its_leaf(ledger: Ledger) -> None:
    receiver = Receiver(ledger, Limits(), batch_max=100)
    verdicts = receiver.check([(topic(DEV), sealed(DEV, 0)[0]), (topic(DEV), sealed(DEV, 1)[0])])
    assert all(isinstance(v, EventCandidate) and v.ct is not None for v in verdicts)
    size = ledger.size
    with pytest.raises(sqlite3.OperationalError):
        ledger.append_events([v for v in verdicts if isinstance(v, EventCandidate)], _FailingGate())
    assert ledger.size == size and stored_ciphertexts(ledger.path) == []  # neither the leaf nor its ciphertext
    results = ledger.append_events([v for v in verdicts if isinstance(v, EventCandidate)])
    assert all(isinstance(r, Appended) for r in results)
    assert [row[0] for row in stored_ciphertexts(ledger.path)] == [r.index for r in results if isinstance(r, Appended)]


# -- cutover -------------------------------------------------------------------------------------------

def test_after_the_cutover_v1_readings_are_refused_and_v1_purchases_and_v2_readings_go_in(ledger: Ledger) -> None:
    before = clear_v1(DEV, 0)
    receiver = Receiver(ledger, Limits(), batch_max=100)
    sequencer = Sequencer(ledger, Limits(), registry=receiver.registry)
    first = sequencer.sequence(receiver.check([(topic(DEV), before)]), now_ms())
    assert first.anchored == 1
    at = cutover(ledger, ledger.size + 2)  # the cutover leaf, then one more leaf may still be a v1 reading
    assert ledger.retire_v1_after() == at + 2
    batch = [(topic(DEV), clear_v1(DEV, 1)),  # lands at at+1: still before the cutover
             (topic(DEV), clear_v1(DEV, 2)),  # at at+2: retired
             (topic(TERMINAL), clear_v1(TERMINAL, 0, "purchase", PURCHASE)),
             (topic(DEV), sealed(DEV, 3)[0]),
             (topic(DEV), before)]  # a resend of a reading anchored before: re-acknowledged
    out = sequencer.sequence(receiver.check(batch), now_ms())
    assert [(r.reason, r.seq) for r in out.rejections] == [(Reason.VERSION_RETIRED, 2)]
    assert "tree size" in out.rejections[0].detail
    assert (out.anchored, out.duplicates) == (3, 1)
    assert [seq for seq, _ in out.receipts[DEV.device_id].ok] == [1, 3, 0]
    assert [seq for seq, _ in out.receipts[TERMINAL.device_id].ok] == [0]
    assert out.receipts[DEV.device_id].rejected[0].reason == Reason.VERSION_RETIRED


def test_a_cutover_that_is_not_in_the_future_or_a_second_one_is_not_appended(ledger: Ledger) -> None:
    size = ledger.size
    with pytest.raises(LedgerError, match="retire_v1_after"):
        cutover(ledger, ledger.size)
    assert ledger.retire_v1_after() is None and ledger.size == size
    cutover(ledger, ledger.size + 10)
    with pytest.raises(LedgerError, match="already retires v1"):
        cutover(ledger, ledger.size + 20)
    assert ledger.retire_v1_after() == size + 10 and ledger.size == size + 1


# -- through a real broker ---------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_sealed_and_v1_events_side_by_side_through_a_broker(tmp_path: Path, broker: TestBroker, workers: int) -> None:
    if workers and broker.kind != "mosquitto":
        pytest.skip("ingest workers need MQTT shared subscriptions (mosquitto)")
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    register(ledger, DEV)
    log_key = Identity.generate()
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3, ingest_workers=workers)
    bridge = Bridge(cfg, broker.config, log_key, ledger, client_id=f"bridge-{tmp_path.name}")
    bridge.start()
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"dev-{os.getpid()}-{workers}")

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        receipts = [open_receipt(p, log_key.public_key, DEV.device_id) for p in got]
        if sum(len(r.ok) + len(r.rejected) for r in receipts) >= 3:
            done.set()

    try:
        assert bridge.wait_ready(30)
        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.subscribe(topics.receipts(DEV.device_id), qos=1)
        client.loop_start()
        time.sleep(0.3)
        wire, _, ct = sealed(DEV, 0)
        _, cose, _ = sealed(DEV, 1)
        client.publish(topic(DEV), wire, qos=1)
        client.publish(topic(DEV), cose, qos=1)  # ciphertext missing
        client.publish(topic(DEV), clear_v1(DEV, 2), qos=1)
        assert done.wait(20)
    finally:
        client.loop_stop()
        client.disconnect()
        bridge.stop()
    receipts = [open_receipt(p, log_key.public_key, DEV.device_id) for p in got]
    assert sorted(seq for r in receipts for seq, _ in r.ok) == [0, 2]
    assert [(x.seq, x.reason) for r in receipts for x in r.rejected] == [(1, Reason.CIPHERTEXT_MISSING)]
    assert bridge.stats.rejected[Reason.CIPHERTEXT_MISSING] == 1
    assert [row[4] for row in stored_ciphertexts(ledger.path)] == [ct]
    ledger.close()
