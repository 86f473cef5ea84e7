"""Deterministic CBOR (RFC 8949 §4.2) encoding and bounded, type-checked decoding of untrusted bytes."""

from __future__ import annotations

import io
from typing import Any

import cbor2
from cbor2 import CBORTag

# Plain data only: a semantic tag that cbor2 would turn into a datetime, regex, Decimal or set has no
# place in a carechain message, and accepting it would make re-encoding ambiguous.
_PLAIN_TYPES = (bool, int, float, str, bytes, type(None))
MAX_DEPTH = 16
MAX_INT = 2**63 - 1


class CBORError(ValueError):
    """Bytes that are not acceptable carechain CBOR; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(value: Any) -> bytes:
    """Deterministic encoding: shortest integer/float forms, map keys sorted bytewise."""
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, *, max_depth: int = MAX_DEPTH, allow_tag: int | None = None) -> Any:
    """Decode exactly one CBOR item from untrusted `data`.

    Rejects trailing bytes, semantic tags (except `allow_tag` at the top level), nesting deeper than
    `max_depth`, and integers outside the signed 64-bit range.
    """
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, RecursionError, MemoryError, OverflowError, ValueError) as exc:
        raise CBORError("malformed_cbor", str(exc)[:200]) from None
    if fp.tell() != len(data):
        raise CBORError("trailing_bytes", f"{len(data) - fp.tell()} bytes after the CBOR item")
    if isinstance(value, cbor2.CBORTag):
        if allow_tag is None or value.tag != allow_tag:
            raise CBORError("unexpected_tag", f"top-level tag {value.tag} is not allowed here")
        _check_plain(value.value, max_depth, 1)
        return value
    _check_plain(value, max_depth, 0)
    return value


def _check_plain(value: Any, max_depth: int, depth: int) -> None:
    if depth > max_depth:
        raise CBORError("too_deep", f"nesting deeper than {max_depth}")
    if isinstance(value, list):
        for item in value:
            _check_plain(item, max_depth, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CBORError("bad_map_key", f"map key of type {type(key).__name__}")
            _check_plain(key, max_depth, depth + 1)
            _check_plain(item, max_depth, depth + 1)
    elif isinstance(value, _PLAIN_TYPES):
        if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT - 1 <= value <= MAX_INT:
            raise CBORError("int_out_of_range", "integer outside the signed 64-bit range")
    else:
        raise CBORError("unexpected_type", f"{type(value).__name__} is not plain CBOR data")
