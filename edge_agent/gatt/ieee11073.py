"""IEEE 11073-20601 numbers as Bluetooth health profiles carry them: 16-bit SFLOAT and 32-bit FLOAT.

Both are decimal floating point: value = mantissa × 10**exponent, little-endian on the wire.

| type   | bits | exponent (signed, high bits) | mantissa (signed, low bits) |
|--------|------|------------------------------|-----------------------------|
| SFLOAT | 16   | 4 bits: -8 … 7               | 12 bits: -2048 … 2047       |
| FLOAT  | 32   | 8 bits: -128 … 127           | 24 bits: -8388608 … 8388607 |

Five codes with exponent 0 are not numbers (11073-20601 §F.8): NaN (mantissa 2**(n-1)-1), NRes ("not
at this resolution", -2**(n-1)), +INF (2**(n-1)-2), -INF (-(2**(n-1)-2)) and one reserved code
(-(2**(n-1)-1)). They decode to a `Special` member, never to a float, so no NaN can slip into arithmetic
or an event body unnoticed; `edge_agent.gatt.readings` refuses them for required fields.

A number decodes to `Float11073(mantissa, exponent)`, which keeps the device's own representation
(120 and 1200e-1 differ as values of this type, not as numbers) so that encode(decode(x)) == x for every
code. `Float11073.to_decimal()` gives the exact value; `float()` the nearest double.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from functools import cached_property
from typing import Literal

from edge_agent.gatt.errors import GattEncodeError


class Special(Enum):
    """An IEEE 11073 special value: what a device sends instead of a number."""

    NAN = "NaN"  # no valid value (e.g. measurement failed or not yet available)
    NRES = "NRes"  # a value exists but cannot be shown at this resolution
    POSITIVE_INFINITY = "+INF"  # above the device's measuring range
    NEGATIVE_INFINITY = "-INF"  # below the device's measuring range
    RESERVED = "reserved"  # reserved for future use by 11073-20601

    def describe(self) -> str:
        return _SPECIAL_MEANING[self]


_SPECIAL_MEANING = {
    Special.NAN: "NaN (the device has no valid value)",
    Special.NRES: "NRes (the value is not representable at this resolution)",
    Special.POSITIVE_INFINITY: "+INF (above the device's measuring range)",
    Special.NEGATIVE_INFINITY: "-INF (below the device's measuring range)",
    Special.RESERVED: "a reserved 11073 special code",
}


@dataclass(frozen=True, slots=True)
class Float11073:
    """An IEEE 11073 decimal number: exactly `mantissa × 10**exponent`."""

    mantissa: int
    exponent: int

    def to_decimal(self) -> Decimal:
        """The exact value (a Decimal built from the digits, no rounding)."""
        digits = tuple(int(d) for d in str(abs(self.mantissa)))
        return Decimal((1 if self.mantissa < 0 else 0, digits, self.exponent))

    def __float__(self) -> float:
        return float(self.to_decimal())

    def __str__(self) -> str:
        return str(self.to_decimal())

    @classmethod
    def from_number(cls, value: Decimal | int | str | float, *, bits: Literal[16, 32] = 16) -> Float11073:
        """The exact SFLOAT (`bits=16`) or FLOAT (`bits=32`) representation of `value`.

        Keeps the value's own decimal places where they fit (`"36.60"` → 3660e-2, `36.6` → 366e-1) and
        drops trailing zeros only when it must. Raises `GattEncodeError` if the value has no exact
        representation (too many significant digits, or out of range): round it first. A float is read as
        its shortest repr (`0.1` means 0.1); NaN and infinities are refused — use `Special` instead.
        """
        name = _FORMATS[bits].name
        if isinstance(value, bool) or not isinstance(value, Decimal | int | str | float):
            raise TypeError(f"{name}: expected a Decimal, int, str or float, got {type(value).__name__}")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise GattEncodeError(name, "value", f"{value} is not a number; use Special for NaN/INF")
            value = repr(value)
        try:
            dec = Decimal(value)
        except ArithmeticError:
            raise GattEncodeError(name, "value", f"{value!r} is not a decimal number") from None
        if not dec.is_finite():
            raise GattEncodeError(name, "value", f"{value} is not a number; use Special for NaN/INF")
        sign, digits, exponent = dec.as_tuple()
        assert isinstance(exponent, int)  # finite
        mantissa = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
        fmt = _FORMATS[bits]
        while exponent > fmt.max_exponent and abs(mantissa) <= fmt.max_mantissa:
            mantissa, exponent = mantissa * 10, exponent - 1
        while (exponent < fmt.min_exponent or not fmt.fits(mantissa, exponent)) and mantissa % 10 == 0:
            if mantissa == 0:
                exponent = 0
                break
            if exponent >= fmt.max_exponent:
                break
            mantissa, exponent = mantissa // 10, exponent + 1
        number = cls(mantissa, exponent)
        problem = fmt.problem(number)
        if problem:
            raise GattEncodeError(name, "value", f"{value} cannot be written exactly ({problem}); round it first")
        return number


Number11073 = Float11073 | Special
"""What an SFLOAT or FLOAT field decodes to: a number, or the special value the device sent."""


@dataclass(frozen=True)
class _Format:
    name: str
    bits: int
    mantissa_bits: int
    specials: dict[int, Special]

    @property
    def exponent_bits(self) -> int:
        return self.bits - self.mantissa_bits

    @property
    def max_mantissa(self) -> int:
        return (1 << (self.mantissa_bits - 1)) - 1

    @property
    def min_mantissa(self) -> int:
        return -(1 << (self.mantissa_bits - 1))

    @property
    def max_exponent(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def min_exponent(self) -> int:
        return -(1 << (self.exponent_bits - 1))

    def fits(self, mantissa: int, exponent: int) -> bool:
        return self.problem(Float11073(mantissa, exponent)) is None

    def problem(self, number: Float11073) -> str | None:
        m, e = number.mantissa, number.exponent
        if isinstance(m, bool) or isinstance(e, bool) or not isinstance(m, int) or not isinstance(e, int):
            return "mantissa and exponent must be integers"
        if not self.min_mantissa <= m <= self.max_mantissa:
            return f"mantissa {m} outside {self.min_mantissa}…{self.max_mantissa}"
        if not self.min_exponent <= e <= self.max_exponent:
            return f"exponent {e} outside {self.min_exponent}…{self.max_exponent}"
        if e == 0 and (m & self.mantissa_mask) in self.specials:
            return f"mantissa {m} with exponent 0 is the code of {self.specials[m & self.mantissa_mask].value}"
        return None

    @property
    def mantissa_mask(self) -> int:
        return (1 << self.mantissa_bits) - 1

    def decode(self, raw: int) -> Number11073:
        if raw in self.specials:  # the specials are the whole word: exponent 0
            return self.specials[raw]
        mantissa = raw & self.mantissa_mask
        if mantissa > self.max_mantissa:
            mantissa -= 1 << self.mantissa_bits
        exponent = raw >> self.mantissa_bits
        if exponent > self.max_exponent:
            exponent -= 1 << self.exponent_bits
        return Float11073(mantissa, exponent)

    def encode(self, value: Number11073) -> int:
        if isinstance(value, Special):
            return self.codes[value]
        if not isinstance(value, Float11073):
            raise GattEncodeError(
                self.name, "value", f"expected Float11073 or Special, got {type(value).__name__} {value!r}"
            )
        problem = self.problem(value)
        if problem:
            raise GattEncodeError(self.name, "value", problem)
        exponent_field = value.exponent & ((1 << self.exponent_bits) - 1)
        return (exponent_field << self.mantissa_bits) | (value.mantissa & self.mantissa_mask)

    @cached_property
    def codes(self) -> dict[Special, int]:
        return {special: code for code, special in self.specials.items()}


_SFLOAT = _Format(
    "SFLOAT",
    16,
    12,
    {
        0x07FF: Special.NAN,
        0x0800: Special.NRES,
        0x07FE: Special.POSITIVE_INFINITY,
        0x0802: Special.NEGATIVE_INFINITY,
        0x0801: Special.RESERVED,
    },
)
_FLOAT = _Format(
    "FLOAT",
    32,
    24,
    {
        0x007FFFFF: Special.NAN,
        0x00800000: Special.NRES,
        0x007FFFFE: Special.POSITIVE_INFINITY,
        0x00800002: Special.NEGATIVE_INFINITY,
        0x00800001: Special.RESERVED,
    },
)
_FORMATS = {16: _SFLOAT, 32: _FLOAT}


def decode_sfloat(raw: int) -> Number11073:
    """A 16-bit SFLOAT word (already read little-endian as an unsigned int) → number or special value."""
    if not 0 <= raw <= 0xFFFF:
        raise ValueError(f"SFLOAT: {raw} is not a 16-bit word")
    return _SFLOAT.decode(raw)


def encode_sfloat(value: Number11073) -> int:
    """A number or special value → the 16-bit SFLOAT word; `GattEncodeError` if it does not fit."""
    return _SFLOAT.encode(value)


def decode_float(raw: int) -> Number11073:
    """A 32-bit FLOAT word (already read little-endian as an unsigned int) → number or special value."""
    if not 0 <= raw <= 0xFFFFFFFF:
        raise ValueError(f"FLOAT: {raw} is not a 32-bit word")
    return _FLOAT.decode(raw)


def encode_float(value: Number11073) -> int:
    """A number or special value → the 32-bit FLOAT word; `GattEncodeError` if it does not fit."""
    return _FLOAT.encode(value)


def sfloat(value: Decimal | int | str | float) -> Float11073:
    """Shorthand for `Float11073.from_number(value, bits=16)`, for building measurements to encode."""
    return Float11073.from_number(value, bits=16)


def float32(value: Decimal | int | str | float) -> Float11073:
    """Shorthand for `Float11073.from_number(value, bits=32)`, for building measurements to encode."""
    return Float11073.from_number(value, bits=32)
