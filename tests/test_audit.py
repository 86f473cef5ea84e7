"""`carechain verify --full`: a real ledger verifies; each kind of tampering is named at its first index.

The ledger is written by the real code (`carechain register`'s `register_devices`, a `Bridge` fed through
`process`, checkpoints at irregular sizes, a revocation); tampering is done the way an attacker with file
access would, with SQL on the file.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carechain import envelope
from carechain.cli import app
from carechain.config import BridgeConfig, BrokerConfig
from carechain.entries import Registration, Revocation, event_entry, registration_entry, revocation_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from carechain.tiles import consistency_ranges
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.integrity import AuditFailure, LogAuditor, audit_ledger
from chain_bridge.ledger.sql import StoreLocation
from chain_bridge.ledger.store import DeviceRevoked, EventCandidate, Ledger
from chain_bridge.registry import ledger_path, log_key, operator_key

DEVS = [Identity.from_seed(bytes([0x30 + i]) * 32) for i in range(3)]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def topic(ident: Identity) -> str:
    return f"cc/v1/dev/{ident.device_id}/ev"


def register(ledger: Ledger, data_dir: Path, idents: list[Identity]) -> None:
    items = []
    for ident in idents:
        reg = Registration(dev=ident.device_id, pk=ident.public_key, profile="heart_rate_band",
                           owner="patient:a", site="ward", ts=int(time.time() * 1000))
        items.append((registration_entry(operator_key(data_dir), reg), reg))
    ledger.append_registrations(items)


def write_ledger(tmp_path: Path, location: StoreLocation | None = None) -> Path:
    """A bridge data directory: 2 devices registered, then events in batches with a checkpoint after each
    (sizes 2, 12, 29, ...), a third device registered midway, one device revoked; 3 entries uncovered.
    The ledger is the data directory's ledger.db, or the one at `location`."""
    ledger = Ledger(location or ledger_path(tmp_path))
    bridge = Bridge(BridgeConfig(data_dir=tmp_path), BrokerConfig(), log_key(tmp_path), ledger)
    register(ledger, tmp_path, DEVS[:2])
    bridge.maybe_checkpoint()
    now = int(time.time() * 1000)
    seq = {d.device_id: 0 for d in DEVS}
    for i, n in enumerate([10, 17, 1, 33, 64, 5, 40]):
        if i == 3:
            register(ledger, tmp_path, DEVS[2:])
        batch = []
        for j in range(n):
            d = DEVS[j % (3 if i >= 3 else 2)]
            batch.append((topic(d), envelope.sign(d, make_payload(d.device_id, seq[d.device_id], now, "heart_rate",
                                                                   {"bpm": 60 + j % 50}))))
            seq[d.device_id] += 1
        bridge.process(batch)
        bridge.maybe_checkpoint()
    rev = Revocation(dev=DEVS[1].device_id, reason="lost", ts=now)
    ledger.append_revocation(revocation_entry(operator_key(tmp_path), rev), rev)
    bridge.process([(topic(DEVS[0]), envelope.sign(DEVS[0], make_payload(
        DEVS[0].device_id, 10_000 + k, now, "heart_rate", {"bpm": 70}))) for k in range(2)])
    ledger.close()
    return tmp_path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_ledger(tmp_path)


def append_events(data_dir: Path, device: Identity, seqs: range, *, checkpoint: bool = True,
                  location: StoreLocation | None = None) -> None:
    """More events from `device` through a bridge, then (by default) a checkpoint over them."""
    ledger = Ledger(location or ledger_path(data_dir))
    bridge = Bridge(BridgeConfig(data_dir=data_dir), BrokerConfig(), log_key(data_dir), ledger)
    now = int(time.time() * 1000)
    bridge.process([(topic(device), envelope.sign(device, make_payload(device.device_id, s, now, "heart_rate",
                                                                        {"bpm": 80}))) for s in seqs])
    if checkpoint:
        bridge.maybe_checkpoint()
    ledger.close()


def audit(data_dir: Path, **kwargs):  # noqa: ANN003, ANN201
    op = operator_key(data_dir)
    return audit_ledger(ledger_path(data_dir), log_key(data_dir).public_key,
                        operator_keys={op.device_id: op.public_key}, **kwargs)


