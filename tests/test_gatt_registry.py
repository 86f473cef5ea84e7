"""The parser registry: every `parser:` a device profile names exists, under the UUID the profile uses."""

from __future__ import annotations

import pytest

from carechain.profiles import load_profiles
from edge_agent.gatt import CODECS, GattError, codec, codec_for_uuid, decode, encode, parse, to_readings
from edge_agent.gatt.heart_rate import HeartRateMeasurement

PROFILES = load_profiles()
PROFILE_CHARACTERISTICS = [
    (profile.name, ch)
    for profile in PROFILES.values()
    if profile.gatt is not None
    for ch in profile.gatt.characteristics
]


@pytest.mark.parametrize(
    ("profile", "characteristic"), PROFILE_CHARACTERISTICS, ids=[f"{p}:{c.parser}" for p, c in PROFILE_CHARACTERISTICS]
)
def test_every_profile_parser_is_registered_under_the_profiles_uuid(profile, characteristic):
    registered = codec(characteristic.parser)
    assert registered.uuid == characteristic.uuid, f"{profile}: {characteristic.parser} is {registered.uuid}"
    assert codec_for_uuid(characteristic.uuid) is registered


@pytest.mark.parametrize(("profile", "characteristic"), PROFILE_CHARACTERISTICS)
def test_characteristics_that_produce_events_have_a_readings_mapping(profile, characteristic):
    assert (characteristic.event is not None) == (codec(characteristic.parser).readings is not None)


def test_the_registry_covers_every_parser_the_brief_lists():
    expected = {
        "heart_rate_measurement", "temperature_measurement", "temperature_type", "blood_pressure_measurement",
        "blood_pressure_feature", "plx_spot_check", "plx_continuous", "plx_features", "glucose_measurement",
        "glucose_measurement_context", "glucose_feature", "record_access_control_point", "weight_measurement",
        "weight_scale_feature", "battery_level", "step_counter_activity_summary",
    }  # fmt: skip
    assert expected <= set(CODECS)


def test_unknown_parser_names_list_the_known_ones():
    with pytest.raises(GattError, match="no GATT parser named 'heart_rate'; known parsers: battery_level, "):
        decode("heart_rate", b"\x00\x48")


def test_codec_for_uuid_accepts_short_and_full_forms():
    assert codec_for_uuid(0x2A19) is CODECS["battery_level"]
    assert codec_for_uuid("00002A19-0000-1000-8000-00805F9B34FB") is CODECS["battery_level"]
    assert codec_for_uuid(0x2A00) is None
    assert codec_for_uuid("12345678-0000-1000-8000-00805f9b34fb") is None
    assert codec_for_uuid("not a uuid") is None


def test_decode_is_parse_then_to_readings():
    data = bytes([0x06, 72])
    assert decode("heart_rate_measurement", data) == to_readings(
        "heart_rate_measurement", parse("heart_rate_measurement", data)
    )
    assert encode("heart_rate_measurement", HeartRateMeasurement(bpm=72, sensor_contact=True)) == data


def test_device_information_codecs_are_registered_for_the_also_read_service():
    for uuid in (0x2A29, 0x2A24, 0x2A25, 0x2A26, 0x2A27, 0x2A28, 0x2A23):
        assert codec_for_uuid(uuid) is not None
