"""The durable outbox: signed events wait here (SQLite WAL, synchronous=FULL) until the bridge receipts them.

Invariants:
- A sequence number is reserved, used to sign, and stored in the *same* transaction, so `seq` never
  repeats across crashes and every signed event is on disk before anything is sent.
- An event leaves the outbox only on a verified receipt (`ack`) or a permanent rejection, when it
  moves to the `quarantine` table for the operator — never on PUBACK, never silently.
- Reads are paged (`pending_after`), so memory stays bounded whatever the backlog.
- The file has a size quota. What happens at the quota is the operator's documented choice
  (`QuotaPolicy`), and every event lost to it is counted in the `losses` table and logged — never silent.
- The quota is only as good as the disk under it: before signing, the outbox checks that the filesystem
  keeps `Quota.min_free_bytes` free (room for the losses ledger and SQLite's journal). Below that, and when
  the disk fills anyway (SQLITE_FULL, an I/O error), readings are not signed, and each is counted in
  `losses` (policy `disk_full`; held in memory while even that row cannot be written, and written as soon
  as it can). Nothing already signed is touched, and signing resumes by itself when space returns.
- An `ok` receipt deletes an event only if it names the digest of *our* bytes (`ack_bound`); a receipt
  for other bytes under our seq quarantines ours as `receipt_mismatch`.
- A `seq_reused` refusal with the device's highest anchored seq moves the counter past it and re-signs
  the refused event under a fresh seq (`resign`): a lost or restored outbox costs no readings.
- Protocol 2: a sealed event is stored in its wire form `{"ct", "ev"}`; digests (receipts, quarantine,
  re-signing) are over its COSE_Sign1 part, which is what the bridge anchors and names. The data key of a
  (device, epoch) is stored in `epoch_keys` in the same transaction as its epoch_key event, so the event
  that anchors the capsule always precedes the first reading sealed under the key, and a restart reuses the
  key instead of announcing a second one. Once the epoch is over and none of its events is left here, the
  key is deleted (`forget_spent_keys`, with secure_delete and a truncated WAL): forward secrecy at the device.
- `weekly_activity` tallies the active minutes of a wellness device's activity readings per ISO week, and
  records which weeks' summaries were signed, in the same transaction as the readings and summaries.
- `anchored` keeps each receipted event's leaf index after its row is deleted, until a final checkpoint
  (cosigned by a majority of the ledger's active miners; the bridge says so on receipts, `fin`) covers it:
  `anchored()` and `awaiting_finality()` let a pharmacy terminal wait for finality before handing over an Rx
  drug. Only the newest final rows are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from carechain.disk_full_points import disk_full_point
from carechain.files import make_private
from carechain.sealed import split_wire
from carechain.seq_span import dense_span
from carechain.sqlite_store import OUTBOX, check_store

log = logging.getLogger("carechain.agent.outbox")
LOSS_LOG_INTERVAL_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (device_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
    envelope BLOB NOT NULL, created_ms INTEGER NOT NULL, epoch INTEGER, UNIQUE (device_id, seq));
CREATE TABLE IF NOT EXISTS quarantine (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (device_id, seq));
CREATE TABLE IF NOT EXISTS losses (
    device_id TEXT NOT NULL, policy TEXT NOT NULL, events INTEGER NOT NULL,
    first_seq INTEGER, last_seq INTEGER, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS epoch_keys (
    device_id TEXT NOT NULL, epoch INTEGER NOT NULL, epoch_ms INTEGER NOT NULL, data_key BLOB NOT NULL,
    PRIMARY KEY (device_id, epoch));
-- Epochs whose data key was deleted: a late reading of one (synced from a device's memory) is sealed under
-- the current epoch's key instead, never under a second key announced for a spent epoch.
CREATE TABLE IF NOT EXISTS spent_epochs (
    device_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (device_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS weekly_activity (
    device_id TEXT NOT NULL, week TEXT NOT NULL, active_minutes INTEGER NOT NULL,
    disclosed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (device_id, week));
-- Receipted events, kept after their outbox row is deleted until a final checkpoint covers their leaf (and a
-- few after that), so a terminal can wait for finality before handing over an Rx drug.
CREATE TABLE IF NOT EXISTS anchored (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, leaf_index INTEGER NOT NULL,
    final INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (device_id, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS anchored_final ON anchored (final, leaf_index);
CREATE TABLE IF NOT EXISTS finality (one INTEGER PRIMARY KEY CHECK (one = 1), tree_size INTEGER NOT NULL);
"""
# Added with protocol 2: an outbox written by an older agent gains the column (its rows are all clear, NULL).
_SEALED_MAP = b"\xa2"  # the first byte of `carechain.sealed.encode_sealed`'s map of two keys
_EPOCH_COLUMN = "ALTER TABLE outbox ADD COLUMN epoch INTEGER"
_EPOCH_INDEX = "CREATE INDEX IF NOT EXISTS outbox_epoch ON outbox (device_id, epoch) WHERE epoch IS NOT NULL"


