"""The one MQTT client setup shared by agents, bridges and tools: credentials, TLS, reconnect policy.

paho's network thread keeps reconnecting, but the delays are ours: `carechain.retry` (the one retry
policy, with jitter, so a fleet does not reconnect in lockstep after a broker restart). On every
(re)connect the client re-subscribes, so a broker restart needs no help from the caller.

Every failed connect is logged at WARNING or ERROR — visible without `-v` — with what to do about it:
nothing listening, a host name that does not resolve, a broker certificate that does not name the host
dialled (with the names it does carry), a login the broker refuses. A connection the broker keeps closing
right after it opens is reported as a likely client-id takeover: two processes logging in with one id.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from carechain.config import BrokerConfig
from carechain.files import check_private
from carechain.mqtt_loop import NetworkLoop
from carechain.retry import MQTT_RECONNECT, Backoff, ReconnectPolicy

log = logging.getLogger("carechain.transport")
# Far below the 65,535 packet ids a client has: ids must never wrap while messages are in flight.
MAX_INFLIGHT = 4096
# A link the broker closes this many times in a row before it was up `stable_s` is most likely a client-id
# takeover (MQTT 3.1.1 has no reason code for it; v5's is 142, "Session taken over").
TAKEOVER_DROPS = 3
# A refused subscription is asked again after this (times 1-2, jittered), at most SUBSCRIBE_RETRY_MAX_S.
SUBSCRIBE_RETRY_S = 2.0
SUBSCRIBE_RETRY_MAX_S = 30.0
SESSION_TAKEN_OVER = 142
# OpenSSL verify codes (include/openssl/x509_vfy.h)
_HOSTNAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_UNTRUSTED = {2, 18, 19, 20, 21}  # issuer unknown, self-signed (in chain), unable to get/verify local issuer
_EXPIRED = {10}  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = {9}
_LOGIN_REFUSED = {"Bad user name or password", "Not authorized"}

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


def certificate_names(broker: BrokerConfig, timeout_s: float = 3.0) -> list[str] | None:
    """The DNS names and IP addresses the broker's certificate carries (its subjectAltName), read with the
    chain checked against `broker.tls_ca` but not the name — to say which names it has when the one dialled
    is not among them. None when it cannot be read."""
    try:
        ctx = tls_context(broker)
        ctx.check_hostname = False
        with socket.create_connection((broker.host, broker.port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=broker.host) as tls:
            cert = tls.getpeercert()
    except (OSError, ValueError):
        return None
    if not cert:
        return None
    return [str(entry[1]) for entry in cert.get("subjectAltName", ()) if len(entry) == 2]  # (kind, value)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def describe_connect_error(exc: OSError, broker: BrokerConfig) -> str:
    """What a failed connect means and what to do about it, in one line (no secrets)."""
    addr = broker.address
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _HOSTNAME_MISMATCH:
            names = certificate_names(broker)
            carries = f"for {', '.join(names)}" if names else "not"
            flag = "--ip" if _is_ip(broker.host) else "--host"
            return (f"TLS: the broker's certificate is {carries}, not {broker.host}: issue it with "
                    f"`carechain keys ca server {flag} {broker.host}` (with every other --host/--ip clients use), "
                    f"or set broker.host to a name it carries")
        if code in _UNTRUSTED:
            return (f"TLS: the certificate of {addr} is not signed by the CA in broker.tls_ca ({broker.tls_ca}): "
                    f"{exc.verify_message}")
        if code in _EXPIRED:
            return f"TLS: the certificate of {addr} has expired: issue a new one with `carechain keys ca server`"
        if code in _NOT_YET_VALID:
            return f"TLS: the certificate of {addr} is not valid yet: check this host's clock"
        return f"TLS: the certificate of {addr} failed verification: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake with {addr} failed ({exc.reason or exc}): is it a TLS listener, and does it accept "
                f"this client's certificate (broker.tls_cert)?")
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {addr}: is the broker running, and is broker.port right?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve broker host {broker.host!r} ({exc.strerror}): check broker.host"
    if isinstance(exc, TimeoutError):
        return f"no answer from {addr} (timed out): check broker.host/port and any firewall between"
    return f"cannot connect to {addr}: {exc.strerror or exc}"


def describe_refusal(rc: mqtt.ReasonCode, broker: BrokerConfig) -> str:
    """A CONNACK refusal in one line: for a refused login, which user and where the login comes from."""
    if str(rc) in _LOGIN_REFUSED:
        who = f"user {broker.username!r}" if broker.username else "an anonymous client"
        return (f"broker {broker.address} refused the login of {who} ({rc}): check this client's MQTT login "
                f"(broker.credentials_file for a bridge, agent.devices[].mqtt_credentials_file for a device)")
    return f"broker {broker.address} refused the connection: {rc}"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class _Link:
    """The connection state of one client, fed by paho's network thread (all calls come from that thread):
    logs each failure, picks the next delay from the retry policy, spots takeovers."""

    def __init__(self, client: mqtt.Client, client_id: str, broker: BrokerConfig, policy: ReconnectPolicy) -> None:
        self.client, self.client_id, self.broker = client, client_id, broker
        self.backoff = Backoff(policy)
        self.up = False
        self.failed_attempts = 0  # since the last successful connect
        self.quick_drops = 0  # consecutive links the broker closed before they were stable
        self._refusal_logged = False
        # The broker's address, then `broker.failover`'s: after a failure the next attempt goes to the next one.
        self.addresses = [(broker.host, broker.port), *(_host_port(a) for a in broker.failover)]
        self._at = 0
        self.move_on = False
        self.retry_delay_s = policy.initial_s  # the wait before the next attempt (read by carechain.mqtt_loop)
        self.closed = False  # disconnected on purpose: no more attempts

    def next_address(self) -> tuple[str, int] | None:
        """Where the coming attempt should go, if another address than the last one (after a failure)."""
        if not self.move_on or len(self.addresses) < 2:
            return None
        self.move_on = False
        self._at = (self._at + 1) % len(self.addresses)
        host, port = self.addresses[self._at]
        self.broker = self.broker.model_copy(update={"host": host, "port": port})
        return host, port

    def _retry_in(self, delay_s: float) -> None:
        # paho waits its reconnect delay before the next attempt; with min = max it waits exactly ours.
        # (paho sleeps fractional seconds fine; its int hint is narrower than its code.)
        self.retry_delay_s = delay_s
        self.client.reconnect_delay_set(delay_s, delay_s)  # type: ignore[arg-type]

    def attempt_failed(self, exc: OSError) -> None:
        self.failed_attempts += 1
        self.move_on = True
        delay = self.backoff.failed()
        level = logging.ERROR if isinstance(exc, ssl.SSLError) else logging.WARNING
        log.log(level, "%s: cannot connect to broker %s: %s (attempt %d; retrying in %.1f s)", self.client_id,
                self.broker.address, describe_connect_error(exc, self.broker), self.failed_attempts, delay)
        self._retry_in(delay)

    def connack(self, rc: mqtt.ReasonCode) -> None:
        if rc.is_failure:
            self.move_on = True
            self._refusal_logged = True
            self.failed_attempts += 1
            log.error("%s: %s (attempt %d)", self.client_id, describe_refusal(rc, self.broker), self.failed_attempts)
            return
        now = time.monotonic()
        if self.failed_attempts:
            log.warning("%s: connected to broker %s after %d failed attempt(s)", self.client_id,
                        self.broker.address, self.failed_attempts)
        else:
            log.info("%s: connected to broker %s", self.client_id, self.broker.address)
        self.failed_attempts = 0
        self.up = True
        self.backoff.connected(now)

    def disconnected(self, rc: mqtt.ReasonCode) -> None:
        now = time.monotonic()
        was_up, self.up = self.up, False
        if not rc.is_failure:
            self.closed = True
            return  # our own disconnect(): paho's loop ends, nothing to retry
        self.move_on = True
        if not was_up:
            delay = self.backoff.failed()
            if not self._refusal_logged:
                self.failed_attempts += 1
                log.warning("%s: broker %s closed the connection before accepting the login (%s): a TLS listener "
                            "dialled without broker.tls_ca, or a broker that rejects this client (attempt %d)",
                            self.client_id, self.broker.address, rc, self.failed_attempts)
            self._refusal_logged = False
            self._retry_in(delay)
            return
        stable = self.backoff.was_stable(now)
        delay = self.backoff.link_lost(now)
        self.quick_drops = 0 if stable else self.quick_drops + 1
        if rc.value == SESSION_TAKEN_OVER or self.quick_drops == TAKEOVER_DROPS or (
                self.quick_drops > TAKEOVER_DROPS and self.quick_drops % 20 == 0):
            log.warning("%s: broker %s keeps closing this connection right after it opens (%d times in a row): "
                        "likely another process logged in with client id %s — two bridges or agents on one data "
                        "dir, or a copied config or data dir", self.client_id, self.broker.address,
                        max(self.quick_drops, 1), self.client_id)
        else:
            log.warning("%s: lost broker %s (%s); reconnecting in %.1f s", self.client_id, self.broker.address,
                        rc, delay)
        self._retry_in(delay)


class _Client(mqtt.Client):
    """paho's client, telling its `_Link` why a connect attempt failed (paho's on_connect_fail says not why)."""

    link: _Link | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        if self.link is not None and (address := self.link.next_address()) is not None:
            # paho's `host`/`port` setters refuse while its state still says connected (it is not: this is
            # the reconnect); the attributes are what its reconnect dials.
            self._host, self._port = address
        try:
            return super().reconnect()
        except OSError as exc:
            if self.link is not None:
                self.link.attempt_failed(exc)
            raise


def connect_client(
    broker: BrokerConfig,
    client_id: str,
    *,
    clean_session: bool = True,
    on_message: MessageHandler | None = None,
    subscriptions: Sequence[tuple[str, int]] = (),
    connected: threading.Event | None = None,
    on_state: Callable[[mqtt.Client, bool], None] | None = None,
    max_queued: int = 0,
    policy: ReconnectPolicy = MQTT_RECONNECT,
    will: tuple[str, bytes] | None = None,
    network: NetworkLoop | None = None,
    optional: Sequence[tuple[str, int]] = (),
) -> mqtt.Client:
    """Create a paho client, start its network thread and connect asynchronously (it keeps retrying under
    `policy`, logging every failure). `will`: (topic, payload) the broker publishes, retained, when this
    client vanishes without a clean disconnect (an empty payload clears a retained discovery message).
    `network`: drive the client from that shared loop instead of a thread of its own (an agent's many devices;
    carechain.mqtt_loop says why); stop the loop after `disconnect()`ing its clients. `optional`: subscriptions
    the client can do without: asked for in their own SUBSCRIBE on every connect, a refusal is logged once and
    neither retried nor holding back `connected` (a broker ACL written before the topic existed). `on_state`:
    called with the client and whether the link is up; it can run before this function returns (the first
    CONNACK may beat the caller's assignment), so it gets the client passed rather than reading it back."""
    client = _Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
    )
    link = _Link(client, client_id, broker, policy)
    client.link = link
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls_ca:
        client.tls_set_context(tls_context(broker))
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(max_queued)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    if on_message is not None:
        client.on_message = on_message

    def _on_connect(c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        link.connack(rc)
        if rc.is_failure:
            return
        if subscriptions:
            # `connected` waits for the SUBACK: only then can nothing published to us be missed.
            c.subscribe([(topic, qos) for topic, qos in subscriptions])
        elif connected is not None:
            connected.set()
        if optional:
            _rc, mid = c.subscribe(list(optional))
            if mid is not None:
                optional_mids.add(mid)
        if on_state is not None:
            on_state(c, True)

    def _resubscribe(c: mqtt.Client) -> None:
        if c.is_connected():
            c.subscribe([(topic, qos) for topic, qos in subscriptions])

    optional_mids: set[int] = set()
    optional_refused_logged = False

    def _on_subscribe(c: mqtt.Client, _u: object, mid: int, codes: list[mqtt.ReasonCode], _p: object) -> None:
        nonlocal optional_refused_logged
        refused = [str(rc) for rc in codes if rc.is_failure]
        if mid in optional_mids:
            optional_mids.discard(mid)
            if refused and not optional_refused_logged:
                optional_refused_logged = True
                log.warning("%s: broker %s refused %s (%s): running without it; regenerate the broker's ACL "
                            "(`carechain bridge acl`) and reload the broker to have it", client_id, broker.address,
                            ", ".join(t for t, _ in optional), ", ".join(refused))
            return
        if refused:
            # Permanent on mosquitto (its ACL), transient on a NATS cluster electing a JetStream leader (a QoS 1
            # subscription is a JetStream consumer there): either way, ask again with backoff rather than stay
            # connected and deaf (a device would never hear its receipts again).
            delay = min(SUBSCRIBE_RETRY_MAX_S, SUBSCRIBE_RETRY_S * (1 + random.random()))
            log.error("%s: broker %s refused a subscription: %s (the broker's ACL does not let user %r subscribe, "
                      "or a NATS cluster could not set it up yet); asking again in %.1f s", client_id,
                      broker.address, ", ".join(refused), broker.username, delay)
            timer = threading.Timer(delay, _resubscribe, args=(c,))
            timer.daemon = True
            timer.start()
        elif connected is not None:
            connected.set()

    def _on_disconnect(c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if connected is not None:
            connected.clear()
        if on_state is not None and link.up:
            on_state(c, False)
        link.disconnected(rc)

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
    client.on_subscribe = _on_subscribe
    link._retry_in(link.backoff.policy.initial_s)  # until the first failure picks a jittered delay
    client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s)
    if network is not None:
        network.add(client, link)
    else:
        client.loop_start()
    return client
