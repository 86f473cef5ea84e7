"""Each GATT parser against byte strings published by others, with the values they decode to.

Sources (read, not copied): Nordic Semiconductor's Android-BLE-Common-Library unit tests
(ble-common/src/test/.../callback/{hr,ht,bps,glucose}/…Test.java, RecordAccessControlPointDataCallbackTest),
Stanford Spezi's SpeziBluetooth tests (Tests/SpeziBluetoothServicesTests/PLXTests.swift), Zephyr's
Heart Rate service (subsys/bluetooth/services/hrs.c: `hrm[0] = 0x06`) and Health Thermometer sample
(samples/bluetooth/peripheral_hts: flags 0, 24-bit mantissa, exponent -2). Where no public vector was
found (weight scale, PAMS, some feature values) the bytes are built by hand from the Bluetooth SIG field
tables and marked "spec".
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from edge_agent.gatt import (
    BloodPressureFeature,
    BloodPressureUnit,
    CarbohydrateId,
    DateTime,
    Float11073,
    GattParseError,
    GlucoseConcentrationUnit,
    GlucoseFeature,
    GlucoseHealth,
    GlucoseSensorStatus,
    GlucoseTester,
    GlucoseType,
    HeightResolution,
    Meal,
    MeasurementSystem,
    MedicationId,
    MedicationUnit,
    PlxDeviceAndSensorStatus,
    PlxMeasurementStatus,
    PlxSupportedFeatures,
    PulseRateRange,
    RacpFilterType,
    RacpNumberOfRecords,
    RacpOpCode,
    RacpOperator,
    RacpRequest,
    RacpResponse,
    RacpResponseCode,
    SampleLocation,
    Special,
    TemperatureType,
    TemperatureUnit,
    WeightResolution,
    encode,
    parse,
    parse_battery_level,
    parse_blood_pressure_measurement,
    parse_glucose_measurement,
    parse_glucose_measurement_context,
    parse_heart_rate_measurement,
    parse_manufacturer_name,
    parse_plx_continuous,
    parse_plx_features,
    parse_plx_spot_check,
    parse_record_access_control_point,
    parse_step_counter_activity_summary,
    parse_system_id,
    parse_temperature_measurement,
    parse_temperature_type,
    parse_weight_measurement,
    parse_weight_scale_feature,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def assert_canonical(parser: str, data: bytes) -> None:
    """Our encoder writes these bytes back exactly (each vector below uses the canonical layout)."""
    assert encode(parser, parse(parser, data)) == data


# -- Heart Rate Measurement 0x2A37 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "bpm", "contact", "energy", "rr"),
    [
        (bytes([0, 85]), 85, None, None, ()),  # Nordic: simple
        (bytes([0x04, 0xFF]), 255, False, None, ()),  # Nordic: contact supported, not detected
        (bytes([0b11110, 85, 50, 0, 33, 0]), 85, True, 50, (33,)),  # Nordic: uint8
        (bytes([0b11111, 1, 1, 50, 1, 1, 0, 2, 1, 0xFF, 0xFF]), 257, True, 306, (1, 258, 65535)),  # Nordic: uint16
        (bytes([0x06, 90]), 90, True, None, ()),  # Zephyr hrs.c: uint8, sensor contact
    ],
)
def test_heart_rate_measurement_vectors(data, bpm, contact, energy, rr):
    m = parse_heart_rate_measurement(data)
    assert (m.bpm, m.sensor_contact, m.energy_expended_kj, m.rr_intervals_1024) == (bpm, contact, energy, rr)
    assert_canonical("heart_rate_measurement", data)


def test_heart_rate_measurement_with_missing_rr_interval_is_refused():
    with pytest.raises(GattParseError) as err:  # Nordic onInvalidDataReceived: RR flag, no RR bytes
        parse_heart_rate_measurement(bytes([0b10111, 1, 1]))
    assert err.value.offset == 3
    assert "Heart Rate Measurement: byte 3: expected 2 bytes of RR interval" in str(err.value)


def test_heart_rate_measurement_value_format_16_bit_below_256_is_read():
    assert parse_heart_rate_measurement(bytes([0x01, 72, 0])).bpm == 72


# -- Temperature Measurement 0x2A1C, Temperature Type 0x2A1D -----------------------------------------------

NORDIC_TEMPERATURE = bytes([0x06, 0xB0, 0x0E, 0x00, 0xFE, 0xDC, 0x07, 0x0C, 0x05, 0x0B, 0x32, 0x1B, 0x04])


def test_temperature_measurement_nordic_vector():
    m = parse_temperature_measurement(NORDIC_TEMPERATURE)
    assert m.value == Float11073(3760, -2)  # 37.60
    assert m.unit is TemperatureUnit.CELSIUS
    assert m.timestamp == DateTime(2012, 12, 5, 11, 50, 27)
    assert m.temperature_type is TemperatureType.FINGER
    assert_canonical("temperature_measurement", NORDIC_TEMPERATURE)


def test_temperature_measurement_without_its_announced_type_is_refused():
    with pytest.raises(GattParseError) as err:  # Nordic onInvalidDataReceived
        parse_temperature_measurement(NORDIC_TEMPERATURE[:-1])
    assert err.value.offset == 12


def test_temperature_measurement_zephyr_sample_layout():
    # peripheral_hts: flags 0 (°C), mantissa = temperature × 100 as 24 bits, exponent -2
    m = parse_temperature_measurement(bytes([0x00]) + (3660).to_bytes(3, "little") + bytes([0xFE]))
    assert m.value.to_decimal() == Decimal("36.60")
    assert m.timestamp is None and m.temperature_type is None


def test_temperature_measurement_in_fahrenheit():  # spec: bit 0 set = °F
    m = parse_temperature_measurement(h("01 da 03 00 ff"))
    assert m.unit is TemperatureUnit.FAHRENHEIT and m.value.to_decimal() == Decimal("98.6")


@pytest.mark.parametrize(("data", "kind"), [(b"\x09", TemperatureType.TYMPANUM), (b"\x01", 1), (b"\x00", 0)])
def test_temperature_type(data, kind):
    assert parse_temperature_type(data) == kind
    assert_canonical("temperature_type", data)


def test_temperature_type_reserved_codes_stay_plain_ints():
    assert type(parse_temperature_type(b"\x0a")) is int


# -- Blood Pressure Measurement 0x2A35 ------------------------------------------------------------------


def test_blood_pressure_measurement_nordic_full():
    data = bytes([0x1E, 0x8A, 0x00, 0x58, 0x00, 0x78, 0x00, 0x00, 0x00, 0x04, 0x11, 0x14, 0x29, 0x3B, 0x3C, 0x00])
    data += bytes([0x01, 0x27, 0x00])
    m = parse_blood_pressure_measurement(data)
    assert (m.systolic, m.diastolic, m.mean_arterial_pressure) == (
        Float11073(138, 0),
        Float11073(88, 0),
        Float11073(120, 0),
    )
    assert m.unit is BloodPressureUnit.MMHG
    assert m.timestamp == DateTime(0, 4, 17, 20, 41, 59)  # year not known
    assert m.pulse_rate == Float11073(60, 0)
    assert m.user_id == 1
    s = m.status
    assert s is not None
    assert s.body_movement_detected and s.cuff_too_loose and s.irregular_pulse_detected
    assert s.pulse_rate_range is PulseRateRange.WITHIN_RANGE
    assert s.improper_measurement_position
    assert_canonical("blood_pressure_measurement", data)


def test_blood_pressure_measurement_nordic_some_in_kpa():
    data = bytes([0x15, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0, 0x3C, 0x00, 0x12, 0x00])
    m = parse_blood_pressure_measurement(data)
    assert m.unit is BloodPressureUnit.KPA
    assert [v.to_decimal() for v in (m.systolic, m.diastolic, m.mean_arterial_pressure)] == [
        Decimal("18.9"),
        Decimal("11"),
        Decimal("15.9"),
    ]
    assert m.user_id is None and m.timestamp is None
    assert m.status is not None
    assert m.status.cuff_too_loose and not m.status.body_movement_detected
    assert m.status.pulse_rate_range is PulseRateRange.BELOW_LOWER_LIMIT
    assert_canonical("blood_pressure_measurement", data)


def test_blood_pressure_measurement_nordic_minimal():
    data = bytes([0x00, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0])
    m = parse_blood_pressure_measurement(data)
    assert m.pulse_rate is None and m.status is None and m.unit is BloodPressureUnit.MMHG
    assert_canonical("blood_pressure_measurement", data)


@pytest.mark.parametrize(
    ("data", "offset"),
    [(bytes([1, 2, 3, 4, 5, 6]), 5), (bytes([3, 2, 3, 4, 5, 6, 7]), 7)],  # Nordic: too short, no timestamp
)
def test_blood_pressure_measurement_nordic_invalid(data, offset):
    with pytest.raises(GattParseError) as err:
        parse_blood_pressure_measurement(data)
    assert err.value.offset == offset


def test_blood_pressure_measurement_nan_mean_arterial_pressure_is_kept_as_special():  # spec: NaN if unavailable
    m = parse_blood_pressure_measurement(h("00 78 00 50 00 ff 07"))
    assert m.mean_arterial_pressure is Special.NAN


def test_blood_pressure_feature():  # spec: bits 0-5
    assert parse("blood_pressure_feature", h("23 00")) == (
        BloodPressureFeature.BODY_MOVEMENT_DETECTION
        | BloodPressureFeature.CUFF_FIT_DETECTION
        | BloodPressureFeature.MULTIPLE_BONDS
    )
    assert int(parse("blood_pressure_feature", h("00 80"))) == 0x8000  # a reserved bit is kept, not dropped


# -- PLX 0x2A5E / 0x2A5F / 0x2A60 (Spezi PLXTests.swift) ----------------------------------------------------


def test_plx_continuous_very_simple():
    m = parse_plx_continuous(bytes([0, 100, 0, 90, 0]))
    assert (m.spo2, m.pulse_rate) == (Float11073(100, 0), Float11073(90, 0))
    assert m.fast is None and m.slow is None and m.measurement_status is None


def test_plx_continuous_simple():
    data = bytes([28, 95, 0, 90, 0, 32, 0, 0, 0, 0, 87, 240])
    m = parse_plx_continuous(data)
    assert (m.spo2, m.pulse_rate) == (Float11073(95, 0), Float11073(90, 0))
    assert m.measurement_status == PlxMeasurementStatus.MEASUREMENT_ONGOING
    assert m.device_and_sensor_status == PlxDeviceAndSensorStatus(0)
    assert m.pulse_amplitude_index == Float11073(87, -1)
    assert_canonical("plx_continuous", data)


def test_plx_continuous_full():
    data = bytes([31, 222, 243, 202, 243, 202, 243, 90, 245, 212, 243, 178, 242, 32, 1, 0, 0, 0, 122, 227])
    m = parse_plx_continuous(data)
    assert [float(v) for v in (m.spo2, m.pulse_rate)] == [99.0, 97.0]
    assert m.fast is not None and [float(m.fast.spo2), float(m.fast.pulse_rate)] == [97.0, 137.0]
    assert m.slow is not None and [float(m.slow.spo2), float(m.slow.pulse_rate)] == [98.0, 69.0]
    assert m.measurement_status == PlxMeasurementStatus.MEASUREMENT_ONGOING | PlxMeasurementStatus.FULLY_QUALIFIED_DATA
    assert m.pulse_amplitude_index is not None and m.pulse_amplitude_index.to_decimal() == Decimal("8.90")
    assert_canonical("plx_continuous", data)


def test_plx_spot_check():
    data = bytes([15, 172, 243, 190, 245, 232, 7, 11, 29, 23, 8, 57, 32, 64, 34, 0, 0, 102, 227])
    m = parse_plx_spot_check(data)
    assert [float(v) for v in (m.spo2, m.pulse_rate)] == [94.0, 147.0]
    assert m.timestamp == DateTime(2024, 11, 29, 23, 8, 57)
    assert m.measurement_status == (
        PlxMeasurementStatus.MEASUREMENT_ONGOING | PlxMeasurementStatus.QUESTIONABLE_MEASUREMENT_DETECTED
    )
    assert m.device_and_sensor_status == (
        PlxDeviceAndSensorStatus.EQUIPMENT_MALFUNCTION_DETECTED | PlxDeviceAndSensorStatus.LOW_PERFUSION_DETECTED
    )
    assert m.pulse_amplitude_index == Float11073(870, -2)
    assert not m.device_clock_not_set
    assert_canonical("plx_spot_check", data)


def test_plx_features():
    data = bytes([163, 0, 64, 16, 128, 1, 0])
    f = parse_plx_features(data)
    assert f.supported == (
        PlxSupportedFeatures.MEASUREMENT_STATUS
        | PlxSupportedFeatures.DEVICE_AND_SENSOR_STATUS
        | PlxSupportedFeatures.SPO2PR_SLOW
        | PlxSupportedFeatures.MULTIPLE_BONDS
    )
    assert f.measurement_status_support == (
        PlxMeasurementStatus.CALIBRATION_ONGOING | PlxMeasurementStatus.EARLY_ESTIMATED_DATA
    )
    assert f.device_and_sensor_status_support == (
        PlxDeviceAndSensorStatus.NONPULSATILE_SIGNAL_DETECTED | PlxDeviceAndSensorStatus.QUESTIONABLE_PULSE_DETECTED
    )
    assert_canonical("plx_features", data)


# -- Glucose 0x2A18 / 0x2A34 / 0x2A51 ------------------------------------------------------------------------

NORDIC_GLUCOSE = bytes([0b011011, 1, 0, 0xE3, 0x07, 2, 27, 11, 10, 30, 0xFB, 0xFF, 30, 0, 0x12, 0b101, 0b1])


def test_glucose_measurement_nordic_vector():
    m = parse_glucose_measurement(NORDIC_GLUCOSE)
    assert m.sequence_number == 1
    assert m.base_time == DateTime(2019, 2, 27, 11, 10, 30)
    assert m.time_offset_minutes == -5
    assert m.measured_at() is not None and m.measured_at().minute == 5  # 11:05:30
    c = m.concentration
    assert c is not None
    assert c.value == Float11073(30, 0) and c.unit is GlucoseConcentrationUnit.KG_PER_L
    assert c.type is GlucoseType.CAPILLARY_PLASMA and c.sample_location is SampleLocation.FINGER  # 0x12
    assert int(m.sensor_status) == 261
    assert m.sensor_status == (
        GlucoseSensorStatus.DEVICE_BATTERY_LOW
        | GlucoseSensorStatus.SAMPLE_SIZE_INSUFFICIENT
        | GlucoseSensorStatus.SENSOR_TEMPERATURE_TOO_LOW
    )
    assert m.context_follows
    assert_canonical("glucose_measurement", NORDIC_GLUCOSE)


def test_glucose_measurement_nordic_invalid():
    data = bytes([0b011011, 0, 0, 0xE2, 0x07, 4, 26, 11, 9, 30, 30, 0, 0x12, 0b101, 0b1])
    with pytest.raises(GattParseError, match="Glucose Measurement: byte 15: expected 2 bytes of sensor status"):
        parse_glucose_measurement(data)


def test_glucose_measurement_in_mol_per_litre():  # spec: bit 2 = mol/L; 5.5 mmol/L = 55e-4 mol/L
    m = parse_glucose_measurement(h("06 2a 00 e8 07 03 01 08 00 00 37 c0 11"))
    assert m.concentration is not None
    assert m.concentration.unit is GlucoseConcentrationUnit.MOL_PER_L
    assert m.concentration.value.to_decimal() == Decimal("0.0055")


def test_glucose_measurement_context_nordic_field_values():
    # Nordic's "full" context, with medication 123.4 (their 123.45 has no exact SFLOAT)
    data = h("ff 00 00 b3 03 64 00 04 12 3c 00 32 04 d2 f4 59 f1")
    c = parse_glucose_measurement_context(data)
    assert c.sequence_number == 0 and c.extended_flags == 0xB3
    assert c.carbohydrate is not None
    assert c.carbohydrate.id is CarbohydrateId.DINNER and c.carbohydrate.amount_kg == Float11073(100, 0)
    assert c.meal is Meal.CASUAL
    assert c.tester_health is not None
    assert c.tester_health.tester is GlucoseTester.HEALTH_CARE_PROFESSIONAL
    assert c.tester_health.health is GlucoseHealth.MINOR_HEALTH_ISSUES
    assert c.exercise is not None and (c.exercise.duration_s, c.exercise.intensity_pct) == (60, 50)
    assert c.medication is not None
    assert c.medication.id is MedicationId.LONG_ACTING_INSULIN and c.medication.unit is MedicationUnit.LITERS
    assert c.medication.amount.to_decimal() == Decimal("123.4")
    assert c.hba1c_pct is not None and c.hba1c_pct.to_decimal() == Decimal("34.5")
    assert_canonical("glucose_measurement_context", data)


def test_glucose_measurement_context_empty():
    assert parse_glucose_measurement_context(bytes([0, 1, 0])).sequence_number == 1


def test_glucose_measurement_context_trailing_padding_is_refused():
    # Nordic's "empty" test sends 17 bytes (flags 0, seq 1, 14 zero bytes) and accepts them; we refuse
    # bytes no flag announces, since they may be a field we cannot read.
    with pytest.raises(GattParseError, match="byte 3: expected the end of the value, got 14 bytes more"):
        parse_glucose_measurement_context(bytes([0, 1, 0]) + bytes(14))


def test_glucose_feature_nordic_vector():
    f = parse("glucose_feature", bytes([0b11110000, 0b00000011]))
    assert f == (
        GlucoseFeature.SENSOR_STRIP_TYPE_ERROR_DETECTION
        | GlucoseFeature.SENSOR_RESULT_HIGH_LOW_DETECTION
        | GlucoseFeature.SENSOR_TEMPERATURE_HIGH_LOW_DETECTION
        | GlucoseFeature.SENSOR_READ_INTERRUPT_DETECTION
        | GlucoseFeature.GENERAL_DEVICE_FAULT
        | GlucoseFeature.TIME_FAULT
    )
    assert not f & GlucoseFeature.MULTIPLE_BOND
    with pytest.raises(GattParseError):
        parse("glucose_feature", b"")


# -- Record Access Control Point 0x2A52 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "request_op", "code"),
    [
        (bytes([6, 0, 1, 1]), RacpOpCode.REPORT_STORED_RECORDS, RacpResponseCode.SUCCESS),
        (bytes([6, 0, 12, 2]), 12, RacpResponseCode.OP_CODE_NOT_SUPPORTED),
        (bytes([6, 0, 1, 3]), RacpOpCode.REPORT_STORED_RECORDS, RacpResponseCode.INVALID_OPERATOR),
        (bytes([6, 0, 2, 4]), RacpOpCode.DELETE_STORED_RECORDS, RacpResponseCode.OPERATOR_NOT_SUPPORTED),
        (bytes([6, 0, 1, 5]), RacpOpCode.REPORT_STORED_RECORDS, RacpResponseCode.INVALID_OPERAND),
        (bytes([6, 0, 1, 6]), RacpOpCode.REPORT_STORED_RECORDS, RacpResponseCode.NO_RECORDS_FOUND),
        (bytes([6, 0, 3, 7]), RacpOpCode.ABORT_OPERATION, RacpResponseCode.ABORT_UNSUCCESSFUL),
        (bytes([6, 0, 2, 8]), RacpOpCode.DELETE_STORED_RECORDS, RacpResponseCode.PROCEDURE_NOT_COMPLETED),
        (bytes([6, 0, 2, 9]), RacpOpCode.DELETE_STORED_RECORDS, RacpResponseCode.OPERAND_NOT_SUPPORTED),
        (bytes([6, 0, 1, 10]), RacpOpCode.REPORT_STORED_RECORDS, 10),  # unknown code: kept as an int
    ],
)
def test_racp_response_codes_nordic(data, request_op, code):
    assert parse_record_access_control_point(data) == RacpResponse(request_op_code=request_op, response_code=code)
    assert_canonical("record_access_control_point", data)


def test_racp_number_of_stored_records_nordic_uint16():
    assert parse_record_access_control_point(bytes([5, 0, 2, 1])) == RacpNumberOfRecords(count=258)


@pytest.mark.parametrize(
    "data",
    [
        bytes([5, 0, 1]),  # Nordic accepts a uint8 count; the Glucose Service defines uint16
        bytes([5, 0, 4, 3, 2, 1]),  # Nordic accepts a uint32 count (a CGM variant); not glucose
        bytes([5, 0, 3, 2, 1]),  # Nordic: unsupported length
        bytes([6, 1, 1]),  # Nordic: response with an operator
        bytes([7, 0]),  # no such op code
        bytes([1, 7]),  # no such operator
        bytes([1, 3, 3, 1, 0]),  # no such filter type
        bytes([1]),
    ],
)
def test_racp_malformed_values_are_refused(data):
    with pytest.raises(GattParseError):
        parse_record_access_control_point(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bytes([1, 1]), RacpRequest(op_code=RacpOpCode.REPORT_STORED_RECORDS, operator=RacpOperator.ALL_RECORDS)),
        (
            bytes([1, 3, 1, 2, 0]),  # report records with sequence number >= 2
            RacpRequest(
                op_code=RacpOpCode.REPORT_STORED_RECORDS,
                operator=RacpOperator.GREATER_THAN_OR_EQUAL_TO,
                filter_type=RacpFilterType.SEQUENCE_NUMBER,
                minimum=2,
            ),
        ),
        (
            bytes([4, 1]),
            RacpRequest(op_code=RacpOpCode.REPORT_NUMBER_OF_STORED_RECORDS, operator=RacpOperator.ALL_RECORDS),
        ),
        (bytes([3, 0]), RacpRequest(op_code=RacpOpCode.ABORT_OPERATION)),
        (
            h("02 04 02 e8 07 01 01 00 00 00 e8 07 01 1f 17 3b 3b"),  # delete within a January by time
            RacpRequest(
                op_code=RacpOpCode.DELETE_STORED_RECORDS,
                operator=RacpOperator.WITHIN_RANGE_OF,
                filter_type=RacpFilterType.USER_FACING_TIME,
                minimum=DateTime(2024, 1, 1, 0, 0, 0),
                maximum=DateTime(2024, 1, 31, 23, 59, 59),
            ),
        ),
    ],
)
def test_racp_requests(data, expected):
    assert parse_record_access_control_point(data) == expected
    assert_canonical("record_access_control_point", data)


# -- Weight Scale 0x2A9D / 0x2A9E (spec) -----------------------------------------------------------------------


def test_weight_measurement_si_minimal():
    m = parse_weight_measurement(h("00 14 37"))  # 14100 × 0.005 kg
    assert m.weight == Decimal("70.5") and m.units is MeasurementSystem.SI
    assert_canonical("weight_measurement", h("00 14 37"))


def test_weight_measurement_imperial_full():
    data = h("0f be 3c e8 07 0b 1d 07 1e 00 02 f5 00 bc 02")
    m = parse_weight_measurement(data)
    assert m.units is MeasurementSystem.IMPERIAL
    assert m.weight == Decimal("155.50")  # 15550 × 0.01 lb
    assert m.timestamp == DateTime(2024, 11, 29, 7, 30, 0)
    assert m.user_id == 2
    assert m.bmi == Decimal("24.5") and m.height == Decimal("70.0")  # 0.1 kg/m², 0.1 in
    assert_canonical("weight_measurement", data)


def test_weight_measurement_unsuccessful_is_not_a_number():
    assert parse_weight_measurement(h("00 ff ff")).weight is None


def test_weight_scale_feature():
    f = parse_weight_scale_feature(h("bf 01 00 00"))
    assert f.timestamp_supported and f.multiple_users_supported and f.bmi_supported
    assert f.weight_resolution is WeightResolution.KG_0_005_OR_LB_0_01
    assert f.height_resolution is HeightResolution.M_0_001_OR_IN_0_1
    assert_canonical("weight_scale_feature", h("bf 01 00 00"))


# -- Battery, Device Information, PAMS -------------------------------------------------------------------------


def test_battery_level():
    assert parse_battery_level(b"\x64") == 100
    for bad in (b"", b"\x65", b"\x32\x00"):
        with pytest.raises(GattParseError):
            parse_battery_level(bad)


def test_device_information_strings():
    assert parse_manufacturer_name(b"Nordic Semiconductor") == "Nordic Semiconductor"
    assert parse("firmware_revision_string", b"1.2.3\x00\x00") == "1.2.3"  # NUL padding is common
    assert parse("model_number_string", "Modèle".encode()) == "Modèle"
    with pytest.raises(GattParseError, match=r"Manufacturer Name String: byte 2: expected UTF-8 text"):
        parse_manufacturer_name(b"ab\xff")
    with pytest.raises(GattParseError, match="NUL"):
        parse("serial_number_string", b"12\x0034")


def test_system_id():
    s = parse_system_id(h("01 02 03 04 05 06 07 08"))
    assert s.manufacturer_identifier == 0x0504030201 and s.organizationally_unique_identifier == 0x080706
    assert_canonical("system_id", h("01 02 03 04 05 06 07 08"))


def test_step_counter_activity_summary_subset():
    data = h("03 03 01 00 00 00 3c 00 00 00 07 00 00 00 10 27 00 e8 03 00")
    m = parse_step_counter_activity_summary(data)
    assert (m.session_id, m.sub_session_id, m.relative_timestamp_s, m.sequence_number) == (1, 0, 60, 7)
    assert (m.normal_walking_steps, m.intensity_steps, m.floor_steps, m.distance) == (10000, 1000, None, None)
    assert m.steps == 11000
    assert_canonical("step_counter_activity_summary", data)


def test_step_counter_activity_summary_segments_are_refused():
    with pytest.raises(GattParseError, match="unsegmented"):
        parse_step_counter_activity_summary(h("01 03 01 00 00 00 3c 00 00 00 07 00 00 00 10 27 00 e8 03 00"))


def test_reserved_flag_bits_are_refused_with_the_flags_named():
    with pytest.raises(GattParseError) as err:
        parse_weight_measurement(h("10 14 37"))
    assert err.value.offset == 0
    assert "reserved bits 0x10" in str(err.value)


def test_invalid_timestamps_are_refused():
    with pytest.raises(GattParseError, match="month 13"):
        parse_temperature_measurement(h("02 b0 0e 00 fe e8 07 0d 01 00 00 00"))
    with pytest.raises(GattParseError, match="not a calendar date"):
        parse_temperature_measurement(h("02 b0 0e 00 fe e8 07 02 1e 00 00 00"))  # 30 February
