"""The pieces around the BLE source: the retry policy (sans-IO) and the paired-device registry (a file)."""

from __future__ import annotations

import json
import random

import pytest

from carechain.retry import Backoff, ReconnectPolicy
from edge_agent.paired_devices import PairedDevices, RegistryError
from edge_agent.sources.ble import _seq_after


def test_backoff_grows_exponentially_up_to_the_cap_within_the_jitter() -> None:
    policy = ReconnectPolicy(initial_s=0.5, factor=2, max_s=8, jitter=0.2)
    backoff = Backoff(policy, random.Random(1))
    delays = [backoff.failed() for _ in range(8)]
    for n, delay in enumerate(delays):
        base = min(8, 0.5 * 2**n)
        assert base * 0.8 <= delay <= min(8, base * 1.2)
    assert delays[-1] <= 8


def test_a_link_that_stayed_up_resets_the_backoff_and_one_that_dropped_at_once_does_not() -> None:
    policy = ReconnectPolicy(initial_s=1, factor=2, max_s=60, jitter=0, stable_s=10)
    backoff = Backoff(policy, random.Random(0))
    for _ in range(4):
        backoff.failed()
    backoff.connected(now_s=100)
    assert backoff.link_lost(now_s=103) == 16  # up 3 s: still failing, the wait keeps growing
    backoff.connected(now_s=200)
    assert backoff.link_lost(now_s=260) == 1  # up a minute: start again from the first step


def test_policy_refuses_settings_that_would_spin_or_never_retry() -> None:
    with pytest.raises(ValueError, match="initial_s"):
        ReconnectPolicy(initial_s=0)
    with pytest.raises(ValueError, match="factor"):
        ReconnectPolicy(factor=0.5)


def test_record_sequence_numbers_compare_across_the_uint16_wrap() -> None:
    assert _seq_after(11, 10) and not _seq_after(10, 10) and not _seq_after(9, 10)
    assert _seq_after(2, 65534) and not _seq_after(65534, 2)


def test_the_registry_is_a_human_readable_file_that_survives_a_restart(tmp_path) -> None:
    path = tmp_path / "paired-devices.json"
    registry = PairedDevices(path)
    registry.update("c0:26:da:01:02:03", "glucose_meter", battery_pct=80, last_record_seq=41)
    registry.update("C0:26:DA:01:02:03", "glucose_meter", last_record_seq=42)
    again = PairedDevices(path)
    record = again.get("C0:26:DA:01:02:03")
    assert record is not None and record.last_record_seq == 42 and record.battery_pct == 80
    assert [r.address for r in again.for_profile("glucose_meter")] == ["c0:26:da:01:02:03"]
    assert json.loads(path.read_text())["_default"]["1"]["profile"] == "glucose_meter"
    assert path.stat().st_mode & 0o077 == 0


def test_a_hand_edited_record_with_a_typo_is_refused_naming_the_file_and_record(tmp_path) -> None:
    path = tmp_path / "paired-devices.json"
    path.write_text(json.dumps({"_default": {"1": {"address": "C0:26:DA:01:02:03", "profile": "scale",
                                                  "pari": True}}}))
    with pytest.raises(RegistryError, match=r"paired-devices.json: record 'C0:26:DA:01:02:03': pari"):
        PairedDevices(path)
    path.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        PairedDevices(path)
