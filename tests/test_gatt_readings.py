"""Measurements → carechain.events bodies: units converted exactly, special values never turned into
numbers, and every body a valid event payload."""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal

import pytest

from carechain.events import BloodPressure, Glucose, HeartRate, SpO2, Temperature, Weight, make_payload
from edge_agent.gatt import (
    BloodPressureMeasurement,
    BloodPressureStatus,
    BloodPressureUnit,
    DateTime,
    Float11073,
    GattReadingError,
    GlucoseConcentration,
    GlucoseConcentrationUnit,
    GlucoseMeasurement,
    GlucoseSensorStatus,
    GlucoseType,
    MeasurementSystem,
    PlxContinuousMeasurement,
    PlxMeasurementStatus,
    PlxSpotCheckMeasurement,
    SampleLocation,
    Special,
    StepCounterActivitySummary,
    TemperatureMeasurement,
    TemperatureType,
    TemperatureUnit,
    WeightMeasurement,
    decode,
    float32,
    sfloat,
    to_readings,
)
from edge_agent.gatt.readings import MG_DL_PER_MOL_L, PASCALS_PER_MMHG


def only(readings):
    assert len(readings) == 1
    kind, body = readings[0]
    make_payload("abcdefgh", 1, 1_700_000_000_000, kind, body)  # a body the wire protocol accepts
    return kind, body


def test_heart_rate_reading():
    kind, body = only(decode("heart_rate_measurement", bytes([0b11110, 85, 50, 0, 33, 0])))
    assert kind == "heart_rate"
    assert body == HeartRate(bpm=85, sensor_contact=True, energy_kj=50, rr_intervals_1024=[33])


def test_heart_rate_without_contact_support_leaves_sensor_contact_out():
    _, body = only(decode("heart_rate_measurement", bytes([0x00, 70])))
    assert body.sensor_contact is None


def test_heart_rate_outside_the_body_range_is_refused():
    with pytest.raises(GattReadingError, match="Heart Rate Measurement: cannot make a 'heart_rate' event: bpm"):
        decode("heart_rate_measurement", bytes([0x06, 0]))  # 0 bpm: no beat detected


def test_temperature_reading_in_celsius_with_site_and_time():
    data = bytes([0x06, 0xB0, 0x0E, 0x00, 0xFE, 0xDC, 0x07, 0x0C, 0x05, 0x0B, 0x32, 0x1B, 0x04])  # Nordic
    kind, body = only(decode("temperature_measurement", data))
    assert kind == "temperature"
    assert body == Temperature(celsius=37.6, site="finger", measured_at="2012-12-05T11:50:27")


@pytest.mark.parametrize(("fahrenheit", "celsius"), [("98.6", 37.0), ("100.4", 38.0), ("97.7", 36.5)])
def test_fahrenheit_is_converted_exactly(fahrenheit, celsius):
    m = TemperatureMeasurement(value=float32(fahrenheit), unit=TemperatureUnit.FAHRENHEIT)
    _, body = only(to_readings("temperature_measurement", m))
    assert body.celsius == celsius


def test_fahrenheit_conversion_rounds_once_at_the_end():
    m = TemperatureMeasurement(value=float32("98.7"), unit=TemperatureUnit.FAHRENHEIT)
    _, body = only(to_readings("temperature_measurement", m))
    assert body.celsius == float((Decimal("98.7") - 32) * 5 / 9)  # 37.0555…


@pytest.mark.parametrize("special", list(Special))
def test_a_special_temperature_is_refused_not_turned_into_a_number(special):
    m = TemperatureMeasurement(value=special)
    with pytest.raises(GattReadingError, match=re.escape(f"the temperature is {special.describe()}")):
        to_readings("temperature_measurement", m)


def test_reserved_temperature_type_is_kept_as_a_named_code():
    m = TemperatureMeasurement(value=float32("36.6"), temperature_type=12)
    assert only(to_readings("temperature_measurement", m))[1].site == "temperature_type_12"
    assert only(to_readings("temperature_measurement", TemperatureMeasurement(value=float32("36.6"))))[1].site is None


def test_temperature_with_an_unknown_year_has_no_measured_at():
    m = TemperatureMeasurement(value=float32("36.6"), timestamp=DateTime(0, 4, 17, 20, 41, 59))
    assert only(to_readings("temperature_measurement", m))[1].measured_at is None


def test_blood_pressure_reading_in_mmhg():
    data = bytes([0x1E, 0x8A, 0x00, 0x58, 0x00, 0x78, 0x00, 0x00, 0x00, 0x04, 0x11, 0x14, 0x29, 0x3B, 0x3C, 0x00])
    _, body = only(decode("blood_pressure_measurement", data + bytes([0x01, 0x27, 0x00])))  # Nordic "full"
    assert body == BloodPressure(
        systolic_mmhg=138.0,
        diastolic_mmhg=88.0,
        mean_mmhg=120.0,
        pulse_bpm=60.0,
        user_id=1,
        status=[
            "body_movement_detected",
            "cuff_too_loose",
            "irregular_pulse_detected",
            "improper_measurement_position",
        ],
    )


