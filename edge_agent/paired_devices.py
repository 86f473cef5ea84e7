"""The paired-device registry: which BLE devices this agent reads, and what it last knew of each.

A small TinyDB JSON file in the agent's data dir (`paired-devices.json`), meant to be read and edited
by a person: one record per device address with its profile, whether to pair and whether it is bonded,
when it was last seen, its battery level and Device Information, and — for devices that keep numbered
records (glucose meters) — the last record sequence number handed to the agent, from which the next
connection asks for stored records. Writes replace the file atomically, so a power cut leaves the old
file or the new one.

To pin a device of a profile to one address (two thermometers in one home), add a record by hand:

    {"_default": {"1": {"address": "C0:26:DA:01:02:03", "profile": "thermometer", "pair": true}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tinydb import Query, TinyDB
from tinydb.storages import MemoryStorage, Storage

from carechain.files import write_atomic

FILE_NAME = "paired-devices.json"


class PairedDevice(BaseModel):
    """One record of the registry; every field but `address` and `profile` is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=1, max_length=64)  # as bleak reports it (a UUID on macOS)
    profile: str = Field(min_length=1, max_length=64)  # device_profiles/<profile>.yaml
    name: str | None = None  # advertised local name
    pair: bool = False  # pair (and bond) on connect; see docs/raspberry-pi.md
    bonded: bool = False  # pairing succeeded once; BlueZ keeps the keys
    last_seen_ms: int | None = Field(default=None, ge=0)
    battery_pct: int | None = Field(default=None, ge=0, le=100)
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    last_record_seq: int | None = Field(default=None, ge=0, le=65535)  # glucose: last record received


class RegistryError(ValueError):
    """The registry file is not what this agent can read; names the file and the record."""


class _AtomicJSONStorage(Storage):
    """TinyDB storage writing the whole file atomically (TinyDB's own JSONStorage truncates in place)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self._path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if not isinstance(data, dict):
            raise RegistryError(f'{self._path}: expected a JSON object like {{"_default": {{...}}}}')
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_atomic(self._path, text.encode("utf-8"), mode=0o600)

    def close(self) -> None:
        pass


class PairedDevices:
    """Read and update the registry; `path=None` keeps it in memory (demo, tests)."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is None:
            self._db = TinyDB(storage=MemoryStorage)
        else:
            self._db = TinyDB(str(self.path), storage=_AtomicJSONStorage)
        self._table = self._db.table("_default")
        self.all()  # fail now, naming the file, rather than at the first reconnect

    @classmethod
    def in_dir(cls, data_dir: Path | str) -> PairedDevices:
        return cls(Path(data_dir) / FILE_NAME)

    def all(self) -> list[PairedDevice]:
        return [self._model(doc) for doc in self._table.all()]

    def get(self, address: str) -> PairedDevice | None:
        docs = self._table.search(Query().address.test(lambda a: isinstance(a, str) and a.upper() == address.upper()))
        return self._model(docs[0]) if docs else None

    def for_profile(self, profile: str) -> list[PairedDevice]:
        return [d for d in self.all() if d.profile == profile]

    def update(self, address: str, profile: str, **fields: Any) -> PairedDevice:
        """Insert or update the record of `address`; returns it as stored."""
        current = self.get(address)
        base: Mapping[str, Any] = current.model_dump() if current is not None else {"address": address}
        record = PairedDevice.model_validate({**base, "profile": profile, **fields})
        doc = record.model_dump()
        query = Query().address.test(lambda a: isinstance(a, str) and a.upper() == address.upper())
        if current is None:
            self._table.insert(doc)
        else:
            self._table.update(doc, query)
        return record

    def close(self) -> None:
        self._db.close()

    def _model(self, doc: Mapping[str, Any]) -> PairedDevice:
        try:
            return PairedDevice.model_validate(dict(doc))
        except ValidationError as exc:
            where = self.path or "paired-device registry"
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or "record"
            raise RegistryError(
                f"{where}: record {dict(doc).get('address', '?')!r}: {field}: {err['msg']}; fix or delete that record"
            ) from None
