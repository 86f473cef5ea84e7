"""Refuse to open a damaged SQLite store: the bridge's ledger and the agent's outbox share this check.

SQLite treats a missing or empty file as a new database, and reports damage only when a query happens to
touch a bad page. For a ledger that would mean silently starting a new log under the same log key (a fork);
for an outbox, silently losing unreceipted events and reusing seqs. So before a store is opened for
writing, `check_store` looks at the file without ever writing to it: the SQLite header (magic, page size,
size in pages against the file's length), then `PRAGMA quick_check` on a read-only connection. Anything
wrong becomes one `StoreCorruptError` whose message names the file, what is wrong and what to do.

A ledger grows without bound and `quick_check` reads all of it (seconds per GB), so `Ledger` asks for it only
up to `OPEN_CHECK_MAX_BYTES`: above that the header check still runs at every open, SQLite reports a damaged
page when a query touches it (a `StoreCorruptError` too), and `carechain verify --full` audits the whole log.
Start-up then stays flat with the log's length (docs/tiles.md).

What this cannot see: bytes changed *inside* a record (quick_check checks structure, not content) and WAL
frames whose checksum fails (SQLite drops those by design, as torn writes). For the ledger, `carechain
verify --full` finds the former from leaf hashes and signatures.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LEDGER", "OUTBOX", "StoreCorruptError", "StoreError", "StoreKind", "check_store", "store_error"]

log = logging.getLogger("carechain.store")
# Largest file `check_store(..., full_check_max_bytes=OPEN_CHECK_MAX_BYTES)` still runs quick_check on (~1 s here).
OPEN_CHECK_MAX_BYTES = 256 << 20
_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100
# SQLite primary result codes (the low byte of an extended code).
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class StoreError(Exception):
    """A store file that cannot be opened; the message says which file, what is wrong and what to do."""


class StoreCorruptError(StoreError):
    """The file is damaged or is not a SQLite database; it was not modified."""


@dataclass(frozen=True)
class StoreKind:
    """What a store file is, for messages, and what its operator should do when it is damaged."""

    name: str
    remedy: str  # may use {path} and {dir}

    def advice(self, path: Path) -> str:
        return self.remedy.format(path=path, dir=path.parent)


LEDGER = StoreKind(
    "ledger",
    "Stop the bridge, restore {path} (with its -wal file, if any) from a backup, then run "
    "`carechain verify --full --data-dir {dir}` before starting the bridge again.",
)
OUTBOX = StoreKind(
    "agent outbox",
    "Stop the agent and restore {path} (with its -wal file, if any) from a backup, or move it aside: a new "
    "outbox starts its seq counters over, the bridge answers the first reused seq with the device's highest "
    "anchored seq and the agent re-signs past it, so only the unreceipted events in the damaged file are lost.",
)


def _damaged(path: Path, kind: StoreKind, problem: str) -> StoreCorruptError:
    return StoreCorruptError(f"{path}: the {kind.name} is damaged: {problem}. carechain has not modified it. "
                             f"{kind.advice(path)}")


def store_error(path: Path, kind: StoreKind, exc: sqlite3.DatabaseError) -> StoreError:
    """Turn a sqlite3 error met while opening or reading a store into a message a user can act on."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if (code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)) or text in (
            "file is not a database", "database disk image is malformed"):
        return _damaged(path, kind, f"SQLite reports {text!r}")
    return StoreError(f"{path}: cannot open the {kind.name}: {text}")


def check_store(path: Path, kind: StoreKind, full_check_max_bytes: int | None = None) -> None:
    """Raise `StoreCorruptError` if the SQLite file at `path` is damaged; a missing file is fine (new store).

    With `full_check_max_bytes`, a larger file gets the header check only (quick_check reads the whole file).

    Never writes to the file. (The read-only connection used for `quick_check` may create the empty
    `-shm`/`-wal` companions SQLite needs to read a WAL database; it changes neither the file nor its WAL.)
    """
    path = Path(path)
    wal = path.with_name(path.name + "-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if not path.exists():
        if wal_size:
            raise _damaged(path, kind, f"the file is missing but its write-ahead log {wal.name} "
                                       f"({wal_size} bytes) is there")
        return
    journal = path.with_name(path.name + "-journal")
    _check_header(path, kind, wal_size or (journal.stat().st_size if journal.exists() else 0))
    size = path.stat().st_size
    if full_check_max_bytes is not None and size > full_check_max_bytes:
        log.info("%s: %.1f GB: header checked; SQLite's quick_check is left to `carechain verify --full` above "
                 "%d MB (it reads the whole file)", path, size / 1e9, full_check_max_bytes >> 20)
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.DatabaseError as exc:
        raise store_error(path, kind, exc) from None
    try:
        rows = db.execute("PRAGMA quick_check(3)").fetchall()
    except sqlite3.DatabaseError as exc:
        raise store_error(path, kind, exc) from None
    finally:
        db.close()
    if rows != [("ok",)]:
        problem = "; ".join(str(r[0]).replace("\n", " ") for r in rows)
        raise _damaged(path, kind, f"SQLite's quick_check found {problem[:300]}")


def _check_header(path: Path, kind: StoreKind, log_size: int) -> None:
    size = path.stat().st_size
    if size == 0:
        # SQLite would take an empty file for a new database; ours always hold a header once created.
        raise _damaged(path, kind, "the file is empty (0 bytes), so it was truncated (if you created it "
                                   "by hand, delete it instead)")
    with path.open("rb") as f:
        header = f.read(_HEADER_SIZE)
    if len(header) < _HEADER_SIZE:
        raise _damaged(path, kind, f"the file is truncated to {size} bytes, less than a SQLite header")
    if header[:16] != _MAGIC:
        what = "zeroed" if not any(header[:16]) else f"{header[:16]!r}"
        raise _damaged(path, kind, f"it is not a SQLite database (its first 16 bytes are {what})")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise _damaged(path, kind, f"its header is damaged (page size {page_size})")
    if log_size:
        # After a crash in the middle of a checkpoint the file may be shorter than its header says while
        # the WAL (or a rollback journal) still holds the pages: SQLite recovers that, and quick_check
        # judges the result.
        return
    if size % page_size:
        raise _damaged(path, kind, f"the file is truncated mid-page ({size} bytes is not a whole number of "
                                   f"{page_size}-byte pages)")
    pages = int.from_bytes(header[28:32], "big")
    pages_valid = header[92:96] == header[24:28] and pages > 0  # "version-valid-for" == change counter
    if pages_valid and size < pages * page_size:
        raise _damaged(path, kind, f"the file is truncated: its header says {pages} pages of {page_size} "
                                   f"bytes, the file holds {size // page_size}")
