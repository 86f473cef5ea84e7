"""Deterministic contracts over the ledger: runtime, token ledger, prescriptions and insurance (sans-IO).

Public surface: `Genesis` (and its file form in `contract_rules.genesis`), `Runtime` (`apply`, `check`),
`State` (its `root()`), replay (`Replica`, `replay`, `replay_leaves`, `ContractWitness` — the miners' hook —
and the `Violation` it reports), `CodeBook`, `load_rule_source`, `MissingContractCode`, the entry models
and builders in `contract_rules.transactions`, and the access-record readers in `contract_rules.access`
(`access_record`, `is_usable`, `granted_epochs`, `registered_miners`, `request_key_of`). See docs/contracts.md.
"""

from contract_rules.replay import ContractWitness, Replica, Violation, replay, replay_leaves
from contract_rules.runtime import (
    CodeBook,
    Genesis,
    MissingContractCode,
    Runtime,
    State,
    builtin_hashes,
    load_rule_source,
)

__all__ = ["CodeBook", "ContractWitness", "Genesis", "MissingContractCode", "Replica", "Runtime", "State",
           "Violation", "builtin_hashes", "load_rule_source", "replay", "replay_leaves"]
