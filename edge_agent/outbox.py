"""The durable outbox: signed events wait here (SQLite WAL, synchronous=FULL) until the bridge receipts them.

Invariants:
- A sequence number is reserved, used to sign, and stored in the *same* transaction, so `seq` never
  repeats across crashes and every signed event is on disk before anything is sent.
- An event leaves the outbox only on a verified receipt (`ack`) or a permanent rejection, when it
  moves to the `quarantine` table for the operator — never on PUBACK, never silently.
- Reads are paged (`pending_after`), so memory stays bounded whatever the backlog.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (device_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
    envelope BLOB NOT NULL, created_ms INTEGER NOT NULL, UNIQUE (device_id, seq));
CREATE TABLE IF NOT EXISTS quarantine (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (device_id, seq));
"""


@dataclass(frozen=True)
class Pending:
    row_id: int
    device_id: str
    seq: int
    envelope: bytes


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, device_id: str, sign: Callable[[int], bytes]) -> int:
        """Reserve the next seq for `device_id`, sign with it, and store — one transaction."""
        return self.add_many(device_id, [sign])[0]

    def add_many(self, device_id: str, signers: Iterable[Callable[[int], bytes]]) -> list[int]:
        """Group commit of several events of one device (one fsync for the batch)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT next_seq FROM counters WHERE device_id=?", (device_id,)).fetchone()
            seq = row[0] if row else 0
            now = int(time.time() * 1000)
            seqs = []
            rows = []
            for sign in signers:
                rows.append((device_id, seq, sign(seq), now))
                seqs.append(seq)
                seq += 1
            db.executemany("INSERT INTO outbox (device_id, seq, envelope, created_ms) VALUES (?,?,?,?)", rows)
            db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (device_id, seq))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return seqs

    def pending_after(self, row_id: int, limit: int) -> list[Pending]:
        rows = self._db.execute(
            "SELECT id, device_id, seq, envelope FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (row_id, limit)
        ).fetchall()
        return [Pending(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def ack(self, device_id: str, seqs: Iterable[int]) -> int:
        """Delete receipted events; returns how many were still here (a re-ack deletes nothing)."""
        cur = self._db.executemany(
            "DELETE FROM outbox WHERE device_id=? AND seq=?", [(device_id, s) for s in seqs]
        )
        return cur.rowcount

    def quarantine(self, device_id: str, seq: int, reason: str, detail: str, digest: bytes) -> bool:
        """Move a permanently rejected event out of the send queue, keeping it for the operator.

        Only when `digest` is the SHA-256 of *our* stored envelope: a rejection of someone else's
        forgery that happens to carry the same seq must not touch the genuine event.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT envelope FROM outbox WHERE device_id=? AND seq=?", (device_id, seq)
            ).fetchone()
            moved = row is not None and hmac.compare_digest(hashlib.sha256(row[0]).digest(), digest)
            if moved:
                db.execute(
                    "INSERT OR REPLACE INTO quarantine VALUES (?,?,?,?,?,?)",
                    (device_id, seq, row[0], reason, detail, int(time.time() * 1000)),
                )
                db.execute("DELETE FROM outbox WHERE device_id=? AND seq=?", (device_id, seq))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return moved

    def depth(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def quarantined(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]

    def next_seq(self, device_id: str) -> int:
        row = self._db.execute("SELECT next_seq FROM counters WHERE device_id=?", (device_id,)).fetchone()
        return row[0] if row else 0
