"""The bridge's archive of sealed readings: per (owner, epoch) to the storage miners, committed, then pruned.

The planning core is tested with plain values. The rest runs on a real ledger built from the access
contract's test world (real sealed readings, epoch keys, a final grant), real storage server processes on a
private mosquitto (five honest, three that store every share with its bytes flipped), registered and bonded
on that ledger as miners so that the storage v2 rules place the shares on them, a final checkpoint cosigned
by them, and the real record server answering the grant's requester after the bridge pruned its own copy.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_contracts_access import AccessWorld

from carechain import envelope, topics
from carechain.access import sign_records_request
from carechain.config import ArchiveConfig, Config, ConfigError
from carechain.entries import Entry
from carechain.identity import Identity
from carechain.sealed import ciphertext_hash
from carechain.storage.codec import StorageParams
from chain_bridge.archiver import (
    ArchiveError,
    ArchiveFetcher,
    ArchivePolicy,
    Archiver,
    ArchiveRow,
    EpochStock,
    anchored_ct_hash,
    check_bundle,
    decode_bundle,
    due_epochs,
    encode_bundle,
    prunable,
    split_members,
)
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.store import Appended, ArchiveConflict, EventCandidate, Ledger, LedgerError
from chain_bridge.record_server import RecordServer, Refusal
from chain_bridge.storage_client import StorageClient, key_path
from contract_rules import bonds, replay_leaves
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from contract_rules.miners import active_miners
from simulators.miners import clear_retained
from tests.test_record_server import E0, HOUR, NOW, T0, Deployment, build, check_pages, fetch_all, seal, server
from tests.test_storage_network import StorageMiner

if TYPE_CHECKING:
    from tests.conftest import TestBroker

POLICY = ArchivePolicy(grace_ms=30 * 60_000, retention_ms=0, max_archives_per_pass=3, max_bundle_bytes=1000)
PARAMS = StorageParams(segment_size=16 * 1024 - 16, k=4, n=8, chunk_size=256)


# -- the core --------------------------------------------------------------------------------------------

def test_a_bundle_is_deterministic_and_decodes_strictly() -> None:
    items = [(7, b"\x01" * 40), (3, b"\x02" * 30), (12, b"\x03")]
    raw = encode_bundle(items)
    assert raw == encode_bundle(reversed(items))  # the same ciphertexts: the same bytes, in leaf order
    assert decode_bundle(raw, 3) == sorted(items)
    with pytest.raises(ArchiveError, match="at most 2"):
        decode_bundle(raw, 2)
    with pytest.raises(ValueError):
        encode_bundle([(1, b"a"), (1, b"b")])
    from carechain import cbor
    for bad in ([[3, b"a"], [3, b"b"]], [[3, "text"]], [[3]], [[-1, b""]], {"3": b"a"}):
        with pytest.raises(ArchiveError):
            decode_bundle(cbor.encode(bad), 10)
    with pytest.raises(ArchiveError, match="not CBOR"):
        decode_bundle(b"\xff\x00", 10)


def test_only_ciphertexts_hashing_to_their_anchor_pass() -> None:
    good, tampered = b"sealed reading", b"sealed readinG"
    anchored = {1: ciphertext_hash(good), 2: ciphertext_hash(good), 3: None}
    ok, bad = check_bundle([(1, good), (2, tampered), (3, good), (4, good)], anchored)
    assert ok == {1: good} and bad == [2, 3, 4]


def test_epochs_are_due_after_their_end_plus_grace_oldest_first_and_bounded() -> None:
    stock = [EpochStock("p", 5, 6 * HOUR, 3), EpochStock("p", 4, 5 * HOUR, 1), EpochStock("q", 4, 5 * HOUR, 2),
             EpochStock("q", 6, 7 * HOUR, 9), EpochStock("r", 1, None, 4)]  # r: no epoch key known
    assert due_epochs(stock, 6 * HOUR + 29 * 60_000, POLICY) == [stock[1], stock[2]]
    assert due_epochs(stock, 100 * HOUR, POLICY) == [stock[1], stock[2], stock[0]]  # three per pass


def test_a_large_epoch_is_cut_into_bundles_under_the_limit() -> None:
    members = [(i, "dev", 1, 300) for i in range(10, 0, -1)]
    parts = split_members(members, 1000)
    assert [m for p in parts for m in p] == sorted(members)
    assert all(sum(m[3] + 16 for m in p) + 16 <= 1000 for p in parts) and len(parts) == 4
    assert split_members([(1, "d", 1, 5000)], 1000) == [[(1, "d", 1, 5000)]]  # one too large still goes alone


def test_only_committed_final_archives_past_retention_are_pruned() -> None:
    def row(id_: int, commit: int | None, stored: int | None = 0, pruned: int | None = None) -> ArchiveRow:
        return ArchiveRow(id_, "p", 1, f"ds{id_}", 1, 10, "{}" if stored is not None else None, stored, commit,
                          pruned)

    rows = [row(1, 10), row(2, None), row(3, 50), row(4, 10, pruned=5), row(5, 10, stored=None), row(6, 11, 1000)]
    policy = ArchivePolicy(0, 500, 10, 1000)
    assert [r.id for r in prunable(rows, 20, 600, policy)] == [1]  # 6 was stored too recently, 3 is not final
    assert [r.id for r in prunable(rows, 100, 1500, policy)] == [1, 3, 6]


def test_the_archive_section_is_off_by_default_and_checked() -> None:
    assert Config().bridge.archive.enabled is False
    with pytest.raises(ValueError, match="less than n"):
        ArchiveConfig(k=8, n=8)
    with pytest.raises(ValueError):
        ArchiveConfig(miners=["not a miner id"])
    with pytest.raises(ValueError, match="need at least as many"):
        ArchiveConfig(miners=["a" * 16, "b" * 16], k=1, n=3)


# -- the ledger side ---------------------------------------------------------------------------------------

@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = build(tmp_path / "ledger.db")
    yield d
    d.ledger.close()


def members_of(ledger: Ledger) -> list[tuple[int, str, int, int]]:
    db = sqlite3.connect(ledger.path)
    try:
        return [tuple(r) for r in db.execute("SELECT idx, dev, epoch, length(ct) FROM ciphertexts ORDER BY idx")]
    finally:
        db.close()


def stored_count(ledger: Ledger) -> int:
    db = sqlite3.connect(ledger.path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM ciphertexts").fetchone()[0])
    finally:
        db.close()


def test_nothing_uncommitted_is_pruned_and_a_taken_dataset_id_is_never_committed(deployment: Deployment) -> None:
    ledger, w = deployment.ledger, deployment.world
    members = members_of(ledger)[:2]
    archive = ledger.plan_archive(w.patient.device_id, members[0][2], "ct-test-1", members, 1)
    with pytest.raises(LedgerError, match="already archived"):
        ledger.plan_archive(w.patient.device_id, members[0][2], "ct-test-2", members[1:], 1)
    with pytest.raises(LedgerError, match="not stored and committed"):
        ledger.prune_archive(archive, 2)
    assert stored_count(ledger) == len(deployment.cts)
    # Someone else commits the id first (a storage miner saw it at upload): the bridge's commit is refused.
    stranger = Identity.generate()
    squat = ce.StorageCommit(pk=stranger.public_key, dataset_id="ct-test-1", revision=1, k=1, n=2, length=0,
                             segments=[], ts=1)
    ledger.append_entries([ce.signed(stranger, ce.STORAGE_COMMIT, squat)])
    ours = ce.signed(w.operator, ce.STORAGE_COMMIT, squat.model_copy(update={"pk": w.operator.public_key}))
    size = ledger.size
    with pytest.raises(ArchiveConflict):
        ledger.commit_archive(archive, ours)
    assert ledger.size == size
    ledger.drop_archive(archive)  # its ciphertexts are unarchived again, and still stored
    assert ledger.plan_archive(w.patient.device_id, members[0][2], "ct-test-3", members, 1) > 0
    assert stored_count(ledger) == len(deployment.cts)


# -- with real storage miners ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def storage_fleet(tmp_path_factory: pytest.TempPathFactory, broker: TestBroker) -> Iterator[list[StorageMiner]]:
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    root = tmp_path_factory.mktemp("archive-fleet")
    # The access world's five miners run the honest servers (the world registers and bonds them); three more
    # keys run servers that corrupt what they store.
    keys = [*AccessWorld().miners, *(Identity.generate() for _ in range(3))]
    miners = [StorageMiner(root / f"miner{i}", broker.config, "corrupt" if i >= 5 else None, key=keys[i])
              for i in range(8)]
    try:
        for m in miners:
            m.start()
        for m in miners:
            assert m.wait_ready()["miner"] == m.id
        yield miners
    finally:
        for m in miners:
            m.stop()
        clear_retained(broker.config, "clear-archive-fleet", [topics.store_hello(m.id) for m in miners])


def add(d: Deployment, entry: Entry) -> None:
    """Append a contract entry to the deployment's ledger and its world, which must both accept it."""
    assert d.world.add(entry) == "ok"
    assert d.ledger.append_entries([entry]) == [len(d.world.entries) - 1]


