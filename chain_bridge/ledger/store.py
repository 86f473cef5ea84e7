"""The ledger store: an append-only Merkle log with its indexes, in SQLite or PostgreSQL.

One `Ledger` owns one store: a SQLite file (WAL, synchronous=FULL; the default) or a PostgreSQL database
shared by several bridge hosts (`chain_bridge.ledger.postgres`). The logic is written once here; what differs
between the engines is behind `chain_bridge.ledger.sql.Database`. Appends happen in batches inside a write
transaction that holds the store's one writer lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL an advisory lock), so
several processes (the bridge and `carechain register`, or several bridge hosts) can append safely: each first
catches its tree up with what another process committed. The tree is stored as C2SP tiles in the `tree_tiles`
table (`chain_bridge.ledger.tree`), written in the same transaction as the entries that made them, so memory
and start-up do not grow with the log; the tree answers for new leaves only after COMMIT succeeds, so a crash
can never leave a root that covers uncommitted leaves.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast

from carechain import envelope
from carechain.checkpoint import Checkpoint, sign_note
from carechain.entries import (
    CONTRACT_ENTRY_TYPES,
    ENTRY_EVENT,
    ENTRY_REGISTER,
    ENTRY_REVOKE,
    PARTY_REGISTER,
    PROTOCOL_CUTOVER,
    SALE_REFUSED,
    STORAGE_COMMIT,
    Entry,
    Registration,
    Revocation,
)
from carechain.events import SEALED_KINDS
from carechain.identity import Identity, device_id_for
from carechain.merkle import leaf_hash
from carechain.sqlite_store import LEDGER, StoreCorruptError
from chain_bridge.ledger.dedup import Anchored, Conflict, Dedup, Duplicate
from chain_bridge.ledger.sql import Database, SqliteLocation, StoreLocation
from chain_bridge.ledger.tree import TILES_SCHEMA, SqlTileStore, StoredTree, TileRow, build_tiles

if TYPE_CHECKING:
    from carechain.config import BridgeConfig

log = logging.getLogger("carechain.bridge.ledger")
SCHEMA_VERSION = 1
# One schema for both engines; {blob}, {int}, {serial} and {without_rowid} are each engine's types
# (chain_bridge.ledger.sql.schema_for).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx {int} PRIMARY KEY, type TEXT NOT NULL, leaf_hash {blob} NOT NULL, data {blob} NOT NULL,
    appended_ms {int} NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    device_id TEXT NOT NULL, seq {int} NOT NULL, idx {int} NOT NULL, leaf_hash {blob} NOT NULL,
    PRIMARY KEY (device_id, seq)) {without_rowid};
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, public_key {blob} NOT NULL UNIQUE, profile TEXT NOT NULL,
    owner TEXT NOT NULL, site TEXT NOT NULL, registered_idx {int} NOT NULL, revoked_idx {int});
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size {int} PRIMARY KEY, root_hash {blob} NOT NULL, note TEXT NOT NULL, issued_ms {int} NOT NULL);
CREATE TABLE IF NOT EXISTS contract_snapshots (
    tree_size {int} PRIMARY KEY, genesis_hash {blob} NOT NULL, state {blob} NOT NULL, taken_ms {int} NOT NULL);
CREATE TABLE IF NOT EXISTS ciphertexts (
    idx {int} PRIMARY KEY, dev TEXT NOT NULL, seq {int} NOT NULL, epoch {int} NOT NULL, ct {blob} NOT NULL);
CREATE INDEX IF NOT EXISTS ciphertexts_by_epoch ON ciphertexts (dev, epoch);
CREATE TABLE IF NOT EXISTS archive_epochs (
    dev TEXT NOT NULL, epoch {int} NOT NULL, owner TEXT NOT NULL, epoch_ms {int} NOT NULL, idx {int} NOT NULL,
    PRIMARY KEY (dev, epoch)) {without_rowid};
CREATE TABLE IF NOT EXISTS archives (
    id {serial}, owner TEXT NOT NULL, epoch {int} NOT NULL, dataset_id TEXT NOT NULL UNIQUE,
    planned_size {int} NOT NULL, planned_ms {int} NOT NULL, readings {int} NOT NULL, bytes {int} NOT NULL,
    manifest TEXT, stored_ms {int}, commit_idx {int}, pruned_ms {int});
CREATE TABLE IF NOT EXISTS archived (
    idx {int} PRIMARY KEY, archive {int} NOT NULL, dev TEXT NOT NULL, epoch {int} NOT NULL,
    ct_len {int} NOT NULL);
CREATE INDEX IF NOT EXISTS archived_by_archive ON archived (archive);
CREATE INDEX IF NOT EXISTS archived_by_epoch ON archived (dev, epoch);
"""
# The archive tables (chain_bridge/archiver.py): `archive_epochs` is the (device, epoch) → owner and epoch length
# of each epoch_key event (scanned from the log up to meta ARCHIVE_SCANNED); `archives` is one storage dataset
# holding a bundle of ciphertexts of one (owner, epoch), from its plan to its commit leaf and the pruning of the
# bridge's own copy; `archived` names the archive of each ciphertext in it (and stays after the prune, so the
# record server knows where a pruned ciphertext lives).
ARCHIVE_SCANNED = "archive_scanned"
# meta key: the tree size from which v1 readings of sealed kinds are refused (the protocol.cutover).
RETIRE_V1_AFTER = "retire_v1_after"