def test_blood_pressure_in_kpa_is_converted_to_mmhg():
    _, body = only(
        decode(
            "blood_pressure_measurement",
            bytes([0x15, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0, 0x3C, 0x00]) + bytes([0x12, 0x00]),
        )
    )  # Nordic "some": 18.9/11/15.9 kPa
    assert body.systolic_mmhg == float(Decimal("18.9") * 1000 / PASCALS_PER_MMHG)
    assert round(body.systolic_mmhg, 2) == 141.76
    assert round(body.diastolic_mmhg, 2) == 82.51
    assert body.status == ["cuff_too_loose", "pulse_rate_below_lower_limit"]


def bp(**changes):
    fields = {"systolic": sfloat(120), "diastolic": sfloat(80), "mean_arterial_pressure": sfloat(93)}
    return BloodPressureMeasurement(**(fields | changes))


def test_blood_pressure_optional_special_values_are_left_out():
    _, body = only(
        to_readings("blood_pressure_measurement", bp(mean_arterial_pressure=Special.NAN, pulse_rate=Special.NRES))
    )
    assert body.mean_mmhg is None and body.pulse_bpm is None


@pytest.mark.parametrize("field", ["systolic", "diastolic"])
def test_blood_pressure_required_special_values_are_refused(field):
    with pytest.raises(GattReadingError, match=f"{field} is NaN"):
        to_readings("blood_pressure_measurement", bp(**{field: Special.NAN}))


def test_blood_pressure_unknown_user_and_reserved_status_bits():
    status = BloodPressureStatus(pulse_rate_range=3, reserved_bits=1 << 9)
    _, body = only(to_readings("blood_pressure_measurement", bp(user_id=255, status=status)))
    assert body.user_id is None
    assert body.status == ["pulse_rate_range_3", "measurement_status_bit_9"]


def test_blood_pressure_systolic_not_above_diastolic_is_refused():
    with pytest.raises(GattReadingError, match="systolic must exceed diastolic"):
        to_readings("blood_pressure_measurement", bp(systolic=sfloat(80), diastolic=sfloat(80)))


def test_blood_pressure_kpa_unit_flag_is_honoured():
    m = bp(
        systolic=sfloat("16.0"),
        diastolic=sfloat("10.7"),
        mean_arterial_pressure=Special.NAN,
        unit=BloodPressureUnit.KPA,
    )
    _, body = only(to_readings("blood_pressure_measurement", m))
    assert body.systolic_mmhg == float(Decimal("16.0") * 1000 / PASCALS_PER_MMHG)  # 120.0098…
    assert body.diastolic_mmhg == float(Decimal("10.7") * 1000 / PASCALS_PER_MMHG)  # 80.2566…


def test_spot_check_reading():
    data = bytes([15, 172, 243, 190, 245, 232, 7, 11, 29, 23, 8, 57, 32, 64, 34, 0, 0, 102, 227])  # Spezi
    _, body = only(decode("plx_spot_check", data))
    assert body == SpO2(
        spo2_pct=94.0,
        pulse_bpm=147.0,
        pulse_amplitude_index_pct=8.7,
        status=[
            "measurement_ongoing",
            "questionable_measurement_detected",
            "equipment_malfunction_detected",
            "low_perfusion_detected",
        ],
        measured_at="2024-11-29T23:08:57",
    )


def test_spot_check_with_clock_not_set_has_no_measured_at():
    m = PlxSpotCheckMeasurement(
        spo2=sfloat(97), pulse_rate=sfloat(70), timestamp=DateTime(2000, 1, 1), device_clock_not_set=True
    )
    _, body = only(to_readings("plx_spot_check", m))
    assert body.measured_at is None and body.status == ["device_clock_not_set"]


def test_continuous_reading_uses_the_normal_pair_and_skips_a_missing_pulse():
    m = PlxContinuousMeasurement(
        spo2=sfloat(98), pulse_rate=Special.NAN, measurement_status=PlxMeasurementStatus(0x0001 | 0x0020)
    )
    _, body = only(to_readings("plx_continuous", m))
    assert body == SpO2(spo2_pct=98.0, status=["measurement_ongoing", "measurement_status_bit_0"])


@pytest.mark.parametrize("name", ["plx_spot_check", "plx_continuous"])
def test_spo2_special_value_is_refused(name):
    m = (PlxSpotCheckMeasurement if name == "plx_spot_check" else PlxContinuousMeasurement)(
        spo2=Special.POSITIVE_INFINITY, pulse_rate=sfloat(70)
    )
    with pytest.raises(GattReadingError, match=r"SpO2 is \+INF"):
        to_readings(name, m)


def glucose(value, unit, **changes):
    fields = {
        "sequence_number": 42,
        "base_time": DateTime(2024, 3, 1, 8, 0, 0),
        "time_offset_minutes": -15,
    }
    if value is not None:
        fields["concentration"] = GlucoseConcentration(
            value=value, unit=unit, type=GlucoseType.CAPILLARY_PLASMA, sample_location=SampleLocation.FINGER
        )
    return GlucoseMeasurement(**(fields | changes))


