"""Storage v2 end to end: real storage miner processes on a private mosquitto, registered and bonded on a real
contract runtime; the client places on the ledger's active miners by a final checkpoint's seed, the miners'
store receipts go into the `storage.commit` v2 the rules accept, and the client's `storage.audit` v2 entry is
one the rules accept too (no null answer unless the operator files it, no miner audited twice in an epoch)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from carechain import envelope
from carechain.storage.codec import StorageParams
from chain_bridge.storage_client import StorageClient, load_receipts, receipts_path
from contract_rules import miners, storage_v2
from contract_rules import transactions as ce
from tests.storage_world import T0, StorageWorld
from tests.test_storage_network import StorageMiner, running_fleet

pytestmark = pytest.mark.integration
PARAMS = StorageParams(segment_size=4 * 1024 - 16, k=2, n=5, chunk_size=256)
TIMEOUT_S = 2.0


@pytest.fixture
def world(tmp_path: Path, broker) -> Iterator[tuple[StorageWorld, list[StorageMiner]]]:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    w = StorageWorld(n_miners=5)
    w.bonded_miners()
    # Four honest miners and one that acknowledges each share, then deletes it.
    with running_fleet(tmp_path / "fleet", broker.config, [None] * 4 + ["delete"], keys=w.miners) as fleet:
        yield w, fleet


def test_a_put_commits_with_its_receipts_and_the_audit_entry_is_accepted(world, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    w, fleet = world
    note = w.note()
    path = tmp_path / "d.manifest.json"
    with StorageClient(broker.config, timeout=TIMEOUT_S, identity=w.requester, ledger=lambda: w.state) as client:
        manifest = client.put(os.urandom(3 * PARAMS.segment_size), miners.active_miners(w.state), w.seed(note), path,
                              owner=w.owner.device_id, params=PARAMS)
        receipts = load_receipts(receipts_path(path))
        assert receipts_path(path).stat().st_mode & 0o777 == 0o600
        assert len(receipts) == len(manifest.segments) * PARAMS.n  # every share acknowledged by its miner
        # Without the receipts the rules refuse the commit; with them they accept it.
        bare = storage_v2.commit_for(manifest, w.owner.public_key, note, {}, ts=T0)
        assert w.runtime.check(ce.signed(w.owner, ce.STORAGE_COMMIT, bare)) == "share_not_acknowledged_by_its_miner"
        commit = storage_v2.commit_for(manifest, w.owner.public_key, note, receipts, ts=T0)
        assert w.add(ce.signed(w.owner, ce.STORAGE_COMMIT, commit)) == "ok"

        silent = fleet[0]
        silent.kill()
        audit_note = w.note()  # covers the commit: its shares are challenged
        entry, verdicts = client.audit_entry(w.state, audit_note, epoch=0)
        assert entry is not None
        answers = envelope.parse(entry.cose).payload["answers"]
        deleter = fleet[4].id
        # The silent miner sent nothing: a registered party's entry leaves it out (only the operator may
        # report silence); the deleting miner signed answers without its chunks and fails.
        assert not verdicts[silent.id].passed and silent.id not in answers
        assert sorted(answers) == sorted(m.id for m in fleet[1:])
        assert w.add(entry) == "ok"
        assert miners.count(w.state, 0, "audit_failed", deleter) == 1
        assert all(miners.count(w.state, 0, "audit_passed", m.id) == 1 for m in fleet[1:4])

        # Audited miners are not audited again in the epoch; the silent one is still due.
        again, verdicts = client.audit_entry(w.state, audit_note, epoch=0)
        assert again is None and list(verdicts) == [silent.id]
    with StorageClient(broker.config, timeout=TIMEOUT_S, identity=w.operator) as operator:
        filed, _ = operator.audit_entry(w.state, audit_note, epoch=0)
    assert filed is not None
    assert envelope.parse(filed.cose).payload["answers"] == {silent.id: None}
    assert w.add(filed) == "ok" and miners.count(w.state, 0, "audit_failed", silent.id) == 1
