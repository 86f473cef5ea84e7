"""Inventories for `carechain register`: a good file parses, and every mistake names its file and line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carechain.identity import Identity
from carechain.inventory import InventoryDevice, InventoryError, load_inventory
from carechain.profiles import DeviceProfile, load_profiles

KEY_A = Identity.from_seed(b"\x01" * 32)
KEY_B = Identity.from_seed(b"\x02" * 32)
KEY_C = Identity.from_seed(b"\x03" * 32)


@pytest.fixture(scope="module")
def profiles() -> dict[str, DeviceProfile]:
    return load_profiles()


def line_of(text: str, needle: str) -> int:
    assert needle in text, needle
    return text[: text.index(needle)].count("\n") + 1


def write(tmp_path: Path, text: str, *, cuff_key: Identity | None = KEY_B) -> Path:
    """Write the inventory, and (unless told otherwise) the key file GOOD's cuff-7 refers to."""
    if cuff_key is not None:
        cuff_key.save(tmp_path / "keys" / "cuff-7.key", overwrite=True)
    path = tmp_path / "devices.yaml"
    path.write_text(text)
    return path


def inventory_error(path: Path, profiles: dict[str, DeviceProfile]) -> InventoryError:
    with pytest.raises(InventoryError) as info:
        load_inventory(path, profiles)
    return info.value


GOOD = f"""\
site: ward-3
devices:
  - name: hr-band-1
    profile: heart_rate_band
    owner: patient:alice
    public_key: {KEY_A.public_key.hex()}
  - name: cuff-7
    profile: blood_pressure_cuff
    owner: patient:bob
    site: ward-5
    key_file: keys/cuff-7.key
"""


def test_good_inventory_gives_devices_with_ids_sites_and_lines(
    tmp_path: Path, profiles: dict[str, DeviceProfile]
) -> None:
    devices = load_inventory(write(tmp_path, GOOD), profiles)  # the key file is created 0600
    assert devices == [
        InventoryDevice("hr-band-1", "heart_rate_band", "patient:alice", "ward-3", KEY_A.public_key, 3),
        InventoryDevice("cuff-7", "blood_pressure_cuff", "patient:bob", "ward-5", KEY_B.public_key, 7),
    ]
    assert [d.device_id for d in devices] == [KEY_A.device_id, KEY_B.device_id]


def test_key_file_may_be_absolute_and_uppercase_hex_is_accepted(
    tmp_path: Path, profiles: dict[str, DeviceProfile]
) -> None:
    key_path = tmp_path / "elsewhere" / "c.key"
    KEY_C.save(key_path)
    text = f"""\
devices:
  - {{name: a, profile: scale, owner: patient:carol, site: home, key_file: {key_path}}}
  - {{name: b, profile: scale, owner: patient:dan, site: home, public_key: {KEY_A.public_key.hex().upper()}}}
"""
    devices = load_inventory(write(tmp_path, text), profiles)
    assert [d.public_key for d in devices] == [KEY_C.public_key, KEY_A.public_key]


# -- each mistake names the right line ------------------------------------------------------------------


