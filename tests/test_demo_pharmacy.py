"""`carechain demo`'s pharmacy day: the contracts decide every sale the terminal sends over MQTT."""

from __future__ import annotations

from pathlib import Path

import pytest

from carechain.demo.pharmacy_day import FLU_SHOT, INSURER_FUNDS, METFORMIN, REBATE
from carechain.demo.pipeline import run_demo

pytestmark = pytest.mark.integration


def test_a_pharmacy_day_refuses_the_sale_without_rx_bills_the_insurer_and_pays_the_rebate(tmp_path: Path) -> None:
    summary = run_demo(broker=None, seconds=3, data_dir=tmp_path, speedup=20)
    day = summary["pharmacy"]
    assert summary["rejected_by_reason"]["contract:rx_missing"] == 1
    assert day["pharmacy_violations"] == 1  # counted against the pharmacy
    assert summary["anchored_by_kind"]["purchase"] == 5  # the refused one is kept as sale.refused instead
    flu, metformin = FLU_SHOT[1], METFORMIN[1] * 8_000 // 10_000  # 100 % and 80 % coverage
    insurer, pharmacy = day["insurer_account"], day["pharmacy_account"]
    assert day["balances"][insurer] == INSURER_FUNDS - flu - metformin - REBATE
    assert day["balances"][pharmacy] == flu + metformin
    # 7 × 25 active minutes last week ≥ 150, disclosed as one device-signed weekly summary (the raw activity is sealed)
    assert day["balances"][day["alice_account"]] == REBATE
    assert summary["anchored_by_kind"]["weekly_activity"] == 1
    assert sum(day["balances"].values()) == INSURER_FUNDS  # tokens only move
    # Only the two insurance sales make claims; the card sales (amoxicillin twice, acetaminophen) none.
    assert sorted(c["category"] for c in day["claims"]) == ["generic", "immunization"]
    assert summary["proof_verified"]
