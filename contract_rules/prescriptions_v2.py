"""Prescription rules (v2): the formulary, not the terminal, decides which sales need an Rx; time is attested.

What v2 changes from v1 (`contract_rules.prescriptions`, whose anchoring and revocation it keeps as they are):

- Rx-only comes from the formulary (`contract_rules.formulary`): a sale needs a valid Rx when the formulary
  says the item is Rx-only, when the item is not on the formulary at all, or when the terminal flags it
  `rx_only` (the flag can only make a sale stricter). A sale of more packages than the formulary's
  `max_quantity` is refused, Rx or not. A controlled item (schedule 2-5) needs an Rx anchored as controlled;
  Schedule II allows no refills and Schedule I is never dispensed.
- Time is the bridge's attested time (`contract_rules.clock`), not the sale's own `ts`: an Rx is expired
  once the attested time reaches `expires_ms` (at that instant, not a millisecond later), and a sale whose
  `ts` is more than `clock.MAX_SALE_SKEW_MS` from the attested time is refused `sale_time_skew`, so a
  terminal cannot backdate a sale into an expired prescription. Before any attestation every sale is
  refused `no_attested_time` (the bridge's omission: nothing counts against the pharmacy).
- Teeth: the terminal's owner must be a registered pharmacy that is admitted (`bonds.is_admitted`: bonded,
  not suspended), else `pharmacy_not_admitted`. Every refusal that is the pharmacy's doing counts in
  `violations` (as in v1) and slashes its bond (`bonds.slash(..., "refused_sale", leaf index)`), inside
  the Reject, so a refused sale recorded as `sale.refused` costs the pharmacy on every replica.
"""

from __future__ import annotations

from typing import Any

from contract_rules import bonds, clock, formulary
from contract_rules import prescriptions as v1
from contract_rules.runtime import Accept, Add, Outcome, Put, Reject, State, Tx
from contract_rules.transactions import RX_ANCHOR, RX_REVOKE

NAME = "prescriptions"
VERSION = 2
TERMINAL_PROFILE = v1.TERMINAL_PROFILE
REFUSED_SALE = "refused_sale"  # the offence in bonds.SLASH


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type in (RX_ANCHOR, RX_REVOKE):
        return v1.apply(state, tx)  # anchoring and revocation are unchanged
    if tx.type == "event:purchase":
        return _sale(state, tx)
    return Reject("not_a_prescription_entry")


def _sale(state: State, tx: Tx) -> Outcome:
    device = state.table("devices")[tx.signer]
    if device["profile"] != TERMINAL_PROFILE:
        return Reject("not_a_pharmacy_terminal")
    owner = device["owner"]
    pharmacy = state.table("parties").get(owner)
    if pharmacy is None or pharmacy["role"] != "pharmacy":
        return Reject("terminal_owner_not_a_pharmacy")
    if not bonds.is_admitted(state, owner):
        return Reject("pharmacy_not_admitted")
    reason = clock.sale_time_problem(state, tx.payload["ts"])
    if reason == "no_attested_time":
        return Reject(reason)
    effects: tuple[Put, ...] = ()
    if reason is None:
        reason, effects = _check_item(state, tx.index, tx.payload["body"])
    if reason is not None:
        return Reject(reason, (Add("violations", f"pharmacy:{owner}", 1),
                               *bonds.slash(state, owner, REFUSED_SALE, tx.index)))
    return Accept(effects)


def _check_item(state: State, index: int, body: dict[str, Any]) -> tuple[str | None, tuple[Put, ...]]:
    """Judge the sold item against the formulary, then (if it needs one) the cited Rx."""
    terms = formulary.terms_of(state, f"{body['code_system']}:{body['item_code']}")
    if terms["schedule"] == 1:
        return "schedule_i_not_dispensable", ()
    if terms["max_quantity"] is not None and body["quantity"] > terms["max_quantity"]:
        return "formulary_quantity_exceeded", ()
    if not (terms["rx_only"] or body["rx_only"]):
        return None, ()
    return _check_rx(state, index, body, terms["schedule"])


def _check_rx(state: State, index: int, body: dict[str, Any], schedule: int) -> tuple[str | None, tuple[Put, ...]]:
    """v1's Rx checks and fill accounting, judged at the attested time instead of the sale's `ts`, then the
    schedule's: a controlled drug needs a controlled Rx, and Schedule II opens no refill."""
    now = clock.attested_ms(state)
    if now is None:  # `_sale` has refused it already; never judge on the terminal's time instead
        return "no_attested_time", ()
    reason, effects = v1._check_rx(state, index, now, body)  # expired when now >= expires_ms
    if reason is not None or not schedule:
        return reason, effects
    record = state.table("rx")[body["rx_ref"]]  # as it was before this sale
    if not record["controlled"]:
        return "rx_not_controlled", ()  # a controlled drug on an Rx its prescriber did not issue as controlled
    if schedule == 2 and record["fills"] >= 1 and record["open"] == 0:
        return "schedule_ii_no_refills", ()
    return None, effects

