"""The clustered broker tier: a real 3-node NATS cluster (JetStream, MQTT listeners), devices speaking MQTT with
their own logins, the bridge pulling from a durable JetStream consumer and acknowledging only after commit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
import pytest
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from carechain import envelope, topics
from carechain.batch import encode_batch
from carechain.config import BridgeConfig, BrokerConfig, ConfigError, NatsIngestConfig
from carechain.credentials import MqttCredentials
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.broker.nats import EVENTS_STREAM, NatsUser, bridge_user, device_user, mqtt_subject
from chain_bridge.ingest.nats_source import NatsSource
from chain_bridge.ledger.store import Ledger
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox
from simulators.fault_harness import Result
from simulators.nats_cluster import NatsCluster, nats_binary

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(nats_binary() is None, reason="nats-server is not installed (apt nats-server)")]

OPERATOR = Identity.from_seed(b"\x17" * 32)
BRIDGE_USER, BRIDGE_PASSWORD = "carechain-bridge", "bridge-secret-for-tests"
DEVICES = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(9)]  # 3 agents x 3 devices
STRANGER = Identity.from_seed(b"\x99" * 32)  # has a login, is never registered
ADMIN = "test-admin"  # the operator's own login: deletes the events' stream between tests
FAULT_RESULTS: list[Result] = []  # the node kills: rows of the fault table printed at the end (tests/conftest.py)


def password(device_id: str) -> str:
    return f"pw-{device_id}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    users = (bridge_user(BRIDGE_USER, BRIDGE_PASSWORD), NatsUser(ADMIN, ADMIN, publish=(">",), subscribe=(">",)),
             *(device_user(d.device_id, password(d.device_id)) for d in [*DEVICES, STRANGER]))
    with NatsCluster(tmp_path_factory.mktemp("nats"), users=users) as c:
        yield c


def bridge_config(cluster: NatsCluster, data_dir: Path) -> BridgeConfig:
    return BridgeConfig(data_dir=data_dir, checkpoint_interval_s=0.3, contracts=False, ingest="nats",
                        nats=NatsIngestConfig(servers=cluster.servers, ack_wait_s=3.0))


def empty_stream(cluster: NatsCluster) -> None:
    """Each test's bridge starts from an empty ledger: drop what an earlier test left in the work queue (which
    also holds one consumer only), so the bridge creates both afresh."""
    async def delete() -> None:
        nc = await nats.connect(servers=cluster.servers, user=ADMIN, password=ADMIN)
        try:
            await nc.jetstream().delete_stream(EVENTS_STREAM)
        except NotFoundError:
            pass
        finally:
            await nc.close()

    # Its own thread and loop: async tests call this from inside theirs.
    t = threading.Thread(target=lambda: asyncio.run(delete()))
    t.start()
    t.join(30)


def start_bridge(cluster: NatsCluster, tmp_path: Path, node: int = 0) -> Bridge:
    empty_stream(cluster)
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    register(ledger, DEVICES)
    bridge = Bridge(bridge_config(cluster, tmp_path / "bridge"),
                    cluster.mqtt(node, BRIDGE_USER, BRIDGE_PASSWORD), Identity.generate(), ledger,
                    client_id=BRIDGE_USER)
    bridge.start()
    assert bridge.wait_ready(30)
    return bridge


def register(ledger: Ledger, idents: list[Identity]) -> None:
    now = int(time.time() * 1000)
    ledger.append_registrations([(registration_entry(OPERATOR, reg), reg) for reg in (
        Registration(dev=i.device_id, pk=i.public_key, profile="heart_rate_band", owner="patient:t", site="lab",
                     ts=now) for i in idents)])


# Devices move to another node when theirs dies: `broker.failover` lists the other nodes' MQTT listeners
# (carechain.transport tries them in turn, and asks again for a subscription a node refused while JetStream
# elected a leader). Without it a device waits for its own node to come back.
FAILOVER = "failover" in BrokerConfig.model_fields


def node_broker(cluster: NatsCluster, n: int) -> BrokerConfig:
    """Node n's MQTT listener, with the other nodes' as failover when the transport supports it."""
    broker = cluster.mqtt(n)
    if FAILOVER:
        others = [f"{cluster.host}:{cluster.nodes[m].ports.mqtt}" for m in range(cluster.size) if m != n]
        broker = broker.model_copy(update={"failover": others})
    return broker


def make_agents(cluster: NatsCluster, bridge: Bridge, tmp_path: Path) -> list[Agent]:
    """Three agents of three devices each, agent i on node i's MQTT listener, each device with its own login."""
    agents = []
    for n in range(3):
        fleet = DEVICES[3 * n:3 * n + 3]
        creds = {d.device_id: MqttCredentials(username=d.device_id, password=password(d.device_id),
                                              device_id=d.device_id) for d in fleet}
        agents.append(Agent([AgentDevice(d, None) for d in fleet], Outbox(tmp_path / f"agent{n}" / "outbox.db"),
                            node_broker(cluster, n), bridge.log_key.public_key, window=200, resend_after_s=3.0,
                            client_id=f"agent{n}", credentials=creds))
    return agents


