"""What differs between the ledger's two SQL stores, behind one small interface; SQLite here, PostgreSQL in
`chain_bridge.ledger.postgres` (imported only when a PostgreSQL store is opened: psycopg is an extra).

The ledger logic (`chain_bridge.ledger.store`) is written once, in SQL both engines accept: `?` placeholders,
`INSERT ... ON CONFLICT`, `RETURNING`. A `Database` connection supplies the rest: how a write transaction takes
the one writer lock (SQLite `BEGIN IMMEDIATE`; PostgreSQL `BEGIN` + a transaction-level advisory lock), the
column types of the schema, bulk inserts (PostgreSQL `COPY`), and which errors mean "the store is unavailable
for now, retry the same batch" rather than "this batch is wrong".

A `StoreLocation` says where a ledger lives; it is a small frozen value, so it can be handed to another thread
or process (a read-only view, an ingest worker) that opens its own connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from carechain.disk_full_points import disk_full_point
from carechain.files import make_private
from carechain.seq_span import dense_span
from carechain.sqlite_store import LEDGER, OPEN_CHECK_MAX_BYTES, StoreError, check_store, store_error

__all__ = ["Cursor", "Database", "SqliteDatabase", "SqliteLocation", "StoreLocation", "schema_for"]


class Cursor(Protocol):
    """The part of a DB-API cursor the ledger uses (sqlite3 and psycopg both provide it)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """One connection to a ledger store. Statements outside `begin()`…`commit()` run on their own (autocommit)."""

    # Errors that mean the store cannot be written right now (disk full, I/O error, connection lost): the caller
    # keeps its batch, unreceipted, and retries it after a backoff.
    transient_errors: tuple[type[BaseException], ...]
    # Errors a constraint violation raises (a UNIQUE key taken).
    integrity_errors: tuple[type[BaseException], ...]

    def describe(self) -> str:
        """Where the store is, for messages: a file path, or a DSN without its password."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def insert_rows(self, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """Insert whole rows (every column, in table order) inside the open transaction, as fast as it goes."""

    def create_schema(self, schema: str) -> None:
        """Create the ledger's tables (a no-op when they exist); `schema` as `schema_for` takes it."""

    def open_failed(self, exc: BaseException) -> StoreError | None:
        """An engine error met while opening the ledger, as a `StoreError` a user can act on (else None)."""

    def events_among(self, keys: Sequence[tuple[str, int]]) -> list[tuple[str, int, int, bytes]]:
        """(device_id, seq, idx, leaf_hash) of the `events` rows with these (device_id, seq) keys."""

    def begin(self) -> None:
        """Open a write transaction holding the store's one writer lock (waits for another writer)."""

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Roll back if a transaction is open, never raising: the error that got us here is the one to see."""

    def fault_point(self) -> None:
        """A test-only disk-full injection point inside a write (carechain.disk_full_points)."""

    def close(self) -> None: ...


class StoreLocation(Protocol):
    """Where a ledger lives; `connect()` opens a `Database` there (creating the schema on first use)."""

    def connect(self) -> Database: ...

    def connect_read_only(self) -> Database:
        """A connection that sees only committed transactions and never takes the writer lock."""

    def describe(self) -> str: ...


# Column types written as {placeholders} in the ledger's schema, per engine. `serial` is an id the store
# assigns; `without_rowid` is SQLite's clustered-primary-key table option (PostgreSQL has no rowid to drop).
_SQLITE_TYPES = {"blob": "BLOB", "int": "INTEGER", "serial": "INTEGER PRIMARY KEY", "without_rowid": "WITHOUT ROWID"}


def schema_for(schema: str, types: dict[str, str]) -> str:
    """The ledger's schema with the engine's column types filled in."""
    return schema.format(**types)


@dataclass(frozen=True)
class SqliteLocation:
    """A ledger in one SQLite file (WAL, synchronous=FULL): the default, for one bridge host."""

    path: Path

    @property
    def moved_marker(self) -> Path:
        """Left beside the file's place when the data directory's ledger lives in PostgreSQL (`open_ledger`)."""
        return self.path.with_name(self.path.name + ".in-postgresql")

    def _refuse_if_moved(self) -> None:
        """A command that does not read bridge.store would start a second log here, or read none."""
        if self.moved_marker.exists():
            raise StoreError(f"{self.path}: this data directory's ledger is in PostgreSQL "
                             f"({self.moved_marker.read_text().strip()}), not in this file: run the command with "
                             "the config that names bridge.store (--config); this one opens the SQLite file only "
                             "(docs/ledger-stores.md)")

    def connect(self) -> SqliteDatabase:
        self._refuse_if_moved()
        # A damaged file is refused, untouched, before anything writes to it (fully up to a size: start-up stays flat).
        check_store(self.path, LEDGER, OPEN_CHECK_MAX_BYTES)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise store_error(self.path, LEDGER, exc) from None
        return SqliteDatabase(db, self.path)

    def connect_read_only(self) -> SqliteDatabase:
        self._refuse_if_moved()
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=30)
        return SqliteDatabase(db, self.path)

    def describe(self) -> str:
        return str(self.path)


class SqliteDatabase:
    transient_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError)
    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    types = _SQLITE_TYPES

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def create_schema(self, schema: str) -> None:
        self._db.executescript(schema_for(schema, self.types))
        make_private(self.path)  # 0600: health data; SQLite gives later -wal/-shm files this mode

    def open_failed(self, exc: BaseException) -> StoreError | None:
        return store_error(self.path, LEDGER, exc) if isinstance(exc, sqlite3.DatabaseError) else None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def insert_rows(self, table: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            marks = ",".join("?" * len(rows[0]))
            self._db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)

    def events_among(self, keys: Sequence[tuple[str, int]]) -> list[tuple[str, int, int, bytes]]:
        # Per device, one range read of the primary key when its seqs are dense, else one lookup per key.
        by_device: dict[str, list[int]] = {}
        for device_id, seq in keys:
            by_device.setdefault(device_id, []).append(seq)
        found = []
        for device_id, seqs in by_device.items():
            span = dense_span(seqs)
            if span is not None:
                wanted = set(seqs)
                found += [(device_id, seq, idx, h) for seq, idx, h in self._db.execute(
                    "SELECT seq, idx, leaf_hash FROM events WHERE device_id=? AND seq BETWEEN ? AND ?",
                    (device_id, *span)) if seq in wanted]
                continue
            for seq in seqs:
                row = self._db.execute("SELECT idx, leaf_hash FROM events WHERE device_id=? AND seq=?",
                                       (device_id, seq)).fetchone()
                if row is not None:
                    found.append((device_id, seq, row[0], row[1]))
        return found

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        # On SQLITE_FULL or SQLITE_IOERR at COMMIT, SQLite has usually rolled back already: a `ROLLBACK` then
        # raises "no transaction is active" and would replace the disk-full error the caller must see.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def fault_point(self) -> None:
        disk_full_point(self._db)

    def close(self) -> None:
        self._db.close()
