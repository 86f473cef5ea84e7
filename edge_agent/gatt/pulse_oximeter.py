"""Pulse Oximeter Service (PLXS): PLX Spot-Check Measurement (0x2A5E), PLX Continuous Measurement (0x2A5F)
and PLX Features (0x2A60).

Spot-check flags (uint8): bit 0 Timestamp, bit 1 Measurement Status, bit 2 Device and Sensor Status,
bit 3 Pulse Amplitude Index present; bit 4 device clock is not set; bits 5-7 reserved. Fields: SpO2 (%)
and PR (beats/min) as SFLOATs, Timestamp (Date Time), Measurement Status (uint16), Device and Sensor Status
(uint24), Pulse Amplitude Index (SFLOAT, %).

Continuous flags (uint8): bit 0 SpO2PR-Fast, bit 1 SpO2PR-Slow, bit 2 Measurement Status, bit 3 Device and
Sensor Status, bit 4 Pulse Amplitude Index present; bits 5-7 reserved. Fields: SpO2PR-Normal, -Fast and
-Slow (two SFLOATs each), then the statuses and the index as for a spot check.

PLX Features: Supported Features (uint16), then Measurement Status Support (uint16) if bit 0 and Device and
Sensor Status Support (uint24) if bit 1.

Reserved bits of the status and feature fields are kept in the IntFlag values as received.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from edge_agent.gatt._codec import Reader, Writer, flag_bits
from edge_agent.gatt.date_time import DateTime
from edge_agent.gatt.ieee11073 import Number11073

SPOT_CHECK_CHARACTERISTIC = "PLX Spot-Check Measurement"
SPOT_CHECK_UUID = 0x2A5E
CONTINUOUS_CHARACTERISTIC = "PLX Continuous Measurement"
CONTINUOUS_UUID = 0x2A5F
FEATURES_CHARACTERISTIC = "PLX Features"
FEATURES_UUID = 0x2A60


class PlxMeasurementStatus(IntFlag):
    """Measurement Status (uint16); bits 0-4 are reserved."""

    MEASUREMENT_ONGOING = 1 << 5
    EARLY_ESTIMATED_DATA = 1 << 6
    VALIDATED_DATA = 1 << 7
    FULLY_QUALIFIED_DATA = 1 << 8
    DATA_FROM_MEASUREMENT_STORAGE = 1 << 9
    DATA_FOR_DEMONSTRATION = 1 << 10
    DATA_FOR_TESTING = 1 << 11
    CALIBRATION_ONGOING = 1 << 12
    MEASUREMENT_UNAVAILABLE = 1 << 13
    QUESTIONABLE_MEASUREMENT_DETECTED = 1 << 14
    INVALID_MEASUREMENT_DETECTED = 1 << 15


class PlxDeviceAndSensorStatus(IntFlag):
    """Device and Sensor Status (uint24); bits 16-23 are reserved."""

    EXTENDED_DISPLAY_UPDATE_ONGOING = 1 << 0
    EQUIPMENT_MALFUNCTION_DETECTED = 1 << 1
    SIGNAL_PROCESSING_IRREGULARITY_DETECTED = 1 << 2
    INADEQUATE_SIGNAL_DETECTED = 1 << 3
    POOR_SIGNAL_DETECTED = 1 << 4
    LOW_PERFUSION_DETECTED = 1 << 5
    ERRATIC_SIGNAL_DETECTED = 1 << 6
    NONPULSATILE_SIGNAL_DETECTED = 1 << 7
    QUESTIONABLE_PULSE_DETECTED = 1 << 8
    SIGNAL_ANALYSIS_ONGOING = 1 << 9
    SENSOR_INTERFERENCE_DETECTED = 1 << 10
    SENSOR_UNCONNECTED_TO_USER = 1 << 11
    UNKNOWN_SENSOR_CONNECTED = 1 << 12
    SENSOR_DISPLACED = 1 << 13
    SENSOR_MALFUNCTIONING = 1 << 14
    SENSOR_DISCONNECTED = 1 << 15


class PlxSupportedFeatures(IntFlag):
    """Supported Features (uint16) of PLX Features; bits 8-15 are reserved."""

    MEASUREMENT_STATUS = 1 << 0
    DEVICE_AND_SENSOR_STATUS = 1 << 1
    SPOT_CHECK_MEASUREMENT_STORAGE = 1 << 2
    SPOT_CHECK_TIMESTAMP = 1 << 3
    SPO2PR_FAST = 1 << 4
    SPO2PR_SLOW = 1 << 5
    PULSE_AMPLITUDE_INDEX = 1 << 6
    MULTIPLE_BONDS = 1 << 7


@dataclass(frozen=True, kw_only=True)
class SpO2PulseRate:
    """One SpO2PR pair: oxygen saturation (%) and pulse rate (beats/min)."""

    spo2: Number11073
    pulse_rate: Number11073


@dataclass(frozen=True, kw_only=True)
class PlxSpotCheckMeasurement:
    """One PLX Spot-Check Measurement indication."""

    spo2: Number11073  # %
    pulse_rate: Number11073  # beats/min
    timestamp: DateTime | None = None
    measurement_status: PlxMeasurementStatus | None = None
    device_and_sensor_status: PlxDeviceAndSensorStatus | None = None
    pulse_amplitude_index: Number11073 | None = None  # %
    device_clock_not_set: bool = False


@dataclass(frozen=True, kw_only=True)
class PlxContinuousMeasurement:
    """One PLX Continuous Measurement notification (`spo2`/`pulse_rate` are the SpO2PR-Normal pair)."""

    spo2: Number11073
    pulse_rate: Number11073
    fast: SpO2PulseRate | None = None
    slow: SpO2PulseRate | None = None
    measurement_status: PlxMeasurementStatus | None = None
    device_and_sensor_status: PlxDeviceAndSensorStatus | None = None
    pulse_amplitude_index: Number11073 | None = None


@dataclass(frozen=True, kw_only=True)
class PlxFeatures:
    """PLX Features; each support field is present exactly when its Supported Features bit is set."""

    supported: PlxSupportedFeatures
    measurement_status_support: PlxMeasurementStatus | None = None
    device_and_sensor_status_support: PlxDeviceAndSensorStatus | None = None


def _read_statuses(
    r: Reader, status: bool, device: bool, index: bool
) -> tuple[PlxMeasurementStatus | None, PlxDeviceAndSensorStatus | None, Number11073 | None]:
    measurement = PlxMeasurementStatus(r.u16("measurement status (uint16)")) if status else None
    sensor = PlxDeviceAndSensorStatus(r.u24("device and sensor status (uint24)")) if device else None
    pai = r.sfloat("pulse amplitude index") if index else None
    return measurement, sensor, pai


def _write_statuses(
    w: Writer,
    measurement: PlxMeasurementStatus | None,
    sensor: PlxDeviceAndSensorStatus | None,
    pai: Number11073 | None,
) -> None:
    if measurement is not None:
        w.u16(measurement, "measurement_status")
    if sensor is not None:
        w.u24(sensor, "device_and_sensor_status")
    if pai is not None:
        w.sfloat(pai, "pulse_amplitude_index")


def parse_plx_spot_check(data: bytes) -> PlxSpotCheckMeasurement:
    """Bytes of a 0x2A5E value → `PlxSpotCheckMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, SPOT_CHECK_CHARACTERISTIC)
    flags = r.flags(0x1F)
    spo2 = r.sfloat("SpO2")
    pulse = r.sfloat("pulse rate")
    timestamp = r.date_time() if flags & 0x01 else None
    measurement, sensor, pai = _read_statuses(r, bool(flags & 0x02), bool(flags & 0x04), bool(flags & 0x08))
    r.end()
    return PlxSpotCheckMeasurement(
        spo2=spo2,
        pulse_rate=pulse,
        timestamp=timestamp,
        measurement_status=measurement,
        device_and_sensor_status=sensor,
        pulse_amplitude_index=pai,
        device_clock_not_set=bool(flags & 0x10),
    )


def encode_plx_spot_check(m: PlxSpotCheckMeasurement) -> bytes:
    """`PlxSpotCheckMeasurement` → bytes."""
    w = Writer(SPOT_CHECK_CHARACTERISTIC)
    flags = flag_bits(
        {
            0x01: m.timestamp is not None,
            0x02: m.measurement_status is not None,
            0x04: m.device_and_sensor_status is not None,
            0x08: m.pulse_amplitude_index is not None,
            0x10: bool(m.device_clock_not_set),
        }
    )
    w.u8(flags, "flags")
    w.sfloat(m.spo2, "spo2")
    w.sfloat(m.pulse_rate, "pulse_rate")
    if m.timestamp is not None:
        w.date_time(m.timestamp)
    _write_statuses(w, m.measurement_status, m.device_and_sensor_status, m.pulse_amplitude_index)
    return w.getvalue()


def parse_plx_continuous(data: bytes) -> PlxContinuousMeasurement:
    """Bytes of a 0x2A5F value → `PlxContinuousMeasurement`; `GattParseError` if malformed."""
    r = Reader(data, CONTINUOUS_CHARACTERISTIC)
    flags = r.flags(0x1F)
    spo2 = r.sfloat("SpO2 (normal)")
    pulse = r.sfloat("pulse rate (normal)")
    fast = slow = None
    if flags & 0x01:
        fast = SpO2PulseRate(spo2=r.sfloat("SpO2 (fast)"), pulse_rate=r.sfloat("pulse rate (fast)"))
    if flags & 0x02:
        slow = SpO2PulseRate(spo2=r.sfloat("SpO2 (slow)"), pulse_rate=r.sfloat("pulse rate (slow)"))
    measurement, sensor, pai = _read_statuses(r, bool(flags & 0x04), bool(flags & 0x08), bool(flags & 0x10))
    r.end()
    return PlxContinuousMeasurement(
        spo2=spo2,
        pulse_rate=pulse,
        fast=fast,
        slow=slow,
        measurement_status=measurement,
        device_and_sensor_status=sensor,
        pulse_amplitude_index=pai,
    )


def encode_plx_continuous(m: PlxContinuousMeasurement) -> bytes:
    """`PlxContinuousMeasurement` → bytes."""
    w = Writer(CONTINUOUS_CHARACTERISTIC)
    flags = flag_bits(
        {
            0x01: m.fast is not None,
            0x02: m.slow is not None,
            0x04: m.measurement_status is not None,
            0x08: m.device_and_sensor_status is not None,
            0x10: m.pulse_amplitude_index is not None,
        }
    )
    w.u8(flags, "flags")
    w.sfloat(m.spo2, "spo2")
    w.sfloat(m.pulse_rate, "pulse_rate")
    for name, pair in (("fast", m.fast), ("slow", m.slow)):
        if pair is not None:
            w.sfloat(pair.spo2, f"{name}.spo2")
            w.sfloat(pair.pulse_rate, f"{name}.pulse_rate")
    _write_statuses(w, m.measurement_status, m.device_and_sensor_status, m.pulse_amplitude_index)
    return w.getvalue()


def parse_plx_features(data: bytes) -> PlxFeatures:
    """Bytes of a 0x2A60 value → `PlxFeatures`; `GattParseError` if malformed."""
    r = Reader(data, FEATURES_CHARACTERISTIC)
    supported = PlxSupportedFeatures(r.u16("supported features (uint16)"))
    status = device = None
    if supported & PlxSupportedFeatures.MEASUREMENT_STATUS:
        status = PlxMeasurementStatus(r.u16("measurement status support (uint16)"))
    if supported & PlxSupportedFeatures.DEVICE_AND_SENSOR_STATUS:
        device = PlxDeviceAndSensorStatus(r.u24("device and sensor status support (uint24)"))
    r.end()
    return PlxFeatures(supported=supported, measurement_status_support=status, device_and_sensor_status_support=device)


def encode_plx_features(f: PlxFeatures) -> bytes:
    """`PlxFeatures` → bytes; each support field must be given exactly when its feature bit is set."""
    w = Writer(FEATURES_CHARACTERISTIC)
    supported = f.supported
    for bit, value, name in (
        (PlxSupportedFeatures.MEASUREMENT_STATUS, f.measurement_status_support, "measurement_status_support"),
        (
            PlxSupportedFeatures.DEVICE_AND_SENSOR_STATUS,
            f.device_and_sensor_status_support,
            "device_and_sensor_status_support",
        ),
    ):
        if isinstance(supported, int) and bool(supported & bit) != (value is not None):
            raise w.fail(name, f"give it exactly when supported has {bit.name}")
    w.u16(supported, "supported")
    if f.measurement_status_support is not None:
        w.u16(f.measurement_status_support, "measurement_status_support")
    if f.device_and_sensor_status_support is not None:
        w.u24(f.device_and_sensor_status_support, "device_and_sensor_status_support")
    return w.getvalue()
