"""Deterministic CBOR (RFC 8949 §4.2) encoding and bounded, type-checked decoding of untrusted bytes."""

from __future__ import annotations

import io
from typing import Any

import cbor2
from cbor2 import CBORTag

__all__ = ["CBORError", "CBORTag", "bstr_header", "decode", "encode", "encode_presorted", "tstr_header"]

# Plain data only: a semantic tag that cbor2 would turn into a datetime, regex, Decimal or set has no
# place in a carechain message, and accepting it would make re-encoding ambiguous.
_SCALARS = frozenset({bool, float, str, bytes, type(None)})
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


def encode_presorted(value: Any) -> bytes:
    """Deterministic encoding for float-free values whose map keys are already in deterministic order.

    cbor2's canonical mode re-sorts every map (most of the cost of encoding a receipt); cbor2 always
    uses shortest-form integers and lengths, so for such values the plain encoding is the same bytes.
    Callers test that equality for their shapes.
    """
    return cbor2.dumps(value)


def _head(major: int, length: int) -> bytes:
    if length < 24:
        return bytes((major | length,))
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes((major | extra,)) + length.to_bytes(size, "big")
    raise ValueError("length does not fit in CBOR")


def bstr_header(length: int) -> bytes:
    """The deterministic head of a CBOR byte string of `length` bytes (major type 2)."""
    return _head(0x40, length)


def tstr_header(length: int) -> bytes:
    """The deterministic head of a CBOR text string of `length` UTF-8 bytes (major type 3)."""
    return _head(0x60, length)


def decode(data: bytes, *, max_depth: int = MAX_DEPTH, allow_tag: int | None = None,
           check_plain: bool = True) -> Any:
    """Decode exactly one CBOR item from untrusted `data`.

    Rejects trailing bytes, semantic tags (except `allow_tag` at the top level), nesting deeper than
    `max_depth`, and integers outside the signed 64-bit range. `check_plain=False` skips the type and
    depth walk below the top level, for callers that type-check every element themselves.
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
        if check_plain:
            _check_plain(value.value, max_depth, 1)
        return value
    if check_plain:
        _check_plain(value, max_depth, 0)
    return value


def _check_plain(value: Any, max_depth: int, depth: int) -> None:
    # Iterative walk: no recursion limit to hit, and scalars (the common case) cost one type lookup.
    stack = [(value, depth)]
    while stack:
        item, d = stack.pop()
        t = type(item)
        if t is int:
            if not -MAX_INT - 1 <= item <= MAX_INT:
                raise CBORError("int_out_of_range", "integer outside the signed 64-bit range")
        elif t in _SCALARS:
            continue
        elif d >= max_depth:
            raise CBORError("too_deep", f"nesting deeper than {max_depth}")
        elif t is list:
            stack.extend((x, d + 1) for x in item)
        elif t is dict:
            for key, x in item.items():
                if type(key) not in (str, int):
                    raise CBORError("bad_map_key", f"map key of type {type(key).__name__}")
                stack.append((key, d + 1))
                stack.append((x, d + 1))
        else:
            raise CBORError("unexpected_type", f"{t.__name__} is not plain CBOR data")
