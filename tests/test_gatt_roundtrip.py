"""Property tests for every registered GATT codec.

- encode → parse gives back the value, for any value hypothesis can build (all optional fields, every
  special SFLOAT/FLOAT, reserved enum codes and status bits);
- a value cut short at any byte raises GattParseError (the heart rate's trailing RR list excepted, where
  a cut between two intervals is a shorter valid value);
- arbitrary bytes raise nothing but GattParseError, and whatever parses re-encodes to a value that
  parses the same; turning it into readings raises nothing but GattReadingError.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.gatt import (
    CODECS,
    BloodPressureFeature,
    BloodPressureMeasurement,
    BloodPressureStatus,
    BloodPressureUnit,
    Carbohydrate,
    DateTime,
    Exercise,
    Float11073,
    GattParseError,
    GattReadingError,
    GlucoseConcentration,
    GlucoseConcentrationUnit,
    GlucoseFeature,
    GlucoseMeasurement,
    GlucoseMeasurementContext,
    GlucoseTesterHealth,
    HeartRateMeasurement,
    MeasurementSystem,
    Medication,
    MedicationUnit,
    PlxContinuousMeasurement,
    PlxDeviceAndSensorStatus,
    PlxFeatures,
    PlxMeasurementStatus,
    PlxSpotCheckMeasurement,
    PlxSupportedFeatures,
    RacpFilterType,
    RacpNumberOfRecords,
    RacpOpCode,
    RacpOperator,
    RacpRequest,
    RacpResponse,
    Special,
    SpO2PulseRate,
    StepCounterActivitySummary,
    SystemId,
    TemperatureMeasurement,
    TemperatureUnit,
    WeightMeasurement,
    WeightScaleFeature,
    encode,
    parse,
    to_readings,
)
from edge_agent.gatt.date_time import date_time_problem
from edge_agent.gatt.weight_scale import BMI_RESOLUTION, HEIGHT_RESOLUTION, WEIGHT_RESOLUTION

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u24 = st.integers(0, 0xFFFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
specials = st.sampled_from(list(Special))
sfloats = st.one_of(
    specials,
    st.builds(Float11073, st.integers(-2048, 2047), st.integers(-8, 7)).filter(
        lambda n: n.exponent != 0 or -2045 <= n.mantissa <= 2045
    ),
)
floats = st.one_of(
    specials,
    st.builds(Float11073, st.integers(-(2**23), 2**23 - 1), st.integers(-128, 127)).filter(
        lambda n: n.exponent != 0 or -(2**23) + 3 <= n.mantissa <= 2**23 - 3
    ),
)
date_times = st.builds(
    DateTime,
    st.one_of(st.just(0), st.integers(1582, 9999)),
    st.integers(0, 12),
    st.integers(0, 31),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
).filter(lambda d: date_time_problem(d) is None)


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


heart_rates = st.builds(
    HeartRateMeasurement,
    bpm=u16,
    sensor_contact=st.sampled_from([None, True, False]),
    energy_expended_kj=opt(u16),
    rr_intervals_1024=st.lists(u16, max_size=9).map(tuple),
)
temperatures = st.builds(
    TemperatureMeasurement,
    value=floats,
    unit=st.sampled_from(TemperatureUnit),
    timestamp=opt(date_times),
    temperature_type=opt(u8),
)
blood_pressures = st.builds(
    BloodPressureMeasurement,
    systolic=sfloats,
    diastolic=sfloats,
    mean_arterial_pressure=sfloats,
    unit=st.sampled_from(BloodPressureUnit),
    timestamp=opt(date_times),
    pulse_rate=opt(sfloats),
    user_id=opt(u8),
    status=opt(
        st.builds(
            BloodPressureStatus,
            body_movement_detected=st.booleans(),
            cuff_too_loose=st.booleans(),
            irregular_pulse_detected=st.booleans(),
            pulse_rate_range=st.integers(0, 3),
            improper_measurement_position=st.booleans(),
            reserved_bits=st.integers(0, 0x3FF).map(lambda b: b << 6),
        )
    ),
)
measurement_statuses = u16.map(PlxMeasurementStatus)
sensor_statuses = u24.map(PlxDeviceAndSensorStatus)
spot_checks = st.builds(
    PlxSpotCheckMeasurement,
    spo2=sfloats,
    pulse_rate=sfloats,
    timestamp=opt(date_times),
    measurement_status=opt(measurement_statuses),
    device_and_sensor_status=opt(sensor_statuses),
    pulse_amplitude_index=opt(sfloats),
    device_clock_not_set=st.booleans(),
)
pairs = st.builds(SpO2PulseRate, spo2=sfloats, pulse_rate=sfloats)
continuous = st.builds(
    PlxContinuousMeasurement,
    spo2=sfloats,
    pulse_rate=sfloats,
    fast=opt(pairs),
    slow=opt(pairs),
    measurement_status=opt(measurement_statuses),
    device_and_sensor_status=opt(sensor_statuses),
    pulse_amplitude_index=opt(sfloats),
)


@st.composite
def plx_features(draw: st.DrawFn) -> PlxFeatures:
    supported = PlxSupportedFeatures(draw(u16))
    status = draw(measurement_statuses) if supported & PlxSupportedFeatures.MEASUREMENT_STATUS else None
    sensor = draw(sensor_statuses) if supported & PlxSupportedFeatures.DEVICE_AND_SENSOR_STATUS else None
    return PlxFeatures(supported=supported, measurement_status_support=status, device_and_sensor_status_support=sensor)


glucose_measurements = st.builds(
    GlucoseMeasurement,
    sequence_number=u16,
    base_time=date_times,
    time_offset_minutes=opt(st.integers(-0x8000, 0x7FFF)),
    concentration=opt(
        st.builds(
            GlucoseConcentration,
            value=sfloats,
            unit=st.sampled_from(GlucoseConcentrationUnit),
            type=st.integers(0, 15),
            sample_location=st.integers(0, 15),
        )
    ),
    sensor_status=opt(u16),
    context_follows=st.booleans(),
)
glucose_contexts = st.builds(
    GlucoseMeasurementContext,
    sequence_number=u16,
    extended_flags=opt(u8),
    carbohydrate=opt(st.builds(Carbohydrate, id=u8, amount_kg=sfloats)),
    meal=opt(u8),
    tester_health=opt(st.builds(GlucoseTesterHealth, tester=st.integers(0, 15), health=st.integers(0, 15))),
    exercise=opt(st.builds(Exercise, duration_s=u16, intensity_pct=u8)),
    medication=opt(st.builds(Medication, id=u8, amount=sfloats, unit=st.sampled_from(MedicationUnit))),
    hba1c_pct=opt(sfloats),
)


@st.composite
def racp_requests(draw: st.DrawFn) -> RacpRequest:
    op_code = draw(
        st.sampled_from(
            [
                RacpOpCode.REPORT_STORED_RECORDS,
                RacpOpCode.DELETE_STORED_RECORDS,
                RacpOpCode.ABORT_OPERATION,
                RacpOpCode.REPORT_NUMBER_OF_STORED_RECORDS,
            ]
        )
    )
    operator = draw(st.sampled_from(RacpOperator))
    filtered = operator in (
        RacpOperator.LESS_THAN_OR_EQUAL_TO,
        RacpOperator.GREATER_THAN_OR_EQUAL_TO,
        RacpOperator.WITHIN_RANGE_OF,
    )
    if not filtered:
        return RacpRequest(op_code=op_code, operator=operator)
    filter_type = draw(st.sampled_from(RacpFilterType))
    values = u16 if filter_type == RacpFilterType.SEQUENCE_NUMBER else date_times
    low = draw(values) if operator != RacpOperator.LESS_THAN_OR_EQUAL_TO else None
    high = draw(values) if operator != RacpOperator.GREATER_THAN_OR_EQUAL_TO else None
    return RacpRequest(op_code=op_code, operator=operator, filter_type=filter_type, minimum=low, maximum=high)


racp_messages = st.one_of(
    racp_requests(),
    st.builds(RacpNumberOfRecords, count=u16),
    st.builds(RacpResponse, request_op_code=u8, response_code=u8),
)


@st.composite
def weights(draw: st.DrawFn) -> WeightMeasurement:
    units = draw(st.sampled_from(MeasurementSystem))
    raw = draw(opt(st.integers(0, 0xFFFE)))
    with_bmi = draw(st.booleans())
    return WeightMeasurement(
        weight=None if raw is None else raw * WEIGHT_RESOLUTION[units],
        units=units,
        timestamp=draw(opt(date_times)),
        user_id=draw(opt(u8)),
        bmi=draw(u16) * BMI_RESOLUTION if with_bmi else None,
        height=draw(u16) * HEIGHT_RESOLUTION[units] if with_bmi else None,
    )


weight_features = st.builds(
    WeightScaleFeature,
    timestamp_supported=st.booleans(),
    multiple_users_supported=st.booleans(),
    bmi_supported=st.booleans(),
    weight_resolution=st.integers(0, 15),
    height_resolution=st.integers(0, 7),
    reserved_bits=st.integers(0, 2**22 - 1).map(lambda b: b << 10),
)
step_summaries = st.builds(
    StepCounterActivitySummary,
    session_id=u16,
    sub_session_id=u16,
    relative_timestamp_s=u32,
    sequence_number=u32,
    normal_walking_steps=opt(u24),
    intensity_steps=opt(u24),
    floor_steps=opt(u24),
    distance=opt(u24),
    segment_counter=st.integers(0, 63),
)
texts = st.text(max_size=40).filter(lambda t: "\x00" not in t)

STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "heart_rate_measurement": heart_rates,
    "temperature_measurement": temperatures,
    "temperature_type": u8,
    "blood_pressure_measurement": blood_pressures,
    "blood_pressure_feature": u16.map(BloodPressureFeature),
    "plx_spot_check": spot_checks,
    "plx_continuous": continuous,
    "plx_features": plx_features(),
    "glucose_measurement": glucose_measurements,
    "glucose_measurement_context": glucose_contexts,
    "glucose_feature": u16.map(GlucoseFeature),
    "record_access_control_point": racp_messages,
    "weight_measurement": weights(),
    "weight_scale_feature": weight_features,
    "battery_level": st.integers(0, 100),
    "step_counter_activity_summary": step_summaries,
    "manufacturer_name_string": texts,
    "model_number_string": texts,
    "serial_number_string": texts,
    "firmware_revision_string": texts,
    "hardware_revision_string": texts,
    "software_revision_string": texts,
    "system_id": st.builds(
        SystemId, manufacturer_identifier=st.integers(0, 2**40 - 1), organizationally_unique_identifier=u24
    ),
}
STRINGS = {name for name in CODECS if name.endswith("_string")}


def test_every_registered_codec_has_a_strategy():
    assert set(STRATEGIES) == set(CODECS)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@given(data=st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_encoded_values_parse_back_and_no_truncation_parses(name, data):
    value = data.draw(STRATEGIES[name])
    full = encode(name, value)
    assert parse(name, full) == value
    if name in STRINGS:
        return  # see test_strings_cut_anywhere_parse_to_a_prefix_or_raise
    for cut in range(len(full)):
        if name == "heart_rate_measurement":
            _check_heart_rate_prefix(full[:cut], value)
            continue
        with pytest.raises(GattParseError):
            parse(name, full[:cut])


def _check_heart_rate_prefix(prefix: bytes, value: HeartRateMeasurement) -> None:
    try:
        shorter = parse("heart_rate_measurement", prefix)
    except GattParseError:
        return
    # Only a cut between two RR intervals leaves a valid value: the same one with fewer intervals.
    assert len(shorter.rr_intervals_1024) >= 1
    assert shorter.rr_intervals_1024 == value.rr_intervals_1024[: len(shorter.rr_intervals_1024)]
    assert shorter.bpm == value.bpm


@pytest.mark.parametrize("name", sorted(CODECS))
@given(data=st.binary(max_size=48))
def test_arbitrary_bytes_raise_only_parse_errors(name, data):
    try:
        value = parse(name, data)
    except GattParseError as exc:
        assert str(exc).startswith(CODECS[name].characteristic + ": byte ")
        return
    assert parse(name, encode(name, value)) == value  # whatever parses, re-encodes faithfully
    with contextlib.suppress(GattReadingError):
        to_readings(name, value)


@pytest.mark.parametrize("name", sorted(CODECS))
@given(data=st.data())
@settings(max_examples=50)
def test_readings_of_any_valid_value_raise_only_reading_errors(name, data):
    value = data.draw(STRATEGIES[name])
    try:
        readings = to_readings(name, value)
    except GattReadingError:
        return
    assert all(isinstance(kind, str) for kind, _ in readings)


@pytest.mark.parametrize("name", sorted(STRINGS))
@given(text=texts)
def test_strings_cut_anywhere_parse_to_a_prefix_or_raise(name, text):
    full = encode(name, text)
    for cut in range(len(full)):
        with contextlib.suppress(GattParseError):  # a cut inside a multi-byte UTF-8 character
            assert text.startswith(parse(name, full[:cut]))


def test_weight_values_keep_exact_resolution():
    m = WeightMeasurement(weight=Decimal("70.505"), bmi=Decimal("24.5"), height=Decimal("1.765"))
    assert parse("weight_measurement", encode("weight_measurement", m)) == m
