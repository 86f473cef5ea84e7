"""Proof bundles anyone can check offline, from public data alone (stable interface: docs/proofs.md).

An inclusion bundle proves that an exact leaf (which contains the device's COSE_Sign1 event) is at
`leaf_index` in the log whose checkpoint the log key signed. A consistency bundle proves that a newer
checkpoint's tree extends an older one (the log never rewrote history).
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from carechain import envelope
from carechain.checkpoint import Checkpoint, NoteError, verify_note
from carechain.entries import ENTRY_EVENT, Entry, EntryError
from carechain.errors import FixedReasonError
from carechain.identity import PublicKeyError, parse_public_key_hex
from carechain.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion

_Hex32 = Field(pattern=r"^[0-9a-f]{64}$")


class VerificationError(FixedReasonError):
    """A proof that does not hold; the message says which check failed."""

    REASON = "not_verified"


class InclusionBundle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    leaf_index: int = Field(ge=0)
    tree_size: int = Field(ge=1)
    root_hash: str = _Hex32
    inclusion_path: list[str] = Field(max_length=64)
    entry: str  # base64 of the exact leaf bytes
    checkpoint: str  # signed note
    log_public_key: str = _Hex32


class ConsistencyBundle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    old_checkpoint: str
    new_checkpoint: str
    consistency_path: list[str] = Field(max_length=128)
    log_public_key: str = _Hex32


@dataclass(frozen=True)
class VerifiedEvent:
    leaf_index: int
    checkpoint: Checkpoint
    entry_type: str
    device_id: str | None
    seq: int | None
    kind: str | None
    payload: Any


def verify_checkpoint(note: str, log_public_key: bytes) -> Checkpoint:
    """Check a signed checkpoint note against the log key; its origin is the signer name."""
    try:
        origin = note.split("\n", 1)[0]
        body = verify_note(note, origin, log_public_key)
        return Checkpoint.parse(body)
    except (NoteError, ValueError) as exc:
        raise VerificationError(f"checkpoint: {exc}") from None


def _key(hex_key: str, trusted: bytes | None) -> bytes:
    try:
        key = parse_public_key_hex(hex_key, "log_public_key in the bundle")
    except PublicKeyError as exc:
        raise VerificationError(str(exc)) from None
    if trusted is not None and not hmac.compare_digest(key, trusted):
        raise VerificationError("log_public_key in the bundle is not the trusted log key you gave")
    return key


def verify_inclusion_bundle(bundle: InclusionBundle, trusted_log_key: bytes | None = None) -> VerifiedEvent:
    key = _key(bundle.log_public_key, trusted_log_key)
    cp = verify_checkpoint(bundle.checkpoint, key)
    root = bytes.fromhex(bundle.root_hash)
    if cp.tree_size != bundle.tree_size or not hmac.compare_digest(cp.root_hash, root):
        raise VerificationError("tree_size/root_hash differ from the signed checkpoint")
    try:
        leaf = base64.b64decode(bundle.entry, validate=True)
    except ValueError:
        raise VerificationError("entry is not valid base64") from None
    try:
        verify_inclusion(bundle.leaf_index, bundle.tree_size, leaf_hash(leaf),
                         [bytes.fromhex(h) for h in bundle.inclusion_path], root)
    except (ProofError, ValueError) as exc:
        raise VerificationError(f"inclusion: {exc}") from None
    try:
        entry = Entry.decode(leaf)
        msg = envelope.parse(entry.cose)
    except (EntryError, envelope.EnvelopeError) as exc:
        raise VerificationError(f"entry is included but is not a carechain entry: {exc}") from None
    p = msg.payload if isinstance(msg.payload, dict) else {}
    is_event = entry.type == ENTRY_EVENT
    return VerifiedEvent(bundle.leaf_index, cp, entry.type, msg.kid,
                         p.get("seq") if is_event else None, p.get("kind") if is_event else None, p)


def verify_consistency_bundle(bundle: ConsistencyBundle, trusted_log_key: bytes | None = None
                              ) -> tuple[Checkpoint, Checkpoint]:
    key = _key(bundle.log_public_key, trusted_log_key)
    old, new = verify_checkpoint(bundle.old_checkpoint, key), verify_checkpoint(bundle.new_checkpoint, key)
    if old.origin != new.origin:
        raise VerificationError(f"checkpoints are from different logs ({old.origin!r} vs {new.origin!r})")
    try:
        verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash,
                           [bytes.fromhex(h) for h in bundle.consistency_path])
    except (ProofError, ValueError) as exc:
        raise VerificationError(f"consistency {old.tree_size} → {new.tree_size}: {exc}") from None
    return old, new
