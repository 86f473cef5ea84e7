"""Blood Pressure Service: Blood Pressure Measurement (0x2A35) and Blood Pressure Feature (0x2A49).

Measurement flags (uint8): bit 0 unit (0 mmHg, 1 kPa); bit 1 Time Stamp present; bit 2 Pulse Rate present
(SFLOAT, beats/min); bit 3 User ID present (uint8, 255 = unknown user); bit 4 Measurement Status present
(uint16); bits 5-7 reserved. Systolic, diastolic and mean arterial pressure are always present as SFLOATs;
a device that cannot give one of them sends NaN.

Measurement Status (uint16): bit 0 body movement detected, bit 1 cuff fit too loose, bit 2 irregular pulse
detected, bits 3-4 pulse rate range (0 within range, 1 exceeds upper limit, 2 below lower limit,
3 reserved), bit 5 improper measurement position, bits 6-15 reserved (kept in `reserved_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from edge_agent.gatt._codec import Reader, Writer, encode_features16, enum_or_int, flag_bits, parse_features16
from edge_agent.gatt.date_time import DateTime
from edge_agent.gatt.ieee11073 import Number11073

CHARACTERISTIC = "Blood Pressure Measurement"
UUID = 0x2A35
FEATURE_CHARACTERISTIC = "Blood Pressure Feature"
FEATURE_UUID = 0x2A49

_KPA = 0x01
_TIMESTAMP = 0x02
_PULSE = 0x04
_USER = 0x08
_STATUS = 0x10
_KNOWN = 0x1F

UNKNOWN_USER = 0xFF


class BloodPressureUnit(IntEnum):
    MMHG = 0
    KPA = 1


class PulseRateRange(IntEnum):
    WITHIN_RANGE = 0
    EXCEEDS_UPPER_LIMIT = 1
    BELOW_LOWER_LIMIT = 2  # 3 is reserved: decoded as the plain int 3


@dataclass(frozen=True, kw_only=True)
class BloodPressureStatus:
    """The Measurement Status field, bit by bit."""

    body_movement_detected: bool = False
    cuff_too_loose: bool = False
    irregular_pulse_detected: bool = False
    pulse_rate_range: PulseRateRange | int = PulseRateRange.WITHIN_RANGE
    improper_measurement_position: bool = False
    reserved_bits: int = 0  # bits 6-15 exactly as received (bits 0-5 always clear here)

    @classmethod
    def from_bits(cls, bits: int) -> BloodPressureStatus:
        return cls(
            body_movement_detected=bool(bits & 0x01),
            cuff_too_loose=bool(bits & 0x02),
            irregular_pulse_detected=bool(bits & 0x04),
            pulse_rate_range=enum_or_int(PulseRateRange, (bits >> 3) & 0x03),
            improper_measurement_position=bool(bits & 0x20),
            reserved_bits=bits & ~0x3F,
        )

    def to_bits(self) -> int:
        bits = flag_bits(
            {
                0x01: self.body_movement_detected,
                0x02: self.cuff_too_loose,
                0x04: self.irregular_pulse_detected,
                0x20: self.improper_measurement_position,
            }
        )
        return bits | (int(self.pulse_rate_range) << 3) | self.reserved_bits


@dataclass(frozen=True, kw_only=True)
class BloodPressureMeasurement:
    """One Blood Pressure Measurement indication (pressures in `unit`)."""

    systolic: Number11073
    diastolic: Number11073
    mean_arterial_pressure: Number11073
    unit: BloodPressureUnit = BloodPressureUnit.MMHG
    timestamp: DateTime | None = None
    pulse_rate: Number11073 | None = None  # beats per minute
    user_id: int | None = None  # 255: unknown user
    status: BloodPressureStatus | None = None


def parse_blood_pressure_measurement(data: bytes) -> BloodPressureMeasurement:
    """Bytes of a 0x2A35 value → `BloodPressureMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, CHARACTERISTIC)
    flags = r.flags(_KNOWN)
    systolic = r.sfloat("systolic")
    diastolic = r.sfloat("diastolic")
    mean = r.sfloat("mean arterial pressure")
    timestamp = r.date_time() if flags & _TIMESTAMP else None
    pulse = r.sfloat("pulse rate") if flags & _PULSE else None
    user = r.u8("user ID (uint8)") if flags & _USER else None
    status = BloodPressureStatus.from_bits(r.u16("measurement status (uint16)")) if flags & _STATUS else None
    r.end()
    return BloodPressureMeasurement(
        systolic=systolic,
        diastolic=diastolic,
        mean_arterial_pressure=mean,
        unit=BloodPressureUnit.KPA if flags & _KPA else BloodPressureUnit.MMHG,
        timestamp=timestamp,
        pulse_rate=pulse,
        user_id=user,
        status=status,
    )


def encode_blood_pressure_measurement(m: BloodPressureMeasurement) -> bytes:
    """`BloodPressureMeasurement` → bytes."""
    w = Writer(CHARACTERISTIC)
    if m.unit not in (BloodPressureUnit.MMHG, BloodPressureUnit.KPA):
        raise w.fail("unit", f"expected a BloodPressureUnit, got {m.unit!r}")
    flags = flag_bits(
        {
            _KPA: m.unit == BloodPressureUnit.KPA,
            _TIMESTAMP: m.timestamp is not None,
            _PULSE: m.pulse_rate is not None,
            _USER: m.user_id is not None,
            _STATUS: m.status is not None,
        }
    )
    w.u8(flags, "flags")
    w.sfloat(m.systolic, "systolic")
    w.sfloat(m.diastolic, "diastolic")
    w.sfloat(m.mean_arterial_pressure, "mean_arterial_pressure")
    if m.timestamp is not None:
        w.date_time(m.timestamp)
    if m.pulse_rate is not None:
        w.sfloat(m.pulse_rate, "pulse_rate")
    if m.user_id is not None:
        w.u8(m.user_id, "user_id")
    if m.status is not None:
        s = m.status
        if not 0 <= int(s.pulse_rate_range) <= 3:
            raise w.fail("status.pulse_rate_range", f"{s.pulse_rate_range} outside 0…3")
        if s.reserved_bits & 0x3F or not 0 <= s.reserved_bits <= 0xFFFF:
            raise w.fail("status.reserved_bits", f"0x{s.reserved_bits:X} must only use bits 6-15")
        w.u16(s.to_bits(), "status")
    return w.getvalue()


class BloodPressureFeature(IntFlag):
    """Blood Pressure Feature (0x2A49, uint16). Reserved bits are kept in the value as received."""

    BODY_MOVEMENT_DETECTION = 0x0001
    CUFF_FIT_DETECTION = 0x0002
    IRREGULAR_PULSE_DETECTION = 0x0004
    PULSE_RATE_RANGE_DETECTION = 0x0008
    MEASUREMENT_POSITION_DETECTION = 0x0010
    MULTIPLE_BONDS = 0x0020


def parse_blood_pressure_feature(data: bytes) -> BloodPressureFeature:
    """Bytes of a 0x2A49 value → `BloodPressureFeature` flags."""
    return parse_features16(data, FEATURE_CHARACTERISTIC, BloodPressureFeature)


def encode_blood_pressure_feature(features: BloodPressureFeature) -> bytes:
    """`BloodPressureFeature` flags → the 2-byte 0x2A49 value."""
    return encode_features16(features, FEATURE_CHARACTERISTIC)
