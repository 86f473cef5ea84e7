"""carechain.mqtt_loop: many MQTT clients on one network thread, whatever their descriptor numbers.

paho's own loop waits on select(), which cannot watch descriptors ≥ 1024: an agent with ~1,000 devices had most of
them never connect. These tests put every client's socket above 1023 (by holding 1,100 descriptors first) and
check against a real mosquitto: all connect, messages flow both ways, all come back after the broker restarts,
and a clean stop sends every DISCONNECT.
"""

from __future__ import annotations

import gc
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from carechain.config import BrokerConfig
from carechain.mqtt_loop import NetworkLoop
from carechain.retry import ReconnectPolicy
from carechain.transport import connect_client
from simulators.mosquitto import Mosquitto, mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto")
CLIENTS = 60
FAST = ReconnectPolicy(initial_s=0.2, max_s=1.0)


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    """Hold 1,100 descriptors so that every socket opened next is numbered above 1023 (as in a big agent)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the open-files limit ({hard}) is too low to hold 1,100 descriptors")
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096, hard))
    gc.collect()  # sockets earlier tests dropped are closed now, not in the middle of this test
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _wait(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_clients_above_descriptor_1023_connect_exchange_messages_and_survive_a_broker_restart(
        tmp_path: Path, high_descriptors: None) -> None:
    broker = Mosquitto(tmp_path / "broker", extra="log_type all").start()
    net = NetworkLoop(name="test-mqtt")
    got: dict[int, list[bytes]] = {i: [] for i in range(CLIENTS)}
    lock = threading.Lock()
    ready = [threading.Event() for _ in range(CLIENTS)]
    clients: list[mqtt.Client] = []
    try:
        cfg = BrokerConfig(host="127.0.0.1", port=broker.port)
        for i in range(CLIENTS):
            def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage, i: int = i) -> None:
                with lock:
                    got[i].append(bytes(msg.payload))
            clients.append(connect_client(cfg, f"loop-{i}", on_message=on_message, subscriptions=[(f"t/{i}", 1)],
                                          connected=ready[i], policy=FAST, network=net))
        assert _wait(lambda: all(e.is_set() for e in ready)), \
            f"{sum(e.is_set() for e in ready)} of {CLIENTS} clients connected"
        # Nearly all above 1023 (a descriptor an earlier test's garbage frees meanwhile may be reused below):
        # with paho's own loop, any one of those would never have connected.
        assert sum(c.socket().fileno() >= 1024 for c in clients) >= CLIENTS // 2  # type: ignore[union-attr]

        # Published from this thread (not the network thread): each client gets its own messages, QoS 1.
        for round_ in range(5):
            for i, c in enumerate(clients):
                c.publish(f"t/{(i + 1) % CLIENTS}", f"{round_}".encode(), qos=1)
        assert _wait(lambda: all(len(v) == 5 for v in got.values())), {i: len(v) for i, v in got.items() if len(v) != 5}

        broker.stop()
        assert _wait(lambda: not any(e.is_set() for e in ready), 15)
        broker = Mosquitto(tmp_path / "broker", port=broker.port, extra="log_type all").start()
        assert _wait(lambda: all(e.is_set() for e in ready)), \
            f"{sum(e.is_set() for e in ready)} of {CLIENTS} clients back after the restart"
        for i, c in enumerate(clients):
            c.publish(f"t/{(i + 1) % CLIENTS}", b"after", qos=1)
        assert _wait(lambda: all(v[-1:] == [b"after"] for v in got.values()))
    finally:
        for c in clients:
            c.disconnect()
        net.stop()
        log = broker.log_text()
        broker.stop()
    assert not net._thread.is_alive()
    # Every client said goodbye (a clean DISCONNECT, so no last will and no "closed its connection" error).
    assert log.count("disconnected.") >= CLIENTS, log[-2000:]


def test_a_client_the_caller_disconnects_is_never_dialled_again(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker", extra="log_type all") as broker:
        net = NetworkLoop(name="test-mqtt")
        up = threading.Event()
        client = connect_client(BrokerConfig(host="127.0.0.1", port=broker.port), "loop-once", connected=up,
                                subscriptions=[("t/once", 1)], policy=FAST, network=net)
        try:
            assert up.wait(10)
            client.disconnect()
            assert _wait(lambda: client.socket() is None, 10)
            time.sleep(1.5)  # several retry delays of FAST: a reconnect would have happened by now
            assert client.socket() is None
            assert broker.log_text().count("New client connected") == 1
        finally:
            net.stop()
