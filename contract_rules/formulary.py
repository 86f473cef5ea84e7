"""Formulary rules (v1): which drugs need a prescription, their schedule and how much one sale may hold.

A registered *authority* (a regulator or the deployment's pharmacy board, registered by the operator with
role "authority") signs `formulary.set` entries; each sets (adds or replaces) items in table `formulary`,
keyed "system:code": {"rx_only", "schedule", "max_quantity", "authority", "at"}. The prescription rules
read it at every sale (`terms_of`): the formulary decides whether a sale needs an Rx, never the terminal's
`rx_only` flag, which can only make a sale stricter. An item that is not on the formulary is Rx-only: a
drug nobody has classified is not sold over the counter by default.

A controlled item (schedule 1-5) must be Rx-only: a `formulary.set` saying otherwise is rejected whole.
"""

from __future__ import annotations

from typing import Any

from contract_rules.runtime import Accept, Outcome, Put, Reject, State, Tx
from contract_rules.transactions import FORMULARY_SET, FormularySet, parse

NAME = "formulary"
VERSION = 1
TABLE = "formulary"
# What an item off the formulary is treated as: Rx-only, not controlled, no quantity limit beyond the Rx.
UNLISTED: dict[str, Any] = {"rx_only": True, "schedule": 0, "max_quantity": None}


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type != FORMULARY_SET:
        return Reject("not_a_formulary_entry")
    f = parse(FormularySet, tx.payload)
    if f is None:
        return Reject("bad_payload")
    items = [i.item for i in f.items]
    if len(set(items)) != len(items):
        return Reject("formulary_item_repeated")
    if any(i.schedule and not i.rx_only for i in f.items):
        return Reject("controlled_item_not_rx_only")
    return Accept(tuple(Put(TABLE, i.item, {"rx_only": i.rx_only, "schedule": i.schedule,
                                            "max_quantity": i.max_quantity, "authority": tx.signer, "at": tx.index})
                        for i in f.items))


def terms_of(state: State, item: str) -> dict[str, Any]:
    """The formulary terms of `item` ("system:code"); `UNLISTED` (Rx-only) when it is not on the formulary."""
    record: dict[str, Any] | None = state.table(TABLE).get(item)
    return UNLISTED if record is None else record
