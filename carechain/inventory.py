"""Device inventories: the YAML file `carechain register` turns into registration transactions.

```yaml
site: ward-3                      # default for devices that do not name one
devices:
  - name: hr-band-1               # a label for people; the identity is the key
    profile: heart_rate_band      # a file stem in device_profiles/
    owner: 6ifx6nqmh3jwbbdz       # whose records the readings are: the owner's registered party id
    site: ward-3                  # optional
    public_key: <64 hex chars>    # or key_file: keys/hr-band-1.key (relative to this file)
```

Only public keys are registered: from `key_file` (a carechain key file, checked like ssh checks its keys)
just the public half is taken. Every problem is reported as `{file}:{line}: {what}`, all at once.

The owner binds a device to a key, not a label: given the ledger's registered parties, the owner of a
device that records health readings must be a registered patient (whose re-encryption key its sealed
readings are encapsulated to), and the owner of any other device (a pharmacy terminal) a registered party.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from carechain.identity import PUBLIC_KEY_SIZE, Identity, KeyFileError, device_id_for
from carechain.profiles import (
    DeviceProfile,
    YamlDocument,
    YamlFileError,
    describe_validation_error,
    read_yaml,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")


class InventoryError(YamlFileError):
    """An inventory file is missing or wrong; the message is `{file}:{line}: {what}`, a line per problem."""


@dataclass(frozen=True)
class InventoryDevice:
    """One device to register, with the line it came from (for messages about it later on)."""

    name: str
    profile: str
    owner: str
    site: str
    public_key: bytes
    line: int

    @property
    def device_id(self) -> str:
        return device_id_for(self.public_key)


_Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]


class _Entry(BaseModel):
    # Mirrors one `devices:` item; the lengths match carechain.entries.Registration.
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    profile: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    owner: _Label
    site: _Label | None = None
    public_key: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    key_file: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = None


class _Top(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    site: _Label | None = None
    devices: list[Any] = Field(min_length=1)


_ENTRY_FIELDS = ", ".join(_Entry.model_fields)


def load_inventory(path: Path | str, profiles: dict[str, DeviceProfile],
                   parties: Mapping[str, str] | None = None) -> list[InventoryDevice]:
    """Parse and check an inventory against the known `profiles`; raise `InventoryError` naming lines.

    With `parties` (registered party id → role, from the ledger), every owner is checked against them.
    """
    path = Path(path)
    doc = read_yaml(path, InventoryError)
    problems: list[tuple[int, str]] = []
    if not isinstance(doc.data, dict):
        raise InventoryError(path, doc.line_of(()), "an inventory must be a mapping with a `devices:` list")
    try:
        top = _Top.model_validate(doc.data)
    except ValidationError as exc:
        for loc, msg in describe_validation_error(exc):
            field = ".".join(map(str, loc))
            if loc == ("devices",) and "at least 1" in msg:
                msg = "the list is empty; add the devices to register"
            elif "unknown field" in msg:
                msg = "unknown field; an inventory has only `site:` and `devices:`"
            problems.append((doc.line_of(loc), f"{field}: {msg}"))
        raise _error(path, problems) from None

    devices: list[InventoryDevice] = []
    by_name: dict[str, InventoryDevice] = {}
    by_key: dict[bytes, InventoryDevice] = {}
    for i, raw in enumerate(top.devices):
        device = _device(doc, i, raw, top.site, profiles, parties, problems)
        if device is None:
            continue
        if device.name in by_name:
            first = by_name[device.name]
            what = f"device name {device.name!r} is already used on line {first.line}; names must be unique"
            problems.append((device.line, what))
            continue
        if device.public_key in by_key:
            first = by_key[device.public_key]
            what = f"device {device.name!r} has the same public key as {first.name!r} on line {first.line}"
            problems.append((device.line, f"{what}; every device needs its own key pair"))
            continue
        by_name[device.name] = by_key[device.public_key] = device
        devices.append(device)
    if problems:
        raise _error(path, problems)
    return devices


def _device(
    doc: YamlDocument,
    i: int,
    raw: Any,
    default_site: str | None,
    profiles: dict[str, DeviceProfile],
    parties: Mapping[str, str] | None,
    problems: list[tuple[int, str]],
) -> InventoryDevice | None:
    """Check one `devices:` item, appending its problems; None when it cannot be registered."""
    line = doc.line_of(("devices", i))
    where = f"devices[{i}]"
    if not isinstance(raw, dict):
        problems.append((line, f"{where}: each device must be a mapping with {_ENTRY_FIELDS}"))
        return None
    label = f"device {raw['name']!r}" if isinstance(raw.get("name"), str) else where
    try:
        entry = _Entry.model_validate(raw)
    except ValidationError as exc:
        for loc, msg in describe_validation_error(exc):
            field = ".".join(map(str, loc))
            if "unknown field" in msg:
                msg = f"unknown field; a device has: {_ENTRY_FIELDS}"
            problems.append((doc.line_of(("devices", i, *loc)), f"{label}: {field}: {msg}"))
        return None
    label = f"device {entry.name!r}"
    before = len(problems)

    def add(field: str | None, what: str) -> None:
        problems.append((doc.line_of(("devices", i, field)) if field else line, f"{label}: {what}"))

    if not _NAME_RE.match(entry.name):
        add("name", "name may use letters, digits and . _ : - (up to 64, starting with a letter or digit)")
    if entry.profile not in profiles:
        known = ", ".join(sorted(profiles)) or "(none found)"
        close = difflib.get_close_matches(entry.profile, profiles, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        add("profile", f"unknown profile {entry.profile!r}; {hint}known profiles: {known}")
    if parties is not None and entry.profile in profiles:
        problem = _owner_problem(entry.owner, profiles[entry.profile], parties)
        if problem:
            add("owner", problem)
    site = entry.site or default_site
    if site is None:
        add(None, "no site; add `site:` to this device or at the top of the file")

    public_key: bytes | None = None
    if (entry.public_key is None) == (entry.key_file is None):
        both = "both" if entry.public_key is not None else "neither"
        add(None, f"has {both} `public_key` and `key_file`; give exactly one")
    elif entry.public_key is not None:
        public_key, problem = _parse_public_key(entry.public_key)
        if problem:
            add("public_key", problem)
    elif entry.key_file is not None:
        key_path = (doc.path.parent / Path(entry.key_file).expanduser()).resolve()
        try:
            public_key = Identity.load(key_path).public_key
        except KeyFileError as exc:
            add("key_file", f"key_file: {exc}")
        except OSError as exc:  # e.g. a directory, or a file this user may not read
            add("key_file", f"key_file: cannot read {key_path}: {exc.strerror or exc}")
    if len(problems) > before or public_key is None or site is None:
        return None
    return InventoryDevice(entry.name, entry.profile, entry.owner, site, public_key, line)


def _owner_problem(owner: str, profile: DeviceProfile, parties: Mapping[str, str]) -> str | None:
    health = any(kind != "purchase" for kind in profile.events)
    role = parties.get(owner)
    if role is None:
        who = "patient" if health else "party"
        return (f"owner {owner!r} is not a registered party id; register the {who} first "
                f"(`carechain party register {who if health else '<role>'} ...`) and use the id it prints")
    if health and role != "patient":
        return (f"owner {owner!r} is a registered {role}, but a {profile.name} records health readings: "
                "its owner must be a registered patient")
    return None


def _parse_public_key(text: str) -> tuple[bytes | None, str | None]:
    want = PUBLIC_KEY_SIZE * 2
    if not _HEX_RE.match(text):
        bad = next(ch for ch in text if not _HEX_RE.match(ch))
        return None, f"public_key is not hexadecimal (found {bad!r}); give {want} hex digits"
    if len(text) != want:
        return None, f"public_key has {len(text)} hex digits; an Ed25519 public key has {want} (32 bytes)"
    return bytes.fromhex(text), None


def _error(path: Path, problems: list[tuple[int, str]]) -> InventoryError:
    (line, what), *more = sorted(problems, key=lambda p: p[0])
    return InventoryError(path, line, what, more=more)
