"""The parser registry: a device profile's `parser:` name → the codec for that characteristic.

    decode("heart_rate_measurement", b"\\x06\\x48")  →  [("heart_rate", HeartRate(bpm=72, sensor_contact=True))]

`decode(name, data)` = `to_readings(name, parse(name, data))`: bytes from a notification to the
`(event kind, body model)` pairs an agent signs. Characteristics that are not events (features, battery,
Temperature Type, the context and the control point) parse normally and give no readings (`[]`).

To support a new characteristic: write `parse_x`/`encode_x` in a module of this package, add a
`CharacteristicCodec` to `_CODECS` below (with a `readings` function if it makes events), and name it in
the profile's `parser:` (tests/test_gatt_registry.py checks every profile's parsers exist here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from carechain.profiles import SIG_BASE_UUID
from edge_agent.gatt import battery, readings
from edge_agent.gatt import blood_pressure as bp
from edge_agent.gatt import device_information as dis
from edge_agent.gatt import glucose as gl
from edge_agent.gatt import health_thermometer as ht
from edge_agent.gatt import heart_rate as hr
from edge_agent.gatt import physical_activity as pam
from edge_agent.gatt import pulse_oximeter as plx
from edge_agent.gatt import record_access as racp
from edge_agent.gatt import weight_scale as ws
from edge_agent.gatt.errors import GattError
from edge_agent.gatt.readings import Reading


@dataclass(frozen=True)
class CharacteristicCodec:
    """How to read, write and map one GATT characteristic."""

    name: str  # the profile's `parser:` name
    uuid16: int  # Bluetooth SIG 16-bit UUID
    characteristic: str  # the SIG's name for it
    parse: Callable[[bytes], Any]
    encode: Callable[[Any], bytes]
    readings: Callable[[Any], list[Reading]] | None = None  # None: not an event source

    @property
    def uuid(self) -> str:
        """The full 128-bit UUID, lowercase, as profiles write it."""
        return SIG_BASE_UUID.format(self.uuid16)


def _codec(
    name: str,
    uuid16: int,
    characteristic: str,
    parse: Callable[[bytes], Any],
    encode: Callable[[Any], bytes],
    to_readings: Callable[[Any], list[Reading]] | None = None,
) -> CharacteristicCodec:
    return CharacteristicCodec(name, uuid16, characteristic, parse, encode, to_readings)


def _strings() -> list[CharacteristicCodec]:
    pairs = (
        ("manufacturer_name_string", dis.MANUFACTURER_NAME, dis.parse_manufacturer_name, dis.encode_manufacturer_name),
        ("model_number_string", dis.MODEL_NUMBER, dis.parse_model_number, dis.encode_model_number),
        ("serial_number_string", dis.SERIAL_NUMBER, dis.parse_serial_number, dis.encode_serial_number),
        ("firmware_revision_string", dis.FIRMWARE_REVISION, dis.parse_firmware_revision, dis.encode_firmware_revision),
        ("hardware_revision_string", dis.HARDWARE_REVISION, dis.parse_hardware_revision, dis.encode_hardware_revision),
        ("software_revision_string", dis.SOFTWARE_REVISION, dis.parse_software_revision, dis.encode_software_revision),
    )
    return [_codec(name, uuid, title, parse, encode) for name, (title, uuid), parse, encode in pairs]


_CODECS = [
    _codec(
        "heart_rate_measurement",
        hr.UUID,
        hr.CHARACTERISTIC,
        hr.parse_heart_rate_measurement,
        hr.encode_heart_rate_measurement,
        readings.heart_rate_readings,
    ),
    _codec(
        "temperature_measurement",
        ht.UUID,
        ht.CHARACTERISTIC,
        ht.parse_temperature_measurement,
        ht.encode_temperature_measurement,
        readings.temperature_readings,
    ),
    _codec(
        "temperature_type",
        ht.TYPE_UUID,
        ht.TYPE_CHARACTERISTIC,
        ht.parse_temperature_type,
        ht.encode_temperature_type,
    ),
    _codec(
        "blood_pressure_measurement",
        bp.UUID,
        bp.CHARACTERISTIC,
        bp.parse_blood_pressure_measurement,
        bp.encode_blood_pressure_measurement,
        readings.blood_pressure_readings,
    ),
    _codec(
        "blood_pressure_feature",
        bp.FEATURE_UUID,
        bp.FEATURE_CHARACTERISTIC,
        bp.parse_blood_pressure_feature,
        bp.encode_blood_pressure_feature,
    ),
    _codec(
        "plx_spot_check",
        plx.SPOT_CHECK_UUID,
        plx.SPOT_CHECK_CHARACTERISTIC,
        plx.parse_plx_spot_check,
        plx.encode_plx_spot_check,
        readings.plx_spot_check_readings,
    ),
    _codec(
        "plx_continuous",
        plx.CONTINUOUS_UUID,
        plx.CONTINUOUS_CHARACTERISTIC,
        plx.parse_plx_continuous,
        plx.encode_plx_continuous,
        readings.plx_continuous_readings,
    ),
    _codec(
        "plx_features",
        plx.FEATURES_UUID,
        plx.FEATURES_CHARACTERISTIC,
        plx.parse_plx_features,
        plx.encode_plx_features,
    ),
    _codec(
        "glucose_measurement",
        gl.MEASUREMENT_UUID,
        gl.MEASUREMENT_CHARACTERISTIC,
        gl.parse_glucose_measurement,
        gl.encode_glucose_measurement,
        readings.glucose_readings,
    ),
    _codec(
        "glucose_measurement_context",
        gl.CONTEXT_UUID,
        gl.CONTEXT_CHARACTERISTIC,
        gl.parse_glucose_measurement_context,
        gl.encode_glucose_measurement_context,
    ),
    _codec(
        "glucose_feature",
        gl.FEATURE_UUID,
        gl.FEATURE_CHARACTERISTIC,
        gl.parse_glucose_feature,
        gl.encode_glucose_feature,
    ),
    _codec(
        "record_access_control_point",
        racp.UUID,
        racp.CHARACTERISTIC,
        racp.parse_record_access_control_point,
        racp.encode_record_access_control_point,
    ),
    _codec(
        "weight_measurement",
        ws.UUID,
        ws.CHARACTERISTIC,
        ws.parse_weight_measurement,
        ws.encode_weight_measurement,
        readings.weight_readings,
    ),
    _codec(
        "weight_scale_feature",
        ws.FEATURE_UUID,
        ws.FEATURE_CHARACTERISTIC,
        ws.parse_weight_scale_feature,
        ws.encode_weight_scale_feature,
    ),
    _codec(
        "battery_level",
        battery.UUID,
        battery.CHARACTERISTIC,
        battery.parse_battery_level,
        battery.encode_battery_level,
    ),
    _codec(
        "step_counter_activity_summary",
        pam.UUID,
        pam.CHARACTERISTIC,
        pam.parse_step_counter_activity_summary,
        pam.encode_step_counter_activity_summary,
        readings.step_counter_readings,
    ),
    *_strings(),
    _codec("system_id", dis.SYSTEM_ID_UUID, dis.SYSTEM_ID_CHARACTERISTIC, dis.parse_system_id, dis.encode_system_id),
]

CODECS: Mapping[str, CharacteristicCodec] = MappingProxyType({c.name: c for c in _CODECS})
"""Every supported characteristic, by parser name."""

_BY_UUID = {c.uuid16: c for c in _CODECS}


def codec(parser_name: str) -> CharacteristicCodec:
    """The codec a profile's `parser:` names; `GattError` listing the known names if there is none."""
    try:
        return CODECS[parser_name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(CODECS))
        raise GattError(f"no GATT parser named {parser_name!r}; known parsers: {known}") from None


