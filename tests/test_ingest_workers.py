"""Ingest worker processes stop when their bridge says so: a Ctrl-C reaching them is the parent's to handle."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import pytest

from carechain import topics
from carechain.config import Limits
from chain_bridge.ingest import Rejection
from chain_bridge.ledger.store import Ledger
from chain_bridge.workers import WorkerPool, WorkerSpec

if TYPE_CHECKING:
    from tests.conftest import TestBroker


def test_workers_ignore_sigint_keep_verifying_and_exit_cleanly_when_stopped(broker: TestBroker,
                                                                            tmp_path: Path) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("ingest workers need MQTT shared subscriptions (mosquitto)")
    Ledger(tmp_path / "ledger.db").close()  # the workers read the registry from it
    pool = WorkerPool([WorkerSpec(i, broker.config, tmp_path / "ledger.db", Limits(), 100,
                                  f"workers-{tmp_path.name}-w{i}") for i in range(2)])
    pool.start()
    try:
        assert pool.wait_subscribed(30)
        for pid in pool.pids:
            assert pid is not None
            os.kill(pid, signal.SIGINT)  # what a Ctrl-C in the terminal sends the whole process group
        # Still verifying after the signal: garbage published now comes back as rejections.
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{tmp_path.name}")
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            sent = 20
            for _ in range(sent):
                client.publish(topics.events("a" * 16), b"not an event", qos=1).wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()
        got: list[object] = []
        deadline = time.monotonic() + 30
        while len(got) < sent and time.monotonic() < deadline:
            got += pool.receive(0.2)
        assert len(got) == sent and all(isinstance(v, Rejection) for v in got)
        assert pool.exitcodes == [None, None]  # both alive
    finally:
        pool.stop()
    assert pool.exitcodes == [0, 0]  # left by themselves when asked: no KeyboardInterrupt, not killed
