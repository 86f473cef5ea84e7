"""Glucose Service: Glucose Measurement (0x2A18), Glucose Measurement Context (0x2A34), Glucose Feature
(0x2A51). The Record Access Control Point that fetches stored records is in `record_access`.

Measurement flags (uint8): bit 0 Time Offset present (sint16, minutes); bit 1 Glucose Concentration, Type
and Sample Location present; bit 2 concentration unit (0 kg/L, 1 mol/L); bit 3 Sensor Status Annunciation
present (uint16); bit 4 Context Information follows (a 0x2A34 with the same sequence number comes next);
bits 5-7 reserved. Fields: Sequence Number (uint16), Base Time (Date Time), Time Offset, Concentration
(SFLOAT), Type-Sample Location (uint8: type in the low nibble, sample location in the high nibble),
Sensor Status Annunciation. The measurement time is Base Time + Time Offset.

Context flags (uint8): bit 0 Carbohydrate ID and Carbohydrate (SFLOAT, kg); bit 1 Meal; bit 2
Tester-Health (tester low nibble, health high nibble); bit 3 Exercise Duration (uint16 s, 65535 = overrun)
and Exercise Intensity (uint8 %); bit 4 Medication ID and Medication (SFLOAT); bit 5 medication unit
(0 kg, 1 litre); bit 6 HbA1c (SFLOAT, %); bit 7 Extended Flags present (uint8, all reserved: kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum, IntFlag

from edge_agent.gatt._codec import Reader, Writer, encode_features16, enum_or_int, flag_bits, parse_features16
from edge_agent.gatt.date_time import DateTime
from edge_agent.gatt.ieee11073 import Number11073

MEASUREMENT_CHARACTERISTIC = "Glucose Measurement"
MEASUREMENT_UUID = 0x2A18
CONTEXT_CHARACTERISTIC = "Glucose Measurement Context"
CONTEXT_UUID = 0x2A34
FEATURE_CHARACTERISTIC = "Glucose Feature"
FEATURE_UUID = 0x2A51


class GlucoseConcentrationUnit(IntEnum):
    KG_PER_L = 0
    MOL_PER_L = 1


class GlucoseType(IntEnum):
    """Sample type (low nibble); 0 and 11-15 are reserved and decode as plain ints."""

    CAPILLARY_WHOLE_BLOOD = 1
    CAPILLARY_PLASMA = 2
    VENOUS_WHOLE_BLOOD = 3
    VENOUS_PLASMA = 4
    ARTERIAL_WHOLE_BLOOD = 5
    ARTERIAL_PLASMA = 6
    UNDETERMINED_WHOLE_BLOOD = 7
    UNDETERMINED_PLASMA = 8
    INTERSTITIAL_FLUID = 9
    CONTROL_SOLUTION = 10


class SampleLocation(IntEnum):
    """Sample location (high nibble); 0 and 5-14 are reserved and decode as plain ints."""

    FINGER = 1
    ALTERNATE_SITE_TEST = 2
    EARLOBE = 3
    CONTROL_SOLUTION = 4
    NOT_AVAILABLE = 15


class GlucoseSensorStatus(IntFlag):
    """Sensor Status Annunciation (uint16); bits 12-15 are reserved (kept as received)."""

    DEVICE_BATTERY_LOW = 1 << 0
    SENSOR_MALFUNCTION = 1 << 1
    SAMPLE_SIZE_INSUFFICIENT = 1 << 2
    STRIP_INSERTION_ERROR = 1 << 3
    STRIP_TYPE_INCORRECT = 1 << 4
    RESULT_HIGHER_THAN_DEVICE_CAN_PROCESS = 1 << 5
    RESULT_LOWER_THAN_DEVICE_CAN_PROCESS = 1 << 6
    SENSOR_TEMPERATURE_TOO_HIGH = 1 << 7
    SENSOR_TEMPERATURE_TOO_LOW = 1 << 8
    SENSOR_READ_INTERRUPTED = 1 << 9  # strip pulled too soon
    GENERAL_DEVICE_FAULT = 1 << 10
    TIME_FAULT = 1 << 11  # the time may be inaccurate


@dataclass(frozen=True, kw_only=True)
class GlucoseConcentration:
    """The concentration with its unit and the sample's type and location (one flag covers all four)."""

    value: Number11073
    unit: GlucoseConcentrationUnit = GlucoseConcentrationUnit.KG_PER_L
    type: GlucoseType | int = GlucoseType.CAPILLARY_WHOLE_BLOOD
    sample_location: SampleLocation | int = SampleLocation.FINGER


