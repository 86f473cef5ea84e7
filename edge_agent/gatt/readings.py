"""From decoded GATT measurements to `carechain.events` body models, in the units the bodies name.

Conversions are done in exact decimal arithmetic and rounded once, to the nearest double, at the end:

- °F → °C: (F − 32) × 5/9.
- kPa → mmHg: × 1000 / 133.322387415 (1 mmHg = 133.322387415 Pa by definition).
- Glucose kg/L → mg/dL: × 100 000 (1 kg/L = 10⁶ mg / 10 dL).
- Glucose mol/L → mg/dL: × 18 016, from the molar mass of glucose C6H12O6, 180.16 g/mol
  (g/L = mol/L × 180.16; mg/dL = g/L × 1000 / 10). 1 mmol/L = 18.016 mg/dL.
- lb → kg: × 0.45359237; in → m: × 0.0254 (both exact by definition).

Special values (NaN, NRes, ±INF, reserved): a required value (temperature, systolic/diastolic, SpO2,
glucose concentration) that is special raises `GattReadingError` naming it — no event is made up from it.
An optional value that is special (mean arterial pressure, pulse rate, pulse amplitude index) is left out
of the body: the special codes mean "no number here", and the body's optional field means exactly that.
A body model's own range checks failing also raise `GattReadingError`.

Fields we keep out of the bodies, on purpose: PLX SpO2PR-Fast/-Slow pairs (the body has one SpO2 and one
pulse), glucose "context follows" (the agent joins 0x2A34 by `record_seq`), the PAMS session fields.
"""

from __future__ import annotations

from decimal import Decimal
from enum import IntEnum, IntFlag

from pydantic import ValidationError

from carechain.events import BloodPressure, EventBody, Glucose, HeartRate, SpO2, Temperature, Weight
from edge_agent.gatt import blood_pressure as bp
from edge_agent.gatt import glucose as gl
from edge_agent.gatt import health_thermometer as ht
from edge_agent.gatt import heart_rate as hr
from edge_agent.gatt import physical_activity as pam
from edge_agent.gatt import pulse_oximeter as plx
from edge_agent.gatt import weight_scale as ws
from edge_agent.gatt.date_time import DateTime
from edge_agent.gatt.errors import GattReadingError
from edge_agent.gatt.ieee11073 import Number11073, Special
from edge_agent.source import Reading

PASCALS_PER_MMHG = Decimal("133.322387415")
GLUCOSE_MOLAR_MASS_G_PER_MOL = Decimal("180.16")
MG_DL_PER_KG_L = Decimal(100_000)
MG_DL_PER_MOL_L = GLUCOSE_MOLAR_MASS_G_PER_MOL * 1000 / 10
KG_PER_LB = Decimal("0.45359237")
M_PER_IN = Decimal("0.0254")


def fahrenheit_to_celsius(fahrenheit: Decimal) -> Decimal:
    return (fahrenheit - 32) * 5 / 9


def kpa_to_mmhg(kpa: Decimal) -> Decimal:
    return kpa * 1000 / PASCALS_PER_MMHG


def glucose_to_mg_dl(value: Decimal, unit: gl.GlucoseConcentrationUnit) -> Decimal:
    return value * (MG_DL_PER_MOL_L if unit == gl.GlucoseConcentrationUnit.MOL_PER_L else MG_DL_PER_KG_L)


def _required(value: Number11073, characteristic: str, kind: str, field: str) -> Decimal:
    if isinstance(value, Special):
        raise GattReadingError(characteristic, kind, f"{field} is {value.describe()}")
    return value.to_decimal()


def _optional(value: Number11073 | None) -> Decimal | None:
    """An optional value; a special value is left out (see the module docstring)."""
    if value is None or isinstance(value, Special):
        return None
    return value.to_decimal()


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _measured_at(timestamp: DateTime | None) -> str | None:
    moment = timestamp.to_datetime() if timestamp is not None else None
    return moment.isoformat() if moment is not None else None


def _code_name(value: int | None, enum: type[IntEnum], prefix: str) -> str | None:
    """`CAPILLARY_PLASMA` → "capillary_plasma"; a reserved code → f"{prefix}_{code}"."""
    if value is None:
        return None
    return value.name.lower() if isinstance(value, enum) else f"{prefix}_{int(value)}"


