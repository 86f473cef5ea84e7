"""Batch messages: several signed events in one MQTT message, each still verified, deduplicated and receipted alone.

The codec and the packer (carechain.batch) by property; the bridge's check and sequencer stages on batches
with a forged element, duplicates and malformed batches; then agents that batch and agents that do not on
one real bridge and a private mosquitto, counting messages against events at the broker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain import envelope, topics
from carechain.batch import BatchError, batch_size, decode_batch, encode_batch, events_in, pack
from carechain.config import BrokerConfig, Limits
from carechain.errors import Reason
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.receipts import Receipt, Rejected, event_digest, open_receipt
from chain_bridge.ingest import EventCandidate, Inbox, Receiver, Rejection, Sequencer
from chain_bridge.ledger.store import Ledger
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox, Pending
from edge_agent.uplink import Uplink
from tests.test_pipeline import register

DEV = Identity.from_seed(b"\x22" * 32)
FORGER = Identity.from_seed(b"\x23" * 32)
MAX_BYTES = 128 * 1024
elements = st.lists(st.binary(min_size=1, max_size=300).filter(lambda b: b[:1] != b"\xa1"), min_size=1,
                    max_size=40)


def now_ms() -> int:
    return int(time.time() * 1000)


def event(ident: Identity, seq: int, bpm: int = 70, *, signer: Identity | None = None) -> bytes:
    return envelope.sign(signer or ident, make_payload(ident.device_id, seq, now_ms(), "heart_rate", {"bpm": bpm}),
                         kid=ident.device_id)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    register(led, [DEV])
    return led


# -- the codec ------------------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(elements)
def test_a_batch_round_trips_and_is_the_deterministic_cbor_of_its_map(payloads: list[bytes]) -> None:
    message = encode_batch(payloads)
    assert decode_batch(message, len(payloads), len(message)) == payloads
    assert message == cbor2.dumps({"batch": payloads}, canonical=True)
    assert batch_size(len(p) for p in payloads) == len(message)
    assert events_in(message) == len(payloads)


@settings(max_examples=200)
@given(elements)
def test_a_batch_over_its_limits_is_refused_whole(payloads: list[bytes]) -> None:
    message = encode_batch(payloads)
    with pytest.raises(BatchError, match="over the limit of"):
        decode_batch(message, len(payloads) - 1 if len(payloads) > 1 else 0, MAX_BYTES)
    with pytest.raises(BatchError, match=f"{len(message)} bytes, over the limit of {len(message) - 1}"):
        decode_batch(message, len(payloads), len(message) - 1)


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=1, max_size=500), max_size=60), st.integers(1, 50), st.integers(64, 4000))
def test_packing_keeps_order_and_every_message_within_its_limits(payloads: list[bytes], max_events: int,
                                                                 max_bytes: int) -> None:
    groups = pack(payloads, bytes, max_events, max_bytes)
    assert [p for g in groups for p in g] == payloads
    for g in groups:
        assert len(g) <= max_events
        assert len(g) == 1 or batch_size(len(p) for p in g) <= max_bytes  # one too large for any batch goes alone
    for g, nxt in zip(groups, groups[1:], strict=False):  # greedy: the next item did not fit
        assert len(g) == max_events or batch_size(len(p) for p in [*g, nxt[0]]) > max_bytes


def test_a_single_event_message_is_not_a_batch() -> None:
    raw = event(DEV, 0)
    assert decode_batch(raw, 10, MAX_BYTES) is None and events_in(raw) == 1
    assert decode_batch(cbor2.dumps({"ct": b"x", "ev": raw}, canonical=True), 10, MAX_BYTES) is None


@pytest.mark.parametrize(("message", "why"), [
    (cbor2.dumps({"batch": []}), "empty"),
    (cbor2.dumps({"batches": [b"x"]}), 'not {"batch"'),
    (cbor2.dumps({"batch": b"x"}), "not an array"),
    (cbor2.dumps({"batch": [[b"x"]]}), "not a byte string"),
    (cbor2.dumps({"batch": [b"x", 7]}), "element 1 of the batch is not a byte string"),
    (cbor2.dumps({"batch": [encode_batch([b"x"])]}), "itself a batch"),
    (encode_batch([b"x"]) + b"\x00", "1 bytes after"),
    (encode_batch([b"xyz"])[:-1], "past the end"),
    (b"\xa1\x65batch\x9f\x41x\xff", "indefinite"),
    (b"\xa1\x65batch\x98\x01\x41x", "shortest form"),
    (b"\xa1\x65batch\x81\x58\x01x", "shortest form"),
])
def test_a_malformed_batch_says_what_is_wrong(message: bytes, why: str) -> None:
    with pytest.raises(BatchError, match=why) as err:
        decode_batch(message, 1000, MAX_BYTES)
    assert err.value.reason == Reason.BAD_BATCH and not err.value.retryable


# -- the bridge's stages ----------------------------------------------------------------------------------------


def test_a_forged_event_in_a_batch_is_refused_alone_and_the_rest_anchored_under_one_receipt(ledger: Ledger) -> None:
    receiver = Receiver(ledger, Limits(), batch_max=100)
    forged = event(DEV, 3, signer=FORGER)
    wire = [event(DEV, 0), event(DEV, 1), event(DEV, 2), forged, event(DEV, 4)]
    verdicts = receiver.check([(topics.events(DEV.device_id), encode_batch(wire))])
    assert [type(v) for v in verdicts] == [EventCandidate] * 3 + [Rejection, EventCandidate]
    out = Sequencer(ledger, Limits()).sequence(verdicts, now_ms())
    assert out.anchored == 4
    [receipt] = out.receipts.values()
    assert [seq for seq, _ in receipt.ok] == [0, 1, 2, 4]
    assert [(r.seq, r.reason, r.digest) for r in receipt.rejected] == [(3, Reason.BAD_SIGNATURE, event_digest(forged))]
    assert len(receipt.split()) == 1  # the five events cost the bridge one receipt signature


def test_a_full_batch_of_events_costs_one_receipt_signature(ledger: Ledger) -> None:
    limits = Limits()
    n = 500
    message = encode_batch([event(DEV, s) for s in range(n)])
    out = Sequencer(ledger, limits).sequence(Receiver(ledger, limits, batch_max=n).check(
        [(topics.events(DEV.device_id), message)]), now_ms())
    assert (out.anchored, list(out.receipts)) == (n, [DEV.device_id])
    assert [len(part.ok) for part in out.receipts[DEV.device_id].split()] == [n]


def test_duplicates_inside_and_across_batches_are_reacknowledged_with_their_original_index(ledger: Ledger) -> None:
    receiver, sequencer = Receiver(ledger, Limits(), batch_max=100), Sequencer(ledger, Limits())
    first, second = event(DEV, 0), event(DEV, 1)
    ev_topic = topics.events(DEV.device_id)
    out = sequencer.sequence(receiver.check([(ev_topic, encode_batch([first, second, first]))]), now_ms())
    ok = out.receipts[DEV.device_id].ok
    assert (out.anchored, out.duplicates) == (2, 1)
    assert ok[2] == ok[0]  # the copy inside the batch: seq 0 at the leaf of its first appearance
    size = ledger.size
    again = sequencer.sequence(receiver.check([(ev_topic, encode_batch([second, first])), (ev_topic, first)]),
                               now_ms())
    assert (again.anchored, again.duplicates, ledger.size) == (0, 3, size)
    assert again.receipts[DEV.device_id].ok == [ok[1], ok[0], ok[0]]


@pytest.mark.parametrize(("message", "why"), [
    (encode_batch([b"\xd2" * 10] * 1001), "1001 events, over the limit of 1000"),
    (encode_batch([b"\xd2" * 4000] * 33), "over the limit of 131072"),
    (cbor2.dumps({"batch": [[b"\xd2"]]}), "not a byte string"),
    (cbor2.dumps({"batch": []}), "empty"),
])
def test_an_oversize_overfull_or_malformed_batch_is_one_bad_batch_receipted_to_its_device(
        ledger: Ledger, message: bytes, why: str) -> None:
    verdicts = Receiver(ledger, Limits(), batch_max=10).check([(topics.events(DEV.device_id), message)])
    [rejection] = verdicts
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.device_id, rejection.seq) == (Reason.BAD_BATCH, DEV.device_id, None)
    assert why in rejection.detail and rejection.digest == event_digest(message)
    out = Sequencer(ledger, Limits()).sequence(verdicts, now_ms())
    assert [r.reason for r in out.receipts[DEV.device_id].rejected] == [Reason.BAD_BATCH]


def test_the_inbox_counts_a_batch_message_as_its_events() -> None:
    inbox = Inbox()
    inbox.put("t/0", encode_batch([b"\xd2"] * 6))
    inbox.put("t/1", b"\xd2")
    inbox.put("t/2", b"\xd2")
    assert [m.topic for m in inbox.drain(0.01, 7)] == ["t/0", "t/1"]  # 6 + 1 events fill a batch of 7
    assert [m.topic for m in inbox.drain(0.01, 7)] == ["t/2"]


# -- the agent's uplink ------------------------------------------------------------------------------------------


def rows(device: str, seqs: range, size: int = 100) -> list[Pending]:
    return [Pending(s + 1, device, s, b"\xd2" + bytes(size - 1)) for s in seqs]


def test_events_due_together_are_packed_per_device_and_a_lone_one_goes_as_it_is() -> None:
    uplink = Uplink(max_events=4, max_bytes=60_000)
    out = uplink.messages(rows("a", range(6)) + rows("b", range(1)), now_ms=0)
    assert [(d, [r.seq for r in g]) for d, g in out] == [("a", [0, 1, 2, 3]), ("a", [4, 5]), ("b", [0])]
    assert Uplink.payload(out[2][1]) == out[2][1][0].envelope  # today's single-event form
    assert decode_batch(Uplink.payload(out[0][1]), 4, 60_000) == [r.envelope for r in out[0][1]]


def test_with_a_linger_live_events_wait_for_company_and_go_when_it_is_up() -> None:
    uplink = Uplink(max_events=4, max_bytes=60_000, linger_ms=50)
    assert uplink.messages(rows("a", range(1)), now_ms=1000) == []
    assert uplink.wait_s(1010, 0.25) == pytest.approx(0.04)
    assert uplink.messages(rows("a", range(1, 2)), now_ms=1020) == []
    [(device, group)] = uplink.messages([], now_ms=1050)
    assert (device, [r.seq for r in group]) == ("a", [0, 1])
    full = uplink.messages(rows("a", range(2, 7)), now_ms=2000)  # a full group goes at once, the rest waits
    assert [[r.seq for r in g] for _, g in full] == [[2, 3, 4, 5]]
    assert [r.seq for r in uplink.drop("a")] == [6]


def test_batch_max_events_1_sends_one_event_per_message() -> None:
    out = Uplink(max_events=1, max_bytes=60_000, linger_ms=100).messages(rows("a", range(3)), now_ms=0)
    assert [len(g) for _, g in out] == [1, 1, 1]


# -- agents and a real bridge over mosquitto -----------------------------------------------------------------


class EventTap:
    """Counts, at the broker, the messages on the devices' event topics and the events they carry."""

    def __init__(self, broker: object, client_id: str) -> None:
        self.messages: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self.receipts: dict[str, int] = {}
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(broker.host, broker.port)  # type: ignore[attr-defined]
        self.client.loop_start()
        self.client.subscribe([(topics.EVENTS_WILDCARD, 1), ("cc/v1/dev/+/rcpt", 1)])
        assert ready.wait(5)

    def _on_message(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        device = m.topic.split("/")[3]
        with self._lock:
            if m.topic.endswith("/rcpt"):
                self.receipts[device] = self.receipts.get(device, 0) + 1
                return
            batch = decode_batch(bytes(m.payload), 1000, MAX_BYTES)
            self.messages[device] = self.messages.get(device, 0) + 1
            self.events[device] = self.events.get(device, 0) + (1 if batch is None else len(batch))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
def test_a_batching_agent_and_an_old_single_event_agent_drain_a_backlog_on_one_bridge(tmp_path, broker,
                                                                                       running_bridge) -> None:
    bridge = running_bridge
    old_devices, new_devices = [Identity.generate() for _ in range(2)], [Identity.generate() for _ in range(2)]
    register(bridge.ledger, old_devices + new_devices)
    tap = EventTap(broker, f"tap-{tmp_path.name}")
    per_device = 150

    def agent(name: str, devices: list[Identity], batch_max_events: int) -> Agent:
        a = Agent([AgentDevice(i, None) for i in devices], Outbox(tmp_path / name / "outbox.db"), broker.config,
                  bridge.log_key.public_key, window=200, resend_after_s=5.0, client_id=f"{name}-{tmp_path.name}",
                  batch_max_events=batch_max_events)
        for ident in devices:  # the backlog of an outage: signed and stored before the agent connects
            for k in range(per_device):
                a.record(ident.device_id, [("heart_rate", {"bpm": 60 + k % 40})])
        return a

    old, new = agent("old", old_devices, 1), agent("new", new_devices, 64)

    async def drain() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(a.run(stop)) for a in (old, new)]
        deadline = time.monotonic() + 60
        while (old.outbox.depth() or new.outbox.depth()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(drain())
        time.sleep(0.3)  # the tap's last deliveries
    finally:
        tap.close()
    total = per_device * 4
    assert (old.outbox.depth(), new.outbox.depth()) == (0, 0)
    assert Ledger(bridge.ledger.path).count_events() == total
    for ident in old_devices:  # one message per event, as before
        assert tap.messages[ident.device_id] == tap.events[ident.device_id] >= per_device
    for ident in new_devices:  # the drain went in batch messages; every event still anchored and receipted alone
        assert tap.events[ident.device_id] >= per_device
        assert tap.messages[ident.device_id] <= tap.events[ident.device_id] // 8
        assert tap.receipts[ident.device_id] < per_device // 8
    assert new.stats.acked == 2 * per_device and new.stats.messages < new.stats.sent // 8
    assert old.stats.messages == old.stats.sent


@pytest.mark.integration
def test_a_bad_batch_over_the_broker_is_receipted_as_such(tmp_path, broker, running_bridge) -> None:
    bridge = running_bridge
    register(bridge.ledger, [DEV])
    got: list = []
    ready = threading.Event()
    listener = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda _c, _u, m: got.append(open_receipt(bytes(m.payload), bridge.log_key.public_key,
                                                                    DEV.device_id))
    listener.on_subscribe = lambda *_a: ready.set()
    listener.connect(broker.host, broker.port)
    listener.loop_start()
    listener.subscribe(topics.receipts(DEV.device_id), qos=1)
    assert ready.wait(5)
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        pub.publish(topics.events(DEV.device_id), cbor2.dumps({"batch": []}), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for c in (pub, listener):
            c.disconnect()
            c.loop_stop()
    [receipt] = got
    assert [(r.seq, r.reason, r.retryable) for r in receipt.rejected] == [(None, Reason.BAD_BATCH, False)]


def test_an_agent_whose_batch_is_refused_whole_sends_smaller_messages_down_to_one_event(tmp_path) -> None:
    bridge = Identity.from_seed(b"\x24" * 32)
    agent = Agent([AgentDevice(DEV, None)], Outbox(tmp_path / "outbox.db"), BrokerConfig(), bridge.public_key,
                  batch_max_events=4)
    refusal = Receipt(DEV.device_id, now_ms(), rejected=[Rejected(None, Reason.BAD_BATCH, "too many", False,
                                                                  b"\x00" * 32)])
    agent._apply_receipt(DEV.device_id, refusal)
    assert agent.uplink.max_events == 2
    old_bridge = Receipt(DEV.device_id, now_ms(), rejected=[Rejected(None, Reason.NOT_COSE_SIGN1, "a map", False,
                                                                     b"\x00" * 32)])
    agent._apply_receipt(DEV.device_id, old_bridge)
    agent._apply_receipt(DEV.device_id, refusal)
    assert agent.uplink.max_events == 1 and agent.outbox.quarantined() == 0
