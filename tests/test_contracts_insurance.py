"""Insurance rules: covered sales billed to the insurer at sale time; weekly wellness rebates citing leaves."""

from __future__ import annotations

import pytest
from test_contracts_wellness_v2 import INSURANCE_V2
from test_contracts_world import AMOXICILLIN, DAY, FLU_SHOT, INSURER_FUNDS, T0, WEEK, World, ident

from contract_rules import builtin_hashes
from contract_rules import transactions as ce
from contract_rules.insurance import week_days


@pytest.fixture
def w() -> World:
    world = World(contracts={**builtin_hashes(), "insurance": INSURANCE_V2})  # v2, as deployed logs pin it
    world.standard_parties()
    assert world.policy("pt-alice") == "ok"
    assert world.register_device(world.wearable, "heart_rate_band", "pt-alice") == "ok"
    return world


def test_immunization_is_billed_in_full_to_the_insurer(w: World) -> None:
    assert w.sale(FLU_SHOT, rx_only=False, price=4500, pay="insurance") == "ok"
    assert w.state.balance(w.insurer_account) == INSURER_FUNDS - 4500
    assert w.state.balance(w.pharmacy_account()) == 4500
    claim = w.state.table("claims")[str(w.last_index)]
    assert (claim["category"], claim["insurer_share"], claim["copay"]) == ("immunization", 4500, 0)


def test_generic_is_split_80_20_rounding_down_for_the_insurer(w: World) -> None:
    rx, _ = w.prescribe(quantity=1)
    assert w.sale(AMOXICILLIN, rx_ref=rx.rx_ref(), price=1251, pay="insurance") == "ok"
    claim = w.state.table("claims")[str(w.last_index)]
    assert (claim["insurer_share"], claim["copay"]) == (1000, 251)  # 1251 * 8000 // 10000
    assert w.state.balance(w.pharmacy_account()) == 1000


def test_uncovered_or_uninsured_insurance_sales_are_rejected_and_move_nothing(w: World) -> None:
    assert w.sale("70000-0036-1", rx_only=False, price=899, pay="insurance") == "not_covered"
    assert w.sale(FLU_SHOT, rx_only=False, price=4500, pay="insurance", patient="pt-bob") == "no_policy"
    assert w.state.balance(w.insurer_account) == INSURER_FUNDS


def test_card_sales_bill_nothing(w: World) -> None:
    assert w.sale(FLU_SHOT, rx_only=False, price=4500, pay="card") == "ok"
    assert w.state.balance(w.insurer_account) == INSURER_FUNDS


def test_an_insurer_out_of_funds_rejects_the_whole_sale_including_the_fill(w: World) -> None:
    rx, _ = w.prescribe(quantity=1)
    assert w.sale(AMOXICILLIN, rx_ref=rx.rx_ref(), price=10 * INSURER_FUNDS, pay="insurance") == "insufficient_funds"
    assert w.state.table("rx")[rx.rx_ref()]["fills"] == 0
    assert w.state.balance(w.insurer_account) == INSURER_FUNDS


def test_one_policy_per_patient_and_only_insurers_register_them(w: World) -> None:
    assert w.policy("pt-alice") == "patient_has_policy"
    reg = ce.PolicyRegistration(policy_id="p2", patient_token="pt-bob", coverage=[], ts=T0)
    assert w.add(ce.signed(w.pharmacy, ce.POLICY_REGISTER, reg)) == "signer_not_allowed"


def test_wellness_rebate_paid_for_150_minutes_citing_the_leaves_used(w: World) -> None:
    # Running daily totals: only each day's largest counts.
    w.activity(30, T0 + 1000)
    w.activity(60, T0 + 2000)
    mon = w.last_index
    w.activity(45, T0 + 3000)  # lower than the day's best: ignored
    w.activity(50, T0 + DAY + 5)
    tue = w.last_index
    w.activity(40, T0 + 6 * DAY + 5)
    sun = w.last_index
    w.activity(500, T0 + 7 * DAY + 5)  # next week
    assert w.settle(ts=T0 + 7 * DAY - 1) == "week_not_over"
    assert w.settle() == "ok"
    payout = w.state.table("wellness")[f"pt-alice:{WEEK}"]
    assert (payout["minutes"], payout["leaves"], payout["amount"]) == (150, [mon, tue, sun], 2500)
    assert w.state.balance("patient:pt-alice") == 2500
    assert w.settle() == "week_already_settled"
    assert w.state.balance("patient:pt-alice") == 2500


def test_below_threshold_is_evaluated_but_not_paid(w: World) -> None:
    w.activity(149, T0 + 1000)
    assert w.settle() == "ok"
    payout = w.state.table("wellness")[f"pt-alice:{WEEK}"]
    assert (payout["minutes"], payout["amount"]) == (149, 0)
    assert w.state.balance("patient:pt-alice") == 0


def test_unregistered_or_revoked_wearables_never_count(w: World) -> None:
    stranger = ident(0x55)
    assert w.activity(1000, T0 + 1000, dev=stranger) == "unknown_signer"
    assert w.activity(100, T0 + DAY) == "ok"
    assert w.revoke_device(w.wearable) == "ok"
    assert w.activity(100, T0 + 2 * DAY) == "device_revoked"
    assert w.settle() == "ok"
    assert w.state.table("wellness")[f"pt-alice:{WEEK}"]["minutes"] == 100


def test_another_patients_wearable_does_not_count_for_alice(w: World) -> None:
    bobs = ident(0x56)
    assert w.register_device(bobs, "heart_rate_band", "pt-bob") == "ok"
    assert w.activity(600, T0 + 1000, dev=bobs) == "ok"
    assert w.settle() == "ok"
    assert w.state.table("wellness")[f"pt-alice:{WEEK}"]["minutes"] == 0


def test_settle_guards(w: World) -> None:
    assert w.settle(week="2026-W54") == "bad_week"
    assert w.settle(patient="pt-bob") == "no_policy"
    assert w.policy("pt-carol", wellness=False) == "ok"
    assert w.settle(patient="pt-carol") == "no_wellness_incentive"


def test_week_days_are_utc_days_of_the_iso_week() -> None:
    days = week_days(WEEK)
    assert days[0] * DAY == T0 and len(days) == 7
    assert week_days("2026-W01")[0] * DAY < T0