@dataclass(frozen=True, kw_only=True)
class GlucoseMeasurement:
    """One Glucose Measurement record."""

    sequence_number: int
    base_time: DateTime
    time_offset_minutes: int | None = None
    concentration: GlucoseConcentration | None = None
    sensor_status: GlucoseSensorStatus | None = None
    context_follows: bool = False

    def measured_at(self) -> datetime | None:
        """Base Time + Time Offset (device-local), or None when the base date is not fully known."""
        base = self.base_time.to_datetime()
        if base is None:
            return None
        return base + timedelta(minutes=self.time_offset_minutes or 0)


def parse_glucose_measurement(data: bytes) -> GlucoseMeasurement:
    """Bytes of a 0x2A18 value → `GlucoseMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, MEASUREMENT_CHARACTERISTIC)
    flags = r.flags(0x1F)
    sequence = r.u16("sequence number (uint16)")
    base_time = r.date_time("base time (Date Time)")
    offset = r.s16("time offset (sint16, minutes)") if flags & 0x01 else None
    concentration = None
    if flags & 0x02:
        value = r.sfloat("glucose concentration")
        type_location = r.u8("type and sample location (uint8)")
        concentration = GlucoseConcentration(
            value=value,
            unit=GlucoseConcentrationUnit.MOL_PER_L if flags & 0x04 else GlucoseConcentrationUnit.KG_PER_L,
            type=enum_or_int(GlucoseType, type_location & 0x0F),
            sample_location=enum_or_int(SampleLocation, type_location >> 4),
        )
    status = GlucoseSensorStatus(r.u16("sensor status annunciation (uint16)")) if flags & 0x08 else None
    r.end()
    return GlucoseMeasurement(
        sequence_number=sequence,
        base_time=base_time,
        time_offset_minutes=offset,
        concentration=concentration,
        sensor_status=status,
        context_follows=bool(flags & 0x10),
    )


def encode_glucose_measurement(m: GlucoseMeasurement) -> bytes:
    """`GlucoseMeasurement` → bytes."""
    w = Writer(MEASUREMENT_CHARACTERISTIC)
    c = m.concentration
    if c is not None and c.unit not in (GlucoseConcentrationUnit.KG_PER_L, GlucoseConcentrationUnit.MOL_PER_L):
        raise w.fail("concentration.unit", f"expected a GlucoseConcentrationUnit, got {c.unit!r}")
    flags = flag_bits(
        {
            0x01: m.time_offset_minutes is not None,
            0x02: c is not None,
            0x04: c is not None and c.unit == GlucoseConcentrationUnit.MOL_PER_L,
            0x08: m.sensor_status is not None,
            0x10: bool(m.context_follows),
        }
    )
    w.u8(flags, "flags")
    w.u16(m.sequence_number, "sequence_number")
    w.date_time(m.base_time, "base_time")
    if m.time_offset_minutes is not None:
        w.s16(m.time_offset_minutes, "time_offset_minutes")
    if c is not None:
        w.sfloat(c.value, "concentration.value")
        _check_nibble(w, c.type, "concentration.type")
        _check_nibble(w, c.sample_location, "concentration.sample_location")
        w.u8(c.type | (c.sample_location << 4), "concentration")
    if m.sensor_status is not None:
        w.u16(m.sensor_status, "sensor_status")
    return w.getvalue()


def _check_nibble(w: Writer, value: int, field: str) -> None:
    w.check(value, 0, 15, field)  # a 4-bit code


# -- context --------------------------------------------------------------------------------------------


class CarbohydrateId(IntEnum):
    BREAKFAST = 1
    LUNCH = 2
    DINNER = 3
    SNACK = 4
    DRINK = 5
    SUPPER = 6
    BRUNCH = 7


class Meal(IntEnum):
    PREPRANDIAL = 1  # before meal
    POSTPRANDIAL = 2  # after meal
    FASTING = 3
    CASUAL = 4  # snacks, drinks, etc.
    BEDTIME = 5


class GlucoseTester(IntEnum):
    SELF = 1
    HEALTH_CARE_PROFESSIONAL = 2
    LAB_TEST = 3
    NOT_AVAILABLE = 15


class GlucoseHealth(IntEnum):
    MINOR_HEALTH_ISSUES = 1
    MAJOR_HEALTH_ISSUES = 2
    DURING_MENSES = 3
    UNDER_STRESS = 4
    NO_HEALTH_ISSUES = 5
    NOT_AVAILABLE = 15


class MedicationId(IntEnum):
    RAPID_ACTING_INSULIN = 1
    SHORT_ACTING_INSULIN = 2
    INTERMEDIATE_ACTING_INSULIN = 3
    LONG_ACTING_INSULIN = 4
    PREMIXED_INSULIN = 5


class MedicationUnit(IntEnum):
    KILOGRAMS = 0
    LITERS = 1


@dataclass(frozen=True, kw_only=True)
class Carbohydrate:
    id: CarbohydrateId | int
    amount_kg: Number11073


@dataclass(frozen=True, kw_only=True)
class GlucoseTesterHealth:
    tester: GlucoseTester | int
    health: GlucoseHealth | int


@dataclass(frozen=True, kw_only=True)
class Exercise:
    duration_s: int  # 65535: overrun (at least that long)
    intensity_pct: int


@dataclass(frozen=True, kw_only=True)
class Medication:
    id: MedicationId | int
    amount: Number11073  # in `unit`
    unit: MedicationUnit = MedicationUnit.KILOGRAMS


@dataclass(frozen=True, kw_only=True)
class GlucoseMeasurementContext:
    """Context for the Glucose Measurement with the same `sequence_number`."""

    sequence_number: int
    extended_flags: int | None = None  # all bits reserved; kept as received
    carbohydrate: Carbohydrate | None = None
    meal: Meal | int | None = None
    tester_health: GlucoseTesterHealth | None = None
    exercise: Exercise | None = None
    medication: Medication | None = None
    hba1c_pct: Number11073 | None = None


def parse_glucose_measurement_context(data: bytes) -> GlucoseMeasurementContext:
    """Bytes of a 0x2A34 value → `GlucoseMeasurementContext`; `GattParseError` if malformed."""
    r = Reader(data, CONTEXT_CHARACTERISTIC)
    flags = r.u8("flags")  # all eight bits are defined
    sequence = r.u16("sequence number (uint16)")
    extended = r.u8("extended flags (uint8)") if flags & 0x80 else None
    carbohydrate = meal = tester_health = exercise = medication = hba1c = None
    if flags & 0x01:
        carb_id = enum_or_int(CarbohydrateId, r.u8("carbohydrate ID (uint8)"))
        carbohydrate = Carbohydrate(id=carb_id, amount_kg=r.sfloat("carbohydrate"))
    if flags & 0x02:
        meal = enum_or_int(Meal, r.u8("meal (uint8)"))
    if flags & 0x04:
        both = r.u8("tester-health (uint8)")
        tester = enum_or_int(GlucoseTester, both & 0x0F)
        tester_health = GlucoseTesterHealth(tester=tester, health=enum_or_int(GlucoseHealth, both >> 4))
    if flags & 0x08:
        duration = r.u16("exercise duration (uint16, s)")
        exercise = Exercise(duration_s=duration, intensity_pct=r.u8("exercise intensity (uint8, %)"))
    if flags & 0x10:
        med_id = enum_or_int(MedicationId, r.u8("medication ID (uint8)"))
        unit = MedicationUnit.LITERS if flags & 0x20 else MedicationUnit.KILOGRAMS
        medication = Medication(id=med_id, amount=r.sfloat("medication"), unit=unit)
    if flags & 0x40:
        hba1c = r.sfloat("HbA1c")
    r.end()
    return GlucoseMeasurementContext(
        sequence_number=sequence,
        extended_flags=extended,
        carbohydrate=carbohydrate,
        meal=meal,
        tester_health=tester_health,
        exercise=exercise,
        medication=medication,
        hba1c_pct=hba1c,
    )


def encode_glucose_measurement_context(c: GlucoseMeasurementContext) -> bytes:
    """`GlucoseMeasurementContext` → bytes."""
    w = Writer(CONTEXT_CHARACTERISTIC)
    if c.medication is not None and c.medication.unit not in (MedicationUnit.KILOGRAMS, MedicationUnit.LITERS):
        raise w.fail("medication.unit", f"expected a MedicationUnit, got {c.medication.unit!r}")
    flags = flag_bits(
        {
            0x01: c.carbohydrate is not None,
            0x02: c.meal is not None,
            0x04: c.tester_health is not None,
            0x08: c.exercise is not None,
            0x10: c.medication is not None,
            0x20: c.medication is not None and c.medication.unit == MedicationUnit.LITERS,
            0x40: c.hba1c_pct is not None,
            0x80: c.extended_flags is not None,
        }
    )
    w.u8(flags, "flags")
    w.u16(c.sequence_number, "sequence_number")
    if c.extended_flags is not None:
        w.u8(c.extended_flags, "extended_flags")
    if c.carbohydrate is not None:
        w.u8(c.carbohydrate.id, "carbohydrate.id")
        w.sfloat(c.carbohydrate.amount_kg, "carbohydrate.amount_kg")
    if c.meal is not None:
        w.u8(c.meal, "meal")
    if c.tester_health is not None:
        _check_nibble(w, c.tester_health.tester, "tester_health.tester")
        _check_nibble(w, c.tester_health.health, "tester_health.health")
        w.u8(c.tester_health.tester | (c.tester_health.health << 4), "tester_health")
    if c.exercise is not None:
        w.u16(c.exercise.duration_s, "exercise.duration_s")
        w.u8(c.exercise.intensity_pct, "exercise.intensity_pct")
    if c.medication is not None:
        w.u8(c.medication.id, "medication.id")
        w.sfloat(c.medication.amount, "medication.amount")
    if c.hba1c_pct is not None:
        w.sfloat(c.hba1c_pct, "hba1c_pct")
    return w.getvalue()


# -- feature --------------------------------------------------------------------------------------------


class GlucoseFeature(IntFlag):
    """Glucose Feature (0x2A51, uint16); bits 11-15 are reserved (kept as received)."""

    LOW_BATTERY_DETECTION = 1 << 0
    SENSOR_MALFUNCTION_DETECTION = 1 << 1
    SENSOR_SAMPLE_SIZE = 1 << 2
    SENSOR_STRIP_INSERTION_ERROR_DETECTION = 1 << 3
    SENSOR_STRIP_TYPE_ERROR_DETECTION = 1 << 4
    SENSOR_RESULT_HIGH_LOW_DETECTION = 1 << 5
    SENSOR_TEMPERATURE_HIGH_LOW_DETECTION = 1 << 6
    SENSOR_READ_INTERRUPT_DETECTION = 1 << 7
    GENERAL_DEVICE_FAULT = 1 << 8
    TIME_FAULT = 1 << 9
    MULTIPLE_BOND = 1 << 10


def parse_glucose_feature(data: bytes) -> GlucoseFeature:
    """Bytes of a 0x2A51 value → `GlucoseFeature` flags."""
    return parse_features16(data, FEATURE_CHARACTERISTIC, GlucoseFeature)


def encode_glucose_feature(features: GlucoseFeature) -> bytes:
    """`GlucoseFeature` flags → the 2-byte 0x2A51 value."""
    return encode_features16(features, FEATURE_CHARACTERISTIC)
