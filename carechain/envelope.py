"""COSE_Sign1 (RFC 9052) envelopes with EdDSA over deterministic CBOR payloads.

Wire form: tag 18 [protected: bstr{1: -8, 4: kid}, unprotected: {}, payload: bstr, signature: bstr].
`kid` sits in the *protected* header so the signer's claimed identity is covered by the signature.
This module only builds and parses; which public key to verify with is the caller's decision.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from carechain import cbor
from carechain.errors import ProtocolError, Reason
from carechain.identity import Identity, verify_signature

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
ALG_EDDSA = -8
MAX_ENVELOPE_BYTES = 16 * 1024  # default wire limit; the bridge's configured limit may be lower
_PROTECTED_MAX = 128
# kid is a device id (or the id of an operator or log key): lowercase base32, like the topic's device part.
_KID = re.compile(rb"[a-z2-7]{1,64}")


class EnvelopeError(ProtocolError):
    """An envelope that cannot be accepted; `reason` (a `Reason`) is reported to the device."""


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


def parse(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES, max_depth: int = cbor.MAX_DEPTH) -> Sign1:
    """Parse untrusted bytes into a Sign1, checking structure, algorithm and canonical encoding.

    Only one encoding of a given message is accepted: the deterministic one `sign` produces. The
    signature covers the protected header and the payload but not the envelope around them, so without
    this check anyone could re-encode a genuine event (indefinite-length array, long-form lengths) into
    different bytes that still verify: a second leaf for the same event. `max_depth` bounds the
    payload's nesting.
    """
    if len(data) > max_bytes:
        raise EnvelopeError(Reason.TOO_LARGE, f"{len(data)} bytes exceeds the limit of {max_bytes}")
    # Fast path: bytes laid out exactly as `sign` writes them are split without a CBOR decoder; anything
    # else takes the general path, which says precisely what is wrong.
    parts = _split_deterministic(data) or _split(data)
    protected, payload_bytes, signature = parts
    kid = _kid_of_deterministic(protected) or _kid(protected)
    # Only the canonical encoding is accepted, so the bytes signed are the one meaning that is stored.
    try:
        payload = cbor.decode(payload_bytes, max_depth=max_depth, canonical=True)
    except cbor.CBORError as exc:
        if exc.reason == "not_canonical":
            raise EnvelopeError(Reason.BAD_PAYLOAD, "payload is not deterministically encoded CBOR") from None
        raise EnvelopeError(Reason.BAD_PAYLOAD, str(exc)) from None
    return Sign1(kid.decode("ascii"), protected, payload_bytes, signature, payload)


def parse_checked(data: bytes) -> Sign1:
    """A Sign1 from bytes `parse` has already accepted — an event this log's ingest checked before appending it —
    split by `sign`'s layout and decoded without repeating the untrusted-input checks (the contracts replaying
    the bridge's own ledger: those checks were most of their cost). Bytes in any other layout take `parse`.
    Never for bytes from outside: miners and verifiers parse every leaf with `parse`."""
    parts = _split_deterministic(data)
    kid = None if parts is None else _kid_of_deterministic(parts[0])
    if parts is None or kid is None:
        return parse(data)
    protected, payload_bytes, signature = parts
    return Sign1(kid.decode("ascii"), protected, payload_bytes, signature, cbor.decode_checked(payload_bytes))


def _split_deterministic(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(protected, payload, signature) of a COSE_Sign1 in exactly the layout `sign` writes, else None."""
    if not data.startswith(_SIGN1_HEAD):
        return None
    got = cbor.bstr_at(data, 2)
    if got is None or len(got[0]) > _PROTECTED_MAX or data[got[1]:got[1] + 1] != _EMPTY_MAP:
        return None
    protected = got[0]
    got = cbor.bstr_at(data, got[1] + 1)
    if got is None or data[got[1]:got[1] + 2] != _SIG_HEAD or len(data) != got[1] + 66:
        return None
    return protected, got[0], data[got[1] + 2:]


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The general path: decode, then name the first thing that is wrong (the fast path found something)."""
    try:
        # Every element is type-checked below and the unprotected header must be empty, so the
        # generic plain-data walk is skipped here (it runs on the protected header and payload).
        msg = cbor.decode(data, allow_tag=COSE_SIGN1_TAG, max_depth=4, check_plain=False)
    except cbor.CBORError as exc:
        raise EnvelopeError(Reason.MALFORMED, exc.detail if exc.reason == "malformed_cbor" else str(exc)) from None
    if not isinstance(msg, cbor.CBORTag):
        raise EnvelopeError(Reason.NOT_COSE_SIGN1, "expected CBOR tag 18 (COSE_Sign1)")
    body = msg.value
    if not (isinstance(body, list) and len(body) == 4):
        raise EnvelopeError(Reason.NOT_COSE_SIGN1, "COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload_bytes, signature = body
    if not isinstance(protected, bytes) or len(protected) > _PROTECTED_MAX:
        raise EnvelopeError(Reason.BAD_HEADER, "protected header must be a short byte string")
    if unprotected != {} or type(unprotected) is not dict:
        raise EnvelopeError(Reason.BAD_HEADER, "unprotected header must be an empty map (kid and alg are protected)")
    if not isinstance(payload_bytes, bytes):
        raise EnvelopeError(Reason.BAD_PAYLOAD, "payload must be an attached byte string")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "an EdDSA signature has 64 bytes")
    _kid(protected)  # a wrong header is named before the encoding of the envelope around it
    raise EnvelopeError(Reason.MALFORMED, "COSE_Sign1 is not deterministically encoded "
                                     "(indefinite or long-form lengths, or a long-form tag)")


# A deterministic protected header {1: -8, 4: kid} starts with map(2), 1, -8, 4: then kid's byte string.
_PROTECTED_HEAD = b"\xa2\x01\x27\x04"


def _kid_of_deterministic(protected: bytes) -> bytes | None:
    if not protected.startswith(_PROTECTED_HEAD):
        return None
    got = cbor.bstr_at(protected, 4)
    if got is None or got[1] != len(protected) or not _KID.fullmatch(got[0]):
        return None
    return got[0]


def _kid(protected: bytes) -> bytes:
    """The general path for the protected header: return kid, or name what is wrong with the header."""
    try:
        header = cbor.decode(protected, max_depth=1)
    except cbor.CBORError as exc:
        raise EnvelopeError(Reason.BAD_HEADER, str(exc)) from None
    if not isinstance(header, dict):
        raise EnvelopeError(Reason.BAD_HEADER, "protected header must be a CBOR map")
    alg = header.get(HEADER_ALG)
    if type(alg) is not int or alg != ALG_EDDSA:  # not -8.0
        raise EnvelopeError(Reason.BAD_ALG, "only alg EdDSA (-8) is accepted")
    kid = header.get(HEADER_KID)
    if not isinstance(kid, bytes) or not _KID.fullmatch(kid):
        raise EnvelopeError(Reason.BAD_HEADER, "protected header must carry kid (4): 1-64 lowercase base32 characters")
    # Nothing else in the protected header: an unknown (possibly critical, RFC 9052 §3.1) parameter is
    # refused rather than ignored, and the header has one encoding.
    if protected != _protected_header(kid):
        raise EnvelopeError(Reason.BAD_HEADER,
                            "protected header must be exactly {1: -8, 4: kid}, deterministically encoded")
    return kid
