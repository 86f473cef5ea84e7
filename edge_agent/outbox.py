"""The durable outbox: signed events wait here (SQLite WAL, synchronous=FULL) until the bridge receipts them.

Invariants:
- A sequence number is reserved, used to sign, and stored in the *same* transaction, so `seq` never
  repeats across crashes and every signed event is on disk before anything is sent.
- An event leaves the outbox only on a verified receipt (`ack`) or a permanent rejection, when it
  moves to the `quarantine` table for the operator — never on PUBACK, never silently.
- Reads are paged (`pending_after`), so memory stays bounded whatever the backlog.
- The file has a size quota. What happens at the quota is the operator's documented choice
  (`QuotaPolicy`), and every event lost to it is counted in the `losses` table and logged — never silent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from carechain.sqlite_store import OUTBOX, check_store

log = logging.getLogger("carechain.agent.outbox")
LOSS_LOG_INTERVAL_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (device_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
    envelope BLOB NOT NULL, created_ms INTEGER NOT NULL, UNIQUE (device_id, seq));
CREATE TABLE IF NOT EXISTS quarantine (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (device_id, seq));
CREATE TABLE IF NOT EXISTS losses (
    device_id TEXT NOT NULL, policy TEXT NOT NULL, events INTEGER NOT NULL,
    first_seq INTEGER, last_seq INTEGER, at_ms INTEGER NOT NULL);
"""


class QuotaPolicy(StrEnum):
    """What the outbox does when it reaches its size quota (agent.outbox_quota_mb)."""

    REFUSE_NEW = "refuse_new"  # keep every signed event; new readings are not signed (counted as lost)
    DROP_OLDEST = "drop_oldest"  # keep the newest; the oldest signed events are deleted (counted, with seqs)


@dataclass(frozen=True)
class Quota:
    max_bytes: int = 2 << 30
    policy: QuotaPolicy = QuotaPolicy.REFUSE_NEW


class OutboxFull(RuntimeError):
    """The quota is reached and the policy is refuse_new: these readings were not signed or stored."""


@dataclass(frozen=True)
class Loss:
    device_id: str
    policy: str
    events: int
    first_seq: int | None
    last_seq: int | None


@dataclass(frozen=True)
class Pending:
    row_id: int
    device_id: str
    seq: int
    envelope: bytes


class Outbox:
    def __init__(self, path: Path, quota: Quota | None = None) -> None:
        self.path = Path(path)
        check_store(self.path, OUTBOX)  # a damaged file is refused, untouched (carechain.sqlite_store)
        self.quota = quota or Quota()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._loss_logged_at: dict[tuple[str, QuotaPolicy], float] = {}
        # Deleting receipted events need not survive a power cut: a delete rolled back by one is resent
        # and deduplicated by the bridge. So acks commit on their own connection without an fsync
        # (WAL + synchronous=NORMAL stays consistent), while signing keeps FULL: a seq must never repeat.
        self._acks = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._acks.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        self._acks.close()
        self._db.close()

    def add(self, device_id: str, sign: Callable[[int], bytes]) -> int:
        """Reserve the next seq for `device_id`, sign with it, and store — one transaction."""
        return self.add_many(device_id, [sign])[0]

    def add_many(self, device_id: str, signers: Iterable[Callable[[int], bytes]]) -> list[int]:
        """Group commit of several events of one device (one fsync for the batch).

        At the quota, refuse_new raises OutboxFull before any seq is reserved (nothing is signed);
        drop_oldest stores the new events and deletes the oldest ones in the same transaction.
        """
        signers = list(signers)
        db = self._db
        if self.quota.policy is QuotaPolicy.REFUSE_NEW and self.used_bytes() >= self.quota.max_bytes:
            self._record_loss(device_id, QuotaPolicy.REFUSE_NEW, len(signers), None, None, commit=True)
            raise OutboxFull(f"{self.path}: outbox quota of {self.quota.max_bytes / (1 << 20):.1f} MB reached; "
                             f"{len(signers)} reading(s) of {device_id} not stored (policy refuse_new)")
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
            if self.quota.policy is QuotaPolicy.DROP_OLDEST:
                self._drop_oldest_over_quota()
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
        """Delete receipted events; returns how many were still here (a re-ack deletes nothing).

        One transaction for the whole receipt, without an fsync (see __init__).
        """
        db = self._acks
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.executemany("DELETE FROM outbox WHERE device_id=? AND seq=?", [(device_id, s) for s in seqs])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return cur.rowcount

    # -- quota -------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of the database in use (pages minus free pages): what the quota measures."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _drop_oldest_over_quota(self) -> None:
        over = self.used_bytes() - self.quota.max_bytes
        if over <= 0:
            return
        # Free a little more than the overshoot (1 % of the quota) so we do not drop on every insert.
        target = over + self.quota.max_bytes // 100
        rows = self._db.execute(
            "SELECT id, device_id, seq, length(envelope) FROM outbox ORDER BY id LIMIT ?",
            (max(16, target // 128),)).fetchall()
        freed, victims = 0, []
        for row in rows:
            victims.append(row)
            freed += row[3] + 64  # envelope plus row and index overhead, roughly
            if freed >= target:
                break
        self._db.executemany("DELETE FROM outbox WHERE id=?", [(r[0],) for r in victims])
        by_device: dict[str, list[int]] = {}
        for _id, dev, seq, _n in victims:
            by_device.setdefault(dev, []).append(seq)
        for dev, seqs in by_device.items():
            self._record_loss(dev, QuotaPolicy.DROP_OLDEST, len(seqs), min(seqs), max(seqs), commit=False)

    def _record_loss(self, device_id: str, policy: QuotaPolicy, events: int, first: int | None,
                     last: int | None, *, commit: bool) -> None:
        if commit:
            self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("INSERT INTO losses VALUES (?,?,?,?,?,?)",
                         (device_id, policy.value, events, first, last, int(time.time() * 1000)))
        if commit:
            self._db.execute("COMMIT")
        now = time.monotonic()
        if now - self._loss_logged_at.get((device_id, policy), -1e9) < LOSS_LOG_INTERVAL_S:
            return  # counted above; the log line repeats at most once a minute per device
        self._loss_logged_at[(device_id, policy)] = now
        where = f" (seq {first}..{last})" if first is not None else ""
        log.error("outbox quota (%.1f MB) reached: %s %d event(s) of %s%s",
                  self.quota.max_bytes / (1 << 20), "refused" if policy is QuotaPolicy.REFUSE_NEW else "dropped oldest",
                  events, device_id, where)

    def losses(self) -> dict[str, int]:
        """Events lost to the quota so far, by policy (persisted across restarts)."""
        rows = self._db.execute("SELECT policy, SUM(events) FROM losses GROUP BY policy").fetchall()
        return {policy: int(n) for policy, n in rows}

    def loss_records(self) -> list[Loss]:
        rows = self._db.execute(
            "SELECT device_id, policy, events, first_seq, last_seq FROM losses ORDER BY rowid").fetchall()
        return [Loss(*r) for r in rows]

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
