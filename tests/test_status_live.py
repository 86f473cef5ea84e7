"""Device status reports end to end, with real processes: a mosquitto locked down by the generated passwd and
ACL, a real `Agent` with its device's own login, and the bridge draining its outbox. Statuses are read by the
bridge's login through the broker (a bridge-host login, so the running bridge keeps its own session) and fed
to a `DeviceStatusBook`, as the bridge does.

Denied publishes are checked by non-delivery with a positive control sent after them on the same connection
(mosquitto forwards one client's messages in order; see tests/test_broker_acl.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from carechain import topics
from carechain.config import BridgeConfig, BrokerConfig
from carechain.device_status import StatusReport, parse_status, sign_status
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.bridge import Bridge
from chain_bridge.broker.acl import host_user
from chain_bridge.status_intake import ACCEPTED, DeviceStatusBook
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox
from simulators.mosquitto import mosquitto_binary
from tests.locked_broker import BRIDGE, LockedBroker, start_locked_broker, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]


@pytest.fixture
def devices() -> list[Identity]:
    return [Identity.generate() for _ in range(2)]


@pytest.fixture
def locked(tmp_path: Path, devices: list[Identity]) -> Iterator[LockedBroker]:
    lb = start_locked_broker(tmp_path, devices, hosts=1)  # the host login reads statuses beside the bridge
    yield lb
    lb.close()


class StatusWatcher:
    """The bridge's side of the status topic, through the broker: every report heard, and the book."""

    def __init__(self, lb: LockedBroker) -> None:
        registry = lb.ledger.devices()  # read once here: the ledger's connection stays on this thread
        self.book = DeviceStatusBook(registry.get)
        self.heard: list[StatusReport] = []
        self._lock = threading.Lock()
        self.ready = threading.Event()
        user = host_user(BRIDGE, 0)
        cfg = BrokerConfig(host=lb.mosquitto.host, port=lb.port, username=user, password=lb.password(BRIDGE))
        self.client = connect_client(cfg, user, on_message=self._on_message,
                                     subscriptions=[(topics.STATUS_WILDCARD, 0)], connected=self.ready)
        assert self.ready.wait(10), "the status watcher did not connect"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        device = topics.device_of_status_topic(msg.topic)
        assert device is not None, msg.topic
        payload = bytes(msg.payload)
        with self._lock:
            self.heard.append(parse_status(payload, device).report)
        self.book.receive(device, payload)

    def reports(self) -> list[StatusReport]:
        with self._lock:
            return list(self.heard)

    def depth(self, device_id: str) -> int | None:
        status = self.book.snapshot().get(device_id)
        return None if status is None else status.outbox_depth

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_can_publish_a_status_only_on_its_own_topic(locked: LockedBroker, devices) -> None:
    a, b = devices
    watcher = StatusWatcher(locked)
    snoop = locked.login(b.device_id)
    snoop.subscribe(topics.STATUS_WILDCARD, topics.status(a.device_id), "cc/v1/#")  # devices read no statuses
    dev_a = locked.login(a.device_id)
    now = int(time.time() * 1000)
    dev_a.publish(topics.status(b.device_id), sign_status(a, now, 666))  # onto B's topic: the ACL refuses it
    dev_a.publish(topics.events(b.device_id), b"not even an event")  # nor B's event topic
    dev_a.publish(topics.status(a.device_id), sign_status(a, now + 1, 1, 90))  # the positive control
    try:
        assert wait_until(lambda: watcher.depth(a.device_id) == 1)
        assert [r.device_id for r in watcher.reports()] == [a.device_id]
        assert watcher.book.counts()[ACCEPTED] == 1 and sum(watcher.book.counts().values()) == 1
        assert watcher.book.snapshot()[a.device_id].battery_pct == 90
        assert snoop.messages == []
    finally:
        for c in (snoop, dev_a):
            c.close()
        watcher.close()


async def _until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_the_agents_status_follows_its_real_outbox_through_an_outage(tmp_path: Path, locked: LockedBroker,
                                                                           devices) -> None:
    dev = devices[0]
    dev_id = dev.device_id
    watcher = StatusWatcher(locked)
    log_key = Identity.generate()
    outbox = Outbox(tmp_path / "agent" / "outbox.db")
    agent = Agent([AgentDevice(dev, None, battery=lambda: 77)], outbox,
                  BrokerConfig(host=locked.mosquitto.host, port=locked.port), log_key.public_key,
                  credentials={dev_id: locked.credentials(dev_id)}, resend_after_s=2.0, status_interval_s=1.0,
                  client_id=f"agent-{tmp_path.name}")
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    bridge: Bridge | None = None
    try:
        # Up, nothing queued: its link-up (or first periodic) status says so, with the battery level.
        assert await _until(lambda: watcher.depth(dev_id) == 0)
        assert watcher.book.snapshot()[dev_id].battery_pct == 77
        # The broker goes down: readings queue in the outbox, and statuses are skipped, not queued.
        locked.mosquitto.stop()
        assert await _until(lambda: not agent.connected)
        down_at = int(time.time() * 1000)
        for k in range(25):
            agent.record(dev_id, [("heart_rate", {"bpm": 60 + k})])
        offline_before = agent.status.stats.offline
        assert await _until(lambda: agent.status.stats.offline > offline_before)
        locked.mosquitto.start()
        up_at = int(time.time() * 1000)
        # Back: no bridge yet, so nothing is receipted and the status shows all 25 waiting.
        assert await _until(lambda: watcher.depth(dev_id) == 25)
        assert not [r for r in watcher.reports() if down_at < r.ts_ms < up_at]  # nothing from the outage
        # The bridge anchors and receipts them: the outbox drains and the status goes back to 0.
        bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3),
                        locked.config(BRIDGE), log_key, locked.ledger, client_id=BRIDGE)
        bridge.start()
        assert await asyncio.to_thread(bridge.wait_ready, 30)
        assert await _until(lambda: outbox.depth() == 0)
        assert await _until(lambda: watcher.depth(dev_id) == 0)
        depths = [r.outbox for r in watcher.reports()]
        assert 25 in depths and depths[-1] == 0
        assert all(x.ts_ms < y.ts_ms for x, y in zip(watcher.reports(), watcher.reports()[1:], strict=False))
        assert watcher.book.counts()[ACCEPTED] == len(watcher.reports())  # every report heard was accepted
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        if bridge is not None:
            bridge.stop()
        watcher.close()
        outbox.close()
