"""MQTT login credentials handed to one party: a device's agent, or the bridge.

`carechain bridge acl` writes one such provisioning file (JSON, mode 0600) per device and one for the
bridge; an agent names a device's file in `agent.devices[].mqtt_credentials_file`, the bridge in
`broker.credentials_file`. The password is never printed or logged (`repr` hides it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
