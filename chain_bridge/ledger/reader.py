"""A read-only view of the ledger for threads and tools beside the sequencer (record server, archiver, audits).

Its own connection (SQLite `mode=ro`; PostgreSQL `default_transaction_read_only`): it only ever sees committed
transactions, never a batch mid-append, and never takes the writer lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from chain_bridge.ledger.sql import Database, SqliteLocation, StoreLocation

PAGE = 4096  # leaves read per query


class LedgerReader:
    def __init__(self, location: Path | StoreLocation) -> None:
        self.location: StoreLocation = SqliteLocation(Path(location)) if isinstance(location, (str, Path)) \
            else location
        self._db: Database = self.location.connect_read_only()

    @property
    def transient_errors(self) -> tuple[type[BaseException], ...]:
        """Errors that mean "the store cannot be read now" (a lost connection): try again later."""
        return self._db.transient_errors

    def close(self) -> None:
        self._db.close()

    def size(self) -> int:
        row = self._db.execute("SELECT MAX(idx) FROM entries").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def entry(self, index: int) -> bytes:
        row = self._db.execute("SELECT data FROM entries WHERE idx=?", (index,)).fetchone()
        if row is None:
            raise KeyError(index)
        return bytes(row[0])

    def ciphertext(self, index: int) -> bytes | None:
        """The ciphertext stored with sealed reading `index` (None: not a sealed reading, or pruned)."""
        row = self._db.execute("SELECT ct FROM ciphertexts WHERE idx=?", (index,)).fetchone()
        return bytes(row[0]) if row else None

    def leaves(self, start: int, stop: int) -> Iterator[bytes]:
        while start < stop:
            rows = self._db.execute("SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                                    (start, min(stop, start + PAGE))).fetchall()
            if not rows:
                return
            for idx, data in rows:
                if idx != start:
                    raise RuntimeError(f"ledger entry {start} is missing")
                yield bytes(data)
                start += 1
