"""A broker that lets no one in where they don't belong: the passwd + ACL from `carechain bridge acl`,
enforced by a real mosquitto, with every device its own MQTT principal; and the bridge's own check that
holds even on an open broker.

Denied publishes are checked by *non-delivery with a positive control*: with MQTT 3.1.1 mosquitto
PUBACKs a publish the ACL refuses, so each test sends an allowed message after the refused one on the
same connection and waits for it; mosquitto forwards one client's messages in order, so the refused one
would have arrived first.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from carechain import envelope, topics
from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.credentials import load_mqtt_credentials
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.receipts import open_receipt
from chain_bridge.bridge import Bridge
from chain_bridge.broker import worker_user
from chain_bridge.broker.acl import (
    BrokerAccessError,
    acl_text,
    aggregator_user,
    hash_password,
    host_user,
    miner_user,
    plan_logins,
    store_user,
    verify_password,
)
from chain_bridge.ledger.store import Ledger
from chain_bridge.workers import shared_subscription
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox
from simulators.mosquitto import mosquitto_binary
from tests.locked_broker import (
    BRIDGE,
    LockedBroker,
    can_login,
    login,
    register,
    revoke,
    start_locked_broker,
    wait_until,
)
from tests.test_pipeline import _run_agents

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.fixture
def devices() -> list[Identity]:
    return [Identity.generate() for _ in range(3)]


@pytest.fixture
def locked(tmp_path: Path, devices: list[Identity]):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    lb = start_locked_broker(tmp_path, devices, workers=2)
    yield lb
    lb.close()


def _event(ident: Identity, seq: int, bpm: int = 70, kid: str | None = None, dev: str | None = None) -> bytes:
    payload = make_payload(dev or ident.device_id, seq, int(time.time() * 1000), "heart_rate", {"bpm": bpm})
    return envelope.sign(ident, payload, kid=kid) if kid else envelope.sign(ident, payload)


# -- the password hash --------------------------------------------------------------------------------

def test_password_hashes_are_mosquitto_2_pbkdf2_sha512_lines() -> None:
    line = hash_password("correct horse", salt=b"\x01" * 12)
    assert line.startswith("$7$101$AQEBAQEBAQEBAQEB$") and len(line.split("$")[4]) == 88  # 64 bytes, base64
    assert verify_password(line, "correct horse")
    assert not verify_password(line, "correct horsE")
    assert hash_password("x") != hash_password("x")  # a fresh salt every time


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_our_hash_reads_mosquitto_passwd_output_the_same_way(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw_file), "alice", "s3cret-Ü"], check=True,
                   capture_output=True)
    user, encoded = pw_file.read_text().strip().split(":", 1)
    assert user == "alice" and encoded.startswith("$7$101$")
    assert verify_password(encoded, "s3cret-Ü") and not verify_password(encoded, "s3cret")
    salt = __import__("base64").b64decode(encoded.split("$")[3])
    assert hash_password("s3cret-Ü", salt=salt) == encoded  # byte for byte what mosquitto_passwd wrote


def test_the_acl_gives_each_device_exactly_its_own_topics() -> None:
    from chain_bridge.ledger.store import DeviceRecord

    a = DeviceRecord("aaaaaaaaaaaaaaaa", b"\0" * 32, "scale", "patient:x", "ward 3\nuser evil", 4, None)
    text = acl_text(BRIDGE, [a], registry_version=2, revoked=1)
    rules = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert rules == [
        f"user {BRIDGE}", "topic read cc/v1/dev/+/ev", "topic read cc/v1/dev/+/status", "topic write cc/v1/dev/+/rcpt",
        "topic write cc/v1/log/checkpoint", "topic write cc/v1/log/final", "topic read cc/v1/log/final",
        "topic read cc/v1/miner/+/req", "topic read cc/v1/miner/+/cosig", "topic read cc/v1/miner/+/evidence",
        "topic read cc/v1/miner/+/hello", "topic read cc/v1/miner/+/study", "topic write cc/v1/miner/+/resp",
        "topic read cc/v1/access/records", "topic read cc/v1/access/evidence", "topic write cc/v1/party/+/inbox",
        f"user {BRIDGE}-archive", "topic write cc/v1/store/+/req", "topic read cc/v1/store/+/resp",
        "topic read cc/v1/store/+/hello", "topic read cc/v1/log/final",
        "user aaaaaaaaaaaaaaaa", "topic write cc/v1/dev/aaaaaaaaaaaaaaaa/ev",
        "topic write cc/v1/dev/aaaaaaaaaaaaaaaa/status",
        "topic read cc/v1/dev/aaaaaaaaaaaaaaaa/rcpt", "topic read cc/v1/log/checkpoint",
    ]  # a newline smuggled into a registry label cannot add a line
    assert text.splitlines()[0].startswith("#")


def test_each_miner_its_storage_server_and_its_aggregator_write_only_their_own_topics() -> None:
    m = "mmmmmmmmmmmmmmmm"
    text = acl_text(BRIDGE, [], registry_version=0, revoked=0, miner_ids=[m])
    blocks = {b.splitlines()[0]: [ln for ln in b.splitlines()[1:] if not ln.startswith("#")]
              for b in ("\n" + text).split("\nuser ")[1:]}
    writes = {u: sorted(ln.removeprefix("topic write ") for ln in rules if ln.startswith("topic write"))
              for u, rules in blocks.items()}
    assert writes[miner_user(m)] == sorted([f"cc/v1/miner/{m}/req", f"cc/v1/miner/{m}/cosig",
                                            f"cc/v1/miner/{m}/evidence", f"cc/v1/miner/{m}/hello",
                                            f"cc/v1/miner/{m}/study", "cc/v1/party/+/inbox"])
    assert writes[store_user(m)] == sorted([f"cc/v1/store/{m}/resp", f"cc/v1/store/{m}/hello"])
    # study results come from the aggregator's own login (it writes that one topic and reads nothing); the
    # miner's session writes the same topic for its trial entries; nobody else writes any miner's study topic
    assert blocks[aggregator_user(m)] == [f"topic write cc/v1/miner/{m}/study"]
    assert sorted(u for u, w in writes.items() if any(t.endswith("/study") for t in w)) == sorted(
        [aggregator_user(m), miner_user(m)])
    assert "topic read cc/v1/miner/+/study" in blocks[BRIDGE]
    assert [u for u, w in writes.items() if "cc/v1/miner/+/resp" in w] == [BRIDGE]  # only the bridge answers
    assert f"topic read cc/v1/store/{m}/req" in blocks[store_user(m)]
    assert f"topic read cc/v1/miner/{m}/resp" in blocks[miner_user(m)]


def test_login_plans_keep_passwords_rotate_on_request_and_refuse_bad_names() -> None:
    first = plan_logins({}, BRIDGE, ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    assert first.added == [BRIDGE, f"{BRIDGE}-archive", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
    assert first.logins[f"{BRIDGE}-archive"].password == first.logins[BRIDGE].password  # one provisioning file
    again = plan_logins(first.logins, BRIDGE, ["aaaaaaaaaaaaaaaa", "cccccccccccccccc"], rotate=["aaaaaaaaaaaaaaaa"])
    assert again.logins[BRIDGE] == first.logins[BRIDGE]
    assert again.logins["aaaaaaaaaaaaaaaa"].password != first.logins["aaaaaaaaaaaaaaaa"].password
    assert (again.added, again.rotated, again.removed) == (["cccccccccccccccc"], ["aaaaaaaaaaaaaaaa"],
                                                           ["bbbbbbbbbbbbbbbb"])
    for bad in ("", "has space", "a:b", "aaaaaaaaaaaaaaaa"):
        with pytest.raises(BrokerAccessError):
            plan_logins({}, bad, [])
    with pytest.raises(BrokerAccessError, match="cannot rotate"):
        plan_logins({}, BRIDGE, [], rotate=["nobody"])
    with pytest.raises(BrokerAccessError, match="not a device id"):
        plan_logins({}, BRIDGE, ["x\ntopic readwrite #"])


# -- who gets in --------------------------------------------------------------------------------------

@needs_mosquitto
def test_only_the_right_password_gets_in_and_nobody_anonymous(locked: LockedBroker, devices) -> None:
    a, b = devices[0].device_id, devices[1].device_id
    ok = [locked.login(a), locked.login(BRIDGE)]
    assert all(c.accepted for c in ok)
    refused = [
        login(locked.port),  # anonymous
        login(locked.port, a, "not-the-password"),
        login(locked.port, a, locked.password(b)),  # another device's password
        login(locked.port, "someone", locked.password(a)),
        login(locked.port, Identity.generate().device_id, "x"),  # an unregistered device
    ]
    for conn in refused:
        assert not conn.accepted, conn.rc
        assert conn.rc is None or conn.rc.value in (4, 5, 134, 135)  # bad user name or password / not authorized
    for conn in ok + refused:
        conn.close()


@needs_mosquitto
def test_a_device_cannot_publish_as_another_device(locked: LockedBroker, devices) -> None:
    a, b = devices[0].device_id, devices[1].device_id
    bridge = locked.login(BRIDGE)
    bridge.subscribe(topics.EVENTS_WILDCARD)
    worker = locked.login(worker_user(BRIDGE, 0))  # as an ingest worker does
    worker.subscribe(shared_subscription(locked.config(BRIDGE)))
    b_client = locked.login(b)
    b_client.subscribe(topics.receipts(b), topics.CHECKPOINT)
    dev_a = locked.login(a)
    dev_a.publish(topics.events(b), b"forged event")  # onto B's event topic
    dev_a.publish(topics.receipts(b), b"forged receipt")  # onto B's receipt topic
    dev_a.publish(topics.CHECKPOINT, b"forged checkpoint", retain=True)
    dev_a.publish(topics.events(a), b"own event")  # the positive control, after the forgeries
    bridge.publish(topics.receipts(b), b"receipt by the bridge")
    bridge.publish(topics.CHECKPOINT, b"checkpoint by the bridge", retain=True)
    # the control arrives on both bridge subscriptions (plain and $share), the forgeries never
    assert wait_until(lambda: bridge.got(topics.events(a)) and worker.got(topics.events(a)))
    assert wait_until(lambda: b_client.got(topics.CHECKPOINT, b"checkpoint by the bridge"))
    assert b_client.got(topics.receipts(b), b"receipt by the bridge")
    assert not bridge.got(topics.events(b)) and not worker.got(topics.events(b))
    assert not b_client.got(topics.receipts(b), b"forged receipt")
    assert not b_client.got(topics.CHECKPOINT, b"forged checkpoint")
    late = locked.login(b)  # the retained checkpoint is the bridge's, not A's
    late.subscribe(topics.CHECKPOINT)
    assert wait_until(lambda: late.messages) and late.messages == [(topics.CHECKPOINT, b"checkpoint by the bridge")]
    for c in (bridge, worker, b_client, dev_a, late):
        c.close()


@needs_mosquitto
def test_a_device_cannot_read_another_devices_receipts_or_events(locked: LockedBroker, devices) -> None:
    a, b = devices[0].device_id, devices[1].device_id
    snoop = locked.login(a)
    # mosquitto 2.0 grants any SUBSCRIBE and checks READ on every message it would deliver
    snoop.subscribe(topics.receipts(b), topics.events(b), "cc/v1/#", "#", shared_subscription(), topics.receipts(a))
    b_client = locked.login(b)
    b_client.subscribe(topics.receipts(b))
    bridge = locked.login(BRIDGE)
    bridge.subscribe(topics.EVENTS_WILDCARD)
    b_client.publish(topics.events(b), b"b's event")
    bridge.publish(topics.receipts(b), b"b's receipt")
    bridge.publish(topics.receipts(a), b"a's receipt")  # control: A does get its own receipts
    assert wait_until(lambda: snoop.got(topics.receipts(a), b"a's receipt"))
    assert wait_until(lambda: b_client.got(topics.receipts(b), b"b's receipt"))
    assert bridge.got(topics.events(b), b"b's event")
    assert {t for t, _ in snoop.messages} == {topics.receipts(a)}
    for c in (snoop, b_client, bridge):
        c.close()


@needs_mosquitto
def test_a_device_cannot_take_the_bridge_workers_share_of_the_events(locked: LockedBroker, devices) -> None:
    """mosquitto's acl_file lets anyone join a $share group it can name, and a member denied READ takes its
    turn of the messages and drops it. The workers' group name is derived from the bridge's password."""
    a = devices[0].device_id
    bridge_cfg = locked.config(BRIDGE)
    assert shared_subscription(bridge_cfg) != shared_subscription()  # not the public default name
    worker = locked.login(worker_user(BRIDGE, 0))
    worker.subscribe(shared_subscription(bridge_cfg))
    naive = locked.login(worker_user(BRIDGE, 1))  # a group anyone can name: the negative control
    naive.subscribe(shared_subscription())
    squatters = [locked.login(d.device_id) for d in devices]
    for sq in squatters:
        sq.subscribe(shared_subscription(), f"$share/carechain-bridge/{topics.EVENTS_WILDCARD}")
    pub = locked.login(a)
    for n in range(12):
        pub.publish(topics.events(a), b"%d" % n)
    assert wait_until(lambda: len(worker.messages) == 12)
    time.sleep(0.3)
    assert len(naive.messages) < 12  # squatters took turns in the public group, and those were dropped
    assert all(not sq.messages for sq in squatters)
    for c in (worker, naive, pub, *squatters):
        c.close()


def test_each_bridge_host_gets_the_bridges_rules_and_password_under_its_own_login() -> None:
    text = acl_text(BRIDGE, [], registry_version=1, revoked=0, hosts=2)
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in
              ("\n".join(ln for ln in text.splitlines() if ln and not ln.startswith("#"))).split("user ")[1:]}
    assert blocks[f"{BRIDGE}-h0"] == blocks[f"{BRIDGE}-h1"] == blocks[BRIDGE]
    assert blocks[f"{BRIDGE}-h1-archive"] == blocks[f"{BRIDGE}-archive"]
    plan = plan_logins({}, BRIDGE, [], hosts=2)
    assert {u: x.role for u, x in plan.logins.items() if "-h" in u} == {
        f"{BRIDGE}-h0": "host", f"{BRIDGE}-h0-archive": "archive", f"{BRIDGE}-h1": "host",
        f"{BRIDGE}-h1-archive": "archive"}
    # one password for all: the ingest group's name is derived from it, so every host joins the same group
    assert {x.password for u, x in plan.logins.items() if u.startswith(BRIDGE)} == {plan.logins[BRIDGE].password}
    rotated = plan_logins(plan.logins, BRIDGE, [], rotate=[BRIDGE], hosts=1)
    assert rotated.logins[host_user(BRIDGE, 0)].password == rotated.logins[BRIDGE].password != \
        plan.logins[BRIDGE].password and rotated.removed == [f"{BRIDGE}-h1", f"{BRIDGE}-h1-archive"]
    with pytest.raises(BrokerAccessError, match="hosts: 17"):
        plan_logins({}, BRIDGE, [], hosts=17)


@needs_mosquitto
def test_two_bridge_hosts_hold_sessions_side_by_side_and_share_the_events(locked: LockedBroker, devices) -> None:
    """Several bridge hosts on one PostgreSQL ledger: one login each (the broker ties the client id to it), all
    in the bridge's shared-subscription group, so each event reaches exactly one host."""
    access = locked.regenerate(hosts=2)
    hosts = [load_mqtt_credentials(path) for path in access.host_credentials]
    assert [h.username for h in hosts] == [f"{BRIDGE}-h0", f"{BRIDGE}-h1"]
    assert all(oct(path.stat().st_mode & 0o777) == "0o600" for path in access.host_credentials)
    group = shared_subscription(locked.config(BRIDGE))
    assert {shared_subscription(BrokerConfig(username=h.username, password=h.password)) for h in hosts} == {group}
    conns = [login(locked.port, h.username, h.password) for h in hosts]
    for conn in conns:
        conn.subscribe(group)
    twin = locked.login(BRIDGE)  # the negative control: one login twice, and the broker drops the first session
    assert wait_until(lambda: twin.accepted)
    again = locked.login(BRIDGE)
    assert wait_until(twin.dropped.is_set)
    a = devices[0].device_id
    pub = locked.login(a)
    for n in range(20):
        pub.publish(topics.events(a), b"%d" % n)
    assert wait_until(lambda: sum(len(c.messages) for c in conns) == 20)
    assert all(c.messages for c in conns) and not any(c.dropped.is_set() for c in conns)
    reader = locked.login(a)  # a host leads in turn: it may publish the checkpoint, which devices read
    reader.subscribe(topics.CHECKPOINT)
    conns[1].publish(topics.CHECKPOINT, b"note from host 1")
    assert wait_until(lambda: reader.got(topics.CHECKPOINT, b"note from host 1"))
    for c in (*conns, twin, again, pub, reader):
        c.close()
    kept = locked.regenerate(reload=False)  # re-run after a registration, without --hosts: the hosts stay
    assert kept.host_credentials == access.host_credentials and kept.plan.removed == []


