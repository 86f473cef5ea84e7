"""A miner's contract snapshots: a restart restores the newest one and replays only the cosigned leaves
after it, to the state a replay from the genesis reaches; a snapshot that is damaged, foreign, stale-ahead
or not extended by the log to the cosigned root is never used (real files in a tmp data dir)."""

from __future__ import annotations

import logging
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_contracts_witness import V1World, honest_day
from test_contracts_world import FLU_SHOT, World

from carechain.merkle import extend_frontier, frontier_root, leaf_hash
from chain_miner.snapshots import SNAPSHOT_FILE, ContractReplayError, MinerSnapshots
from chain_miner.witness import WitnessState
from contract_rules import ContractWitness, Genesis


def cosigned(leaves: Sequence[bytes]) -> WitnessState:
    """The witness state of a miner that cosigned the tree of `leaves`."""
    frontier = extend_frontier(0, (), [leaf_hash(e) for e in leaves])
    return WitnessState("log.example/test", len(leaves), frontier_root(frontier), None, frontier)


class Log:
    """Serves leaves like the proof responder does, and remembers what it was asked."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.asked: list[tuple[int, int]] = []

    def __call__(self, old: int, new: int) -> list[bytes]:
        self.asked.append((old, new))
        return self.leaves[old:new]


def long_day() -> tuple[World, list[bytes]]:
    w = honest_day()
    for amount in range(1, 13):
        assert w.transfer(w.insurer, "pool:miners", amount) == "ok"
    w.add(w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=4500))
    assert all(r == "ok" for _, r in w.state.results)
    return w, [e.encode() for e in w.entries]


def judged(genesis: Genesis, data_dir: Path, leaves: list[bytes], cuts: Sequence[int], every: int
           ) -> tuple[ContractWitness, MinerSnapshots]:
    """A miner that judged and cosigned the log checkpoint by checkpoint, snapshotting as it went."""
    witness = ContractWitness(genesis)
    keeper = MinerSnapshots(data_dir, witness, every=every)
    keeper.restore(WitnessState(None))
    old = 0
    for new in cuts:
        assert witness(old, new, leaves[old:new]) is None
        keeper.after_cosign(cosigned(leaves[:new]))
        old = new
    return witness, keeper


def test_a_restart_replays_only_the_leaves_after_the_snapshot(tmp_path: Path) -> None:
    w, leaves = long_day()
    n = len(leaves)
    _, keeper = judged(w.genesis, tmp_path, leaves, (5, 12, 22, n - 3), every=10)
    assert n - 3 - 22 < 10 and keeper.saved_size == 22  # saved at 12 and at 22, not since
    path = tmp_path / SNAPSHOT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The miner cosigned up to n - 3, then stopped without saving; it restarts and the tree has grown.
    restarted = ContractWitness(w.genesis)
    again = MinerSnapshots(tmp_path, restarted, every=10)
    state = cosigned(leaves[: n - 3])
    assert again.restore(state) == 22 and restarted.size == 22
    log = Log(leaves)
    tail = again.catch_up(state, log)
    assert tail is not None and (tail.old_size, len(tail.entries)) == (22, n - 3 - 22)
    assert tail.old_frontier == cosigned(leaves[:22]).frontier
    assert log.asked == [(22, n - 3)]  # not the leaves the snapshot covers
    assert restarted(n - 3, n, leaves[n - 3:]) is None
    assert restarted.state.root() == w.state.root()
    assert again.catch_up(cosigned(leaves), log) is not None and log.asked == [(22, n - 3)]  # nothing to fetch


def test_save_at_stop_and_restore_the_exact_state(tmp_path: Path) -> None:
    w, leaves = long_day()
    witness, keeper = judged(w.genesis, tmp_path, leaves, (len(leaves),), every=10**9)
    assert not (tmp_path / SNAPSHOT_FILE).exists()
    assert keeper.save(cosigned(leaves))
    restarted = ContractWitness(w.genesis)
    keeper = MinerSnapshots(tmp_path, restarted)
    assert keeper.restore(cosigned(leaves)) == len(leaves)
    assert restarted.state.root() == witness.state.root() == w.state.root()
    assert restarted.state.results == witness.state.results
    # A state that is not the cosigned tree's is never saved.
    assert not keeper.save(cosigned(leaves[:-1]))


def test_a_damaged_or_foreign_snapshot_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w, leaves = long_day()
    _, keeper = judged(w.genesis, tmp_path, leaves, (len(leaves),), every=1)
    path = tmp_path / SNAPSHOT_FILE
    good = path.read_bytes()
    state = cosigned(leaves)
    other = Genesis(w.genesis.operators, {"insurer:x": 1}, w.genesis.contracts)
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 1
    with caplog.at_level(logging.WARNING, logger="carechain.miner"):
        for data, genesis, why in ((bytes(damaged), w.genesis, "checksum"), (b"\x00", w.genesis, "damaged"),
                                   (good, other, "another genesis")):
            path.write_bytes(data)
            witness = ContractWitness(genesis)
            assert MinerSnapshots(tmp_path, witness).restore(state) == 0 and witness.size == 0
            assert why in caplog.text
        # Ahead of the tree this miner cosigned (its witness state is older than the snapshot): not used.
        path.write_bytes(good)
        witness = ContractWitness(w.genesis)
        keeper = MinerSnapshots(tmp_path, witness)
        assert keeper.restore(cosigned(leaves[:-1])) == 0 and "beyond" in caplog.text
        # From the genesis, the replay still reaches the honest state.
        tail = keeper.catch_up(cosigned(leaves[:-1]), Log(leaves))
        assert tail is not None and tail.old_size == 0 and witness.size == len(leaves) - 1


def test_a_snapshot_the_log_does_not_extend_to_the_cosigned_root_is_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w, leaves = long_day()
    _, keeper = judged(w.genesis, tmp_path, leaves, (10,), every=1)
    assert keeper.saved_size == 10
    # The miner's data dir holds a snapshot at 10 leaves, but what it cosigned is another log of this
    # genesis (e.g. a data dir copied from another deployment): leaf 9 differs, so the snapshot's frontier
    # and the served tail cannot reach the cosigned root.
    fork = V1World()
    fork.standard_parties()
    fork.policy("pt-alice")
    for amount in range(1, 6):
        assert fork.transfer(fork.insurer, "pool:miners", amount) == "ok"
    fork_leaves = [e.encode() for e in fork.entries]
    assert fork_leaves[:9] == leaves[:9] and fork_leaves[9] != leaves[9]
    state = cosigned(fork_leaves)
    witness = ContractWitness(w.genesis)
    again = MinerSnapshots(tmp_path, witness)
    assert again.restore(state) == 10
    fork_log = Log(fork_leaves)
    with caplog.at_level(logging.WARNING, logger="carechain.miner"):
        tail = again.catch_up(state, fork_log)
    assert "replaying from the genesis" in caplog.text
    assert fork_log.asked == [(10, len(fork_leaves)), (0, len(fork_leaves))]
    assert tail is not None and tail.old_size == 0 and witness.state.root() == fork.state.root()
    # A log that serves leaves that are not the cosigned tree at all: nothing applied, retry later.
    witness = ContractWitness(w.genesis)
    fresh = MinerSnapshots(tmp_path / "fresh", witness)
    assert fresh.catch_up(state, Log(leaves)) is None and witness.size == 0


def test_cosigned_leaves_that_are_not_entries_stop_the_replay(tmp_path: Path) -> None:
    w, leaves = long_day()
    junk = [*leaves[:3], b"\xa1\x61t\x61x"]
    witness = ContractWitness(w.genesis)
    with pytest.raises(ContractReplayError, match="leaf 3: bad_leaf"):
        MinerSnapshots(tmp_path, witness).catch_up(cosigned(junk), Log(junk))
    assert witness.size == 0
