"""Contract re-execution for miners: an `EntryVerifier` for `chain_miner.witness`.

A miner keeps one `ContractWitness` in step with the checkpoints it cosigns. For each new range of leaves
it replays the entries; on an honest log every one is accepted ("ok"), since the bridge appends only what
`Runtime.check` accepts and records refused sales as `sale.refused`. The first entry that is not accepted
is a violation: the miner refuses to cosign, and the state stays at the last cosigned tree.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from carechain.entries import LEDGER_ENTRY_TYPES, Entry, EntryError
from contract_rules.runtime import OK, CodeBook, Genesis, Runtime, State

LEAF_TYPES = LEDGER_ENTRY_TYPES


@dataclass(frozen=True)
class ContractViolation:
    """The first leaf in a range that the contracts do not accept (fields as the miners' `Violation`)."""

    leaf_index: int
    rule: str  # the rejection reason, e.g. "rx_missing"
    detail: str


def decode_leaf(data: bytes) -> Entry:
    """Decode a ledger leaf `{"t", "cose"}` of any device or contract entry type (strict, canonical only)."""
    return Entry.decode(data, types=LEAF_TYPES)


class ContractWitness:
    """Callable as `(old_size, new_size, leaves) -> ContractViolation | None`, advancing only on success.

    Raises `MissingContractCode` when the log pins code this miner lacks: neither cosign nor accuse then.
    """

    def __init__(self, genesis: Genesis, code: CodeBook | None = None) -> None:
        self.runtime = Runtime(genesis, code)

    @property
    def state(self) -> State:
        return self.runtime.state

    def __call__(self, old_size: int, new_size: int, leaves: Sequence[bytes]) -> ContractViolation | None:
        state = self.runtime.state
        if old_size != state.size:
            raise ValueError(f"the contract state covers {state.size} leaves, the range starts at {old_size}: "
                             "replay the log up to the last cosigned checkpoint first")
        if old_size + len(leaves) != new_size:
            raise ValueError(f"{len(leaves)} leaves do not take {old_size} to {new_size}")
        saved = copy.deepcopy(state)  # restored on a violation: the state follows cosigned trees only
        for offset, leaf in enumerate(leaves):
            index = old_size + offset
            try:
                entry = decode_leaf(leaf)
            except EntryError as exc:
                violation = ContractViolation(index, "bad_leaf", str(exc))
            else:
                result = self.runtime.apply(entry)
                violation = None if result == OK else ContractViolation(index, result, f"{entry.type}: {result}")
            if violation is not None:
                self.runtime.state = saved
                return violation
        return None
