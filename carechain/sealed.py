"""Sealed readings (protocol v2): a reading's body encrypted under its (device, epoch) data key.

Sans-IO: no randomness here. The agent passes the data key and a fresh nonce in; whoever opens passes the
data key recovered through re-encryption (carechain.reencryption). The AEAD (ChaCha20-Poly1305) binds the
device, seq, ts, kind and epoch as associated data, so a ciphertext cannot be replayed under another event.
The signed envelope carries `ciphertext_hash(ct)`: the ledger anchors hashes, never readings.

Wire form on `cc/v1/dev/{id}/ev` of an event that carries a ciphertext: the deterministic CBOR map
`{"ct": bstr, "ev": bstr(COSE_Sign1)}`; everything else (v1, and clear v2 events) is the plain COSE_Sign1.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from carechain import cbor
from carechain.envelope import EnvelopeError
from carechain.errors import FixedReasonError, Reason

__all__ = ["CIPHERTEXT_HASH_SIZE", "DATA_KEY_SIZE", "DEFAULT_EPOCH_MS", "MAX_CIPHERTEXT_BYTES", "NONCE_SIZE",
           "SealedError", "associated_data", "ciphertext_hash", "encode_sealed", "epoch_of", "open_body",
           "seal_body", "split_wire"]

DATA_KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
CIPHERTEXT_HASH_SIZE = 32
DEFAULT_EPOCH_MS = 3_600_000  # one hour
MAX_CIPHERTEXT_BYTES = 4096
_AAD_DOMAIN = b"carechain/sealed/v2\x00"
_CT_HASH_DOMAIN = b"carechain/ct/v2\x00"
_COSE_SIGN1_FIRST_BYTE = 0xD2  # tag 18
_CBOR_MAP = 5  # major type
_SEALED_KEYS = frozenset({"ct", "ev"})


class SealedError(FixedReasonError):
    """A ciphertext that does not open under this key and these event fields (tampered, or the wrong key)."""

    REASON = "bad_ciphertext"


def epoch_of(ts_ms: int, epoch_ms: int) -> int:
    """The epoch a reading taken at `ts_ms` belongs to: epochs of `epoch_ms` counted from the Unix epoch."""
    if epoch_ms <= 0:
        raise ValueError(f"an epoch lasts a positive number of milliseconds, got {epoch_ms}")
    if ts_ms < 0:
        raise ValueError(f"a timestamp is non-negative, got {ts_ms}")
    return ts_ms // epoch_ms


def associated_data(dev: str, seq: int, ts: int, kind: str, epoch: int) -> bytes:
    """What the AEAD binds a ciphertext to: the signed event's device, seq, ts, kind and epoch."""
    return _AAD_DOMAIN + cbor.encode([dev, seq, ts, kind, epoch])


def seal_body(key: bytes, nonce: bytes, dev: str, seq: int, ts: int, kind: str, epoch: int,
              body: dict[str, Any]) -> bytes:
    """nonce ‖ ChaCha20-Poly1305(deterministic CBOR of `body`). The nonce must never repeat under `key`."""
    _check_key(key)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a ChaCha20-Poly1305 nonce has {NONCE_SIZE} bytes, got {len(nonce)}")
    if not isinstance(body, dict):
        raise TypeError(f"a sealed body is a dict, got {type(body).__name__}")
    sealed = ChaCha20Poly1305(bytes(key)).encrypt(bytes(nonce), cbor.encode(body),
                                                  associated_data(dev, seq, ts, kind, epoch))
    ct = bytes(nonce) + sealed
    if len(ct) > MAX_CIPHERTEXT_BYTES:
        raise ValueError(f"sealed body of {len(ct)} bytes exceeds the limit of {MAX_CIPHERTEXT_BYTES}")
    return ct


