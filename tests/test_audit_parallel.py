"""`carechain verify --full` across worker processes and from a saved state.

Parallel: the same verdict as the sequential audit on a good ledger and on every kind of damage
tests/test_audit.py makes, with the same first failure (`where`, problem, index) whatever the number of
workers and the chunk size (small chunks here, so that the real worker pool is used on a small ledger).
Incremental: a state saved after one audit lets the next read only the leaves appended since; a state that
does not belong to the log is refused, never taken for a pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from carechain.identity import Identity
from chain_bridge.ledger import integrity
from chain_bridge.ledger.integrity import AuditFailure, AuditReport, AuditState, audit_ledger
from chain_bridge.ledger.log_source import LogSource, SqliteLogSource
from chain_bridge.registry import ledger_path, log_key, operator_key
from tests.conftest import LedgerFactory
from tests.test_audit import (
    _ANSI,
    DEVS,
    alter_signed_event,
    append_events,
    audit,
    data_dir,  # noqa: F401 - the fixture
    forge_event_after_revocation,
    run,
    sql,
    write_ledger,
)

PARALLEL = [(1, 7), (2, 3), (2, 64)]  # (workers, events per chunk)


def failure(data_dir: Path, **kwargs: object) -> tuple[str, str, int | None]:
    with pytest.raises(AuditFailure) as err:
        audit(data_dir, **kwargs)
    return err.value.where, err.value.problem, err.value.index


def forge_checkpoint(data_dir: Path, size: int) -> None:
    db = sqlite3.connect(ledger_path(data_dir))
    (note,) = db.execute("SELECT note FROM checkpoints WHERE tree_size = ?", (size,)).fetchone()
    db.close()
    head, _, sig = note.rstrip("\n").rpartition(" ")
    sql(data_dir, "UPDATE checkpoints SET note = ? WHERE tree_size = ?",
        head + " " + sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:] + "\n", size)


def damage_in_two_places(data_dir: Path) -> None:
    """A bad signature in an early chunk, another later, and a broken leaf hash after both."""
    alter_signed_event(data_dir, 40)
    alter_signed_event(data_dir, 100)
    sql(data_dir, "UPDATE entries SET data = CAST(replace(data, X'18', X'19') AS BLOB) WHERE idx = 150")


def bad_signatures_close_together(data_dir: Path) -> None:
    """Two failing chunks in flight at once: the earlier is named, whichever worker finishes first."""
    alter_signed_event(data_dir, 40)
    alter_signed_event(data_dir, 44)
    sql(data_dir, "DELETE FROM events WHERE idx = 47")


def bad_signature_before_a_bad_checkpoint(data_dir: Path) -> None:
    alter_signed_event(data_dir, 20)  # still in a worker when the ordered part reaches the checkpoint at 29
    forge_checkpoint(data_dir, 29)


DAMAGE: dict[str, Callable[[Path], object]] = {
    "altered entry": lambda d: sql(d, "UPDATE entries SET data = CAST(replace(data, X'18', X'19') AS BLOB) "
                                      "WHERE idx = 57"),
    "altered signed event": lambda d: alter_signed_event(d, 40),
    "altered last event": lambda d: alter_signed_event(d, 175),
    "two bad signatures and a bad hash": damage_in_two_places,
    "bad signatures close together": bad_signatures_close_together,
    "bad signature before a bad checkpoint": bad_signature_before_a_bad_checkpoint,
    "forged checkpoint": lambda d: forge_checkpoint(d, 64),
    "deleted entry": lambda d: sql(d, "DELETE FROM entries WHERE idx = 100"),
    "deleted tail": lambda d: sql(d, "DELETE FROM entries WHERE idx >= 160"),
    "deleted events index row": lambda d: sql(d, "DELETE FROM events WHERE idx = 20"),
    "events index row pointing elsewhere": lambda d: sql(d, "UPDATE events SET idx = 99 WHERE idx = 98"),
    "devices table": lambda d: sql(d, "UPDATE devices SET public_key = ? WHERE device_id = ?", b"\x11" * 32,
                                   DEVS[0].device_id),
    "event after revocation": forge_event_after_revocation,
    "type column": lambda d: sql(d, "UPDATE entries SET type = 'device.revoke' WHERE idx = 70"),
}


def test_parallel_audits_report_what_the_sequential_audit_reports(data_dir: Path) -> None:
    sequential = audit(data_dir).as_dict()
    for workers, chunk in PARALLEL:
        assert audit(data_dir, workers=workers, chunk=chunk).as_dict() == sequential


@pytest.mark.parametrize("damage", DAMAGE)
def test_parallel_audits_name_the_same_first_failure(data_dir: Path, damage: str) -> None:
    DAMAGE[damage](data_dir)
    expected = failure(data_dir)
    assert expected[0].startswith(("leaf", "checkpoint", "devices", "events"))
    for workers, chunk in PARALLEL:
        assert failure(data_dir, workers=workers, chunk=chunk) == expected, (workers, chunk)


@pytest.mark.parametrize("batch", [7, integrity.INDEX_BATCH])
def test_a_held_back_events_index_check_is_still_the_first_failure(data_dir: Path, batch: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The events index is checked a batch of events at a time (one query each, not one per event): a missing row
    at leaf 20 is still named before a bad signature at 40, a forged checkpoint at 64 and a bad hash at 150,
    sequential or in parallel; and a clean log audits the same whatever the batch."""
    monkeypatch.setattr(integrity, "INDEX_BATCH", batch)
    clean = audit(data_dir).as_dict()
    assert clean["events"] == 172
    sql(data_dir, "DELETE FROM events WHERE idx = 20")
    damage_in_two_places(data_dir)
    forge_checkpoint(data_dir, 64)
    for kwargs in ({}, *({"workers": w, "chunk": c} for w, c in PARALLEL)):
        where, problem, index = failure(data_dir, **kwargs)
        assert (where, index) == ("leaf 20", 20) and "has no row for it" in problem, kwargs