@needs_mosquitto
def test_rerunning_keeps_logins_adds_new_devices_and_rotates_on_request(locked: LockedBroker, devices) -> None:
    a = devices[0].device_id
    before = {u: locked.password(u) for u in (BRIDGE, a)}
    passwd_before = locked.access.passwd.read_text()
    newcomer = Identity.generate()
    register(locked.ledger, [newcomer])
    assert not can_login(locked.port, newcomer.device_id, "x")
    access = locked.regenerate()
    assert access.plan.added == [newcomer.device_id] and access.plan.rotated == []
    assert {u: locked.password(u) for u in (BRIDGE, a)} == before
    assert set(passwd_before.splitlines()) < set(access.passwd.read_text().splitlines())  # same hashes, one more
    assert wait_until(lambda: can_login(locked.port, newcomer.device_id, locked.password(newcomer.device_id)))
    old = before[a]
    locked.regenerate(rotate=[a])
    assert locked.password(a) != old
    assert wait_until(lambda: not can_login(locked.port, a, old))
    assert can_login(locked.port, a, locked.password(a))


@needs_mosquitto
def test_a_revoked_device_loses_its_login_and_is_cut_off_on_reload(locked: LockedBroker, devices) -> None:
    victim = devices[2]
    conn = locked.login(victim.device_id)
    assert conn.accepted
    old_password = locked.password(victim.device_id)
    revoke(locked.ledger, victim)
    access = locked.regenerate()
    assert victim.device_id not in access.acl.read_text()
    assert victim.device_id not in access.passwd.read_text()
    assert access.revoked_left_out == 1 and access.plan.removed == [victim.device_id]
    assert not (locked.out_dir / "devices" / f"{victim.device_id}.json").exists()
    assert conn.dropped.wait(5)  # mosquitto re-checks connected clients on SIGHUP
    assert not can_login(locked.port, victim.device_id, old_password)
    conn.close()