def flag_names(flags: int | None, enum: type[IntFlag], reserved_prefix: str) -> list[str]:
    """The snake_case names of the bits set in `flags`; reserved bits as f"{reserved_prefix}_bit_{n}"."""
    if flags is None:
        return []
    value = int(flags)
    names = [member.name.lower() for member in enum if member.name and value & member.value]
    known = 0
    for member in enum:
        known |= member.value
    unknown = value & ~known
    names += [f"{reserved_prefix}_bit_{n}" for n in range(unknown.bit_length()) if unknown >> n & 1]
    return names


def _body(model: type[EventBody], characteristic: str, kind: str, **fields: object) -> EventBody:
    try:
        return model(**{name: value for name, value in fields.items() if value is not None})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in err["loc"])
        got = f" (got {err['input']!r})" if where else ""
        message = err["msg"].removeprefix("Value error, ")
        raise GattReadingError(characteristic, kind, f"{where + ': ' if where else ''}{message}{got}") from None


def heart_rate_readings(m: hr.HeartRateMeasurement) -> list[Reading]:
    body = _body(
        HeartRate,
        hr.CHARACTERISTIC,
        "heart_rate",
        bpm=m.bpm,
        sensor_contact=m.sensor_contact,
        energy_kj=m.energy_expended_kj,
        rr_intervals_1024=list(m.rr_intervals_1024),
    )
    return [("heart_rate", body)]


def temperature_site(kind: ht.TemperatureType | int | None) -> str | None:
    """The body's `site` for a Temperature Type ("tympanum", …; reserved codes "temperature_type_<n>")."""
    return _code_name(kind, ht.TemperatureType, "temperature_type")


def temperature_readings(m: ht.TemperatureMeasurement) -> list[Reading]:
    value = _required(m.value, ht.CHARACTERISTIC, "temperature", "the temperature")
    celsius = fahrenheit_to_celsius(value) if m.unit == ht.TemperatureUnit.FAHRENHEIT else value
    body = _body(
        Temperature,
        ht.CHARACTERISTIC,
        "temperature",
        celsius=float(celsius),
        site=temperature_site(m.temperature_type),
        measured_at=_measured_at(m.timestamp),
    )
    return [("temperature", body)]


_PULSE_RANGE_NAMES: dict[bp.PulseRateRange | int, str] = {
    bp.PulseRateRange.EXCEEDS_UPPER_LIMIT: "pulse_rate_exceeds_upper_limit",
    bp.PulseRateRange.BELOW_LOWER_LIMIT: "pulse_rate_below_lower_limit",
}


def blood_pressure_status_names(status: bp.BloodPressureStatus | None) -> list[str]:
    if status is None:
        return []
    names = [
        name
        for name, on in (
            ("body_movement_detected", status.body_movement_detected),
            ("cuff_too_loose", status.cuff_too_loose),
            ("irregular_pulse_detected", status.irregular_pulse_detected),
            ("improper_measurement_position", status.improper_measurement_position),
        )
        if on
    ]
    if status.pulse_rate_range != bp.PulseRateRange.WITHIN_RANGE:
        names.append(
            _PULSE_RANGE_NAMES.get(status.pulse_rate_range, f"pulse_rate_range_{int(status.pulse_rate_range)}")
        )
    reserved = status.reserved_bits
    names += [f"measurement_status_bit_{n}" for n in range(reserved.bit_length()) if reserved >> n & 1]
    return names


def blood_pressure_readings(m: bp.BloodPressureMeasurement) -> list[Reading]:
    def mmhg(value: Decimal | None) -> float | None:
        if value is None:
            return None
        return float(kpa_to_mmhg(value) if m.unit == bp.BloodPressureUnit.KPA else value)

    kind, name = "blood_pressure", bp.CHARACTERISTIC
    body = _body(
        BloodPressure,
        name,
        kind,
        systolic_mmhg=mmhg(_required(m.systolic, name, kind, "systolic")),
        diastolic_mmhg=mmhg(_required(m.diastolic, name, kind, "diastolic")),
        mean_mmhg=mmhg(_optional(m.mean_arterial_pressure)),
        pulse_bpm=_float(_optional(m.pulse_rate)),
        user_id=None if m.user_id == bp.UNKNOWN_USER else m.user_id,
        status=blood_pressure_status_names(m.status),
        measured_at=_measured_at(m.timestamp),
    )
    return [(kind, body)]


