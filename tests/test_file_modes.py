"""Health data and keys are private files (issue 12, item 9): data directories 0700, their files 0600.

The demo runs as a real process under a lax umask (022, the usual default) with `--data-dir`, and the test
walks what it left; SQLite's WAL and SHM files are checked on a live database; `carechain store get` writes
its output (a patient's decrypted data) with mode 0600 whatever the umask.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carechain.cli import app
from carechain.files import make_private, private_dir

# Files under a data directory that hold neither health data nor a secret: the deployment's contract genesis
# (every miner gets a copy). Everything else must be 0600.
PUBLIC_FILES = {Path("bridge/contracts/genesis.json")}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def lax_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_the_demo_leaves_private_data_dirs_and_private_files(full_demo: tuple[dict[str, Any], Path]) -> None:
    _, root = full_demo  # run under a 022 umask (tests/conftest.py)
    for party in ("bridge", "agent"):
        assert mode(root / party) == 0o700, f"{party} data dir is {mode(root / party):04o}"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"bridge/ledger.db", "agent/outbox.db", "bridge/keys/log.key", "bridge/keys/operator.key"} <= names
    lax = [f"{p.relative_to(root)} {mode(p):04o}" for p in files
           if p.relative_to(root) not in PUBLIC_FILES and mode(p) & 0o077]
    assert lax == []


def test_a_private_database_keeps_its_wal_and_shm_private(tmp_path: Path, lax_umask: None) -> None:
    data = private_dir(tmp_path / "data")
    db = data / "ledger.db"
    first = sqlite3.connect(db)
    first.execute("PRAGMA journal_mode=WAL")
    first.execute("CREATE TABLE t (x)")
    first.commit()
    make_private(db)  # as the assemblies do once the store has opened its file
    first.close()  # the last connection removes the WAL and SHM
    again = sqlite3.connect(db)
    try:
        again.execute("INSERT INTO t VALUES ('reading')")
        again.commit()
        wal, shm = db.with_name("ledger.db-wal"), db.with_name("ledger.db-shm")
        assert wal.exists() and shm.exists()  # made anew, under a 022 umask
        assert (mode(data), mode(db), mode(wal), mode(shm)) == (0o700, 0o600, 0o600, 0o600)
    finally:
        again.close()


def test_files_and_dirs_left_lax_by_an_older_release_are_tightened(tmp_path: Path, lax_umask: None) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    db = data / "outbox.db"
    sqlite3.connect(db).close()
    db.chmod(0o644)
    wal = data / "outbox.db-wal"
    wal.write_bytes(b"")
    wal.chmod(0o644)
    make_private(private_dir(data) / "outbox.db")
    assert (mode(data), mode(db), mode(wal)) == (0o700, 0o600, 0o600)
    assert not (data / "outbox.db-shm").exists()  # nothing created


@pytest.mark.integration
def test_store_get_writes_the_data_only_its_owner_can_read(tmp_path: Path, broker, lax_umask: None) -> None:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    from tests.test_storage_network import SEED, StorageMiner

    miners = [StorageMiner(tmp_path / f"miner{i}", broker.config) for i in range(8)]
    try:
        for m in miners:
            m.start()
        for m in miners:
            assert m.wait_ready()["miner"] == m.id
        src = tmp_path / "record.bin"
        src.write_bytes(os.urandom(5000))
        net = ["--broker", broker.config.address, "--timeout", "3"]
        runner = CliRunner()
        r = runner.invoke(app, ["store", "put", str(src), "--miners", ",".join(m.id for m in miners),
                                "--seed", SEED.hex(), *net])
        assert r.exit_code == 0, r.output
        out = tmp_path / "out.bin"
        r = runner.invoke(app, ["store", "get", str(tmp_path / "record.bin.manifest.json"), "-o", str(out), *net])
        assert r.exit_code == 0, r.output
        assert out.read_bytes() == src.read_bytes() and mode(out) == 0o600
    finally:
        for m in miners:
            m.stop()
