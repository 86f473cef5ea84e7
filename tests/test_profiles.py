"""Device profiles: the shipped ones load, and every broken profile names its file, line and field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from carechain.events import BODY_MODELS
from carechain.profiles import (
    PROFILES_DIR_ENV,
    DeviceProfile,
    ProfileError,
    bluetooth_uuid,
    default_profiles_dir,
    installed_profiles_dir,
    load_profile,
    load_profiles,
)

SHIPPED = {
    "heart_rate_band": 0x180D,
    "thermometer": 0x1809,
    "blood_pressure_cuff": 0x1810,
    "pulse_oximeter": 0x1822,
    "glucose_meter": 0x1808,
    "scale": 0x181D,
    "pharmacy_terminal": None,
}
HR_BAND = (default_profiles_dir() / "heart_rate_band.yaml").read_text()


def line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of `needle` in `text`."""
    assert needle in text, needle
    return text[: text.index(needle)].count("\n") + 1


def write_variant(tmp_path: Path, old: str, new: str, *, name: str = "heart_rate_band") -> tuple[Path, str]:
    """The shipped heart-rate band profile with one edit, written as `<name>.yaml`."""
    assert old in HR_BAND, old
    text = HR_BAND.replace(old, new, 1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path, text


def profile_error(path: Path) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return info.value


# -- the shipped profiles ---------------------------------------------------------------------------------


def test_all_shipped_profiles_load_by_name() -> None:
    profiles = load_profiles()
    assert set(profiles) == set(SHIPPED)
    for name, profile in profiles.items():
        assert isinstance(profile, DeviceProfile)
        assert profile.name == name
        assert set(profile.events) <= set(BODY_MODELS)
        assert profile.sampling.simulate is not None and set(profile.sampling.simulate.kinds()) == set(
            profile.events
        )


@pytest.mark.parametrize("name", [n for n, s in SHIPPED.items() if s is not None])
def test_ble_profiles_name_the_sig_primary_service_and_status_services(name: str) -> None:
    profile = load_profiles()[name]
    assert profile.transport == "ble" and profile.gatt is not None
    assert profile.gatt.service == bluetooth_uuid(SHIPPED[name])
    assert profile.gatt.also_read == [bluetooth_uuid(0x180F), bluetooth_uuid(0x180A)]
    battery = [c for c in profile.gatt.characteristics if c.parser == "battery_level"]
    assert len(battery) == 1 and profile.gatt.service_of(battery[0]) == bluetooth_uuid(0x180F)
    assert {c.event for c in profile.gatt.characteristics if c.event} == set(profile.events)


def test_heart_rate_band_emits_heart_rate_and_activity_at_their_own_intervals() -> None:
    band = load_profiles()["heart_rate_band"]
    assert band.events == ["heart_rate", "activity"]
    assert band.interval_s("heart_rate") == 5 and band.interval_s("activity") == 60
    assert band.unit("heart_rate", "bpm") == "/min"


def test_glucose_meter_lists_the_record_access_control_point() -> None:
    gatt = load_profiles()["glucose_meter"].gatt
    assert gatt is not None
    racp = [c for c in gatt.characteristics if c.uuid == bluetooth_uuid(0x2A52)]
    assert len(racp) == 1 and racp[0].mode == "indicate" and racp[0].event is None


def test_fhir_codes_are_the_loinc_vital_sign_codes() -> None:
    profiles = load_profiles()
    codes = {
        (name, obs.event, obs.code): [c.code for c in obs.components]
        for name, p in profiles.items()
        for obs in p.fhir
    }
    assert ("heart_rate_band", "heart_rate", "8867-4") in codes
    assert ("heart_rate_band", "activity", "55423-8") in codes
    assert ("thermometer", "temperature", "8310-5") in codes
    assert codes[("blood_pressure_cuff", "blood_pressure", "85354-9")][:2] == ["8480-6", "8462-4"]
    assert ("pulse_oximeter", "spo2", "59408-5") in codes
    assert ("glucose_meter", "glucose", "2339-0") in codes
    assert ("scale", "weight", "29463-7") in codes
    assert profiles["glucose_meter"].unit("glucose", "mg_dl") == "mg/dL"


def test_pharmacy_terminal_has_a_catalogue_with_rx_items_and_an_immunization() -> None:
    terminal = load_profiles()["pharmacy_terminal"]
    assert terminal.transport == "network" and terminal.gatt is None and terminal.events == ["purchase"]
    assert terminal.sampling.simulate is not None
    sim = terminal.sampling.simulate.purchase
    assert sim is not None
    assert any(item.rx_only for item in sim.catalogue)
    assert any(not item.rx_only for item in sim.catalogue)
    assert [item.code for item in sim.catalogue if item.immunization] == ["49281-0621-15"]
    assert all(isinstance(item.price_minor, int) for item in sim.catalogue)


def test_profiles_dir_can_be_overridden_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "heart_rate_band.yaml").write_text(HR_BAND)
    monkeypatch.setenv(PROFILES_DIR_ENV, str(tmp_path))
    assert default_profiles_dir() == tmp_path
    assert list(load_profiles()) == ["heart_rate_band"]