def sql(data_dir: Path, statement: str, *params: object) -> None:
    db = sqlite3.connect(ledger_path(data_dir))
    db.execute(statement, params)
    db.commit()
    db.close()


def run(*args: str | Path):  # noqa: ANN201 - click Result
    return CliRunner(env={"COLUMNS": "80"}).invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_a_real_ledger_verifies(data_dir: Path) -> None:
    report = audit(data_dir)
    assert (report.entries, report.registrations, report.revocations) == (2 + 170 + 1 + 1 + 2, 3, 1)
    assert report.events == 172
    assert report.checkpoints == 8 and report.consistency_proofs == 7
    assert report.uncovered == 3 and report.operator_signatures_checked
    ledger = Ledger(ledger_path(data_dir))
    assert report.root == ledger.tree.root()


def test_cli_verify_full_prints_a_summary_and_exits_0(data_dir: Path) -> None:
    result = run("verify", "--full", "--data-dir", data_dir)
    text = _ANSI.sub("", result.output)
    assert result.exit_code == 0, text
    assert "VERIFIED" in text and "176 entries (172 events, 3 registrations, 1 revocations), 8 checkpoints" in text
    result = run("verify", "--full", "--data-dir", data_dir, "--json")
    assert json.loads(result.output)["full"]["consistency_proofs"] == 7


def test_an_altered_entry_is_named_by_its_leaf_index(data_dir: Path) -> None:
    sql(data_dir, "UPDATE entries SET data = CAST(replace(data, X'18', X'19') AS BLOB) WHERE idx = 57")
    with pytest.raises(AuditFailure) as err:
        audit(data_dir)
    assert err.value.index == 57 and "leaf 57: the stored entry bytes do not hash" in str(err.value)
    result = run("verify", "--full", "--data-dir", data_dir)
    assert result.exit_code == 1 and "NOT VERIFIED: leaf 57:" in _ANSI.sub("", result.output)


def alter_signed_event(data_dir: Path, index: int) -> None:
    """Change a heart-rate event's signed bpm and store a matching leaf hash: only its signature is wrong."""
    ledger = Ledger(ledger_path(data_dir))
    data = bytearray(ledger.entry(index))
    ledger.close()
    at = data.index(b"cbpm\x18") + 5  # the bpm value (60..109, after its 0x18 head) in the signed payload
    data[at] ^= 0x01
    sql(data_dir, "UPDATE entries SET data = ?, leaf_hash = ? WHERE idx = ?", bytes(data), leaf_hash(bytes(data)),
        index)


def test_an_entry_altered_together_with_its_stored_hash_is_named_by_its_leaf_index(data_dir: Path) -> None:
    """An attacker who also rewrites leaf_hash: the device signature no longer verifies."""
    alter_signed_event(data_dir, 40)
    with pytest.raises(AuditFailure, match=r"^leaf 40: the event's signature does not verify") as err:
        audit(data_dir)
    assert err.value.index == 40


