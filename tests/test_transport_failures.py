"""Failed connects are loud and retried with jittered backoff (carechain.transport, used by agents and bridges).

Every case runs against something real: a port nothing listens on, a name that does not resolve, a mosquitto
whose TLS certificate names another host, a mosquitto that refuses the password, two clients sharing an id.
Each test polls the log for the line a user would see at the default level (WARNING and above).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from carechain import topics
from carechain.config import BrokerConfig
from carechain.identity import Identity
from carechain.pki import init_ca, issue_server
from carechain.retry import MQTT_RECONNECT, Backoff, ReconnectPolicy
from carechain.transport import connect_client
from simulators.mosquitto import Mosquitto, mosquitto_binary
from simulators.ports import free_port

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
FAST = ReconnectPolicy(initial_s=0.05, max_s=0.2, jitter=0.2, stable_s=5.0)


class Lines(logging.Handler):
    """Collects carechain.transport's records at WARNING and above — what a user sees without -v."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append(record)

    def texts(self) -> list[str]:
        with self._lock:
            return [r.getMessage() for r in self.records]

    def wait_for(self, predicate: Callable[[str], bool], count: int = 1, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t in self.texts() if predicate(t)]
            if len(hits) >= count:
                return hits
            time.sleep(0.05)
        raise AssertionError(f"no {count} matching log line(s) within {timeout} s; got: {self.texts()}")


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("carechain.transport")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def clients() -> Iterator[list[mqtt.Client]]:
    made: list[mqtt.Client] = []
    yield made
    for c in made:
        c.disconnect()
        c.loop_stop()


def test_mqtt_reconnect_delays_grow_capped_and_jittered() -> None:
    delays = [Backoff(MQTT_RECONNECT, random.Random(seed)).failed() for seed in range(20)]
    assert all(0.8 <= d <= 1.2 for d in delays)  # first wait ≈ 1 s ± 20 %
    assert len({round(d, 6) for d in delays}) > 10  # jittered: clients do not retry in lockstep
    b = Backoff(MQTT_RECONNECT, random.Random(1))
    later = [b.failed() for _ in range(12)]
    assert later[3] > later[0] * 4 and max(later) <= MQTT_RECONNECT.max_s


def test_a_closed_port_is_logged_with_the_reason_and_retried_under_our_policy(lines: Lines, clients) -> None:
    port = free_port()
    clients.append(connect_client(BrokerConfig(port=port), "closed-port-probe", policy=FAST))
    hits = lines.wait_for(lambda t: f"connection refused by 127.0.0.1:{port}" in t, count=5)
    # Five attempts within seconds: paho's own backoff (1, 2, 4, 8 s) would need 15 s for that.
    assert "is the broker running" in hits[0] and "attempt 1;" in hits[0] and "attempt 5;" in hits[4]


def test_a_host_name_that_does_not_resolve_is_logged(lines: Lines, clients) -> None:
    broker = BrokerConfig(host="no-such-broker.invalid", port=1883)
    clients.append(connect_client(broker, "dns-probe", policy=FAST))
    hit = lines.wait_for(lambda t: "cannot resolve broker host 'no-such-broker.invalid'" in t)[0]
    assert "check broker.host" in hit


@pytest.fixture
def tls_broker_for_another_name(tmp_path: Path) -> Iterator[tuple[Mosquitto, int, Path]]:
    ca = tmp_path / "ca"
    init_ca(ca)
    issue_server(ca, hosts=["broker.example.org"], ips=[], out_dir=tmp_path / "certs")
    tls_port = free_port()
    listener = (f"listener {tls_port} 127.0.0.1\ncafile {ca / 'ca.crt'}\ncertfile {tmp_path / 'certs' / 'server.crt'}"
                f"\nkeyfile {tmp_path / 'certs' / 'server.key'}\ntls_version tlsv1.2\n")
    m = Mosquitto(tmp_path / "mosquitto", listeners=listener, wait_ports=(tls_port,)).start()
    try:
        yield m, tls_port, ca / "ca.crt"
    finally:
        m.stop()


