"""Token ledger rules (v1): a registered party moves minor units out of its own account.

Accounts are "<role>:<id>" strings: "insurer:<party id>", "pharmacy:<party id>", "miner:<party id>",
"patient:<patient token>", "pool:<name>". The whole supply is fixed by the genesis; every later change
is a `Transfer` effect, which the runtime applies only when the source covers it, so the sum of all
balances never changes.
"""

from __future__ import annotations

from contract_rules.runtime import Accept, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import TokenTransfer, parse

NAME = "tokens"
VERSION = 1


def account_of(role: str, party_id: str) -> str:
    return f"{role}:{party_id}"


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    t = parse(TokenTransfer, tx.payload)
    if t is None:
        return Reject("bad_payload")
    src = account_of(tx.role, tx.signer)
    nonce_key = f"{tx.signer}:{t.nonce}"
    if nonce_key in state.table("nonces"):
        return Reject("nonce_reused")
    if t.to == src:
        return Reject("transfer_to_self")
    if state.balance(src) < t.amount:
        return Reject("insufficient_funds")
    return Accept((Transfer(src, t.to, t.amount, t.memo), Put("nonces", nonce_key, tx.index)))
