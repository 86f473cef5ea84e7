"""Insurance rules (v2): policies, billing covered sales to the insurer, and weekly wellness rebates.

Billing: a `purchase` event paid by "insurance" for a patient with a policy is billed at sale time: the
first coverage rule listing the item ("<system>:<code>") decides the share, in basis points of the
line's `price_minor`, rounded down; that share moves from the insurer's account to the pharmacy's, and
the rest (the copay) is settled at the counter, off the ledger.

Wellness without raw data (what v2 changes): with protocol v2 the readings are sealed, so the rule counts
a device-signed `weekly_activity` summary that the patient's agent discloses in clear to one policy (data
minimisation: the insurer sees a week's active minutes, never the readings). It must come from a device
registered to the policy's patient (the device owner is the policy's `patient_token`) and name that policy;
the week's largest summary is kept with the leaf index that carried it. Plain-text (v1) `activity` events
still count as in v1 until the protocol cutover retires them: per UTC day, the day's largest
`active_minutes` (wearables send running daily totals). A `wellness.settle` for an ISO week uses the
week's summary if there is one, else the sum of the seven days; at or above the policy's threshold the
insurer pays the rebate to "patient:<token>". Every evaluation records the leaf indexes it used, paid or
not, and a week is settled at most once.
"""

from __future__ import annotations

import datetime

from contract_rules.runtime import Accept, Effect, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import POLICY_REGISTER, WELLNESS_SETTLE, PolicyRegistration, WellnessSettle, parse

NAME = "insurance"
VERSION = 2
DAY_MS = 86_400_000
BASIS_POINTS = 10_000
_EPOCH = datetime.date(1970, 1, 1)


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == POLICY_REGISTER:
        return _register(state, tx)
    if tx.type == WELLNESS_SETTLE:
        return _settle(state, tx)
    if tx.type == "event:purchase":
        return _bill(state, tx)
    if tx.type == "event:activity":
        return _activity(state, tx)
    if tx.type == "event:weekly_activity":
        return _weekly_activity(state, tx)
    return Reject("not_an_insurance_entry")


def _register(state: State, tx: Tx) -> Outcome:
    p = parse(PolicyRegistration, tx.payload)
    if p is None:
        return Reject("bad_payload")
    if p.patient_token in state.table("policies"):
        return Reject("patient_has_policy")
    record = {"insurer": tx.signer, "policy_id": p.policy_id, "at": tx.index,
              "coverage": [r.model_dump() for r in p.coverage],
              "wellness": p.wellness.model_dump() if p.wellness else None}
    return Accept((Put("policies", p.patient_token, record),))


def _bill(state: State, tx: Tx) -> Outcome:
    body = tx.payload["body"]
    if body["payment_method"] != "insurance":
        return Accept()
    policy = state.table("policies").get(body["patient_token"])
    if policy is None:
        return Reject("no_policy")
    item = f"{body['code_system']}:{body['item_code']}"
    rule = next((r for r in policy["coverage"] if item in r["items"]), None)
    if rule is None:
        return Reject("not_covered")
    pharmacy = state.table("devices")[tx.signer]["owner"]
    price = body["price_minor"]
    share = price * rule["bp"] // BASIS_POINTS
    claim = {"policy_id": policy["policy_id"], "patient": body["patient_token"], "category": rule["category"],
             "price": price, "insurer_share": share, "copay": price - share}
    effects: list[Effect] = [Put("claims", str(tx.index), claim)]
    if share:
        effects.insert(0, Transfer(f"insurer:{policy['insurer']}", f"pharmacy:{pharmacy}", share,
                                   f"claim:{tx.index}"))
    return Accept(tuple(effects))


def _activity(state: State, tx: Tx) -> Outcome:
    patient = state.table("devices")[tx.signer]["owner"]
    policy = state.table("policies").get(patient)
    if policy is None or policy["wellness"] is None:
        return Accept()  # anchored, but no incentive reads it
    minutes = tx.payload["body"]["active_minutes"]
    key = f"{patient}:{tx.payload['ts'] // DAY_MS}"
    best = state.table("activity").get(key)
    if best is not None and best[0] >= minutes:
        return Accept()
    return Accept((Put("activity", key, [minutes, tx.index]),))


def _weekly_activity(state: State, tx: Tx) -> Outcome:
    body = tx.payload["body"]
    patient = state.table("devices")[tx.signer]["owner"]
    policy = state.table("policies").get(patient)
    if policy is None:
        return Reject("no_policy")
    if policy["policy_id"] != body["policy"]:
        return Reject("not_the_patients_policy")
    if policy["wellness"] is None:
        return Reject("no_wellness_incentive")
    try:
        week_days(body["week"])
    except ValueError:
        return Reject("bad_week")
    key = f"{patient}:{body['week']}"
    best = state.table("weekly_activity").get(key)
    if best is not None and best[0] >= body["active_minutes"]:
        return Accept()
    return Accept((Put("weekly_activity", key, [body["active_minutes"], tx.index]),))


def week_days(week: str) -> range:
    """The UTC day numbers (days since 1970-01-01) of an ISO week "YYYY-Www"; ValueError if no such week."""
    monday = datetime.date.fromisocalendar(int(week[:4]), int(week[6:]), 1)
    first = (monday - _EPOCH).days
    return range(first, first + 7)


def _settle(state: State, tx: Tx) -> Outcome:
    s = parse(WellnessSettle, tx.payload)
    if s is None:
        return Reject("bad_payload")
    policy = state.table("policies").get(s.patient_token)
    if policy is None:
        return Reject("no_policy")
    if policy["insurer"] != tx.signer:
        return Reject("not_the_insurer")
    if policy["wellness"] is None:
        return Reject("no_wellness_incentive")
    try:
        days = week_days(s.week)
    except ValueError:
        return Reject("bad_week")
    if s.ts < (days[-1] + 1) * DAY_MS:
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
              "amount": amount, "at": tx.index}
    effects: list[Effect] = [Put("wellness", key, record)]
    if amount:
        effects.insert(0, Transfer(f"insurer:{policy['insurer']}", f"patient:{s.patient_token}", amount,
                                   f"wellness:{s.week}"))
    return Accept(tuple(effects))
