"""`carechain demo`'s data market: 22 patients' sealed readings, three studies answered (or not) by three
aggregator processes in MPC, paid, and verified from the log — checked here against the ledger the demo kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from carechain import envelope
from carechain.demo.market import (
    AGGREGATORS,
    FEE_MINOR,
    PATIENTS,
    PICKY,
    PRICE_MINOR,
    SMALL_REGION_PATIENTS,
    resting_level,
)
from carechain.demo.pipeline import run_demo
from carechain.entries import STUDY_CONTRIBUTE, STUDY_RESULT, Entry
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import contract_genesis, ledger_path
from contract_rules.market import study_account, study_record

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("demo")
    return run_demo(broker=None, seconds=2, data_dir=root, speedup=20), root


def _ledger(root: Path) -> tuple[Any, list[Entry]]:
    bridge = root / "bridge"
    ledger = Ledger(ledger_path(bridge))
    try:
        state = replay_ledger(ledger, contract_genesis(bridge)).state
        return state, [Entry.decode(leaf) for leaf in ledger.leaves()]
    finally:
        ledger.close()


def test_the_mean_resting_heart_rate_leaves_out_the_patient_whose_minimum_cohort_is_larger(demo) -> None:
    summary, _ = demo
    market = summary["study"]
    assert market["error"] is None, market["error"]
    rhr = market["studies"][0]
    everyone_but_picky = [i for i in range(PATIENTS) if i != PICKY]
    assert rhr["contributions"] == PATIENTS and rhr["included"] == PATIENTS - 1
    assert rhr["answer"] == {"sum": sum(map(resting_level, everyone_but_picky)), "n": PATIENTS - 1}
    assert summary["study_result"] == round(rhr["answer"]["sum"] / rhr["answer"]["n"], 1)
    assert summary["study_contributors"] == PATIENTS - 1
    glucose = market["studies"][1]
    assert glucose["state"] == "answered" and sum(glucose["answer"]["histogram"]) == PATIENTS - 1


def test_every_study_verifies_from_the_log_and_the_small_one_is_unanswered(demo) -> None:
    summary, _ = demo
    assert summary["study_verified"] is True
    assert [s["verified"] for s in summary["study"]["studies"]] == [True, True, True]
    small = summary["study"]["studies"][2]
    assert small["filter"] == {"region": "annecy"}
    assert (small["state"], small["answer"], small["contributions"], small["included"]) == (
        "unanswered", None, len(SMALL_REGION_PATIENTS), 0)


def test_results_are_signed_by_the_study_aggregators_and_payments_close_every_study(demo) -> None:
    summary, root = demo
    state, entries = _ledger(root)
    ids = [s["study_id"] for s in summary["study"]["studies"]]
    for sid in ids:
        record = study_record(state, sid)
        assert record is not None and record["closed_at"] is not None
        assert state.balance(study_account(sid)) == 0  # paid out or refunded, nothing left in escrow
        signers = [envelope.parse(e.cose).kid for e in entries if e.type == STUDY_RESULT
                   and envelope.parse(e.cose).payload["study_id"] == sid]
        assert len(signers) == AGGREGATORS // 2 + 1 and set(signers) <= set(record["aggregators"])
    # Contributions carry only sealed shares and a commitment: no value in clear.
    contributions = [envelope.parse(e.cose).payload for e in entries if e.type == STUDY_CONTRIBUTE]
    assert len(contributions) == 2 * PATIENTS + len(SMALL_REGION_PATIENTS)
    assert all(set(c) == {"v", "study_id", "consent", "commitment", "shares", "leaves", "ts"} for c in contributions)
    # Two answered studies pay every included patient her price and the majority its fee; the third refunds.
    paid = 2 * (PATIENTS - 1) * PRICE_MINOR
    assert summary["study"]["paid"]["patients"] == paid
    deposits = sum(s["deposit"] for s in summary["study"]["studies"])
    fees = 2 * (AGGREGATORS // 2 + 1) * FEE_MINOR
    assert summary["study"]["paid"]["researcher_left"] == deposits - paid - fees