@needs_mosquitto
def test_a_certificate_for_another_name_says_which_name_it_has_and_how_to_issue_the_right_one(
        lines: Lines, clients, tls_broker_for_another_name: tuple[Mosquitto, int, Path]) -> None:
    _m, port, ca = tls_broker_for_another_name
    clients.append(connect_client(BrokerConfig(port=port, tls_ca=ca), "tls-probe", policy=FAST))
    hits = lines.wait_for(lambda t: "TLS:" in t, count=2)  # and it keeps retrying
    assert ("the broker's certificate is for broker.example.org, not 127.0.0.1: issue it with "
            "`carechain keys ca server --ip 127.0.0.1`") in hits[0]
    assert [r.levelno for r in lines.records if "TLS:" in r.getMessage()][0] == logging.ERROR


@needs_mosquitto
def test_a_certificate_from_another_ca_is_named_as_such(lines: Lines, clients, tmp_path: Path,
                                                        tls_broker_for_another_name) -> None:
    _m, port, _ca = tls_broker_for_another_name
    init_ca(tmp_path / "other-ca")
    clients.append(connect_client(BrokerConfig(port=port, tls_ca=tmp_path / "other-ca" / "ca.crt"), "ca-probe",
                                  policy=FAST))
    hit = lines.wait_for(lambda t: "TLS:" in t)[0]
    assert "is not signed by the CA in broker.tls_ca" in hit and str(tmp_path / "other-ca" / "ca.crt") in hit


@needs_mosquitto
def test_a_refused_password_names_the_user_and_where_the_login_comes_from(lines: Lines, clients,
                                                                          tmp_path: Path) -> None:
    from tests.locked_broker import BRIDGE, start_locked_broker

    locked = start_locked_broker(tmp_path, [Identity.generate()])
    try:
        wrong = locked.config(BRIDGE).model_copy(update={"password": "not-the-password"})
        clients.append(connect_client(wrong, "bad-login-probe", policy=FAST))
        hits = lines.wait_for(lambda t: "refused the login of user 'carechain-bridge'" in t, count=2)
        assert "broker.credentials_file" in hits[0] and "not-the-password" not in " ".join(lines.texts())
    finally:
        locked.close()


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield m
    finally:
        m.stop()


@needs_mosquitto
def test_two_clients_with_one_id_are_reported_as_a_takeover(lines: Lines, clients, plain_broker: Mosquitto) -> None:
    broker = BrokerConfig(port=plain_broker.port)
    fast = ReconnectPolicy(initial_s=0.1, max_s=0.5, jitter=0.2, stable_s=5.0)
    ready = threading.Event()
    clients.append(connect_client(broker, "carechain-bridge-twin", policy=fast, connected=ready,
                                  subscriptions=[(topics.CHECKPOINT, 1)]))
    assert ready.wait(10)
    clients.append(connect_client(broker, "carechain-bridge-twin", policy=fast))
    hit = lines.wait_for(lambda t: "likely another process logged in with client id carechain-bridge-twin" in t)
    assert "two bridges or agents on one data dir" in hit[0]


@needs_mosquitto
def test_one_client_alone_is_never_reported_as_a_takeover(lines: Lines, clients, plain_broker: Mosquitto) -> None:
    ready = threading.Event()
    clients.append(connect_client(BrokerConfig(port=plain_broker.port), "alone", connected=ready, policy=FAST))
    assert ready.wait(10)
    plain_broker.stop()  # the broker goes away: a lost link and refused reconnects, but no takeover
    lines.wait_for(lambda t: "connection refused" in t, count=3)
    assert not [t for t in lines.texts() if "client id" in t]
    assert any("lost broker" in t for t in lines.texts())


@needs_mosquitto
def test_the_link_callback_gets_the_client_it_reports_on_even_before_connect_client_returns(
        clients, plain_broker: Mosquitto) -> None:
    """The first CONNACK can arrive before `connect_client` returns (the network thread is already running), so a
    callback reading the client back from its caller's attribute could find nothing there yet (the bridge once
    skipped its retained checkpoint that way): it is handed the client instead, up and down."""
    seen: list[tuple[mqtt.Client, bool]] = []
    up, down = threading.Event(), threading.Event()

    def on_state(client: mqtt.Client, is_up: bool) -> None:
        seen.append((client, is_up))
        if is_up:
            client.publish("probe/first", b"x", qos=0)  # usable at once, whoever holds it
        (up if is_up else down).set()

    client = connect_client(BrokerConfig(port=plain_broker.port), "link-callback", on_state=on_state, policy=FAST)
    clients.append(client)
    assert up.wait(10)
    plain_broker.stop()
    assert down.wait(10)
    assert [(c is client, is_up) for c, is_up in seen[:2]] == [(True, True), (True, False)]
