"""`carechain bridge acl` and `carechain keys ca`, driven through the CLI on real files (no broker).

That mosquitto accepts what these commands write is shown in test_broker_acl.py and test_tls.py.
"""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from carechain.cli import app
from carechain.credentials import load_mqtt_credentials
from carechain.entries import Revocation, revocation_entry
from chain_bridge.broker.acl import verify_password
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path, operator_key


def run(*args: str | Path):  # noqa: ANN201 - click Result
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args], catch_exceptions=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_device(tmp_path: Path, name: str) -> str:
    result = run("keys", "new", tmp_path / "keys" / f"{name}.key")
    assert result.exit_code == 0, result.output
    return re.search(r"device_id\s+([a-z2-7]{16})", result.output).group(1)


@pytest.fixture
def registry(tmp_path: Path) -> tuple[Path, list[str]]:
    """A bridge data dir with two devices registered through `carechain register`."""
    ids = [new_device(tmp_path, n) for n in ("hr-1", "scale-1")]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("site: ward-3\ndevices:\n"
                         "  - {name: hr-1, profile: heart_rate_band, owner: 'patient:a', key_file: keys/hr-1.key}\n"
                         "  - {name: scale-1, profile: scale, owner: 'patient:b', key_file: keys/scale-1.key}\n")
    data = tmp_path / "bridge"
    result = run("register", inventory, "--data-dir", data)
    assert result.exit_code == 0, result.output
    return data, ids


def passwords(out: Path) -> dict[str, str]:
    found = {"bridge": load_mqtt_credentials(out / "bridge.json").password}
    for f in (out / "devices").glob("*.json"):
        found[f.stem] = load_mqtt_credentials(f).password
    return found


# -- bridge acl ---------------------------------------------------------------------------------------

