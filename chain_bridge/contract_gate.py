"""The bridge's contract gate: a `Runtime` kept in step with the ledger, consulted before a sale is appended.

It implements the ledger's `EventGate`: under the write lock it replays the committed leaves it has not
seen, then decides each new event in log order. A purchase the contracts refuse is appended as a
`sale.refused` entry (signed by the operator key, wrapping the terminal's signed bytes) so it counts
against the pharmacy; a sale the contracts would not even accept as refused (e.g. from a device the
contracts do not know) is not appended at all. Other event kinds go in unchecked, as before.
"""

from __future__ import annotations

import time

from carechain.entries import ENTRY_EVENT, Entry
from carechain.identity import Identity
from chain_bridge.ledger.store import EventCandidate, Ledger
from contract_rules import CodeBook, Genesis, Replica, Runtime, State
from contract_rules import transactions as ce
from contract_rules.runtime import OK

PURCHASE = "purchase"


class ContractGate:
    def __init__(self, genesis: Genesis, operator: Identity, code: CodeBook | None = None) -> None:
        if operator.device_id not in genesis.operators:
            raise ValueError(f"the bridge's operator key {operator.device_id} is not a genesis operator: the "
                             "contracts would reject every sale.refused it signs")
        self.genesis = genesis
        self.operator = operator
        self.replica = Replica(genesis, code)
        self._stale = False

    @property
    def runtime(self) -> Runtime:
        return self.replica.runtime

    @property
    def state(self) -> State:
        return self.replica.state

    def catch_up(self, ledger: Ledger) -> None:
        """Apply the committed leaves beyond what the runtime has seen (all of them after an abort)."""
        if self._stale:
            self.replica.reset()
            self._stale = False
        self.replica.apply_leaves(ledger.leaves(self.replica.size, ledger.size))

    def admit(self, index: int, candidate: EventCandidate) -> Entry | str | None:
        if index != self.runtime.state.size:  # cannot happen after catch_up; never decide on a stale state
            raise RuntimeError(f"contract gate at size {self.runtime.state.size} asked about leaf {index}")
        entry = Entry(ENTRY_EVENT, Entry.decode(candidate.leaf).cose)
        if candidate.kind == PURCHASE:
            reason = self.runtime.check(entry)
            if reason != OK:
                refusal = ce.signed(self.operator, ce.SALE_REFUSED,
                                    ce.SaleRefusal(event=entry.cose, reason=reason, ts=int(time.time() * 1000)))
                if self.runtime.check(refusal) != OK:
                    return reason  # not a sale the contracts can count: refuse it without a leaf
                self.runtime.apply(refusal)
                return refusal
        self.runtime.apply(entry)
        return None

    def abort(self) -> None:
        self._stale = True  # leaves applied in the rolled-back transaction: rebuild from the ledger