def test_the_sqlite_source_looks_up_many_index_rows_at_once(data_dir: Path) -> None:
    with SqliteLogSource(ledger_path(data_dir)) as log:
        real = [(d.device_id, s) for d in DEVS for s in range(40) if log.event_index(d.device_id, s) is not None]
        wanted = real + [(DEVS[0].device_id, 50_000 + k) for k in range(1_000)]  # rows that do not exist
        found = log.event_indexes(wanted)
        assert found == {key: log.event_index(*key) for key in real} and len(real) > 60


def test_a_bad_signature_is_named_at_its_leaf_with_any_number_of_workers(data_dir: Path) -> None:
    damage_in_two_places(data_dir)
    for workers in range(1, (os.cpu_count() or 1) + 2):
        where, problem, index = failure(data_dir, workers=workers, chunk=5)
        assert (where, index) == ("leaf 40", 40) and problem.startswith("the event's signature does not verify")


def test_parallel_audits_use_the_same_trusted_keys(data_dir: Path) -> None:
    stranger = Identity.from_seed(b"\x99" * 32)
    for workers in (0, 2):
        with pytest.raises(AuditFailure, match=r"^leaf 0: registration signed by .* not a trusted operator key"):
            audit_ledger(ledger_path(data_dir), log_key(data_dir).public_key, workers=workers, chunk=3,
                         operator_keys={stranger.device_id: stranger.public_key})
        with pytest.raises(AuditFailure, match=r"^checkpoint at tree size 2: its signature does not verify"):
            audit_ledger(ledger_path(data_dir), stranger.public_key, workers=workers, chunk=3)


# -- incremental ---------------------------------------------------------------------------------------