# -- agents and bridge over the locked-down broker ----------------------------------------------------

def _bridge(locked: LockedBroker, workers: int) -> Bridge:
    cfg = BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.3, ingest_workers=workers,
                       limits=Limits(max_event_bytes=2048))
    bridge = Bridge(cfg, locked.config(BRIDGE), Identity.generate(), Ledger(locked.ledger.path),
                    client_id=f"bridge-{locked.root.name}")
    bridge.start()
    assert bridge.wait_ready(30), "the bridge user could not subscribe"
    return bridge


@needs_mosquitto
@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers-shared-subscription"])
async def test_agent_and_bridge_anchor_and_receipt_over_the_locked_down_broker(locked: LockedBroker, devices,
                                                                               workers: int) -> None:
    bridge = _bridge(locked, workers)
    try:
        mine = devices[:2]
        agent = Agent([AgentDevice(i, None) for i in mine], Outbox(locked.root / "agent" / "outbox.db"),
                      BrokerConfig(port=locked.port), bridge.log_key.public_key, window=50, resend_after_s=5.0,
                      credentials={i.device_id: locked.credentials(i.device_id) for i in mine})
        for ident in mine:
            for k in range(25):
                agent.record(ident.device_id, [("heart_rate", {"bpm": 60 + k})])
        reader = Ledger(locked.ledger.path)

        def drained() -> bool:
            cp = reader.latest_checkpoint()
            return agent.outbox.depth() == 0 and cp is not None and cp[0] == bridge.ledger.size

        squatter = locked.login(devices[2].device_id)  # joins the public share group name: takes nothing
        squatter.subscribe(shared_subscription())
        await _run_agents([agent], drained)
        squatter.close()
        assert agent.outbox.depth() == 0 and agent.stats.acked == 50 and agent.stats.bad_receipts == 0
        assert agent.stats.sent == 50  # nothing had to be resent: no event went astray
        assert reader.count_events() == 50 and bridge.stats.rejected.total() == 0
        cp = locked.login(mine[0].device_id)  # a device reads the checkpoint the bridge user published
        cp.subscribe(topics.CHECKPOINT)
        assert wait_until(lambda: cp.messages)
        assert cp.messages[0][1].decode() == reader.latest_checkpoint()[1]
        cp.close()
    finally:
        bridge.stop()


