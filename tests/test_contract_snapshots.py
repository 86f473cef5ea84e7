"""Contract snapshots: a restarted bridge, and one whose batch rolled back, replay only the leaves after the
newest snapshot, and reach the state a full replay from the genesis reaches (a real ledger, on SQLite and on
PostgreSQL; no broker)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from carechain import disk_full_points
from carechain.events import Activity
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.contract_gate import ContractGate
from contract_rules import Genesis, Replica, replay_leaves
from contract_rules.replay import SnapshotError, genesis_hash
from tests.conftest import LedgerFactory
from tests.test_contracts_ledger import FLU_SHOT, WEARABLE, Pharmacy


@pytest.fixture
def shop(tmp_path: Path, ledger_factory: LedgerFactory) -> Pharmacy:
    return Pharmacy(tmp_path, ledger_factory)


def busy(pharmacy: Pharmacy, activities: int = 30) -> None:
    """More of a log with parties, a policy, an Rx, anchored and refused sales, and plain device events."""
    if not replay_ledger(pharmacy.ledger, pharmacy.genesis).state.table("policies"):
        pharmacy.policy()
    rx = pharmacy.prescribe()
    pharmacy.send(pharmacy.sale(rx_ref=rx.rx_ref()), pharmacy.sale(rx_ref=None),
                  pharmacy.sale(FLU_SHOT, rx_only=False, pay="insurance", price=3_000))
    pharmacy.send(*(pharmacy.signed_event(WEARABLE, "activity", Activity(steps=10, active_minutes=m))
                    for m in range(activities)), dev=WEARABLE)


def full_replay_root(pharmacy: Pharmacy) -> bytes:
    """From leaf 0, no snapshot: what every snapshot must agree with."""
    return replay_leaves(pharmacy.genesis, pharmacy.ledger.leaves()).state.root()


def test_a_snapshot_restores_the_exact_state_refusals_included(shop: Pharmacy) -> None:
    busy(shop)
    gate = shop.bridge.contracts
    gate.catch_up(shop.ledger)
    assert any(r != "ok" for _, r in gate.state.results) or gate.state.table("violations")
    again = Replica(shop.genesis)
    again.restore(gate.replica.snapshot())
    assert again.state.root() == gate.state.root() == full_replay_root(shop)
    assert again.state.results == gate.state.results


def test_the_gate_follows_each_committed_batch_so_no_checkpoint_tick_replays_a_backlog(shop: Pharmacy) -> None:
    """Plain device events pass no contract decision, yet the contracts' replica takes in each batch right
    after its receipts: left to the checkpoint tick, a second of events was replayed at once while commits
    waited (the p99 of sign → receipt)."""
    busy(shop, activities=5)
    gate = shop.bridge.contracts
    assert gate is not None
    shop.send(*(shop.signed_event(WEARABLE, "activity", Activity(steps=1, active_minutes=m)) for m in range(40)),
              dev=WEARABLE)
    assert gate.replica.size == shop.ledger.size  # nothing left for the tick to replay
    assert gate.state.root() == full_replay_root(shop)  # events taken as ingest checked them: the miners' state


def test_a_restarted_bridge_replays_only_the_leaves_after_the_last_snapshot(shop: Pharmacy) -> None:
    shop.bridge.contracts.snapshot_every = 5
    busy(shop)
    shop.bridge.maybe_checkpoint()  # snapshots at the checkpoint, as far as the last sale brought the gate
    snapshot_size = shop.bridge.contracts.replica.size
    assert 0 < snapshot_size <= shop.ledger.size
    busy(shop, activities=7)  # leaves after the snapshot
    restarted = shop.start_bridge()
    assert restarted.contracts is not None
    assert restarted.contracts.replayed == shop.ledger.size - snapshot_size < shop.ledger.size
    assert restarted.contracts.state.root() == full_replay_root(shop)
    # Without snapshots (a gate that never took one) the whole log is replayed, to the same state.
    assert shop.ledger.contract_snapshot(genesis_hash(shop.genesis)) is not None


def test_a_rolled_back_batch_recovers_from_the_last_snapshot_and_keeps_the_gate_in_step(
        shop: Pharmacy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shop.bridge.contracts.snapshot_every = 5
    busy(shop)
    shop.bridge.maybe_checkpoint()
    snapshot_size = shop.bridge.contracts.replica.size
    assert snapshot_size > 0
    busy(shop, activities=3)
    size = shop.ledger.size
    flag = tmp_path / "full"
    flag.touch()
    monkeypatch.setattr(disk_full_points, "_flag", str(flag))
    sale = shop.sale(FLU_SHOT, rx_only=False, pay="insurance", price=3_000)
    # SQLite rolls back by itself on SQLITE_FULL at COMMIT: the disk-full error must surface (not "no
    # transaction is active") and the gate must forget the leaves it admitted. (On PostgreSQL the injected
    # error stands for any failed write: the transaction rolls back all the same.)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        shop.send(sale)
    assert shop.ledger.size == size
    flag.unlink()
    [receipt] = shop.send(sale)
    assert len(receipt.ok) == 1 and shop.ledger.size == size + 1
    gate = shop.bridge.contracts
    assert gate.replayed == size - snapshot_size  # not the whole log
    assert gate.state.size == shop.ledger.size and gate.state.root() == full_replay_root(shop)


def test_a_snapshot_of_another_genesis_or_a_damaged_one_is_not_used(
        shop: Pharmacy, caplog: pytest.LogCaptureFixture) -> None:
    shop.bridge.contracts.snapshot_every = 1
    busy(shop)
    shop.bridge.maybe_checkpoint()
    other = Genesis(shop.genesis.operators, {"insurer:x": 1}, shop.genesis.contracts)
    assert shop.ledger.contract_snapshot(genesis_hash(other)) is None
    shop.ledger.save_contract_snapshot(shop.ledger.size, genesis_hash(shop.genesis), b"\xa1\x61v\x09")
    with caplog.at_level(logging.WARNING, logger="carechain.bridge"):
        gate = ContractGate(shop.genesis, shop.operator)
        gate.catch_up(shop.ledger)
    assert gate.replayed == shop.ledger.size and "replaying from the genesis" in caplog.text
    assert gate.state.root() == full_replay_root(shop)
    with pytest.raises(SnapshotError):
        Replica(shop.genesis).restore(b"\x00")


def test_only_the_newest_snapshots_are_kept(shop: Pharmacy) -> None:
    gate = shop.bridge.contracts
    gate.snapshot_every = 1
    for _ in range(4):
        busy(shop, activities=2)
        assert gate.save_snapshot(shop.ledger)
    sizes = [r[0] for r in shop.ledger._db.execute("SELECT tree_size FROM contract_snapshots ORDER BY tree_size")]
    assert len(sizes) == 2 and sizes[-1] == gate.replica.size  # where the last sale batch brought the gate


def test_a_checkpoint_snapshots_the_gate_where_the_batches_left_it_without_replaying(shop: Pharmacy) -> None:
    # The gate follows each committed batch (plain device events included), so the checkpoint that snapshots
    # it has nothing to replay on the sequencer thread.
    gate = shop.bridge.contracts
    gate.snapshot_every = 1
    busy(shop, activities=40)
    assert gate.replica.size == shop.ledger.size
    shop.bridge.maybe_checkpoint()
    assert gate.replica.size == shop.ledger.size
    assert shop.ledger.contract_snapshot(genesis_hash(shop.genesis))[0] == shop.ledger.size


def test_a_contract_command_starts_from_the_newest_snapshot_and_leaves_one_for_the_next(
        shop: Pharmacy, monkeypatch: pytest.MonkeyPatch) -> None:
    """`carechain access grant` and the other contract commands replay through replay_ledger: on a long log
    they must not replay it all every time, and what they get must equal a replay from leaf 0."""
    import chain_bridge.contract_admin as admin

    busy(shop)
    monkeypatch.setattr(admin, "SNAPSHOT_EVERY", 5)
    key = genesis_hash(shop.genesis)
    size = shop.ledger.size
    first = admin.replay_ledger(shop.ledger, shop.genesis)
    assert first.state.root() == full_replay_root(shop)
    assert shop.ledger.contract_snapshot(key) is not None and shop.ledger.contract_snapshot(key)[0] == size
    busy(shop, activities=3)
    second = admin.replay_ledger(shop.ledger, shop.genesis)  # from the snapshot: only the new leaves
    assert second.state.root() == full_replay_root(shop) and second.state.results == \
        replay_leaves(shop.genesis, shop.ledger.leaves()).state.results
