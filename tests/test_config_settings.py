"""Every setting from the file, the environment or a flag (pydantic-settings), and secrets from files.

Precedence is flags > environment > file > defaults, key by key; an error names the key and the file,
variable or flag that set it; relative secret files are found in systemd's $CREDENTIALS_DIRECTORY.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carechain.config import Config, ConfigError, Override, load_config
from carechain.credentials import CredentialsError, resolve_broker_login

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, data: object, mode: int = 0o600) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    path.chmod(mode)
    return path


def flags(*texts: str) -> list[Override]:
    return [Override.parse(t) for t in texts]


# -- every key from the environment -----------------------------------------------------------------------

def test_every_key_can_come_from_a_nested_environment_variable() -> None:
    cfg = load_config(None, env={
        "CARECHAIN_BRIDGE__BATCH_MAX": "500",
        "CARECHAIN_BRIDGE__LIMITS__MAX_EVENT_BYTES": "8192",
        "CARECHAIN_BRIDGE__CONSOLE__LISTEN": "127.0.0.1:8080",
        "CARECHAIN_BROKER__FAILOVER": '["10.0.0.2:1883", "10.0.0.3:1883"]',  # lists as JSON
        "CARECHAIN_BRIDGE__GENESIS_ALLOCATIONS": '{"insurer:abc": 1000}',  # maps as JSON
        "CARECHAIN_AGENT__PROTOCOL": "1",
        "CARECHAIN_AGENT__BLE_ADAPTER": "hci1",
        "carechain_miner__request_timeout_s": "2.5",  # names are not case-sensitive
    })
    assert cfg.bridge.batch_max == 500 and cfg.bridge.limits.max_event_bytes == 8192
    assert cfg.bridge.console.listen == "127.0.0.1:8080"
    assert cfg.broker.failover == ["10.0.0.2:1883", "10.0.0.3:1883"]
    assert cfg.bridge.genesis_allocations == {"insurer:abc": 1000}
    assert cfg.agent.protocol == 1 and cfg.agent.ble_adapter == "hci1" and cfg.miner.request_timeout_s == 2.5


def test_null_unsets_a_key_the_file_set(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"bridge": {"console": {"listen": "127.0.0.1:8080"}}})
    assert load_config(path, env={}).bridge.console.listen == "127.0.0.1:8080"
    assert load_config(path, env={"CARECHAIN_BRIDGE__CONSOLE__LISTEN": "null"}).bridge.console.listen is None


def test_the_earlier_single_variables_still_work() -> None:
    cfg = load_config(None, env={"CARECHAIN_BROKER": "broker.example:8883", "CARECHAIN_BROKER_USERNAME": "bridge",
                                 "CARECHAIN_BROKER_PASSWORD": "pw-1", "CARECHAIN_BRIDGE_DATA_DIR": "/srv/b",
                                 "CARECHAIN_AGENT_DATA_DIR": "/srv/a", "CARECHAIN_MINER_DATA_DIR": "/srv/m"})
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.username, cfg.broker.password) == \
        ("broker.example", 8883, "bridge", "pw-1")
    assert (cfg.bridge.data_dir, cfg.agent.data_dir, cfg.miner.data_dir) == (Path("/srv/b"), Path("/srv/a"),
                                                                             Path("/srv/m"))
    # both forms name broker.port: the nested one wins
    both = load_config(None, env={"CARECHAIN_BROKER": "h:1", "CARECHAIN_BROKER__PORT": "2"})
    assert (both.broker.host, both.broker.port) == ("h", 2)


def test_variables_that_are_not_settings_are_left_alone() -> None:
    cfg = load_config(None, env={"CARECHAIN_CONFIG": "x.yaml", "CARECHAIN_LOG_FORMAT": "json",
                                 "CARECHAIN_PROFILES_DIR": "/p", "CARECHAIN_BRIDGE": "not json"})
    assert cfg == Config()


def test_env_none_reads_the_process_environment_and_config_alone_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARECHAIN_BRIDGE__BATCH_MAX", "77")
    assert load_config(None).bridge.batch_max == 77
    assert load_config(None, env={}).bridge.batch_max == Config().bridge.batch_max == 2000


# -- precedence -----------------------------------------------------------------------------------------------

def test_flags_win_over_the_environment_which_wins_over_the_file_which_wins_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"bridge": {"batch_max": 100, "batch_wait_ms": 5,
                                                  "limits": {"max_event_bytes": 1024, "max_seq_gap": 7}}})
    env = {"CARECHAIN_BRIDGE__BATCH_MAX": "200", "CARECHAIN_BRIDGE__LIMITS__MAX_EVENT_BYTES": "2048"}
    top = load_config(path, env=env, overrides=flags("bridge.batch_max=300"))
    assert top.bridge.batch_max == 300  # flag
    assert top.bridge.limits.max_event_bytes == 2048  # environment over file
    assert top.bridge.batch_wait_ms == 5 and top.bridge.limits.max_seq_gap == 7  # file, untouched by the others
    assert top.bridge.limits.max_cbor_depth == 16  # default
    assert load_config(path, env=env).bridge.batch_max == 200
    assert load_config(path, env={}).bridge.batch_max == 100
    assert load_config(None, env={}).bridge.batch_max == 2000
    # the later of two flags for one key wins
    assert load_config(None, env={}, overrides=flags("bridge.batch_max=1", "bridge.batch_max=2")).bridge.batch_max == 2


def test_a_flag_value_is_read_as_its_environment_variable_would_be() -> None:
    cfg = load_config(None, env={}, overrides=flags('broker.failover=["h2:1883"]', "agent.protocol=1",
                                                    "bridge.contracts=false", "bridge.origin=yes"))
    assert cfg.broker.failover == ["h2:1883"] and cfg.agent.protocol == 1 and cfg.bridge.contracts is False
    assert cfg.bridge.origin == "yes"  # text stays text (no YAML 1.1 booleans)


# -- errors name the key and where it came from ------------------------------------------------------------

@pytest.mark.parametrize(("env", "overrides", "message"), [
    ({"CARECHAIN_BRIDGE__BATCH_MAX": "many"}, [],
     "environment variable CARECHAIN_BRIDGE__BATCH_MAX: bridge.batch_max: Input should be a valid integer"),
    ({"CARECHAIN_BRIDGE__BATCHMAX": "5"}, [],
     "environment variable CARECHAIN_BRIDGE__BATCHMAX: bridge has no key 'batchmax' (did you mean 'batch_max'?)"),
    ({"CARECHAIN_BRIDG__BATCH_MAX": "5"}, [],
     "environment variable CARECHAIN_BRIDG__BATCH_MAX: the top level has no key 'bridg' (did you mean 'bridge'?)"),
    ({"CARECHAIN_BROKER__FAILOVER": "h2:1883"}, [],
     "environment variable CARECHAIN_BROKER__FAILOVER: not a valid value (a list or a map is written as JSON)"),
    ({}, ["bridge.batch_max=0"],
     "--set bridge.batch_max: bridge.batch_max: Input should be greater than or equal to 1"),
    ({}, ["bridge.limits.max_event=1"], "--set bridge.limits.max_event: bridge.limits has no key 'max_event' "
                                        "(did you mean 'max_event_bytes'?)"),
    ({}, ["bridge.batch_max.x=1"], "--set bridge.batch_max.x: bridge.batch_max is a value, not a table"),
    ({}, ["agent.ble_adapter=bluetooth0"], "--set agent.ble_adapter: agent.ble_adapter: String should match"),
])
def test_an_error_names_the_key_and_the_variable_or_flag(env: dict[str, str], overrides: list[str],
                                                        message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env=env, overrides=flags(*overrides))
    assert str(err.value).startswith(message), str(err.value)


def test_an_error_in_the_file_names_the_file_and_one_across_layers_names_each(tmp_path: Path) -> None:
    path = write(tmp_path / "bridge.yaml", {"bridge": {"batch_max": -1}})
    with pytest.raises(ConfigError, match=rf"^{path}: bridge.batch_max: Input should be greater"):
        load_config(path, env={})
    path = write(tmp_path / "archive.yaml", {"bridge": {"archive": {"k": 9}}})
    with pytest.raises(ConfigError, match=rf"^{path}, environment variable CARECHAIN_BRIDGE__ARCHIVE__N: "
                                          r"bridge.archive: .*k \(9\) must be less than n \(8\)"):
        load_config(path, env={"CARECHAIN_BRIDGE__ARCHIVE__N": "8"})


def test_set_takes_key_equals_value_and_never_a_password() -> None:
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        Override.parse("bridge.batch_max")
    for text in ("broker.password=hunter2", "Broker.Password=hunter2", 'broker={"password": "hunter2"}'):
        with pytest.raises(ConfigError, match=r"--set broker(.password)?: a secret is never given on the command "
                                              r"line .*use broker.password_file"):
            load_config(None, env={}, overrides=flags(text))


# A command declared with the shared options, as `carechain bridge` / `agent` / `miner` declare them.
COMMAND = """
import typer
from carechain.cli._options import BrokerOpt, ConfigOpt, SetOpt, load

