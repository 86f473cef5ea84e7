"""End to end over a real broker: agents → MQTT → bridge → ledger → receipts → proofs."""

from __future__ import annotations

import asyncio
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from carechain import envelope, topics
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.proofs import verify_consistency_bundle, verify_inclusion_bundle
from carechain.receipts import open_receipt
from chain_bridge.ledger.proofs import consistency_bundle, inclusion_bundle
from chain_bridge.ledger.store import Ledger
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox

pytestmark = pytest.mark.integration
OPERATOR = Identity.from_seed(b"\x11" * 32)


def register(ledger: Ledger, idents: list[Identity], operator: Identity = OPERATOR) -> None:
    now = int(time.time() * 1000)
    items = []
    for i in idents:
        reg = Registration(dev=i.device_id, pk=i.public_key, profile="heart_rate_band", owner="patient:t",
                           site="lab", ts=now)
        items.append((registration_entry(operator, reg), reg))
    ledger.append_registrations(items)


async def _run_agents(agents: list[Agent], until, timeout: float = 60.0) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks)


async def test_events_from_several_agents_land_exactly_once_with_valid_proofs(tmp_path, broker, running_bridge):
    bridge = running_bridge
    fleets = [[Identity.generate() for _ in range(2)] for _ in range(3)]
    register(bridge.ledger, [i for fleet in fleets for i in fleet])
    agents = []
    for n, fleet in enumerate(fleets):
        outbox = Outbox(tmp_path / f"agent{n}" / "outbox.db")
        agent = Agent([AgentDevice(i, None) for i in fleet], outbox, broker.config, bridge.log_key.public_key,
                      window=50, resend_after_s=2.0, client_id=f"agent-{n}-{tmp_path.name}")
        for ident in fleet:
            for k in range(40):
                agent.record(ident.device_id, [("heart_rate", {"bpm": 60 + k})])
        agents.append(agent)
    total = 3 * 2 * 40
    reader = Ledger(bridge.ledger.path)

    def drained() -> bool:
        cp = reader.latest_checkpoint()
        return all(a.outbox.depth() == 0 for a in agents) and cp is not None and cp[0] == bridge.ledger.size

    await _run_agents(agents, drained)
    assert [a.outbox.depth() for a in agents] == [0, 0, 0]
    assert sum(a.stats.acked for a in agents) == total
    reader = Ledger(bridge.ledger.path)
    assert reader.count_events() == total  # exactly once: dedup table has one row per (device, seq)
    assert reader.size == 6 + total  # 6 registrations + events, nothing appended twice
    for fleet in fleets:
        for ident in fleet:
            for seq in (0, 17, 39):
                bundle = inclusion_bundle(reader, ident.device_id, seq, bridge.log_key.public_key)
                verified = verify_inclusion_bundle(bundle, bridge.log_key.public_key)
                assert (verified.device_id, verified.seq) == (ident.device_id, seq)
    first = reader._db.execute("SELECT MIN(tree_size) FROM checkpoints").fetchone()[0]
    old, new = verify_consistency_bundle(consistency_bundle(reader, first, None, bridge.log_key.public_key))
    assert new.tree_size == reader.size


def _collect_receipts(broker, device_id: str, log_pk: bytes):
    got: list = []
    ready = threading.Event()
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = lambda _c, _u, m: got.append(open_receipt(m.payload, log_pk, device_id))
    c.on_subscribe = lambda *_a: ready.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.subscribe(topics.receipts(device_id), qos=1)
    assert ready.wait(5)
    return c, got


def test_hostile_events_over_the_broker_are_rejected_with_reasons(tmp_path, broker, running_bridge):
    bridge = running_bridge
    device, rogue = Identity.generate(), Identity.generate()
    register(bridge.ledger, [device])
    now = int(time.time() * 1000)
    genuine = envelope.sign(device, make_payload(device.device_id, 0, now, "heart_rate", {"bpm": 70}))
    listener, receipts = _collect_receipts(broker, device.device_id, bridge.log_key.public_key)
    rogue_listener, rogue_receipts = _collect_receipts(broker, rogue.device_id, bridge.log_key.public_key)
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()

    def send(dev: str, payload: bytes) -> None:
        pub.publish(topics.events(dev), payload, qos=1).wait_for_publish(5)

    send(device.device_id, genuine)
    deadline = time.monotonic() + 10
    while not receipts and time.monotonic() < deadline:
        time.sleep(0.05)
    size_after_genuine = bridge.ledger.size
    send(device.device_id, envelope.sign(rogue, make_payload(device.device_id, 1, now, "heart_rate", {"bpm": 1 + 70}),
                                         kid=device.device_id))
    send(rogue.device_id, envelope.sign(rogue, make_payload(rogue.device_id, 0, now, "heart_rate", {"bpm": 70})))
    send(device.device_id, envelope.sign(device, make_payload(device.device_id, 0, now, "heart_rate", {"bpm": 99})))
    send(device.device_id, b"\x00" * 4096)
    send(device.device_id, b"\xde\xad\xbe\xef")
    send(device.device_id, genuine)  # an exact replay: re-acknowledged with its original index
    deadline = time.monotonic() + 10
    reasons = lambda: sorted(r.reason for rc in receipts + rogue_receipts for r in rc.rejected)  # noqa: E731
    while len(reasons()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    while sum(len(rc.ok) for rc in receipts) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for c in (pub, listener, rogue_listener):
        c.disconnect()
        c.loop_stop()
    assert reasons() == ["bad_signature", "malformed", "seq_reused", "too_large", "unregistered"]
    oks = [ok for rc in receipts for ok in rc.ok]
    assert oks[0] == oks[1]  # the replay got the original leaf index
    assert bridge.ledger.size == size_after_genuine
    assert bridge.stats.anchored == 1 and bridge.stats.duplicates == 1
