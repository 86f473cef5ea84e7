"""Repair over a real mosquitto with 11 storage miner processes: 8 hold a k=4, n=8 dataset, 3 are spares.

Kill 3 holders (gone longer than the grace period) → `StorageClient.repair` regenerates their shares from k
intact ones and places them on the spares → every segment has 8 live shares on 8 distinct live miners; then
kill 4 more of the original holders and `get` still returns the exact bytes. A holder that is offline within
the grace period triggers no repair. (11, not 10: after 3 of 8 holders die, 8 distinct live miners per
segment need 3 spares.) Time is passed as `now`/`last_seen`, never waited for."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carechain.cli import app
from carechain.storage.codec import StorageParams
from carechain.storage.keyfile import load_dataset_key
from carechain.storage.repair import GRACE, RepairPolicy
from chain_bridge.storage_client import StorageClient, key_path, load_manifest
from tests.test_storage_network import StorageMiner, running_fleet

pytestmark = pytest.mark.integration
PARAMS = StorageParams(segment_size=16 * 1024 - 16, k=4, n=8, chunk_size=256)
SEED = bytes(range(32))
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker) -> Iterator[list[StorageMiner]]:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    with running_fleet(tmp_path_factory.mktemp("storage-repair-fleet"), broker.config, [None] * 11) as miners:
        yield miners


def test_repair_restores_n_live_shares_and_grace_prevents_storms(fleet, broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    holders, spares = fleet[:8], fleet[8:]
    everyone = [m.id for m in fleet]
    data = os.urandom(5 * PARAMS.segment_size + 321)
    path = tmp_path / "d.manifest.json"
    policy = RepairPolicy()
    with StorageClient(broker.config, timeout=TIMEOUT_S) as client:
        m = client.put(data, [h.id for h in holders], SEED, path, params=PARAMS)
        key = load_dataset_key(key_path(path), m.dataset_id)
        before = path.read_bytes()

        # A holder briefly offline (within the grace period): suspect, not lost; no repair, manifest untouched.
        blinker = holders[0]
        blinker.kill()
        try:
            now = int(time.time())
            for seen in ({}, {blinker.id: now - 3600}):  # first noticed now, or away for an hour (< 24 h)
                same, tasks = client.repair(m, path, SEED, everyone, policy, last_seen=seen, now=now)
                assert (tasks, same) == ([], m)
            assert path.read_bytes() == before
            # The CLI too: it records the silent miner's first-noticed absence next to the manifest.
            r = CliRunner().invoke(app, ["store", "repair", str(path), "--json", "--miners", ",".join(everyone),
                                         "--seed", SEED.hex(), "--broker", broker.config.address,
                                         "--timeout", str(TIMEOUT_S)])
            assert r.exit_code == 0, r.output
            assert json.loads(r.output.strip().splitlines()[-1])["repaired"] == []
            seen_file = path.with_suffix(".seen.json")
            assert seen_file.stat().st_mode & 0o777 == 0o600
            assert json.loads(seen_file.read_text())[blinker.id] < time.time() - policy.offline_after
            assert not any(s.share_files() for s in spares)
        finally:
            blinker.start()
            blinker.wait_ready()
        assert [len(s.live) for s in client.status(m)] == [8] * len(m.segments)

        # 3 holders gone longer than the grace period: their shares are regenerated onto the 3 spares.
        victims = holders[1:4]
        for v in victims:
            v.kill()
        now = int(time.time())
        last_seen = {v.id: now - GRACE - 1 for v in victims}
        seen_progress: list[tuple[str, int, int]] = []
        client.progress = lambda phase, done, total: seen_progress.append((phase, done, total))
        repaired, tasks = client.repair(m, path, SEED, everyone, policy, last_seen=last_seen, now=now)
        client.progress = None
        assert len(tasks) == 3 * len(m.segments)
        assert {t.target for t in tasks} == {s.id for s in spares}
        assert load_manifest(path) == repaired and path.stat().st_mode & 0o777 == 0o600
        assert seen_progress[-1][0] == "repair" and seen_progress[-1][1] == seen_progress[-1][2]
        dead = {v.id for v in victims}
        alive = set(everyone) - dead
        for rec, old in zip(repaired.segments, m.segments, strict=True):
            assert len({sh.miner for sh in rec.shares}) == PARAMS.n and {sh.miner for sh in rec.shares} <= alive
            assert [sh.root for sh in rec.shares] == [sh.root for sh in old.shares]  # byte-identical shares
        assert all(len(s.live) == PARAMS.n for s in client.status(repaired))
        # Nothing more to do: a second repair is a no-op.
        assert client.repair(repaired, path, SEED, everyone, policy, last_seen=last_seen, now=now)[1] == []

        # 4 more of the original holders die: 1 original + 3 regenerated shares = k per segment, still readable.
        for h in holders[4:8]:
            h.kill()
        assert client.get(repaired, key) == data
        assert [len(s.live) for s in client.status(repaired)] == [PARAMS.k] * len(m.segments)
