"""`carechain demo --ble`: six virtual BLE peripherals read through the agent's bleak code end up in the log."""

from __future__ import annotations

from pathlib import Path

import pytest

from carechain.demo.pipeline import run_demo

pytestmark = pytest.mark.integration


def test_demo_over_ble_anchors_every_kind_and_verifies_a_proof(tmp_path: Path) -> None:
    summary = run_demo(broker=None, seconds=5, data_dir=tmp_path, speedup=60, ble=True,
                       skip=frozenset({"market", "trial"}))  # the live scenarios: tests/test_demo_market.py
    assert summary["ble"] == sorted(["heart_rate_band", "thermometer", "blood_pressure_cuff", "pulse_oximeter",
                                     "glucose_meter", "scale"])
    kinds = summary["anchored_by_kind"]
    for kind in ("heart_rate", "temperature", "blood_pressure", "spo2", "glucose", "weight", "purchase"):
        assert kinds.get(kind, 0) > 0, f"no {kind} event reached the log: {kinds}"
    # Two sales refused: one without its Rx, one rung up as over the counter that the formulary lists as Rx-only.
    assert summary["anchored"] == summary["sent"] - 2 and summary["outbox_left"] == 0
    assert summary["rejected_by_reason"]["contract:rx_missing"] == 2 and summary["formulary_refusals"] == 1
    assert summary["proof_verified"]
