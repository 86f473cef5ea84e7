"""Weight Scale Service: Weight Measurement (0x2A9D) and Weight Scale Feature (0x2A9E).

Measurement flags (uint8): bit 0 units (0 SI, 1 imperial); bit 1 Time Stamp present; bit 2 User ID
present (uint8, 255 = unknown user); bit 3 BMI and Height present; bits 4-7 reserved. Fields: Weight
(uint16: 0.005 kg SI, 0.01 lb imperial; 0xFFFF = measurement unsuccessful), Time Stamp (Date Time), User
ID, BMI (uint16, 0.1 kg/m²), Height (uint16: 0.001 m SI, 0.1 in imperial).

Values are exact `Decimal`s in the unit system's own unit (kg and m, or lb and in); the encoder refuses a
value that is not a whole multiple of the field's resolution rather than rounding it silently.

Weight Scale Feature (uint32): bit 0 Time Stamp supported, bit 1 Multiple Users supported, bit 2 BMI
supported, bits 3-6 weight resolution, bits 7-9 height resolution, bits 10-31 reserved (kept). The
resolutions say how precise the scale is; the Weight Measurement encoding above does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import IntEnum

from edge_agent.gatt._codec import Reader, Writer, enum_or_int, flag_bits
from edge_agent.gatt.date_time import DateTime

CHARACTERISTIC = "Weight Measurement"
UUID = 0x2A9D
FEATURE_CHARACTERISTIC = "Weight Scale Feature"
FEATURE_UUID = 0x2A9E

UNKNOWN_USER = 0xFF
_UNSUCCESSFUL = 0xFFFF


class MeasurementSystem(IntEnum):
    SI = 0  # kg, m
    IMPERIAL = 1  # lb, in


WEIGHT_RESOLUTION = {MeasurementSystem.SI: Decimal("0.005"), MeasurementSystem.IMPERIAL: Decimal("0.01")}
HEIGHT_RESOLUTION = {MeasurementSystem.SI: Decimal("0.001"), MeasurementSystem.IMPERIAL: Decimal("0.1")}
BMI_RESOLUTION = Decimal("0.1")


@dataclass(frozen=True, kw_only=True)
class WeightMeasurement:
    """One Weight Measurement indication, in `units` (kg and m, or lb and in)."""

    weight: Decimal | None  # None: the scale reported "measurement unsuccessful" (0xFFFF)
    units: MeasurementSystem = MeasurementSystem.SI
    timestamp: DateTime | None = None
    user_id: int | None = None  # 255: unknown user
    bmi: Decimal | None = None  # kg/m²; given together with height
    height: Decimal | None = None  # m (SI) or in (imperial)


def parse_weight_measurement(data: bytes) -> WeightMeasurement:
    """Bytes of a 0x2A9D value → `WeightMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, CHARACTERISTIC)
    flags = r.flags(0x0F)
    units = MeasurementSystem.IMPERIAL if flags & 0x01 else MeasurementSystem.SI
    raw_weight = r.u16("weight (uint16)")
    weight = None if raw_weight == _UNSUCCESSFUL else raw_weight * WEIGHT_RESOLUTION[units]
    timestamp = r.date_time() if flags & 0x02 else None
    user = r.u8("user ID (uint8)") if flags & 0x04 else None
    bmi = height = None
    if flags & 0x08:
        bmi = r.u16("BMI (uint16, 0.1 kg/m²)") * BMI_RESOLUTION
        height = r.u16("height (uint16)") * HEIGHT_RESOLUTION[units]
    r.end()
    return WeightMeasurement(weight=weight, units=units, timestamp=timestamp, user_id=user, bmi=bmi, height=height)


def _counts(w: Writer, value: Decimal | int | float | str, resolution: Decimal, field: str, top: int) -> int:
    """`value` as a whole number of `resolution` steps; refuse anything inexact or out of range."""
    try:
        exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (ArithmeticError, TypeError, ValueError):
        raise w.fail(field, f"expected a decimal number, got {value!r}") from None
    if isinstance(value, bool) or not exact.is_finite():
        raise w.fail(field, f"expected a decimal number, got {value!r}")
    steps = exact / resolution
    if steps != steps.to_integral_value():
        raise w.fail(field, f"{value} is not a multiple of the resolution {resolution}; round it first")
    if not 0 <= steps <= top:
        raise w.fail(field, f"{value} outside 0…{top * resolution}")
    return int(steps)


def encode_weight_measurement(m: WeightMeasurement) -> bytes:
    """`WeightMeasurement` → bytes; BMI and height must be given together."""
    w = Writer(CHARACTERISTIC)
    if m.units not in (MeasurementSystem.SI, MeasurementSystem.IMPERIAL):
        raise w.fail("units", f"expected a MeasurementSystem, got {m.units!r}")
    if (m.bmi is None) != (m.height is None):
        raise w.fail("bmi", "BMI and height are one field pair: give both or neither")
    flags = flag_bits(
        {
            0x01: m.units == MeasurementSystem.IMPERIAL,
            0x02: m.timestamp is not None,
            0x04: m.user_id is not None,
            0x08: m.bmi is not None,
        }
    )
    w.u8(flags, "flags")
    if m.weight is None:
        w.u16(_UNSUCCESSFUL, "weight")
    else:
        w.u16(_counts(w, m.weight, WEIGHT_RESOLUTION[m.units], "weight", _UNSUCCESSFUL - 1), "weight")
    if m.timestamp is not None:
        w.date_time(m.timestamp)
    if m.user_id is not None:
        w.u8(m.user_id, "user_id")
    if m.bmi is not None and m.height is not None:
        w.u16(_counts(w, m.bmi, BMI_RESOLUTION, "bmi", 0xFFFF), "bmi")
        w.u16(_counts(w, m.height, HEIGHT_RESOLUTION[m.units], "height", 0xFFFF), "height")
    return w.getvalue()


class WeightResolution(IntEnum):
    """Weight resolution of a scale (bits 3-6 of the feature); 8-15 are reserved (decoded as ints)."""

    NOT_SPECIFIED = 0
    KG_0_5_OR_LB_1 = 1
    KG_0_2_OR_LB_0_5 = 2
    KG_0_1_OR_LB_0_2 = 3
    KG_0_05_OR_LB_0_1 = 4
    KG_0_02_OR_LB_0_05 = 5
    KG_0_01_OR_LB_0_02 = 6
    KG_0_005_OR_LB_0_01 = 7


class HeightResolution(IntEnum):
    """Height resolution of a scale (bits 7-9 of the feature); 4-7 are reserved (decoded as ints)."""

    NOT_SPECIFIED = 0
    M_0_01_OR_IN_1 = 1
    M_0_005_OR_IN_0_5 = 2
    M_0_001_OR_IN_0_1 = 3


@dataclass(frozen=True, kw_only=True)
class WeightScaleFeature:
    """Weight Scale Feature (0x2A9E)."""

    timestamp_supported: bool = False
    multiple_users_supported: bool = False
    bmi_supported: bool = False
    weight_resolution: WeightResolution | int = WeightResolution.NOT_SPECIFIED
    height_resolution: HeightResolution | int = HeightResolution.NOT_SPECIFIED
    reserved_bits: int = 0  # bits 10-31 as received


def parse_weight_scale_feature(data: bytes) -> WeightScaleFeature:
    """Bytes of a 0x2A9E value → `WeightScaleFeature`."""
    r = Reader(data, FEATURE_CHARACTERISTIC)
    bits = r.u32("features (uint32)")
    r.end()
    return WeightScaleFeature(
        timestamp_supported=bool(bits & 0x01),
        multiple_users_supported=bool(bits & 0x02),
        bmi_supported=bool(bits & 0x04),
        weight_resolution=enum_or_int(WeightResolution, (bits >> 3) & 0x0F),
        height_resolution=enum_or_int(HeightResolution, (bits >> 7) & 0x07),
        reserved_bits=bits & ~0x3FF,
    )


def encode_weight_scale_feature(f: WeightScaleFeature) -> bytes:
    """`WeightScaleFeature` → the 4-byte 0x2A9E value."""
    w = Writer(FEATURE_CHARACTERISTIC)
    for field, value, top in (
        ("weight_resolution", f.weight_resolution, 15),
        ("height_resolution", f.height_resolution, 7),
    ):
        w.check(value, 0, top, field)
    if not isinstance(f.reserved_bits, int) or f.reserved_bits & 0x3FF or not 0 <= f.reserved_bits <= 0xFFFFFFFF:
        raise w.fail("reserved_bits", f"{f.reserved_bits!r} must only use bits 10-31")
    bits = flag_bits({0x01: f.timestamp_supported, 0x02: f.multiple_users_supported, 0x04: f.bmi_supported})
    w.u32(bits | (f.weight_resolution << 3) | (f.height_resolution << 7) | f.reserved_bits, "features")
    return w.getvalue()
