"""Contract snapshots for a miner: a restart replays only the leaves after the newest one, not the whole log.

A miner's `ContractWitness` holds the contract state of every leaf it cosigned. Rebuilding it from leaf 0
at each start costs ~150 µs a leaf (minutes for millions), and asks the log for all of them. So the miner
writes its state to DATA_DIR/contracts.snapshot (0600, atomically) every `every` cosigned leaves and when it
stops, together with the Merkle frontier of the tree it covers; at start it restores the file and fetches
only the leaves after it. Those are checked exactly as a cosignature checks them: the snapshot's frontier
extended by their leaf hashes must give the root of the tree the miner cosigned, so neither a stale nor a
foreign snapshot nor a lying log can slip in a state the miner never judged. A snapshot that is damaged, of
another genesis, or ahead of the cosigned tree is not used (logged; the miner replays from the genesis).

How `chain_miner.service.WitnessMiner` uses it (`MinerSnapshots`):
- at start: `restore(cosigned)` before judging anything;
- `catch_up(cosigned, leaves)` where it replayed the cosigned tree from leaf 0 (returns the `Tail` it
  replayed, for the access releaser, or None when the log did not serve it);
- `after_cosign(state)` after each cosignature is persisted; `save(state)` at stop.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from carechain import cbor
from carechain.files import write_atomic
from carechain.merkle import extend_frontier, frontier_root, leaf_hash
from chain_miner.witness import WitnessState
from contract_rules.replay import ContractWitness, SnapshotError, genesis_hash

__all__ = ["SNAPSHOT_EVERY", "SNAPSHOT_FILE", "ContractReplayError", "MinerSnapshots", "Tail"]

SNAPSHOT_FILE = "contracts.snapshot"
# A restart replays at most about this many leaves (~1.5 s); a snapshot costs one write of the contract tables.
SNAPSHOT_EVERY = 10_000
FILE_VERSION = 1
log = logging.getLogger("carechain.miner")


class ContractReplayError(Exception):
    """Leaves of the cosigned tree are not entries at all: the genesis file or the contract code changed
    under this miner. Never silently skipped (the miner would judge new leaves on a state it cannot vouch for)."""


@dataclass(frozen=True)
class Tail:
    """The cosigned leaves replayed at start, after the snapshot: `entries` from `old_size`, whose tree's
    frontier is `old_frontier` (what `AccessReleaser.after_cosign` takes)."""

    old_size: int
    old_frontier: tuple[bytes, ...]
    entries: list[bytes]


class MinerSnapshots:
    """Saves and restores one miner's `ContractWitness` state with the frontier of the tree it covers."""

    def __init__(self, data_dir: Path, witness: ContractWitness, every: int = SNAPSHOT_EVERY) -> None:
        self.path = Path(data_dir) / SNAPSHOT_FILE
        self.witness = witness
        self.every = every
        self.frontier: tuple[bytes, ...] = ()  # of the tree the witness's state covers
        self.saved_size = 0
        self._genesis_hash = genesis_hash(witness.genesis)

    def restore(self, cosigned: WitnessState) -> int:
        """Load the snapshot file into the witness, if it is usable under `cosigned` (the persisted witness
        state); returns the leaves it covers (0: start from the genesis)."""
        self._reset()
        if not self.path.exists():
            return 0
        try:
            size, frontier, state = self._read()
        except (OSError, SnapshotError) as exc:
            log.warning("%s not used (%s): replaying the contracts from the genesis", self.path, exc)
            return 0
        if size > cosigned.tree_size:
            log.warning("%s covers %d leaves, beyond the %d this miner cosigned: replaying from the genesis",
                        self.path, size, cosigned.tree_size)
            return 0
        if size == cosigned.tree_size and not hmac.compare_digest(frontier_root(frontier), cosigned.root_hash):
            log.warning("%s is not of the tree this miner cosigned: replaying from the genesis", self.path)
            return 0
        try:
            self.witness.restore(state)
        except SnapshotError as exc:
            log.warning("%s not used (%s): replaying the contracts from the genesis", self.path, exc)
            self._reset()
            return 0
        if self.witness.size != size:
            log.warning("%s holds a state of %d leaves, not %d: replaying from the genesis", self.path,
                        self.witness.size, size)
            self._reset()
            return 0
        self.frontier, self.saved_size = frontier, size
        return size

    def catch_up(self, cosigned: WitnessState,
                 leaves: Callable[[int, int], Sequence[bytes] | None]) -> Tail | None:
        """Replay the cosigned leaves the witness has not applied, fetched with `leaves(old, new)`.

        None when the log did not serve them, or served leaves that are not the cosigned tree's (retry at
        the next checkpoint). A snapshot the log's leaves do not extend to the cosigned root is dropped
        and the replay starts from the genesis. Raises ContractReplayError if the cosigned leaves are not
        entries (see there).
        """
        done = self.witness.size
        if done > cosigned.tree_size:  # never judge on a state ahead of what was cosigned
            self._reset()
            done = 0
        if done == cosigned.tree_size:
            return Tail(done, self.frontier, [])
        entries = leaves(done, cosigned.tree_size)
        if entries is None or len(entries) != cosigned.tree_size - done:
            return None
        grown = extend_frontier(done, self.frontier, [leaf_hash(e) for e in entries])
        if not hmac.compare_digest(frontier_root(grown), cosigned.root_hash):
            if done == 0:
                log.warning("the served leaves 0..%d are not the tree this miner cosigned", cosigned.tree_size - 1)
                return None
            log.warning("leaves after the contract snapshot at %d do not reach the cosigned root: replaying "
                        "from the genesis", done)
            self._reset()
            return self.catch_up(cosigned, leaves)
        old_frontier = self.frontier
        violation = self.witness(done, cosigned.tree_size, entries)
        if violation is not None:
            raise ContractReplayError(f"replaying the cosigned tree ({cosigned.tree_size} leaves) stops at leaf "
                                      f"{violation.leaf_index}: {violation.rule}; check the genesis file")
        self.frontier = grown
        return Tail(done, old_frontier, list(entries))

    def after_cosign(self, cosigned: WitnessState) -> bool:
        """Note the cosigned tree the witness's state now covers; save when `every` leaves have passed."""
        if cosigned.tree_size != self.witness.size:
            return False
        self.frontier = cosigned.frontier
        if cosigned.tree_size - self.saved_size < self.every:
            return False
        self.save(cosigned)
        return True

    def save(self, cosigned: WitnessState) -> bool:
        """Write the snapshot now (at stop), if the witness's state is that of the cosigned tree."""
        if cosigned.tree_size != self.witness.size or cosigned.tree_size == 0:
            return False
        body = cbor.encode({"v": FILE_VERSION, "genesis": self._genesis_hash, "size": cosigned.tree_size,
                            "frontier": list(cosigned.frontier), "state": self.witness.snapshot()})
        write_atomic(self.path, cbor.encode({"body": body, "sha256": hashlib.sha256(body).digest()}))
        self.frontier, self.saved_size = cosigned.frontier, cosigned.tree_size
        return True

    def _read(self) -> tuple[int, tuple[bytes, ...], bytes]:
        """(size, frontier, state bytes) from the file; SnapshotError if it is not a usable snapshot."""
        data = self.path.read_bytes()
        try:
            outer = cbor.decode(data, max_depth=2)
            body = outer["body"]
            if not hmac.compare_digest(hashlib.sha256(body).digest(), outer["sha256"]):
                raise SnapshotError("checksum mismatch (a damaged file)")
            raw = cbor.decode(body, max_depth=3, check_plain=False)
            if raw["v"] != FILE_VERSION:
                raise SnapshotError(f"file version {raw['v']!r}, this miner reads {FILE_VERSION}")
            if raw["genesis"] != self._genesis_hash:
                raise SnapshotError("a snapshot of another genesis")
            size, frontier, state = raw["size"], tuple(raw["frontier"]), raw["state"]
            if type(size) is not int or size < 0 or not isinstance(state, bytes) or \
                    len(frontier) != bin(size).count("1") or \
                    any(not isinstance(h, bytes) or len(h) != 32 for h in frontier):
                raise SnapshotError("malformed snapshot fields")
        except (cbor.CBORError, KeyError, TypeError) as exc:
            raise SnapshotError(f"damaged snapshot file: {exc}") from None
        return size, frontier, state

    def _reset(self) -> None:
        self.witness.reset()
        self.frontier, self.saved_size = (), 0
