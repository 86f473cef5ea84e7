"""`carechain demo`'s pharmacy day: the contracts decide every sale the terminal sends over MQTT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from carechain.demo.pharmacy_day import FLU_SHOT, INSURER_FUNDS, METFORMIN, PHARMACY_BOND, REBATE
from contract_rules.bonds import SLASH

pytestmark = pytest.mark.integration


@pytest.fixture
def summary(full_demo: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    """The session's one whole demo run (tests/conftest.py): its pharmacy day runs before the market and the trial,
    which go through the ledger, not the bridge's ingest, and `pharmacy` and `anchored_by_kind` are read before them.
    Read only."""
    return full_demo[0]


def test_a_pharmacy_day_refuses_the_sales_without_rx_bills_the_insurer_and_pays_the_rebate(
        summary: dict[str, Any]) -> None:
    day = summary["pharmacy"]
    # Bob's metformin before his Rx, and amoxicillin rung up as over the counter: the formulary says Rx-only.
    assert summary["rejected_by_reason"]["contract:rx_missing"] == 2
    assert summary["formulary_refusals"] == day["formulary_refusals"] == 1
    assert day["pharmacy_violations"] == 2  # counted against the pharmacy, and its bond slashed for each
    assert day["bonds"][day["pharmacy_account"].removeprefix("pharmacy:")] == PHARMACY_BOND - 2 * SLASH["refused_sale"]
    assert summary["anchored_by_kind"]["purchase"] == 5  # the refused ones are kept as sale.refused instead
    flu, metformin = FLU_SHOT[1], METFORMIN[1] * 8_000 // 10_000  # 100 % and 80 % coverage, signed by the patient
    insurer, pharmacy = day["insurer_account"], day["pharmacy_account"]
    assert day["balances"][insurer] == INSURER_FUNDS - flu - metformin - REBATE
    assert day["balances"][pharmacy] == flu + metformin
    # 7 × 25 active minutes last week ≥ 150, disclosed as one device-signed weekly summary (the raw activity is sealed)
    assert day["balances"][day["alice_account"]] == REBATE
    assert summary["anchored_by_kind"]["weekly_activity"] == 1
    assert sum(day["balances"].values()) == day["genesis_total"]  # tokens only move (bonds and slashes included)
    # Only the two insurance sales make claims; the card sales (amoxicillin twice, acetaminophen) none.
    assert sorted(c["category"] for c in day["claims"]) == ["generic", "immunization"]
    assert summary["proof_verified"]


def test_the_demo_runs_on_bonded_miners_from_the_ledger_and_waits_for_finality(summary: dict[str, Any]) -> None:
    assert summary["miners"] == 5 and len(summary["pharmacy"]["active_miners"]) == 5
    assert summary["final_checkpoints"] >= 1
    assert summary["pharmacy"]["terminal_sales_final"]  # every sale under a checkpoint 3 of the 5 cosigned
