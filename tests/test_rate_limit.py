"""Per-device rate limit in the sequencer: a token bucket, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from carechain import envelope, topics
from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.entries import Registration, registration_entry
from carechain.errors import Reason
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.ingest import RateGuard
from chain_bridge.ingest.guards import UnregisteredReceipts
from chain_bridge.ledger.store import EventCandidate, Ledger

OPERATOR = Identity.from_seed(b"\x01" * 32)
LOG_KEY = Identity.from_seed(b"\x02" * 32)
DEV = Identity.from_seed(b"\x03" * 32)
DEV2 = Identity.from_seed(b"\x08" * 32)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def cand(device: str, seq: int) -> EventCandidate:
    return EventCandidate(device, seq, b"leaf", b"digest")


def test_a_device_gets_its_burst_then_is_refused_with_a_retryable_reason() -> None:
    clock = Clock()
    guard = RateGuard(rate=10.0, burst=5, clock=clock)
    assert [guard.check(cand("a", s)) for s in range(5)] == [None] * 5
    refused = guard.check(cand("a", 5))
    assert refused is not None and refused.reason == "rate_limited" and refused.retryable
    assert Reason("rate_limited").retryable  # the agent keeps the event and resends it
    assert (refused.seq, refused.digest) == (5, b"digest")


def test_tokens_come_back_at_the_configured_rate_up_to_the_burst() -> None:
    clock = Clock()
    guard = RateGuard(rate=10.0, burst=5, clock=clock)
    for s in range(5):
        guard.check(cand("a", s))
    clock.t += 0.25  # 2.5 tokens
    assert [guard.check(cand("a", s)) is None for s in range(3)] == [True, True, False]
    clock.t += 3600  # an hour idle refills to the burst, no more
    assert sum(guard.check(cand("a", s)) is None for s in range(10)) == 5


def test_devices_have_separate_buckets() -> None:
    guard = RateGuard(rate=1.0, burst=2, clock=Clock())
    assert [guard.check(cand("a", s)) is None for s in range(3)] == [True, True, False]
    assert [guard.check(cand("b", s)) is None for s in range(2)] == [True, True]


def test_a_refund_gives_a_token_back_but_never_beyond_the_burst() -> None:
    guard = RateGuard(rate=1.0, burst=2, clock=Clock())
    guard.check(cand("a", 0))
    guard.refund("a")
    guard.refund("a")
    assert [guard.check(cand("a", s)) is None for s in range(3)] == [True, True, False]


def test_the_defaults_let_a_device_drain_a_multi_day_backlog_at_full_speed() -> None:
    """3 days of 1 Hz readings (259,200 events) drain at the default 1,000/s without one refusal; a device
    pushing 2,000/s is held to about 1,000/s once its burst is spent."""
    limits = Limits()
    assert (limits.max_events_per_s, limits.burst) == (1000.0, 20_000)
    clock = Clock()
    guard = RateGuard(limits.max_events_per_s, limits.burst, clock=clock)
    backlog = 3 * 86_400
    refused = 0
    for s in range(backlog):
        clock.t += 1 / 1000  # the agent's pace: one receipt window after another, 1,000 events/s
        refused += guard.check(cand("a", s)) is not None
    assert refused == 0
    flood = RateGuard(limits.max_events_per_s, limits.burst, clock=clock)
    admitted = 0
    for s in range(200_000):  # 100 s at 2,000/s
        clock.t += 1 / 2000
        admitted += flood.check(cand("b", s)) is None
    assert admitted == pytest.approx(20_000 + 100 * 1000, rel=0.01)


# -- in the bridge's sequencer --------------------------------------------------------------------------


@pytest.fixture
def bridge(tmp_path: Path) -> Bridge:
    ledger = Ledger(tmp_path / "ledger.db")
    regs = []
    for ident in (DEV, DEV2):
        reg = Registration(dev=ident.device_id, pk=ident.public_key, profile="heart_rate_band", owner="patient:a",
                           site="ward", ts=int(time.time() * 1000))
        regs.append((registration_entry(OPERATOR, reg), reg))
    ledger.append_registrations(regs)
    cfg = BridgeConfig(data_dir=tmp_path, limits=Limits(max_events_per_s=10, burst=5))
    b = Bridge(cfg, BrokerConfig(), LOG_KEY, ledger)  # not started: process() is driven directly
    b.rate_guard.clock = Clock()
    return b


START_MS = int(time.time() * 1000)


def events(ident: Identity, seqs: range) -> list[tuple[str, bytes]]:
    """The same bytes every time for a given seq, as an agent's resend."""
    return [(f"cc/v1/dev/{ident.device_id}/ev", envelope.sign(
        ident, make_payload(ident.device_id, s, START_MS + s, "heart_rate", {"bpm": 70}))) for s in seqs]


