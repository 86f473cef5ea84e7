"""The ledger on PostgreSQL: its schema, group commit, two bridge hosts appending to one log, a crash between
the commit and the receipts, and a lost database connection (a clear, retryable error; nothing half-written).

Every test runs on a database of its own module (tests/conftest.py `postgres_dsn`), a schema per ledger.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import yaml

from carechain import envelope, topics
from carechain.config import BridgeConfig, BrokerConfig
from carechain.events import Activity, make_payload
from carechain.identity import Identity
from carechain.receipts import open_receipt
from carechain.sqlite_store import StoreError
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.postgres import PostgresDatabase, PostgresLocation, PostgresLogSource, public_dsn
from chain_bridge.ledger.reader import LedgerReader
from chain_bridge.ledger.store import SCHEMA_VERSION, EventCandidate, Ledger, LedgerError, open_ledger
from chain_bridge.registry import ledger_path
from tests.conftest import LedgerFactory
from tests.test_pipeline import register

if TYPE_CHECKING:
    from tests.conftest import TestBroker

LOG_KEY = Identity.from_seed(b"\x43" * 32)
DEVICES = [Identity.from_seed(bytes([0x50 + i]) * 32) for i in range(3)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def postgres(postgres_dsn: str) -> LedgerFactory:
    return LedgerFactory("postgresql", postgres_dsn)


def _candidates(n: int, device: str = "dev", first: int = 0) -> list[EventCandidate]:
    return [EventCandidate(device, seq, b"leaf-%d-%s" % (seq, device.encode())) for seq in range(first, first + n)]


def _events(count: int, ts: int) -> list[tuple[str, bytes]]:
    """`count` signed activity events per device at device time `ts`, as (topic, payload) from the broker."""
    return [(topics.events(d.device_id),
             envelope.sign(d, make_payload(d.device_id, seq, ts + seq, "activity",
                                           Activity(steps=seq, active_minutes=1))))
            for seq in range(count) for d in DEVICES]


class Published:
    """Stands in for the MQTT client: keeps what the bridge publishes."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.messages.append((topic, payload))


def _bridge(ledger: Ledger, data_dir: Path) -> tuple[Bridge, Published]:
    bridge = Bridge(BridgeConfig(data_dir=data_dir), BrokerConfig(), LOG_KEY, ledger)
    client = Published()
    bridge._client = client  # type: ignore[assignment]
    return bridge, client


def crash_after_append(dsn: str, data_dir: str, ts: str) -> None:
    """Run in a child process with CARECHAIN_CRASH_AT=bridge.after_append: commit one batch, die before receipts."""
    ledger = Ledger(PostgresLocation(dsn))
    bridge, _ = _bridge(ledger, Path(data_dir))
    bridge.process(_events(4, int(ts)))
    raise AssertionError("the crash point should have killed this process")


def test_the_schema_uses_postgres_types_and_its_version_is_checked(postgres: LedgerFactory, tmp_path: Path) -> None:
    ledger = postgres(tmp_path / "ledger.db")
    location = ledger.location
    assert isinstance(location, PostgresLocation)
    with psycopg.connect(location.dsn) as conn:
        types = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE "
                                  "table_schema = current_schema() AND table_name = 'entries'").fetchall())
        assert types == {"idx": "bigint", "type": "text", "leaf_hash": "bytea", "data": "bytea",
                         "appended_ms": "bigint"}
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == \
            (str(SCHEMA_VERSION),)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    ledger.close()
    with pytest.raises(LedgerError, match="schema version 99, this carechain reads"):
        postgres(tmp_path / "ledger.db")


def test_a_batch_is_one_transaction_and_its_rows_come_back_in_order(postgres: LedgerFactory, tmp_path: Path) -> None:
    ledger = postgres(tmp_path / "ledger.db")
    results = ledger.append_events(_candidates(2000))
    assert [r.index for r in results] == list(range(2000))  # type: ignore[union-attr]
    location = ledger.location
    assert isinstance(location, PostgresLocation)
    with psycopg.connect(location.dsn) as conn:  # group commit: every row written by the one transaction
        assert conn.execute("SELECT COUNT(DISTINCT xmin::text) FROM entries").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(DISTINCT xmin::text) FROM events").fetchone() == (1,)
    reopened = postgres(tmp_path / "ledger.db")
    assert reopened.size == 2000 and reopened.tree.root() == ledger.tree.root()
    assert list(reopened.leaves(1998)) == [c.leaf for c in _candidates(2000)[1998:]]
    reopened.close()
    ledger.close()


