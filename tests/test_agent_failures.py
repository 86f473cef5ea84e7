"""An agent never borrows another party's login, has client ids unique per instance, says loudly why it
cannot connect, and stops on SIGTERM with its counts and no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from carechain.config import AgentConfig, AgentDeviceConfig, Config, ConfigError, check_agent_logins
from carechain.credentials import MqttCredentials
from carechain.datadir import instance_id
from carechain.identity import Identity
from carechain.reencryption import PreKey
from edge_agent.agent import Agent, AgentDevice
from edge_agent.outbox import Outbox
from simulators.mosquitto import REPO
from simulators.ports import free_port

BRIDGE_KEY = Identity.generate().public_key.hex()
OWNER = Identity.generate()  # the patient the (protocol 2, default) agent seals its readings to


def _config(tmp_path: Path, broker: dict[str, object], devices: list[dict[str, object]]) -> Config:
    return Config.model_validate({"broker": broker, "agent": {"devices": devices, "bridge_public_key": BRIDGE_KEY,
                                                               "data_dir": str(tmp_path / "agent")}})


def test_a_device_without_its_own_login_beside_the_bridges_is_refused_naming_the_device(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"credentials_file": str(tmp_path / "bridge.json")},
                  [{"key_file": "keys/a.key", "profile": "heart_rate_band",
                    "mqtt_credentials_file": str(tmp_path / "a.json")},
                   {"key_file": "keys/b.key", "profile": "heart_rate_band"}])
    with pytest.raises(ConfigError) as err:
        check_agent_logins(cfg)
    assert "agent.devices[1] (key_file keys/b.key) has no mqtt_credentials_file" in str(err.value)
    assert "bridge.json" in str(err.value) and "carechain bridge acl" in str(err.value)
    # the same with a login written inline (after the CLI resolved the credentials file)
    inline = _config(tmp_path, {"username": "carechain-bridge", "password": "s3cret"},
                     [{"key_file": "keys/b.key", "profile": "heart_rate_band"}])
    with pytest.raises(ConfigError, match=r"agent.devices\[0\].*broker.username 'carechain-bridge'") as err:
        check_agent_logins(inline)
    assert "s3cret" not in str(err.value)


def test_the_bridges_own_file_or_one_file_for_two_devices_is_refused(tmp_path: Path) -> None:
    bridge = tmp_path / "bridge.json"
    with pytest.raises(ConfigError, match=r"agent.devices\[0\].*is broker.credentials_file, the bridge's login"):
        check_agent_logins(_config(tmp_path, {"credentials_file": str(bridge)},
                                   [{"key_file": "a.key", "profile": "p", "mqtt_credentials_file": str(bridge)}]))
    shared = str(tmp_path / "a.json")
    twice = [{"key_file": f"{n}.key", "profile": "p", "mqtt_credentials_file": shared} for n in "ab"]
    with pytest.raises(ConfigError, match=r"agent.devices\[1\].*also the login of agent.devices\[0\]"):
        check_agent_logins(_config(tmp_path, {}, twice))


def test_own_logins_or_an_open_broker_pass(tmp_path: Path) -> None:
    own = [{"key_file": "a.key", "profile": "p", "mqtt_credentials_file": str(tmp_path / "a.json")}]
    check_agent_logins(_config(tmp_path, {"credentials_file": str(tmp_path / "bridge.json")}, own))
    check_agent_logins(_config(tmp_path, {}, [{"key_file": "a.key", "profile": "p"}]))  # anonymous broker


def test_the_runtime_agent_never_falls_back_to_the_shared_login(tmp_path: Path) -> None:
    a, b = Identity.generate(), Identity.generate()
    shared = Config().broker.model_copy(update={"username": "carechain-bridge", "password": "s3cret"})
    outbox = Outbox(tmp_path / "agent" / "outbox.db")
    logins = {a.device_id: MqttCredentials(username=a.device_id, password="pa", device_id=a.device_id)}
    with pytest.raises(ValueError, match=b.device_id) as err:
        Agent([AgentDevice(a, None), AgentDevice(b, None)], outbox, shared, bytes(32), credentials=logins)
    assert a.device_id not in str(err.value) and "s3cret" not in str(err.value)
    agent = Agent([AgentDevice(a, None)], outbox, shared, bytes(32), credentials=logins)
    own = agent.device_broker(a.device_id)
    assert (own.username, own.password) == (a.device_id, "pa")
    anonymous = Agent([AgentDevice(b, None)], outbox, Config().broker, bytes(32))
    assert anonymous.device_broker(b.device_id).username is None


def test_a_missing_bridge_key_is_named_when_the_agent_starts_not_when_a_bridge_reads_the_file() -> None:
    cfg = AgentConfig(devices=[AgentDeviceConfig(key_file=Path("a.key"), profile="p")])  # a bridge may load it
    with pytest.raises(ConfigError, match="agent.bridge_public_key is required to run an agent"):
        cfg.bridge_key()
    assert AgentConfig(bridge_public_key=BRIDGE_KEY.upper()).bridge_key().hex() == BRIDGE_KEY
    with pytest.raises(ValueError, match="bridge_public_key"):
        Config.model_validate({"agent": {"bridge_public_key": "abc"}})


def test_record_signs_event_bodies_and_dicts_and_refuses_any_other_model(tmp_path: Path) -> None:
    from pydantic import BaseModel

    from carechain.events import HeartRate

    class NotABody(BaseModel):
        bpm: int

    dev = Identity.generate()
    outbox = Outbox(tmp_path / "agent" / "outbox.db")
    agent = Agent([AgentDevice(dev, None)], outbox, Config().broker, bytes(32))
    assert agent.record(dev.device_id, [("heart_rate", HeartRate(bpm=70)), ("heart_rate", {"bpm": 71})]) == [0, 1]
    with pytest.raises((TypeError, ValueError)):  # not signed, whoever catches it: record or make_payload
        agent.record(dev.device_id, [("heart_rate", NotABody(bpm=72))])
    assert outbox.depth() == 2 and agent.stats.signed == 2
    outbox.close()


def test_client_ids_are_unique_per_data_dir_and_stable_across_restarts(tmp_path: Path) -> None:
    dev = Identity.generate()
    ids = []
    for run in ("one", "two", "one"):
        outbox = Outbox(tmp_path / run / "outbox.db")
        ids.append(Agent([AgentDevice(dev, None)], outbox, Config().broker, bytes(32)).device_client_id(dev.device_id))
        outbox.close()
    assert ids[0] == ids[2] != ids[1]
    assert ids[0] == f"cc-agent-{instance_id(tmp_path / 'one')}-{dev.device_id}"
    assert (tmp_path / "one" / "instance-id").read_text().strip() == instance_id(tmp_path / "one")


def _read_lines(stream: object, into: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)


def test_an_agent_process_says_why_it_cannot_connect_and_stops_on_sigterm_with_its_counts(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "hr.key"
    Identity.generate().save(key)
    cfg = tmp_path / "agent.yaml"
    port = free_port()  # nothing listens here
    cfg.write_text(yaml.safe_dump({
        "broker": {"host": "127.0.0.1", "port": port},
        "agent": {"data_dir": str(tmp_path / "agent"), "bridge_public_key": BRIDGE_KEY, "speedup": 60.0,
                  "devices": [{"key_file": str(key), "profile": "heart_rate_band", "owner": OWNER.device_id,
                               "owner_pre_key": PreKey.generate().public_key.hex()}]}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CARECHAIN_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "carechain.cli", "agent", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, err), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(f"connection refused by 127.0.0.1:{port}" in e for e in err):
            time.sleep(0.1)
        assert any(f"connection refused by 127.0.0.1:{port}" in e and "WARNING" in e for e in err), "".join(err)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert proc.returncode == 0, "".join(err)
    assert "Traceback" not in "".join(err) and "leaked" not in "".join(err)
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["sent"] == 0 and counts["acked"] == 0 and counts["outbox_left"] == counts["signed"]