def test_missing_file(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    err = inventory_error(tmp_path / "nope.yaml", profiles)
    assert str(err) == f"{tmp_path / 'nope.yaml'}: no such file"


def test_malformed_yaml_names_its_line(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("    owner: patient:bob\n", "    owner: patient:bob\n   - broken: [\n")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err).startswith(f"{path}:{err.line}: not valid YAML")
    assert err.line is not None and err.line >= line_of(text, "broken")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n"])
def test_inventory_must_be_a_mapping(tmp_path: Path, profiles: dict[str, DeviceProfile], text: str) -> None:
    path = write(tmp_path, text)
    assert str(inventory_error(path, profiles)) == (
        f"{path}:1: an inventory must be a mapping with a `devices:` list"
    )


def test_unknown_profile_lists_the_known_ones(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("profile: heart_rate_band", "profile: heart_rate_bnd")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert err.line == line_of(text, "profile: heart_rate_bnd")
    assert "unknown profile 'heart_rate_bnd'; did you mean 'heart_rate_band'?" in str(err)
    assert "known profiles: blood_pressure_cuff, glucose_meter, heart_rate_band" in str(err)


def test_missing_field_names_the_device_line(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("    owner: patient:alice\n", "")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err) == f"{path}:3: device 'hr-band-1': owner: required field is missing"


def test_unknown_field_names_its_line(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("    owner: patient:bob\n", "    owner: patient:bob\n    room: 12\n")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert err.line == line_of(text, "room: 12")
    assert "device 'cuff-7': room: unknown field; a device has: name, profile, owner" in str(err)


def test_unknown_top_level_field(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    path = write(tmp_path, "sites: ward-3\n" + GOOD)
    err = inventory_error(path, profiles)
    assert str(err).startswith(
        f"{path}:1: sites: unknown field; an inventory has only `site:` and `devices:`"
    )


def test_number_where_text_is_expected_says_to_quote_it(
    tmp_path: Path, profiles: dict[str, DeviceProfile]
) -> None:
    text = GOOD.replace("owner: patient:alice", "owner: 12345")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert err.line == line_of(text, "owner: 12345") and "got 12345 (quote it)" in str(err)


def test_public_key_that_is_not_hex(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    bad = "z" + KEY_A.public_key.hex()[1:]
    text = GOOD.replace(KEY_A.public_key.hex(), bad)
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err) == (
        f"{path}:{line_of(text, 'public_key')}: device 'hr-band-1': public_key is not hexadecimal "
        "(found 'z'); give 64 hex digits"
    )


def test_public_key_of_the_wrong_length(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace(KEY_A.public_key.hex(), KEY_A.public_key.hex()[:62])
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert err.line == line_of(text, "public_key")
    assert "public_key has 62 hex digits; an Ed25519 public key has 64 (32 bytes)" in str(err)


def test_missing_key_file_reports_the_key_file_error(
    tmp_path: Path, profiles: dict[str, DeviceProfile]
) -> None:
    path = write(tmp_path, GOOD, cuff_key=None)
    err = inventory_error(path, profiles)
    assert err.line == line_of(GOOD, "key_file")
    assert "device 'cuff-7': key_file:" in str(err) and "no such key file" in str(err)
    assert str(tmp_path / "keys" / "cuff-7.key") in str(err)  # resolved next to the inventory


def test_key_file_readable_by_others_is_refused(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    path = write(tmp_path, GOOD)
    os.chmod(tmp_path / "keys" / "cuff-7.key", 0o644)
    err = inventory_error(path, profiles)
    assert err.line == line_of(GOOD, "key_file")
    assert "permissions 0644 are too open" in str(err) and "chmod 600" in str(err)


def test_key_file_that_is_not_a_key_file(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    key_path = tmp_path / "keys" / "cuff-7.key"
    key_path.parent.mkdir()
    key_path.write_text(KEY_B.public_key.hex())
    key_path.chmod(0o600)
    err = inventory_error(write(tmp_path, GOOD, cuff_key=None), profiles)
    assert err.line == line_of(GOOD, "key_file") and "not a carechain key file" in str(err)


def test_both_public_key_and_key_file(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace(
        "    owner: patient:bob\n", f"    owner: patient:bob\n    public_key: {KEY_C.public_key.hex()}\n"
    )
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err) == f"{path}:7: device 'cuff-7': has both `public_key` and `key_file`; give exactly one"


def test_neither_public_key_nor_key_file(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("    key_file: keys/cuff-7.key\n", "")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err) == f"{path}:7: device 'cuff-7': has neither `public_key` and `key_file`; give exactly one"


def test_duplicate_public_key_names_both_lines(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    path = write(tmp_path, GOOD, cuff_key=KEY_A)  # the same key as hr-band-1's public_key
    err = inventory_error(path, profiles)
    assert str(err) == (
        f"{path}:7: device 'cuff-7' has the same public key as 'hr-band-1' on line 3; "
        "every device needs its own key pair"
    )


def test_duplicate_name_names_both_lines(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("name: cuff-7", "name: hr-band-1")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err) == f"{path}:7: device name 'hr-band-1' is already used on line 3; names must be unique"


def test_device_without_any_site(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("site: ward-3\n", "")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert str(err) == (
        f"{path}:2: device 'hr-band-1': no site; add `site:` to this device or at the top of the file"
    )


def test_empty_or_missing_device_list(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    path = write(tmp_path, "site: ward-3\ndevices: []\n")
    assert str(inventory_error(path, profiles)) == (
        f"{path}:2: devices: the list is empty; add the devices to register"
    )
    path = write(tmp_path, "site: ward-3\n")
    assert str(inventory_error(path, profiles)) == f"{path}:1: devices: required field is missing"


def test_device_that_is_not_a_mapping(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    path = write(tmp_path, "site: s\ndevices:\n  - hr-band-1\n")
    err = inventory_error(path, profiles)
    assert str(err).startswith(f"{path}:3: devices[0]: each device must be a mapping with name, profile")


def test_duplicate_yaml_key_in_a_device(tmp_path: Path, profiles: dict[str, DeviceProfile]) -> None:
    text = GOOD.replace("    owner: patient:alice\n", "    owner: patient:alice\n    owner: patient:eve\n")
    path = write(tmp_path, text)
    err = inventory_error(path, profiles)
    assert err.line == line_of(text, "owner: patient:eve") and "first on line 5" in str(err)


def test_every_problem_is_reported_at_once_in_line_order(
    tmp_path: Path, profiles: dict[str, DeviceProfile]
) -> None:
    text = GOOD.replace("profile: heart_rate_band", "profile: nope").replace(
        "profile: blood_pressure_cuff", "profile: nope2"
    )
    path = write(tmp_path, text, cuff_key=None)
    err = inventory_error(path, profiles)
    lines = str(err).splitlines()
    assert lines[0].startswith(f"{path}:4: device 'hr-band-1': unknown profile 'nope'")
    assert lines[1].startswith(f"{path}:8: device 'cuff-7': unknown profile 'nope2'")
    assert lines[2].startswith(f"{path}:11: device 'cuff-7': key_file:")
    assert [p[0] for p in err.problems] == [4, 8, 11]


def test_inventory_error_is_a_value_error() -> None:
    assert issubclass(InventoryError, ValueError)


def test_with_the_ledgers_parties_a_health_device_belongs_to_a_registered_patient(
    tmp_path: Path, profiles: dict[str, DeviceProfile]
) -> None:
    alice, pharmacy, doctor = KEY_A.device_id, KEY_B.device_id, KEY_C.device_id
    parties = {alice: "patient", pharmacy: "pharmacy", doctor: "doctor"}
    text = f"""\
site: ward-3
devices:
  - {{name: band, profile: heart_rate_band, owner: {alice}, public_key: {"ab" * 32}}}
  - {{name: till, profile: pharmacy_terminal, owner: {pharmacy}, public_key: {"cd" * 32}}}
"""
    devices = load_inventory(write(tmp_path, text, cuff_key=None), profiles, parties)
    assert [d.owner for d in devices] == [alice, pharmacy]
    bad = text.replace(f"owner: {alice}", "owner: patient:alice").replace(f"owner: {pharmacy}", f"owner: {doctor}")
    path = write(tmp_path, bad, cuff_key=None)
    with pytest.raises(InventoryError) as info:
        load_inventory(path, profiles, parties)
    message = str(info.value)
    assert f"{path}:3: device 'band': owner 'patient:alice' is not a registered party id" in message
    assert "carechain party register patient" in message
    # A terminal may belong to any registered party; a doctor is one, so only the band is wrong.
    assert "till" not in message
    wrong_role = text.replace(f"owner: {alice}", f"owner: {pharmacy}")
    with pytest.raises(InventoryError, match="a heart_rate_band records health readings: its owner must be a "
                                             "registered patient"):
        load_inventory(write(tmp_path, wrong_role, cuff_key=None), profiles, parties)
