"""Ingest workers on a NATS cluster: several processes pull from the one durable JetStream consumer and verify;
the sequencer acknowledges each message only after it is committed, so a worker killed mid-run loses nothing.

A real 3-node cluster (JetStream, MQTT listeners), devices publishing over MQTT with their own logins, the bridge
and its workers logging in as the bridge."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt
import pytest
from nats.js.errors import NotFoundError

from carechain import envelope, topics
from carechain.config import BridgeConfig, Limits, NatsIngestConfig
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.broker.nats import EVENTS_CONSUMER, EVENTS_STREAM, NatsUser, bridge_user, device_user
from chain_bridge.ledger.store import Ledger
from simulators.nats_cluster import NatsCluster, nats_binary
from tests.test_nats_ingest import anchored, password

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(nats_binary() is None, reason="nats-server is not installed (apt nats-server)")]

OPERATOR = Identity.from_seed(b"\x27" * 32)
BRIDGE_USER, BRIDGE_PASSWORD = "carechain-bridge", "bridge-secret-for-worker-tests"
ADMIN = "test-admin"  # deletes the events' stream between tests
DEVICES = [Identity.from_seed(bytes([0x40 + i]) * 32) for i in range(6)]
BATCH = 20  # small batches: the work spreads over many pulls, so each worker holds some when it is killed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    users = (bridge_user(BRIDGE_USER, BRIDGE_PASSWORD), NatsUser(ADMIN, ADMIN, publish=(">",), subscribe=(">",)),
             *(device_user(d.device_id, password(d.device_id)) for d in DEVICES))
    with NatsCluster(tmp_path_factory.mktemp("nats"), users=users) as c:
        yield c


def run_async(make: Callable[[], Any]) -> Any:
    """Run one admin coroutine on a loop of its own (the tests are synchronous, the client is asyncio)."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(asyncio.run(make())))
    t.start()
    t.join(30)
    return result[0] if result else None


def admin(cluster: NatsCluster, action: Callable[[Any], Any]) -> Any:
    async def run() -> Any:
        nc = await nats.connect(servers=cluster.servers, user=ADMIN, password=ADMIN)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()
    return run_async(run)


def empty_stream(cluster: NatsCluster) -> None:
    async def delete(js: Any) -> None:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(EVENTS_STREAM)
    admin(cluster, delete)


def stream_messages(cluster: NatsCluster) -> int:
    """Messages in the work queue: published and not yet acknowledged by the bridge."""
    async def count(js: Any) -> int:
        return int((await js.stream_info(EVENTS_STREAM)).state.messages)
    return int(admin(cluster, count))


def ack_pending(cluster: NatsCluster) -> int:
    """Messages handed to pullers and not acknowledged yet."""
    async def info(js: Any) -> int:
        return int((await js.consumer_info(EVENTS_STREAM, EVENTS_CONSUMER)).num_ack_pending)
    return int(admin(cluster, info))


def start_bridge(cluster: NatsCluster, tmp_path: Path, workers: int) -> Bridge:
    empty_stream(cluster)
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    now = int(time.time() * 1000)
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg) for reg in (
        Registration(dev=d.device_id, pk=d.public_key, profile="heart_rate_band", owner="patient:w", site="lab",
                     ts=now) for d in DEVICES)])
    # A worker's queue to the sequencer holds two batches: while the sequencer is held up, the workers soon hold
    # pulled messages they cannot hand over.
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3, contracts=False, ingest="nats",
                       ingest_workers=workers, batch_max=BATCH, batch_wait_ms=0,
                       limits=Limits(inbox_max_messages=2 * BATCH),
                       nats=NatsIngestConfig(servers=cluster.servers, ack_wait_s=2.0))
    bridge = Bridge(cfg, cluster.mqtt(0, BRIDGE_USER, BRIDGE_PASSWORD), Identity.generate(), ledger,
                    client_id=BRIDGE_USER)
    bridge.start()
    assert bridge.wait_ready(30)
    return bridge


