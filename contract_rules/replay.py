"""Replaying a log through the contract rules: the one way the bridge, its tools and the miners do it.

A `Replica` is a `Runtime` kept in step with a log by applying its leaves in order, each under the code in
force at its index. The bridge's contract gate keeps one beside the ledger, `carechain rx|party|…` build
one from the whole ledger, and a miner's `ContractWitness` advances one range of leaves per cosigned
checkpoint: a leaf the rules do not accept is void (recorded, changes nothing else) and reported in
`witness.voids`; only a leaf that is not an entry at all stops it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from carechain import cbor
from carechain.entries import LEDGER_ENTRY_TYPES, Entry, EntryError
from carechain.evidence import Violation
from contract_rules.runtime import OK, CodeBook, Genesis, Results, Runtime, State

LEAF_TYPES = LEDGER_ENTRY_TYPES

__all__ = ["LEAF_TYPES", "ContractWitness", "Replica", "SnapshotError", "Violation", "decode_leaf", "genesis_hash",
           "replay", "replay_leaves"]

# 2: refused leaves are recorded as voids (`void` table); a version 1 snapshot lacks them, so it is replayed.
SNAPSHOT_VERSION = 2


class SnapshotError(ValueError):
    """Bytes that are not a contract snapshot this replica can restore (replay from the genesis instead)."""


def genesis_hash(genesis: Genesis) -> bytes:
    """What a snapshot is bound to: a state is only meaningful under the genesis it grew from."""
    return hashlib.sha256(b"carechain/contracts/genesis/v1\x00" + genesis.to_cbor()).digest()


def decode_leaf(data: bytes) -> Entry:
    """Decode a ledger leaf `{"t", "cose"}` of any device or contract entry type (strict, canonical only)."""
    return Entry.decode(data, types=LEAF_TYPES)


class Replica:
    """The contract state of a log's first `size` leaves, advanced leaf by leaf."""

    def __init__(self, genesis: Genesis, code: CodeBook | None = None) -> None:
        self.genesis = genesis
        self.code = code
        self.runtime = Runtime(genesis, code)

    @property
    def state(self) -> State:
        return self.runtime.state

    @property
    def size(self) -> int:
        return self.runtime.state.size

    def reset(self) -> None:
        """Back to the genesis (e.g. after leaves it applied were rolled back)."""
        self.runtime = Runtime(self.genesis, self.code)

    def snapshot(self) -> bytes:
        """The state as deterministic CBOR, to resume from without replaying the leaves it covers.

        `results` holds `[index, outcome]` for every leaf, almost all "ok": the snapshot keeps only the
        other outcomes, so it grows with the contract tables and the refusals, not with the log.
        """
        state = self.state
        refused = state.results.refused()
        return cbor.encode({"v": SNAPSHOT_VERSION, "operators": state.operators, "balances": state.balances,
                            "supply": state.supply, "versions": state.versions, "tables": state.tables,
                            "size": state.size, "refused": refused})

    def restore(self, data: bytes) -> None:
        """Continue from a `snapshot()` (of this genesis; the caller checks). Raises SnapshotError."""
        try:
            raw = cbor.decode(data, max_depth=64)
            if not isinstance(raw, dict) or raw.get("v") != SNAPSHOT_VERSION:
                raise SnapshotError(f"not a version {SNAPSHOT_VERSION} contract snapshot")
            size = raw["size"]
            if type(size) is not int or size < 0:
                raise SnapshotError(f"a snapshot of {size!r} leaves")
            refused: dict[int, str] = {}
            for index, outcome in raw["refused"]:
                if type(index) is not int or not 0 <= index < size or not isinstance(outcome, str) or outcome == OK:
                    raise SnapshotError(f"a refusal {outcome!r:.40} at leaf {index!r:.20} outside the snapshot's "
                                        f"{size} leaves")
                refused[index] = outcome
            state = State(operators=raw["operators"], balances=raw["balances"], supply=raw["supply"],
                          versions=raw["versions"], tables=raw["tables"], results=Results(size, refused), size=size)
        except (cbor.CBORError, KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"damaged contract snapshot: {exc}") from None
        self.runtime = Runtime(self.genesis, self.code)
        self.runtime.state = state

    def apply_entries(self, entries: Iterable[Entry]) -> None:
        """Apply entries in log order; a rejected entry is recorded as rejected and changes nothing else."""
        for entry in entries:
            self.runtime.apply(entry)

    def apply_leaves(self, leaves: Iterable[bytes], *, events_verified: bool = False) -> None:
        """Apply encoded ledger leaves in log order (raises EntryError on a leaf that is not an entry).
        `events_verified`: see `Runtime.apply`'s `event_signature_checked` (only for a log whose events the
        caller's own ingest verified)."""
        for leaf in leaves:
            self.runtime.apply(decode_leaf(leaf), event_signature_checked=events_verified)

    def apply_ingested(self, leaf: bytes, dev: str, seq: int, kind: str, v: int) -> str:
        """Apply the next leaf, a device event this bridge's ingest has just checked and appended, from the
        fields ingest read (`Runtime.apply_ingested`: the leaf is decoded only if a contract reads it)."""
        return self.runtime.apply_ingested(dev, seq, kind, v, lambda: decode_leaf(leaf))