@needs_mosquitto
@pytest.mark.integration
async def test_a_device_the_broker_refuses_is_held_back_while_the_others_flow(locked: LockedBroker,
                                                                              devices) -> None:
    bridge = _bridge(locked, 0)
    try:
        good, held = devices[0], devices[1]
        locked.regenerate(rotate=[held.device_id], reload=False)  # `held` gets a password the broker lacks yet
        agent = Agent([AgentDevice(i, None) for i in (good, held)], Outbox(locked.root / "agent" / "outbox.db"),
                      BrokerConfig(port=locked.port), bridge.log_key.public_key, window=50, resend_after_s=2.0,
                      credentials={i.device_id: locked.credentials(i.device_id) for i in (good, held)})
        interleaved = [held, good] * 15  # the held device's events come first in the outbox
        for ident in interleaved:
            agent.record(ident.device_id, [("heart_rate", {"bpm": 70})])
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            deadline = time.monotonic() + 30
            while agent.stats.acked < 15 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert agent.stats.acked == 15 and agent.connected == {good.device_id}
            assert agent.outbox.depth() == 15  # all of the held device's events, none lost, none sent
            assert bridge.ledger.last_seq(held.device_id) is None
            locked.mosquitto.reload()  # the broker learns the rotated password; paho's reconnect gets in
            deadline = time.monotonic() + 45
            while agent.outbox.depth() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert agent.outbox.depth() == 0 and agent.stats.acked == 30
            assert agent.connected == {good.device_id, held.device_id}
            assert bridge.ledger.last_seq(held.device_id) == 14
        finally:
            stop.set()
            await task
    finally:
        bridge.stop()


