"""Insurance rules (v3): patient-consented policies with price caps, patient-signed payments and claims.

What v3 changes from v2 (contract_rules/insurance_v2.py, still pinned by deployed logs):

Policies bind a patient only with her signature. A `policy.register` is a `ConsentedPolicy`: the insurer's
terms for one patient (her party id, which is also her account "patient:<id>") and her consent signature over
them and the insurer's id, so no insurer can enrol a patient, and no consent can be moved to another insurer.
The insurer must be admitted (bonded, not suspended: contract_rules/bonds.py). Coverage names a price cap per
item: the insurer's share of a sale line is `bp` of at most `cap · quantity`, whatever price the terminal
rings up, so a pharmacy cannot draw more than the policy allows by inflating a price.

Payments move only with the patient's signature. A `purchase` paid by "token" or "insurance" must carry her
`PaymentAuthorization` (carechain.events): `pay_minor` moves "patient:<id>" → "pharmacy:<owner>" and
`claim_minor` moves "insurer:<id>" → "pharmacy:<owner>", in the same entry, and only if her wallet key signed
exactly this terminal, item, quantity, price, both amounts and the policy, under a nonce used once. The claim
may not exceed the capped share and the two amounts may not exceed the price; the rest, if any, is paid at the
counter. Card, cash and account sales move no tokens and must not carry a payment.

Wellness no longer depends on the insurer: the patient herself (or her policy's insurer, never another) may
submit `wellness.settle`, and "the week is over" is judged on the bridge's attested time (contract_rules/
clock.py), not on the submitter's `ts`. Activity summaries are kept exactly as v2 keeps them.
"""

from __future__ import annotations

from typing import Any

from carechain.events import payment_message
from carechain.identity import verify_signature
from contract_rules import bonds, insurance_v2
from contract_rules.clock import attested_ms
from contract_rules.insurance_v2 import DAY_MS, week_days
from contract_rules.runtime import Accept, Effect, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import (
    POLICY_REGISTER,
    WELLNESS_SETTLE,
    ConsentedPolicy,
    PolicyRegistration,
    WellnessSettle,
    parse,
    policy_consent_holds,
)

NAME = "insurance"
VERSION = 3
BASIS_POINTS = 10_000
ON_LEDGER_METHODS = frozenset({"token", "insurance"})  # payment methods that move tokens (and need her signature)


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == POLICY_REGISTER:
        return _register(state, tx)
    if tx.type == WELLNESS_SETTLE:
        return _settle(state, tx)
    if tx.type == "event:purchase":
        return _pay_for_sale(state, tx)
    if tx.type in ("event:activity", "event:weekly_activity"):
        return insurance_v2.apply(state, tx)  # activity is kept as v2 keeps it
    return Reject("not_an_insurance_entry")


def _register(state: State, tx: Tx) -> Outcome:
    p = parse(ConsentedPolicy, tx.payload)
    if p is None:
        if parse(PolicyRegistration, tx.payload) is not None:
            return Reject("policy_needs_patient_consent")
        return Reject("bad_payload")
    if not bonds.is_admitted(state, tx.signer):
        return Reject("insurer_not_admitted")
    patient = state.table("parties").get(p.patient)
    if patient is None or patient["role"] != "patient":
        return Reject("unknown_patient")
    if p.patient in state.table("policies"):
        return Reject("patient_has_policy")
    if not policy_consent_holds(patient["pk"], tx.signer, p):
        return Reject("no_patient_consent")
    record = {"insurer": tx.signer, "policy_id": p.policy_id, "at": tx.index,
              "coverage": [r.model_dump() for r in p.coverage],
              "wellness": p.wellness.model_dump() if p.wellness else None, "consent": p.consent}
    return Accept((Put("policies", p.patient, record),))


def coverage_rule(policy: dict[str, Any], item: str) -> dict[str, Any] | None:
    """The first coverage rule of `policy` that caps `item`; None if none does, or for a v2 record (no caps,
    no consent), which v3 never bills."""
    for rule in policy["coverage"]:
        caps = rule.get("caps")
        if caps is not None and item in caps:
            found: dict[str, Any] = rule
            return found
    return None


def covered_share(policy: dict[str, Any], item: str, quantity: int, price_minor: int) -> int | None:
    """The most the insurer pays for a sale line under `policy`: `bp` of min(price, cap · quantity), rounded
    down; None when the policy does not cover `item`."""
    rule = coverage_rule(policy, item)
    return None if rule is None else _share(rule, item, quantity, price_minor)