def replay(genesis: Genesis, entries: Iterable[Entry], code: CodeBook | None = None) -> State:
    """Replay a whole log from its genesis; each entry runs under the code in force at its index."""
    replica = Replica(genesis, code)
    replica.apply_entries(entries)
    return replica.state


def replay_leaves(genesis: Genesis, leaves: Iterable[bytes], code: CodeBook | None = None) -> Runtime:
    """A runtime that has applied every leaf of `leaves` (a whole log's, in order), ready for `check`."""
    replica = Replica(genesis, code)
    replica.apply_leaves(leaves)
    return replica.runtime


class ContractWitness(Replica):
    """A miner's entry verifier: `(old_size, new_size, leaves) -> Violation | None`, advancing on success.

    A leaf the rules refuse does not stop the miner: the runtime records it as void (no effects but its
    Reject's) and the miner keeps cosigning, so a dishonest bridge cannot stall finality by appending one;
    the range's voids are left in `self.voids` (cleared at every call) for the miner to publish as evidence.
    Only a leaf that is not a ledger entry at all is a `Violation` (returned, nothing applied): no honest
    log holds one. Judging a range costs O(its leaves): the state's undo journal, not a copy, takes it back
    on a violation. Raises `MissingContractCode` when the log pins code this miner lacks (state unchanged):
    neither cosign nor accuse then.
    """

    def __init__(self, genesis: Genesis, code: CodeBook | None = None) -> None:
        super().__init__(genesis, code)
        self.voids: list[Violation] = []

    def __call__(self, old_size: int, new_size: int, leaves: Sequence[bytes]) -> Violation | None:
        state = self.runtime.state
        if old_size != state.size:
            raise ValueError(f"the contract state covers {state.size} leaves, the range starts at {old_size}: "
                             "replay the log up to the last cosigned checkpoint first")
        if old_size + len(leaves) != new_size:
            raise ValueError(f"{len(leaves)} leaves do not take {old_size} to {new_size}")
        self.voids = []
        voids: list[Violation] = []
        state.journal = []  # taken back on a violation: the state follows cosigned trees only
        try:
            for offset, leaf in enumerate(leaves):
                index = old_size + offset
                try:
                    entry = decode_leaf(leaf)
                except EntryError as exc:
                    state.rollback()
                    return Violation(index, "bad_leaf", str(exc))
                result = self.runtime.apply(entry)
                if result != OK:
                    voids.append(Violation(index, result, f"{entry.type}: {result}"))
        except BaseException:
            state.rollback()
            raise
        finally:
            state.journal = None
        self.voids = voids
        return None