def test_an_audit_resumes_from_its_state_and_reads_only_the_new_leaves(data_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    first = audit(data_dir, workers=2, chunk=8, state_file=state)
    assert first.resumed_at is None and first.last_checkpoint_size == 173
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    saved = AuditState.load(state)
    assert (saved.tree_size, saved.counts["entries"], saved.counts["checkpoints"]) == (173, 173, 8)

    append_events(data_dir, DEVS[2], range(1000, 1050))
    seen: list[tuple[int, int]] = []
    resumed = audit(data_dir, workers=2, chunk=8, state_file=state, on_progress=lambda *p: seen.append(p))
    whole = audit(data_dir)
    assert resumed.resumed_at == 173 and resumed.entries == whole.entries == 226
    assert {**resumed.as_dict(), "resumed_at": None} == whole.as_dict()
    assert seen[-1] == (226, 226)
    assert AuditState.load(state).tree_size == 226

    # What was audited before is not read again; what was appended since is.
    sql(data_dir, "UPDATE entries SET data = CAST(replace(data, X'18', X'19') AS BLOB) WHERE idx = 57")
    assert audit(data_dir, state_file=state).resumed_at == 226
    append_events(data_dir, DEVS[2], range(2000, 2010))
    alter_signed_event(data_dir, 230)
    before = state.read_bytes()
    with pytest.raises(AuditFailure, match=r"^leaf 230: the event's signature does not verify"):
        audit(data_dir, workers=1, chunk=4, state_file=state)
    assert state.read_bytes() == before  # a failed audit leaves the state as it was


def test_a_resumed_audit_checks_the_consistency_of_the_new_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    audit(data_dir, state_file=state)
    append_events(data_dir, DEVS[0], range(500, 520))
    (size,) = sqlite3.connect(ledger_path(data_dir)).execute("SELECT MAX(tree_size) FROM checkpoints").fetchone()
    forge_checkpoint(data_dir, size)
    with pytest.raises(AuditFailure, match=rf"^checkpoint at tree size {size}: its signature does not verify"):
        audit(data_dir, state_file=state)


def test_a_state_from_another_log_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """Same log and operator keys, same checkpoint sizes, other entries: the rewritten-log case."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(data_dir / "keys", other / "keys")
    write_ledger(other)
    state = tmp_path / "audit.state"
    audit(other, state_file=state)
    with pytest.raises(AuditFailure, match=r"^state: the log's checkpoint at tree size 173 has another root"):
        audit(data_dir, state_file=state)


def test_a_state_whose_checkpoint_is_gone_from_the_log_is_refused(data_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    audit(data_dir, state_file=state)
    sql(data_dir, "DELETE FROM checkpoints WHERE tree_size = 173")
    with pytest.raises(AuditFailure, match=r"^state: the log has no checkpoint at tree size 173"):
        audit(data_dir, state_file=state)
    sql(data_dir, "DELETE FROM entries WHERE idx >= 100")
    with pytest.raises(AuditFailure, match=r"^state: it was saved at tree size 173 but the log holds only 100"):
        audit(data_dir, state_file=state)


def test_a_damaged_or_foreign_state_file_is_refused(data_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    audit(data_dir, state_file=state)
    good = json.loads(state.read_bytes())

    operator_of_the_log = operator_key(data_dir)

    def refused(raw: str | dict[str, object], match: str, operator: Identity = operator_of_the_log) -> None:
        """Write `raw` (a dict: edited consistently, with its digest redone) and expect the resume to refuse it."""
        if isinstance(raw, dict):
            raw = {k: v for k, v in raw.items() if k != "digest"}
            raw = json.dumps({**raw, "digest": hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()})
        state.write_text(raw)
        with pytest.raises(AuditFailure, match=match):
            audit_ledger(ledger_path(data_dir), log_key(data_dir).public_key, state_file=state,
                         operator_keys={operator.device_id: operator.public_key})

    refused("{not json", r"^state: not a readable audit state")
    refused(json.dumps({**good, "tree_size": 172}), r"^state: its digest does not match its contents")
    refused({**good, "counts": {}}, r"^state: not a readable audit state \(KeyError")
    refused({**good, "version": 99}, r"^state: format version 99 is not 1")
    refused({**good, "frontier": [[0, 128, "00" * 32], *good["frontier"][1:]]},
            r"^state: its frontier does not give the signed root")
    refused({**good, "frontier": good["frontier"][1:]}, r"^state: its tree \(size 173\) is not that of")
    note = good["note"]
    refused({**good, "note": note.replace("\n173\n", "\n172\n", 1)}, r"^state: its checkpoint's signature does not")
    refused({**good, "log_key": "ab" * 32}, r"^state: it was saved for another log key")
    refused(good, r"^state: it was saved with other trusted operator keys", Identity.from_seed(b"\x98" * 32))


def test_the_sqlite_source_reads_one_snapshot(data_dir: Path) -> None:
    with SqliteLogSource(ledger_path(data_dir)) as log:
        size = log.size()
        append_events(data_dir, DEVS[0], range(700, 705))  # a bridge appending meanwhile
        assert log.size() == size == 176 and len(list(log.entries(170))) == 6
        assert [c[0] for c in log.checkpoints(128)] == [128, 133, 173]
        assert log.event_index(DEVS[0].device_id, 700) is None and log.count_events() == 172
        op = operator_key(data_dir)
        report = audit_ledger(log, log_key(data_dir).public_key, operator_keys={op.device_id: op.public_key},
                              workers=2, chunk=16)
        assert report.entries == 176  # any LogSource: the audit sees the snapshot, not the appended events
    assert audit(data_dir).entries == 181


def test_a_ledger_on_either_backend_is_audited_through_the_log_source_interface(
        tmp_path: Path, ledger_factory: LedgerFactory) -> None:
    """SQLite or PostgreSQL: the same verdicts, in parallel, and resumed from a state."""
    location = ledger_factory.location(tmp_path / "ledger.db")
    write_ledger(tmp_path, location)
    op = operator_key(tmp_path)

    def audit_source(**kwargs: Any) -> AuditReport:
        if ledger_factory.backend == "postgresql":
            from chain_bridge.ledger.postgres import PostgresLocation, PostgresLogSource  # the postgresql extra

            assert isinstance(location, PostgresLocation)
            source: LogSource = PostgresLogSource(location)
        else:
            source = SqliteLogSource(tmp_path / "ledger.db")
        try:
            return audit_ledger(source, log_key(tmp_path).public_key, operator_keys={op.device_id: op.public_key},
                                **kwargs)
        finally:
            source.close()

    state = tmp_path / "audit.state"
    sequential = audit_source()
    assert (sequential.entries, sequential.events, sequential.checkpoints) == (176, 172, 8)
    assert audit_source(workers=2, chunk=5, state_file=state).as_dict() == sequential.as_dict()
    append_events(tmp_path, DEVS[0], range(900, 940), location=location)
    resumed = audit_source(workers=2, chunk=5, state_file=state)
    assert (resumed.resumed_at, resumed.entries, resumed.events) == (173, 216, 212)


def test_cli_verify_full_reads_the_ledger_where_bridge_store_says(tmp_path: Path,
                                                                  ledger_factory: LedgerFactory) -> None:
    write_ledger(tmp_path, ledger_factory.location(tmp_path / "ledger.db"))
    config = tmp_path / "carechain.yaml"
    config.write_text(json.dumps({"bridge": {"store": ledger_factory.store_config(tmp_path / "ledger.db")}}))
    result = run("verify", "--full", "--config", config, "--data-dir", tmp_path, "--workers", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["full"]["entries"] == 176


def test_cli_verify_full_with_workers_and_state(data_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    result = run("verify", "--full", "--data-dir", data_dir, "--workers", "2", "--state", state)
    text = _ANSI.sub("", result.output)
    assert result.exit_code == 0, text
    assert "VERIFIED" in text and f"state saved to {state} at checkpoint 173" in " ".join(text.split())
    append_events(data_dir, DEVS[0], range(800, 830))
    result = run("verify", "--full", "--data-dir", data_dir, "--state", state)
    text = " ".join(_ANSI.sub("", result.output).split())
    assert result.exit_code == 0 and "resumed at checkpoint 173, audited 33 new leaves" in text, text
    result = run("verify", "--full", "--data-dir", data_dir, "--state", state, "--workers", "0", "--json")
    full = json.loads(result.output)["full"]
    assert full["resumed_at"] == 206 and full["entries"] == 206
    state.write_text("{}")
    result = run("verify", "--full", "--data-dir", data_dir, "--state", state, "--json")
    assert result.exit_code == 1 and json.loads(result.output)["where"] == "state"
    assert run("verify", "--full", "--data-dir", data_dir, "--workers", "-1").exit_code == 2