DISK_FULL = "disk_full"  # the `losses` policy of readings not stored because the disk had no room
RECEIPT_MISMATCH = "receipt_mismatch"  # the quarantine reason of an event whose `ok` receipt named other bytes
MIN_FREE_BYTES = 8 << 20
# Final rows kept in `anchored` (newest leaves first) for `anchored()` look-ups; rows not final yet are kept
# up to MAX_ANCHORED in all (then the oldest go: a bridge whose miners never cosign must not fill the disk).
KEEP_FINAL = 1000
MAX_ANCHORED = 100_000
PRUNE_EVERY = 1000  # receipted rows between two prunings when finality does not advance


class QuotaPolicy(StrEnum):
    """What the outbox does when it reaches its size quota (agent.outbox_quota_mb)."""

    REFUSE_NEW = "refuse_new"  # keep every signed event; new readings are not signed (counted as lost)
    DROP_OLDEST = "drop_oldest"  # keep the newest; the oldest signed events are deleted (counted, with seqs)


@dataclass(frozen=True)
class Quota:
    max_bytes: int = 2 << 30
    policy: QuotaPolicy = QuotaPolicy.REFUSE_NEW
    min_free_bytes: int = MIN_FREE_BYTES  # below this much free disk, new readings are refused (disk_full)


class OutboxFull(RuntimeError):
    """The quota is reached and the policy is refuse_new: these readings were not signed or stored."""


class DiskFull(OutboxFull):
    """The disk under the outbox is (nearly) full, or refused a write: these readings were not signed.

    Counted in `losses` as `disk_full`; the outbox is usable again as soon as space returns."""


@dataclass(frozen=True)
class Loss:
    device_id: str
    policy: str
    events: int
    first_seq: int | None
    last_seq: int | None


@dataclass(frozen=True)
class DataKey:
    """The data key of one device's epoch; never logged (repr shows no key)."""

    device_id: str
    epoch: int
    epoch_ms: int
    data_key: bytes = field(repr=False)


@dataclass
class Batch:
    """What one device stores in one transaction: events (each signed with the seq reserved for it, and
    the epoch whose key sealed it, if any), the epoch keys announced by the epoch_key events among them,
    the active minutes to tally per ISO week, and the weeks whose weekly_activity summary is among them."""

    signers: list[Callable[[int], bytes]] = field(default_factory=list)
    epochs: list[int | None] = field(default_factory=list)
    new_keys: list[DataKey] = field(default_factory=list)
    activity_minutes: dict[str, int] = field(default_factory=dict)
    disclosed_weeks: list[str] = field(default_factory=list)

    def add(self, sign: Callable[[int], bytes], epoch: int | None = None) -> None:
        self.signers.append(sign)
        self.epochs.append(epoch)


def wire_digest(wire: bytes) -> bytes:
    """SHA-256 of what the bridge anchors and names in receipts: the COSE_Sign1 of a stored event (the
    whole message for v1 and clear v2 events, the `ev` part of a sealed one). The outbox stores whatever
    its caller signed: only a sealed map (first byte 0xa2, our own encoding) is split."""
    if wire[:1] == _SEALED_MAP:
        wire = split_wire(wire)[0]
    return hashlib.sha256(wire).digest()


@dataclass(frozen=True)
class Pending:
    row_id: int
    device_id: str
    seq: int
    envelope: bytes


@dataclass(frozen=True)
class AnchoredEvent:
    """A receipted event: its leaf index and whether a final checkpoint covers it yet."""

    device_id: str
    seq: int
    leaf_index: int
    final: bool


