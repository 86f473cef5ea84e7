"""Issue 12, item 1: one proof request for 10,000 entries must not knock the bridge off the broker.

A private mosquitto with a small `max_packet_size` (as a production broker has one) drops any client that
publishes a larger packet — and paho resends the same QoS 1 message at every reconnect. The bridge must
answer in pages under the limit, stay connected and keep sending receipts, and an honest miner far
behind must catch up page by page and cosign.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from test_miners_integration import wait_for

from carechain import envelope, topics
from carechain import miner_messages as messages
from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import EventCandidate, Ledger
from simulators.miners import CARECHAIN
from simulators.mosquitto import TEST_CONF, Mosquitto, mosquitto_binary

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
BROKER_MAX_PACKET = 200_000  # bytes; the bridge keeps its default page budget (128 KiB), below it
FILLER_LEAVES = 12_000
FILLER_BYTES = 200  # → 400 hex characters per entry: 10,000 entries are a ~4 MB answer unpaged
DEADLINE_S = 90  # a bound so a broken run fails instead of hanging; nothing asserts on timing
OPERATOR = Identity.from_seed(b"\x12" * 32)


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if mosquitto_binary() is None:
        pytest.skip("needs mosquitto")
    conf = tmp_path / "small-packets.conf"
    lines = [line for line in TEST_CONF.read_text().splitlines() if not line.startswith("max_packet_size")]
    conf.write_text("\n".join([*lines, f"max_packet_size {BROKER_MAX_PACKET}", "log_type notice", ""]))
    with Mosquitto(tmp_path / "mosquitto", conf=conf) as m:
        yield m


class Collector:
    """A plain MQTT client that keeps every message on the topics it subscribes to."""

    def __init__(self, broker: BrokerConfig, client_id: str, subscriptions: list[tuple[str, int]]) -> None:
        self.messages: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self.connected = threading.Event()
        self.client = connect_client(broker, client_id, on_message=lambda _c, _u, m: self.messages.put(m),
                                     subscriptions=subscriptions, connected=self.connected)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def signed_event(dev: Identity, seq: int) -> bytes:
    return envelope.sign(dev, make_payload(dev.device_id, seq, int(time.time() * 1000), "heart_rate",
                                           {"bpm": 60 + seq % 40}))


def bridge_disconnects(m: Mosquitto, client_id: str) -> list[str]:
    return [line for line in m.log_text().splitlines() if client_id in line and "disconnect" in line.lower()]


def test_a_request_for_10000_entries_is_paged_and_the_bridge_keeps_receipting(small_broker: Mosquitto,
                                                                                tmp_path: Path) -> None:
    broker = BrokerConfig(host=small_broker.host, port=small_broker.port)
    log_key, dev = Identity.generate(), Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    reg = Registration(dev=dev.device_id, pk=dev.public_key, profile="heart_rate_band", owner="patient:t",
                       site="lab", ts=int(time.time() * 1000))
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg)])
    ledger.append_events([EventCandidate("filler", i, b"f" * FILLER_BYTES + i.to_bytes(4, "big"))
                          for i in range(FILLER_LEAVES)])
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3, limits=Limits(max_event_bytes=2048))
    bridge_id = f"bridge-{uuid.uuid4().hex[:8]}"
    bridge = Bridge(cfg, broker, log_key, ledger, client_id=bridge_id)
    requester = Collector(broker, f"greedy-{uuid.uuid4().hex[:8]}", [(messages.response("greedy"), 1)])
    device = Collector(broker, f"device-{uuid.uuid4().hex[:8]}", [(topics.receipts(dev.device_id), 1)])
    bridge.start()
    try:
        assert bridge.wait_ready(30) and requester.connected.wait(30) and device.connected.wait(30)
        for seq in range(1, 21):  # events before, between and after the greedy requests
            device.client.publish(topics.events(dev.device_id), signed_event(dev, seq), qos=1)
            if seq % 5 == 0:
                req = messages.ProofRequestMessage(id=f"r{seq}", old_size=0, new_size=10_000)
                requester.client.publish(messages.request("greedy"), req.model_dump_json().encode(), qos=1)
            time.sleep(0.05)
        wait_for("20 events anchored and receipted, and 4 answers",
                 lambda: bridge.stats.anchored == 20 and device.messages.qsize() > 0
                 and requester.messages.qsize() >= 4)
        pages = [requester.messages.get_nowait() for _ in range(requester.messages.qsize())]
        assert bridge.stats.anchored == 20
        for msg in pages:
            assert len(msg.payload) < BROKER_MAX_PACKET
            page = messages.ProofResponseMessage.model_validate_json(msg.payload)
            assert page.error is None and 0 < len(page.entries) < 10_000
        assert bridge.connected.is_set()
        assert bridge_disconnects(small_broker, bridge_id) == [], "the bridge was dropped by the broker"
    finally:
        bridge.stop()
        requester.stop()
        device.stop()
        ledger.close()


def test_a_miner_far_behind_catches_up_page_by_page_and_cosigns(small_broker: Mosquitto, tmp_path: Path) -> None:
    broker = BrokerConfig(host=small_broker.host, port=small_broker.port)
    log_key, miner_key = Identity.generate(), Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    ledger.append_events([EventCandidate("filler", i, b"f" * FILLER_BYTES + i.to_bytes(4, "big"))
                          for i in range(FILLER_LEAVES)])
    bridge_id = f"bridge-{uuid.uuid4().hex[:8]}"
    bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3), broker, log_key, ledger,
                    client_id=bridge_id)
    miner_dir = tmp_path / "miner"
    miner_dir.mkdir()
    miner_key.save(miner_dir / "miner.key")
    cosigs = Collector(broker, f"observer-{uuid.uuid4().hex[:8]}", [(messages.cosignature(miner_key.device_id), 1)])
    bridge.start()
    proc = subprocess.Popen([*CARECHAIN, "miner", "--data-dir", str(miner_dir), "--broker",
                             f"{broker.host}:{broker.port}", "--log-public-key", log_key.public_key.hex()],
                            cwd=miner_dir, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert bridge.wait_ready(30) and cosigs.connected.wait(30)
        deadline = time.monotonic() + DEADLINE_S
        cosigned = 0
        while cosigned < FILLER_LEAVES:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the miner cosigned {cosigned} of {FILLER_LEAVES} leaves"
            try:
                msg = cosigs.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            cosigned = json.loads(msg.payload)["tree_size"]
        assert cosigned == FILLER_LEAVES == ledger.size
        assert bridge.proofs.stats["answered"] > 1  # it took more than one page
        assert bridge_disconnects(small_broker, bridge_id) == []
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        bridge.stop()
        cosigs.stop()
        ledger.close()


def test_a_bridge_started_on_an_idle_log_publishes_its_latest_checkpoint(small_broker: Mosquitto,
                                                                         tmp_path: Path) -> None:
    """The newest signed checkpoint is published (retained) whenever the bridge's link comes up, not only when
    the log grows: a bridge restarted on an idle log, a first checkpoint issued while the link was still coming up,
    or a broker restarted without its retained messages would otherwise leave miners nothing to cosign (CI caught
    the second: a miner far behind cosigned nothing in 90 s)."""
    broker = BrokerConfig(host=small_broker.host, port=small_broker.port)
    log_key = Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    ledger.append_events([EventCandidate("filler", i, b"f" * 40 + i.to_bytes(4, "big")) for i in range(50)])
    note = ledger.issue_checkpoint(log_key, "carechain-test")  # what a previous run left: the log has not grown
    bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3), broker, log_key, ledger,
                    client_id=f"bridge-{uuid.uuid4().hex[:8]}")
    bridge.start()
    watcher = Collector(broker, f"watcher-{uuid.uuid4().hex[:8]}", [(topics.CHECKPOINT, 0)])
    try:
        assert bridge.wait_ready(30) and watcher.connected.wait(30)
        got = watcher.messages.get(timeout=10)
        assert got.payload.decode() == note
        # the watcher may have subscribed before the publish arrived (then it is delivered live, retain unset);
        # a subscriber that comes later must find it retained on the broker
        late = Collector(broker, f"late-{uuid.uuid4().hex[:8]}", [(topics.CHECKPOINT, 0)])
        try:
            retained = late.messages.get(timeout=10)
        finally:
            late.stop()
        assert retained.retain and retained.payload.decode() == note
        assert bridge.stats.checkpoints_issued == 0  # published again, not issued again
    finally:
        watcher.stop()
        bridge.stop()
        ledger.close()
