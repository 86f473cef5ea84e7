"""Health Thermometer Service: Temperature Measurement (0x2A1C) and Temperature Type (0x2A1D).

Temperature Measurement flags (uint8): bit 0 unit (0 °C, 1 °F); bit 1 Time Stamp present (Date Time);
bit 2 Temperature Type present (uint8); bits 3-7 reserved. The temperature is an IEEE 11073 FLOAT.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from edge_agent.gatt._codec import Reader, Writer, enum_or_int, flag_bits
from edge_agent.gatt.date_time import DateTime
from edge_agent.gatt.ieee11073 import Number11073

CHARACTERISTIC = "Temperature Measurement"
UUID = 0x2A1C
TYPE_CHARACTERISTIC = "Temperature Type"
TYPE_UUID = 0x2A1D

_FAHRENHEIT = 0x01
_TIMESTAMP = 0x02
_TYPE = 0x04
_KNOWN = 0x07


class TemperatureUnit(IntEnum):
    CELSIUS = 0
    FAHRENHEIT = 1


class TemperatureType(IntEnum):
    """Where the temperature was taken (0 and 10-255 are reserved: decoded as plain ints)."""

    ARMPIT = 1
    BODY = 2  # general
    EAR = 3  # usually earlobe
    FINGER = 4
    GASTROINTESTINAL_TRACT = 5
    MOUTH = 6
    RECTUM = 7
    TOE = 8
    TYMPANUM = 9  # ear drum


@dataclass(frozen=True, kw_only=True)
class TemperatureMeasurement:
    """One Temperature Measurement indication."""

    value: Number11073
    unit: TemperatureUnit = TemperatureUnit.CELSIUS
    timestamp: DateTime | None = None
    temperature_type: TemperatureType | int | None = None


def parse_temperature_measurement(data: bytes) -> TemperatureMeasurement:
    """Bytes of a 0x2A1C value → `TemperatureMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, CHARACTERISTIC)
    flags = r.flags(_KNOWN)
    value = r.float32("temperature")
    timestamp = r.date_time() if flags & _TIMESTAMP else None
    kind = enum_or_int(TemperatureType, r.u8("temperature type (uint8)")) if flags & _TYPE else None
    r.end()
    unit = TemperatureUnit.FAHRENHEIT if flags & _FAHRENHEIT else TemperatureUnit.CELSIUS
    return TemperatureMeasurement(value=value, unit=unit, timestamp=timestamp, temperature_type=kind)


def encode_temperature_measurement(m: TemperatureMeasurement) -> bytes:
    """`TemperatureMeasurement` → bytes."""
    w = Writer(CHARACTERISTIC)
    if m.unit not in (TemperatureUnit.CELSIUS, TemperatureUnit.FAHRENHEIT):
        raise w.fail("unit", f"expected a TemperatureUnit, got {m.unit!r}")
    flags = flag_bits(
        {
            _FAHRENHEIT: m.unit == TemperatureUnit.FAHRENHEIT,
            _TIMESTAMP: m.timestamp is not None,
            _TYPE: m.temperature_type is not None,
        }
    )
    w.u8(flags, "flags")
    w.float32(m.value, "value")
    if m.timestamp is not None:
        w.date_time(m.timestamp)
    if m.temperature_type is not None:
        w.u8(m.temperature_type, "temperature_type")
    return w.getvalue()


def parse_temperature_type(data: bytes) -> TemperatureType | int:
    """Bytes of a 0x2A1D value → the `TemperatureType` (a plain int for reserved codes)."""
    r = Reader(data, TYPE_CHARACTERISTIC)
    kind = enum_or_int(TemperatureType, r.u8("temperature type (uint8)"))
    r.end()
    return kind


def encode_temperature_type(kind: TemperatureType | int) -> bytes:
    """A `TemperatureType` → the 1-byte 0x2A1D value."""
    w = Writer(TYPE_CHARACTERISTIC)
    w.u8(kind, "temperature_type")
    return w.getvalue()
