"""Access rules (v2): access v1 unchanged, plus a slash of the miner's bond for each proven bad fragment.

v1 (contract_rules/access.py, pinned by its hash on deployed logs) counts an accepted `access.fault` against
the miner in `access_faults`. v2 runs exactly the same checks and effects and adds
`bonds.slash(miner, "bad_capsule_fragment", index)`: a miner that signs capsule fragments that fail
verification pays for it from its bond, and every miner recomputes that from the evidence on the ledger.
"""

from __future__ import annotations

from contract_rules import access, bonds
from contract_rules.runtime import Accept, Add, Outcome, State, Tx
from contract_rules.transactions import ACCESS_FAULT

NAME = "access"
VERSION = 2


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    outcome = access.apply(state, tx)
    if tx.type != ACCESS_FAULT or not isinstance(outcome, Accept):
        return outcome
    # v1 accepts a fault with exactly one `access_faults` count, keyed by the miner it proves the fault against.
    miner = next(e.key for e in outcome.effects if isinstance(e, Add) and e.table == "access_faults")
    return Accept((*outcome.effects, *bonds.slash(state, miner, "bad_capsule_fragment", tx.index)))
