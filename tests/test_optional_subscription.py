"""An optional subscription the broker refuses (an ACL written before the topic existed) is logged once and never
holds the client back: a bridge upgraded before its broker logins were regenerated keeps running without the
device-status topic. (mosquitto grants such a SUBSCRIBE and filters on delivery; a NATS node refuses it.)"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from carechain.config import BrokerConfig
from carechain.transport import connect_client
from chain_bridge.broker.nats import MQTT_QOS1_DELIVERY, NatsUser
from simulators.nats_cluster import NatsCluster, nats_binary

pytestmark = pytest.mark.skipif(nats_binary() is None, reason="nats-server is not installed (apt nats-server)")


def test_a_refused_optional_subscription_is_logged_once_and_the_client_is_connected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A login as an older `carechain bridge acl` wrote it: events, but no status topic.
    old = NatsUser("old-bridge", "pw", publish=("cc.v1.dev.*.ev",),
                   subscribe=("cc.v1.dev.*.ev", MQTT_QOS1_DELIVERY), connection_types=("MQTT",))
    got: list[str] = []
    caplog.set_level(logging.WARNING, "carechain.transport")
    with NatsCluster(tmp_path / "nats", users=(old,)) as cluster:
        broker = BrokerConfig(host="127.0.0.1", port=cluster.nodes[0].ports.mqtt, username="old-bridge",
                              password="pw")
        up = threading.Event()
        client = connect_client(broker, "optional-sub", connected=up, subscriptions=[("cc/v1/dev/+/ev", 1)],
                                optional=[("cc/v1/dev/+/status", 0)],
                                on_message=lambda _c, _u, m: got.append(m.topic))
        try:
            assert up.wait(20), "the refused optional topic held the client back"
            time.sleep(1.0)  # a retry of the optional subscription would log again
            client.publish("cc/v1/dev/abc/ev", b"x", qos=1).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            client.disconnect()
            client.loop_stop()
    assert got == ["cc/v1/dev/abc/ev"]  # the required subscription works
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refused cc/v1/dev/+/status" in m for m in messages) == 1, messages
    assert not any("refused a subscription" in m for m in messages), messages