def test_glucose_in_mol_per_litre_uses_the_molar_mass_of_glucose():
    _, body = only(to_readings("glucose_measurement", glucose(sfloat("0.0055"), GlucoseConcentrationUnit.MOL_PER_L)))
    assert Decimal("18016") == MG_DL_PER_MOL_L  # 180.16 g/mol
    assert body == Glucose(
        mg_dl=99.088,
        record_seq=42,
        sample="capillary_plasma",
        sample_location="finger",
        measured_at="2024-03-01T07:45:00",
    )


def test_glucose_in_kg_per_litre():
    _, body = only(to_readings("glucose_measurement", glucose(sfloat("0.00099"), GlucoseConcentrationUnit.KG_PER_L)))
    assert body.mg_dl == 99.0


def test_glucose_status_and_unavailable_location():
    concentration = GlucoseConcentration(
        value=sfloat("0.0055"),
        unit=GlucoseConcentrationUnit.MOL_PER_L,
        type=11,  # reserved
        sample_location=SampleLocation.NOT_AVAILABLE,
    )
    status = GlucoseSensorStatus.DEVICE_BATTERY_LOW | GlucoseSensorStatus(1 << 13)
    m = glucose(None, None, concentration=concentration, sensor_status=status)
    _, body = only(to_readings("glucose_measurement", m))
    assert body.status == ["device_battery_low", "sensor_status_bit_13"]
    assert body.sample == "glucose_type_11" and body.sample_location is None


def test_glucose_without_concentration_or_with_a_special_value_is_refused():
    with pytest.raises(GattReadingError, match="record 42 carries no glucose concentration"):
        to_readings("glucose_measurement", replace(glucose(sfloat(1), None), concentration=None))
    with pytest.raises(GattReadingError, match="concentration is NRes"):
        to_readings("glucose_measurement", glucose(Special.NRES, GlucoseConcentrationUnit.KG_PER_L))


def test_glucose_out_of_range_value_from_nordic_vector_is_refused():
    data = bytes([0b011011, 1, 0, 0xE3, 0x07, 2, 27, 11, 10, 30, 0xFB, 0xFF, 30, 0, 0x12, 0b101, 0b1])  # 30 kg/L
    with pytest.raises(GattReadingError, match="mg_dl"):
        decode("glucose_measurement", data)


def test_weight_si():
    _, body = only(decode("weight_measurement", bytes.fromhex("00 14 37")))
    assert body == Weight(kg=70.5)


def test_weight_imperial_is_converted_to_kilograms_and_metres():
    _, body = only(decode("weight_measurement", bytes.fromhex("0f be 3c e8 07 0b 1d 07 1e 00 02 f5 00 bc 02")))
    assert body.kg == float(Decimal("155.50") * Decimal("0.45359237"))  # 70.5336...
    assert body.height_m == pytest.approx(1.778) and body.height_m == float(Decimal("70.0") * Decimal("0.0254"))
    assert body.bmi == 24.5 and body.user_id == 2 and body.measured_at == "2024-11-29T07:30:00"


def test_weight_unsuccessful_is_refused_and_zero_bmi_is_left_out():
    with pytest.raises(GattReadingError, match="unsuccessful"):
        decode("weight_measurement", bytes.fromhex("00 ff ff"))
    m = WeightMeasurement(
        weight=Decimal("80"), units=MeasurementSystem.SI, bmi=Decimal(0), height=Decimal(0), user_id=255
    )
    _, body = only(to_readings("weight_measurement", m))
    assert body == Weight(kg=80.0)


def test_step_counter_cannot_make_an_activity_event_yet():
    summary = StepCounterActivitySummary(
        session_id=1, sub_session_id=0, relative_timestamp_s=60, sequence_number=1, normal_walking_steps=5000
    )
    with pytest.raises(GattReadingError, match="no active minutes"):
        to_readings("step_counter_activity_summary", summary)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("battery_level", b"\x50"),
        ("temperature_type", b"\x09"),
        ("blood_pressure_feature", b"\x3f\x00"),
        ("glucose_feature", b"\x00\x04"),
        ("glucose_measurement_context", bytes([0x02, 1, 0, 1])),
        ("record_access_control_point", bytes([6, 0, 1, 1])),
        ("plx_features", b"\x00\x00"),
        ("weight_scale_feature", b"\x00\x00\x00\x00"),
        ("manufacturer_name_string", b"ACME"),
        ("system_id", bytes(8)),
    ],
)
def test_characteristics_that_are_not_events_give_no_readings(name, data):
    assert decode(name, data) == []


def test_float_values_are_not_silently_rounded_before_conversion():
    m = TemperatureMeasurement(value=Float11073(366, -1))
    assert only(to_readings("temperature_measurement", m))[1].celsius == 36.6
    assert TemperatureType.TYMPANUM.name.lower() == "tympanum"  # the name simulated thermometers use