def test_bridge_acl_without_a_ledger_says_where_it_looked(tmp_path: Path) -> None:
    result = run("bridge", "acl", "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "no ledger at" in result.output and "--data-dir" in result.output
    assert not (tmp_path / "nowhere").exists()  # looking did not create an empty ledger


def test_bridge_acl_writes_a_private_login_for_each_device_and_never_prints_one(registry, tmp_path: Path) -> None:
    data, ids = registry
    out = tmp_path / "broker"
    result = run("bridge", "acl", "--data-dir", data, "--out", out)
    assert result.exit_code == 0, result.output
    files = [out / "passwd", out / "acl", out / "bridge.json", data / "broker" / "credentials.json",
             *(out / "devices" / f"{d}.json" for d in ids)]
    assert {f: mode(f) for f in files} == {f: 0o600 for f in files}
    assert sorted(p.stem for p in (out / "devices").iterdir()) == sorted(ids)
    secrets = passwords(out)
    assert all(pw not in result.output for pw in secrets.values())
    assert "2 device(s) and bridge user carechain-bridge" in result.output
    lines = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert sorted(lines) == sorted(["carechain-bridge", "carechain-bridge-archive", *ids])
    assert verify_password(lines["carechain-bridge"], secrets["bridge"])
    for d in ids:
        creds = load_mqtt_credentials(out / "devices" / f"{d}.json")
        assert creds.username == creds.device_id == d and verify_password(lines[d], creds.password)
        assert creds.password not in repr(creds)
        assert (f"user {d}\ntopic write cc/v1/dev/{d}/ev\ntopic write cc/v1/dev/{d}/status\n"
                f"topic read cc/v1/dev/{d}/rcpt\n") in (out / "acl").read_text()


def test_bridge_acl_rerun_keeps_every_password_and_rotate_replaces_one(registry, tmp_path: Path) -> None:
    data, ids = registry
    out = tmp_path / "broker"
    made = run("bridge", "acl", "--data-dir", data, "--out", out, "--json")
    assert made.exit_code == 0, made.output
    assert set(ids) <= set(json.loads(made.output)["added"])  # the devices (and the bridge user) get logins
    first, passwd = passwords(out), (out / "passwd").read_bytes()
    again = run("bridge", "acl", "--data-dir", data, "--out", out, "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert (summary["added"], summary["rotated"], summary["removed"]) == ([], [], [])  # no login made or changed
    text = run("bridge", "acl", "--data-dir", data, "--out", out)  # the text form lists no change either
    assert text.exit_code == 0 and not re.search(r"^(new|rotated|removed) ", text.output, re.MULTILINE)
    assert passwords(out) == first and (out / "passwd").read_bytes() == passwd  # byte for byte: nothing to reload
    rotated = run("bridge", "acl", "--data-dir", data, "--out", out, "--rotate", ids[0])
    assert rotated.exit_code == 0 and f"rotated     {ids[0]}" in rotated.output
    now = passwords(out)
    assert now[ids[0]] != first[ids[0]] and now[ids[1]] == first[ids[1]] and now["bridge"] == first["bridge"]


def test_bridge_acl_leaves_out_revoked_devices_and_their_files(registry, tmp_path: Path) -> None:
    data, ids = registry
    out = tmp_path / "broker"
    assert run("bridge", "acl", "--data-dir", data, "--out", out).exit_code == 0
    ledger = Ledger(ledger_path(data))
    rev = Revocation(dev=ids[1], reason="stolen", ts=int(time.time() * 1000))
    ledger.append_revocation(revocation_entry(operator_key(data), rev), rev)
    ledger.close()
    result = run("bridge", "acl", "--data-dir", data, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 revoked device(s) left out" in result.output and f"removed     {ids[1]}" in result.output
    assert ids[1] not in (out / "acl").read_text() and ids[1] not in (out / "passwd").read_text()
    assert not (out / "devices" / f"{ids[1]}.json").exists()
    assert ids[1] not in json.loads((data / "broker" / "credentials.json").read_text())["users"]


def test_bridge_acl_writes_next_to_the_data_dir_by_default(registry) -> None:
    data, ids = registry
    result = run("bridge", "acl", "--data-dir", data, "--bridge-user", "bridge-east")
    assert result.exit_code == 0, result.output
    assert (data / "broker" / "acl").read_text().count("user bridge-east\n") == 1
    assert load_mqtt_credentials(data / "broker" / "bridge.json").username == "bridge-east"


def test_bridge_acl_gives_each_worker_and_miner_its_own_login(registry, tmp_path: Path) -> None:
    """The broker ties client ids to logins, so every client of the bridge and every miner needs one."""
    data, ids = registry
    miner = new_device(tmp_path, "miner-1")  # a miner id has a device id's shape
    out = tmp_path / "out"
    result = run("bridge", "acl", "--data-dir", data, "--out", out, "--workers", "2", "--miner", miner, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["workers"] == 2 and summary["miners"] == [miner]
    users = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert set(users) == {"carechain-bridge", "carechain-bridge-w0", "carechain-bridge-w1",
                          "carechain-bridge-archive", f"carechain-miner-{miner}", f"carechain-store-{miner}",
                          f"carechain-aggregator-{miner}", *ids}
    bridge_pw = load_mqtt_credentials(out / "bridge.json").password
    assert verify_password(users["carechain-bridge-w1"], bridge_pw)  # workers run from bridge.json
    login = load_mqtt_credentials(out / "miners" / f"{miner}.json")
    assert login.username == f"carechain-miner-{miner}" and mode(out / "miners" / f"{miner}.json") == 0o600
    assert verify_password(users[login.username], login.password) and login.password != bridge_pw
    aggregator = load_mqtt_credentials(out / "aggregators" / f"{miner}.json")  # its own password, its own file
    assert aggregator.username == f"carechain-aggregator-{miner}"
    assert mode(out / "aggregators" / f"{miner}.json") == 0o600
    assert verify_password(users[aggregator.username], aggregator.password)
    assert aggregator.password not in (login.password, bridge_pw)
    assert summary["aggregators_dir"] == str(out / "aggregators")
    acl = (out / "acl").read_text()
    assert "user carechain-bridge-w0\ntopic read cc/v1/dev/+/ev\n" in acl
    assert f"topic write cc/v1/miner/{miner}/cosig" in acl and f"topic read cc/v1/miner/{miner}/resp" in acl
    again = run("bridge", "acl", "--data-dir", data, "--out", out)  # no --miner: the miner's login stays
    assert again.exit_code == 0, again.output
    assert load_mqtt_credentials(out / "miners" / f"{miner}.json").password == login.password
    assert "carechain-bridge-w0" not in (out / "passwd").read_text()  # config: 0 workers
    assert load_mqtt_credentials(out / "aggregators" / f"{miner}.json").password == aggregator.password
    assert f"aggregators {out / 'aggregators'}/<miner_id>.json" in again.output
    gone = run("bridge", "acl", "--data-dir", data, "--out", out, "--remove-miner", miner)
    assert gone.exit_code == 0, gone.output
    assert miner not in (out / "passwd").read_text() and not (out / "miners" / f"{miner}.json").exists()
    assert not (out / "aggregators" / f"{miner}.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--bridge-user", "aaaaaaaaaaaaaaaa"], "looks like a device id"),
    (["--bridge-user", "carechain-miner-x"], "must not start with"),
    (["--miner", "not-a-miner"], "is not a miner id"),
    (["--bridge-user", "two words"], "use 1-64 letters"),
    (["--rotate", "nobody"], "cannot rotate nobody"),
])
def test_bridge_acl_refuses_what_it_cannot_do_safely(registry, args: list[str], message: str) -> None:
    data, _ = registry
    result = run("bridge", "acl", "--data-dir", data, *args)
    assert result.exit_code == 2 and message in result.output
    assert not (data / "broker" / "acl").exists()


def test_a_credential_store_others_can_read_is_refused(registry) -> None:
    data, _ = registry
    assert run("bridge", "acl", "--data-dir", data).exit_code == 0
    (data / "broker" / "credentials.json").chmod(0o644)
    result = run("bridge", "acl", "--data-dir", data)
    assert result.exit_code == 2 and "too open" in result.output and "chmod 600" in result.output


# -- the agent and the bridge pick their logins up -----------------------------------------------------

def _agent_config(tmp_path: Path, key: str, creds: Path) -> Path:
    cfg = tmp_path / "agent.yaml"
    device = {"key_file": str(tmp_path / "keys" / key), "profile": "heart_rate_band",
              "mqtt_credentials_file": str(creds)}
    cfg.write_text(json.dumps({"broker": {"port": 1}, "agent": {  # JSON is YAML
        "data_dir": str(tmp_path / "agent"), "bridge_public_key": "00" * 32, "devices": [device]}}))
    return cfg


def test_the_agent_refuses_a_login_provisioned_for_another_device(registry, tmp_path: Path) -> None:
    data, ids = registry
    assert run("bridge", "acl", "--data-dir", data, "--out", tmp_path / "broker").exit_code == 0
    wrong = tmp_path / "broker" / "devices" / f"{ids[1]}.json"
    result = run("agent", "--config", _agent_config(tmp_path, "hr-1.key", wrong))
    assert result.exit_code == 2
    assert f"MQTT login of device {ids[1]}" in result.output and f"is device {ids[0]}" in result.output
    right = tmp_path / "broker" / "devices" / f"{ids[0]}.json"
    right.chmod(0o640)
    result = run("agent", "--config", _agent_config(tmp_path, "hr-1.key", right))
    assert result.exit_code == 2 and "too open" in result.output


def test_the_bridge_explains_a_missing_credentials_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(f"broker: {{credentials_file: {tmp_path / 'missing.json'}}}\n")
    result = run("bridge", "--config", cfg, "--data-dir", tmp_path / "data")
    assert result.exit_code == 2
    assert "no such MQTT credentials file" in result.output and "carechain bridge acl" in result.output


def test_the_bridge_refuses_a_client_key_others_can_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert run("keys", "ca", "init", "--dir", ca).exit_code == 0
    assert run("keys", "ca", "client", "carechain-bridge", "--dir", ca).exit_code == 0
    (ca / "carechain-bridge.key").chmod(0o644)
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(json.dumps({"broker": {"tls_ca": str(ca / "ca.crt"), "tls_cert": str(ca / "carechain-bridge.crt"),
                                          "tls_key": str(ca / "carechain-bridge.key")}}))
    result = run("bridge", "--config", cfg, "--data-dir", tmp_path / "data")
    assert result.exit_code == 2 and "too open" in result.output and "broker TLS settings" in result.output


# -- keys ca ------------------------------------------------------------------------------------------

def test_keys_ca_makes_a_ca_a_server_and_a_client_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert run("keys", "ca", "init", "--dir", ca).exit_code == 0
    server = run("keys", "ca", "server", "--dir", ca, "--host", "broker.example", "--host", "mqtt.example",
                 "--ip", "127.0.0.1", "--ip", "::1", "--out", tmp_path / "srv")
    assert server.exit_code == 0, server.output
    client = run("keys", "ca", "client", "3ciobwryovxgaa7l", "--dir", ca)
    assert client.exit_code == 0, client.output
    keys = [ca / "ca.key", tmp_path / "srv" / "server.key", ca / "3ciobwryovxgaa7l.key"]
    assert [mode(k) for k in keys] == [0o600] * 3
    assert all(k.read_text().startswith("-----BEGIN PRIVATE KEY-----") for k in keys)
    assert all(k.read_text() not in server.output + client.output for k in keys)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((tmp_path / "srv" / "server.crt").read_bytes())
    cli = x509.load_pem_x509_certificate((ca / "3ciobwryovxgaa7l.crt").read_bytes())
    assert mode(ca / "ca.crt") == 0o644
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (srv, cli):
        leaf.verify_directly_issued_by(ca_cert)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example", "mqtt.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert cli.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "3ciobwryovxgaa7l"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert f"sha256      {srv.fingerprint(hashes.SHA256()).hex()}" in server.output


def test_keys_ca_refuses_overwrites_missing_cas_and_nameless_servers(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert run("keys", "ca", "init", "--dir", ca).exit_code == 0
    key = (ca / "ca.key").read_bytes()
    again = run("keys", "ca", "init", "--dir", ca)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output and (ca / "ca.key").read_bytes() == key
    nameless = run("keys", "ca", "server", "--dir", ca)
    assert nameless.exit_code == 2 and "--host" in nameless.output
    bad = run("keys", "ca", "server", "--dir", ca, "--ip", "999.1.1.1")
    assert bad.exit_code == 2 and "not an IPv4 or IPv6 address" in bad.output
    no_ca = run("keys", "ca", "client", "dev", "--dir", tmp_path / "none")
    assert no_ca.exit_code == 2 and "carechain keys ca init --dir" in no_ca.output
    (ca / "ca.key").chmod(0o644)
    loose = run("keys", "ca", "client", "dev", "--dir", ca)
    assert loose.exit_code == 2 and "too open" in loose.output


@pytest.mark.parametrize("command", [["bridge", "acl"], ["keys", "ca"], ["keys", "ca", "init"],
                                     ["keys", "ca", "server"], ["keys", "ca", "client"]])
def test_the_new_commands_have_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and len(result.output) > 300
