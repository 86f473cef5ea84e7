"""The active miner set comes from the ledger: registered, bonded, not suspended, no failed audit this epoch."""

from __future__ import annotations

import pytest

from contract_rules import miners
from contract_rules.bonds import MIN_BOND
from tests.storage_world import StorageWorld, ident


@pytest.fixture
def w() -> StorageWorld:
    world = StorageWorld()
    world.bonded_miners()
    return world


def test_only_registered_bonded_miners_are_active() -> None:
    w = StorageWorld()
    assert miners.active_miners(w.state) == []
    a, b, c = w.miners[:3]
    assert [w.register("miner", a), w.register("miner", b), w.register("patient", c)] == ["ok"] * 3
    assert miners.active_miners(w.state) == []  # registered but not bonded
    assert w.bond(a) == "ok" and w.bond(b, MIN_BOND["miner"] - 1) == "ok"
    assert miners.active_miners(w.state) == [a.device_id]  # b's bond is below the minimum
    assert w.bond(b, 1) == "ok"
    assert miners.active_miners(w.state) == sorted([a.device_id, b.device_id])
    assert miners.miner_keys(w.state) == {m: w.by_id(m).public_key for m in sorted([a.device_id, b.device_id])}
    assert miners.registered_miners(w.state) == sorted([a.device_id, b.device_id])


def test_a_failed_audit_takes_a_miner_out_of_the_set_until_the_epoch_is_settled() -> None:
    w = StorageWorld()
    for m in w.miners:
        assert w.register("miner", m) == "ok" and w.bond(m, MIN_BOND["miner"] + 5_000) == "ok"
    _, commit = w.put()
    assert w.add(commit) == "ok"
    note = w.note()
    victim = w.by_id(w.state.table("storage_shares")["ds-1|0|1"]["miners"][0])  # holds share 0 of segment 0
    assert w.add(w.audit_entry(note, {victim.device_id: w.answers(victim, note, lose=True)})) == "ok"
    assert victim.device_id not in miners.active_miners(w.state)
    assert victim.device_id not in miners.miner_keys(w.state)
    assert miners.failed_this_epoch(w.state, victim.device_id)
    assert w.settle(0) == "ok"
    assert miners.current_epoch(w.state) == 1
    assert victim.device_id in miners.active_miners(w.state)  # the bond still covers the minimum


def test_a_note_is_final_with_a_majority_of_the_active_miners_only(w: StorageWorld) -> None:
    ids = miners.active_miners(w.state)
    assert len(ids) == 6 and miners.finality_threshold(6) == 4
    four = [w.by_id(m) for m in ids[:4]]
    final = miners.final_note(w.state, w.note(four))
    assert isinstance(final, miners.FinalNote) and final.cosigners == tuple(ids[:4])
    assert miners.verify_final_note(w.state, w.note(four[:3])) == "seed_checkpoint_not_final"
    # Cosignatures of keys that are not active miners do not count, however many there are.
    outsiders = [ident(90 + i) for i in range(10)]
    assert miners.verify_final_note(w.state, w.note(four[:3] + outsiders)) == "seed_checkpoint_not_final"
    assert miners.verify_final_note(w.state, w.note(four, log_key=w.stranger)) == \
        "seed_checkpoint_not_signed_by_the_bridge"
    assert miners.verify_final_note(w.state, w.note(four, size=w.state.size + 1)) == "seed_checkpoint_from_the_future"
    assert miners.verify_final_note(w.state, "not a note") == "bad_seed_checkpoint"


def test_a_miner_whose_bond_is_slashed_below_the_minimum_leaves_the_set(w: StorageWorld) -> None:
    _, commit = w.put()
    assert w.add(commit) == "ok"
    note = w.note()
    holder = w.by_id(w.state.table("storage_shares")["ds-1|0|1"]["miners"][0])
    assert w.add(w.audit_entry(note, {holder.device_id: None})) == "ok"  # the operator: no answer
    assert w.state.table("bonds")[holder.device_id]["suspended_at"] is not None
    assert w.settle(0) == "ok"
    assert holder.device_id not in miners.active_miners(w.state)  # suspended: the next epoch does not restore it


def test_finality_threshold_is_a_strict_majority() -> None:
    assert [miners.finality_threshold(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
