"""The errors of the GATT codecs: one type per direction, all `ValueError`s, each naming what failed where."""

from __future__ import annotations


class GattError(ValueError):
    """Base class: a GATT value could not be parsed, encoded or turned into an event body."""


class GattParseError(GattError):
    """Bytes from a device do not follow the characteristic's layout (truncated, reserved flags, bad values).

    Names the characteristic, the byte offset where the problem is, what was expected there and what was
    found, e.g. `Heart Rate Measurement: byte 2: expected RR interval (2 bytes), got 1 byte`.
    """

    def __init__(self, characteristic: str, offset: int, expected: str, got: str | None = None) -> None:
        self.characteristic = characteristic
        self.offset = offset
        self.expected = expected
        self.got = got
        detail = f"expected {expected}" + (f", got {got}" if got else "")
        super().__init__(f"{characteristic}: byte {offset}: {detail}")


class GattEncodeError(GattError):
    """A value cannot be written in the characteristic's format (out of range, inexact, inconsistent)."""

    def __init__(self, characteristic: str, field: str, problem: str) -> None:
        self.characteristic = characteristic
        self.field = field
        self.problem = problem
        super().__init__(f"{characteristic}: {field}: {problem}")


class GattReadingError(GattError):
    """A well-formed measurement cannot become an event body: a required value is a special value
    (NaN, NRes, ±INF), is missing, or lies outside the body model's physiological range."""

    def __init__(self, characteristic: str, kind: str, problem: str) -> None:
        self.characteristic = characteristic
        self.kind = kind
        self.problem = problem
        super().__init__(f"{characteristic}: cannot make a {kind!r} event: {problem}")
