"""Storage repair: threshold, grace period, safety valve, deterministic re-placement (issue 7)."""

from __future__ import annotations

import os

from carechain.storage.codec import DatasetKey, StorageParams, decode_segment, regenerate_shares
from carechain.storage.manifest import plan_put
from carechain.storage.repair import GRACE, OFFLINE_AFTER, apply_repairs, plan_repairs

KEY = DatasetKey("ds", bytes(32))
PARAMS = StorageParams(segment_size=1000, k=4, n=8, chunk_size=64)  # threshold k + 2 = 6
MINERS = [f"m{i:02d}" for i in range(14)]
NOW = 1_000_000
SEED = bytes([9]) * 32


def setup(data=None):
    plan = plan_put(KEY, "owner", data or os.urandom(1000), MINERS, bytes(32), PARAMS)
    return plan, plan.manifest, plan.manifest.segments[0]


def seen(offline: dict[str, int]):
    return {m: NOW - offline.get(m, 0) for m in MINERS}


def test_briefly_offline_miners_cause_no_repair():
    _, m, seg = setup()
    holders = [s.miner for s in seg.shares]
    away = dict.fromkeys(holders[:3], OFFLINE_AFTER + 60)  # 3 down: 5 online, 3 suspect
    assert plan_repairs(m, seen(away), NOW, SEED) == []


def test_miners_gone_past_the_grace_period_are_repaired_elsewhere():
    _, m, seg = setup()
    holders = [s.miner for s in seg.shares]
    away = dict.fromkeys(holders[:3], GRACE + 1)  # 3 lost: 5 < 6
    tasks = plan_repairs(m, seen(away), NOW, SEED)
    assert [t.share for t in tasks] == [0, 1, 2]
    assert all(t.target not in holders for t in tasks) and len({t.target for t in tasks}) == 3
    assert all(len(t.sources) == 4 and not set(t.sources) & {0, 1, 2} for t in tasks)
    assert tasks == plan_repairs(m, seen(away), NOW, SEED)  # every node computes the same plan
    # Two lost: 6 remain, at threshold: no repair.
    assert plan_repairs(m, seen(dict.fromkeys(holders[:2], GRACE + 1)), NOW, SEED) == []


def test_safety_valve_repairs_suspects_when_one_more_loss_would_be_fatal():
    _, m, seg = setup()
    holders = [s.miner for s in seg.shares]
    away = dict.fromkeys(holders[:4], OFFLINE_AFTER + 60)  # 4 online = k: on the edge
    assert [t.share for t in plan_repairs(m, seen(away), NOW, SEED)] == [0, 1, 2, 3]


def test_failed_audits_count_as_lost_and_a_repaired_share_matches_its_root():
    plan, m, seg = setup(b"x" * 1000)
    tasks = plan_repairs(m, seen({}), NOW, SEED, failed={(0, 5), (0, 6), (0, 7)})
    assert [t.share for t in tasks] == [5, 6, 7]
    held = dict(enumerate(plan.upload[0].shares))
    new = regenerate_shares(seg.layout(), {i: held[i] for i in tasks[0].sources}, PARAMS, [t.share for t in tasks])
    repaired = apply_repairs(m, tasks)
    rseg = repaired.segments[0]
    assert {s.index: s.miner for s in rseg.shares if s.index in new} == {t.share: t.target for t in tasks}
    assert decode_segment(KEY, rseg.layout(), {i: new[i] for i in (5, 6, 7)} | {0: held[0]}, PARAMS) == b"x" * 1000


def test_unreadable_segments_are_not_planned():
    _, m, seg = setup()
    away = {s.miner: GRACE + 1 for s in seg.shares[:5]}  # 3 left < k
    assert plan_repairs(m, seen(away), NOW, SEED) == []


def test_repair_targets_drawn_from_the_active_miners_are_where_the_ledger_accepts_them():
    from carechain.storage.placement import place_shares
    from contract_rules import miners, storage_v2
    from contract_rules import transactions as ce
    from tests.storage_world import T0, StorageWorld

    w = StorageWorld(n_miners=6)
    w.bonded_miners()
    manifest, commit = w.put()
    assert w.add(commit) == "ok"
    note = w.note()
    seed = w.seed(note)
    active = miners.active_miners(w.state)
    seg = manifest.segments[0]
    holders = [s.miner for s in seg.shares]
    rules_target = place_shares(seed, manifest.dataset_id, 0, seg.version, active, 1, exclude=holders)[0]
    # The first holder is gone past the grace; the miner the rules pick has not been seen lately.
    last_seen = {m: NOW for m in active if m != rules_target} | {holders[0]: NOW - GRACE - 1}
    off_ledger = plan_repairs(manifest, last_seen, NOW, seed)
    on_ledger = plan_repairs(manifest, last_seen, NOW, seed, active=active)
    assert [(t.segment, t.share) for t in on_ledger] == [(t.segment, t.share) for t in off_ledger]
    for segment in {t.segment for t in on_ledger}:  # per segment, as the rules place a repair
        moved = [t for t in on_ledger if t.segment == segment]
        old = [s.miner for s in manifest.segments[segment].shares]
        assert tuple(t.target for t in moved) == place_shares(seed, manifest.dataset_id, segment, moved[0].version,
                                                              active, len(moved), exclude=old)
    assert on_ledger[0].segment == 0 and on_ledger[0].target == rules_target != off_ledger[0].target

    def repair_commit(tasks):
        repaired = apply_repairs(manifest, tasks)
        receipts = {}
        for t in tasks:
            share = manifest.segments[t.segment].shares[t.share]
            receipts[(t.segment, t.version, t.share)] = w.receipt(t.target, manifest.dataset_id, t.segment, t.version,
                                                                  t.share, share.root, share.length)
        payload = storage_v2.commit_for(repaired.model_copy(update={"revision": manifest.revision + 1}),
                                        w.owner.public_key, note, receipts, ts=T0)
        return ce.signed(w.owner, ce.STORAGE_COMMIT, payload)

    assert w.runtime.check(repair_commit(off_ledger)) == "repair_not_at_placement"
    assert w.add(repair_commit(on_ledger)) == "ok"
    assert w.state.table("storage_shares")[f"{manifest.dataset_id}|0|{seg.version}"]["miners"][0] == rules_target
