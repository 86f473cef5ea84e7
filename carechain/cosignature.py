"""C2SP tlog-cosignature v1 with Ed25519 (https://c2sp.org/tlog-cosignature): timestamped note signatures.

A cosignature is a signed-note signature line `— <name> base64(key ID ‖ u64 timestamp ‖ Ed25519 signature)`
where key ID = SHA-256(name ‖ "\\n" ‖ 0x04 ‖ public key)[:4] and the signed message is

    cosignature/v1
    time <timestamp, decimal>
    <the checkpoint body, with its final newline>

It states: as of `timestamp`, this is the largest consistent tree head the cosigner has seen for the log.
Private keys never come here: signing goes through the `sign` callable (`Identity.sign`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from carechain.checkpoint import KEY_ID_SIZE, NoteSignature, parse_note
from carechain.errors import FixedReasonError
from carechain.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, verify_signature

ALG_COSIGNATURE_V1 = 0x04
HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = 2**63 - 1
_BLOB_SIZE = 8 + SIGNATURE_SIZE


class CosignatureError(FixedReasonError):
    """A cosignature could not be made; the message says why."""

    REASON = "bad_cosignature"


@dataclass(frozen=True)
class Cosigner:
    """A witness the verifier knows: its key name and Ed25519 public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        if not self.name or "+" in self.name or any(c.isspace() for c in self.name):
            raise CosignatureError(f"cosigner name {self.name!r} must be non-empty without spaces or '+'")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_SIZE:
            raise CosignatureError(f"cosigner {self.name}: an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes")

    @property
    def key_id(self) -> bytes:
        """SHA-256(name ‖ "\\n" ‖ 0x04 ‖ public key)[:4]."""
        digest = hashlib.sha256(self.name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + self.public_key)
        return digest.digest()[:KEY_ID_SIZE]


def signed_message(body: str, timestamp: int) -> bytes:
    """The bytes an Ed25519 cosignature/v1 signs over a checkpoint `body` at `timestamp`."""
    return f"{HEADER}time {timestamp}\n{body}".encode()


def cosign(body: str, cosigner: Cosigner, sign: Callable[[bytes], bytes], timestamp: int) -> NoteSignature:
    """Cosign a checkpoint body; the caller must have checked its consistency first (see `witness`)."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise CosignatureError(f"cosignature timestamp must be an integer in 0..2**63-1, got {timestamp!r}")
    message = signed_message(body, timestamp)
    signature = bytes(sign(message))
    if not verify_signature(cosigner.public_key, message, signature):
        raise CosignatureError(
            f"the signer for {cosigner.name} did not sign with its public key; pass the key of the identity "
            "whose sign() you pass")
    return NoteSignature(cosigner.name, cosigner.key_id, struct.pack(">Q", timestamp) + signature)


def cosignature_timestamp(body: str, sig: NoteSignature, cosigner: Cosigner) -> int | None:
    """The timestamp of `sig` if it is a valid cosignature/v1 of `body` by `cosigner`, else None."""
    if sig.name != cosigner.name or sig.key_hash != cosigner.key_id or len(sig.signature) != _BLOB_SIZE:
        return None
    timestamp: int = struct.unpack(">Q", sig.signature[:8])[0]
    if timestamp > MAX_TIMESTAMP:
        return None
    if not verify_signature(cosigner.public_key, signed_message(body, timestamp), sig.signature[8:]):
        return None
    return timestamp


def add_cosignature(note: str, line: NoteSignature) -> str:
    """The note with one more signature line (as a witness hands back a cosigned checkpoint)."""
    parse_note(note)  # format only: a malformed note must not be extended
    return note + line.line()
