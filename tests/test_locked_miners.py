"""A bridge, five witness miners and their storage servers on a mosquitto locked down by `carechain bridge acl`:
every party logs in with its own generated login, the miners cosign the growing log with signed messages,
the storage servers answer over their own logins, no miner can publish on another's topics, and a miner
killed without a goodbye drops out of discovery (its last will passes the ACL).

Denied publishes are checked by non-delivery with a positive control sent after them on the same
connection (see tests/test_broker_acl.py for why).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carechain import cbor, envelope, topics
from carechain import miner_messages as messages
from carechain.config import BridgeConfig
from carechain.credentials import load_mqtt_credentials
from carechain.events import make_payload
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.broker import archive_user
from chain_bridge.broker.acl import miner_user
from chain_bridge.ledger.store import Ledger
from contract_rules import builtin_hashes
from simulators.miners import REPO, MinerProcess
from simulators.mosquitto import mosquitto_binary
from tests.locked_broker import BRIDGE, Conn, LockedBroker, login, start_locked_broker, wait_until
from tests.test_pipeline import OPERATOR

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]
N_MINERS = 5
DEADLINE_S = 60.0  # a bound so a broken run fails instead of hanging; nothing asserts on timing


@dataclass
class StorageProcess:
    """`python -m chain_miner.storage_server` for one miner id, logged in as that miner's storage user."""

    key_file: Path
    data_dir: Path
    address: str
    credentials: Path
    proc: subprocess.Popen[str] | None = None

    def start(self) -> dict[str, object]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "chain_miner.storage_server", "--data-dir", str(self.data_dir),
                "--broker", self.address, "--key", str(self.key_file), "--credentials", str(self.credentials)]
        with open(self.data_dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = self.proc.stdout
        assert stdout is not None
        lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            ready: dict[str, object] = json.loads(lines.get(timeout=DEADLINE_S))
        except (queue.Empty, ValueError):
            raise AssertionError(f"storage server not ready: {(self.data_dir / 'stderr.log').read_text()[-2000:]}") \
                from None
        return ready

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class World:
    locked: LockedBroker
    bridge: Bridge
    band: Identity
    miners: list[MinerProcess]
    stores: list[StorageProcess]
    auditor: Conn  # a miner login with no miner behind it: reads what every miner may read
    archive: Conn  # the bridge's archiver login: storage requests out, answers and hellos in
    probe: Conn  # another spare miner login, used to try publishing where it may not
    probe_id: str


def write_genesis(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"operators": {OPERATOR.device_id: OPERATOR.public_key.hex()}, "allocations": {},
                                "contracts": builtin_hashes()}))
    return path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    band = Identity.generate()
    locked = start_locked_broker(tmp_path, [band])
    address = f"{locked.mosquitto.host}:{locked.port}"
    genesis = write_genesis(locked.data_dir / "contracts" / "genesis.json")
    log_key = Identity.generate()
    miners = [MinerProcess(tmp_path / f"miner{i}", locked.config(BRIDGE), log_key.public_key, "--genesis",
                           str(genesis), "--config", str(tmp_path / f"miner{i}" / "config.yaml"))
              for i in range(N_MINERS)]
    auditor, probe = Identity.generate().device_id, Identity.generate().device_id
    locked.regenerate(add_miners=[m.key.device_id for m in miners] + [auditor, probe])
    for m in miners:  # each miner logs in with the file `carechain bridge acl` wrote for it
        (m.data_dir / "config.yaml").write_text(json.dumps(
            {"broker": {"credentials_file": str(locked.out_dir / "miners" / f"{m.key.device_id}.json")}}))
    stores = [StorageProcess(m.data_dir / "miner.key", tmp_path / f"store{i}", address,
                             locked.access.store_credentials[m.key.device_id]) for i, m in enumerate(miners)]
    cfg = BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.3)
    bridge = Bridge(cfg, locked.config(BRIDGE), log_key, Ledger(locked.ledger.path), client_id=BRIDGE)
    conns: list[Conn] = []
    try:
        bridge.start()
        assert bridge.wait_ready(30), "the bridge user could not subscribe"
        for who in (auditor, probe):
            conns.append(login(locked.port, miner_user(who), load_mqtt_credentials(
                locked.out_dir / "miners" / f"{who}.json").password))
        conns.append(login(locked.port, archive_user(BRIDGE), locked.password(BRIDGE)))
        assert all(c.accepted for c in conns)
        conns[0].subscribe(topics.MINER_COSIG_WILDCARD, topics.MINER_HELLO_WILDCARD, topics.MINER_EVIDENCE_WILDCARD)
        conns[2].subscribe(topics.STORE_RESPONSE_WILDCARD, topics.STORE_HELLO_WILDCARD)
        for m in miners:
            m.start()
        for m in miners:
            assert m.wait_ready(DEADLINE_S)["miner"] == m.key.device_id
        for s in stores:
            s.start()
        yield World(locked, bridge, band, miners, stores, conns[0], conns[2], conns[1], probe)
    finally:
        for m in miners:
            m.stop()
        for s in stores:
            s.stop()
        bridge.stop()
        bridge.ledger.close()
        for c in conns:
            c.close()
        locked.close()


