"""TLS for the broker: the shipped mosquitto template, run for real with certificates made by
`carechain keys ca` and the passwd + ACL made by `carechain bridge acl`.

Clients go through carechain.transport (the one MQTT client setup), which must trust only the deployment
CA and check that the certificate names the host it dialled.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carechain import topics
from carechain.cli import app
from carechain.config import BridgeConfig, BrokerConfig
from carechain.identity import Identity
from carechain.transport import connect_client, tls_context
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import Ledger
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox
from simulators.mosquitto import mosquitto_binary
from simulators.ports import free_port
from tests.locked_broker import BRIDGE, LockedBroker, render_template, start_locked_broker

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
SERVER_NAME = "broker.carechain.test"  # not resolvable: clients dial 127.0.0.1, which the certificate names too


def cli(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


class TlsBroker:
    def __init__(self, root: Path, devices: list[Identity], *, require_certificate: bool = False) -> None:
        files = root / "broker-files"
        ca = root / "ca"
        cli("keys", "ca", "init", "--dir", ca)
        cli("keys", "ca", "server", "--dir", ca, "--host", SERVER_NAME, "--ip", "127.0.0.1", "--out", files)
        (files / "ca.crt").write_bytes((ca / "ca.crt").read_bytes())
        self.ca = ca
        self.tls_port = free_port()
        conf = render_template(files, self.tls_port, require_certificate=require_certificate)
        self.locked: LockedBroker = start_locked_broker(root, devices, conf=conf, auth_lines=False,
                                                        wait_ports=(self.tls_port,))

    def config(self, user: str, **kw: object) -> BrokerConfig:
        base = self.locked.config(user)
        return base.model_copy(update={"port": self.tls_port, "tls_ca": self.ca / "ca.crt", **kw})

    def close(self) -> None:
        self.locked.close()


@pytest.fixture
def devices() -> list[Identity]:
    return [Identity.generate() for _ in range(2)]


@pytest.fixture
def tls_broker(tmp_path: Path, devices):
    b = TlsBroker(tmp_path, devices)
    yield b
    b.close()


def connects(broker: BrokerConfig, timeout: float = 4.0) -> bool:
    """Through carechain.transport, as agents and the bridge connect: True once subscribed."""
    ready = threading.Event()
    client = connect_client(broker, f"probe-{time.monotonic_ns()}", connected=ready,
                            subscriptions=[(topics.CHECKPOINT, 1)])
    try:
        return ready.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def handshake(port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        return tls.version() or ""


def test_the_client_tls_context_verifies_the_ca_and_the_host_name(tmp_path: Path) -> None:
    cli("keys", "ca", "init", "--dir", tmp_path)
    ctx = tls_context(BrokerConfig(tls_ca=tmp_path / "ca.crt"))
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="go together"):
        tls_context(BrokerConfig(tls_ca=tmp_path / "ca.crt", tls_cert=tmp_path / "ca.crt"))


def test_a_client_trusting_the_deployment_ca_connects_over_tls(tls_broker: TlsBroker, devices) -> None:
    a = devices[0].device_id
    assert handshake(tls_broker.tls_port, tls_context(tls_broker.config(a))) in ("TLSv1.2", "TLSv1.3")
    assert connects(tls_broker.config(a))
    assert connects(tls_broker.config(BRIDGE))
    assert not connects(tls_broker.config(a, password="wrong"), timeout=2)  # TLS does not replace the login


def test_a_client_with_another_ca_or_host_name_is_refused(tls_broker: TlsBroker, devices, tmp_path: Path) -> None:
    a = devices[0].device_id
    other = tmp_path / "other-ca"
    cli("keys", "ca", "init", "--dir", other)
    wrong_ca = tls_broker.config(a, tls_ca=other / "ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(tls_broker.tls_port, tls_context(wrong_ca))
    assert not connects(wrong_ca, timeout=2)
    # right CA, but a name the certificate does not carry (127.0.0.1 and broker.carechain.test only)
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        handshake(tls_broker.tls_port, tls_context(tls_broker.config(a)), server_hostname="localhost")
    assert not connects(tls_broker.config(a, host="localhost"), timeout=2)
    # and plain MQTT on the TLS port gets no answer
    assert not connects(tls_broker.config(a, tls_ca=None), timeout=2)


def test_with_require_certificate_only_clients_with_a_ca_signed_certificate_get_in(tmp_path: Path, devices) -> None:
    b = TlsBroker(tmp_path / "strict", devices, require_certificate=True)
    try:
        a = devices[0].device_id
        certs = tmp_path / "client-certs"
        cli("keys", "ca", "client", a, "--dir", b.ca, "--out", certs)
        with_cert = b.config(a, tls_cert=certs / f"{a}.crt", tls_key=certs / f"{a}.key")
        assert connects(with_cert)
        assert not connects(b.config(a), timeout=2)  # the right password, no certificate
        rogue_ca = tmp_path / "rogue-ca"
        cli("keys", "ca", "init", "--dir", rogue_ca)
        rogue_certs = tmp_path / "rogue-certs"
        cli("keys", "ca", "client", a, "--dir", rogue_ca, "--out", rogue_certs)
        rogue = b.config(a, tls_cert=rogue_certs / f"{a}.crt", tls_key=rogue_certs / f"{a}.key")
        assert not connects(rogue, timeout=2)
    finally:
        b.close()


@pytest.mark.integration
async def test_agent_and_bridge_anchor_events_over_the_tls_listener(tls_broker: TlsBroker, devices) -> None:
    locked = tls_broker.locked
    cfg = BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.3)
    bridge = Bridge(cfg, tls_broker.config(BRIDGE), Identity.generate(), Ledger(locked.ledger.path),
                    client_id=f"bridge-tls-{locked.root.name}")
    bridge.start()
    try:
        assert bridge.wait_ready(30)
        agent = Agent([AgentDevice(i, None) for i in devices], Outbox(locked.root / "agent" / "outbox.db"),
                      tls_broker.config(BRIDGE, username=None, password=None), bridge.log_key.public_key,
                      window=50, resend_after_s=5.0,
                      credentials={i.device_id: locked.credentials(i.device_id) for i in devices})
        for ident in devices:
            agent.record(ident.device_id, [("heart_rate", {"bpm": 60 + k}) for k in range(10)])
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        deadline = time.monotonic() + 30
        while agent.outbox.depth() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await task
        assert agent.outbox.depth() == 0 and agent.stats.acked == 20
        assert Ledger(locked.ledger.path).count_events() == 20
    finally:
        bridge.stop()