def codec_for_uuid(uuid: int | str) -> CharacteristicCodec | None:
    """The codec for a characteristic UUID (16-bit int or full 128-bit string), or None if unsupported."""
    if isinstance(uuid, str):
        text = uuid.lower()
        if len(text) != 36 or not text.startswith("0000") or text[8:] != SIG_BASE_UUID.format(0)[8:]:
            return None
        try:
            uuid = int(text[4:8], 16)
        except ValueError:
            return None
    return _BY_UUID.get(uuid)


def parse(parser_name: str, data: bytes) -> Any:
    """Bytes → the characteristic's typed value (a frozen dataclass, IntFlag, int or str)."""
    return codec(parser_name).parse(data)


def encode(parser_name: str, value: Any) -> bytes:
    """The characteristic's typed value → bytes (what a peripheral notifies or a collector writes)."""
    return codec(parser_name).encode(value)


def to_readings(parser_name: str, measurement: Any) -> list[Reading]:
    """A parsed value → `(event kind, body model)` pairs; `[]` if the characteristic makes no events.

    Raises `GattReadingError` when the value cannot honestly become a body (a required special value,
    a missing concentration, a value outside the body's range).
    """
    to = codec(parser_name).readings
    return [] if to is None else to(measurement)


def decode(parser_name: str, data: bytes) -> list[Reading]:
    """Bytes → `(event kind, body model)` pairs in one call: `to_readings(name, parse(name, data))`."""
    return to_readings(parser_name, parse(parser_name, data))