def test_lookup_order_is_explicit_folder_then_environment_then_installed_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import device_profiles

    monkeypatch.delenv(PROFILES_DIR_ENV, raising=False)
    installed = installed_profiles_dir()
    assert installed == Path(device_profiles.__file__).parent  # package data, wherever carechain is installed
    assert default_profiles_dir() == installed
    assert set(load_profiles()) == set(SHIPPED)

    from_env, explicit = tmp_path / "env", tmp_path / "explicit"
    for folder, name in ((from_env, "thermometer"), (explicit, "scale")):
        folder.mkdir()
        (folder / f"{name}.yaml").write_text((installed / f"{name}.yaml").read_text())
    monkeypatch.setenv(PROFILES_DIR_ENV, str(from_env))
    assert list(load_profiles()) == ["thermometer"]
    assert list(load_profiles(explicit)) == ["scale"]


def test_a_missing_profiles_package_says_how_to_fix_it() -> None:
    code = (
        "import sys; sys.modules['device_profiles'] = None\n"
        "from carechain.profiles import ProfileError, installed_profiles_dir\n"
        "try:\n    installed_profiles_dir()\nexcept ProfileError as exc:\n    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != PROFILES_DIR_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert "device_profiles package is not installed" in out and PROFILES_DIR_ENV in out


# -- errors name the file, the line and the field -------------------------------------------------------


def test_name_must_equal_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "hr.yaml"
    path.write_text(HR_BAND)
    err = profile_error(path)
    assert err.field == "name" and err.line == line_of(HR_BAND, "name: heart_rate_band")
    assert str(err).startswith(f"{path}:{err.line}: name: 'heart_rate_band' must equal the file name 'hr'")


def test_unknown_event_kind_lists_the_known_kinds(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "events: [heart_rate, activity]", "events: [heart_rate, sleep]")
    err = profile_error(path)
    assert err.field == "events[1]" and err.line == line_of(text, "events:")
    assert "unknown event kind 'sleep'" in str(err) and "blood_pressure" in str(err)


def test_unknown_event_kind_used_throughout_is_reported_where_used(tmp_path: Path) -> None:
    text = (
        "name: bed_sensor\ndescription: d\ntransport: network\nevents: [sleep]\n"
        "units:\n  sleep: {hours: h}\nsampling: {interval_s: 60}\n"
    )
    path = tmp_path / "bed_sensor.yaml"
    path.write_text(text)
    err = profile_error(path)
    assert err.field == "events[0]" and err.line == 4
    assert f"{path}:6: units.sleep: unknown event kind 'sleep'" in str(err)


def test_characteristic_event_must_be_one_of_the_profiles_events(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "      event: activity\n", "      event: spo2\n")
    err = profile_error(path)
    assert f"{path}:{line_of(text, 'event: spo2')}: gatt.characteristics[1].event: event 'spo2'" in str(err)
    # …and the activity events it no longer produces are reported as well
    assert "no characteristic under gatt produces 'activity' events" in str(err)


def test_short_uuid_is_refused_with_the_full_form_to_write(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "service: 0000180d-0000-1000-8000-00805f9b34fb", "service: 0x180D")
    err = profile_error(path)
    assert err.field == "gatt.service" and err.line == line_of(text, "service: 0x180D")
    assert "0000180d-0000-1000-8000-00805f9b34fb" in str(err)


def test_loinc_code_with_a_wrong_check_digit_is_refused(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, 'code: "8867-4"', 'code: "8867-5"')
    err = profile_error(path)
    assert err.field == "fhir[0].code" and err.line == line_of(text, '"8867-5"')
    assert "check digit" in str(err)


def test_missing_section_is_reported_at_its_parent(tmp_path: Path) -> None:
    text = HR_BAND[: HR_BAND.index("sampling:")] + HR_BAND[HR_BAND.index("fhir:") :]
    path = tmp_path / "heart_rate_band.yaml"
    path.write_text(text)
    err = profile_error(path)
    assert err.field == "sampling" and "required field is missing" in str(err)


def test_misspelt_field_is_reported_on_its_line(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "transport: ble", "transprt: ble")
    err = profile_error(path)
    assert f"{path}:{line_of(text, 'transprt')}: transprt: unknown field" in str(err)


def test_wrong_value_type_says_what_was_found(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "mode: notify", "mode: push")
    err = profile_error(path)
    assert err.field == "gatt.characteristics[0].mode" and err.line == line_of(text, "mode: push")
    assert "'push'" in str(err)


def test_ble_profile_needs_gatt_and_network_profile_must_not_have_it(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "transport: ble", "transport: network")
    err = profile_error(path)
    assert err.field == "gatt" and err.line == line_of(text, "gatt:")
    terminal = (default_profiles_dir() / "pharmacy_terminal.yaml").read_text()
    path = tmp_path / "pharmacy_terminal.yaml"
    path.write_text(terminal.replace("transport: network", "transport: ble"))
    err = profile_error(path)
    assert err.field == "transport" and "needs a `gatt:` section" in str(err)


def test_unit_for_a_field_the_event_does_not_have(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, 'energy_kj: "kJ"', 'energy: "kJ"')
    err = profile_error(path)
    assert err.field == "units.heart_rate.energy" and err.line == line_of(text, "heart_rate: {bpm")
    assert "heart_rate events have no field 'energy'" in str(err) and "energy_kj" in str(err)


def test_fhir_value_needs_a_unit(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, 'steps: "{steps}", ', "")
    err = profile_error(path)
    assert err.field == "fhir[1].value" and err.line == line_of(text, "value: steps")
    assert "add it under units.activity" in str(err)


def test_simulation_baseline_must_lie_within_limits(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "baseline: [60, 78]", "baseline: [50, 78]")
    err = profile_error(path)
    assert err.field == "sampling.simulate.heart_rate.bpm.baseline"
    assert err.line == line_of(text, "bpm: {baseline") and "within limits [55.0, 95.0]" in str(err)


def test_simulated_systolic_limits_must_lie_above_diastolic(tmp_path: Path) -> None:
    cuff = (default_profiles_dir() / "blood_pressure_cuff.yaml").read_text()
    path = tmp_path / "blood_pressure_cuff.yaml"
    path.write_text(cuff.replace("limits: [100, 145]", "limits: [90, 145]"))
    err = profile_error(path)
    assert err.field == "sampling.simulate.blood_pressure"
    assert "systolic_mmhg.limits must start above" in str(err)


def test_catalogue_ndc_must_be_hyphenated(tmp_path: Path) -> None:
    terminal = (default_profiles_dir() / "pharmacy_terminal.yaml").read_text()
    path = tmp_path / "pharmacy_terminal.yaml"
    text = terminal.replace('"70000-0036-1"', '"7000000361"')
    path.write_text(text)
    err = profile_error(path)
    assert err.field == "sampling.simulate.purchase.catalogue[0]" and "hyphens" in str(err)
    assert err.line == line_of(text, '- code: "7000000361"')


def test_malformed_yaml_names_its_line(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "transport: ble\n", "transport: ble\n  oops: [\n")
    err = profile_error(path)
    assert str(err).startswith(f"{path}:") and "not valid YAML" in str(err)
    assert err.line is not None and err.line >= line_of(text, "oops")


def test_duplicate_key_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path, text = write_variant(tmp_path, "transport: ble\n", "transport: ble\ntransport: network\n")
    err = profile_error(path)
    first, again = line_of(text, "transport: ble"), line_of(text, "transport: network")
    assert err.line == again and f"first on line {first}" in str(err)


@pytest.mark.parametrize(("content", "message"), [("", "empty"), ("- a\n- b\n", "must be a YAML mapping")])
def test_empty_or_non_mapping_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(content)
    assert message in str(profile_error(path))


def test_missing_file_and_missing_directory(tmp_path: Path) -> None:
    err = profile_error(tmp_path / "nope.yaml")
    assert str(err) == f"{tmp_path / 'nope.yaml'}: no such file"
    with pytest.raises(ProfileError, match=PROFILES_DIR_ENV):
        load_profiles(tmp_path / "missing")
    with pytest.raises(ProfileError, match="no \\*.yaml device profiles"):
        load_profiles(tmp_path)


def test_profile_error_is_a_value_error() -> None:
    assert issubclass(ProfileError, ValueError)
