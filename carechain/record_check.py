"""Checking sealed readings, and whose they are: the checks every party runs before it believes a reading.

Sans-IO and deterministic. Two pieces, shared by whoever opens readings — a requester under a grant
(`record_access.opening`), an owner contributing her own (`record_access.contributing`), an aggregator
auditing a contribution (`carechain.contribution_audit`) — so that all of them accept exactly the same ones:

- `open_record`: one sealed reading counts only if its ciphertext hashes to the `ct` in the device-signed
  envelope (compared in constant time), the device signature holds with the key registered for it, the
  AEAD opens with its epoch's data key, and the body validates. `open_records` runs it over many.
- `DeviceOwners` and `own_leaves`: a walk over the ledger's leaves, in order, that knows which devices are
  registered to whom at each leaf. A device counts only from a registration signed by a genesis operator key,
  whose key is the device's own (`device_id_for`), and only until it is revoked or registered to someone else;
  `own_leaves` collects one owner's readings of a kind in a period and her devices' `epoch_key` events.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carechain import envelope, events, sealed
from carechain.entries import ENTRY_EVENT, ENTRY_REGISTER, ENTRY_REVOKE, Entry, EntryError, open_operator_entry
from carechain.identity import device_id_for

__all__ = ["DeviceOwners", "Epoch", "OwnLeaves", "Problem", "RecordRejected", "open_record", "open_records",
           "own_leaves"]

Epoch = tuple[str, int]  # (device id, epoch number)


@dataclass(frozen=True)
class Problem:
    """One record that could not be opened, and why (the open reports it and goes on)."""

    index: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason}


class RecordRejected(Exception):
    """A sealed reading that does not open; `reason` starts with a stable code ("ciphertext_mismatch: …")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_record(cose: bytes, ct: bytes, device_keys: Mapping[str, bytes],
                data_keys: Mapping[Epoch, bytes]) -> dict[str, Any]:
    """Check and decrypt one sealed reading; raises RecordRejected naming the first check that failed."""
    try:
        msg = envelope.parse(cose)
    except envelope.EnvelopeError as exc:
        raise RecordRejected(f"bad_envelope: {exc}") from None
    pk = device_keys.get(msg.kid)
    if pk is None:
        raise RecordRejected(f"unknown_device: no operator-signed registration for {msg.kid}")
    if not msg.verify(pk):
        raise RecordRejected(f"bad_signature: not signed by device {msg.kid}'s registered key")
    try:
        payload = events.validate_payload(msg.payload)
    except events.PayloadError as exc:
        raise RecordRejected(f"bad_payload: {exc}") from None
    raw = msg.payload
    if payload.dev != msg.kid or raw.get("v") != events.PROTOCOL_V2 or payload.kind not in events.SEALED_KINDS:
        raise RecordRejected(f"not_sealed: a {payload.kind!r} v{raw.get('v')} event is not a sealed reading")
    body = raw["body"]
    if not hmac.compare_digest(sealed.ciphertext_hash(ct), body["ct"]):
        raise RecordRejected("ciphertext_mismatch: the ciphertext does not hash to the signed envelope's ct")
    key = data_keys.get((payload.dev, body["epoch"]))
    if key is None:
        raise RecordRejected(f"no_data_key: epoch {body['epoch']} of {payload.dev} was not opened")
    try:
        plain = sealed.open_body(key, payload.dev, payload.seq, payload.ts, payload.kind, body["epoch"], ct)
        reading = events.BODY_MODELS[payload.kind].model_validate(plain)
    except sealed.SealedError as exc:
        raise RecordRejected(f"bad_ciphertext: {exc}") from None
    except ValueError as exc:
        raise RecordRejected(f"bad_body: {exc}") from None
    return {"dev": payload.dev, "seq": payload.seq, "ts": payload.ts, "kind": payload.kind,
            **reading.model_dump(mode="json", exclude_none=True, exclude_defaults=True)}


