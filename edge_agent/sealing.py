"""Protocol 2 at the edge: seal each health reading under its (device, epoch) data key, announce the key.

The keys are the agent's only secrets besides the devices' signing keys: a data key is 32 random bytes
from `os.urandom`, made when a device's first sealed reading of an epoch is recorded, encapsulated to the
owner's re-encryption key (`carechain.reencryption.encapsulate`) in a clear `epoch_key` event, and kept in
the outbox database (0600) only as long as an event of its epoch may still need re-sealing
(`edge_agent.outbox.Outbox.forget_spent_keys`). Each reading gets a fresh random nonce; the AEAD binds
the device, seq, ts, kind and epoch (`carechain.sealed`), so re-signing under another seq re-seals.

What is signed for a sealed reading is `{epoch, ct: ciphertext_hash}`: the ledger anchors hashes, never
readings. What is stored and published is the wire form `{"ct": ciphertext, "ev": COSE_Sign1}`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from carechain import envelope
from carechain.errors import Reason
from carechain.events import BODY_MODELS, EventBody, PayloadError, make_payload, make_sealed_payload
from carechain.identity import Identity
from carechain.reencryption import PRE_PUBLIC_SIZE, encapsulate
from carechain.sealed import (
    DATA_KEY_SIZE,
    NONCE_SIZE,
    ciphertext_hash,
    encode_sealed,
    open_body,
    seal_body,
    split_wire,
)
from edge_agent.outbox import DataKey

PROTOCOL_V2 = 2
MAX_WEEKLY_MINUTES = 7 * 1440  # carechain.events.WeeklyActivity's bound


@dataclass(frozen=True)
class RecordOwner:
    """Whose records a device's readings are: the owner's party id (named in each epoch_key event) and
    re-encryption public key (each epoch's data key is encapsulated to it)."""

    party_id: str
    pre_key: bytes

    def __post_init__(self) -> None:
        if len(self.pre_key) != PRE_PUBLIC_SIZE:
            raise ValueError(f"an owner's re-encryption public key has {PRE_PUBLIC_SIZE} bytes, "
                             f"got {len(self.pre_key)}")


def new_epoch_key(device_id: str, epoch: int, epoch_ms: int) -> DataKey:
    return DataKey(device_id, epoch, epoch_ms, os.urandom(DATA_KEY_SIZE))


def sign_epoch_key(identity: Identity, key: DataKey, owner: RecordOwner, ts: int) -> Callable[[int], bytes]:
    """The signer of the clear epoch_key event that anchors `key`'s capsule, encapsulated once (now), so
    a retried transaction announces the same capsule."""
    capsule, key_ct = encapsulate(owner.pre_key, key.data_key)
    body = {"epoch": key.epoch, "epoch_ms": key.epoch_ms, "owner": owner.party_id, "capsule": capsule,
            "key_ct": key_ct}
    return lambda seq: envelope.sign(identity, make_payload(identity.device_id, seq, ts, "epoch_key", body,
                                                            v=PROTOCOL_V2))


def sign_clear(identity: Identity, ts: int, kind: str, body: EventBody | dict[str, Any]) -> Callable[[int], bytes]:
    """The signer of a clear protocol 2 event (a purchase, a weekly_activity summary)."""
    return lambda seq: envelope.sign(identity, make_payload(identity.device_id, seq, ts, kind, body, v=PROTOCOL_V2))


def reading_body(kind: str, body: EventBody | dict[str, Any]) -> dict[str, Any]:
    """The body as it is sealed: validated against the kind's model, in the canonical dict form v1 signs."""
    model = body if isinstance(body, EventBody) else BODY_MODELS[kind].model_validate(body)
    if type(model) is not BODY_MODELS.get(kind):
        raise PayloadError(Reason.BAD_BODY, f"body model {type(model).__name__} does not match kind {kind!r}")
    return model.model_dump(exclude_none=True, exclude_defaults=True)


def seal_reading(identity: Identity, key: DataKey, seq: int, ts: int, kind: str, body: dict[str, Any]) -> bytes:
    """The wire form of one sealed reading: a fresh nonce, the ciphertext, the signed hash of it."""
    dev = identity.device_id
    ct = seal_body(key.data_key, os.urandom(NONCE_SIZE), dev, seq, ts, kind, key.epoch, body)
    cose = envelope.sign(identity, make_sealed_payload(dev, seq, ts, kind, key.epoch, ciphertext_hash(ct)))
    return encode_sealed(cose, ct)


def sign_sealed(identity: Identity, key: DataKey, ts: int, kind: str, body: dict[str, Any]) -> Callable[[int], bytes]:
    return lambda seq: seal_reading(identity, key, seq, ts, kind, body)


def reseal(identity: Identity, wire: bytes, seq: int, key_of: Callable[[int], DataKey | None]) -> bytes:
    """One of our stored events under a new seq, everything else unchanged. A sealed one is opened with
    its epoch's key (`key_of(epoch)`) and sealed again, since the AEAD binds the seq; a clear one is re-signed."""
    cose, ct = split_wire(wire)
    payload = dict(envelope.parse(cose, max_bytes=1 << 20).payload)
    old_seq = payload["seq"]
    payload["seq"] = seq
    if ct is None:
        return envelope.sign(identity, payload)
    epoch = payload["body"]["epoch"]
    key = key_of(epoch)
    if key is None:  # cannot happen while the event is in the outbox: its epoch's key is kept until it leaves
        raise LookupError(f"no data key for {identity.device_id} epoch {epoch}: cannot re-seal seq {old_seq}")
    body = open_body(key.data_key, identity.device_id, old_seq, payload["ts"], payload["kind"], epoch, ct)
    return seal_reading(identity, key, seq, payload["ts"], payload["kind"], body)


def iso_week(ts_ms: int) -> str:
    """The ISO 8601 week (UTC) of a timestamp, as `YYYY-Www` (sorts chronologically)."""
    year, week, _ = datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.UTC).isocalendar()
    return f"{year:04d}-W{week:02d}"


def weekly_activity_body(week: str, active_minutes: int, policy: str) -> dict[str, Any]:
    return {"week": week, "active_minutes": min(active_minutes, MAX_WEEKLY_MINUTES), "policy": policy}
