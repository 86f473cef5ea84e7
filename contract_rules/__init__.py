"""Deterministic contracts over the ledger: runtime, token ledger, prescriptions and insurance (sans-IO).

Public surface: `Genesis`, `Runtime` (`apply`, `check`), `replay`, `State` (its `root()`), `CodeBook`,
`load_rule_source`, `MissingContractCode`, `ContractWitness` (the miners' hook), and the entry models and
builders in `contract_rules.transactions`. See docs/contracts.md.
"""

from contract_rules.runtime import (
    CodeBook,
    Genesis,
    MissingContractCode,
    Runtime,
    State,
    builtin_hashes,
    load_rule_source,
    replay,
)
from contract_rules.witness import ContractViolation, ContractWitness

__all__ = ["CodeBook", "ContractViolation", "ContractWitness", "Genesis", "MissingContractCode", "Runtime", "State",
           "builtin_hashes", "load_rule_source", "replay"]
