"""Issue 12, item 10 (first half): the bridge's inbox is bounded, with back-pressure rather than loss.

A real bridge on a real mosquitto is flooded with events from unique unregistered ids while its sequencer
is held up: the inbox never holds more than `bridge.limits.inbox_max_messages`, paho's network thread
waits (QoS 1 stays unacknowledged, the broker keeps the rest), the bridge stays connected, and once the
sequencer runs again every message is taken in and a registered device's events are all receipted.
Stopping the bridge while its inbox is full does not hang.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from test_miners_integration import wait_for
from test_proof_paging_integration import signed_event

from carechain import topics
from carechain.config import BridgeConfig, Limits
from carechain.entries import Registration, registration_entry
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import Ledger

pytestmark = pytest.mark.integration
INBOX = 200
JUNK = 3_000
REAL = 20
DEADLINE_S = 90  # a bound so a broken run fails instead of hanging; nothing asserts on timing
OPERATOR = Identity.from_seed(b"\x10" * 32)


@dataclass
class World:
    bridge: Bridge
    dev: Identity
    device: mqtt.Client
    flooder: mqtt.Client
    receipts: queue.SimpleQueue[bytes]


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def setup(request: pytest.FixtureRequest, tmp_path: Path, broker: Any) -> Iterator[World]:  # conftest's TestBroker
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    dev = Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    reg = Registration(dev=dev.device_id, pk=dev.public_key, profile="heart_rate_band", owner="patient:t",
                       site="lab", ts=int(time.time() * 1000))
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", batch_max=50, ingest_workers=request.param,
                       limits=Limits(max_event_bytes=2048, inbox_max_messages=INBOX))
    bridge = Bridge(cfg, broker.config, Identity.generate(), ledger, client_id=f"bridge-{uuid.uuid4().hex[:8]}")
    receipts: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    ready = threading.Event()
    device = connect_client(broker.config, f"device-{uuid.uuid4().hex[:8]}", connected=ready,
                            on_message=lambda _c, _u, m: receipts.put(bytes(m.payload)),
                            subscriptions=[(topics.receipts(dev.device_id), 1)])
    flood_ready = threading.Event()
    flooder = connect_client(broker.config, f"flooder-{uuid.uuid4().hex[:8]}", connected=flood_ready)
    bridge.start()
    try:
        assert bridge.wait_ready(30) and ready.wait(30) and flood_ready.wait(30)
        yield World(bridge, dev, device, flooder, receipts)
    finally:
        bridge.stop()
        for c in (device, flooder):
            c.disconnect()
            c.loop_stop()
        ledger.close()


def flood(w: World) -> None:
    """JUNK events, each from a new unregistered id, with the registered device's REAL events among them."""
    flooder, dev, device = w.flooder, w.dev, w.device
    junk = [Identity.generate() for _ in range(JUNK)]
    for i, ident in enumerate(junk):
        flooder.publish(topics.events(ident.device_id), signed_event(ident, 1), qos=1)
        if i % (JUNK // REAL) == 0:
            seq = i // (JUNK // REAL) + 1
            device.publish(topics.events(dev.device_id), signed_event(dev, seq), qos=1)


def test_a_junk_flood_waits_at_the_broker_instead_of_filling_the_bridges_memory(setup: World) -> None:
    bridge = setup.bridge
    inbox = bridge.receiver.inbox
    high = 0
    with bridge.ledger_lock:  # the sequencer is held up (as by a slow disk)
        flood(setup)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the network thread keeps receiving until the inbox is full
            high = max(high, inbox.qsize())
            time.sleep(0.01)
        if not bridge.cfg.ingest_workers:  # (each worker's inbox is the same `Inbox`, in its own process)
            assert high <= INBOX, f"the inbox held {high} messages, its bound is {INBOX}"
            assert inbox.stats["waited"] > 0  # paho's thread is waiting for room: the broker holds the rest
        assert bridge.connected.is_set()
    wait_for("every event taken in and the device's events anchored",
             lambda: bridge.stats.received >= JUNK + REAL and bridge.stats.anchored == REAL)
    wait_for("the device's receipts", lambda: setup.receipts.qsize() > 0)
    assert inbox.stats["abandoned"] == 0  # back-pressure, not loss


def test_stopping_with_a_full_inbox_does_not_hang(setup: World) -> None:
    bridge = setup.bridge
    with bridge.ledger_lock:
        flood(setup)
        if bridge.cfg.ingest_workers:
            time.sleep(2)  # the workers' inboxes and their queue to the sequencer fill up
        else:
            wait_for("a full inbox", lambda: bridge.receiver.inbox.stats["waited"] > 0)
        stopper = threading.Thread(target=bridge.stop, daemon=True)
        stopper.start()
    stopper.join(DEADLINE_S)
    assert not stopper.is_alive(), "Bridge.stop hung on a full inbox"