def open_records(records: Sequence[tuple[int, bytes, bytes]], device_keys: Mapping[str, bytes],
                 data_keys: Mapping[Epoch, bytes]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """`open_record` for each (leaf index, cose, ct); readings carry their leaf index. (A worker's unit.)"""
    readings: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for index, cose, ct in records:
        try:
            readings.append({"index": index, **open_record(cose, ct, device_keys, data_keys)})
        except RecordRejected as exc:
            problems.append(Problem(index, exc.reason))
    return readings, problems


# -- whose devices, leaf by leaf -------------------------------------------------------------------------


@dataclass
class DeviceOwners:
    """Which device is registered to whom, with which key, as of the last leaf `apply`'d (leaves in order).

    Only operator-signed registrations count, and only with the device's own key; a revocation, or a
    registration to another owner, ends the previous owner's hold from that leaf on. Entries that do not
    verify register nothing (the ledger's own verifier reports them).
    """

    operator_keys: Mapping[str, bytes]
    devices: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # dev → (owner party id, pk)

    def apply(self, entry: Entry) -> None:
        """Take one `device.register` or `device.revoke` entry into account (other entries change nothing)."""
        if entry.type not in (ENTRY_REGISTER, ENTRY_REVOKE):
            return
        try:
            op = open_operator_entry(entry, dict(self.operator_keys))
        except (EntryError, envelope.EnvelopeError):
            return  # not operator-signed: it registers nothing
        if entry.type == ENTRY_REGISTER and device_id_for(op.pk) == op.dev:
            self.devices[op.dev] = (op.owner, bytes(op.pk))
        else:
            self.devices.pop(op.dev, None)

    def key_of(self, dev: str, owner: str) -> bytes | None:
        """`dev`'s key if it is registered to `owner` now, else None."""
        held = self.devices.get(dev)
        return held[1] if held is not None and held[0] == owner else None


@dataclass
class OwnLeaves:
    """What `own_leaves` found of one owner's: her reading leaves, her devices' keys and epoch capsules."""

    readings: list[tuple[int, bytes]] = field(default_factory=list)  # (leaf index, the event's COSE_Sign1)
    epochs: dict[int, Epoch] = field(default_factory=dict)  # reading leaf → its (device, epoch)
    device_keys: dict[str, bytes] = field(default_factory=dict)  # every key a device of hers had
    capsules: dict[Epoch, tuple[bytes, bytes]] = field(default_factory=dict)  # → (capsule, key_ct)


def own_leaves(leaves: Iterable[tuple[int, bytes]], owner_id: str, operator_keys: Mapping[str, bytes],
               kind: str, from_ms: int, to_ms: int) -> OwnLeaves:
    """The events of `owner_id`'s devices on `leaves` (index, bytes), ascending: her readings of `kind` with
    from_ms ≤ ts < to_ms, and the `epoch_key` events her devices signed naming her. Nothing is decrypted or
    checked beyond ownership and (for epoch keys) the device signature: `open_record` checks each reading."""
    owners = DeviceOwners(operator_keys)
    found = OwnLeaves()
    for index, leaf in leaves:
        try:
            entry = Entry.decode(leaf)
        except EntryError:
            continue  # not hers to judge: the ledger's own verifier reports malformed leaves
        if entry.type != ENTRY_EVENT:
            owners.apply(entry)
            held = {dev for dev, (owner, _) in owners.devices.items() if owner == owner_id}
            found.device_keys.update({dev: owners.devices[dev][1] for dev in held})
            continue
        try:
            msg = envelope.parse(entry.cose)
        except envelope.EnvelopeError:
            continue
        pk = owners.key_of(msg.kid, owner_id)
        if pk is None:
            continue  # not a device of hers at this leaf: never used
        ev_kind, ts, body = msg.payload.get("kind"), msg.payload.get("ts"), msg.payload.get("body")
        if ev_kind == "epoch_key":
            _on_epoch_key(msg, pk, owner_id, found.capsules)
        elif ev_kind == kind and isinstance(ts, int) and from_ms <= ts < to_ms and isinstance(body, dict):
            found.readings.append((index, entry.cose))  # a malformed one is reported by `open_record`
            if isinstance(body.get("epoch"), int):
                found.epochs[index] = (msg.kid, body["epoch"])
    return found


def _on_epoch_key(msg: envelope.Sign1, pk: bytes, owner_id: str, capsules: dict[Epoch, tuple[bytes, bytes]]) -> None:
    if not msg.verify(pk):
        return
    try:
        payload = events.validate_payload(msg.payload)
    except events.PayloadError:
        return
    body = msg.payload["body"]
    if payload.dev == msg.kid and body["owner"] == owner_id:
        capsules.setdefault((msg.kid, int(body["epoch"])), (bytes(body["capsule"]), bytes(body["key_ct"])))