class Outbox:
    def __init__(self, path: Path, quota: Quota | None = None) -> None:
        self.path = Path(path)
        check_store(self.path, OUTBOX)  # a damaged file is refused, untouched (carechain.sqlite_store)
        self.quota = quota or Quota()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Deleted epoch keys are overwritten in the file, not left on free pages (forward secrecy).
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        if "epoch" not in {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}:
            self._db.execute(_EPOCH_COLUMN)
        self._db.execute(_EPOCH_INDEX)
        make_private(self.path)  # 0600: health data; SQLite gives later -wal/-shm files this mode
        self._page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._loss_logged_at: dict[tuple[str, str], float] = {}
        self._unrecorded: dict[str, int] = {}  # device -> disk_full losses not yet written (no room for the row)
        self._anchored_since_prune = 0
        self._not_final: int | None = None  # rows of `anchored` not final yet, at most (None: count when needed)
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
        batch = Batch()
        for sign in signers:
            batch.add(sign)
        return self.add_batch(device_id, batch)

    def add_batch(self, device_id: str, batch: Batch) -> list[int]:
        """`add_many` for a `Batch`: its events, keys and tallies in one transaction, or none of them."""
        signers = batch.signers
        free, reserve = self.free_disk_bytes(), self.reserve_bytes()
        if free < reserve:
            self._disk_loss(device_id, len(signers), f"{free / (1 << 20):.1f} MB free on the outbox's disk, below "
                                                     f"the {reserve / (1 << 20):.1f} MB kept free")
        if self.quota.policy is QuotaPolicy.REFUSE_NEW and self.used_bytes() >= self.quota.max_bytes:
            self._record_loss(device_id, QuotaPolicy.REFUSE_NEW, len(signers), None, None, commit=True)
            raise OutboxFull(f"{self.path}: outbox quota of {self.quota.max_bytes / (1 << 20):.1f} MB reached; "
                             f"{len(signers)} reading(s) of {device_id} not stored (policy refuse_new)")
        try:
            seqs = self._store(device_id, batch)
        except sqlite3.OperationalError as exc:
            if not is_storage_error(exc):
                raise
            self._disk_loss(device_id, len(signers), f"the disk refused the write ({exc})")  # nothing was stored
        self._flush_unrecorded()
        return seqs

    def _store(self, device_id: str, batch: Batch) -> list[int]:
        db = self._db
        with _transaction(db):
            # Keys first: a signer sealing under a new key may look it up (`data_key`) on this connection.
            db.executemany("INSERT INTO epoch_keys VALUES (?,?,?,?)",
                           [(k.device_id, k.epoch, k.epoch_ms, k.data_key) for k in batch.new_keys])
            row = db.execute("SELECT next_seq FROM counters WHERE device_id=?", (device_id,)).fetchone()
            seq = row[0] if row else 0
            now = int(time.time() * 1000)
            seqs = []
            rows = []
            for sign, epoch in zip(batch.signers, batch.epochs, strict=True):
                rows.append((device_id, seq, sign(seq), now, epoch))
                seqs.append(seq)
                seq += 1
            db.executemany("INSERT INTO outbox (device_id, seq, envelope, created_ms, epoch) VALUES (?,?,?,?,?)",
                           rows)
            db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (device_id, seq))
            db.executemany("INSERT INTO weekly_activity (device_id, week, active_minutes) VALUES (?,?,?) "
                           "ON CONFLICT (device_id, week) DO UPDATE SET active_minutes = active_minutes + "
                           "excluded.active_minutes",
                           [(device_id, week, m) for week, m in batch.activity_minutes.items()])
            db.executemany("UPDATE weekly_activity SET disclosed=1 WHERE device_id=? AND week=?",
                           [(device_id, week) for week in batch.disclosed_weeks])
            if self.quota.policy is QuotaPolicy.DROP_OLDEST:
                self._drop_oldest_over_quota()
        return seqs

    def free_disk_bytes(self) -> int:
        return shutil.disk_usage(self.path.parent).free

    def reserve_bytes(self) -> int:
        """Free space kept on the outbox's filesystem: `min_free_bytes`, at most 5 % of a small disk."""
        return min(self.quota.min_free_bytes, shutil.disk_usage(self.path.parent).total // 20)

    def _disk_loss(self, device_id: str, events: int, why: str) -> NoReturn:
        """Count `events` readings of `device_id` lost to a full disk, say what to do, and raise DiskFull."""
        try:
            self._record_loss(device_id, DISK_FULL, events, None, None, commit=True)
        except sqlite3.OperationalError as exc:  # not even room for the row: keep the count until there is
            if not is_storage_error(exc):
                raise
            self._unrecorded[device_id] = self._unrecorded.get(device_id, 0) + events
            self._log_loss(device_id, DISK_FULL, events, None, None)
        raise DiskFull(f"{self.path}: {why}; {events} reading(s) of {device_id} not signed or stored. "
                       f"Free space on that filesystem (or move agent.data_dir): signing resumes by itself")

    def count_disk_loss(self, device_id: str, events: int) -> None:
        """Count readings not even offered to a full disk (the agent backs off): written with the next write."""
        self._unrecorded[device_id] = self._unrecorded.get(device_id, 0) + events
        self._log_loss(device_id, DISK_FULL, events, None, None)

    def _flush_unrecorded(self) -> None:
        """Write the disk_full losses counted while not even their row fitted (the disk has room again)."""
        while self._unrecorded:
            device_id, events = next(iter(self._unrecorded.items()))
            try:
                self._record_loss(device_id, DISK_FULL, events, None, None, commit=True, log_it=False)
            except sqlite3.OperationalError as exc:
                if not is_storage_error(exc):
                    raise
                return  # still no room: kept, tried again after the next write
            del self._unrecorded[device_id]

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
        with _transaction(db):
            cur = db.executemany("DELETE FROM outbox WHERE device_id=? AND seq=?", [(device_id, s) for s in seqs])
        return cur.rowcount

    def ack_bound(self, device_id: str, acks: Iterable[tuple[int, bytes]]) -> tuple[list[int], list[int]]:
        """Delete the events whose stored bytes have the acknowledged SHA-256 digest.

        Returns (seqs deleted, seqs whose receipt named *other* bytes). Those are moved to quarantine as
        `receipt_mismatch`: the bridge anchored something else under our seq (a clone of this device's
        image or key published first), so ours can never be anchored under it; the caller raises the alarm.
        """
        db = self._acks
        deleted: list[int] = []
        mismatched: list[tuple[int, bytes]] = []
        wanted = dict(acks)
        with _transaction(db):
            for seq, stored in self._envelopes(db, device_id, list(wanted)):
                ours = wire_digest(stored)
                if hmac.compare_digest(ours, wanted[seq]):
                    deleted.append(seq)
                else:
                    mismatched.append((seq, ours))
            db.executemany("DELETE FROM outbox WHERE device_id=? AND seq=?", [(device_id, s) for s in deleted])
        for seq, ours in mismatched:
            self.quarantine(device_id, seq, RECEIPT_MISMATCH,
                            "the bridge acknowledged other bytes under this seq: another holder of this "
                            "device's key or image published first", ours)
        return deleted, [seq for seq, _ in mismatched]

    @staticmethod
    def _envelopes(db: sqlite3.Connection, device_id: str, seqs: list[int]) -> list[tuple[int, bytes]]:
        """(seq, stored bytes) of those of `seqs` still queued (a re-acknowledged one is gone): one range read when
        the seqs are dense, as a receipt's are (a batch message's consecutive events), else one lookup each."""
        span = dense_span(seqs)
        if span is not None:
            wanted = set(seqs)
            return [(seq, env) for seq, env in db.execute(
                "SELECT seq, envelope FROM outbox WHERE device_id=? AND seq BETWEEN ? AND ?", (device_id, *span))
                if seq in wanted]
        found = []
        for seq in seqs:
            row = db.execute("SELECT envelope FROM outbox WHERE device_id=? AND seq=?", (device_id, seq)).fetchone()
            if row is not None:
                found.append((seq, row[0]))
        return found

    # -- finality --------------------------------------------------------------------------------------

    def record_anchored(self, device_id: str, acks: Iterable[tuple[int, int]], final_size: int | None) -> int:
        """Remember receipted (seq, leaf index) pairs until they are final; `final_size` from the receipt. How
        many events are final by this call: those recorded below the final size, and those `final_size` made
        final (counted by the rows written, not by counting the table: a receipt must cost the same whatever
        the outbox holds).

        Without fsync, like acks: a row lost to a power cut only means that event's finality is not shown.
        """
        rows = list(acks)
        final_now = 0
        if rows:
            db = self._acks
            with self._counting_not_final(), _transaction(db):
                final = self._final_size(db)
                marked = [(device_id, seq, index, int(index < final)) for seq, index in rows]
                db.executemany("INSERT OR REPLACE INTO anchored VALUES (?, ?, ?, ?)", marked)
                final_now = sum(row[3] for row in marked)
                if self._not_final is not None:
                    self._not_final += len(marked) - final_now  # a replaced row counts twice: still an upper bound
                self._anchored_since_prune += len(rows)
                if self._anchored_since_prune >= PRUNE_EVERY:
                    self._prune_anchored(db)
        if final_size is not None:
            final_now += self.mark_final(final_size)
        return final_now

    def mark_final(self, tree_size: int) -> int:
        """A checkpoint of `tree_size` leaves is final: mark the events below it; how many became final."""
        db = self._acks
        with self._counting_not_final(), _transaction(db):
            if tree_size <= self._final_size(db):
                return 0
            db.execute("INSERT OR REPLACE INTO finality VALUES (1, ?)", (tree_size,))
            cur = db.execute("UPDATE anchored SET final = 1 WHERE final = 0 AND leaf_index < ?", (tree_size,))
            if self._not_final is not None:
                self._not_final = max(0, self._not_final - cur.rowcount)
            self._prune_anchored(db)
        return cur.rowcount

    def final_size(self) -> int:
        """The tree size of the latest final checkpoint this outbox heard of (0: none)."""
        return self._final_size(self._db)

    def anchored(self, device_id: str, seq: int) -> AnchoredEvent | None:
        """The receipted event (`device_id`, `seq`): its leaf and finality; None if unknown or pruned."""
        row = self._db.execute("SELECT leaf_index, final FROM anchored WHERE device_id=? AND seq=?",
                               (device_id, seq)).fetchone()
        return None if row is None else AnchoredEvent(device_id, seq, row[0], bool(row[1]))

    def awaiting_finality(self, device_id: str | None = None) -> int:
        """Receipted events (of `device_id`, or all) that no final checkpoint covers yet."""
        if device_id is None:
            return self._db.execute("SELECT COUNT(*) FROM anchored WHERE final = 0").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM anchored WHERE final = 0 AND device_id = ?",
                                (device_id,)).fetchone()[0]

    @staticmethod
    def _final_size(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT tree_size FROM finality WHERE one = 1").fetchone()
        return row[0] if row else 0

    def _prune_anchored(self, db: sqlite3.Connection) -> None:
        """Keep the newest KEEP_FINAL final rows, and at most MAX_ANCHORED rows in all (index walks only)."""
        self._anchored_since_prune = 0
        db.execute("DELETE FROM anchored WHERE final = 1 AND leaf_index < (SELECT leaf_index FROM anchored "
                   "WHERE final = 1 ORDER BY leaf_index DESC LIMIT 1 OFFSET ?)", (KEEP_FINAL - 1,))
        # The OFFSET walks up to MAX_ANCHORED index entries (milliseconds): only when there may be that many rows
        # not final (a bridge whose miners stopped cosigning), not at every pruning of a healthy agent.
        limit = MAX_ANCHORED - KEEP_FINAL
        if self._not_final is None or self._not_final > limit:
            db.execute("DELETE FROM anchored WHERE final = 0 AND leaf_index < (SELECT leaf_index FROM anchored "
                       "WHERE final = 0 ORDER BY leaf_index DESC LIMIT 1 OFFSET ?)", (limit - 1,))
            self._not_final = db.execute("SELECT COUNT(*) FROM anchored WHERE final = 0").fetchone()[0]

    @contextlib.contextmanager
    def _counting_not_final(self) -> Iterator[None]:
        """Around a transaction on `anchored`: if it rolls back, the count of rows not final is unknown again."""
        try:
            yield
        except BaseException:
            self._not_final = None
            raise

    def advance(self, device_id: str, highest_anchored: int) -> int:
        """Move the seq counter past `highest_anchored` (never back); returns the next seq."""
        db = self._db
        with _transaction(db):
            nxt = max(self.next_seq(device_id), highest_anchored + 1)
            db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (device_id, nxt))
        return nxt

    def resign(self, device_id: str, seq: int, digest: bytes, highest_anchored: int,
               sign: Callable[[bytes, int], bytes]) -> int | None:
        """Re-sign our event at `seq` (refused as `seq_reused`) under a fresh seq past `highest_anchored`.

        Only when `digest` is that of our stored bytes (as for `quarantine`). `sign(old_envelope, new_seq)`
        returns the new envelope; the old row goes, the new one joins the end of the queue and the counter
        moves past it — one transaction, fsynced, like signing. Returns the new seq, or None.
        """
        db = self._db
        with _transaction(db):
            row = db.execute("SELECT envelope, created_ms, epoch FROM outbox WHERE device_id=? AND seq=?",
                             (device_id, seq)).fetchone()
            if row is None or not hmac.compare_digest(wire_digest(row[0]), digest):
                return None
            counter = db.execute("SELECT next_seq FROM counters WHERE device_id=?", (device_id,)).fetchone()
            new_seq = max(counter[0] if counter else 0, highest_anchored + 1)
            db.execute("DELETE FROM outbox WHERE device_id=? AND seq=?", (device_id, seq))
            db.execute("INSERT INTO outbox (device_id, seq, envelope, created_ms, epoch) VALUES (?,?,?,?,?)",
                       (device_id, new_seq, sign(bytes(row[0]), new_seq), row[1], row[2]))
            db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (device_id, new_seq + 1))
        return new_seq

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

    def _record_loss(self, device_id: str, policy: str, events: int, first: int | None,
                     last: int | None, *, commit: bool, log_it: bool = True) -> None:
        db = self._db
        with _transaction(db) if commit else contextlib.nullcontext():
            db.execute("INSERT INTO losses VALUES (?,?,?,?,?,?)",
                       (device_id, str(policy), events, first, last, int(time.time() * 1000)))
        if log_it:
            self._log_loss(device_id, policy, events, first, last)

    def _log_loss(self, device_id: str, policy: str, events: int, first: int | None, last: int | None) -> None:
        now = time.monotonic()
        if now - self._loss_logged_at.get((device_id, policy), -1e9) < LOSS_LOG_INTERVAL_S:
            return  # counted; the log line repeats at most once a minute per device and policy
        self._loss_logged_at[(device_id, policy)] = now
        where = f" (seq {first}..{last})" if first is not None else ""
        if policy == DISK_FULL:
            log.error("outbox disk full (%s, %.1f MB free): %d reading(s) of %s not signed and counted as lost; "
                      "free space on that filesystem: signing resumes by itself", self.path.parent,
                      self.free_disk_bytes() / (1 << 20), events, device_id)
            return
        log.error("outbox quota (%.1f MB) reached: %s %d event(s) of %s%s",
                  self.quota.max_bytes / (1 << 20), "refused" if policy == QuotaPolicy.REFUSE_NEW else "dropped oldest",
                  events, device_id, where)

    def losses(self) -> dict[str, int]:
        """Events lost to the quota or a full disk so far, by policy (persisted across restarts; with the
        disk_full losses not yet written, which are, as soon as the disk has room)."""
        rows = self._db.execute("SELECT policy, SUM(events) FROM losses GROUP BY policy").fetchall()
        out = {policy: int(n) for policy, n in rows}
        if self._unrecorded:
            out[DISK_FULL] = out.get(DISK_FULL, 0) + sum(self._unrecorded.values())
        return out

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
        with _transaction(db):
            row = db.execute(
                "SELECT envelope FROM outbox WHERE device_id=? AND seq=?", (device_id, seq)
            ).fetchone()
            moved = row is not None and hmac.compare_digest(wire_digest(row[0]), digest)
            if moved:
                db.execute(
                    "INSERT OR REPLACE INTO quarantine VALUES (?,?,?,?,?,?)",
                    (device_id, seq, row[0], reason, detail, int(time.time() * 1000)),
                )
                db.execute("DELETE FROM outbox WHERE device_id=? AND seq=?", (device_id, seq))
        return moved

    # -- protocol 2: epoch keys and weekly activity ------------------------------------------------------

    def data_key(self, device_id: str, epoch: int) -> DataKey | None:
        row = self._db.execute("SELECT epoch_ms, data_key FROM epoch_keys WHERE device_id=? AND epoch=?",
                               (device_id, epoch)).fetchone()
        return None if row is None else DataKey(device_id, epoch, row[0], bytes(row[1]))

    def data_keys(self) -> list[tuple[str, int]]:
        """(device, epoch) of every data key held now."""
        return [(r[0], r[1]) for r in self._db.execute("SELECT device_id, epoch FROM epoch_keys ORDER BY 1, 2")]

    def forget_spent_keys(self, now_ms: int) -> list[tuple[str, int]]:
        """Delete the data key of every epoch that is over and has no event left here (neither waiting for a
        receipt nor to be re-sealed); returns their (device, epoch). The rows are overwritten in the file
        (secure_delete) and the WAL is truncated, so no copy of a spent key stays on the device's disk."""
        spent = "(epoch + 1) * epoch_ms <= ? AND NOT EXISTS (SELECT 1 FROM outbox o WHERE " \
                "o.device_id = epoch_keys.device_id AND o.epoch = epoch_keys.epoch)"
        db = self._db
        if db.execute(f"SELECT 1 FROM epoch_keys WHERE {spent} LIMIT 1", (now_ms,)).fetchone() is None:
            return []
        with _transaction(db):
            gone = [(r[0], r[1]) for r in db.execute(f"SELECT device_id, epoch FROM epoch_keys WHERE {spent}",
                                                     (now_ms,))]
            db.executemany("INSERT OR IGNORE INTO spent_epochs VALUES (?,?)", gone)
            db.execute(f"DELETE FROM epoch_keys WHERE {spent}", (now_ms,))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    def retire_epoch(self, device_id: str, seq: int) -> int | None:
        """The bridge refused our epoch_key at `seq` because another key of its epoch is anchored (this outbox
        was lost or restored): drop that event and its key, and remember the epoch as spent so no reading is
        sealed under it again. Returns the epoch (None if the event is no longer here)."""
        row = self._db.execute("SELECT epoch FROM outbox WHERE device_id=? AND seq=?", (device_id, seq)).fetchone()
        if row is None or row[0] is None:
            return None
        epoch = int(row[0])
        with _transaction(self._db):
            self._db.execute("DELETE FROM outbox WHERE device_id=? AND seq=?", (device_id, seq))
            self._db.execute("DELETE FROM epoch_keys WHERE device_id=? AND epoch=?", (device_id, epoch))
            self._db.execute("INSERT OR IGNORE INTO spent_epochs VALUES (?,?)", (device_id, epoch))
        return epoch

    def epoch_spent(self, device_id: str, epoch: int) -> bool:
        """Whether the device's data key of `epoch` was deleted (its epoch_key is anchored: never announce another)."""
        return self._db.execute("SELECT 1 FROM spent_epochs WHERE device_id=? AND epoch=?",
                                (device_id, epoch)).fetchone() is not None

    def undisclosed_weeks(self, device_id: str, before_week: str) -> list[tuple[str, int]]:
        """(ISO week, active minutes) of the device's tallied weeks before `before_week` whose summary has
        not been signed yet, oldest first ("YYYY-Www" sorts chronologically)."""
        return [(r[0], r[1]) for r in self._db.execute(
            "SELECT week, active_minutes FROM weekly_activity WHERE device_id=? AND week < ? AND disclosed=0 "
            "ORDER BY week", (device_id, before_week))]

    def depth(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def depth_by_device(self) -> dict[str, int]:
        """Events stored and not yet receipted, per device (each device's status report says its own)."""
        return dict(self._db.execute("SELECT device_id, COUNT(*) FROM outbox GROUP BY device_id").fetchall())

    def quarantined(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]

    def next_seq(self, device_id: str) -> int:
        row = self._db.execute("SELECT next_seq FROM counters WHERE device_id=?", (device_id,)).fetchone()
        return row[0] if row else 0


def is_storage_error(exc: sqlite3.Error) -> bool:
    """A write the disk refused (SQLITE_FULL, an I/O error), as opposed to a lock timeout or a bug."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_FULL", "SQLITE_IOERR")) or "disk is full" in str(exc)


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: on SQLITE_FULL and some I/O errors SQLite has already
    rolled it back, and a second ROLLBACK would raise over the error that matters."""
    if db.in_transaction:
        db.execute("ROLLBACK")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: BEGIN IMMEDIATE, then COMMIT — or a rollback that never hides the error.
    Every commit passes a disk-full point (`carechain.disk_full_points`, test-only)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        disk_full_point(db)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