def test_two_hosts_appending_the_same_events_anchor_each_once(postgres: LedgerFactory, tmp_path: Path) -> None:
    """Two Ledger instances on one database (two bridge hosts), racing on overlapping batches."""
    hosts = [postgres(tmp_path / "ledger.db") for _ in range(2)]
    outcome: list[list[int]] = [[], []]

    def append(host: int) -> None:
        for first in range(0, 300, 50):  # both send the same events, in batches of 100 that overlap by 50
            results = hosts[host].append_events(_candidates(100, first=first))
            outcome[host].extend(r.index for r in results)  # type: ignore[union-attr]

    threads = [threading.Thread(target=append, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ledger in hosts:
        ledger.refresh()
    assert hosts[0].size == hosts[1].size == 350 == hosts[0].count_events()
    assert hosts[0].tree.root() == hosts[1].tree.root()
    assert sorted({hosts[0].event_index("dev", seq) for seq in range(350)}) == list(range(350))
    for ledger in hosts:
        ledger.close()


def test_a_crash_between_commit_and_receipts_is_answered_from_the_ledger_on_resend(
        postgres: LedgerFactory, tmp_path: Path) -> None:
    location = postgres.location(tmp_path / "ledger.db")
    assert isinstance(location, PostgresLocation)
    ledger = Ledger(location)
    register(ledger, DEVICES)
    now = str(int(time.time() * 1000))
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_ledger_postgres import crash_after_append; "
                               "crash_after_append(*sys.argv[1:])", location.dsn, str(tmp_path / "a"), now],
        cwd=ROOT, env={**os.environ, "CARECHAIN_CRASH_AT": "bridge.after_append:1"}, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr  # killed after COMMIT, before any receipt
    assert ledger.refresh() == len(DEVICES) + 4 * len(DEVICES)  # the batch is durable
    bridge, client = _bridge(ledger, tmp_path / "b")  # the standby; the agents resend what was not receipted
    bridge.process(_events(4, int(now)))
    assert bridge.stats.duplicates == 4 * len(DEVICES) and bridge.stats.anchored == 0
    receipted = [open_receipt(p, LOG_KEY.public_key, d.device_id) for d in DEVICES
                 for t, p in client.messages if t == topics.receipts(d.device_id)]
    indexes = sorted(index for r in receipted for _, index in r.ok)
    assert indexes == list(range(len(DEVICES), len(DEVICES) + 4 * len(DEVICES)))  # the original leaves
    assert ledger.count_events() == 4 * len(DEVICES)
    ledger.close()


def test_a_lost_connection_is_a_retryable_error_and_the_next_batch_reconnects(
        postgres: LedgerFactory, tmp_path: Path) -> None:
    ledger = postgres(tmp_path / "ledger.db")
    ledger.append_events(_candidates(10))
    location = ledger.location
    assert isinstance(location, PostgresLocation)
    with psycopg.connect(location.dsn, autocommit=True) as admin:  # the server ends the ledger's session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND application_name = 'carechain' AND pid <> pg_backend_pid()")
    with pytest.raises(ledger.transient_errors) as failed:
        ledger.append_events(_candidates(10, first=10))
    assert "terminat" in str(failed.value) or "closed" in str(failed.value)
    assert ledger.size == 10  # nothing half-appended, the tree untouched
    results = ledger.append_events(_candidates(10, first=10))  # the bridge's retry: a fresh connection
    assert [r.index for r in results] == list(range(10, 20))  # type: ignore[union-attr]
    ledger.close()


def test_a_database_still_down_at_the_retry_is_the_same_retryable_error(postgres: LedgerFactory,
                                                                        tmp_path: Path) -> None:
    ledger = postgres(tmp_path / "ledger.db")
    db = ledger._db
    assert isinstance(db, PostgresDatabase)
    db.close()  # the connection is gone, and the server does not answer either
    db.location = PostgresLocation("host=127.0.0.1 port=1 dbname=carechain")
    with pytest.raises(ledger.transient_errors, match="cannot connect to the ledger database"):
        ledger.append_events(_candidates(1))
    assert ledger.size == 0


def test_a_bridge_keeps_a_batch_unreceipted_while_the_database_is_unreachable(
        postgres: LedgerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = postgres(tmp_path / "ledger.db")
    register(ledger, DEVICES)
    bridge, client = _bridge(ledger, tmp_path / "bridge")
    location = ledger.location
    assert isinstance(location, PostgresLocation)
    with psycopg.connect(location.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND application_name = 'carechain' AND pid <> pg_backend_pid()")
    now = int(time.time() * 1000)
    with pytest.raises(ledger.transient_errors):
        bridge.process(_events(2, now))
    assert client.messages == [] and ledger.count_events() == 0  # nothing receipted, nothing appended
    wait = bridge._storage_failed(RuntimeError("server closed the connection"), 2 * len(DEVICES))
    assert wait > 0 and "PostgreSQL server is up" in caplog.text and "password" not in caplog.text
    bridge.process(_events(2, now))  # the retry after the backoff
    assert bridge.stats.anchored == 2 * len(DEVICES) and ledger.count_events() == 2 * len(DEVICES)
    ledger.close()


def test_an_unreachable_server_is_a_store_error_naming_it_without_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pgpass"
    secret.write_text("hunter2-not-in-messages\n")
    secret.chmod(0o600)
    cfg = BridgeConfig(data_dir=tmp_path, store={"backend": "postgresql", "password_file": str(secret),
                                                 "dsn": "host=127.0.0.1 port=1 dbname=carechain user=bridge"})
    with pytest.raises(StoreError, match="cannot connect to the ledger database") as failed:
        open_ledger(cfg)
    assert "port=1" in str(failed.value) and "hunter2" not in str(failed.value)
    assert "hunter2" not in public_dsn("host=db password=hunter2 dbname=x")


def test_the_audit_source_reads_one_snapshot_while_a_bridge_appends(postgres: LedgerFactory, tmp_path: Path) -> None:
    ledger = postgres(tmp_path / "ledger.db")
    ledger.append_events(_candidates(5))
    location = ledger.location
    assert isinstance(location, PostgresLocation)
    with PostgresLogSource(location) as source:
        ledger.append_events(_candidates(5, first=5))  # after the snapshot: not seen
        assert source.size() == 5 and source.count_events() == 5
        assert [(i, t, d) for i, t, _, d in source.entries(3)] == [
            (i, "event", c.leaf) for i, c in enumerate(_candidates(5)) if i >= 3]
        assert source.event_index("dev", 4) == 4 and source.event_index("dev", 7) is None
    ledger.close()



def test_register_appends_to_the_database_the_config_names_and_a_file_opener_is_refused(
        postgres: LedgerFactory, tmp_path: Path) -> None:
    from tests.test_cli import new_key, run, text, write_inventory

    device_id = new_key(tmp_path / "hr.key")
    inventory = write_inventory(tmp_path / "inventory.yaml", [
        {"name": "hr-1", "profile": "heart_rate_band", "owner": "patient:alice", "key_file": "hr.key"}])
    data = tmp_path / "bridge"
    config = tmp_path / "carechain.yaml"
    store = postgres.store_config(data / "ledger.db")
    config.write_text(yaml.safe_dump({"bridge": {"data_dir": str(data), "contracts": False, "store": store}}))
    result = run("register", inventory, "--config", config, "--json")
    assert result.exit_code == 0, text(result)
    ledger = postgres(data / "ledger.db")
    assert set(ledger.devices()) == {device_id} and ledger.size == 1
    ledger.close()
    assert not (data / "ledger.db").exists()
    # A tool that opens the data directory's SQLite file (not through bridge.store) would start a second log.
    with pytest.raises(StoreError, match="this data directory's ledger is in PostgreSQL"):
        Ledger(ledger_path(data))
    with pytest.raises(StoreError, match="this data directory's ledger is in PostgreSQL"):
        LedgerReader(ledger_path(data))
    assert not (data / "ledger.db").exists()


@pytest.mark.integration
def test_ingest_workers_verify_for_a_bridge_on_postgresql_and_every_event_is_anchored_once(
        postgres: LedgerFactory, tmp_path: Path, broker: TestBroker) -> None:
    """Worker processes open the ledger where the bridge's is (the database, not a file) for the registry."""
    import asyncio

    from edge_agent.agent import Agent, AgentDevice
    from edge_agent.outbox import Outbox

    if broker.kind != "mosquitto":
        pytest.skip("ingest workers need MQTT shared subscriptions (mosquitto)")
    ledger = postgres(tmp_path / "bridge" / "ledger.db")
    devices = [Identity.generate() for _ in range(3)]
    register(ledger, devices)
    bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3, contracts=False,
                                 ingest_workers=2), broker.config, LOG_KEY, ledger, client_id=f"bridge-{tmp_path.name}")
    bridge.start()
    agent = Agent([AgentDevice(i, None) for i in devices], Outbox(tmp_path / "agent" / "outbox.db"), broker.config,
                  LOG_KEY.public_key, window=50, resend_after_s=3.0, client_id=f"agent-{tmp_path.name}")
    per_device = 120
    for ident in devices:
        for k in range(per_device):
            agent.record(ident.device_id, [("heart_rate", {"bpm": 60 + k % 40})])

    async def drain() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        deadline = time.monotonic() + 90
        while agent.outbox.depth() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task

    try:
        assert bridge.wait_ready(60), "the bridge or its workers did not subscribe"
        asyncio.run(drain())
    finally:
        bridge.stop()
    assert agent.outbox.depth() == 0
    reopened = postgres(tmp_path / "bridge" / "ledger.db")
    assert reopened.count_events() == len(devices) * per_device
    assert {reopened.last_seq(d.device_id) for d in devices} == {per_device - 1}
    reopened.close()
    ledger.close()


@pytest.mark.integration
def test_a_running_bridge_rides_out_a_lost_database_connection_and_anchors_every_event_once(
        postgres: LedgerFactory, tmp_path: Path, broker: TestBroker, caplog: pytest.LogCaptureFixture) -> None:
    """The server ends the bridge's session mid-drain: the batch in flight fails, nothing of it is receipted,
    the bridge logs it, backs off, reconnects and goes on; the agent's resends are deduplicated."""
    import asyncio

    from edge_agent.agent import Agent, AgentDevice
    from edge_agent.outbox import Outbox

    ledger = postgres(tmp_path / "bridge" / "ledger.db")
    devices = [Identity.generate() for _ in range(2)]
    register(ledger, devices)
    bridge = Bridge(BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3, contracts=False),
                    broker.config, LOG_KEY, ledger, client_id=f"bridge-{tmp_path.name}")
    bridge.start()
    assert bridge.wait_ready(30)
    agent = Agent([AgentDevice(i, None) for i in devices], Outbox(tmp_path / "agent" / "outbox.db"), broker.config,
                  LOG_KEY.public_key, window=20, resend_after_s=2.0, client_id=f"agent-{tmp_path.name}",
                  batch_max_events=1)
    per_device = 150
    for ident in devices:
        for k in range(per_device):
            agent.record(ident.device_id, [("heart_rate", {"bpm": 60 + k % 40})])
    location = ledger.location
    assert isinstance(location, PostgresLocation)

    async def drain() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        cut = False
        deadline = time.monotonic() + 90
        while agent.outbox.depth() and time.monotonic() < deadline:
            if not cut and agent.outbox.depth() < len(devices) * per_device * 3 // 4:
                with psycopg.connect(location.dsn, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                  "datname = current_database() AND application_name = 'carechain' "
                                  "AND pid <> pg_backend_pid()")
                cut = True
            await asyncio.sleep(0.05)
        stop.set()
        await task

    with caplog.at_level(logging.WARNING, logger="carechain.bridge"):
        try:
            asyncio.run(drain())
        finally:
            bridge.stop()
    assert agent.outbox.depth() == 0
    assert bridge.stats.storage_errors >= 1 and "cannot write the ledger postgresql" in caplog.text
    assert "writable again" in caplog.text
    reopened = postgres(tmp_path / "bridge" / "ledger.db")
    assert reopened.count_events() == len(devices) * per_device  # each (device, seq) once
    assert reopened.size == len(devices) + len(devices) * per_device
    assert {reopened.last_seq(d.device_id) for d in devices} == {per_device - 1}
    reopened.close()
    ledger.close()


def test_carechain_bridge_on_an_unreachable_database_exits_1_naming_it(tmp_path: Path) -> None:
    from tests.test_cli import run, text

    config = tmp_path / "carechain.yaml"
    config.write_text(yaml.safe_dump({"bridge": {"data_dir": str(tmp_path / "bridge"), "store": {
        "backend": "postgresql", "dsn": "host=127.0.0.1 port=1 dbname=carechain user=bridge"}}}))
    result = run("bridge", "--config", config, columns=200)
    assert result.exit_code == 1
    assert "cannot connect to the ledger database" in text(result) and "port=1" in text(result)
