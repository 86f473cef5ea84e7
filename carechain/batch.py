"""Batch messages: several individually signed events in one MQTT message, sans-IO.

A batch is the deterministic CBOR map `{"batch": [p1, p2, …]}`, each `pi` a byte string holding exactly
the payload a single-event message carries (a COSE_Sign1, or a v2 `{"ct", "ev"}` wire map), so the bridge
checks, deduplicates and receipts every event as if it had come alone. A single-event message is never a
one-entry map (a COSE_Sign1 is tagged, a v2 wire map has two entries), so the first byte tells them apart:
`0xa1` is a batch, anything else a single event.

The decoder is hand-written over the few heads the format has: it accepts only the deterministic encoding
(shortest-form definite lengths), refuses a malformed batch as a whole with one `BatchError`, and copies
nothing but the elements. `pack` fills messages greedily under an event count and a byte size, counting
the CBOR heads exactly, so `encode_batch` of a group is never larger than the budget it was packed for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from carechain.cbor import bstr_header
from carechain.errors import FixedReasonError, Reason

__all__ = ["BatchError", "batch_size", "decode_batch", "encode_batch", "events_in", "pack"]

_KEY = b"\x65batch"  # text(5) "batch"
_HEAD = b"\xa1" + _KEY  # map(1) holding it
_ARRAY, _BSTR = 0x80, 0x40
_MAJOR_MASK, _INFO_MASK = 0xE0, 0x1F
_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
T = TypeVar("T")


class BatchError(FixedReasonError):
    """A message that starts as a batch but is not a well-formed one within the limits: refused whole."""

    REASON = Reason.BAD_BATCH


def _array_header(n: int) -> bytes:
    """The deterministic head of an array of `n` items: a byte string's head with the array's major type."""
    head = bstr_header(n)
    return bytes((_ARRAY | head[0] & _INFO_MASK,)) + head[1:]


def encode_batch(payloads: Sequence[bytes]) -> bytes:
    """The batch message carrying `payloads` (each a single event's wire bytes), in deterministic CBOR."""
    if not payloads:
        raise ValueError("a batch holds at least one event")
    parts = [_HEAD, _array_header(len(payloads))]
    for p in payloads:
        parts += (bstr_header(len(p)), p)
    return b"".join(parts)


def batch_size(element_sizes: Iterable[int]) -> int:
    """The exact size of the batch message holding elements of these byte lengths."""
    n = total = 0
    for size in element_sizes:
        n += 1
        total += len(bstr_header(size)) + size
    return len(_HEAD) + len(_array_header(n)) + total


def _read_head(data: bytes, at: int) -> tuple[int, int, int]:
    """(major type, argument, offset after the head) of the CBOR head at `at`; BatchError if it is not a
    definite, shortest-form head within the data."""
    if at >= len(data):
        raise BatchError(f"the batch ends at byte {at}, inside its array")
    first = data[at]
    major, info = first & _MAJOR_MASK, first & _INFO_MASK
    if info < 24:
        return major, info, at + 1
    width = _ARG_BYTES.get(info)
    if width is None:
        raise BatchError(f"an indefinite or reserved length at byte {at} (only definite lengths are allowed)")
    end = at + 1 + width
    if end > len(data):
        raise BatchError(f"the batch ends at byte {len(data)}, inside a length at byte {at}")
    arg = int.from_bytes(data[at + 1:end], "big")
    if (arg < 24 if width == 1 else arg < 1 << (4 * width)):
        raise BatchError(f"a length at byte {at} is not in its shortest form (the encoding must be deterministic)")
    return major, arg, end


def events_in(payload: bytes) -> int:
    """How many events a message declares (1 for a single-event or unreadable message), from its heads alone:
    cheap enough for weighing messages before they are checked."""
    if not payload.startswith(_HEAD):
        return 1
    try:
        major, n, _ = _read_head(payload, len(_HEAD))
    except BatchError:
        return 1
    return max(n, 1) if major == _ARRAY else 1


def decode_batch(payload: bytes, max_events: int, max_bytes: int) -> list[bytes] | None:
    """The events of a batch message; None if `payload` is a single-event message (not a one-entry map).

    Raises BatchError, naming what is wrong, for a batch over `max_bytes` or `max_events`, an empty one,
    one whose element is not a byte string or is itself a batch, or anything not in the exact shape.
    """
    if payload[:1] != _HEAD[:1]:
        return None
    if len(payload) > max_bytes:
        raise BatchError(f"the batch message is {len(payload)} bytes, over the limit of {max_bytes}")
    if not payload.startswith(_HEAD):
        raise BatchError('a one-entry map that is not {"batch": [...]} (a single event is a COSE_Sign1 or a '
                         '{"ct", "ev"} map)')
    major, n, at = _read_head(payload, len(_HEAD))
    if major != _ARRAY:
        raise BatchError('"batch" is not an array of byte strings')
    if n == 0:
        raise BatchError("the batch is empty")
    if n > max_events:
        raise BatchError(f"the batch holds {n} events, over the limit of {max_events}")
    events: list[bytes] = []
    for i in range(n):
        major, size, at = _read_head(payload, at)
        if major != _BSTR:
            raise BatchError(f"element {i} of the batch is not a byte string (CBOR major type {major >> 5})")
        end = at + size
        if end > len(payload):
            raise BatchError(f"element {i} of the batch declares {size} bytes, past the end of the message")
        if payload[at:at + 1] == _HEAD[:1]:
            raise BatchError(f"element {i} of the batch is itself a batch (batches do not nest)")
        events.append(payload[at:end])
        at = end
    if at != len(payload):
        raise BatchError(f"{len(payload) - at} bytes after the batch's array")
    return events


def pack(items: Sequence[T], payload: Callable[[T], bytes], max_events: int, max_bytes: int) -> list[list[T]]:
    """Groups of consecutive `items`, in order, each at most `max_events` long and, as a batch message, at
    most `max_bytes`. An item too large to share a message goes alone (as a single-event message, whose
    size is the transport's business)."""
    groups: list[list[T]] = []
    group: list[T] = []
    used = 0  # bytes of the group's elements (heads included), without the map and array heads
    for item in items:
        size = len(payload(item))
        element = len(bstr_header(size)) + size
        fits = len(group) < max_events and \
            len(_HEAD) + len(_array_header(len(group) + 1)) + used + element <= max_bytes
        if group and not fits:
            groups.append(group)
            group, used = [], 0
        group.append(item)
        used += element
    if group:
        groups.append(group)
    return groups
