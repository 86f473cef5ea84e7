"""Insurance v3: policies bind a patient only with her consent, price caps bound claims, wellness settles itself."""

from __future__ import annotations

import pytest
from bonded_world import ANALGESIC, FLU_SHOT, METFORMIN, T0, BondedWorld
from test_contracts_world import DAY, WEEK

from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from contract_rules.insurance_v2 import week_days

FLU_CAP = 2_500


@pytest.fixture
def w() -> BondedWorld:
    world = BondedWorld()
    world.standard_parties()
    return world


@pytest.fixture
def insured(w: BondedWorld) -> BondedWorld:
    assert w.add(w.consented(w.offer(flu_cap=FLU_CAP))) == "ok"
    return w


# -- consent ----------------------------------------------------------------------------------------------

def test_an_insurer_cannot_register_a_policy_without_the_patients_signature(w: BondedWorld) -> None:
    unsigned = ce.PolicyRegistration(policy_id="pol-x", patient_token=w.alice.device_id, coverage=[], ts=T0)
    assert w.add(ce.signed(w.insurer, ce.POLICY_REGISTER, unsigned)) == "policy_needs_patient_consent"
    offer = w.offer()
    assert w.add(w.consented(offer, patient=w.bob)) == "no_patient_consent"  # someone else's signature
    forged = ce.consented_policy(offer, b"\0" * 64)
    assert w.add(ce.signed(w.insurer, ce.POLICY_REGISTER, forged)) == "no_patient_consent"
    assert "policies" not in w.state.tables or w.alice.device_id not in w.state.table("policies")
    assert w.add(w.consented(offer)) == "ok"
    assert w.state.table("policies")[w.alice.device_id]["insurer"] == w.insurer.device_id


def test_consent_binds_the_terms_and_the_insurer(w: BondedWorld) -> None:
    offer = w.offer(flu_cap=FLU_CAP)
    consent = ce.sign_policy_consent(w.alice, w.insurer.device_id, offer)
    richer = offer.model_copy(update={"coverage": [ce.CappedCoverage(category="immunization", bp=10_000,
                                                                       caps={f"ndc:{FLU_SHOT}": 10**9})]})
    assert w.add(ce.signed(w.insurer, ce.POLICY_REGISTER, ce.consented_policy(richer, consent))) == "no_patient_consent"
    assert w.post_bond(w.insurer2, MIN_BOND["insurer"]) == "ok"
    stolen = ce.consented_policy(offer, consent)  # her consent to insurer 1, submitted by insurer 2
    assert w.add(ce.signed(w.insurer2, ce.POLICY_REGISTER, stolen)) == "no_patient_consent"


def test_an_unbonded_insurer_is_not_admitted(w: BondedWorld) -> None:
    assert w.add(w.consented(w.offer(), insurer=w.insurer2)) == "insurer_not_admitted"


def test_a_policy_needs_a_registered_patient(w: BondedWorld) -> None:
    stranger = ce.PolicyOffer(policy_id="pol-s", patient=w.terminal.device_id, coverage=[], ts=T0)
    assert w.add(w.consented(stranger, patient=w.terminal)) == "unknown_patient"


# -- claims -----------------------------------------------------------------------------------------------

def test_a_flu_shot_priced_9000_draws_no_more_than_the_cap_from_the_insurer(insured: BondedWorld) -> None:
    w = insured
    insurer, pharmacy = w.state.balance(w.insurer_account), w.state.balance(w.pharmacy_account())
    assert w.paid_sale(price=900_000, claim=900_000, method="insurance") == "claim_exceeds_coverage"
    assert w.paid_sale(price=900_000, claim=FLU_CAP + 1, method="insurance") == "claim_exceeds_coverage"
    assert w.state.balance(w.insurer_account) == insurer
    assert w.paid_sale(price=900_000, claim=FLU_CAP, method="insurance") == "ok"
    assert w.state.balance(w.insurer_account) == insurer - FLU_CAP
    assert w.state.balance(w.pharmacy_account()) == pharmacy + FLU_CAP
    claim = w.state.table("claims")[str(w.last_index)]
    assert claim["insurer_share"] == FLU_CAP and claim["copay"] == 900_000 - FLU_CAP
    assert sum(w.state.balances.values()) == w.state.supply