def test_the_bridge_anchors_the_burst_and_refuses_the_rest_as_rate_limited(bridge: Bridge) -> None:
    size = bridge.ledger.size
    bridge.process(events(DEV, range(8)) + events(DEV2, range(2)))
    assert bridge.stats.anchored == 5 + 2
    assert dict(bridge.stats.rejected) == {"rate_limited": 3}
    assert bridge.ledger.size == size + 7
    assert bridge.ledger.event_index(DEV.device_id, 5) is None


def test_refused_events_are_anchored_when_resent_later(bridge: Bridge) -> None:
    bridge.process(events(DEV, range(8)))
    bridge.rate_guard.clock.t += 0.35  # three tokens (and a half)
    bridge.process(events(DEV, range(5, 8)))
    assert bridge.stats.anchored == 8
    assert [bridge.ledger.event_index(DEV.device_id, s) is not None for s in range(8)] == [True] * 8


def test_resends_of_anchored_events_are_reacknowledged_even_when_the_bucket_is_empty(bridge: Bridge) -> None:
    bridge.process(events(DEV, range(5)))  # the burst is spent
    bridge.process(events(DEV, range(5)))  # the agent missed the receipts and resends
    assert bridge.stats.duplicates == 5
    assert dict(bridge.stats.rejected) == {}


def test_duplicates_do_not_use_up_tokens(bridge: Bridge) -> None:
    bridge.process(events(DEV, range(3)))
    bridge.process(events(DEV, range(3)))  # three duplicates while tokens remain: their tokens come back
    bridge.process(events(DEV, range(3, 5)))
    assert (bridge.stats.anchored, bridge.stats.duplicates, dict(bridge.stats.rejected)) == (5, 3, {})


# -- receipts to unregistered ids: one budget for all of them ---------------------------------------------


def test_receipts_to_unregistered_ids_share_one_bucket_and_are_counted() -> None:
    clock = Clock()
    budget = UnregisteredReceipts(rate=2.0, burst=3, clock=clock)
    assert [budget.allow() for _ in range(5)] == [True, True, True, False, False]
    clock.t += 1.0
    assert [budget.allow() for _ in range(3)] == [True, True, False]
    assert (budget.sent, budget.suppressed) == (5, 3)


def test_a_junk_flood_signs_a_bounded_number_of_receipts_but_registered_devices_hear_everything(
        bridge: Bridge) -> None:
    clock = Clock()
    bridge.sequencer.unregistered_receipts = UnregisteredReceipts(rate=10.0, burst=50, clock=clock)
    strangers = [Identity.generate() for _ in range(400)]
    junk = [(f"cc/v1/dev/{s.device_id}/ev", envelope.sign(s, make_payload(s.device_id, 0, START_MS, "heart_rate",
                                                                          {"bpm": 70}))) for s in strangers]
    junk += [(f"cc/v1/dev/{s.device_id}/ev", b"\xde\xad") for s in strangers[:100]]  # malformed, unknown topic
    junk += [(f"cc/v1/dev/{DEV.device_id}/ev", b"\xde\xad")]  # a registered device's refusal is always receipted
    batch = bridge.sequencer.sequence(bridge.receiver.check(junk + events(DEV2, range(1))), START_MS)
    assert len(batch.rejections) == 501  # every refusal still counted by reason
    strangers_receipted = sum(len(r.rejected) for d, r in batch.receipts.items() if d != DEV.device_id)
    assert strangers_receipted == 50 and batch.unreceipted == 450
    assert batch.receipts[DEV.device_id].rejected[0].reason == "malformed"
    assert batch.receipts[DEV2.device_id].ok  # and an event of a registered device is acknowledged
    assert bridge.sequencer.unregistered_receipts.suppressed == 450


@pytest.mark.integration
def test_junk_from_unique_unregistered_ids_over_the_broker_gets_few_receipts(broker, running_bridge) -> None:
    """Real mosquitto (and, with 2 workers, real ingest processes): 3,000 signed events from 3,000 made-up ids."""
    bridge = running_bridge
    budget = bridge.sequencer.unregistered_receipts
    heard: list[str] = []
    ready = threading.Event()
    listener = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda _c, _u, m: heard.append(m.topic)
    listener.on_subscribe = lambda *_a: ready.set()
    listener.connect(broker.host, broker.port)
    listener.loop_start()
    listener.subscribe("cc/v1/dev/+/rcpt", qos=1)
    assert ready.wait(5)
    n = 3000
    now = int(time.time() * 1000)
    junk = []
    for _ in range(n):
        s = Identity.generate()
        junk.append((topics.events(s.device_id),
                     envelope.sign(s, make_payload(s.device_id, 0, now, "heart_rate", {"bpm": 70}))))
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    started = time.monotonic()
    for topic, payload in junk:
        pub.publish(topic, payload, qos=1)
    deadline = time.monotonic() + 60
    while bridge.stats.rejected.get("unregistered", 0) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # the last receipts reach the listener
    for c in (pub, listener):
        c.disconnect()
        c.loop_stop()
    assert bridge.stats.rejected["unregistered"] == n  # every one counted
    assert len(heard) == budget.sent <= budget.burst + budget.rate * elapsed + 1
    assert budget.sent + budget.suppressed == n
