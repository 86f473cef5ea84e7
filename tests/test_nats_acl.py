"""The NATS cluster run on the logins `carechain bridge acl` generates: nats-authorization.conf, included as it is
by every node of a real 3-node cluster, holds the same users and passwords as the mosquitto files, each allowed
what its ACL lines allow. Devices speak MQTT with their generated login files; the bridge uses its own for the
JetStream work queue; a revoked device is refused, also after a reload.

Denied publishes are checked by non-delivery with a positive control, as in tests/test_broker_acl.py: the
refused message is sent first, an allowed one after it on the same connection, and the observer waits for the
allowed one (nats-server delivers one connection's messages in order)."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import nats
import pytest
from nats.errors import Error as NatsError

from carechain import envelope, topics
from carechain.config import BridgeConfig, NatsIngestConfig
from carechain.credentials import MqttCredentials, load_mqtt_credentials
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.broker.acl import NATS_AUTHORIZATION_FILE, BrokerAccess, nats_authorization_text
from chain_bridge.broker.nats import acl_rules, acl_users, device_user
from chain_bridge.ledger.store import Ledger
from simulators.nats_cluster import NatsCluster, nats_binary
from tests.locked_broker import BRIDGE, Conn, can_login, generate, login, revoke, wait_until
from tests.test_cli_broker import run
from tests.test_pipeline import register

needs_nats = pytest.mark.skipif(nats_binary() is None, reason="nats-server is not installed (apt nats-server)")

MINER = Identity.from_seed(b"\x42" * 32).device_id
DEVICES = [Identity.from_seed(bytes([0x30 + i]) * 32) for i in range(3)]  # the last one is revoked
ME, OTHER, REVOKED = DEVICES


@dataclass
class Deployment:
    root: Path
    ledger: Ledger
    access: BrokerAccess
    revoked_login: MqttCredentials  # the revoked device's login file from before its revocation


def deploy(root: Path) -> Deployment:
    """A registry of three devices (with a bridge worker, a bridge host and a miner), broker access generated
    from it; then one device revoked and the access generated again, as an operator does."""
    ledger = Ledger(root / "bridge" / "ledger.db")
    register(ledger, DEVICES)
    first = generate(ledger, root / "bridge", root / "broker-files", workers=1, hosts=1, add_miners=[MINER])
    revoked_login = load_mqtt_credentials(first.device_credentials[REVOKED.device_id])
    revoke(ledger, REVOKED)
    return Deployment(root, ledger, generate(ledger, root / "bridge", root / "broker-files", workers=1),
                      revoked_login)


def creds(d: Deployment, ident: Identity) -> MqttCredentials:
    return load_mqtt_credentials(d.access.device_credentials[ident.device_id])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = deploy(tmp_path_factory.mktemp("nats-acl"))
    yield d
    d.ledger.close()


@pytest.fixture(scope="module")
def cluster(deployment: Deployment) -> Iterator[NatsCluster]:
    if nats_binary() is None:
        pytest.skip("nats-server is not installed (apt nats-server)")
    assert deployment.access.nats_authorization is not None
    with NatsCluster(deployment.root / "nats", authorization_file=deployment.access.nats_authorization) as c:
        yield c


def connect(port: int, username: str, password: str) -> Conn:
    """A login expected to be let in. Right after the cluster starts, the first MQTT sessions wait for
    JetStream to place their streams and may be turned away meanwhile: try again for a while."""
    deadline = time.monotonic() + 30
    while True:
        conn = login(port, username, password, timeout=10)
        if conn.accepted or time.monotonic() > deadline:
            assert conn.accepted, f"{username} was refused by the node on port {port}: {conn.rc}"
            return conn
        conn.close()
        time.sleep(0.5)


def _event(ident: Identity, seq: int) -> bytes:
    payload = make_payload(ident.device_id, seq, int(time.time() * 1000), "heart_rate", {"bpm": 60 + seq})
    return envelope.sign(ident, payload)


# -- the file ----------------------------------------------------------------------------------------------

def test_the_nats_file_holds_every_mosquitto_login_with_the_same_password(deployment: Deployment) -> None:
    path = deployment.access.nats_authorization
    assert path is not None and path.name == NATS_AUTHORIZATION_FILE and path.parent == deployment.access.passwd.parent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    written = dict(re.findall(r'\{user: "([^"]+)", password: "([^"]+)"', text))
    mosquitto_users = [line.split(":", 1)[0] for line in deployment.access.passwd.read_text().splitlines()]
    assert list(written) == mosquitto_users  # same logins, same order (the bridge first)
    assert REVOKED.device_id not in written
    for path in [deployment.access.bridge_credentials, *deployment.access.device_credentials.values(),
                 *deployment.access.miner_credentials.values(), *deployment.access.host_credentials]:
        login_file = load_mqtt_credentials(path)
        # A login file works on either broker; the file holds only a bcrypt hash of its password.
        assert login_file.password not in text
        assert written[login_file.username].startswith("$2a$")
        assert bcrypt.checkpw(login_file.password.encode(), written[login_file.username].encode())


def test_each_login_gets_its_acl_lines_as_subjects_and_only_the_bridge_core_nats() -> None:
    acl = "\n".join(["# header", f"user {BRIDGE}", "topic read cc/v1/dev/+/ev", "topic write cc/v1/dev/+/rcpt",
                     "user aaaaaaaaaaaaaaaa", "topic write cc/v1/dev/aaaaaaaaaaaaaaaa/ev",
                     "topic write cc/v1/dev/aaaaaaaaaaaaaaaa/status", "topic read cc/v1/dev/aaaaaaaaaaaaaaaa/rcpt",
                     "topic read cc/v1/log/checkpoint",
                     "user carechain-aggregator-x", "topic write cc/v1/miner/x/study"])
    bridge, device, aggregator = acl_users(acl, {BRIDGE: "b", "aaaaaaaaaaaaaaaa": "d", "carechain-aggregator-x": "a"},
                                           core_nats={BRIDGE})
    assert device == device_user("aaaaaaaaaaaaaaaa", "d")  # what docs/nats.md tabulates for a device
    assert aggregator.publish == ("cc.v1.miner.x.study",) and aggregator.subscribe == ()
    assert aggregator.connection_types == ("MQTT",)
    assert bridge.connection_types == ("STANDARD", "MQTT")
    assert {"cc.v1.dev.*.rcpt", "$JS.API.CONSUMER.MSG.NEXT.CC_EVENTS.carechain-bridge"} <= set(bridge.publish)
    assert {"cc.v1.dev.*.ev", "_INBOX.>"} <= set(bridge.subscribe)


def test_an_acl_nats_cannot_mirror_is_refused_rather_than_widened() -> None:
    with pytest.raises(ValueError, match="line 1"):
        acl_rules("topic read cc/v1/log/checkpoint\nuser x\n")  # a grant to anonymous clients
    with pytest.raises(ValueError, match="pattern"):
        acl_rules("user x\npattern read cc/v1/dev/%u/rcpt\n")
    with pytest.raises(ValueError, match="no lines for y"):
        acl_users("user x\ntopic read a\n", {"x": "p", "y": "q"})


def test_the_text_is_rebuilt_from_the_acl_and_logins_alone(deployment: Deployment) -> None:
    path = deployment.access.nats_authorization
    assert path is not None
    def unsalted(text: str) -> str:  # each run salts the hashes anew
        return re.sub(r'password: "\$2a\$[^"]+"', 'password: "<bcrypt>"', text)

    rebuilt = nats_authorization_text(deployment.access.acl.read_text(), deployment.access.plan.logins)
    assert unsalted(rebuilt) == unsalted(path.read_text()) and rebuilt != path.read_text()


def test_the_command_writes_the_nats_file_and_says_how_nodes_load_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    register(ledger, DEVICES)
    revoke(ledger, REVOKED)
    ledger.close()
    result = run("bridge", "acl", "--data-dir", tmp_path / "bridge", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / NATS_AUTHORIZATION_FILE
    assert f"nats        {path}" in result.output and "nats-server --signal reload" in result.output
    assert f'include "{NATS_AUTHORIZATION_FILE}"' in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bridge_password = load_mqtt_credentials(tmp_path / "out" / "bridge.json").password
    assert bridge_password not in path.read_text() and bridge_password not in result.output
    hashed = re.search(rf'user: "{BRIDGE}", password: "([^"]+)"', path.read_text())
    assert hashed is not None and bcrypt.checkpw(bridge_password.encode(), hashed.group(1).encode())
    assert f'"{ME.device_id}"' in path.read_text() and REVOKED.device_id not in path.read_text()
    as_json = run("bridge", "acl", "--data-dir", tmp_path / "bridge", "--out", tmp_path / "out", "--json")
    assert json.loads(as_json.output)["nats_authorization"] == str(path)


# -- a cluster running the file ------------------------------------------------------------------------------

@needs_nats
def test_a_device_login_publishes_its_events_and_reads_its_receipts_through_the_bridge_login(
        deployment: Deployment, cluster: NatsCluster) -> None:
    bridge_login = load_mqtt_credentials(deployment.access.bridge_credentials)
    cfg = BridgeConfig(data_dir=deployment.root / "bridge", checkpoint_interval_s=0.3, contracts=False,
                       ingest="nats", nats=NatsIngestConfig(servers=cluster.servers, ack_wait_s=3.0))
    # The bridge creates the events' stream and its durable consumer with its own generated login.
    bridge = Bridge(cfg, cluster.mqtt(0, bridge_login.username, bridge_login.password), Identity.generate(),
                    deployment.ledger, client_id=BRIDGE)
    bridge.start()
    mine = creds(deployment, ME)
    device = connect(cluster.nodes[1].ports.mqtt, mine.username, mine.password)
    try:
        assert bridge.wait_ready(30)
        device.subscribe(topics.receipts(ME.device_id))
        device.client.publish(topics.events(ME.device_id), _event(ME, 1), qos=1)
        assert wait_until(lambda: device.got(topics.receipts(ME.device_id)), 30), "no receipt for the event"
    finally:
        device.close()
        bridge.stop()
    assert deployment.ledger.size >= 1


@needs_nats
def test_a_device_login_cannot_speak_for_another_device_nor_read_its_receipts(deployment: Deployment,
                                                                              cluster: NatsCluster) -> None:
    mine, bridge_login = creds(deployment, ME), load_mqtt_credentials(deployment.access.bridge_credentials)
    observer = connect(cluster.nodes[2].ports.mqtt, bridge_login.username, bridge_login.password)
    device = connect(cluster.nodes[1].ports.mqtt, mine.username, mine.password)
    try:
        observer.subscribe(topics.EVENTS_WILDCARD)
        device.subscribe(topics.receipts(ME.device_id), topics.receipts(OTHER.device_id))
        assert [[rc.value for rc in codes] for codes in device.granted] == [[1], [0x80]]
        time.sleep(0.5)  # both subscriptions in place on every node
        device.client.publish(topics.events(OTHER.device_id), b"forged", qos=1)
        device.client.publish(topics.events(ME.device_id), b"probe", qos=1)
        assert wait_until(lambda: observer.got(topics.events(ME.device_id), b"probe"), 10)
        assert not observer.got(topics.events(OTHER.device_id))
        # The bridge's login writes receipts: the other device's never reach this one, its own do.
        observer.client.publish(topics.receipts(OTHER.device_id), b"not yours", qos=1)
        observer.client.publish(topics.receipts(ME.device_id), b"yours", qos=1)
        assert wait_until(lambda: device.got(topics.receipts(ME.device_id), b"yours"), 10)
        assert not device.got(topics.receipts(OTHER.device_id))
    finally:
        device.close()
        observer.close()

    async def core_nats_login() -> None:
        nc = await nats.connect(servers=cluster.servers, user=mine.username, password=mine.password,
                                connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)
        await nc.close()

    with pytest.raises((NatsError, OSError)):  # a device's login is for MQTT only
        asyncio.run(core_nats_login())


@needs_nats
def test_a_login_with_nothing_to_read_or_write_is_refused_rather_than_let_through(deployment: Deployment,
                                                                                cluster: NatsCluster) -> None:
    """nats-server reads an empty allow list as no restriction: the aggregator (which only writes) and an ingest
    worker (which only reads) must be denied the other direction outright."""
    text = deployment.access.nats_authorization.read_text() if deployment.access.nats_authorization else ""
    assert "allow: []" not in text
    aggregator = load_mqtt_credentials(deployment.access.aggregator_credentials[MINER])
    bridge_login = load_mqtt_credentials(deployment.access.bridge_credentials)
    worker = connect(cluster.nodes[0].ports.mqtt, f"{BRIDGE}-w0", bridge_login.password)
    agg = connect(cluster.nodes[0].ports.mqtt, aggregator.username, aggregator.password)
    try:
        agg.subscribe(topics.miner_study(MINER), topics.CHECKPOINT)
        assert [[rc.value for rc in codes] for codes in agg.granted] == [[0x80], [0x80]]
        worker.subscribe(topics.EVENTS_WILDCARD)
        assert [[rc.value for rc in codes] for codes in worker.granted] == [[1]]
        time.sleep(0.5)
        worker.client.publish(topics.events(ME.device_id), b"from a worker", qos=1)  # refused
        agg.client.publish(topics.events(ME.device_id), b"from the aggregator", qos=1)  # refused
        agg.client.publish(topics.miner_study(MINER), b"study", qos=1)  # its one topic
        bridge = connect(cluster.nodes[0].ports.mqtt, bridge_login.username, bridge_login.password)
        try:
            bridge.subscribe(topics.MINER_STUDY_WILDCARD)
            time.sleep(0.5)
            agg.client.publish(topics.miner_study(MINER), b"study 2", qos=1)
            assert wait_until(lambda: bridge.got(topics.miner_study(MINER), b"study 2"), 10)
        finally:
            bridge.close()
        assert not worker.got(topics.events(ME.device_id))
    finally:
        worker.close()
        agg.close()


@needs_nats
def test_a_revoked_device_login_is_refused_on_every_node(deployment: Deployment, cluster: NatsCluster) -> None:
    old, mine = deployment.revoked_login, creds(deployment, ME)
    for node in cluster.nodes:
        connect(node.ports.mqtt, mine.username, mine.password).close()  # the control: the node takes logins
        assert not can_login(node.ports.mqtt, old.username, old.password)


@needs_nats
def test_after_a_revocation_regenerating_and_reloading_shuts_the_device_out(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    register(ledger, [ME])
    access = generate(ledger, tmp_path / "bridge", tmp_path / "broker-files")
    mine = load_mqtt_credentials(access.device_credentials[ME.device_id])
    assert access.nats_authorization is not None
    try:
        with NatsCluster(tmp_path / "nats", authorization_file=access.nats_authorization) as c:
            device = connect(c.nodes[0].ports.mqtt, mine.username, mine.password)
            try:
                revoke(ledger, ME)
                generate(ledger, tmp_path / "bridge", tmp_path / "broker-files")
                c.reload()
                assert wait_until(device.dropped.is_set, 10), "the revoked login's connection was kept"
            finally:
                device.close()
            assert wait_until(lambda: not can_login(c.nodes[1].ports.mqtt, mine.username, mine.password), 10)
    finally:
        ledger.close()
