"""Injected "disk full" for the fault-injection suite (tests/test_disk_full_bridge.py, the fault table). Test-only.

`CARECHAIN_DISK_FULL_WHILE=<file>` makes every store write that passes a disk-full point fail exactly as
SQLite fails on a full disk (SQLITE_FULL, "database or disk is full", the transaction already rolled back
by SQLite) for as long as `<file>` exists; deleting the file "frees the disk". Tests prefer a real full
filesystem (a small tmpfs they mount) and use this where mounting is not permitted. Unset (always, in
production) a disk-full point costs one comparison.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

__all__ = ["SQLITE_FULL", "disk_full_point"]

SQLITE_FULL = 13
_flag = os.environ.get("CARECHAIN_DISK_FULL_WHILE", "")


def disk_full_point(db: sqlite3.Connection | None = None) -> None:
    """Raise SQLite's disk-full error while the flag file exists, rolling back `db`'s transaction first."""
    if not _flag or not Path(_flag).exists():
        return
    if db is not None and db.in_transaction:
        db.execute("ROLLBACK")  # what SQLite itself does when COMMIT hits SQLITE_FULL
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = SQLITE_FULL
    exc.sqlite_errorname = "SQLITE_FULL"
    raise exc