def bond_miners(d: Deployment, keys: list[Identity]) -> None:
    """Register `keys` as miners and bond each (the tokens come from the world's insurer): active miners.
    Keys the world registered and bonded already are left as they are."""
    w = d.world
    if w.insurer.device_id not in w.state.table("parties"):
        add(d, ce.party_registration_entry(w.operator, ce.PartyRegistration(role="insurer", pk=w.insurer.public_key,
                                                                            name="insurer", ts=0)))
    for key in keys:
        if bonds.is_admitted(w.state, key.device_id):
            continue
        w._nonce += 1
        if key.device_id not in w.state.table("parties"):
            add(d, ce.party_registration_entry(w.operator, ce.PartyRegistration(role="miner", pk=key.public_key,
                                                                                name="storage", ts=0)))
        add(d, ce.signed(w.insurer, ce.TOKEN_TRANSFER, ce.TokenTransfer(to=f"miner:{key.device_id}",
                                                                       amount=MIN_BOND["miner"], nonce=w._nonce)))
        add(d, ce.signed(key, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["miner"], nonce=w._nonce, ts=0)))


def publish_final(broker: TestBroker, note: str) -> None:
    from carechain.transport import connect_client

    ready = threading.Event()
    client = connect_client(broker.config, "archive-test-final", connected=ready)
    assert ready.wait(10)
    client.publish(topics.FINAL_CHECKPOINT, note.encode(), qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def final_note(deployment: Deployment, storage_fleet: list[StorageMiner], broker: TestBroker) -> Iterator[None]:
    """The fleet registered and bonded on the ledger, and a checkpoint they cosigned, final, on the broker:
    its seed places the shares on them."""
    bond_miners(deployment, [m.key for m in storage_fleet])
    assert active_miners(deployment.world.state) == sorted(m.id for m in storage_fleet)
    publish_final(broker, deployment.world.final_checkpoint(cosigners=[m.key for m in storage_fleet]))
    yield
    clear_retained(broker.config, "archive-test-final-clear", [topics.FINAL_CHECKPOINT])


def records_server(d: Deployment, archive: ArchiveFetcher) -> RecordServer:
    """The record server of `d`'s bridge, everything final, fetching pruned ciphertexts through `archive`."""
    return RecordServer(d.ledger.path, d.world.genesis, lambda: d.ledger.size, d.world.operator, clock_ms=lambda: NOW,
                        archive=archive)


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make_archiver(d: Deployment, broker: TestBroker, fleet: list[StorageMiner], data_dir: Path, clock: Clock,
                  final: list[int]) -> Archiver:
    cfg = ArchiveConfig(enabled=True, grace_s=1800, retention_s=0, k=PARAMS.k, n=PARAMS.n,
                        segment_size=PARAMS.segment_size, chunk_size=PARAMS.chunk_size, timeout_s=3.0)
    return Archiver(d.ledger, threading.Lock(), ContractGate(d.world.genesis, d.world.operator), lambda: final[0],
                    cfg, broker.config, data_dir, clock_ms=clock)


@pytest.mark.integration
def test_archive_prune_and_serve_every_reading_of_a_final_grant(
        deployment: Deployment, storage_fleet: list[StorageMiner], final_note: None, broker: TestBroker,
        tmp_path: Path) -> None:
    d, w = deployment, deployment.world
    clock, final = Clock(T0 + 3 * HOUR), [-1]  # epochs E0-1 .. E0+1 are over (+30 min grace); E0+2 and E0+3 not
    archiver = make_archiver(d, broker, storage_fleet, tmp_path / "bridge", clock, final)
    try:
        report = archiver.run_pass()
        assert (report.planned, report.uploaded, report.committed, report.pruned) == (3, 3, 3, 0)
        assert stored_count(d.ledger) == len(d.cts)  # committed, but not under a final checkpoint: all kept
        clock.now = T0 + 10 * HOUR
        report = archiver.run_pass()
        assert (report.planned, report.committed, report.pruned) == (2, 2, 0)
        final[0] = d.ledger.size  # every commit is now final: the bridge drops its copy
        report = archiver.run_pass()
        assert report.pruned_archives == 5 and report.pruned == len(d.cts) and stored_count(d.ledger) == 0

        # The ledger holds each archive's manifest, committed by the bridge's operator key and accepted.
        datasets = replay_leaves(w.genesis, d.ledger.leaves()).state.table("datasets")
        db = sqlite3.connect(d.ledger.path)
        rows = db.execute("SELECT dataset_id, owner, epoch, readings FROM archives ORDER BY epoch").fetchall()
        db.close()
        assert [(o, e) for _, o, e, _ in rows] == [(w.patient.device_id, E0 + i) for i in range(-1, 4)]
        assert sum(n for *_, n in rows) == len(d.cts)
        assert all(datasets[ds]["owner"] == w.operator.device_id for ds, *_ in rows)
        assert (tmp_path / "bridge" / "archive").stat().st_mode & 0o777 == 0o700
        assert all(key_path(tmp_path / "bridge" / "archive" / f"{ds}.manifest.json").stat().st_mode & 0o777 == 0o600
                   for ds, *_ in rows)

        # The record server fetches the pruned ciphertexts back and serves every reading of the grant, each
        # one checked by the requester against its anchored hash and opened.
        rs = records_server(d, archiver.fetcher)
        check_pages(d, fetch_all(rs, w.doctor, d.grant))
        assert archiver.fetcher.stats["mismatch"] == 0
        # Three of the eight miners store flipped bytes: their shares were refused, never decoded into a reading.
        corrupt = {m.id for m in storage_fleet[5:]}
        retrievals = archiver.storage().retrievals
        assert any(m in corrupt and not ok for m, ok in retrievals)
        assert not any(m in corrupt and ok for m, ok in retrievals)
        rs.stop()
    finally:
        archiver.stop()


@pytest.mark.integration
def test_a_late_reading_waits_for_its_own_archive_and_a_wrong_archive_is_never_served(
        deployment: Deployment, storage_fleet: list[StorageMiner], final_note: None, broker: TestBroker,
        tmp_path: Path) -> None:
    d, w = deployment, deployment.world
    clock, final = Clock(T0 + 10 * HOUR), [-1]
    archiver = make_archiver(d, broker, storage_fleet, tmp_path / "bridge", clock, final)
    try:
        archiver.run_pass()
        final[0] = d.ledger.size
        assert archiver.run_pass().pruned == len(d.cts)
        # A reading of epoch E0 arrives late, after that epoch was archived and pruned.
        seq = w._seq[w.band.device_id]
        w._seq[w.band.device_id] += 1
        entry, ct = seal(w, seq, E0 * HOUR + 45 * 60_000, "heart_rate", {"bpm": 77})
        p = envelope.parse(entry.cose).payload
        [appended] = d.ledger.append_events([EventCandidate(p["dev"], seq, entry.encode(), b"", "heart_rate",
                                                            version=2, ct=ct, epoch=E0)])
        assert isinstance(appended, Appended)
        report = archiver.run_pass()  # archived and committed in an archive of its own; its commit is not final
        assert (report.planned, report.committed, report.pruned) == (1, 1, 0)
        assert d.ledger.ciphertext(appended.index) == ct
        final[0] = d.ledger.size
        assert archiver.run_pass().pruned == 1 and d.ledger.ciphertext(appended.index) is None
        assert archiver.fetcher.ciphertext(appended.index) == ct

        # An archive that decodes but holds another ciphertext (as a leaked dataset key would allow) is caught by
        # the anchored hash: the page is refused and the mismatch logged, never served.
        db = sqlite3.connect(d.ledger.path)
        (dataset_id,) = db.execute("SELECT dataset_id FROM archives WHERE epoch=? ORDER BY id LIMIT 1",
                                   (E0,)).fetchone()
        (archive,) = db.execute("SELECT id FROM archives WHERE dataset_id=?", (dataset_id,)).fetchone()
        idxs = [i for (i,) in db.execute("SELECT idx FROM archived WHERE archive=? ORDER BY idx", (archive,))]
        items = [(i, d.cts[i]) for i in idxs]
        items[0] = (items[0][0], items[0][1][:-1] + bytes([items[0][1][-1] ^ 1]))
        with StorageClient(broker.config, timeout=3.0) as client:
            forged = client.put(encode_bundle(items), [m.id for m in storage_fleet], bytes(32),
                                tmp_path / "bridge" / "archive" / f"{dataset_id}.manifest.json",
                                dataset_id=dataset_id, params=PARAMS)
        db.execute("UPDATE archives SET manifest=? WHERE id=?", (forged.model_dump_json(), archive))
        db.commit()
        db.close()
        fetcher = ArchiveFetcher(d.ledger.path, tmp_path / "bridge" / "archive", archiver.storage)
        with pytest.raises(ArchiveError) as caught:
            fetcher.ciphertext(idxs[0])
        assert caught.value.reason == "ciphertext_mismatch" and fetcher.stats["mismatch"] == 1
        assert fetcher.ciphertext(idxs[1]) == d.cts[idxs[1]]  # the others in it still hash to their anchors
        rs = records_server(d, fetcher)
        assert idxs[0] in d.in_scope  # E0's first heart rate: the grant covers it
        refusal = rs.handle(sign_records_request(w.doctor, d.grant, 0))
        assert isinstance(refusal, Refusal) and refusal.reason == "ciphertext_mismatch"
        assert rs.stats["ciphertext_mismatch"] == 1 and rs.stats["answered"] == 0
        rs.stop()
        fetcher.close()
    finally:
        archiver.stop()


def test_a_pruned_ciphertext_is_refused_not_skipped_when_no_archive_is_configured(deployment: Deployment) -> None:
    d = deployment
    target = d.in_scope[0]
    [member] = [m for m in members_of(d.ledger) if m[0] == target]
    d.ledger.plan_archive(d.world.patient.device_id, member[2], "ct-test-1", [member], 1)
    db = sqlite3.connect(d.ledger.path)
    db.execute("DELETE FROM ciphertexts WHERE idx=?", (target,))  # pruned by a bridge that archived it ...
    db.commit()
    db.close()
    rs = server(d)  # ... now running without bridge.archive: it must not serve the page without that reading
    refusal = rs.handle(sign_records_request(d.world.doctor, d.grant, 0))
    assert isinstance(refusal, Refusal) and refusal.reason == "ciphertext_missing"
    rs.stop()


def test_archiving_needs_the_contracts(tmp_path: Path) -> None:
    from carechain.config import BridgeConfig, BrokerConfig
    from chain_bridge.bridge import Bridge

    cfg = BridgeConfig(data_dir=tmp_path, archive=ArchiveConfig(enabled=True))
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        with pytest.raises(ConfigError, match="storage contract"):
            Bridge(cfg, BrokerConfig(), Identity.generate(), ledger)
    finally:
        ledger.close()


def test_anchored_hash_is_read_from_the_signed_event(deployment: Deployment) -> None:
    d = deployment
    for index, ct in d.cts.items():
        assert anchored_ct_hash(d.ledger.entry(index)) == ciphertext_hash(ct)
    assert anchored_ct_hash(b"junk") is None


@pytest.mark.integration
def test_a_bridge_with_archiving_on_archives_then_prunes_once_its_commits_are_final(
        deployment: Deployment, storage_fleet: list[StorageMiner], final_note: None, broker: TestBroker,
        tmp_path: Path) -> None:
    import time

    from carechain.config import BridgeConfig
    from chain_bridge.bridge import Bridge
    from chain_bridge.contract_gate import ContractGate

    d, w = deployment, deployment.world
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", archive=ArchiveConfig(
        enabled=True, grace_s=0, retention_s=0, k=PARAMS.k, n=PARAMS.n,
        segment_size=PARAMS.segment_size, chunk_size=PARAMS.chunk_size, timeout_s=3.0, interval_s=0.2))
    bridge = Bridge(cfg, broker.config, Identity.generate(), d.ledger, client_id="archive-test-bridge",
                    contracts=ContractGate(w.genesis, w.operator))
    assert bridge.archiver is not None and bridge.records is not None
    assert bridge.records._archive is bridge.archiver.fetcher  # pruned ciphertexts are fetched back through it

    def wait(what: str, cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {bridge.stats.as_dict()}"
            time.sleep(0.1)

    bridge.start()
    try:
        wait("5 archives committed", lambda: bridge.stats.archive["committed"] == 5)
        time.sleep(0.5)  # more passes: with no final checkpoint, nothing is pruned
        assert stored_count(d.ledger) == len(d.cts) and bridge.stats.archive["pruned"] == 0
        with bridge._finality_lock:  # as if the miners had cosigned a checkpoint covering every commit
            bridge._last_final_size = d.ledger.size
        wait("every ciphertext pruned", lambda: stored_count(d.ledger) == 0)
        assert bridge.stats.as_dict()["archive"] == {**bridge.archiver.stats, "pruned": len(d.cts)}
        rs = records_server(d, bridge.archiver.fetcher)  # at NOW: the test world's grant has expired by the clock
        check_pages(d, fetch_all(rs, w.doctor, d.grant))
        rs.stop()
    finally:
        bridge.stop()
        clear_retained(broker.config, "archive-test-bridge-clear", [topics.CHECKPOINT])


@pytest.mark.integration
def test_a_failed_upload_keeps_everything_and_the_next_pass_resumes_the_same_archive(
        deployment: Deployment, storage_fleet: list[StorageMiner], final_note: None, broker: TestBroker,
        tmp_path: Path) -> None:
    import time

    from chain_bridge.storage_client import TransferError

    d, w = deployment, deployment.world
    # Eight more bonded miners that run no storage server: placement puts shares on them, nobody answers.
    ghosts = [Identity.generate() for _ in range(PARAMS.n)]
    bond_miners(d, ghosts)
    publish_final(broker, w.final_checkpoint(cosigners=[m.key for m in storage_fleet] + ghosts))
    clock, final = Clock(T0 + 10 * HOUR), [10**9]
    cfg = ArchiveConfig(enabled=True, grace_s=0, retention_s=0, k=PARAMS.k, n=PARAMS.n,
                        segment_size=PARAMS.segment_size, chunk_size=PARAMS.chunk_size, timeout_s=0.3,
                        max_archives_per_pass=2)
    failing = Archiver(d.ledger, threading.Lock(), ContractGate(w.genesis, w.operator), lambda: final[0], cfg,
                       broker.config, tmp_path / "bridge", clock_ms=clock)
    try:
        with pytest.raises(TransferError, match="not stored"):
            failing.run_pass()
        assert failing.stats["planned"] == 2 and failing.stats["committed"] == 0
        failing.start()  # the thread retries with backoff, and plans nothing more while two wait
        deadline = time.monotonic() + 30
        while failing.stats["failed_passes"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        failing.stop()
    assert failing.stats["planned"] == 2 and failing._backoff.failures >= 2
    assert stored_count(d.ledger) == len(d.cts)  # nothing archived: nothing pruned
    # The ghosts start unbonding: no longer active, so the same planned archives now go to the fleet alone.
    add(d, ce.clock_attest_entry(w.operator, clock.now))  # unbonding runs on attested time
    for ghost in ghosts:
        w._nonce += 1
        add(d, ce.signed(ghost, ce.BOND_UNBOND, ce.BondUnbond(amount=MIN_BOND["miner"], nonce=w._nonce, ts=0)))
    assert active_miners(w.state) == sorted(m.id for m in storage_fleet)
    archiver = make_archiver(d, broker, storage_fleet, tmp_path / "bridge", clock, final)
    try:
        report = archiver.run_pass()  # the two planned archives first (fresh keys), then the rest
        assert (report.planned, report.uploaded, report.committed) == (3, 5, 5)
        assert report.pruned == len(d.cts) and stored_count(d.ledger) == 0
    finally:
        archiver.stop()


@pytest.mark.integration
def test_an_upload_whose_commit_the_rules_now_refuse_is_never_appended_and_is_planned_again(
        deployment: Deployment, storage_fleet: list[StorageMiner], final_note: None, broker: TestBroker,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, w = deployment, deployment.world
    clock, final = Clock(T0 + 10 * HOUR), [-1]
    archiver = make_archiver(d, broker, storage_fleet, tmp_path / "bridge", clock, final)
    try:
        # The bridge stops between an upload and its commit ...
        monkeypatch.setattr(d.ledger, "commit_archive", lambda *_: (_ for _ in ()).throw(OSError("power cut")))
        with pytest.raises(OSError):
            archiver.run_pass()
        monkeypatch.undo()
        assert archiver.stats["uploaded"] == 1 and archiver.stats["committed"] == 0
        db = sqlite3.connect(d.ledger.path)
        (stale,) = db.execute("SELECT dataset_id FROM archives WHERE manifest IS NOT NULL").fetchone()
        db.close()
        # ... and meanwhile the storage epoch is settled: the seed checkpoint of that upload is from an old epoch.
        add(d, ce.storage_settle_entry(w.operator, ce.StorageSettle(epoch=0, pool=0)))
        publish_final(broker, w.final_checkpoint(cosigners=[m.key for m in storage_fleet]))
        size = d.ledger.size
        report = archiver.run_pass()
        assert archiver.stats["refused"] == 1 and report.committed == 4  # the four others, on the new seed
        replayed = replay_leaves(w.genesis, d.ledger.leaves()).state
        assert stale not in replayed.table("datasets")
        assert [r for i, r in replayed.results if i >= size] == ["ok"] * 4  # only commits the rules accept
        report = archiver.run_pass()  # the refused one's ciphertexts, planned again under a new id
        assert (report.planned, report.committed, archiver.stats["committed"]) == (1, 1, 5)
        final[0] = d.ledger.size
        archiver.run_pass()
        assert stored_count(d.ledger) == 0 and archiver.stats["committed"] == 5
        rs = records_server(d, archiver.fetcher)
        check_pages(d, fetch_all(rs, w.doctor, d.grant))
        rs.stop()
    finally:
        archiver.stop()
