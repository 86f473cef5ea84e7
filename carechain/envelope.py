"""COSE_Sign1 (RFC 9052) envelopes with EdDSA over deterministic CBOR payloads.

Wire form: tag 18 [protected: bstr{1: -8, 4: kid}, unprotected: {}, payload: bstr, signature: bstr].
`kid` sits in the *protected* header so the signer's claimed identity is covered by the signature.
This module only builds and parses; which public key to verify with is the caller's decision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from carechain import cbor
from carechain.identity import Identity, verify_signature

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
ALG_EDDSA = -8
MAX_ENVELOPE_BYTES = 16 * 1024  # default wire limit; the bridge's configured limit may be lower
_PROTECTED_MAX = 128


class EnvelopeError(ValueError):
    """An envelope that cannot be accepted; `reason` is a stable code reported to the device."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# RFC 9052 §4.4: Sig_structure = ["Signature1", body_protected, external_aad = h'', payload]. Its
# deterministic encoding is a fixed prefix plus two length-prefixed byte strings; building it directly
# saves a full CBOR encode on every verification (the bridge's hot path). Tested against cbor2.
_SIG1_PREFIX = b"\x84\x6aSignature1"


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return b"".join((_SIG1_PREFIX, cbor.bstr_header(len(protected)), protected, b"\x40",
                     cbor.bstr_header(len(payload)), payload))


@functools.lru_cache(maxsize=4096)
def _protected_header(kid: bytes) -> bytes:
    return cbor.encode({HEADER_ALG: ALG_EDDSA, HEADER_KID: kid})


# tag 18 (0xd2), array of 4 (0x84); after the protected header: an empty map (0xa0); the signature is
# a 64-byte string (0x58 0x40). Assembled directly on the hot path; tested equal to cbor2's encoding.
_SIGN1_HEAD = b"\xd2\x84"
_EMPTY_MAP = b"\xa0"
_SIG_HEAD = b"\x58\x40"


def sign(identity: Identity, payload: Any, *, kid: str | None = None, presorted: bool = False) -> bytes:
    """Encode `payload` deterministically and wrap it in a COSE_Sign1 signed by `identity`.

    `presorted=True` is for float-free payloads built with their keys already in deterministic order
    (see `cbor.encode_presorted`).
    """
    payload_bytes = cbor.encode_presorted(payload) if presorted else cbor.encode(payload)
    protected = _protected_header((kid or identity.device_id).encode())
    signature = identity.sign(_sig_structure(protected, payload_bytes))
    return b"".join((_SIGN1_HEAD, cbor.bstr_header(len(protected)), protected, _EMPTY_MAP,
                     cbor.bstr_header(len(payload_bytes)), payload_bytes, _SIG_HEAD, signature))


@dataclass(frozen=True)
class Sign1:
    """A parsed, *not yet verified* COSE_Sign1 message."""

    kid: str
    protected: bytes
    payload_bytes: bytes
    signature: bytes
    payload: Any

    def verify(self, public_key: bytes) -> bool:
        return verify_signature(public_key, _sig_structure(self.protected, self.payload_bytes), self.signature)


def parse(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Sign1:
    """Parse untrusted bytes into a Sign1, checking structure, algorithm and canonical payload encoding."""
    if len(data) > max_bytes:
        raise EnvelopeError("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        # Every element is type-checked below and the unprotected header must be empty, so the
        # generic plain-data walk is skipped here (it runs on the protected header and payload).
        msg = cbor.decode(data, allow_tag=COSE_SIGN1_TAG, max_depth=4, check_plain=False)
    except cbor.CBORError as exc:
        raise EnvelopeError("malformed", exc.detail if exc.reason == "malformed_cbor" else str(exc)) from None
    if not isinstance(msg, cbor.CBORTag):
        raise EnvelopeError("not_cose_sign1", "expected CBOR tag 18 (COSE_Sign1)")
    body = msg.value
    if not (isinstance(body, list) and len(body) == 4):
        raise EnvelopeError("not_cose_sign1", "COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload_bytes, signature = body
    if not isinstance(protected, bytes) or len(protected) > _PROTECTED_MAX:
        raise EnvelopeError("bad_header", "protected header must be a short byte string")
    if unprotected != {} or type(unprotected) is not dict:
        raise EnvelopeError("bad_header", "unprotected header must be an empty map (kid and alg are protected)")
    if not isinstance(payload_bytes, bytes):
        raise EnvelopeError("bad_payload", "payload must be an attached byte string")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise EnvelopeError("bad_signature", "an EdDSA signature has 64 bytes")
    try:
        header = cbor.decode(protected, max_depth=1)
    except cbor.CBORError as exc:
        raise EnvelopeError("bad_header", str(exc)) from None
    if not isinstance(header, dict) or header.get(HEADER_ALG) != ALG_EDDSA:
        raise EnvelopeError("bad_alg", "only alg EdDSA (-8) is accepted")
    kid = header.get(HEADER_KID)
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= 64:
        raise EnvelopeError("bad_header", "protected header must carry kid (4) as a byte string")
    try:
        payload = cbor.decode(payload_bytes)
    except cbor.CBORError as exc:
        raise EnvelopeError("bad_payload", str(exc)) from None
    # Only the canonical encoding is accepted, so the bytes signed are the one meaning that is stored.
    if cbor.encode(payload) != payload_bytes:
        raise EnvelopeError("bad_payload", "payload is not deterministically encoded CBOR")
    return Sign1(kid.decode("ascii", "replace"), protected, payload_bytes, signature, payload)