def test_copay_in_tokens_and_claim_move_in_one_entry(insured: BondedWorld) -> None:
    w = insured
    price, claim_minor = 1_500, 800  # an OTC analgesic: 80 % of min(price, cap 1_000) = 800
    patient = w.state.balance(f"patient:{w.alice.device_id}")
    pharmacy = w.state.balance(w.pharmacy_account())
    assert w.paid_sale(ANALGESIC, price=price, claim=801, pay=price - 801) == "claim_exceeds_coverage"
    assert w.paid_sale(ANALGESIC, price=price, claim=claim_minor, pay=price - claim_minor) == "ok"
    assert w.state.balance(f"patient:{w.alice.device_id}") == patient - (price - claim_minor)
    assert w.state.balance(w.pharmacy_account()) == pharmacy + price


def test_a_claim_needs_a_covered_item_and_her_signature(w: BondedWorld) -> None:
    assert w.add(w.consented(w.offer(generic=(METFORMIN,)))) == "ok"
    assert w.paid_sale(ANALGESIC, price=500, claim=100, method="insurance") == "not_covered"
    assert w.paid_sale(price=FLU_CAP, claim=FLU_CAP, method="insurance", wallet=w.bob) == "bad_payment_signature"
    assert w.paid_sale(patient=w.bob, price=FLU_CAP, claim=FLU_CAP, method="insurance") == "no_policy"


# -- wellness ---------------------------------------------------------------------------------------------

def _active_week(w: BondedWorld) -> None:
    assert w.register_device(w.wearable, "heart_rate_band", w.alice.device_id) == "ok"
    for day in range(3):
        assert w.activity(60, T0 + day * DAY + 3_600_000) == "ok"


def _settle(w: BondedWorld, who: object, patient: str | None = None) -> str:
    s = ce.WellnessSettle(patient_token=patient or w.alice.device_id, week=WEEK, ts=T0 + 8 * DAY)
    return w.add(ce.signed(who, ce.WELLNESS_SETTLE, s))  # type: ignore[arg-type]


def test_a_patient_can_settle_her_own_wellness_week(insured: BondedWorld) -> None:
    w = insured
    _active_week(w)
    assert w.attest((week_days(WEEK)[-1] + 1) * DAY) == "ok"
    before = w.state.balance(f"patient:{w.alice.device_id}")
    assert _settle(w, w.bob) == "not_the_patient"
    assert _settle(w, w.alice) == "ok"
    assert w.state.balance(f"patient:{w.alice.device_id}") == before + 2_500
    record = w.state.table("wellness")[f"{w.alice.device_id}:{WEEK}"]
    assert record["minutes"] == 180 and record["by"] == w.alice.device_id
    assert _settle(w, w.insurer) == "week_already_settled"


def test_one_insurer_cannot_settle_another_insurers_policy(insured: BondedWorld) -> None:
    w = insured
    _active_week(w)
    assert w.attest((week_days(WEEK)[-1] + 1) * DAY) == "ok"
    assert _settle(w, w.insurer2) == "not_the_insurer"
    assert _settle(w, w.insurer) == "ok"


def test_the_week_is_over_by_attested_time_not_by_the_submitters_claim(insured: BondedWorld) -> None:
    w = insured
    _active_week(w)
    end = (week_days(WEEK)[-1] + 1) * DAY
    assert w.attest(end - 1) == "ok"
    assert _settle(w, w.alice) == "week_not_over"  # her ts says the week is over; the ledger's time does not
    assert w.attest(end) == "ok"
    assert _settle(w, w.alice) == "ok"
