"""No login can take over another client's id (issue 12, item 4), on a real mosquitto locked down as shipped.

MQTT hands a client id to its newest connection: on a broker where ids are free to choose, a device login
connecting as `carechain-bridge`, as a bridge worker, as another device's agent or as a miner kicks the real
client off, and the two fight (a clean-session takeover also wipes the bridge's persistent session). With
`use_username_as_clientid true` (the shipped template, and tests/broker/mosquitto-locked-test.conf through
tests/locked_broker.py) the broker replaces every id by the login's user name, so an attacker can only ever
take over itself. Every party has its own login (`carechain bridge acl`), so no two real clients share an id.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest

from carechain import topics
from carechain.config import BridgeConfig, BrokerConfig
from carechain.identity import Identity
from chain_bridge.assembly import default_client_id
from chain_bridge.bridge import Bridge
from chain_bridge.broker import worker_user
from chain_bridge.broker.acl import miner_user
from chain_bridge.ledger.store import Ledger
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox
from simulators.mosquitto import mosquitto_binary
from tests.locked_broker import BRIDGE, LockedBroker, login, start_locked_broker, wait_until
from tests.test_pipeline import _run_agents

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]

MINER = Identity.generate().device_id


@pytest.fixture
def devices() -> list[Identity]:
    return [Identity.generate() for _ in range(2)]  # A (the attacker's stolen login) and B (the victim)


@pytest.fixture
def locked(tmp_path: Path, devices: list[Identity]):
    lb = start_locked_broker(tmp_path, devices, workers=1, add_miners=[MINER])
    yield lb
    lb.close()


def takeovers(locked: LockedBroker) -> list[str]:
    """Client ids whose connection mosquitto closed because the same id connected again."""
    return re.findall(r"Client (\S+) already connected, closing old connection", locked.mosquitto.log_text())


def test_a_device_login_cannot_kick_the_bridge_a_worker_a_miner_or_another_device(locked: LockedBroker,
                                                                                   devices: list[Identity]) -> None:
    a, b = devices[0].device_id, devices[1].device_id
    b_id = f"cc-agent-1a2b3c4d-{b}"  # as an agent names its device's connection
    victims = {
        "bridge": locked.login(BRIDGE, client_id=BRIDGE, clean_session=False),
        "worker": locked.login(worker_user(BRIDGE, 0), client_id=worker_user(BRIDGE, 0)),
        "miner": locked.login(miner_user(MINER), client_id=miner_user(MINER)),
        "device B": locked.login(b, client_id=b_id, clean_session=False),
    }
    assert all(v.accepted for v in victims.values())
    victims["bridge"].subscribe(topics.EVENTS_WILDCARD)
    victims["device B"].subscribe(topics.receipts(b))
    stolen = locked.credentials(a)
    for target in (BRIDGE, worker_user(BRIDGE, 0), miner_user(MINER), b_id, b, f"{BRIDGE}-0a1b2c3d"):
        attacker = login(locked.port, stolen.username, stolen.password, client_id=target)  # clean session
        assert attacker.accepted  # the broker lets A in, as A
        attacker.close()
    # the round trip B -> bridge -> B runs on the connections the attacks aimed at
    victims["device B"].publish(topics.events(b), b"event of B")
    assert wait_until(lambda: victims["bridge"].got(topics.events(b), b"event of B"))
    victims["bridge"].publish(topics.receipts(b), b"receipt for B")
    assert wait_until(lambda: victims["device B"].got(topics.receipts(b), b"receipt for B"))
    dropped = [name for name, v in victims.items() if v.dropped.is_set()]
    assert dropped == [], f"taken over: {dropped}"
    assert takeovers(locked) == []
    log = locked.mosquitto.log_text()
    assert log.count(f" as {a} (") == 6  # every attack connected as A itself, whatever id it asked for
    for v in victims.values():
        v.close()


async def test_device_b_keeps_getting_receipts_while_a_device_login_tries_every_id(locked: LockedBroker,
                                                                                    devices: list[Identity]) -> None:
    """A real bridge and a real agent: A's login hammers the bridge's, B's and a miner's ids the whole time."""
    a, b = devices
    cfg = BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.3)
    bridge_broker = locked.config(BRIDGE)
    bridge = Bridge(cfg, bridge_broker, Identity.generate(), Ledger(locked.ledger.path),
                    client_id=default_client_id(bridge_broker.username, locked.data_dir))
    assert bridge.client_id == BRIDGE  # its login: the id a broker with tied ids gives it anyway
    bridge.start()
    try:
        assert bridge.wait_ready(30)
        agent = Agent([AgentDevice(b, None)], Outbox(locked.root / "agent" / "outbox.db"),
                      BrokerConfig(port=locked.port), bridge.log_key.public_key, window=20, resend_after_s=5.0,
                      credentials={b.device_id: locked.credentials(b.device_id)})
        n = 60
        for k in range(n):
            agent.record(b.device_id, [("heart_rate", {"bpm": 60 + k % 40})])
        stolen = locked.credentials(a.device_id)
        targets = [BRIDGE, agent.device_client_id(b.device_id), miner_user(MINER), worker_user(BRIDGE, 0)]
        stop = threading.Event()
        attacks = 0

        def hammer() -> None:
            nonlocal attacks
            while not stop.is_set():
                for target in targets:
                    conn = login(locked.port, stolen.username, stolen.password, client_id=target)
                    attacks += conn.accepted
                    conn.close()

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        try:
            await _run_agents([agent], lambda: agent.outbox.depth() == 0 and attacks >= 2 * len(targets),
                              timeout=60)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)
        assert attacks >= 2 * len(targets)
        assert agent.stats.acked == n and agent.outbox.depth() == 0
        assert agent.stats.sent == n  # nothing resent: no connection of B's or the bridge's was cut
        assert takeovers(locked) == []
        agent.outbox.close()
    finally:
        bridge.stop()
        bridge.ledger.close()


async def test_the_bridge_and_its_ingest_workers_each_hold_their_own_id(locked: LockedBroker,
                                                                        devices: list[Identity]) -> None:
    """With ids tied to logins, workers logging in as the bridge would take over the bridge and one another."""
    cfg = BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.3, ingest_workers=1)
    broker = locked.config(BRIDGE)
    bridge = Bridge(cfg, broker, Identity.generate(), Ledger(locked.ledger.path),
                    client_id=default_client_id(broker.username, locked.data_dir))
    bridge.start()
    try:
        assert bridge.wait_ready(30)
        b = devices[1]
        agent = Agent([AgentDevice(b, None)], Outbox(locked.root / "agent" / "outbox.db"),
                      BrokerConfig(port=locked.port), bridge.log_key.public_key, window=20, resend_after_s=5.0,
                      credentials={b.device_id: locked.credentials(b.device_id)})
        for k in range(20):
            agent.record(b.device_id, [("heart_rate", {"bpm": 60 + k})])
        await _run_agents([agent], lambda: agent.outbox.depth() == 0, timeout=30)
        assert agent.stats.acked == 20 and agent.stats.sent == 20
        log = locked.mosquitto.log_text()
        assert f" as {worker_user(BRIDGE, 0)} (" in log
        assert takeovers(locked) == []
        agent.outbox.close()
    finally:
        bridge.stop()
        bridge.ledger.close()
