"""MQTT login credentials handed to one party: a device's agent, or the bridge.

`carechain bridge acl` writes one such provisioning file (JSON, mode 0600) per device and one for the
bridge; an agent names a device's file in `agent.devices[].mqtt_credentials_file`, the bridge in
`broker.credentials_file`, which every party's assembly resolves with `resolve_broker_login`. The password
is never printed or logged (`repr` hides it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from carechain.config import BrokerConfig
from carechain.files import FilePermissionError, read_private

CREDENTIALS_FORMAT: Final = "carechain-mqtt-credentials-v1"


class CredentialsError(ValueError):
    """A provisioning file that is missing, unreadable, too open or malformed."""


class MqttCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["carechain-mqtt-credentials-v1"] = CREDENTIALS_FORMAT
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, repr=False)
    device_id: str | None = None  # the device this login is for; None for the bridge

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(), indent=2) + "\n").encode()


def load_mqtt_credentials(path: Path) -> MqttCredentials:
    """Read a provisioning file written by `carechain bridge acl`; refuses one others can read."""
    path = Path(path)
    try:
        raw = read_private(path)
    except FileNotFoundError:
        raise CredentialsError(f"{path}: no such MQTT credentials file (written by `carechain bridge acl` "
                               "into its --out folder)") from None
    except FilePermissionError as exc:
        raise CredentialsError(str(exc)) from None
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read MQTT credentials: {exc.strerror}") from None
    try:
        return MqttCredentials.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "file"
        raise CredentialsError(f"{path}: not a carechain MQTT credentials file ({where}: {err['msg']})") from None


def read_password_file(path: Path, key: str) -> str:
    """The password held in `path` (its text, without the final line break), for setting `key`; a
    `CredentialsError` naming both when the file is missing, readable by others, not text or empty."""
    path = Path(path)
    try:
        text = read_private(path).decode()
    except FileNotFoundError:
        raise CredentialsError(f"{key} {path}: no such file") from None
    except FilePermissionError as exc:
        raise CredentialsError(f"{key}: {exc}") from None
    except OSError as exc:
        raise CredentialsError(f"{key} {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"{key} {path}: not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password:
        raise CredentialsError(f"{key} {path}: the file is empty; write the password into it")
    return password


def resolve_broker_login(broker: BrokerConfig) -> BrokerConfig:
    """`broker` with the password of its `password_file`, or the login of its `credentials_file`, as username
    and password, and no file left to read; `broker` itself when it names no file. A `CredentialsError`
    (naming the file) when it is missing, readable by others or malformed. The one place a party's broker
    login is read (bridge, agent and miner assemblies).
    """
    if broker.password_file is not None:
        password = read_password_file(broker.password_file, "broker.password_file")
        return broker.model_copy(update={"password": password, "password_file": None})
    if broker.credentials_file is None:
        return broker
    login = load_mqtt_credentials(broker.credentials_file)
    return broker.model_copy(update={"username": login.username, "password": login.password,
                                     "credentials_file": None})