async def run_agents(agents: list[Agent], until: Callable[[], bool], timeout: float = 90.0,
                     during: Callable[[float], None] | None = None) -> bool:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    started = time.monotonic()
    try:
        while not until() and time.monotonic() < started + timeout:
            if during is not None:
                during(time.monotonic() - started)
            await asyncio.sleep(0.1)
        return until()
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def anchored(ledger_path: Path) -> dict[tuple[str, int], int]:
    """(device, seq) → times it is in the log, read from the ledger file itself."""
    reader = Ledger(ledger_path)
    try:
        rows = reader._db.execute("SELECT device_id, seq FROM events").fetchall()
    finally:
        reader.close()
    counts: dict[tuple[str, int], int] = {}
    for dev, seq in rows:
        counts[(dev, seq)] = counts.get((dev, seq), 0) + 1
    return counts


# -- the topic mapping and the logins -----------------------------------------------------------------

def test_mqtt_topics_map_to_the_subjects_nats_server_uses() -> None:
    assert mqtt_subject("cc/v1/dev/abcdefgh23456777/ev") == "cc.v1.dev.abcdefgh23456777.ev"
    assert mqtt_subject(topics.EVENTS_WILDCARD) == "cc.v1.dev.*.ev"
    assert mqtt_subject("cc/v1/#") == "cc.v1.>"
    with pytest.raises(ValueError, match="no plain NATS subject"):
        mqtt_subject("cc/v1/a.b")  # nats-server would escape the dot; none of our topics has one


def test_the_cluster_keeps_events_in_a_3_replica_work_queue_that_survives_a_node(cluster: NatsCluster,
                                                                               tmp_path: Path) -> None:
    bridge = start_bridge(cluster, tmp_path)
    try:
        info = cluster.jsz(0)
        streams = {s["name"]: s for a in info.get("account_details", []) for s in a.get("stream_detail", [])}
        stream = streams[EVENTS_STREAM]
        assert stream["config"]["retention"] == "workqueue"
        assert stream["config"]["num_replicas"] == 3
        assert len(stream["cluster"]["replicas"]) == 2  # the leader and two more copies
    finally:
        bridge.stop()
        bridge.ledger.close()


def _mqtt(broker: BrokerConfig, client_id: str) -> tuple[mqtt.Client, list[mqtt.MQTTMessage], list[list[int]]]:
    got: list[mqtt.MQTTMessage] = []
    granted: list[list[int]] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.username_pw_set(broker.username, broker.password)
    c.on_message = lambda _c, _u, m: got.append(m)
    c.on_subscribe = lambda _c, _u, _m, codes, _p: granted.append([rc.value for rc in codes])
    c.connect(broker.host, broker.port)
    c.loop_start()
    deadline = time.monotonic() + 20
    while not c.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.is_connected(), f"{client_id} did not connect to {broker.address}"
    return c, got, granted


def test_a_device_login_reaches_only_its_own_topics_and_only_over_mqtt(cluster: NatsCluster) -> None:
    me, other = DEVICES[0].device_id, DEVICES[1].device_id
    broker = cluster.mqtt(1, me, password(me))
    spy = cluster.mqtt(2, BRIDGE_USER, BRIDGE_PASSWORD)
    bridge_side, seen, _ = _mqtt(spy, "acl-spy")
    device, _, granted = _mqtt(broker, "acl-device")
    try:
        bridge_side.subscribe(topics.EVENTS_WILDCARD, 1)
        # Its own receipts yes; another's no; nor the QoS 1 delivery subjects of other sessions, which its login
        # must be allowed as NATS subjects ($MQTT.sub.>) but cannot reach as an MQTT topic.
        device.subscribe([(topics.receipts(me), 1), (topics.receipts(other), 1), ("$MQTT/sub/#", 1)])
        deadline = time.monotonic() + 10
        while len(granted) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert granted == [[1, 0x80, 0x80]]
        time.sleep(0.5)
        device.publish(topics.events(other), b"forged", qos=1)  # refused by the broker: never delivered
        device.publish(topics.events(me), b"mine", qos=1)
        deadline = time.monotonic() + 10
        while not any(m.payload == b"mine" for m in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m.topic for m in seen] == [topics.events(me)]
    finally:
        for c in (device, bridge_side):
            c.disconnect()
            c.loop_stop()

    async def core_nats_login() -> None:
        nc = await nats.connect(servers=cluster.servers, user=me, password=password(me), connect_timeout=2,
                                allow_reconnect=False, max_reconnect_attempts=0)
        await nc.close()

    with pytest.raises((NatsError, OSError)):  # a device's login is for MQTT only
        asyncio.run(core_nats_login())


