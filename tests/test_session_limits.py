"""One device login cannot hoard broker sessions (issue 12, item 5), on a real mosquitto locked down as shipped.

On a broker where client ids are free to choose, one login can open any number of persistent sessions under
random ids, each subscribed to the checkpoint topic and queueing for days. With `use_username_as_clientid`
every login has exactly one id, so at most one session; `persistent_client_expiration` bounds how long it is
kept, `max_queued_messages`/`max_queued_bytes` what it may queue, and checkpoints reach devices at QoS 0,
which mosquitto never queues for an offline client (`queue_qos0_messages false`).
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import pytest

from carechain import topics
from carechain.identity import Identity
from chain_bridge.broker import SECURE_CONF_TEMPLATE
from chain_bridge.broker.acl import DEFAULT_BRIDGE_USER
from simulators.mosquitto import REPO, mosquitto_binary
from tests.locked_broker import BRIDGE, LockedBroker, login, start_locked_broker, wait_until

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.fixture
def locked(tmp_path: Path):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    lb = start_locked_broker(tmp_path, [Identity.generate()])
    yield lb
    lb.close()


def _device(locked: LockedBroker) -> str:
    return next(iter(locked.access.device_credentials))


@needs_mosquitto
@pytest.mark.integration
def test_persistent_sessions_under_random_ids_are_one_session_of_the_login(locked: LockedBroker) -> None:
    dev = _device(locked)
    password = locked.password(dev)
    for n in range(20):  # 20 "different" clients, each asking the broker to keep its session
        conn = login(locked.port, dev, password, client_id=f"hoard-{secrets.token_hex(6)}", clean_session=False)
        assert conn.accepted
        assert conn.session_present == (n > 0)  # from the second one on, it is the same session again
        conn.subscribe(topics.CHECKPOINT)
        conn.close()
    assert len(re.findall(rf" as {dev} \(p2, c0,", locked.mosquitto.log_text())) == 20


@needs_mosquitto
@pytest.mark.integration
def test_an_offline_device_session_queues_what_it_is_owed_but_no_checkpoints(locked: LockedBroker) -> None:
    """QoS 1 receipts wait for an offline device; checkpoints published at QoS 0 do not pile up behind them."""
    dev = _device(locked)
    conn = locked.login(dev, clean_session=False)
    conn.subscribe(topics.CHECKPOINT, topics.receipts(dev))
    conn.close()
    bridge = locked.login(BRIDGE)
    for k in range(5):
        bridge.client.publish(topics.CHECKPOINT, b"checkpoint %d" % k, qos=0, retain=True).wait_for_publish(5)
    bridge.publish(topics.receipts(dev), b"receipt")  # QoS 1, after the checkpoints: the sync point
    back = locked.login(dev, clean_session=False)
    assert back.session_present
    assert wait_until(lambda: back.got(topics.receipts(dev), b"receipt"))
    assert [p for t, p in back.messages if t == topics.CHECKPOINT] == []  # none queued while it was away
    back.subscribe(topics.CHECKPOINT, qos=1)  # a device that wants the checkpoint reads the retained latest
    assert wait_until(lambda: back.got(topics.CHECKPOINT, b"checkpoint 4"))
    for c in (bridge, back):
        c.close()


@needs_mosquitto
@pytest.mark.integration
async def test_checkpoints_the_bridge_issues_do_not_pile_up_for_an_offline_device(tmp_path: Path) -> None:
    from carechain import envelope
    from carechain.config import BridgeConfig
    from carechain.events import make_payload
    from chain_bridge.bridge import Bridge
    from chain_bridge.ledger.store import Ledger

    away, busy = Identity.generate(), Identity.generate()
    locked = start_locked_broker(tmp_path, [away, busy])
    try:
        conn = locked.login(away.device_id, clean_session=False)
        conn.subscribe(topics.CHECKPOINT)  # then it goes offline, its session kept
        conn.close()
        bridge = Bridge(BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.1), locked.config(BRIDGE),
                        Identity.generate(), Ledger(locked.ledger.path), client_id=BRIDGE)
        bridge.start()
        try:
            assert bridge.wait_ready(30)
            sender = locked.login(busy.device_id)
            sender.subscribe(topics.receipts(busy.device_id))
            for seq in range(1, 4):  # one checkpoint per event: each is receipted, then checkpointed
                payload = make_payload(busy.device_id, seq, int(time.time() * 1000), "heart_rate", {"bpm": 60})
                sender.publish(topics.events(busy.device_id), envelope.sign(busy, payload))
                assert wait_until(lambda seq=seq: bridge.stats.checkpoints >= seq, 15)
            sender.close()
        finally:
            bridge.stop()
            bridge.ledger.close()
        back = locked.login(away.device_id, clean_session=False)
        assert back.session_present
        back.subscribe(topics.CHECKPOINT)  # the retained latest comes after anything queued
        assert wait_until(lambda: any(back.retained))
        assert back.retained.count(False) == 0, f"{back.retained.count(False)} checkpoint(s) queued while away"
        back.close()
    finally:
        locked.close()


def _settings(text: str) -> list[tuple[str, str]]:
    pairs = [(ln.strip().split(None, 1) + [""])[:2] for ln in text.splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    return [(k, v) for k, v in pairs]


def test_the_shipped_template_ties_ids_to_logins_and_bounds_sessions_on_every_listener() -> None:
    settings = _settings(SECURE_CONF_TEMPLATE.read_text())
    values = dict(settings)
    assert values["persistent_client_expiration"] == "7d"
    assert values["queue_qos0_messages"] == "false"
    assert int(values["max_queued_messages"]) > 0 and int(values["max_queued_bytes"]) > 0
    blocks: list[list[tuple[str, str]]] = []
    for key, value in settings:
        if key == "listener":
            blocks.append([])
        elif blocks:
            blocks[-1].append((key, value))
    assert blocks and all(("use_username_as_clientid", "true") in b for b in blocks)
    assert all(any(k == "max_connections" for k, _ in b) for b in blocks)
    # a listener option before the first `listener` line would open a default listener on 1883
    assert "use_username_as_clientid" not in dict(settings[:settings.index(("listener", "8883"))])
    # the commented plain listener, once uncommented, carries the option too
    plain = SECURE_CONF_TEMPLATE.read_text().split("#listener 1883 127.0.0.1\n", 1)[1]
    assert plain.startswith("#use_username_as_clientid true\n")
    locked_test = dict(_settings((REPO / "tests" / "broker" / "mosquitto-locked-test.conf").read_text()))
    assert locked_test["persistent_client_expiration"] == "7d" and DEFAULT_BRIDGE_USER == BRIDGE