def _plx_status(measurement: plx.PlxMeasurementStatus | None, sensor: plx.PlxDeviceAndSensorStatus | None) -> list[str]:
    return flag_names(measurement, plx.PlxMeasurementStatus, "measurement_status") + flag_names(
        sensor, plx.PlxDeviceAndSensorStatus, "device_and_sensor_status"
    )


def _spo2_readings(
    name: str, m: plx.PlxSpotCheckMeasurement | plx.PlxContinuousMeasurement, status: list[str], measured_at: str | None
) -> list[Reading]:
    body = _body(
        SpO2,
        name,
        "spo2",
        spo2_pct=float(_required(m.spo2, name, "spo2", "SpO2")),
        pulse_bpm=_float(_optional(m.pulse_rate)),
        pulse_amplitude_index_pct=_float(_optional(m.pulse_amplitude_index)),
        status=_plx_status(m.measurement_status, m.device_and_sensor_status) + status,
        measured_at=measured_at,
    )
    return [("spo2", body)]


def plx_spot_check_readings(m: plx.PlxSpotCheckMeasurement) -> list[Reading]:
    if m.device_clock_not_set:  # its timestamp means nothing
        return _spo2_readings(plx.SPOT_CHECK_CHARACTERISTIC, m, ["device_clock_not_set"], None)
    return _spo2_readings(plx.SPOT_CHECK_CHARACTERISTIC, m, [], _measured_at(m.timestamp))


def plx_continuous_readings(m: plx.PlxContinuousMeasurement) -> list[Reading]:
    return _spo2_readings(plx.CONTINUOUS_CHARACTERISTIC, m, [], None)


def glucose_readings(m: gl.GlucoseMeasurement) -> list[Reading]:
    kind, name = "glucose", gl.MEASUREMENT_CHARACTERISTIC
    c = m.concentration
    if c is None:
        raise GattReadingError(name, kind, f"record {m.sequence_number} carries no glucose concentration")
    value = _required(c.value, name, kind, "the glucose concentration")
    location = None if c.sample_location == gl.SampleLocation.NOT_AVAILABLE else c.sample_location
    moment = m.measured_at()
    body = _body(
        Glucose,
        name,
        kind,
        mg_dl=float(glucose_to_mg_dl(value, c.unit)),
        record_seq=m.sequence_number,
        sample=_code_name(c.type, gl.GlucoseType, "glucose_type"),
        sample_location=_code_name(location, gl.SampleLocation, "sample_location"),
        status=flag_names(m.sensor_status, gl.GlucoseSensorStatus, "sensor_status"),
        measured_at=moment.isoformat() if moment is not None else None,
    )
    return [(kind, body)]


def weight_readings(m: ws.WeightMeasurement) -> list[Reading]:
    kind, name = "weight", ws.CHARACTERISTIC
    if m.weight is None:
        raise GattReadingError(name, kind, "the scale reported the measurement as unsuccessful (0xFFFF)")
    imperial = m.units == ws.MeasurementSystem.IMPERIAL
    kg = m.weight * KG_PER_LB if imperial else m.weight
    # A scale that does not know the user's height sends BMI and height as 0: nothing to report.
    bmi = m.bmi if m.bmi else None
    height = (m.height * M_PER_IN if imperial else m.height) if m.height else None
    body = _body(
        Weight,
        name,
        kind,
        kg=float(kg),
        bmi=_float(bmi),
        height_m=_float(height),
        user_id=None if m.user_id == ws.UNKNOWN_USER else m.user_id,
        measured_at=_measured_at(m.timestamp),
    )
    return [(kind, body)]


def step_counter_readings(m: pam.StepCounterActivitySummary) -> list[Reading]:
    # carechain.events.Activity requires active_minutes, which this characteristic does not carry; making
    # one up would sign a false value into the ledger. Refuse until Activity.active_minutes is optional.
    raise GattReadingError(
        pam.CHARACTERISTIC,
        "activity",
        f"it carries steps ({m.steps}) but no active minutes, which carechain.events.Activity requires; "
        "the summary is available from parse_step_counter_activity_summary",
    )
