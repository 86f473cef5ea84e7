"""Storage manifest: put, versioned updates that re-encode only changed segments, reclamation (issue 7)."""

from __future__ import annotations

import os

import pytest

from carechain.storage.codec import DatasetKey, StorageError, StorageParams
from carechain.storage.manifest import Manifest, decode_dataset, plan_put, plan_update

KEY = DatasetKey("ds-1", bytes(32))
PARAMS = StorageParams(segment_size=1000, k=3, n=5, chunk_size=100)
MINERS = [f"miner-{i}" for i in range(8)]
SEED1, SEED2 = bytes([1]) * 32, bytes([2]) * 32


def all_shares(plans):
    """What miners hold after uploading every plan: shares[segment][share] of the latest version."""
    held: dict[tuple[int, int], dict[int, bytes]] = {}
    for plan in plans:
        for enc in plan.upload:
            held[(enc.index, enc.version)] = dict(enumerate(enc.shares))
    return held


def shares_for(manifest, held):
    return {s.index: held[(s.index, s.version)] for s in manifest.segments}


def test_put_records_every_share_and_decodes():
    data = os.urandom(3500)
    plan = plan_put(KEY, "owner-key-hex", data, MINERS, SEED1, PARAMS)
    m = plan.manifest
    assert (m.revision, m.length, len(m.segments)) == (1, 3500, 4)
    assert [s.plaintext_length for s in m.segments] == [1000, 1000, 1000, 500]
    assert all(len({sh.miner for sh in s.shares}) == 5 for s in m.segments)
    assert decode_dataset(KEY, m, shares_for(m, all_shares([plan]))) == data
    assert Manifest.model_validate_json(m.model_dump_json()) == m


def test_updating_one_segment_reencodes_only_that_segment():
    data = bytearray(os.urandom(3500))
    put = plan_put(KEY, "owner", bytes(data), MINERS, SEED1, PARAMS)
    data[1500] ^= 0xFF  # inside segment 1
    upd = plan_update(put.manifest, KEY, bytes(data), MINERS, SEED2)
    assert [(e.index, e.version) for e in upd.upload] == [(1, 2)]
    m = upd.manifest
    assert m.revision == 2 and [s.version for s in m.segments] == [1, 2, 1, 1]
    assert [s.index for s in m.segments if s != put.manifest.segments[s.index]] == [1]
    assert [(r.index, r.version) for r in upd.reclaim] == [(1, 1)] and m.reclaimable == upd.reclaim
    assert decode_dataset(KEY, m, shares_for(m, all_shares([put, upd]))) == bytes(data)
    assert m.reclaimed().reclaimable == ()


def test_an_update_with_no_change_uploads_nothing():
    data = os.urandom(2500)
    put = plan_put(KEY, "owner", data, MINERS, SEED1, PARAMS)
    upd = plan_update(put.manifest, KEY, data, MINERS, SEED2)
    assert upd.upload == () and upd.reclaim == () and upd.manifest.segments == put.manifest.segments


def test_versions_never_repeat_across_successive_updates():
    data = bytearray(os.urandom(2000))
    plans = [plan_put(KEY, "owner", bytes(data), MINERS, SEED1, PARAMS)]
    for r in range(3):
        data[0] = r
        plans.append(plan_update(plans[-1].manifest, KEY, bytes(data), MINERS, SEED2))
    versions = [(e.index, e.version) for p in plans for e in p.upload]
    assert len(versions) == len(set(versions))
    assert [s.version for s in plans[-1].manifest.segments] == [4, 1]


def test_range_update_by_segment_map_and_growth_and_shrinking():
    data = os.urandom(2000)
    put = plan_put(KEY, "owner", data, MINERS, SEED1, PARAMS)
    assert put.manifest.segments_touching(990, 20) == [0, 1]
    new1 = os.urandom(1000)
    upd = plan_update(put.manifest, KEY, {1: new1, 2: b"tail"}, MINERS, SEED2)
    assert [e.index for e in upd.upload] == [1, 2] and upd.manifest.length == 2004
    held = all_shares([put, upd])
    assert decode_dataset(KEY, upd.manifest, shares_for(upd.manifest, held)) == data[:1000] + new1 + b"tail"
    shrink = plan_update(upd.manifest, KEY, data[:1000], MINERS, SEED2)
    assert shrink.upload == () and [r.index for r in shrink.reclaim] == [1, 2] and shrink.manifest.length == 1000
    with pytest.raises(StorageError, match="segment 0 would be 5 bytes"):
        plan_update(put.manifest, KEY, {0: b"short"}, MINERS, SEED2)
    with pytest.raises(StorageError, match=r"segments \[2\] are neither"):
        plan_update(put.manifest, KEY, {3: b"x"}, MINERS, SEED2)
    with pytest.raises(StorageError, match="key is for dataset"):
        plan_update(put.manifest, DatasetKey("other", bytes(32)), data, MINERS, SEED2)


def test_an_inconsistent_manifest_is_refused():
    m = plan_put(KEY, "owner", os.urandom(2500), MINERS, SEED1, PARAMS).manifest
    doc = m.model_dump()
    doc["segments"][1]["shares"][1]["miner"] = doc["segments"][1]["shares"][0]["miner"]
    with pytest.raises(ValueError, match="segment 1: two shares on one miner"):
        Manifest.model_validate(doc)
    doc = m.model_dump()
    doc["length"] += 1
    with pytest.raises(ValueError, match="do not add up"):
        Manifest.model_validate(doc)