def test_the_bridge_refuses_to_start_with_a_clear_error_when_the_cluster_cannot_be_reached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing answers, so the start gives up when its timeout (30 s) runs out: waited 3 s here, the same path.
    real_start = NatsSource.start
    monkeypatch.setattr(NatsSource, "start", lambda self, timeout=30.0: real_start(self, timeout=min(timeout, 3.0)))
    ledger = Ledger(tmp_path / "ledger.db")
    cfg = BridgeConfig(data_dir=tmp_path, contracts=False, ingest="nats",
                       nats=NatsIngestConfig(servers=["nats://127.0.0.1:9"]))
    bridge = Bridge(cfg, BrokerConfig(port=9), Identity.generate(), ledger)
    try:
        with pytest.raises(ConfigError, match="cannot set up the events' stream 'CC_EVENTS'"):
            bridge.start()
    finally:
        bridge.stop()
        ledger.close()


# -- anchoring through the cluster ------------------------------------------------------------------------

def record(agents: list[Agent], per_device: int, start: int = 0) -> None:
    for agent in agents:
        for dev in agent.devices:
            for k in range(start, start + per_device):
                agent.record(dev, [("heart_rate", {"bpm": 40 + k % 100})])


async def test_agents_on_every_node_get_every_event_anchored_once_and_receipted(cluster: NatsCluster,
                                                                                tmp_path: Path) -> None:
    bridge = start_bridge(cluster, tmp_path, node=1)
    try:
        agents = make_agents(cluster, bridge, tmp_path)
        record(agents, 50)
        assert await run_agents(agents, lambda: all(a.outbox.depth() == 0 for a in agents))
        counts = anchored(bridge.ledger.path)
        assert len(counts) == 9 * 50 and set(counts.values()) == {1}
        assert sum(a.stats.acked for a in agents) == 9 * 50  # each agent heard its receipts over MQTT
        # Every message pulled (one event each, or an agent's batch of them) is acknowledged after its commit
        # (the last batch's receipts leave just before its acknowledgements).
        assert bridge._nats is not None
        stats = bridge._nats.stats
        deadline = time.monotonic() + 10
        while stats["acked"] < stats["pulled"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["acked"] == stats["pulled"] > 0
    finally:
        bridge.stop()
        bridge.ledger.close()


def pulling_source(cluster: NatsCluster, tmp_path: Path, batch_max: int = 100) -> tuple[Ledger, NatsSource]:
    """A started puller of the events' work queue (emptied first) on node 0, over a ledger with DEVICES registered."""
    from chain_bridge.ingest import Receiver

    empty_stream(cluster)
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    register(ledger, DEVICES)
    cfg = bridge_config(cluster, tmp_path / "bridge")
    source = NatsSource(cfg.nats, Receiver(ledger, cfg.limits, batch_max),
                        cluster.mqtt(0, BRIDGE_USER, BRIDGE_PASSWORD))
    source.start()
    return ledger, source


async def test_an_event_pulled_but_never_committed_is_delivered_again(cluster: NatsCluster, tmp_path: Path) -> None:
    """A bridge that dies between pulling and committing loses nothing: the next one gets the events again.
    The five events go as one batch message, so one pull takes them all (a pull asks for about `batch_max`
    events' worth of messages, and another `receive` first hands back what the last one left unsettled)."""
    ledger, source = pulling_source(cluster, tmp_path)
    cfg = bridge_config(cluster, tmp_path / "bridge")
    device, _, _ = _mqtt(cluster.mqtt(2, DEVICES[4].device_id, password(DEVICES[4].device_id)), "redeliver")
    try:
        signed = [envelope.sign(DEVICES[4], make_payload(DEVICES[4].device_id, seq, int(time.time() * 1000),
                                                         "heart_rate", {"bpm": 70})) for seq in range(5)]
        device.publish(topics.events(DEVICES[4].device_id), encode_batch(signed), qos=1).wait_for_publish(10)
        first: list[object] = []
        deadline = time.monotonic() + 20
        while len(first) < 5 and time.monotonic() < deadline:
            first += source.receive(0.5)
        assert len(first) == 5
    finally:
        source.stop()  # "dies": nothing settled
    from chain_bridge.ingest import Receiver

    again = NatsSource(cfg.nats, Receiver(ledger, cfg.limits, 100), cluster.mqtt(1, BRIDGE_USER, BRIDGE_PASSWORD))
    again.start()
    try:
        second: list[object] = []
        deadline = time.monotonic() + 20  # ack_wait_s is 3 s
        while len(second) < 5 and time.monotonic() < deadline:
            second += again.receive(0.5)
        assert sorted(v.seq for v in second) == list(range(5))  # type: ignore[attr-defined]
        assert again.stats["redelivered"] == 1  # the one message
        again.settle()
        assert again.receive(4.0) == []  # acknowledged after the commit: never again
    finally:
        again.stop()
        device.disconnect()
        device.loop_stop()
        ledger.close()


@pytest.mark.skipif(not FAILOVER, reason="devices need broker.failover to leave a dead node (docs/nats.md)")
@pytest.mark.parametrize("victim", ["stream-leader", "bridge-node"])
async def test_killing_one_node_during_a_burst_loses_no_event_and_stops_no_device(
        cluster: NatsCluster, tmp_path: Path, victim: str) -> None:
    bridge = start_bridge(cluster, tmp_path, node=0)
    try:
        agents = make_agents(cluster, bridge, tmp_path)
        # The node of the bridge's MQTT session (node 0), or the one leading the events' stream.
        node = 0 if victim == "bridge-node" else stream_leader(cluster)
        record(agents, 150)
        killed_at: list[float] = []
        acked_at_kill: list[int] = []
        restarted = threading.Event()

        def fault(_elapsed: float) -> None:
            # Every agent's devices are subscribed to their receipts (one came back) before the fault.
            if not killed_at and all(a.stats.acked for a in agents):
                acked_at_kill.extend(a.stats.acked for a in agents)
                cluster.kill(node)
                killed_at.append(time.monotonic())
                record(agents, 150, start=150)  # the burst goes on while the node is down
            elif killed_at and not restarted.is_set():
                # The node stays down until every agent — those on the dead node too, moved to another — has
                # had more events anchored and receipted.
                if all(a.stats.acked > before for a, before in zip(agents, acked_at_kill, strict=True)):
                    cluster.restart(node)
                    restarted.set()
                else:
                    assert time.monotonic() < killed_at[0] + 60, (
                        f"some agent got nothing anchored in 60 s without node {node}: "
                        f"{describe(cluster, bridge, agents)}")

        done = await run_agents(agents, lambda: restarted.is_set() and all(a.outbox.depth() == 0 for a in agents),
                                timeout=150, during=fault)
        counts = anchored(bridge.ledger.path)
        FAULT_RESULTS.append(Result(f"NATS node kill -9 during a burst ({victim})", 9 * 300, len(counts),
                                    9 * 300 - len(counts), sum(n - 1 for n in counts.values()),
                                    time.monotonic() - killed_at[0] if killed_at else 0.0, done))
        assert done, f"not drained: {describe(cluster, bridge, agents)}"
        assert len(counts) == 9 * 300  # every event signed is in the log ...
        assert set(counts.values()) == {1}  # ... exactly once
    finally:
        bridge.stop()
        bridge.ledger.close()


def describe(cluster: NatsCluster, bridge: Bridge, agents: list[Agent]) -> str:
    """What a failure message needs: each agent's outbox and receipts, the bridge's counts, the consumer's state."""
    live = next(i for i, n in enumerate(cluster.nodes) if n.running)
    consumers = [(c["name"], c.get("num_pending"), c.get("num_ack_pending"))
                 for a in cluster.jsz(live).get("account_details", []) for s in a.get("stream_detail", [])
                 if s["name"] == EVENTS_STREAM for c in s.get("consumer_detail", [])]
    return (f"outboxes {[a.outbox.depth() for a in agents]}, acked {[a.stats.acked for a in agents]}, "
            f"sent {[a.stats.sent for a in agents]}; bridge {bridge.stats.as_dict()}, "
            f"nats {bridge._nats.stats if bridge._nats else None}; consumer (name, pending, ack pending) {consumers}")


def stream_leader(cluster: NatsCluster) -> int:
    info = cluster.jsz(0)
    for account in info.get("account_details", []):
        for s in account.get("stream_detail", []):
            if s["name"] == EVENTS_STREAM:
                leader = s["cluster"]["leader"]
                return [n.name for n in cluster.nodes].index(leader)
    raise AssertionError(f"no stream {EVENTS_STREAM} on the cluster")

