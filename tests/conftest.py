"""Shared fixtures: a private MQTT broker per test session (mosquitto, or amqtt when it is missing)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.embedded_broker import EmbeddedBroker
from chain_bridge.ledger.sql import SqliteLocation, StoreLocation
from chain_bridge.ledger.store import Ledger
from simulators.mosquitto import Mosquitto, mosquitto_binary


@dataclass
class TestBroker:
    host: str
    port: int
    kind: str

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host=self.host, port=self.port)


@pytest.fixture(scope="session")
def full_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One whole `carechain demo` (every phase, its data kept under a 022 umask), shared by the tests that check
    its summary, its ledger and its files' modes: a run takes over a minute. Its users only read it."""
    from carechain.demo.pipeline import run_demo

    root = tmp_path_factory.mktemp("full-demo") / "demo"
    umask = os.umask(0o022)
    try:
        return run_demo(broker=None, seconds=2, data_dir=root, speedup=20), root
    finally:
        os.umask(umask)


def _injected_disk_full(tmp_path_factory: pytest.TempPathFactory, who: str) -> Any:  # noqa: ANN401 - a Result
    """One run of `simulators.fault_harness.<who>_disk_full` (SQLite's disk-full error injected), its files kept in
    `detail["work"]`."""
    from simulators import fault_harness as faults
    from simulators.mosquitto import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("the disk-full runs use a real mosquitto")
    work = tmp_path_factory.mktemp(f"{who}-disk-full-injected")
    result = getattr(faults, f"{who}_disk_full")(work)
    result.detail["work"] = str(work)
    return result


@pytest.fixture(scope="session")
def agent_disk_full_injected(tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: ANN401 - a Result
    """The agent disk-full fault, run once and shared by tests/test_faults.py (its row of the fault table) and
    tests/test_agent_disk_full.py (its log and losses checks): ~15 s of real processes. Its users only read it."""
    return _injected_disk_full(tmp_path_factory, "agent")


@pytest.fixture(scope="session")
def bridge_disk_full_injected(tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: ANN401 - a Result
    """The bridge disk-full fault, run once and shared by tests/test_faults.py and tests/test_disk_full_bridge.py
    (which also audits its ledger with `carechain verify --full` and reads its log: the bridge's data dir is
    `<work>/bridge`, its log `<work>/bridge.log`). Its users only read it."""
    return _injected_disk_full(tmp_path_factory, "bridge")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    """A private broker for the session; never the machine's shared one on :1883."""
    if mosquitto_binary():
        with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as m:
            yield TestBroker(m.host, m.port, "mosquitto")
    else:
        with EmbeddedBroker() as eb:
            yield TestBroker(eb.host, eb.port, "amqtt")


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def running_bridge(request: pytest.FixtureRequest, tmp_path: Path, broker: TestBroker) -> Iterator[Bridge]:
    """A started bridge on the session broker: in-process, and with 2 ingest workers (mosquitto only)."""
    if request.param and broker.kind != "mosquitto":
        pytest.skip("ingest workers need MQTT shared subscriptions (mosquitto)")
    log_key = Identity.generate()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3, ingest_workers=request.param,
                       limits=Limits(max_event_bytes=2048))
    bridge = Bridge(cfg, broker.config, log_key, ledger, client_id=f"bridge-{tmp_path.name}")
    bridge.start()
    assert bridge.wait_ready(30)
    yield bridge
    bridge.stop()



# -- running on several cores (pytest-xdist) -----------------------------------------------------------------

# Session fixtures that take a minute of real processes: each xdist worker would make its own, so their users
# all go to one worker ("loadgroup" distribution) and each run is made once.
SHARED_RUNS = {"full_demo", "agent_disk_full_injected", "bridge_disk_full_injected"}
_fault_rows: list[list[str]] = []  # the fault table's rows handed back by the workers


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if SHARED_RUNS.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("shared-runs"))


def _fault_results() -> list[Any]:
    """The `FAULT_RESULTS` of the test modules this process ran (tests/test_faults.py, the NATS node kills)."""
    import sys

    return [r for name, module in sorted(sys.modules.items()) if name.rpartition(".")[2].startswith("test_")
            for r in getattr(module, "FAULT_RESULTS", ())]


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)  # set in an xdist worker only
    if output is not None:
        output["fault_rows"] = [r.row() for r in _fault_results()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:  # noqa: ANN401 - xdist's WorkerController
    _fault_rows.extend(getattr(node, "workeroutput", {}).get("fault_rows", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (tests/test_faults.py, tests/test_nats_ingest.py) when those tests ran, in
    whichever processes."""
    rows = _fault_rows + [r.row() for r in _fault_results()]
    if rows:
        from simulators.fault_harness import table_of_rows

        terminalreporter.write_sep("-", "fault injection: every signed event in the log exactly once")
        terminalreporter.write_line(table_of_rows(rows))


# -- ledger stores: every ledger test runs on SQLite and on PostgreSQL ----------------------------------------

# The PostgreSQL server the tests create their databases on (trust auth on these machines and in CI).
POSTGRES_ADMIN_DSN = os.environ.get("CARECHAIN_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")


@pytest.fixture(scope="module")
def postgres_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, uniquely named PostgreSQL database for this test module (dropped after it); its DSN.

    Skips with the reason if no PostgreSQL server answers at CARECHAIN_TEST_POSTGRES (default 127.0.0.1:5432).
    """
    psycopg = pytest.importorskip("psycopg", reason="the postgresql extra (psycopg 3) is not installed")
    from simulators.postgres import scratch_database

    with contextlib.ExitStack() as held:
        try:
            dsn = held.enter_context(scratch_database(POSTGRES_ADMIN_DSN,
                                                      f"cc_{request.module.__name__.rsplit('.', 1)[-1][:30]}"))
        except psycopg.OperationalError as exc:
            pytest.skip(f"no PostgreSQL server answers at {POSTGRES_ADMIN_DSN!r}: {str(exc).strip()}")
        yield dsn


@dataclass
class LedgerFactory:
    """Opens ledgers on one backend; `factory(path)` opens the ledger a bridge would keep at `path`.

    SQLite: the file at `path`. PostgreSQL: a schema of the module's database, one per distinct `path`, so two
    calls with one path open one ledger (a reopened store, a second process) and two paths two ledgers.
    """

    backend: str
    dsn: str | None = None

    def location(self, path: Path) -> StoreLocation:
        if self.dsn is None:
            return SqliteLocation(Path(path))
        from psycopg import connect, conninfo, sql

        from chain_bridge.ledger.postgres import PostgresLocation

        schema = "l_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
        with connect(self.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        return PostgresLocation(conninfo.make_conninfo(self.dsn, options=f"-c search_path={schema}"))

    def store_config(self, path: Path) -> dict[str, str]:
        """`bridge.store` for a config file or BridgeConfig naming the same ledger as `factory(path)`."""
        from chain_bridge.ledger.postgres import PostgresLocation

        location = self.location(path)
        if isinstance(location, PostgresLocation):
            return {"backend": "postgresql", "dsn": location.dsn}
        return {"backend": "sqlite"}

    def __call__(self, path: Path) -> Ledger:
        return Ledger(self.location(path))


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_factory(request: pytest.FixtureRequest) -> LedgerFactory:
    """Ledgers on SQLite and, in a second run of the test, on PostgreSQL (a database of the test module)."""
    if request.param == "sqlite":
        return LedgerFactory("sqlite")
    return LedgerFactory("postgresql", request.getfixturevalue("postgres_dsn"))