def test_an_altered_checkpoint_signature_is_named_by_its_tree_size(data_dir: Path) -> None:
    db = sqlite3.connect(ledger_path(data_dir))
    size, note = db.execute("SELECT tree_size, note FROM checkpoints ORDER BY tree_size LIMIT 1 OFFSET 3").fetchone()
    db.close()
    head, _, sig = note.rstrip("\n").rpartition(" ")
    forged = head + " " + sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:] + "\n"
    sql(data_dir, "UPDATE checkpoints SET note = ? WHERE tree_size = ?", forged, size)
    with pytest.raises(AuditFailure, match=rf"^checkpoint at tree size {size}: its signature does not verify"):
        audit(data_dir)
    result = run("verify", "--full", "--data-dir", data_dir, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["where"] == f"checkpoint at tree size {size}"


def test_a_deleted_entry_is_named(data_dir: Path) -> None:
    sql(data_dir, "DELETE FROM entries WHERE idx = 100")
    with pytest.raises(AuditFailure, match=r"^leaf 100: entry 100 is missing from the store \(the next stored is 101"):
        audit(data_dir)


def test_deleted_entries_at_the_end_are_named_by_the_checkpoint_that_covers_them(data_dir: Path) -> None:
    sql(data_dir, "DELETE FROM entries WHERE idx >= 160")
    with pytest.raises(AuditFailure, match=r"^checkpoint at tree size 173: the store holds only 160 entries: "
                                           r"entries 160..172 are missing"):
        audit(data_dir)


def test_a_deleted_row_of_the_events_index_is_named(data_dir: Path) -> None:
    """The index is what stops a seq from being anchored twice: it must agree with the log."""
    sql(data_dir, "DELETE FROM events WHERE idx = 20")
    with pytest.raises(AuditFailure, match=r"^leaf 20: the events index .* has no row for it"):
        audit(data_dir)


def test_a_devices_table_that_disagrees_with_the_log_is_named(data_dir: Path) -> None:
    """The bridge checks every event against this table: swapping a key in it is caught."""
    sql(data_dir, "UPDATE devices SET public_key = ? WHERE device_id = ?", b"\x11" * 32, DEVS[0].device_id)
    with pytest.raises(AuditFailure, match=rf"^devices table: the row for {DEVS[0].device_id}"):
        audit(data_dir)


def forge_event_after_revocation(data_dir: Path) -> int:
    """Append an event from the revoked device, as a bridge that missed the revocation would; its leaf."""
    ledger = Ledger(ledger_path(data_dir))
    raw = envelope.sign(DEVS[1], make_payload(DEVS[1].device_id, 9999, int(time.time() * 1000), "heart_rate",
                                              {"bpm": 70}))
    candidate = EventCandidate(DEVS[1].device_id, 9999, event_entry(raw).encode())
    assert isinstance(ledger.append_events([candidate])[0], DeviceRevoked)  # today's store refuses it
    # A store written by a bridge that missed the revocation (e.g. an older version, or tampering):
    db = ledger._db  # noqa: SLF001 - forging a bad store on purpose
    revoked_idx = db.execute("SELECT revoked_idx FROM devices WHERE device_id=?", (DEVS[1].device_id,)).fetchone()[0]
    db.execute("UPDATE devices SET revoked_idx=NULL WHERE device_id=?", (DEVS[1].device_id,))
    ledger.append_events([candidate])
    db.execute("UPDATE devices SET revoked_idx=? WHERE device_id=?", (revoked_idx, DEVS[1].device_id))
    index = ledger.size - 1
    ledger.close()
    return index


def test_an_event_appended_after_its_device_was_revoked_is_named(data_dir: Path) -> None:
    index = forge_event_after_revocation(data_dir)
    with pytest.raises(AuditFailure, match=rf"^leaf {index}: event from device {DEVS[1].device_id} after its "
                                           r"revocation"):
        audit(data_dir)


def test_a_registration_not_signed_by_a_trusted_operator_is_named(data_dir: Path) -> None:
    stranger = Identity.from_seed(b"\x99" * 32)
    with pytest.raises(AuditFailure, match=r"^leaf 0: registration signed by .* not a trusted operator key"):
        audit_ledger(ledger_path(data_dir), log_key(data_dir).public_key,
                     operator_keys={stranger.device_id: stranger.public_key})


def test_a_wrong_log_key_fails_at_the_first_checkpoint(data_dir: Path) -> None:
    result = run("verify", "--full", "--data-dir", data_dir, "--log-key", "ab" * 32)
    assert result.exit_code == 1
    assert "NOT VERIFIED: checkpoint at tree size 2: its signature does not verify" in _ANSI.sub("", result.output)


def test_progress_is_reported_and_the_tree_state_stays_small(data_dir: Path) -> None:
    seen = []
    audit(data_dir, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (176, 176)
    auditor = LogAuditor(b"\x00" * 32)
    for i in range(5000):  # the frontier holds one hash per set bit of the size, never the leaves
        auditor._append_leaf(bytes(32))
        assert len(auditor._frontier) == (i + 1).bit_count()


def test_the_consistency_ranges_are_those_of_the_tree_proofs() -> None:
    tree = MerkleTree([bytes([i]) * 32 for i in range(40)])
    for m in range(41):
        for n in range(m, 41):
            assert [tree._subtree(a, b) for a, b in consistency_ranges(m, n)] == tree.consistency_proof(m, n)
