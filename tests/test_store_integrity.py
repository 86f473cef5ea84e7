"""A damaged ledger or outbox file is refused, untouched, with a message that says what to do.

Real files: a ledger written by a `Bridge` (registration, events, checkpoints) and an outbox written by
`Outbox.add`, closed (so the WAL is checkpointed into the file), then damaged the ways disks and people
damage files. Opening must raise `StoreCorruptError` naming the file and the way out, and leave the file
byte-identical; the CLI must print one line and exit 1.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carechain import envelope
from carechain.cli import app
from carechain.config import BridgeConfig, BrokerConfig
from carechain.entries import ENTRY_EVENT, Entry, Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.reencryption import PreKey
from carechain.sqlite_store import LEDGER, StoreCorruptError, check_store
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import ledger_path, log_key, operator_key
from edge_agent.outbox import Outbox
from simulators import fault_harness as faults

DEV = Identity.from_seed(b"\x03" * 32)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def build_ledger(data_dir: Path, events: int = 300) -> Path:
    ledger = Ledger(ledger_path(data_dir))
    reg = Registration(dev=DEV.device_id, pk=DEV.public_key, profile="heart_rate_band", owner="patient:a",
                       site="ward", ts=int(time.time() * 1000))
    ledger.append_registrations([(registration_entry(operator_key(data_dir), reg), reg)])
    bridge = Bridge(BridgeConfig(data_dir=data_dir), BrokerConfig(), log_key(data_dir), ledger)
    now = int(time.time() * 1000)
    topic = f"cc/v1/dev/{DEV.device_id}/ev"
    for start in range(0, events, 100):
        bridge.process([(topic, envelope.sign(DEV, make_payload(DEV.device_id, s, now, "heart_rate", {"bpm": 70})))
                        for s in range(start, start + 100)])
        bridge.maybe_checkpoint()
    ledger.close()
    return ledger_path(data_dir)


def build_outbox(path: Path, events: int = 300) -> Path:
    outbox = Outbox(path)
    now = int(time.time() * 1000)
    for _ in range(events):
        outbox.add(DEV.device_id, lambda seq: envelope.sign(
            DEV, make_payload(DEV.device_id, seq, now, "heart_rate", {"bpm": 70})))
    outbox.close()
    return path


def page_size(data: bytes) -> int:
    return int.from_bytes(data[16:18], "big")


def _overwrite_btree_page(data: bytes) -> bytes:
    ps = page_size(data)
    return data[:ps] + b"\xff" * 32 + data[ps + 32:]  # page 2: a table's root page; 0xff is no page type


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated mid-page": lambda d: d[: len(d) // 2 + 100],
    "truncated to fewer pages than its header says": lambda d: d[: page_size(d) * 3],
    "bytes overwritten inside a page": _overwrite_btree_page,
    "header zeroed": lambda d: b"\x00" * 100 + d[100:],
    "not a SQLite file": lambda d: b"ward 3 inventory, not a database\n" * 300,
    "emptied": lambda d: b"",
}


def damage(path: Path, how: str) -> bytes:
    data = path.read_bytes()
    assert len(data) >= 8 * page_size(data), "the fixture should span several pages"
    damaged = DAMAGE[how](data)
    assert damaged != data
    path.write_bytes(damaged)
    return damaged


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_ledger_is_refused_and_left_as_it_is(tmp_path: Path, how: str) -> None:
    path = build_ledger(tmp_path)
    damaged = damage(path, how)
    with pytest.raises(StoreCorruptError) as err:
        Ledger(path)
    message = str(err.value)
    assert str(path) in message and "damaged" in message and "\n" not in message
    assert "restore" in message and "backup" in message and f"carechain verify --full --data-dir {tmp_path}" in message
    assert path.read_bytes() == damaged


def test_above_the_open_check_bound_only_the_header_is_checked_at_open(tmp_path: Path) -> None:
    """A ledger's start-up must not grow with the log: quick_check (it reads the whole file) runs only up to a
    size; the header check still refuses a truncated file of any size."""
    path = build_ledger(tmp_path)
    damage(path, "bytes overwritten inside a page")
    with pytest.raises(StoreCorruptError):
        check_store(path, LEDGER)
    check_store(path, LEDGER, full_check_max_bytes=path.stat().st_size - 1)  # bounded: the page is not read
    damage(path, "truncated to fewer pages than its header says")
    with pytest.raises(StoreCorruptError):
        check_store(path, LEDGER, full_check_max_bytes=1)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_outbox_is_refused_and_left_as_it_is(tmp_path: Path, how: str) -> None:
    path = build_outbox(tmp_path / "outbox.db")
    damaged = damage(path, how)
    with pytest.raises(StoreCorruptError) as err:
        Outbox(path)
    message = str(err.value)
    assert str(path) in message and "agent outbox is damaged" in message and "\n" not in message
    assert "backup" in message and "seq" in message  # why deleting it is not the fix
    assert path.read_bytes() == damaged


def test_a_missing_ledger_next_to_its_write_ahead_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    wal = tmp_path / "ledger.db-wal"
    wal.write_bytes(b"\x37\x7f\x06\x82" + b"\x00" * 60)
    with pytest.raises(StoreCorruptError, match="missing but its write-ahead log"):
        Ledger(path)
    assert not path.exists()


def test_healthy_stores_open_also_while_another_connection_holds_the_wal(tmp_path: Path) -> None:
    path = build_ledger(tmp_path, events=100)
    live = Ledger(path)  # like a running bridge: WAL and shared memory in use
    live.append_registrations([])
    db = sqlite3.connect(path)
    db.execute("INSERT INTO meta VALUES ('written-by-the-test', '1')")  # a commit that stays in the WAL
    db.commit()
    assert (tmp_path / "ledger.db-wal").stat().st_size > 0
    assert Ledger(path).size == live.size == 101
    db.close()
    outbox = build_outbox(tmp_path / "outbox.db", events=10)
    assert Outbox(outbox).depth() == 10


# -- the CLI: one line, exit code 1 ---------------------------------------------------------------------


def run(*args: str | Path):  # noqa: ANN201 - click Result
    return CliRunner(env={"COLUMNS": "80"}).invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:  # noqa: ANN001
    text = _ANSI.sub("", result.output).strip()
    assert result.exit_code == 1, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_cli_commands_report_a_damaged_ledger_in_one_line(tmp_path: Path) -> None:
    path = build_ledger(tmp_path, events=100)
    damaged = damage(path, "truncated mid-page")
    for args in (["proof", DEV.device_id, "1"], ["proof", "--consistency", "1"],
                 ["bridge", "--broker", "127.0.0.1:9"], ["verify", "--full"]):
        text = one_line_error(run(*args, "--data-dir", tmp_path))
        assert "ledger is damaged: the file is truncated mid-page" in text and "backup" in text
    assert path.read_bytes() == damaged


def test_cli_agent_reports_a_damaged_outbox_in_one_line(tmp_path: Path) -> None:
    DEV.save(tmp_path / "hr.key")
    outbox = build_outbox(tmp_path / "agent" / "outbox.db")
    damaged = damage(outbox, "header zeroed")
    config = tmp_path / "agent.yaml"
    config.write_text(f"agent:\n  data_dir: {tmp_path / 'agent'}\n  bridge_public_key: {'ab' * 32}\n"
                      f"  devices: [{{key_file: {tmp_path / 'hr.key'}, profile: heart_rate_band, owner: {'a' * 16},\n"
                      f"             owner_pre_key: '{PreKey.generate().public_key.hex()}'}}]\n")
    text = one_line_error(run("agent", "--config", config, "--broker", "127.0.0.1:9"))
    assert "agent outbox is damaged" in text and "not a SQLite database" in text
    assert outbox.read_bytes() == damaged


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    try:
        with faults.small_tmpfs(tmp_path / "small", size_mb=4) as mount:
            yield mount
    except faults.MountRefused as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {exc}")


def test_a_full_disk_at_commit_surfaces_as_disk_full_and_the_ledger_takes_writes_again_once_freed(
        tiny_tmpfs: Path) -> None:
    # SQLite rolls a transaction back by itself on SQLITE_FULL; our rollback must not turn that into
    # "no transaction is active", and the ledger must work again once there is space (a real tmpfs).
    mount = tiny_tmpfs
    ledger = Ledger(ledger_path(mount))
    reg = Registration(dev=DEV.device_id, pk=DEV.public_key, profile="heart_rate_band", owner="patient:a",
                       site="ward", ts=int(time.time() * 1000))
    ledger.append_registrations([(registration_entry(operator_key(mount), reg), reg)])

    def events(first: int, n: int) -> list[EventCandidate]:
        return [EventCandidate(DEV.device_id, s, _leaf(s)) for s in range(first, first + n)]

    filler = faults.fill_disk(mount)
    size = ledger.size
    seq = 0
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        for _ in range(200):  # the WAL's already allocated pages absorb the first few batches
            ledger.append_events(events(seq, 50))
            seq += 50
    assert ledger.size == size + seq
    filler.unlink()
    ledger.append_events(events(seq, 50))
    assert ledger.size == size + seq + 50 and ledger.count_events() == seq + 50
    ledger.close()


def _leaf(seq: int) -> bytes:
    cose = envelope.sign(DEV, make_payload(DEV.device_id, seq, int(time.time() * 1000), "heart_rate", {"bpm": 70}))
    return Entry(ENTRY_EVENT, cose).encode()