def latest(conn: Conn, topic: str) -> bytes | None:
    """The last payload `conn` received on `topic` (b"" for a topic emptied), None if none."""
    for t, p in reversed(list(conn.messages)):
        if t == topic:
            return p
    return None


def cosigners_of(conn: Conn, size: int) -> set[str]:
    """Ids of the miners whose *signed* cosignature of the checkpoint of `size` `conn` received."""
    found = set()
    for t, p in list(conn.messages):
        parsed = topics.miner_of_topic(t)
        if parsed is None or parsed[1] != "cosig" or not p:
            continue
        msg = messages.CosignatureMessage.model_validate_json(p)
        if msg.tree_size == size and messages.from_miner(msg, parsed[0]):
            found.add(parsed[0])
    return found


def test_bridge_miners_and_storage_miners_work_on_the_locked_down_broker(world: World) -> None:
    ids = [m.key.device_id for m in world.miners]
    auditor, archive, probe = world.auditor, world.archive, world.probe

    # Discovery: every miner's signed hello, every storage server's hello, each over its own login.
    assert wait_until(lambda: all(latest(auditor, topics.miner_hello(i)) for i in ids), DEADLINE_S)
    for i in ids:
        assert messages.from_miner(messages.MinerHello.model_validate_json(latest(auditor, topics.miner_hello(i))
                                                                           or b""), i)
    assert wait_until(lambda: all(latest(archive, topics.store_hello(i)) for i in ids), DEADLINE_S)

    # The log grows from a device's own login; all five miners fetch signed proofs and cosign it.
    device = world.locked.login(world.band.device_id)
    now = int(time.time() * 1000)
    for seq in range(5):
        device.publish(topics.events(world.band.device_id),
                       envelope.sign(world.band, make_payload(world.band.device_id, seq, now, "heart_rate",
                                                              {"bpm": 60 + seq})))
    device.close()
    size = 1 + 5  # the band's registration and its events
    assert wait_until(lambda: world.bridge.ledger.size == size, DEADLINE_S)
    assert wait_until(lambda: cosigners_of(auditor, size) == set(ids), DEADLINE_S), cosigners_of(auditor, size)

    # A storage server answers the archiver over its own login.
    put = {"id": "put-1", "op": "put", "dataset": "ds", "segment": 0, "version": 1, "share": 0, "data": b"share"}
    archive.publish(topics.store_request(ids[0]), cbor.encode(put))
    assert wait_until(lambda: any(t == topics.store_response(ids[0]) and cbor.decode(p).get("id") == "put-1"
                                  and cbor.decode(p).get("ok") is True for t, p in list(archive.messages)),
                      DEADLINE_S)

    # A miner login cannot speak for another miner, nor for a storage server.
    target = ids[0]
    forged = b'{"forged": true}'
    probe.publish(topics.miner_cosignature(target), forged, retain=True)
    probe.publish(topics.miner_hello(target), forged, retain=True)
    probe.publish(topics.miner_evidence(target), forged)
    probe.publish(topics.store_response(target), cbor.encode({"id": "put-1", "ok": False}))
    probe.publish(topics.store_hello(target), forged, retain=True)
    own_hello = topics.miner_hello(world.probe_id)
    probe.publish(own_hello, b"probe's own hello", retain=True)  # the positive control, after the forgeries
    assert wait_until(lambda: latest(auditor, own_hello) == b"probe's own hello")
    assert not any(p == forged for _, p in list(auditor.messages))
    archive.publish(topics.store_request(ids[1]), cbor.encode({**put, "id": "put-2"}))  # control for the archiver
    assert wait_until(lambda: any(cbor.decode(p).get("id") == "put-2" for t, p in list(archive.messages)
                                  if t == topics.store_response(ids[1])), DEADLINE_S)
    assert not any(p == forged for _, p in list(archive.messages))
    assert not any(t == topics.store_response(target) and cbor.decode(p).get("ok") is False
                   for t, p in list(archive.messages))
    probe.publish(own_hello, b"", retain=True)
    probe.close()

    # A miner killed without a goodbye: the broker publishes its will, through the ACL, and it is gone.
    dead = world.miners[-1]
    assert dead.proc is not None
    dead.proc.kill()
    dead.proc.wait(10)
    assert wait_until(lambda: latest(auditor, topics.miner_hello(dead.key.device_id)) == b"", DEADLINE_S)
    late = login(world.locked.port, miner_user(world.probe_id),
                 load_mqtt_credentials(world.locked.out_dir / "miners" / f"{world.probe_id}.json").password)
    late.subscribe(topics.MINER_HELLO_WILDCARD)  # a newcomer sees the four live miners' retained hellos only
    assert wait_until(lambda: {t for t, p in list(late.messages) if p} == {topics.miner_hello(i) for i in ids[:-1]},
                      DEADLINE_S)
    late.close()