def _share(rule: dict[str, Any], item: str, quantity: int, price_minor: int) -> int:
    share: int = min(price_minor, rule["caps"][item] * quantity) * rule["bp"] // BASIS_POINTS
    return share


def _pay_for_sale(state: State, tx: Tx) -> Outcome:
    """Move the patient's payment and her insurer's claim to the pharmacy, if she signed them."""
    body = tx.payload["body"]
    payment = body.get("payment")
    if payment is None:
        return Reject("payment_not_authorized") if body["payment_method"] in ON_LEDGER_METHODS else Accept()
    if body["payment_method"] not in ON_LEDGER_METHODS:
        return Reject("payment_with_off_ledger_method")
    patient_id = payment["patient"]
    if body["patient_token"] != patient_id:
        return Reject("payment_other_patient")
    patient = state.table("parties").get(patient_id)
    if patient is None or patient["role"] != "patient":
        return Reject("unknown_patient")
    nonce_key = f"{patient_id}:{payment['nonce']}"
    if nonce_key in state.table("payment_nonces"):
        return Reject("payment_nonce_reused")
    price, pay, claim = body["price_minor"], payment["pay_minor"], payment["claim_minor"]
    if pay + claim > price:
        return Reject("payment_exceeds_price")
    item = f"{body['code_system']}:{body['item_code']}"
    policy: dict[str, Any] | None = None
    category = ""
    if claim:
        policy = state.table("policies").get(patient_id)
        if policy is None:
            return Reject("no_policy")
        rule = coverage_rule(policy, item)
        if rule is None:
            return Reject("not_covered")
        category = rule["category"]
        if claim > _share(rule, item, body["quantity"], price):
            return Reject("claim_exceeds_coverage")
    message = payment_message(tx.signer, item, body["quantity"], price, pay, claim,
                              policy["policy_id"] if policy else "", payment["nonce"])
    if not verify_signature(patient["pk"], message, payment["sig"]):
        return Reject("bad_payment_signature")
    pharmacy = f"pharmacy:{state.table('devices')[tx.signer]['owner']}"
    effects: list[Effect] = []
    if pay:
        effects.append(Transfer(f"patient:{patient_id}", pharmacy, pay, f"sale:{tx.index}"))
    if policy is not None:
        effects.append(Transfer(f"insurer:{policy['insurer']}", pharmacy, claim, f"claim:{tx.index}"))
        effects.append(Put("claims", str(tx.index), {
            "policy_id": policy["policy_id"], "patient": patient_id, "item": item,
            "category": category,
            "price": price,
            "insurer_share": claim, "patient_paid": pay, "copay": price - claim}))
    effects.append(Put("payment_nonces", nonce_key, tx.index))
    return Accept(tuple(effects))


def _settle(state: State, tx: Tx) -> Outcome:
    s = parse(WellnessSettle, tx.payload)
    if s is None:
        return Reject("bad_payload")
    policy = state.table("policies").get(s.patient_token)
    if policy is None:
        return Reject("no_policy")
    if tx.role == "patient" and s.patient_token != tx.signer:
        return Reject("not_the_patient")
    if tx.role != "patient" and policy["insurer"] != tx.signer:
        return Reject("not_the_insurer")
    if policy["wellness"] is None:
        return Reject("no_wellness_incentive")
    try:
        days = week_days(s.week)
    except ValueError:
        return Reject("bad_week")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if now < (days[-1] + 1) * DAY_MS:
        return Reject("week_not_over")
    key = f"{s.patient_token}:{s.week}"
    if key in state.table("wellness"):
        return Reject("week_already_settled")
    summary = state.table("weekly_activity").get(key)
    if summary is not None:
        used = [summary]
    else:
        activity = state.table("activity")
        used = [activity[f"{s.patient_token}:{d}"] for d in days if f"{s.patient_token}:{d}" in activity]
    minutes = sum(m for m, _ in used)
    earned = minutes >= policy["wellness"]["min_active_minutes"]
    amount = policy["wellness"]["rebate_minor"] if earned else 0
    record = {"policy_id": policy["policy_id"], "minutes": minutes, "leaves": sorted(i for _, i in used),
              "amount": amount, "at": tx.index, "by": tx.signer}
    effects: list[Effect] = [Put("wellness", key, record)]
    if amount:
        effects.insert(0, Transfer(f"insurer:{policy['insurer']}", f"patient:{s.patient_token}", amount,
                                   f"wellness:{s.week}"))
    return Accept(tuple(effects))
