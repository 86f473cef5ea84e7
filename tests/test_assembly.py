"""Each party's assembly from config: what it refuses before touching anything, the broker login it reads,
and the MQTT client id it picks. Nothing connects: no broker is needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from carechain.config import Config, ConfigError
from carechain.credentials import CredentialsError, MqttCredentials, resolve_broker_login
from carechain.datadir import INSTANCE_FILE
from carechain.files import write_atomic
from carechain.identity import Identity
from chain_bridge.assembly import assemble_bridge
from chain_miner.assembly import assemble_miner
from edge_agent.assembly import assemble_agent

BRIDGE_LOGIN = MqttCredentials(username="carechain-bridge", password="bridge-s3cret")


def _bridge_login(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.json"
    write_atomic(path, BRIDGE_LOGIN.to_json())
    return path


def test_resolving_the_broker_login_reads_the_file_and_leaves_none_to_read(tmp_path: Path) -> None:
    broker = Config.model_validate({"broker": {"credentials_file": str(_bridge_login(tmp_path))}}).broker
    resolved = resolve_broker_login(broker)
    assert (resolved.username, resolved.password, resolved.credentials_file) == ("carechain-bridge",
                                                                                 "bridge-s3cret", None)
    assert broker.credentials_file is not None and broker.username is None  # the caller's settings unchanged
    anonymous = Config().broker
    assert resolve_broker_login(anonymous) is anonymous
    with pytest.raises(CredentialsError, match="missing.json: no such MQTT credentials file"):
        resolve_broker_login(broker.model_copy(update={"credentials_file": tmp_path / "missing.json"}))


def test_bridge_client_ids_are_unique_per_data_dir_and_stable_across_restarts(tmp_path: Path) -> None:
    ids = {}
    for name in ("east", "west", "east"):
        assembled = assemble_bridge(Config(), data_dir=tmp_path / name)
        try:
            instance = (tmp_path / name / INSTANCE_FILE).read_text().strip()
            assert assembled.bridge.client_id == f"carechain-bridge-{instance}"
            assert ids.setdefault(name, assembled.bridge.client_id) == assembled.bridge.client_id
        finally:
            assembled.close()
    assert ids["east"] != ids["west"]
    given = assemble_bridge(Config(), data_dir=tmp_path / "east", client_id="bridge-under-test")
    try:
        assert given.bridge.client_id == "bridge-under-test"
    finally:
        given.close()


def test_the_bridge_assembly_logs_in_with_its_credentials_file(tmp_path: Path) -> None:
    cfg = Config.model_validate({"broker": {"credentials_file": str(_bridge_login(tmp_path))}})
    assembled = assemble_bridge(cfg, data_dir=tmp_path / "bridge")
    try:
        broker = assembled.bridge.broker
        assert (broker.username, broker.password, broker.credentials_file) == ("carechain-bridge",
                                                                               "bridge-s3cret", None)
    finally:
        assembled.close()
    missing = cfg.model_copy(update={"broker": cfg.broker.model_copy(
        update={"credentials_file": tmp_path / "missing.json"})})
    with pytest.raises(ConfigError, match="missing.json: no such MQTT credentials file"):
        assemble_bridge(missing, data_dir=tmp_path / "bridge")
    assemble_bridge(cfg, data_dir=tmp_path / "bridge").close()  # the refusal left the data dir free


def test_an_agent_config_sharing_the_bridges_login_is_refused_before_any_key_is_read(tmp_path: Path) -> None:
    bridge_login = _bridge_login(tmp_path)
    cfg = Config.model_validate({
        "broker": {"credentials_file": str(bridge_login)},
        "agent": {"data_dir": str(tmp_path / "agent"), "bridge_public_key": Identity.generate().public_key.hex(),
                  "devices": [{"key_file": str(tmp_path / "no-such.key"), "profile": "heart_rate_band",
                               "mqtt_credentials_file": str(bridge_login)}]}})
    with pytest.raises(ConfigError, match=r"agent.devices\[0\] .*no-such.key.*is broker.credentials_file"):
        assemble_agent(cfg)
    assert not (tmp_path / "agent").exists()  # refused before the data dir was made or locked


def test_an_agent_without_the_bridge_key_is_refused_saying_where_to_find_it(tmp_path: Path) -> None:
    cfg = Config.model_validate({"agent": {"data_dir": str(tmp_path / "agent"), "devices": [
        {"key_file": str(tmp_path / "a.key"), "profile": "heart_rate_band"}]}})
    with pytest.raises(ConfigError, match="agent.bridge_public_key is required.*`carechain bridge` prints"):
        assemble_agent(cfg)


def test_a_miner_log_key_that_is_not_a_public_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"log public key \(--log-public-key or miner.log_public_key\): .*got 31"):
        assemble_miner(Config(), data_dir=tmp_path / "miner", log_public_key="ab" * 31)
    with pytest.raises(ConfigError, match="is not hex"):
        assemble_miner(Config(), data_dir=tmp_path / "miner", log_public_key="z" * 64)
    assert not (tmp_path / "miner").exists()
