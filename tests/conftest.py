"""Shared fixtures: a private MQTT broker per test session (mosquitto, or amqtt when it is missing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carechain.config import BrokerConfig
from chain_bridge.embedded_broker import EmbeddedBroker, free_port

BROKER_CONF = Path(__file__).parent / "broker" / "mosquitto-test.conf"


@dataclass
class TestBroker:
    host: str
    port: int
    kind: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host=self.host, port=self.port)


def _wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {host}:{port}")


def start_mosquitto(tmp: Path, port: int | None = None) -> TestBroker:
    port = port or free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(BROKER_CONF.read_text() + f"\nlistener {port} 127.0.0.1\n")
    proc = subprocess.Popen([_mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "mosquitto.log", "wb"))
    _wait_listening("127.0.0.1", port)
    return TestBroker("127.0.0.1", port, "mosquitto", proc)


def _mosquitto_binary() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def have_mosquitto() -> bool:
    return Path(_mosquitto_binary()).exists()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    """A private broker for the session; never the machine's shared one on :1883."""
    if have_mosquitto():
        b = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
        yield b
        assert b.process is not None
        b.process.terminate()
        b.process.wait(10)
    else:
        with EmbeddedBroker() as eb:
            yield TestBroker(eb.host, eb.port, "amqtt")
