"""Shared fixtures: a private MQTT broker per test session (mosquitto, or amqtt when it is missing)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carechain.config import BridgeConfig, BrokerConfig, Limits
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.embedded_broker import EmbeddedBroker
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



def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (tests/test_faults.py) when those tests ran."""
    import sys

    module = sys.modules.get("tests.test_faults") or sys.modules.get("test_faults")
    results = getattr(module, "RESULTS", None)
    if results:
        from simulators.fault_harness import table

        terminalreporter.write_sep("-", "fault injection: every signed event in the log exactly once")
        terminalreporter.write_line(table(results))
