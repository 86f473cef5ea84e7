"""Shared fixtures: a private MQTT broker per test session (mosquitto, or amqtt when it is missing)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from carechain.config import BrokerConfig
from chain_bridge.embedded_broker import EmbeddedBroker
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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (tests/test_faults.py) when those tests ran."""
    import sys

    module = sys.modules.get("tests.test_faults") or sys.modules.get("test_faults")
    results = getattr(module, "RESULTS", None)
    if results:
        from simulators.faults import table

        terminalreporter.write_sep("-", "fault injection: every signed event in the log exactly once")
        terminalreporter.write_line(table(results))