def open_body(key: bytes, dev: str, seq: int, ts: int, kind: str, epoch: int, ct: bytes) -> dict[str, Any]:
    """The body sealed in `ct` for exactly this event; SealedError if anything differs or was altered."""
    _check_key(key)
    if len(ct) > MAX_CIPHERTEXT_BYTES:
        raise SealedError(f"ciphertext of {len(ct)} bytes exceeds the limit of {MAX_CIPHERTEXT_BYTES}")
    if len(ct) < NONCE_SIZE + TAG_SIZE:
        raise SealedError(f"ciphertext of {len(ct)} bytes is shorter than a nonce and a tag "
                          f"({NONCE_SIZE + TAG_SIZE})")
    try:
        plain = ChaCha20Poly1305(bytes(key)).decrypt(ct[:NONCE_SIZE], ct[NONCE_SIZE:],
                                                     associated_data(dev, seq, ts, kind, epoch))
    except InvalidTag:
        raise SealedError(f"ciphertext of {dev} seq {seq} does not open: altered, another event's, "
                          "or the wrong epoch key") from None
    try:
        body = cbor.decode(plain)
    except cbor.CBORError as exc:
        raise SealedError(f"sealed body of {dev} seq {seq} is not valid CBOR: {exc}") from None
    if not isinstance(body, dict) or cbor.encode(body) != plain:
        raise SealedError(f"sealed body of {dev} seq {seq} is not a deterministically encoded map")
    return body


def ciphertext_hash(ct: bytes) -> bytes:
    """SHA-256 of a ciphertext under its own domain: what the signed payload's body carries as `ct`."""
    return hashlib.sha256(_CT_HASH_DOMAIN + ct).digest()


def encode_sealed(cose: bytes, ct: bytes) -> bytes:
    """The wire form of a sealed event: `{"ct": ct, "ev": cose}`, deterministic CBOR (first byte 0xa2)."""
    if len(ct) > MAX_CIPHERTEXT_BYTES:
        raise ValueError(f"ciphertext of {len(ct)} bytes exceeds the limit of {MAX_CIPHERTEXT_BYTES}")
    if not cose[:1] == bytes((_COSE_SIGN1_FIRST_BYTE,)):
        raise ValueError("the event of a sealed wire message must be a COSE_Sign1 (tag 18)")
    return cbor.encode({"ct": bytes(ct), "ev": bytes(cose)})


def split_wire(raw: bytes) -> tuple[bytes, bytes | None]:
    """(COSE_Sign1, ciphertext or None) of a message on an event topic.

    A plain COSE_Sign1 (first byte 0xd2: v1, or a clear v2 event) is returned as it is, undecoded; the
    envelope parser checks it. So is anything that is not a CBOR map, so that garbage and broken envelopes
    keep the reasons v1 gave them (`malformed`, `not_cose_sign1`, ...). A map must be exactly the sealed
    form, deterministically encoded, else `bad_envelope`. The caller bounds the message's size first
    (limits.max_event_bytes).
    """
    if raw[:1] == bytes((_COSE_SIGN1_FIRST_BYTE,)) or not raw or raw[0] >> 5 != _CBOR_MAP:
        return raw, None
    try:
        msg = cbor.decode(raw, max_depth=1)
    except cbor.CBORError as exc:
        raise EnvelopeError(Reason.BAD_ENVELOPE, f"not a well-formed sealed event map: {exc}") from None
    if not isinstance(msg, dict) or set(msg) != _SEALED_KEYS:
        raise EnvelopeError(Reason.BAD_ENVELOPE, 'a sealed event is a map of exactly "ct" and "ev"')
    cose, ct = msg["ev"], msg["ct"]
    if not isinstance(cose, bytes) or not isinstance(ct, bytes):
        raise EnvelopeError(Reason.BAD_ENVELOPE, 'a sealed event\'s "ct" and "ev" are byte strings')
    if len(ct) > MAX_CIPHERTEXT_BYTES:
        raise EnvelopeError(Reason.BAD_ENVELOPE,
                            f"ciphertext of {len(ct)} bytes exceeds the limit of {MAX_CIPHERTEXT_BYTES}")
    if cbor.encode(msg) != raw:
        raise EnvelopeError(Reason.BAD_ENVELOPE, "a sealed event map is not deterministically encoded")
    if cose[:1] != bytes((_COSE_SIGN1_FIRST_BYTE,)):
        raise EnvelopeError(Reason.BAD_ENVELOPE, 'a sealed event\'s "ev" must be a COSE_Sign1 (tag 18)')
    return cose, ct


def _check_key(key: bytes) -> None:
    if len(key) != DATA_KEY_SIZE:
        raise ValueError(f"a data key has {DATA_KEY_SIZE} bytes, got {len(key)}")