class Devices:
    """The devices' MQTT connections, one per device on its own login, spread over the three nodes."""

    def __init__(self, cluster: NatsCluster, name: str) -> None:
        self.clients: dict[str, mqtt.Client] = {}
        for i, d in enumerate(DEVICES):
            broker = cluster.mqtt(i % cluster.size)
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{i}")
            c.username_pw_set(d.device_id, password(d.device_id))
            c.connect(broker.host, broker.port)
            c.loop_start()
            self.clients[d.device_id] = c

    def send(self, seqs: range) -> None:
        now = int(time.time() * 1000)
        sent = []
        for seq in seqs:
            for d in DEVICES:
                raw = envelope.sign(d, make_payload(d.device_id, seq, now, "heart_rate", {"bpm": 60 + seq % 40}))
                sent.append(self.clients[d.device_id].publish(topics.events(d.device_id), raw, qos=1))
        for info in sent:
            info.wait_for_publish(30)  # PUBACK: the cluster stored it in the stream

    def close(self) -> None:
        for c in self.clients.values():
            c.disconnect()
            c.loop_stop()


def wait_until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.1)


def test_two_workers_get_every_event_anchored_once_and_acknowledged_after_commit(cluster: NatsCluster,
                                                                                tmp_path: Path) -> None:
    bridge = start_bridge(cluster, tmp_path, workers=2)
    devices = Devices(cluster, f"dev-{tmp_path.name}")
    try:
        devices.send(range(50))
        expected = {(d.device_id, seq) for d in DEVICES for seq in range(50)}
        wait_until(lambda: anchored(bridge.ledger.path).keys() == expected, 60,
                   lambda: f"anchored {len(anchored(bridge.ledger.path))} of {len(expected)}; {bridge.stats.as_dict()}")
        assert set(anchored(bridge.ledger.path).values()) == {1}
        wait_until(lambda: stream_messages(cluster) == 0, 10, lambda: f"{stream_messages(cluster)} left unacknowledged")
        assert bridge._nats is not None and bridge._nats.stats["acked"] == len(expected)

        # Held up before its commit, the sequencer acknowledges nothing: the work queue keeps every message.
        with bridge.ledger_lock:
            before = len(anchored(bridge.ledger.path))
            devices.send(range(50, 70))
            time.sleep(1.0)  # the workers pull and check meanwhile
            assert stream_messages(cluster) == len(DEVICES) * 20
            assert len(anchored(bridge.ledger.path)) == before
        wait_until(lambda: stream_messages(cluster) == 0, 30, lambda: f"{stream_messages(cluster)} left unacknowledged")
        assert len(anchored(bridge.ledger.path)) == len(DEVICES) * 70
    finally:
        devices.close()
        bridge.stop()
        bridge.ledger.close()


def test_a_worker_killed_while_holding_pulled_events_loses_none_of_them(cluster: NatsCluster, tmp_path: Path) -> None:
    bridge = start_bridge(cluster, tmp_path, workers=2)
    devices = Devices(cluster, f"dev-{tmp_path.name}")
    pool = bridge._pool
    assert pool is not None
    try:
        devices.send(range(20))
        wait_until(lambda: len(anchored(bridge.ledger.path)) == len(DEVICES) * 20, 60,
                   lambda: f"anchored {len(anchored(bridge.ledger.path))}; {bridge.stats.as_dict()}")
        with bridge.ledger_lock:  # the sequencer stops taking batches: each worker is left holding one
            devices.send(range(20, 120))

            seen: list[int] = []

            def workers_stuck() -> bool:
                """Pulling has stopped with events still waiting in the stream: every worker is blocked handing a
                pulled batch to the full queue."""
                seen.append(ack_pending(cluster))
                return len(seen) >= 4 and len(set(seen[-4:])) == 1 and 0 < seen[-1] < stream_messages(cluster)
            wait_until(workers_stuck, 30, lambda: f"ack pending {seen[-5:]}, stream {stream_messages(cluster)}")
            victim = pool.pids[0]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: pool.alive() == 1, 10, lambda: f"worker exit codes {pool.exitcodes}")
        expected = {(d.device_id, seq) for d in DEVICES for seq in range(120)}
        wait_until(lambda: anchored(bridge.ledger.path).keys() == expected, 90,
                   lambda: f"anchored {len(anchored(bridge.ledger.path))} of {len(expected)}; "
                           f"ack pending {ack_pending(cluster)}; {bridge.stats.as_dict()}")
        # The dead worker's batch was delivered to it alone: it is in the log because JetStream delivered it
        # again after ack_wait, to the living worker.
        assert set(anchored(bridge.ledger.path).values()) == {1}  # the dedup absorbs any second delivery
        wait_until(lambda: stream_messages(cluster) == 0, 30, lambda: f"{stream_messages(cluster)} left unacknowledged")
    finally:
        devices.close()
        bridge.stop()
        bridge.ledger.close()