class LedgerError(Exception):
    pass


class ArchiveConflict(LedgerError):
    """Someone else's `storage.commit` took an archive's dataset id: the archive must be planned anew."""


class EventCandidate(NamedTuple):
    """A verified event ready to append; the ledger decides new / duplicate / seq reused.

    A named tuple, not a dataclass: one is built per event in the ingest workers and crosses the process boundary
    to the sequencer, where building and unpickling a frozen dataclass cost about three times as much."""

    device_id: str
    seq: int
    leaf: bytes  # encoded Entry
    digest: bytes = b""  # SHA-256 of the event bytes, echoed on a rejection receipt
    kind: str = ""  # the event's kind: the contract gate looks at purchases only
    version: int = 1  # the payload's `v`: v1 readings of sealed kinds are refused after the cutover
    ct: bytes | None = None  # a sealed reading's ciphertext (its hash checked), stored with its leaf
    epoch: int | None = None  # a sealed reading's epoch
    ts: int | None = None  # the device time (ms) it was signed at: the sign→receipt latency metric


@dataclass(frozen=True)
class Appended:
    index: int
    duplicate: bool = False


@dataclass(frozen=True)
class DeviceRevoked:
    """The device was revoked (at leaf `index`) by a commit the caller had not seen: nothing appended."""

    index: int


@dataclass(frozen=True)
class SaleRefused:
    """The contracts refused the sale: leaf `index` is the `sale.refused` entry that records it and why
    (None: the contracts could not even count it, so nothing was appended)."""

    index: int | None
    reason: str


@dataclass(frozen=True)
class Admission:
    """A gate's answer for one event: contract entries to append first (`before`: the bridge's `clock.attest`),
    then the event itself, or `instead` of it another entry (a `sale.refused`)."""

    before: tuple[Entry, ...] = ()
    instead: Entry | None = None
    refused: str | None = None  # refuse the event for this reason without a leaf (`before` still goes in)


class EventGate(Protocol):
    """Decides under the ledger's write lock, in log order, whether each new event goes in as it is.

    `append_events` calls `catch_up(ledger)` once the lock is held (the gate reads the committed leaves it
    has not seen yet, `ledger.leaves(start)`), then `admit(index, candidate)` for each new event in order,
    `index` being the next leaf: None appends the event, an `Entry` of another type is appended in its place
    (a `sale.refused`), an `Admission` may also put entries before it; the gate now counts all those leaves
    as seen. A string refuses the event (that reason) without a leaf. `abort()` says the transaction rolled
    back.
    """

    def catch_up(self, ledger: Ledger) -> None: ...

    def admit(self, index: int, candidate: EventCandidate) -> Admission | Entry | str | None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class VersionRetired:
    """A v1 reading of a sealed kind that would land at or after the cutover's tree size: nothing appended."""

    retire_v1_after: int


@dataclass(frozen=True)
class SeqReused:
    """The (device, seq) is already anchored with *different* content at `index`."""

    index: int


# What `Ledger.append_events` says of each candidate, in order.
AppendResult = Appended | SeqReused | DeviceRevoked | SaleRefused | VersionRetired


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    public_key: bytes
    profile: str
    owner: str
    site: str
    registered_idx: int
    revoked_idx: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_idx is not None


_F = TypeVar("_F", bound=Callable[..., Any])


