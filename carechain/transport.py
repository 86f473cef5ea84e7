"""The one MQTT client setup shared by agents, bridges and tools: credentials, TLS, reconnect policy.

paho's own reconnect loop is the retry policy (exponential backoff 1 s → 30 s); on every (re)connect the
client re-subscribes, so a broker restart needs no help from the caller.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from carechain.config import BrokerConfig
from carechain.files import check_private

log = logging.getLogger("carechain.transport")
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
# Far below the 65,535 packet ids a client has: ids must never wrap while messages are in flight.
MAX_INFLIGHT = 4096

MessageHandler = Callable[[mqtt.Client, object, mqtt.MQTTMessage], None]


def tls_context(broker: BrokerConfig) -> ssl.SSLContext:
    """TLS ≥ 1.2 trusting only `broker.tls_ca`, checking the certificate names `broker.host`; presents
    `tls_cert`/`tls_key` when the broker asks for a client certificate."""
    if broker.tls_ca is None:
        raise ValueError("broker.tls_ca is not set")
    if (broker.tls_cert is None) != (broker.tls_key is None):
        raise ValueError("broker.tls_cert and broker.tls_key go together: set both or neither")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(broker.tls_ca))  # CERT_REQUIRED, hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if broker.tls_cert is not None and broker.tls_key is not None:
        check_private(broker.tls_key)  # FilePermissionError (an OSError) if others can read the key
        ctx.load_cert_chain(str(broker.tls_cert), str(broker.tls_key))
    return ctx


def connect_client(
    broker: BrokerConfig,
    client_id: str,
    *,
    clean_session: bool = True,
    on_message: MessageHandler | None = None,
    subscriptions: Sequence[tuple[str, int]] = (),
    connected: threading.Event | None = None,
    on_state: Callable[[bool], None] | None = None,
    max_queued: int = 0,
) -> mqtt.Client:
    """Create a paho client, start its network thread and connect asynchronously (it keeps retrying)."""
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls_ca:
        client.tls_set_context(tls_context(broker))
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(max_queued)
    if on_message is not None:
        client.on_message = on_message

    def _on_connect(c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.warning("%s: broker %s refused the connection: %s", client_id, broker.address, rc)
            return
        if subscriptions:
            # `connected` waits for the SUBACK: only then can nothing published to us be missed.
            c.subscribe([(topic, qos) for topic, qos in subscriptions])
        elif connected is not None:
            connected.set()
        if on_state is not None:
            on_state(True)

    def _on_subscribe(_c: mqtt.Client, _u: object, _mid: int, codes: list[mqtt.ReasonCode], _p: object) -> None:
        refused = [str(rc) for rc in codes if rc.is_failure]
        if refused:
            log.error("%s: broker %s refused a subscription: %s", client_id, broker.address, ", ".join(refused))
        elif connected is not None:
            connected.set()

    def _on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if connected is not None:
            connected.clear()
        if on_state is not None:
            on_state(False)
        if rc.is_failure:
            log.warning("%s: lost broker %s (%s); reconnecting with backoff", client_id, broker.address, rc)

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
    client.on_subscribe = _on_subscribe
    client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s)
    client.loop_start()
    return client