# -- the bridge's own check, whatever the broker ------------------------------------------------------

@pytest.mark.integration
def test_on_an_open_broker_the_bridge_refuses_events_not_signed_by_the_topics_device(tmp_path: Path, broker) -> None:
    """The ACL is defence in depth: even where anyone may publish anywhere, an event on device A's topic
    counts only if A's registered key signed it."""
    a, b, rogue = Identity.generate(), Identity.generate(), Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    register(ledger, [a, b])
    bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3), broker.config,
                    Identity.generate(), ledger, client_id=f"bridge-open-{tmp_path.name}")
    bridge.start()
    assert bridge.wait_ready(30)
    listener = login(broker.port, host=broker.host)
    listener.subscribe(topics.receipts(a.device_id))
    anyone = login(broker.port, host=broker.host)
    try:
        size = bridge.ledger.size
        anyone.publish(topics.events(a.device_id), _event(rogue, 0, kid=a.device_id, dev=a.device_id))
        anyone.publish(topics.events(a.device_id), _event(b, 0))  # B is registered, but this is A's topic
        assert wait_until(lambda: sum(len(open_receipt(p, bridge.log_key.public_key, a.device_id).rejected)
                                      for _, p in listener.messages) >= 2)
        receipts = [open_receipt(p, bridge.log_key.public_key, a.device_id) for _, p in listener.messages]
        assert sorted(r.reason for rc in receipts for r in rc.rejected) == ["bad_signature", "topic_mismatch"]
        assert not any(rc.ok for rc in receipts)
        assert bridge.ledger.size == size and bridge.stats.anchored == 0
        assert bridge.ledger.last_seq(a.device_id) is None and bridge.ledger.last_seq(b.device_id) is None
    finally:
        listener.close()
        anyone.close()
        bridge.stop()