def _exclusive(method: _F) -> _F:
    """Run a write of the ledger under its tree lock: another thread's `refresh()` on this (shared) connection
    would otherwise read the transaction's uncommitted rows into the tree."""
    @functools.wraps(method)
    def locked(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        with self._tree_lock:
            return method(self, *args, **kwargs)
    return cast(_F, locked)


class Ledger:
    def __init__(self, location: Path | StoreLocation) -> None:
        """Open (creating on first use) the ledger at `location`: a SQLite file path, or a `StoreLocation`
        (`open_ledger` picks the one the config names)."""
        self.location: StoreLocation = SqliteLocation(Path(location)) if isinstance(location, (str, Path)) \
            else location
        self._db: Database = self.location.connect()
        try:
            self._db.create_schema(_SCHEMA + TILES_SCHEMA)
            version = self._meta("schema_version")
            if version is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
                                 (str(SCHEMA_VERSION),))
            elif int(version) != SCHEMA_VERSION:
                raise LedgerError(f"{self.describe()}: schema version {version}, this carechain reads "
                                  f"{SCHEMA_VERSION}")
            self._tiles = SqlTileStore(self._db)
            self.tree = StoredTree(self._tiles)  # in memory: the size, the right edge and a small tile cache
            self._tree_lock = threading.RLock()
            self._build_missing_tiles()
        except BaseException as exc:
            self._db.close()
            failure = self._db.open_failed(exc)
            if failure is None:
                raise
            raise failure from None

    @property
    def path(self) -> Path:
        """The SQLite file (features that open it by path); a PostgreSQL ledger has none: `LedgerError`."""
        if isinstance(self.location, SqliteLocation):
            return self.location.path
        raise LedgerError(f"the ledger at {self.describe()} is not a file: this feature needs the SQLite store")

    @property
    def transient_errors(self) -> tuple[type[BaseException], ...]:
        """Errors that mean "the store cannot be written now" (disk full, connection lost): retry the batch."""
        return self._db.transient_errors

    def describe(self) -> str:
        """Where the ledger is, for messages: its file, or its database (without a password)."""
        return self._db.describe()

    def close(self) -> None:
        self._db.close()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _catch_up(self) -> None:
        """Load leaf hashes appended (by us earlier, or by another process) beyond the in-memory tree.

        The only way the tree grows: every append re-reads its own committed rows through here (never extends
        the tree by what it meant to write), under a lock, so a `refresh()` from another thread between an
        append's COMMIT and its return can never count the same leaves twice.
        """
        with self._tree_lock:
            self._catch_up_locked()

    def _catch_up_locked(self) -> None:
        self.tree.reload()  # the tiles commit with the entries: the stored size is the committed log's

    def _commit(self) -> None:
        """COMMIT the open write transaction together with the tree tiles of the entries it appended, so that
        tiles are never ahead of nor behind the entries; the tree answers for them only once committed."""
        with self._tree_lock:
            try:
                self.tree.reload()  # under the writer lock: the committed size, whoever appended last
                hashes = list(self._leaf_hashes(self.tree.size, None))
                if hashes:
                    self._tiles.write(self.tree.stage(hashes))
                self._db.commit()
            except BaseException:
                self.tree.abort()
                raise
            self.tree.commit()

    def _leaf_hashes(self, start: int, stop: int | None, page: int = 1 << 16) -> Iterator[bytes]:
        """The stored leaf hashes from `start` (to `stop`, or the end), in order, a page at a time."""
        while stop is None or start < stop:
            limit = page if stop is None else min(page, stop - start)
            rows = self._db.execute("SELECT idx, leaf_hash FROM entries WHERE idx >= ? ORDER BY idx LIMIT ?",
                                    (start, limit)).fetchall()
            for idx, h in rows:
                if idx != start:
                    raise _missing_entry(self.location, start, f"the next stored is {idx}")
                yield bytes(h)
                start += 1
            if len(rows) < limit:
                return

    def _build_missing_tiles(self) -> None:
        """Build the tree tiles of leaves stored before the ledger kept them (once, resumable), then open."""
        row = self._db.execute("SELECT MAX(idx) FROM entries").fetchone()
        count = 0 if row is None or row[0] is None else int(row[0]) + 1
        if count < self.tree.size:
            raise _missing_entry(self.location, count, f"the tree tiles cover {self.tree.size} leaves")
        if count == self.tree.size:
            return
        log.info("%s: building the tree tiles of leaves %d..%d from the entries (once)", self.describe(),
                 self.tree.size, count - 1)

        def in_transaction(rows: list[TileRow]) -> None:
            self._db.begin()
            try:
                self._tiles.write(rows)
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

        build_tiles(self.tree, self._leaf_hashes(self.tree.size, count), in_transaction,
                    progress=lambda size: log.info("%s: tree tiles built for %d of %d leaves", self.describe(),
                                                   size, count))

    @property
    def size(self) -> int:
        return self.tree.size

    def refresh(self) -> int:
        """Take in the entries another process appended (contract commands on the bridge host); the new size."""
        self._catch_up()
        return self.tree.size

    # -- appends -------------------------------------------------------------------------------------

    @_exclusive
    def append_events(self, candidates: Sequence[EventCandidate], gate: EventGate | None = None
                      ) -> list[AppendResult]:
        """Append new events in one durable transaction; duplicates get their original index back.

        Revocation is re-checked under the write lock: another process (`carechain` revoking a device)
        may have committed one after the caller last loaded the registry. With a `gate` (the contracts),
        an event it refuses is appended as the entry it returns, and its (device, seq) row points there,
        so a resend gets `Refused` again; entries the gate puts before an event (the bridge's `clock.attest`)
        go in just before it, in the same transaction. A sealed reading's ciphertext goes into `ciphertexts`
        in the same transaction as its leaf: no receipt ever names a leaf whose ciphertext is lost. A new v1 reading
        of a sealed kind whose index would reach the cutover (`protocol.cutover`) is `VersionRetired`
        (a resend of one anchored earlier is still re-acknowledged).
        """
        results: list[AppendResult] = []
        new_hashes: list[bytes] = []
        now = _now_ms()
        db = self._db
        db.begin()
        try:
            self._catch_up()
            if gate is not None:
                gate.catch_up(self)
            next_idx = self.tree.size
            anchored = self._anchored_among({(c.device_id, c.seq) for c in candidates})
            dedup = Dedup(lambda device_id, seq: anchored.get((device_id, seq)))
            refused_in_batch: dict[int, str] = {}
            rows_entries = []
            rows_events = []
            rows_ciphertexts = []
            retire = self.retire_v1_after()
            revoked: dict[str, int] = dict(db.execute(
                "SELECT device_id, revoked_idx FROM devices WHERE revoked_idx IS NOT NULL").fetchall())
            for c in candidates:
                if c.device_id in revoked:
                    results.append(DeviceRevoked(revoked[c.device_id]))
                    continue
                h = leaf_hash(c.leaf)
                seen = dedup.check(c.device_id, c.seq, h)
                if isinstance(seen, Duplicate):
                    results.append(Appended(seen.index, duplicate=True))
                    continue
                if isinstance(seen, Conflict):
                    reason = refused_in_batch.get(seen.index) or self._refusal_of(seen.index, c.leaf)
                    results.append(SeqReused(seen.index) if reason is None else SaleRefused(seen.index, reason))
                    continue
                idx = next_idx + len(new_hashes)
                if retire is not None and idx >= retire and c.version == 1 and c.kind in SEALED_KINDS:
                    results.append(VersionRetired(retire))
                    continue
                admitted = gate.admit(idx, c) if gate is not None else None
                if isinstance(admitted, str):
                    results.append(SaleRefused(None, admitted))
                    continue
                before, instead, refused = _admission(admitted)
                for extra in before:  # in the gate's order, just before the event (a clock.attest)
                    extra_data = extra.encode()
                    new_hashes.append(leaf_hash(extra_data))
                    rows_entries.append((idx, extra.type, new_hashes[-1], extra_data, now))
                    idx += 1
                if refused is not None:
                    results.append(SaleRefused(None, refused))
                    continue
                entry_type, data = (ENTRY_EVENT, c.leaf) if instead is None else (instead.type, instead.encode())
                h = leaf_hash(data) if instead is not None else h
                new_hashes.append(h)
                dedup.remember(c.device_id, c.seq, Anchored(idx, h))
                rows_entries.append((idx, entry_type, h, data, now))
                rows_events.append((c.device_id, c.seq, idx, h))
                if instead is None and c.ct is not None:
                    rows_ciphertexts.append((idx, c.device_id, c.seq, c.epoch, c.ct))
                if instead is None:
                    results.append(Appended(idx))
                else:
                    reason = _refusal_reason(data) or "refused"
                    refused_in_batch[idx] = reason
                    results.append(SaleRefused(idx, reason))
            db.insert_rows("entries", rows_entries)  # group commit: one transaction, bulk inserts (COPY)
            db.insert_rows("events", rows_events)
            db.insert_rows("ciphertexts", rows_ciphertexts)
            db.fault_point()
            self._commit()
        except BaseException:
            if gate is not None:
                gate.abort()  # first: whatever the rollback does, the gate must not trust leaves it admitted
            db.rollback()
            raise
        self._catch_up()
        return results

    def _anchored_among(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Anchored]:
        """Dedup's `EventIndex` for one batch: where the committed log holds each (device, seq) it holds.
        Read inside the append transaction, in a few queries per batch (not one per event: on a database
        server the round trips would dominate)."""
        return {(device_id, int(seq)): Anchored(int(idx), bytes(h))
                for device_id, seq, idx, h in self._db.events_among(list(keys))}

    def _refusal_of(self, index: int, event_leaf: bytes) -> str | None:
        """The reason, if leaf `index` is a `sale.refused` wrapping exactly this event; else None."""
        row = self._db.execute("SELECT type, data FROM entries WHERE idx=?", (index,)).fetchone()
        if row is None or row[0] != SALE_REFUSED:
            return None
        payload = _entry_payload(bytes(row[1]))
        if payload is None or payload.get("event") != Entry.decode(event_leaf).cose:
            return None
        return payload.get("reason")

    @_exclusive
    def append_entries(self, entries: Sequence[Entry]) -> list[int]:
        """Append contract entries (`party.register`, `rx.anchor`, …) in one durable transaction.

        All or nothing; returns their leaf indexes. Whether the contracts accept them is the caller's
        check (`Runtime.check` on a replay of the log), done before calling this. A `protocol.cutover`
        also records, in the same transaction, the tree size from which `append_events` refuses v1
        readings: it reads it under the write lock, so the bridge applies it from its next batch on,
        whichever process appended the entry.
        """
        for i, entry in enumerate(entries):
            if entry.type not in CONTRACT_ENTRY_TYPES or entry.type == SALE_REFUSED:
                raise LedgerError(f"entry {i} is a {entry.type}: only contract entries (not sale.refused, which "
                                  "the bridge appends in place of a sale) go through append_entries")
        db = self._db
        now = _now_ms()
        db.begin()
        try:
            self._catch_up()
            first = self.tree.size
            hashes: list[bytes] = []
            for i, entry in enumerate(entries):
                data = entry.encode()
                hashes.append(leaf_hash(data))
                db.execute("INSERT INTO entries VALUES (?,?,?,?,?)", (first + i, entry.type, hashes[-1], data, now))
                if entry.type == PROTOCOL_CUTOVER:
                    self._record_cutover(first + i, entry)
            self._commit()
        except BaseException:
            db.rollback()
            raise
        self._catch_up()
        return list(range(first, first + len(hashes)))

    @_exclusive
    def append_registrations(self, items: Iterable[tuple[Entry, Registration]]) -> list[int]:
        """Append device registrations atomically: all or none. Raises on an already-registered key."""
        items = list(items)
        db = self._db
        now = _now_ms()
        db.begin()
        try:
            self._catch_up()
            hashes: list[bytes] = []
            for i, (entry, reg) in enumerate(items):
                if entry.type != ENTRY_REGISTER:
                    raise LedgerError(f"entry {i} is a {entry.type}, not a registration")
                row = db.execute(
                    "SELECT device_id, registered_idx FROM devices WHERE device_id=? OR public_key=?",
                    (reg.dev, reg.pk),
                ).fetchone()
                if row:
                    raise LedgerError(f"device {reg.dev} is already registered (leaf {row[1]})")
                idx = self.tree.size + len(hashes)
                data = entry.encode()
                h = leaf_hash(data)
                hashes.append(h)
                db.execute("INSERT INTO entries VALUES (?,?,?,?,?)", (idx, entry.type, h, data, now))
                db.execute(
                    "INSERT INTO devices VALUES (?,?,?,?,?,?,NULL)",
                    (reg.dev, reg.pk, reg.profile, reg.owner, reg.site, idx),
                )
            self._bump_registry_version()
            first = self.tree.size
            self._commit()
        except BaseException:
            db.rollback()
            raise
        self._catch_up()
        return list(range(first, first + len(hashes)))

    @_exclusive
    def append_revocation(self, entry: Entry, rev: Revocation) -> int:
        if entry.type != ENTRY_REVOKE:
            raise LedgerError(f"entry is a {entry.type}, not a revocation")
        db = self._db
        db.begin()
        try:
            self._catch_up()
            row = db.execute("SELECT revoked_idx FROM devices WHERE device_id=?", (rev.dev,)).fetchone()
            if row is None:
                raise LedgerError(f"device {rev.dev} is not registered")
            if row[0] is not None:
                raise LedgerError(f"device {rev.dev} was already revoked at leaf {row[0]}")
            idx = self.tree.size
            data = entry.encode()
            h = leaf_hash(data)
            db.execute("INSERT INTO entries VALUES (?,?,?,?,?)", (idx, entry.type, h, data, _now_ms()))
            db.execute("UPDATE devices SET revoked_idx=? WHERE device_id=?", (idx, rev.dev))
            self._bump_registry_version()
            self._commit()
        except BaseException:
            db.rollback()
            raise
        self._catch_up()
        return idx

    def _record_cutover(self, index: int, entry: Entry) -> None:
        """Remember the `protocol.cutover` (inside the caller's transaction). As the contracts do, refuse a
        second one and one that reaches back into the log: the whole append then rolls back."""
        try:
            payload = envelope.parse(entry.cose).payload
        except envelope.EnvelopeError as exc:
            raise LedgerError(f"protocol.cutover at leaf {index} is not a signed entry: {exc}") from None
        retire = payload.get("retire_v1_after") if isinstance(payload, dict) else None
        if type(retire) is not int or retire <= index:
            raise LedgerError(f"protocol.cutover at leaf {index}: retire_v1_after must be a tree size after it")
        if (already := self.retire_v1_after()) is not None:
            raise LedgerError(f"protocol.cutover at leaf {index}: the log already retires v1 from {already}")
        self._db.execute("INSERT INTO meta VALUES (?, ?)", (RETIRE_V1_AFTER, str(retire)))

    def retire_v1_after(self) -> int | None:
        """The tree size from which v1 readings of sealed kinds are refused, once a cutover is on the ledger."""
        value = self._meta(RETIRE_V1_AFTER)
        return None if value is None else int(value)

    def ciphertext(self, index: int) -> bytes | None:
        """The ciphertext stored with sealed reading `index` (None: not a sealed reading, or pruned)."""
        row = self._db.execute("SELECT ct FROM ciphertexts WHERE idx=?", (index,)).fetchone()
        return bytes(row[0]) if row else None

    # -- archives (chain_bridge/archiver.py; the caller holds the bridge's ledger lock) ----------------

    def archive_scanned(self) -> int:
        """How many leaves the archiver has scanned for epoch_key events."""
        return int(self._meta(ARCHIVE_SCANNED) or 0)

    @_exclusive
    def record_epoch_keys(self, rows: Iterable[tuple[str, int, str, int, int]], scanned: int) -> None:
        """Remember (dev, epoch, owner, epoch_ms, leaf) of epoch_key events (the first one of a (dev, epoch)
        wins, as in the contracts) and that the log was scanned up to `scanned` leaves; one transaction."""
        db = self._db
        db.begin()
        try:
            db.executemany("INSERT INTO archive_epochs VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING", rows)
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (ARCHIVE_SCANNED, str(scanned)))
            self._commit()
        except BaseException:
            db.rollback()
            raise

    @_exclusive
    def plan_archive(self, owner: str, epoch: int, dataset_id: str, members: Sequence[tuple[int, str, int, int]],
                     now_ms: int) -> int:
        """Record a new archive of `members` ((idx, dev, epoch, ct length) of stored ciphertexts) before any of
        it is uploaded; its id. A ciphertext already in another archive, or one no longer stored, is an error
        and nothing is recorded."""
        db = self._db
        db.begin()
        try:
            archive = int(db.execute("INSERT INTO archives (owner, epoch, dataset_id, planned_size, planned_ms, "
                                     "readings, bytes) VALUES (?,?,?,?,?,?,?) RETURNING id",
                                     (owner, epoch, dataset_id, self.tree.size, now_ms, len(members),
                                      sum(m[3] for m in members))).fetchone()[0])
            db.executemany("INSERT INTO archived VALUES (?,?,?,?,?)",
                           [(idx, archive, dev, ep, n) for idx, dev, ep, n in members])
            stored = db.execute("SELECT COUNT(*) FROM ciphertexts c JOIN archived a ON a.idx = c.idx "
                                "WHERE a.archive=?", (archive,)).fetchone()[0]
            if stored != len(members):
                raise LedgerError(f"archive of {owner} epoch {epoch}: {len(members) - stored} of its ciphertexts "
                                  "are not stored")
            self._commit()
        except db.integrity_errors as exc:
            db.rollback()
            raise LedgerError(f"archive of {owner} epoch {epoch}: a ciphertext is already archived ({exc})") from None
        except BaseException:
            db.rollback()
            raise
        return archive

    def store_archive(self, archive: int, manifest: str, now_ms: int) -> None:
        """The archive's dataset is uploaded: keep its manifest (JSON)."""
        self._db.execute("UPDATE archives SET manifest=?, stored_ms=? WHERE id=? AND commit_idx IS NULL",
                         (manifest, now_ms, archive))

    @_exclusive
    def drop_archive(self, archive: int) -> None:
        """Forget an archive that was never committed (its ciphertexts become unarchived again)."""
        db = self._db
        db.begin()
        try:
            row = db.execute("SELECT commit_idx FROM archives WHERE id=?", (archive,)).fetchone()
            if row is not None and row[0] is not None:
                raise LedgerError(f"archive {archive} is committed at leaf {row[0]}: it is never dropped")
            db.execute("DELETE FROM archived WHERE archive=?", (archive,))
            db.execute("DELETE FROM archives WHERE id=?", (archive,))
            self._commit()
        except BaseException:
            db.rollback()
            raise

    @_exclusive
    def commit_archive(self, archive: int, entry: Entry) -> int:
        """Append the archive's `storage.commit` and record its leaf, in one transaction; the leaf index.

        The contracts bind a dataset id to the key of its first commit. The id is random and first shown to
        the storage miners at upload, after the plan, so only a commit appended since the plan can have taken
        it: if one names it, `ArchiveConflict` (nothing appended; drop the archive and plan again).
        """
        if entry.type != STORAGE_COMMIT:
            raise LedgerError(f"entry is a {entry.type}, not a {STORAGE_COMMIT}")
        db = self._db
        db.begin()
        try:
            self._catch_up()
            row = db.execute("SELECT dataset_id, planned_size, commit_idx FROM archives WHERE id=?",
                             (archive,)).fetchone()
            if row is None:
                raise LedgerError(f"no archive {archive}")
            dataset_id, planned_size, committed = row
            if committed is not None:
                raise LedgerError(f"archive {archive} is already committed at leaf {committed}")
            for idx, data in db.execute("SELECT idx, data FROM entries WHERE type=? AND idx >= ?",
                                        (STORAGE_COMMIT, planned_size)).fetchall():
                payload = _entry_payload(bytes(data))
                if payload is not None and payload.get("dataset_id") == dataset_id:
                    raise ArchiveConflict(f"dataset id {dataset_id} was committed by someone else at leaf {idx}")
            idx = self.tree.size
            data = entry.encode()
            h = leaf_hash(data)
            db.execute("INSERT INTO entries VALUES (?,?,?,?,?)", (idx, entry.type, h, data, _now_ms()))
            db.execute("UPDATE archives SET commit_idx=? WHERE id=?", (idx, archive))
            db.fault_point()
            self._commit()
        except BaseException:
            db.rollback()
            raise
        self._catch_up()
        return idx

    @_exclusive
    def prune_archive(self, archive: int, now_ms: int) -> int:
        """Delete the bridge's own copy of the ciphertexts of a committed archive; how many were deleted.
        The leaves (and so the ciphertext hashes) stay; `archived` keeps naming where each ciphertext lives."""
        db = self._db
        db.begin()
        try:
            row = db.execute("SELECT commit_idx, manifest FROM archives WHERE id=?", (archive,)).fetchone()
            if row is None or row[0] is None or row[1] is None:
                raise LedgerError(f"archive {archive} is not stored and committed: nothing of it is pruned")
            deleted = db.execute("DELETE FROM ciphertexts WHERE idx IN (SELECT idx FROM archived WHERE archive=?)",
                                 (archive,)).rowcount
            db.execute("UPDATE archives SET pruned_ms=? WHERE id=?", (now_ms, archive))
            db.fault_point()
            self._commit()
        except BaseException:
            db.rollback()
            raise
        return int(deleted)

    # -- reads ---------------------------------------------------------------------------------------

    def devices(self) -> dict[str, DeviceRecord]:
        rows = self._db.execute("SELECT * FROM devices").fetchall()
        return {r[0]: DeviceRecord(r[0], bytes(r[1]), *r[2:]) for r in rows}

    def registry_version(self) -> int:
        """A counter bumped (in the same transaction) by every registration and revocation."""
        return int(self._meta("registry_version") or 0)

    def _bump_registry_version(self) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES ('registry_version', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)"
        )

    def registered_parties(self) -> dict[str, str]:
        """party id → role of every `party.register` on the log (the contracts checked each before it was
        appended, and refuse a second one for a key, so the first one counts)."""
        parties: dict[str, str] = {}
        for (data,) in self._db.execute("SELECT data FROM entries WHERE type=? ORDER BY idx", (PARTY_REGISTER,)):
            try:
                payload = envelope.parse(Entry.decode(bytes(data)).cose).payload
            except (ValueError, envelope.EnvelopeError):
                continue
            if not isinstance(payload, dict):
                continue
            pk, role = payload.get("pk"), payload.get("role")
            if isinstance(pk, bytes) and len(pk) == 32 and isinstance(role, str):
                parties.setdefault(device_id_for(pk), role)
        return parties

    def last_seq(self, device_id: str) -> int | None:
        row = self._db.execute("SELECT MAX(seq) FROM events WHERE device_id=?", (device_id,)).fetchone()
        return row[0]

    def event_index(self, device_id: str, seq: int) -> int | None:
        row = self._db.execute(
            "SELECT idx FROM events WHERE device_id=? AND seq=?", (device_id, seq)
        ).fetchone()
        return row[0] if row else None

    def entry(self, index: int) -> bytes:
        row = self._db.execute("SELECT data FROM entries WHERE idx=?", (index,)).fetchone()
        if row is None:
            raise LedgerError(f"no entry at index {index} (log size {self.size})")
        return bytes(row[0])

    def leaves(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The committed leaves from index `start` (up to `stop`, exclusive), in order, in batches."""
        end = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] if stop is None else stop
        while start < end:
            rows = self._db.execute("SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                                    (start, min(end, start + 4096))).fetchall()
            for idx, data in rows:
                if idx != start:
                    raise _missing_entry(self.location, start, f"the next stored is {idx}")
                yield bytes(data)
                start += 1
            if not rows:
                break

    def count_events(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    # -- checkpoints ---------------------------------------------------------------------------------

    @_exclusive
    def issue_checkpoint(self, log_key: Identity, origin: str) -> str:
        """Sign and store a checkpoint of the current tree; returns the signed note."""
        size = self.tree.size
        body = Checkpoint(origin=origin, tree_size=size, root_hash=self.tree.root()).body()
        note = sign_note(body, origin, log_key.public_key, log_key.sign)
        self._db.fault_point()
        self._db.execute(
            "INSERT INTO checkpoints VALUES (?,?,?,?) ON CONFLICT DO NOTHING", (size, self.tree.root(), note, _now_ms())
        )
        return note

    def latest_checkpoint(self) -> tuple[int, str] | None:
        row = self._db.execute(
            "SELECT tree_size, note FROM checkpoints ORDER BY tree_size DESC LIMIT 1"
        ).fetchone()
        return (row[0], row[1]) if row else None

    def checkpoint_at(self, tree_size: int) -> str | None:
        row = self._db.execute("SELECT note FROM checkpoints WHERE tree_size=?", (tree_size,)).fetchone()
        return row[0] if row else None

    def checkpoint_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]

    # -- contract snapshots --------------------------------------------------------------------------

    @_exclusive
    def save_contract_snapshot(self, tree_size: int, genesis_hash: bytes, state: bytes, keep: int = 2) -> None:
        """Store the contract state after the first `tree_size` leaves; keep only the newest `keep` snapshots.

        A snapshot is a cache beside the log, never part of it: losing one costs a longer replay, nothing
        else, and `contract_snapshot` ignores any that were taken under another genesis.
        """
        if tree_size > self.size:
            raise LedgerError(f"a contract snapshot at {tree_size} leaves is ahead of the log ({self.size})")
        db = self._db
        db.begin()
        try:
            db.execute("INSERT INTO contract_snapshots VALUES (?,?,?,?) ON CONFLICT (tree_size) DO UPDATE SET "
                       "genesis_hash=excluded.genesis_hash, state=excluded.state, taken_ms=excluded.taken_ms",
                       (tree_size, genesis_hash, state, _now_ms()))
            db.execute("DELETE FROM contract_snapshots WHERE tree_size NOT IN "
                       "(SELECT tree_size FROM contract_snapshots ORDER BY tree_size DESC LIMIT ?)", (keep,))
            db.fault_point()
            self._commit()
        except BaseException:
            db.rollback()
            raise

    def contract_snapshot(self, genesis_hash: bytes, at_most: int | None = None) -> tuple[int, bytes] | None:
        """The newest stored contract state `(tree_size, state)` of this genesis covering at most `at_most` leaves."""
        limit = self.size if at_most is None else min(at_most, self.size)
        row = self._db.execute(
            "SELECT tree_size, state FROM contract_snapshots WHERE genesis_hash=? AND tree_size<=? "
            "ORDER BY tree_size DESC LIMIT 1", (genesis_hash, limit)).fetchone()
        return (row[0], bytes(row[1])) if row else None


def store_location(cfg: BridgeConfig, data_dir: Path | None = None, *, role: str = "carechain"
                   ) -> StoreLocation:
    """Where the bridge's ledger lives: `bridge.store` (PostgreSQL), else DATA_DIR/ledger.db (`data_dir`, default
    `cfg.data_dir`). `role` names the process to the database (`application_name`: the lease holder's host)."""
    if cfg.store.backend == "postgresql":
        from chain_bridge.ledger.postgres import PostgresLocation

        assert cfg.store.dsn is not None  # StoreConfig refuses postgresql without a dsn
        return PostgresLocation(cfg.store.dsn, cfg.store.password_file, application_name=role)
    from chain_bridge.registry import ledger_path

    return SqliteLocation(ledger_path(Path(data_dir or cfg.data_dir)))


def open_ledger(cfg: BridgeConfig, data_dir: Path | None = None, *, role: str = "carechain") -> Ledger:
    """Open the bridge's ledger where `bridge.store` says (see `store_location`).

    For a PostgreSQL ledger, a marker is left where the data directory's SQLite file would be: a command that
    opens the ledger by that file (not through `bridge.store`) is then refused instead of starting a second,
    empty log beside the real one.
    """
    ledger = Ledger(store_location(cfg, data_dir, role=role))
    if not isinstance(ledger.location, SqliteLocation):
        from chain_bridge.registry import ledger_path

        marker = SqliteLocation(ledger_path(Path(data_dir or cfg.data_dir))).moved_marker
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{ledger.describe()}\n")
    return ledger


def _missing_entry(location: StoreLocation, index: int, detail: str) -> StoreCorruptError:
    where = location.describe()
    advice = LEDGER.advice(location.path) if isinstance(location, SqliteLocation) else \
        "Stop the bridges, restore the database from a backup, then run `carechain verify --full`."
    return StoreCorruptError(f"{where}: the ledger is damaged: entry {index} is missing ({detail}). {advice}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _entry_payload(leaf: bytes) -> dict | None:
    """The payload of a signed contract entry (its signature checked by whoever appended it), or None."""
    try:
        payload = envelope.parse(Entry.decode(leaf).cose).payload
    except (ValueError, envelope.EnvelopeError):
        return None
    return payload if isinstance(payload, dict) else None


def _admission(admitted: Admission | Entry | None) -> tuple[tuple[Entry, ...], Entry | None, str | None]:
    """(entries before the event, entry in its place, refusal) of a gate's answer other than a bare refusal."""
    if isinstance(admitted, Admission):
        return admitted.before, admitted.instead, admitted.refused
    return (), admitted, None


def _refusal_reason(leaf: bytes) -> str | None:
    reason = (_entry_payload(leaf) or {}).get("reason")
    return reason if isinstance(reason, str) else None
