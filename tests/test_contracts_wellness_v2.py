"""Wellness (insurance v2) from device-signed weekly summaries instead of raw activity readings."""

from __future__ import annotations

import hashlib
from pathlib import Path

from test_contracts_world import DAY, T0, WEEK, World, ident

from carechain import envelope
from carechain.entries import event_entry
from carechain.events import PROTOCOL_V2, WeeklyActivity, make_payload
from contract_rules import builtin_hashes
from contract_rules import transactions as ce

# The shipped v1 module, still in the CodeBook for ledgers that pin it.
INSURANCE_V1 = hashlib.sha256((Path(__file__).parent.parent / "contract_rules/insurance.py").read_bytes()).hexdigest()
# Insurance v2, which deployed logs pin (a new genesis runs v3: tests/test_contracts_insurance_v3.py).
INSURANCE_V2 = hashlib.sha256((Path(__file__).parent.parent / "contract_rules/insurance_v2.py").read_bytes()
                              ).hexdigest()


def summary(w: World, minutes: int, *, policy: str = "pol-pt-alice", week: str = WEEK, dev=None) -> str:  # noqa: ANN001
    dev = dev or w.wearable
    seq = w._seq[dev.device_id]
    w._seq[dev.device_id] += 1
    body = WeeklyActivity(week=week, active_minutes=minutes, policy=policy)
    return w.add(event_entry(envelope.sign(dev, make_payload(dev.device_id, seq, T0 + 7 * DAY, "weekly_activity",
                                                              body, v=PROTOCOL_V2))))


def enrolled() -> World:
    w = World(contracts={**builtin_hashes(), "insurance": INSURANCE_V2})
    w.standard_parties()
    assert w.policy("pt-alice") == "ok"
    assert w.register_device(w.wearable, "heart_rate_band", "pt-alice") == "ok"
    return w


def test_a_ledger_pinning_insurance_v2_runs_v2() -> None:
    w = enrolled()
    assert w.state.versions["insurance"][0][1] == 2
    assert builtin_hashes()["insurance"] not in (INSURANCE_V1, INSURANCE_V2)  # a new genesis runs v3


def test_the_weekly_summary_pays_the_rebate_without_raw_readings() -> None:
    w = enrolled()
    assert summary(w, 100) == "ok"
    assert summary(w, 160) == "ok"  # a larger running total replaces it
    assert summary(w, 120) == "ok"  # a smaller one is anchored but changes nothing
    before = w.state.balance("patient:pt-alice")
    assert w.settle() == "ok"
    record = w.state.table("wellness")[f"pt-alice:{WEEK}"]
    assert record["minutes"] == 160 and record["amount"] == 2_500 and len(record["leaves"]) == 1
    assert w.state.balance("patient:pt-alice") == before + 2_500
    assert not w.state.table("activity")


def test_a_summary_for_another_policy_or_patient_is_refused() -> None:
    w = enrolled()
    assert summary(w, 200, policy="pol-someone-else") == "not_the_patients_policy"
    stranger = ident(41)
    assert w.register_device(stranger, "heart_rate_band", "pt-bob") == "ok"
    assert summary(w, 200, dev=stranger) == "no_policy"
    w.settle()
    assert w.state.table("wellness")[f"pt-alice:{WEEK}"]["amount"] == 0


def test_v1_daily_activity_still_counts_before_the_cutover() -> None:
    w = enrolled()
    for day in range(7):
        assert w.activity(25, T0 + day * DAY + 60_000) == "ok"
    assert w.settle() == "ok"
    assert w.state.table("wellness")[f"pt-alice:{WEEK}"]["minutes"] == 175


def test_an_old_ledger_on_insurance_v1_refuses_summaries_until_it_upgrades() -> None:
    hashes = builtin_hashes()
    w = World(contracts={**hashes, "insurance": INSURANCE_V1})
    w.standard_parties()
    w.policy("pt-alice")
    w.register_device(w.wearable, "heart_rate_band", "pt-alice")
    assert summary(w, 200) == "not_an_insurance_entry"
    up = ce.ContractUpgrade(name="insurance", version=2, code_hash=hashes["insurance"],
                            from_size=len(w.entries) + 1, ts=T0)
    assert w.add(ce.signed(w.operator, ce.CONTRACT_UPGRADE, up)) == "ok"
    assert summary(w, 200) == "ok"
