"""A real mosquitto locked down by the files `carechain bridge acl` generates, and raw MQTT logins to probe it.

Shared by tests/test_broker_acl.py and tests/test_tls.py. Nothing is mocked: the password file and ACL
come from the ledger's registry through chain_bridge.broker.acl, and mosquitto enforces them.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from carechain.config import BrokerConfig
from carechain.credentials import MqttCredentials, load_mqtt_credentials
from carechain.entries import Revocation, revocation_entry
from carechain.identity import Identity
from chain_bridge.broker import SECURE_CONF_TEMPLATE
from chain_bridge.broker.acl import DEFAULT_BRIDGE_USER, MINER_USER_PREFIX, BrokerAccess, generate_broker_access
from chain_bridge.ledger.store import Ledger
from simulators.mosquitto import REPO, Mosquitto
from tests.test_pipeline import OPERATOR, register

LOCKED_CONF = REPO / "tests" / "broker" / "mosquitto-locked-test.conf"
BRIDGE = DEFAULT_BRIDGE_USER
# As the shipped template's listener: a client's id is its user name (docs/broker-security.md).
TIED_IDS = "use_username_as_clientid true"


def revoke(ledger: Ledger, ident: Identity) -> None:
    rev = Revocation(dev=ident.device_id, reason="lost", ts=int(time.time() * 1000))
    ledger.append_revocation(revocation_entry(OPERATOR, rev), rev)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@dataclass
class Conn:
    """One raw paho client: how its CONNECT was answered, what it received, whether it was dropped."""

    client: mqtt.Client
    rc: mqtt.ReasonCode | None = None
    session_present: bool = False  # CONNACK: the broker resumed a session kept for this client id
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    retained: list[bool] = field(default_factory=list)  # per message: sent because it was retained
    granted: list[list[mqtt.ReasonCode]] = field(default_factory=list)
    answered: threading.Event = field(default_factory=threading.Event)
    dropped: threading.Event = field(default_factory=threading.Event)

    @property
    def accepted(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def subscribe(self, *topics: str, qos: int = 1) -> None:
        n = len(self.granted)
        for t in topics:
            self.client.subscribe(t, qos=qos)
        assert wait_until(lambda: len(self.granted) >= n + len(topics), 5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)  # PUBACK: with MQTT 3.1.1 mosquitto acknowledges even a denied publish
        assert info.is_published()

    def got(self, topic: str, payload: bytes | None = None) -> bool:
        return any(t == topic and (payload is None or p == payload) for t, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def login(port: int, username: str | None = None, password: str | None = None, *, host: str = "127.0.0.1",
          client_id: str | None = None, tls: ssl.SSLContext | None = None, timeout: float = 5.0,
          clean_session: bool = True) -> Conn:
    """Connect once (no reconnects) and wait for the CONNACK, or for the connection to fail."""
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                    client_id=client_id or f"probe-{secrets.token_hex(4)}", protocol=mqtt.MQTTv311,
                    clean_session=clean_session)
    conn = Conn(c)
    if username is not None:
        c.username_pw_set(username, password)
    if tls is not None:
        c.tls_set_context(tls)

    def on_connect(_c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, rc: mqtt.ReasonCode, _p: object) -> None:
        conn.rc = rc
        conn.session_present = flags.session_present
        conn.answered.set()

    def on_disconnect(*_a: object) -> None:
        conn.dropped.set()
        conn.answered.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        conn.retained.append(bool(m.retain))
        conn.messages.append((m.topic, m.payload))

    c.on_message = on_message
    c.on_subscribe = lambda _c, _u, _mid, codes, _p: conn.granted.append(codes)
    try:
        c.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError):
        conn.answered.set()
        return conn
    c.loop_start()
    conn.answered.wait(timeout)
    if not conn.accepted:
        c.loop_stop()
    return conn


def can_login(port: int, username: str | None, password: str | None, **kw: object) -> bool:
    conn = login(port, username, password, **kw)  # type: ignore[arg-type]
    conn.close()
    return conn.accepted


@dataclass
class LockedBroker:
    root: Path
    ledger: Ledger
    mosquitto: Mosquitto
    access: BrokerAccess

    @property
    def data_dir(self) -> Path:
        return self.root / "bridge"

    @property
    def out_dir(self) -> Path:
        return self.root / "broker-files"

    @property
    def port(self) -> int:
        return self.mosquitto.port

    def credentials(self, user: str) -> MqttCredentials:
        if user == BRIDGE or user.startswith(f"{BRIDGE}-w"):  # workers share the bridge's file
            return load_mqtt_credentials(self.out_dir / "bridge.json").model_copy(update={"username": user})
        if user.startswith(MINER_USER_PREFIX):
            return load_mqtt_credentials(self.out_dir / "miners" / f"{user.removeprefix(MINER_USER_PREFIX)}.json")
        return load_mqtt_credentials(self.out_dir / "devices" / f"{user}.json")

    def password(self, user: str) -> str:
        return self.credentials(user).password

    def login(self, user: str, **kw: object) -> Conn:
        return login(self.port, user, self.password(user), **kw)  # type: ignore[arg-type]

    def config(self, user: str) -> BrokerConfig:
        """Broker settings logging in as `user` through its provisioning file (as `carechain bridge` does)."""
        creds = self.credentials(user)
        return BrokerConfig(host=self.mosquitto.host, port=self.port, username=creds.username,
                            password=creds.password)

    def regenerate(self, *, reload: bool = True, **kw: object) -> BrokerAccess:
        """Re-run the generator (as `carechain bridge acl` does) and, by default, SIGHUP mosquitto."""
        kw.setdefault("workers", self.access.workers)  # miners are kept by the credential store itself
        self.access = generate(self.ledger, self.data_dir, self.out_dir, **kw)
        if reload:
            self.mosquitto.reload()
            time.sleep(0.3)  # mosquitto applies the reload from its main loop
        return self.access

    def close(self) -> None:
        self.mosquitto.stop()
        self.ledger.close()


def generate(ledger: Ledger, data_dir: Path, out_dir: Path, **kw: object) -> BrokerAccess:
    return generate_broker_access(ledger, data_dir, out_dir, **kw)  # type: ignore[arg-type]


def render_template(files: Path, tls_port: int, *, require_certificate: bool = False) -> Path:
    """The shipped template with its paths pointed at `files` and its listener at a free loopback port."""
    text = SECURE_CONF_TEMPLATE.read_text()
    for old, new in (("/etc/mosquitto/carechain/", f"{files}/"),
                     ("/var/lib/mosquitto/", f"{files.parent / 'persistence'}/"),
                     ("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n")):
        assert old in text, f"the template no longer has {old!r}"
        text = text.replace(old, new)
    if require_certificate:
        assert "\n#require_certificate true\n" in text
        text = text.replace("\n#require_certificate true\n", "\nrequire_certificate true\n")
    (files.parent / "persistence").mkdir(parents=True, exist_ok=True)
    conf = files.parent / "mosquitto-secure.conf"
    conf.write_text(text)
    return conf


def start_locked_broker(root: Path, devices: list[Identity], *, conf: Path = LOCKED_CONF, listeners: str = "",
                        wait_ports: tuple[int, ...] = (), auth_lines: bool = True, tied_ids: bool = True,
                        **access: object) -> LockedBroker:
    """Register `devices` on a fresh ledger, generate passwd + ACL from it, start mosquitto with them.

    `auth_lines=False` when `conf` names the password file and ACL itself (the shipped template).
    `tied_ids=False` leaves out `use_username_as_clientid` on the plain listener (how brokers were set up
    before: any login could take any client id). `access` goes to `generate_broker_access` (workers, miners)."""
    ledger = Ledger(root / "bridge" / "ledger.db")
    if devices:
        register(ledger, devices)
    access_files = generate(ledger, root / "bridge", root / "broker-files", **access)
    extra = f"password_file {access_files.passwd}\nacl_file {access_files.acl}\n" if auth_lines else ""
    m = Mosquitto(root / "mosquitto", conf=conf, listeners=listeners, wait_ports=wait_ports, extra=extra,
                  listener_options=TIED_IDS if tied_ids else "")
    m.start()
    return LockedBroker(root, ledger, m, access_files)
