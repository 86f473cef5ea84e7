"""Where `verify --full` reads a ledger from: the `LogSource` interface, and its SQLite implementation.

The audit (chain_bridge.ledger.integrity) needs the stored log in index order, the stored checkpoints in
size order, and the two tables the bridge consults for every event (the `(device, seq) → leaf` events index
and the devices table), all from one consistent snapshot, since a running bridge keeps appending. A store
backend (SQLite here, PostgreSQL elsewhere) provides them through this interface; bytes are returned as
stored, never interpreted, so a tampered row reaches the audit as it is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from carechain.sqlite_store import LEDGER, check_store


class LogSource(Protocol):
    """A read-only view of one ledger, as of one snapshot taken when the source was opened."""

    def size(self) -> int:
        """How many entries are stored."""

    def entries(self, start: int) -> Iterator[tuple[int, str, bytes, bytes]]:
        """(index, stored type, stored leaf hash, entry bytes) of each stored entry from `start` on, by index."""

    def checkpoints(self, start_size: int) -> Iterator[tuple[int, bytes, str]]:
        """(tree size, stored root hash, signed note) of each stored checkpoint of size ≥ `start_size`, by size."""

    def event_index(self, device_id: str, seq: int) -> int | None:
        """The leaf the events index gives for (device, seq), or None without a row."""

    def event_indexes(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """`event_index` for many (device, seq) at once (one query where a query is a round trip): the pairs
        with a row only."""

    def count_events(self) -> int:
        """Rows in the events index."""

    def devices(self) -> list[tuple[str, bytes, int, int | None]]:
        """(device id, public key, registered leaf, revoked leaf) of each row of the devices table."""

    def close(self) -> None:
        """Release the snapshot and the connection."""


class SqliteLogSource:
    """A ledger.db read through a read-only connection inside one read transaction: never written, and a
    bridge may keep appending while it is read (the source sees the log as it was when it was opened).

    `sqlite3.DatabaseError` escapes from any method on a damaged file; `audit_ledger` turns it into a
    `StoreError` naming the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        check_store(self.path, LEDGER)
        self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                   timeout=30)
        # A tampered row may hold text where bytes belong, or bytes that are not UTF-8: read, never fail here.
        self._db.text_factory = lambda b: b.decode("utf-8", "replace")
        try:
            self._db.execute("BEGIN")
            self._db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()  # the snapshot starts at the first read
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteLogSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def entries(self, start: int) -> Iterator[tuple[int, str, bytes, bytes]]:
        rows = self._db.execute("SELECT idx, CAST(type AS TEXT), COALESCE(CAST(leaf_hash AS BLOB), x''), "
                                "COALESCE(CAST(data AS BLOB), x'') FROM entries WHERE idx >= ? ORDER BY idx",
                                (start,))
        while batch := rows.fetchmany(1024):
            yield from batch

    def checkpoints(self, start_size: int) -> Iterator[tuple[int, bytes, str]]:
        rows = self._db.execute("SELECT tree_size, COALESCE(CAST(root_hash AS BLOB), x''), "
                                "COALESCE(CAST(note AS TEXT), '') FROM checkpoints WHERE tree_size >= ? "
                                "ORDER BY tree_size", (start_size,))
        for size, root, note in rows:
            yield size, bytes(root), note

    def event_index(self, device_id: str, seq: int) -> int | None:
        row = self._db.execute("SELECT idx FROM events WHERE device_id=? AND seq=?", (device_id, seq)).fetchone()
        return row[0] if row else None

    def event_indexes(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        # In process, one primary-key lookup per pair is the fastest (bench/audit_index.py: 2.4 µs each, while an
        # IN (VALUES …) of 400 pairs scanned the table): there is no round trip to save.
        found: dict[tuple[str, int], int] = {}
        for device_id, seq in keys:
            idx = self.event_index(device_id, seq)
            if idx is not None:
                found[device_id, seq] = idx
        return found

    def count_events(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def devices(self) -> list[tuple[str, bytes, int, int | None]]:
        rows = self._db.execute("SELECT device_id, COALESCE(CAST(public_key AS BLOB), x''), registered_idx, "
                                "revoked_idx FROM devices").fetchall()
        return [(d, bytes(pk), reg, rev) for d, pk, reg, rev in rows]
