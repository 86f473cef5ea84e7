"""Slashing for offences defined after the bonds contract was pinned (a library, not a rule module).

`contract_rules.bonds.slash` takes the amount from `bonds.SLASH`, and `bonds.py` is pinned by its code hash on every
deployed genesis, so a new offence cannot be added there without stopping old ledgers from replaying. A newer rule
module names its offence and amount here instead; the effects are exactly the shape `bonds.slash` produces (the
bond record's `amount`, `unbonding`, `suspended_at` and `offences`, the tokens to "pool:miners"), so every reader of
bonds — `is_admitted`, `miners.active_miners`, unbonding — treats them alike.
"""

from __future__ import annotations

from contract_rules.bonds import MIN_BOND, POOL, bond_account, bond_of
from contract_rules.runtime import Effect, Put, State, Transfer

__all__ = ["slash_by"]


def slash_by(state: State, party_id: str, offence: str, amount: int, evidence_index: int) -> tuple[Effect, ...]:
    """The effects of taking `amount` (at most the whole bond) from `party_id` for `offence`, proven by the leaf at
    `evidence_index`; a party without a bond has the offence recorded in table "offences". Suspends the bond
    when what is left falls below its role's minimum. Call it at most once per party per entry."""
    record = bond_of(state, party_id)
    if record is None:
        past = state.table("offences").get(party_id, [])
        return (Put("offences", party_id, [*past, [evidence_index, offence]]),)
    taken = min(amount, record["amount"])
    left = record["amount"] - taken
    suspended = record["suspended_at"]
    if suspended is None and left < MIN_BOND.get(record["role"], 0):
        suspended = evidence_index
    updated = {**record, "amount": left, "unbonding": min(record["unbonding"], left), "suspended_at": suspended,
               "offences": [*record["offences"], [evidence_index, offence]]}
    put = Put("bonds", party_id, updated)
    if not taken:
        return (put,)
    return (Transfer(bond_account(party_id), POOL, taken, f"slash:{offence}:{evidence_index}"), put)