def main(config: ConfigOpt = None, broker: BrokerOpt = None, set_: SetOpt = None) -> None:
    cfg = load(config, broker, set_)
    print(cfg.broker.address, cfg.bridge.batch_max, cfg.bridge.limits.max_event_bytes)

typer.run(main)
"""


def test_a_command_applies_repeated_set_flags_and_broker_and_exits_2_on_a_bad_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARECHAIN_")}
    env |= {"PYTHONPATH": str(REPO), "COLUMNS": "200", "CARECHAIN_BRIDGE__BATCH_MAX": "9"}
    config = write(tmp_path / "c.yaml", {"bridge": {"batch_max": 8, "limits": {"max_event_bytes": 1024}}})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", COMMAND, "--config", str(config), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=env)

    done = run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["127.0.0.1:1883", "9", "1024"]  # the variable over the file
    done = run("--broker", "10.1.2.3:1884", "--set", "bridge.limits.max_event_bytes=8192",
               "--set", "bridge.batch_max=10")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10.1.2.3:1884", "10", "8192"]
    done = run("--set", "bridge.batch_max=nine")
    assert done.returncode == 2
    assert "error: --set bridge.batch_max: bridge.batch_max: Input should be a valid integer" in done.stderr
    done = run("--set", "broker.password=hunter2")
    assert done.returncode == 2 and "never given on the command line" in done.stderr


# -- secrets --------------------------------------------------------------------------------------------------

def test_a_password_is_never_in_repr_and_one_source_of_it_is_allowed(tmp_path: Path) -> None:
    cfg = load_config(None, env={"CARECHAIN_BROKER_PASSWORD": "hunter2-secret"})
    assert "hunter2-secret" not in repr(cfg) and "hunter2-secret" not in str(cfg.broker)
    with pytest.raises(ConfigError, match=r"broker: Value error, password_file and password both give"):
        load_config(None, env={"CARECHAIN_BROKER_PASSWORD": "x", "CARECHAIN_BROKER__PASSWORD_FILE": "/run/pw"})
    assert load_config(None, env={"CARECHAIN_BROKER__PASSWORD_FILE": "/run/pw"}).broker.has_login


def test_relative_secret_files_are_found_in_the_systemd_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    path = write(tmp_path / "c.yaml", {
        "broker": {"credentials_file": "broker.json", "tls_ca": "ca.pem", "tls_key": "/etc/carechain/client.key"},
        "bridge": {"store": {"password_file": "pg.pw"}, "anchor": {"key_file": "anchor.key"}},
        "agent": {"devices": [{"key_file": "band.key", "profile": "heart_rate_band",
                               "mqtt_credentials_file": "band.json"}]},
        "miner": {"aggregator_credentials_file": "agg.json"}})
    cfg = load_config(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.broker.credentials_file == creds / "broker.json"
    assert cfg.broker.tls_key == Path("/etc/carechain/client.key")  # absolute: as given
    assert cfg.broker.tls_ca == Path("ca.pem")  # a CA certificate is no secret: relative to the working directory
    assert cfg.bridge.store.password_file == creds / "pg.pw" and cfg.bridge.anchor.key_file == creds / "anchor.key"
    assert cfg.agent.devices[0].key_file == creds / "band.key"
    assert cfg.agent.devices[0].mqtt_credentials_file == creds / "band.json"
    assert cfg.miner.aggregator_credentials_file == creds / "agg.json"
    # without systemd's variable a relative path stays relative to the working directory
    assert load_config(path, env={}).broker.credentials_file == Path("broker.json")


def test_the_broker_password_file_gives_the_password(tmp_path: Path) -> None:
    pw = write(tmp_path / "broker.pw", "s3cret-pw\n")
    broker = resolve_broker_login(load_config(None, env={"CARECHAIN_BROKER__USERNAME": "bridge",
                                                         "CARECHAIN_BROKER__PASSWORD_FILE": str(pw)}).broker)
    assert (broker.username, broker.password, broker.password_file) == ("bridge", "s3cret-pw", None)
    assert "s3cret-pw" not in repr(broker)


def test_a_secret_file_others_can_read_is_refused_unless_systemd_manages_it(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    lax = write(tmp_path / "broker.pw", "s3cret-pw\n", mode=0o640)
    broker = load_config(None, env={"CARECHAIN_BROKER__PASSWORD_FILE": str(lax)}).broker
    with pytest.raises(CredentialsError, match=rf"{lax}: permissions 0640 are too open .*chmod 600 {lax}"):
        resolve_broker_login(broker)
    # systemd's credentials directory: it is the service's alone, and systemd may grant it through an ACL,
    # which shows as group bits
    creds = tmp_path / "credentials"
    creds.mkdir()
    write(creds / "broker.pw", "s3cret-pw\n", mode=0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    broker = load_config(None, env={"CREDENTIALS_DIRECTORY": str(creds),
                                    "CARECHAIN_BROKER__PASSWORD_FILE": "broker.pw"}).broker
    assert resolve_broker_login(broker).password == "s3cret-pw"
    with pytest.raises(CredentialsError, match="too open"):  # outside the directory the rule still holds
        resolve_broker_login(broker.model_copy(update={"password_file": lax}))
