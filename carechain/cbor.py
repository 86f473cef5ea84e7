"""Deterministic CBOR (RFC 8949 §4.2) encoding and bounded, type-checked decoding of untrusted bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import cbor2
from cbor2 import CBORTag

__all__ = ["CBORError", "CBORTag", "bstr_at", "bstr_header", "decode", "decode_checked", "encode", "encode_presorted",
           "tstr_at", "tstr_header"]

MAX_DEPTH = 16
MAX_INT = 2**63 - 1
# cbor2 6 decodes arrays and maps inside a tag as tuples and frozendicts (hashable, like map keys); cbor2 5
# as lists and dicts. `decode` hands callers lists and dicts with either, so no caller depends on the version.
_FREEZES_TAGGED = type(cbor2.loads(b"\xd8\x63\x80").value) is not list  # tag 99 around an empty array


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


# The heads of strings up to 1 KiB, looked up: the hot paths build several per event (Sig_structure, entries).
_BSTR_HEADS = tuple(_head(0x40, n) for n in range(1024))
_TSTR_HEADS = tuple(_head(0x60, n) for n in range(1024))


def bstr_header(length: int) -> bytes:
    """The deterministic head of a CBOR byte string of `length` bytes (major type 2)."""
    return _BSTR_HEADS[length] if 0 <= length < 1024 else _head(0x40, length)


def tstr_header(length: int) -> bytes:
    """The deterministic head of a CBOR text string of `length` UTF-8 bytes (major type 3)."""
    return _TSTR_HEADS[length] if 0 <= length < 1024 else _head(0x60, length)


def bstr_at(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """The byte string whose shortest-form head is at `pos`, and the position after it; else None."""
    return _string_at(data, pos, 2)


def tstr_at(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """The text string (its UTF-8 bytes, not decoded) whose shortest-form head is at `pos`, and the position
    after it; else None."""
    return _string_at(data, pos, 3)


def _string_at(data: bytes, pos: int, major: int) -> tuple[bytes, int] | None:
    """Byte positions only, for the hot paths that read a layout `encode` writes; anything else is None."""
    if pos >= len(data) or data[pos] >> 5 != major:
        return None
    info = data[pos] & 31
    if info < 24:
        length, start = info, pos + 1
    elif info < 27:
        size = 1 << (info - 24)
        length, start = int.from_bytes(data[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        if length < _SHORTEST[info] or start > len(data):  # not the shortest form
            return None
    else:
        return None
    end = start + length
    return (data[start:end], end) if end <= len(data) else None


def decode(data: bytes, *, max_depth: int = MAX_DEPTH, allow_tag: int | None = None,
           check_plain: bool = True, canonical: bool = False) -> Any:
    """Decode exactly one CBOR item from untrusted `data`.

    Rejects trailing bytes, indefinite lengths, tags (except `allow_tag` at the top level), simple values
    other than false/true/null, text that is not UTF-8, lengths beyond the data, nesting deeper than
    `max_depth`, and integers outside the signed 64-bit range or map keys that are not integers or text.
    `check_plain=False` skips those last two, for callers that type-check every element themselves.
    `canonical=True` also rejects (CBORError "not_canonical") any encoding but the one `encode` writes:
    `encode(value) == data`, judged from the heads while scanning, by re-encoding only for an item that holds a
    float.
    """
    # With `check_plain` the scan also does the type walk's checks (integer range, map key types, UTF-8, depth of
    # empty containers), so what cbor2 builds below needs no second look.
    settled = _scan(data, max_depth, allow_tag, utf8=True, canonical=canonical, plain=check_plain)
    fp = io.BytesIO(data)
    try:
        # After _scan, cbor2's C decoder only meets definite-length plain data, valid UTF-8 and no semantic
        # tag, so none of its tag decoders (datetime, decimal, regex, MIME, ...) runs on untrusted bytes. Their
        # error paths raised decimal and TypeError exceptions, and leaked memory on every failure, as
        # does invalid UTF-8 (agronholm/cbor2#257): all found by tests/test_fuzz.py and bench/fuzz.py.
        # str_errors="replace" keeps that last path leak-free should a text ever get past the scan.
        value = cbor2.CBORDecoder(fp, str_errors="replace").decode()
    except Exception as exc:  # whatever still fails to decode is malformed, never another exception
        what = str(exc) if isinstance(exc, cbor2.CBORDecodeError) else f"{type(exc).__name__}: {exc}"
        raise CBORError("malformed_cbor", what[:200]) from None
    if fp.tell() != len(data):  # unreachable after _scan; kept as the decoder's own word
        raise CBORError("trailing_bytes", f"{len(data) - fp.tell()} bytes after the CBOR item")
    if isinstance(value, cbor2.CBORTag):
        if allow_tag is None or value.tag != allow_tag:
            raise CBORError("unexpected_tag", f"top-level tag {value.tag} is not allowed here")
        if _FREEZES_TAGGED:
            value = cbor2.CBORTag(value.tag, _thaw(value.value))
    if canonical and not settled and encode(value) != data:
        raise CBORError("not_canonical", "not the deterministic encoding (a float not in its shortest form?)")
    return value


def decode_checked(data: bytes) -> Any:
    """Decode bytes that `decode` has already accepted (a payload this log's ingest checked before appending it):
    cbor2's decoder alone, without the scan, the type walk and their allocations. Never for bytes from outside."""
    return cbor2.loads(data)


def _thaw(value: Any) -> Any:
    """Tuples and frozen maps (cbor2 6, inside a tag) as lists and dicts; map keys stay as decoded.

    Recursion is bounded: `_scan` has already refused nesting deeper than `max_depth`.
    """
    if isinstance(value, tuple | list):
        return [_thaw(x) for x in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
_SIMPLE_OK = frozenset({20, 21, 22, 25, 26, 27})  # false, true, null; half, single, double floats


def _scan(data: bytes, max_depth: int, allow_tag: int | None, *, utf8: bool, canonical: bool = False,
          plain: bool = False) -> bool:
    """Check the structure of one CBOR item without building anything: heads, lengths against the bytes
    left, nesting, no indefinite length, no tag but `allow_tag` first, no other simple value; with `utf8`,
    that text is UTF-8.

    With `plain`, also that the item is plain data as carechain uses it: integers within the signed 64-bit range,
    map keys that are integers or text, and no container (an empty one included) nested deeper than `max_depth`.

    With `canonical`, also the deterministic encoding `encode` writes: every head in its shortest form and each
    map's keys in cbor2's canonical order, without duplicates (CBORError "not_canonical" otherwise). True when
    that settles it; False when the item holds a float or a map key that is not a plain scalar, which only
    re-encoding can judge.

    A loop over item heads with a stack of counts: no recursion, no allocation driven by a declared length.
    """
    n = len(data)
    pos = 0
    todo = 1  # items still to read at the current nesting level
    stack: list[tuple[int, bool, bytes | None]] = []  # the enclosing levels' counts, is-a-map and last key
    in_map, last_key = False, None  # the current level: a map (its items alternate key, value), its last key
    settled = True
    first = True
    while True:
        if not todo:
            if not stack:
                break
            todo, in_map, last_key = stack.pop()
            continue
        if pos >= n:
            raise CBORError("malformed_cbor", f"premature end of data at byte {pos}")
        start = pos
        is_key = in_map and not todo & 1  # a map's count is even: its keys come at even counts left
        ib = data[pos]
        major, info = ib >> 5, ib & 31
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            size = _ARG_BYTES[info]
            if pos + size > n:
                raise CBORError("malformed_cbor", f"premature end of data in the head at byte {pos - 1}")
            arg = int.from_bytes(data[pos:pos + size], "big")
            pos += size
            if canonical and major != 7 and arg < _SHORTEST[info]:
                raise CBORError("not_canonical", f"the head at byte {start} is not in its shortest form")
            if plain and major < 2 and arg > MAX_INT:  # -1 - arg below -2**63 alike
                raise CBORError("int_out_of_range", f"the integer at byte {start} is outside the signed 64-bit range")
        elif info == 31:
            raise CBORError("malformed_cbor", f"indefinite-length item at byte {pos - 1} (not deterministic CBOR)")
        else:
            raise CBORError("malformed_cbor", f"reserved additional information {info} at byte {pos - 1}")
        if plain and is_key and major != 0 and major != 1 and major != 3:
            raise CBORError("bad_map_key", f"the map key at byte {start} is a {_MAJOR_NAMES[major]}, "
                                           "not an integer or text")
        todo -= 1
        if major < 2:
            pass
        elif major < 4:
            if arg > n - pos:
                raise CBORError("malformed_cbor", f"a string at byte {pos} declares {arg} bytes; {n - pos} are left")
            if major == 3 and utf8:
                try:
                    data[pos:pos + arg].decode("utf-8")
                except UnicodeDecodeError:
                    raise CBORError("malformed_cbor", f"text at byte {pos} is not valid UTF-8") from None
            pos += arg
        elif major < 6:
            if is_key:
                settled = False  # a container as a map key (refused above when `plain`): for re-encoding to judge
                is_key = False
            if arg:
                count = arg * 2 if major == 5 else arg
                if count > n - pos:
                    raise CBORError("malformed_cbor",
                                    f"a container at byte {pos} declares {count} items; {n - pos} bytes are left")
                if len(stack) >= max_depth:
                    raise CBORError("too_deep", f"nesting deeper than {max_depth}")
                stack.append((todo, in_map, last_key))
                todo, in_map, last_key = count, major == 5, None
            elif plain and len(stack) >= max_depth:
                raise CBORError("too_deep", f"nesting deeper than {max_depth}")
        elif major == 6:
            if not (first and arg == allow_tag):
                raise CBORError("unexpected_tag", f"tag {arg} at byte {pos - 1} is not allowed here")
            stack.append((todo, in_map, last_key))  # the tagged item counts one level deeper
            todo, in_map, last_key = 1, False, None
            if is_key:
                settled, is_key = False, False
        elif info not in _SIMPLE_OK:
            raise CBORError("unexpected_type", f"simple value {arg} at byte {pos - 1} is not plain CBOR data")
        elif info > 24:
            settled = False  # a float: its shortest form is for re-encoding to judge
        if canonical and is_key:
            key = data[start:pos]
            # Strictly after the previous key in canonical order (`_LENGTH_FIRST`); inline: it runs for every key
            # of every payload the bridge ingests.
            if last_key is not None and not (len(key) > len(last_key) if _LENGTH_FIRST and len(key) != len(last_key)
                                             else key > last_key):
                raise CBORError("not_canonical", f"the map key at byte {start} is out of canonical order or repeated")
            last_key = key
        first = False
    if pos != n:
        raise CBORError("trailing_bytes", f"{n - pos} bytes after the CBOR item")
    return settled


_MAJOR_NAMES = ("unsigned integer", "negative integer", "byte string", "text", "array", "map", "tag",
                "simple value or float")
# The smallest argument each long head form may carry in the shortest (deterministic) encoding.
_SHORTEST = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}
# cbor2's canonical map order: by encoded length first, then bytewise (RFC 7049) — or bytewise only (RFC 8949),
# if a cbor2 release changes it; probed once: "a" (2 bytes) sorts before 1000 (3 bytes, 0x19...) only length-first.
_LENGTH_FIRST = next(iter(cbor2.loads(cbor2.dumps({"a": 0, 1000: 0}, canonical=True)))) == "a"
