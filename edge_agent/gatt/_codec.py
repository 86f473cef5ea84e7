"""Little-endian field reader and writer shared by the characteristic codecs (private).

The reader turns every shortfall into a `GattParseError` naming the characteristic, the byte offset and
the field expected there, so no parser can leak IndexError or struct.error. The writer checks every
value's range and type before packing and raises `GattEncodeError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum, IntFlag
from typing import TypeVar

from edge_agent.gatt.date_time import DATE_TIME_SIZE, DateTime, date_time_problem
from edge_agent.gatt.errors import GattEncodeError, GattParseError
from edge_agent.gatt.ieee11073 import Number11073, decode_float, decode_sfloat, encode_float, encode_sfloat

E = TypeVar("E", bound=IntEnum)
F = TypeVar("F", bound=IntFlag)


def _bytes(count: int) -> str:
    return f"{count} byte" + ("" if count == 1 else "s")


class Reader:
    """Reads fields in order from one characteristic value."""

    def __init__(self, data: bytes | bytearray | memoryview, characteristic: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"{characteristic}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self.characteristic = characteristic

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def fail(self, expected: str, got: str | None = None, *, offset: int | None = None) -> GattParseError:
        """The error to raise for a bad value at `offset` (default: the current position)."""
        return GattParseError(self.characteristic, self._pos if offset is None else offset, expected, got)

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            got = "the end of the data" if self.remaining == 0 else _bytes(self.remaining)
            raise self.fail(f"{_bytes(size)} of {what}", got)
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")

    def u8(self, what: str) -> int:
        return self.uint(1, what)

    def u16(self, what: str) -> int:
        return self.uint(2, what)

    def u24(self, what: str) -> int:
        return self.uint(3, what)

    def u32(self, what: str) -> int:
        return self.uint(4, what)

    def s16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little", signed=True)

    def sfloat(self, what: str) -> Number11073:
        return decode_sfloat(self.u16(f"{what} (SFLOAT)"))

    def float32(self, what: str) -> Number11073:
        return decode_float(self.u32(f"{what} (FLOAT)"))

    def flags(self, known: int, size: int = 1, what: str = "flags") -> int:
        """A flags field; reserved bits are refused (they could announce fields this parser cannot skip)."""
        start = self._pos
        value = self.uint(size, what)
        reserved = value & ~known
        if reserved:
            width = 2 * size
            raise self.fail(
                f"{what} with only bits 0x{known:0{width}X} set (this parser's layout)",
                f"0x{value:0{width}X}, reserved bits 0x{reserved:0{width}X} set",
                offset=start,
            )
        return value

    def date_time(self, what: str = "timestamp (Date Time)") -> DateTime:
        start = self._pos
        raw = self.take(DATE_TIME_SIZE, what)
        value = DateTime(int.from_bytes(raw[0:2], "little"), raw[2], raw[3], raw[4], raw[5], raw[6])
        problem = date_time_problem(value)
        if problem:
            raise self.fail(f"a valid {what}", problem, offset=start)
        return value

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        """Refuse trailing bytes: they mean a layout this parser does not know."""
        if self.remaining:
            raise self.fail("the end of the value", f"{_bytes(self.remaining)} more")


def enum_or_int(enum: type[E], value: int) -> E | int:
    """The enum member for `value`, or the plain int for codes the spec reserves (kept, never guessed)."""
    try:
        return enum(value)
    except ValueError:
        return value


class Writer:
    """Writes fields in order for one characteristic value, checking each against its range."""

    def __init__(self, characteristic: str) -> None:
        self.characteristic = characteristic
        self._out = bytearray()

    def fail(self, field: str, problem: str) -> GattEncodeError:
        return GattEncodeError(self.characteristic, field, problem)

    def check(self, value: int, low: int, high: int, field: str) -> None:
        """Refuse anything but an integer in low…high (bools included: True is not a count)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"expected an integer, got {type(value).__name__} {value!r}")
        if not low <= value <= high:
            raise self.fail(field, f"{value} outside {low}…{high}")

    def uint(self, value: int, size: int, field: str) -> None:
        self.check(value, 0, (1 << (8 * size)) - 1, field)
        self._out += value.to_bytes(size, "little")

    def u8(self, value: int, field: str) -> None:
        self.uint(value, 1, field)

    def u16(self, value: int, field: str) -> None:
        self.uint(value, 2, field)

    def u24(self, value: int, field: str) -> None:
        self.uint(value, 3, field)

    def u32(self, value: int, field: str) -> None:
        self.uint(value, 4, field)

    def s16(self, value: int, field: str) -> None:
        self.check(value, -0x8000, 0x7FFF, field)
        self._out += value.to_bytes(2, "little", signed=True)

    def sfloat(self, value: Number11073, field: str) -> None:
        try:
            self.u16(encode_sfloat(value), field)
        except GattEncodeError as exc:
            raise self.fail(field, exc.problem) from None

    def float32(self, value: Number11073, field: str) -> None:
        try:
            self.u32(encode_float(value), field)
        except GattEncodeError as exc:
            raise self.fail(field, exc.problem) from None

    def date_time(self, value: DateTime, field: str = "timestamp") -> None:
        if not isinstance(value, DateTime):
            raise self.fail(field, f"expected a DateTime, got {type(value).__name__}")
        problem = date_time_problem(value)
        if problem:
            raise self.fail(field, problem)
        self.u16(value.year, field)
        for part in (value.month, value.day, value.hours, value.minutes, value.seconds):
            self.u8(part, field)

    def raw(self, data: bytes) -> None:
        self._out += data

    def getvalue(self) -> bytes:
        return bytes(self._out)


def flag_bits(bits: Mapping[int, bool]) -> int:
    """Combine `{bit mask: set?}` into one flags value."""
    value = 0
    for mask, present in bits.items():
        if present:
            value |= mask
    return value


def parse_features16(data: bytes, characteristic: str, flags: type[F]) -> F:
    """A characteristic that is one uint16 bit field (reserved bits kept in the IntFlag as received)."""
    r = Reader(data, characteristic)
    value = flags(r.u16("features (uint16)"))
    r.end()
    return value


def encode_features16(value: int, characteristic: str) -> bytes:
    w = Writer(characteristic)
    w.u16(value, "features")
    return w.getvalue()
