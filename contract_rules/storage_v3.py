"""Storage rules (v3): storage v2 unchanged, except that `checkpoint.final` also records the note's seed.

v2 (contract_rules/storage_v2.py, pinned by its hash on deployed logs) keeps {"size", "root", "at"} of the latest
final checkpoint in table `final`, key "last". A rule that draws from "the latest final checkpoint" (the data
market's audit sample, `contract_rules.market`) must take exactly that note's seed: the same checkpoint with
other signature lines (fewer cosignatures, or lines by keys that are not miners) has another seed, so a drawer
naming the checkpoint could otherwise pick among several. v3 adds "seed" (hex of `miners.final_note(...).seed`)
to the record; everything else is v2's.
"""

from __future__ import annotations

from contract_rules import miners, storage_v2
from contract_rules.runtime import Accept, Effect, Outcome, Put, State, Tx
from contract_rules.transactions import CHECKPOINT_FINAL, CheckpointFinal, parse

NAME = "storage"
VERSION = 3


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    outcome = storage_v2.apply(state, tx)
    if tx.type != CHECKPOINT_FINAL or not isinstance(outcome, Accept):
        return outcome
    c = parse(CheckpointFinal, tx.payload)
    final = miners.final_note(state, c.note, tx.index) if c is not None else "bad_payload"
    if isinstance(final, str):  # v2 accepted the same note against the same state: never happens
        return outcome
    effects: list[Effect] = [Put(e.table, e.key, {**e.value, "seed": final.seed.hex()})
                             if isinstance(e, Put) and e.table == "final" and e.key == "last" else e
                             for e in outcome.effects]
    return Accept(tuple(effects))
