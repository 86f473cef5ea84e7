"""Prescription rules (v1): anchoring, revocation, and the check every Rx-only sale must pass.

A sale of an Rx-only product (a `purchase` event from a registered pharmacy terminal with `rx_only`)
must cite, by `rx_ref`, an anchored prescription that is unrevoked, unexpired at the sale's time, for
this patient and this drug, with quantity left. Otherwise the sale is rejected and counted against the
pharmacy that owns the terminal. Fills: each fill dispenses up to `quantity` packages; a partial fill
leaves the rest of that fill open, and later sales draw on it before a refill is opened. Two terminals
racing for the last fill are decided by log order: the first entry takes it, the second is rejected.
"""

from __future__ import annotations

from typing import Any

from contract_rules.runtime import Accept, Add, Outcome, Put, Reject, State, Tx
from contract_rules.transactions import (
    RX_ANCHOR,
    RX_REVOKE,
    RxAnchor,
    RxRevoke,
    drug_commitment,
    parse,
    patient_commitment,
)

NAME = "prescriptions"
VERSION = 1
TERMINAL_PROFILE = "pharmacy_terminal"
MAX_CONTROLLED_REFILLS = 5  # US Schedules III-V allow at most five refills


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == RX_ANCHOR:
        return _anchor(state, tx)
    if tx.type == RX_REVOKE:
        return _revoke(state, tx)
    if tx.type == "event:purchase":
        return _sale(state, tx)
    return Reject("not_a_prescription_entry")


def _anchor(state: State, tx: Tx) -> Outcome:
    a = parse(RxAnchor, tx.payload)
    if a is None:
        return Reject("bad_payload")
    if a.rx_ref in state.table("rx"):
        return Reject("rx_already_anchored")
    if a.expires_ms <= a.ts:
        return Reject("rx_expires_before_issue")
    if a.controlled and a.refills > MAX_CONTROLLED_REFILLS:
        return Reject("controlled_too_many_refills")
    record = {"prescriber": tx.signer, "patient_c": a.patient_c, "drug_c": a.drug_c, "quantity": a.quantity,
              "refills": a.refills, "expires_ms": a.expires_ms, "controlled": a.controlled, "at": tx.index,
              "revoked_at": None, "fills": 0, "open": 0, "sales": []}
    return Accept((Put("rx", a.rx_ref, record),))


def _revoke(state: State, tx: Tx) -> Outcome:
    r = parse(RxRevoke, tx.payload)
    if r is None:
        return Reject("bad_payload")
    record = state.table("rx").get(r.rx_ref)
    if record is None:
        return Reject("unknown_rx")
    if record["prescriber"] != tx.signer:
        return Reject("not_the_prescriber")
    if record["revoked_at"] is not None:
        return Reject("rx_already_revoked")
    return Accept((Put("rx", r.rx_ref, {**record, "revoked_at": tx.index}),))


def _sale(state: State, tx: Tx) -> Outcome:
    device = state.table("devices")[tx.signer]
    if device["profile"] != TERMINAL_PROFILE:
        return Reject("not_a_pharmacy_terminal")
    pharmacy = state.table("parties").get(device["owner"])
    if pharmacy is None or pharmacy["role"] != "pharmacy":
        return Reject("terminal_owner_not_a_pharmacy")
    body = tx.payload["body"]
    if not body["rx_only"]:
        return Accept()
    reason, effects = _check_rx(state, tx.index, tx.payload["ts"], body)
    if reason is not None:
        return Reject(reason, (Add("violations", f"pharmacy:{device['owner']}", 1),))
    return Accept(effects)


def _check_rx(state: State, index: int, ts: int, body: dict[str, Any]) -> tuple[str | None, tuple[Put, ...]]:
    rx_ref = body.get("rx_ref")
    if rx_ref is None:
        return "rx_missing", ()
    record = state.table("rx").get(rx_ref)
    if record is None:
        return "rx_unknown", ()
    if record["revoked_at"] is not None:
        return "rx_revoked", ()
    if ts >= record["expires_ms"]:
        return "rx_expired", ()
    if patient_commitment(rx_ref, body["patient_token"]) != record["patient_c"]:
        return "rx_other_patient", ()
    if drug_commitment(rx_ref, body["code_system"], body["item_code"]) != record["drug_c"]:
        return "rx_other_drug", ()
    qty = body["quantity"]
    fills, left = record["fills"], record["open"]
    if left == 0:  # open the next fill (the first fill, then each refill)
        if fills >= 1 + record["refills"]:
            return "rx_no_fills_left", ()
        fills, left = fills + 1, record["quantity"]
    if qty > left:
        return "rx_quantity_exceeds_fill", ()
    updated = {**record, "fills": fills, "open": left - qty, "sales": [*record["sales"], index]}
    return None, (Put("rx", rx_ref, updated),)
