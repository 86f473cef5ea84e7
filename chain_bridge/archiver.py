"""The bridge's archive of sealed readings: ciphertexts per (owner, epoch) on the storage miners, then pruned.

Once an epoch has ended (plus `bridge.archive.grace_s`, for readings an agent buffered offline), the stored
ciphertexts of all of an owner's devices in that epoch become one bundle — deterministic CBOR `[[idx, ct], ...]` in
leaf order — stored as an encrypted, erasure-coded dataset on the storage miners (`StorageClient.put`), whose
manifest the bridge commits on the ledger (`storage.commit` v2, signed by its operator key). Where the shares go is
the ledger's decision, never the config's: the active miners of the bridge's contract replica
(`contract_rules.miners.active_miners`), ranked by the seed of the final checkpoint on the broker, which the
archiver first checks against that replica (`storage_v2.epoch_final`, i.e. `miners.verify_final_note` — the log's
signature and a majority of the active miners' cosignatures — in the current storage epoch). The note and the
miners' store receipts are kept with the manifest and go into the commit (`storage_v2.commit_for`), which the
contracts check before it is appended; one they refuse (the active set or the storage epoch changed since the
upload) is dropped and planned again. After `retention_s` the bridge prunes its own copy, but only of an archive
that is committed under a final checkpoint and that it has just fetched back byte for byte. The leaves, and so each
ciphertext's hash, stay on the ledger for ever; `archived` keeps naming each pruned ciphertext's archive, so the
record server can fetch it back (`ArchiveFetcher`) and checks every ciphertext against the hash in its signed
envelope before serving it.

Every step is durable before the next starts, so a crash anywhere loses nothing and repeats at most an upload: plan
(the `archives` row and its members, one transaction) → upload (the seed note, dataset key and manifest files first,
0600, then the shares, then their receipts) → manifest stored → commit (the `storage.commit` leaf and the archive
row in one transaction) → verify and prune (one transaction). A reading arriving after its epoch was archived goes
into another archive of the same (owner, epoch). Each pass does bounded work (`max_archives_per_pass` of each step,
`SCAN_BATCH` leaves scanned for epoch keys); a failed pass is retried with backoff.

The planning core (bundle codec, checks, which epochs are due, which archives may be pruned) is pure; the
`Archiver` and `ArchiveFetcher` shells do the SQLite and MQTT around it. Writes go through the bridge's `Ledger`
under its ledger lock; reads use a read-only connection of their own, which never sees a batch mid-append.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain import cbor, envelope
from carechain.config import ArchiveConfig, BrokerConfig
from carechain.entries import Entry
from carechain.files import PRIVATE, private_dir, write_atomic
from carechain.identity import Identity
from carechain.retry import Backoff, ReconnectPolicy
from carechain.sealed import MAX_CIPHERTEXT_BYTES, ciphertext_hash
from carechain.storage.codec import StorageError, StorageParams
from carechain.storage.keyfile import load_dataset_key
from carechain.storage.manifest import Manifest
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.reader import LedgerReader
from chain_bridge.ledger.sql import StoreLocation
from chain_bridge.ledger.store import ArchiveConflict, Ledger, LedgerError
from chain_bridge.storage_client import StorageClient, TransferError, key_path, load_receipts, receipts_path
from contract_rules import transactions as ce
from contract_rules.miners import active_miners
from contract_rules.runtime import OK
from contract_rules.storage_v2 import commit_for, epoch_final

log = logging.getLogger("carechain.bridge.archive")

SCAN_BATCH = 50_000  # leaves scanned for epoch_key events per pass
_ITEM_OVERHEAD = 16  # CBOR headers of one [idx, ct] in a bundle, generously
# A failed pass (storage miners unreachable, too few of them, no final checkpoint yet) is retried after this.
ARCHIVE_RETRY = ReconnectPolicy(initial_s=1.0, max_s=300.0, stable_s=0.0)

Member = tuple[int, str, int, int]  # (leaf index, device, epoch, ciphertext length) of a stored ciphertext


class ArchiveError(Exception):
    """A ciphertext that cannot be served from its archive; `reason` names why (logged and counted)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- the core: pure ---------------------------------------------------------------------------------------

def encode_bundle(items: Iterable[tuple[int, bytes]]) -> bytes:
    """The archive of some ciphertexts: deterministic CBOR `[[idx, ct], ...]` in leaf order."""
    ordered = sorted(items)
    if any(a[0] == b[0] for a, b in zip(ordered, ordered[1:], strict=False)):
        raise ValueError("a bundle holds each leaf index once")
    return cbor.encode([[idx, ct] for idx, ct in ordered])


def decode_bundle(raw: bytes, max_items: int) -> list[tuple[int, bytes]]:
    """Strictly decode a bundle from the storage miners: at most `max_items`, indexes strictly increasing."""
    try:
        value = cbor.decode(raw, max_depth=3)
    except cbor.CBORError as exc:
        raise ArchiveError("bad_bundle", f"not CBOR: {exc}") from None
    if not isinstance(value, list) or len(value) > max_items:
        raise ArchiveError("bad_bundle", f"not a list of at most {max_items} [idx, ct] items")
    out: list[tuple[int, bytes]] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], bytes)
                and 0 < len(item[1]) <= MAX_CIPHERTEXT_BYTES):
            raise ArchiveError("bad_bundle", "an item is not [leaf index, ciphertext]")
        if out and item[0] <= out[-1][0]:
            raise ArchiveError("bad_bundle", "leaf indexes are not strictly increasing")
        out.append((item[0], item[1]))
    return out


def anchored_ct_hash(leaf: bytes) -> bytes | None:
    """The ciphertext hash that a sealed reading's signed envelope carries (`body.ct`), or None."""
    try:
        payload = envelope.parse(Entry.decode(leaf).cose).payload
    except (ValueError, envelope.EnvelopeError):
        return None
    body = payload.get("body") if isinstance(payload, dict) else None
    ct = body.get("ct") if isinstance(body, dict) else None
    return ct if isinstance(ct, bytes) and len(ct) == 32 else None


def check_bundle(items: Iterable[tuple[int, bytes]], anchored: Mapping[int, bytes | None]
                 ) -> tuple[dict[int, bytes], list[int]]:
    """(ciphertexts that hash to their anchored hash, indexes that do not or are not in `anchored`)."""
    good: dict[int, bytes] = {}
    bad: list[int] = []
    for idx, ct in items:
        want = anchored.get(idx)
        if want is not None and hmac.compare_digest(ciphertext_hash(ct), want):
            good[idx] = ct
        else:
            bad.append(idx)
    return good, bad


@dataclass(frozen=True)
class ArchivePolicy:
    grace_ms: int
    retention_ms: int
    max_archives_per_pass: int
    max_bundle_bytes: int

    @classmethod
    def from_config(cls, cfg: ArchiveConfig) -> ArchivePolicy:
        return cls(int(cfg.grace_s * 1000), int(cfg.retention_s * 1000), cfg.max_archives_per_pass,
                   cfg.max_bundle_bytes)


@dataclass(frozen=True)
class EpochStock:
    """The stored ciphertexts of one (owner, epoch) not in any archive yet."""

    owner: str
    epoch: int
    end_ms: int | None  # when the last of its devices' epochs ends; None: a device's epoch_key is not known
    readings: int


def due_epochs(stock: Iterable[EpochStock], now_ms: int, policy: ArchivePolicy) -> list[EpochStock]:
    """The (owner, epoch)s to archive now: ended at least `grace_ms` ago, the oldest first, a bounded number."""
    due = [s for s in stock if s.end_ms is not None and s.end_ms + policy.grace_ms <= now_ms]
    due.sort(key=lambda s: (s.end_ms, s.owner, s.epoch))
    return due[:policy.max_archives_per_pass]


def split_members(members: Sequence[Member], max_bundle_bytes: int) -> list[list[Member]]:
    """Cut one (owner, epoch)'s ciphertexts, in leaf order, into bundles of at most `max_bundle_bytes`."""
    parts: list[list[Member]] = []
    used = 0
    for m in sorted(members):
        size = m[3] + _ITEM_OVERHEAD
        if not parts or (parts[-1] and used + size > max_bundle_bytes):
            parts.append([])
            used = _ITEM_OVERHEAD
        parts[-1].append(m)
        used += size
    return parts


def dataset_id_for(owner: str, epoch: int, nonce: bytes) -> str:
    """A storage dataset id nobody can guess (and so commit first) before the bridge uploads it."""
    return f"ct-{owner}-{epoch}-{nonce.hex()}"


@dataclass(frozen=True)
class ArchiveRow:
    id: int
    owner: str
    epoch: int
    dataset_id: str
    readings: int
    bytes: int
    manifest: str | None  # JSON, once uploaded
    stored_ms: int | None
    commit_idx: int | None  # the storage.commit leaf
    pruned_ms: int | None


def prunable(rows: Iterable[ArchiveRow], final_size: int, now_ms: int, policy: ArchivePolicy) -> list[ArchiveRow]:
    """Archives whose ciphertexts the bridge may drop: stored, committed under a final checkpoint, kept
    `retention_ms` since the upload, not pruned yet; a bounded number, the oldest first."""
    out = [r for r in rows if r.pruned_ms is None and r.manifest is not None and r.stored_ms is not None
           and r.commit_idx is not None and r.commit_idx < final_size and r.stored_ms + policy.retention_ms <= now_ms]
    return sorted(out, key=lambda r: r.id)[:policy.max_archives_per_pass]


def epoch_key_of(leaf: bytes) -> tuple[str, int, str, int] | None:
    """(device, epoch, owner, epoch_ms) of a v2 `epoch_key` event leaf, or None for any other leaf."""
    try:
        payload = envelope.parse(Entry.decode(leaf).cose).payload
    except (ValueError, envelope.EnvelopeError):
        return None
    if not isinstance(payload, dict) or payload.get("kind") != "epoch_key" or payload.get("v") != 2:
        return None
    body, dev = payload.get("body"), payload.get("dev")
    if not isinstance(body, dict) or not isinstance(dev, str):
        return None
    epoch, epoch_ms, owner = body.get("epoch"), body.get("epoch_ms"), body.get("owner")
    if type(epoch) is not int or type(epoch_ms) is not int or not isinstance(owner, str) or epoch < 0 or epoch_ms <= 0:
        return None
    return dev, epoch, owner, epoch_ms


# -- reads: a read-only connection ------------------------------------------------------------------------

_COLUMNS = ("id", "owner", "epoch", "dataset_id", "readings", "bytes", "manifest", "stored_ms", "commit_idx",
            "pruned_ms")
_ROW = ", ".join(_COLUMNS)
_ROW_OF_R = ", ".join(f"r.{c}" for c in _COLUMNS)


class _ArchiveReader(LedgerReader):
    """What the archiver reads (epochs, stock, members), on a read-only connection."""

    def unsealed_events(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        return [(i, bytes(d)) for i, d in self._db.execute(
            "SELECT e.idx, e.data FROM entries e WHERE e.idx >= ? AND e.idx < ? AND e.type = 'event' "
            "AND NOT EXISTS (SELECT 1 FROM ciphertexts c WHERE c.idx = e.idx) "
            "AND NOT EXISTS (SELECT 1 FROM archived a WHERE a.idx = e.idx) ORDER BY e.idx", (start, stop))]

    def owners(self) -> dict[str, str]:
        return {d: o for d, o in self._db.execute("SELECT device_id, owner FROM devices")}

    def stock(self) -> list[EpochStock]:
        """Per (owner, epoch), the stored ciphertexts in no archive; one read of the ciphertexts table."""
        rows = self._db.execute(
            "SELECT d.owner, c.epoch, COUNT(*), MAX((c.epoch + 1) * k.epoch_ms), "
            "SUM(CASE WHEN k.epoch_ms IS NULL THEN 1 ELSE 0 END) "
            "FROM ciphertexts c JOIN devices d ON d.device_id = c.dev "
            "LEFT JOIN archive_epochs k ON k.dev = c.dev AND k.epoch = c.epoch "
            "WHERE NOT EXISTS (SELECT 1 FROM archived a WHERE a.idx = c.idx) GROUP BY d.owner, c.epoch")
        return [EpochStock(o, e, None if unknown else end, n) for o, e, n, end, unknown in rows]

    def members(self, owner: str, epoch: int) -> list[Member]:
        return [(i, d, e, n) for i, d, e, n in self._db.execute(
            "SELECT c.idx, c.dev, c.epoch, length(c.ct) FROM ciphertexts c JOIN devices d ON d.device_id = c.dev "
            "WHERE d.owner = ? AND c.epoch = ? AND NOT EXISTS (SELECT 1 FROM archived a WHERE a.idx = c.idx) "
            "ORDER BY c.idx", (owner, epoch))]

    def stored(self, archive: int) -> list[tuple[int, bytes]]:
        """(idx, ct) of the archive's ciphertexts the bridge still stores, in leaf order."""
        return [(i, bytes(ct)) for i, ct in self._db.execute(
            "SELECT a.idx, c.ct FROM archived a JOIN ciphertexts c ON c.idx = a.idx WHERE a.archive = ? "
            "ORDER BY a.idx", (archive,))]

    def archive_leaves(self, archive: int) -> dict[int, bytes]:
        return {i: bytes(d) for i, d in self._db.execute(
            "SELECT a.idx, e.data FROM archived a JOIN entries e ON e.idx = a.idx WHERE a.archive = ?", (archive,))}

    def unfinished(self) -> list[ArchiveRow]:
        return [ArchiveRow(*r) for r in self._db.execute(
            f"SELECT {_ROW} FROM archives WHERE commit_idx IS NULL ORDER BY id")]

    def unpruned(self) -> list[ArchiveRow]:
        return [ArchiveRow(*r) for r in self._db.execute(
            f"SELECT {_ROW} FROM archives WHERE commit_idx IS NOT NULL AND pruned_ms IS NULL ORDER BY id")]

    def archive_of(self, index: int) -> ArchiveRow | None:
        row = self._db.execute(f"SELECT {_ROW_OF_R} FROM archived a "
                               "JOIN archives r ON r.id = a.archive WHERE a.idx = ?", (index,)).fetchone()
        return ArchiveRow(*row) if row else None


# -- fetching a pruned ciphertext back (for the record server) ---------------------------------------------

class ArchiveFetcher:
    """Pruned ciphertexts fetched from their archive on the storage miners, each checked against its anchor.

    A whole archive is fetched at once (a page of readings usually needs many of one epoch) and its checked
    ciphertexts kept for the next pages, for at most `cache_archives` archives. A ciphertext that does not hash
    to the `ct` its signed envelope carries is never returned: `ArchiveError("ciphertext_mismatch")`, logged.
    The storage layer already refuses corrupt shares (Merkle roots from the manifest) and tampered segments
    (AES-GCM); this check is the one the issue asks of anyone fetching a ciphertext, and catches the rest.
    """

    def __init__(self, ledger: Path | StoreLocation, key_dir: Path, storage: Callable[[], StorageClient],
                 cache_archives: int = 4) -> None:
        self._reader = _ArchiveReader(ledger)
        self._key_dir = Path(key_dir)
        self._storage = storage
        self._cache: OrderedDict[int, tuple[dict[int, bytes], set[int]]] = OrderedDict()
        self._cache_archives = cache_archives
        self.stats: Counter[str] = Counter()  # "fetched" archives, "mismatch" ciphertexts, "unavailable"

    def close(self) -> None:
        self._reader.close()

    def is_archived(self, index: int) -> bool:
        return self._reader.archive_of(index) is not None

    def ciphertext(self, index: int) -> bytes:
        row = self._reader.archive_of(index)
        if row is None or row.manifest is None:
            raise ArchiveError("ciphertext_missing", f"leaf {index} has no stored ciphertext and no archive")
        found = self._cache.get(row.id)
        if found is None:
            found = self._fetch(row)
            self._cache[row.id] = found
            while len(self._cache) > self._cache_archives:
                self._cache.popitem(last=False)
        self._cache.move_to_end(row.id)
        good, bad = found
        if index in good:
            return good[index]
        if index in bad:
            raise ArchiveError("ciphertext_mismatch", f"leaf {index}: the ciphertext in archive {row.dataset_id} "
                                                      "does not hash to the one its signed event anchors")
        raise ArchiveError("ciphertext_missing", f"leaf {index} is not in archive {row.dataset_id}")

    def _fetch(self, row: ArchiveRow) -> tuple[dict[int, bytes], set[int]]:
        assert row.manifest is not None
        try:
            manifest = Manifest.model_validate_json(row.manifest)
            key = load_dataset_key(key_path(self._key_dir / f"{row.dataset_id}.manifest.json"), row.dataset_id)
            raw = self._storage().get(manifest, key)
        except (StorageError, OSError, ValueError) as exc:
            self.stats["unavailable"] += 1
            log.warning("archive %s (%s epoch %d) could not be fetched: %s", row.dataset_id, row.owner, row.epoch,
                        exc)
            raise ArchiveError("archive_unavailable", f"archive {row.dataset_id}: {exc}") from None
        items = decode_bundle(raw, row.readings)
        good, bad = check_bundle(items, {i: anchored_ct_hash(leaf)
                                         for i, leaf in self._reader.archive_leaves(row.id).items()})
        self.stats["fetched"] += 1
        if bad:
            self.stats["mismatch"] += len(bad)
            log.error("archive %s (%s epoch %d): %d ciphertext(s) do not match the hash their signed events anchor "
                      "(leaves %s); they are not served", row.dataset_id, row.owner, row.epoch, len(bad), bad[:10])
        return good, set(bad)


# -- the archiver: the shell --------------------------------------------------------------------------------

@dataclass
class PassReport:
    scanned: int = 0  # leaves scanned for epoch keys
    planned: int = 0  # archives planned
    uploaded: int = 0
    committed: int = 0
    pruned_archives: int = 0
    pruned: int = 0  # ciphertexts dropped from the bridge's store
    pending: int = 0  # archives not committed yet after this pass


class Archiver:
    """Runs archive passes on a thread of its own (`start`/`stop`), or one at a time (`run_pass`).

    `lock` is the bridge's ledger lock, held for each write to `ledger` (the sequencer's connection) and
    each read of `contracts`, the bridge's contract gate: its replica decides placement, its operator key
    signs the `storage.commit`s, and its rules check each commit before it is appended. `final_size()` is the
    tree size of the latest final checkpoint. Dataset keys, manifests, seed notes and store receipts live in
    `DATA_DIR/archive/` (0700, files 0600). `bridge.archive.miners` is ignored: the ledger places the shares.
    """

    def __init__(self, ledger: Ledger, lock: contextlib.AbstractContextManager[Any], contracts: ContractGate,
                 final_size: Callable[[], int], cfg: ArchiveConfig, broker: BrokerConfig, data_dir: Path, *,
                 clock_ms: Callable[[], int] | None = None, client_id: str | None = None) -> None:
        self.ledger = ledger
        self.cfg = cfg
        self.policy = ArchivePolicy.from_config(cfg)
        self.params = StorageParams(cfg.segment_size, cfg.k, cfg.n, cfg.chunk_size)
        self.broker = broker
        self.dir = private_dir(Path(data_dir) / "archive")  # the dataset keys: 0700, each file 0600
        self._lock = lock
        self._contracts = contracts
        self._signer: Identity = contracts.operator
        if cfg.miners:
            log.warning("bridge.archive.miners is ignored: archives are placed on the ledger's active miners (those "
                        "registered and bonded), ranked by the seed of a final checkpoint")
        self._final_size = final_size
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._client_id = client_id or f"carechain-archive-{os.urandom(4).hex()}"
        self._reader = _ArchiveReader(ledger.location)
        # A pass that fails on these is retried with backoff (a lost database connection included).
        self._pass_errors: tuple[type[BaseException], ...] = (StorageError, LedgerError, sqlite3.Error, OSError,
                                                              *self._reader.transient_errors)
        self._client: StorageClient | None = None
        self._client_lock = threading.Lock()
        self.fetcher = ArchiveFetcher(ledger.location, self.dir, self.storage)
        self.stats: Counter[str] = Counter()
        self._backoff = Backoff(ARCHIVE_RETRY)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def storage(self) -> StorageClient:
        """The storage client (connected on first use; shared with the fetcher, which is thread-safe to do)."""
        with self._client_lock:
            if self._client is None:
                self._client = StorageClient(self.broker, self._client_id, timeout=self.cfg.timeout_s,
                                             window=self.cfg.window)
            return self._client

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bridge-archive", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        self.fetcher.close()
        self._reader.close()

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                self.run_pass()
            except self._pass_errors as exc:
                delay = self._backoff.failed()
                self.stats["failed_passes"] += 1
                log.warning("archive pass failed (%d in a row): %s; retrying in %.1f s (nothing is pruned that "
                            "is not archived and committed)", self._backoff.failures, exc, delay)
            except Exception:  # keep archiving: the next pass starts from what is durable
                delay = self._backoff.failed()
                self.stats["failed_passes"] += 1
                log.exception("archive pass failed; retrying in %.1f s", delay)
            else:
                self._backoff.failures = 0
                delay = self.cfg.interval_s

    # -- one pass -------------------------------------------------------------------------------------

    def run_pass(self) -> PassReport:
        """Scan for epoch keys, plan the due (owner, epoch)s, upload and commit, verify and prune; bounded.

        Nothing new is planned while `max_archives_per_pass` archives still wait for their upload or commit
        (the storage miners are down, say), so a long outage does not pile up plans."""
        report = PassReport()
        report.scanned = self._scan_epoch_keys()
        unfinished = self._reader.unfinished()
        if len(unfinished) < self.policy.max_archives_per_pass:
            report.planned = self._count("planned", self._plan(self._clock_ms()))
            unfinished = self._reader.unfinished()
        for row in unfinished[:self.policy.max_archives_per_pass]:
            if self._stop.is_set():  # stopping: what is done so far is durable, the next start resumes
                break
            if row.manifest is None:
                row = self._upload(row)
                report.uploaded += self._count("uploaded", 1)
            if self._commit(row):
                report.committed += self._count("committed", 1)
        for row in prunable(self._reader.unpruned(), self._final_size(), self._clock_ms(), self.policy):
            if self._stop.is_set():
                break
            dropped = self._prune(row)
            if dropped is not None:
                report.pruned_archives += self._count("pruned_archives", 1)
                report.pruned += self._count("pruned", dropped)
        report.pending = len(self._reader.unfinished())
        if report.planned or report.uploaded or report.committed or report.pruned_archives:
            log.info("archive pass: %d planned, %d uploaded, %d committed, %d archive(s) pruned (%d ciphertexts); "
                     "%d pending", report.planned, report.uploaded, report.committed, report.pruned_archives,
                     report.pruned, report.pending)
        return report

    def _count(self, name: str, n: int) -> int:
        self.stats[name] += n  # as each step is durable: a pass that fails later still counts what it did
        return n

    def _scan_epoch_keys(self) -> int:
        with self._lock:
            start = self.ledger.archive_scanned()
        stop = min(self._reader.size(), start + SCAN_BATCH)
        if stop <= start:
            return 0
        owners = self._reader.owners()
        rows = []
        for idx, leaf in self._reader.unsealed_events(start, stop):
            key = epoch_key_of(leaf)
            if key is not None and owners.get(key[0]) == key[2]:  # as the contracts: the registered owner only
                rows.append((*key, idx))
        with self._lock:
            self.ledger.record_epoch_keys(rows, stop)
        return stop - start

    def _plan(self, now_ms: int) -> int:
        planned = 0
        for stock in due_epochs(self._reader.stock(), now_ms, self.policy):
            for part in split_members(self._reader.members(stock.owner, stock.epoch), self.policy.max_bundle_bytes):
                with self._lock:
                    self.ledger.plan_archive(stock.owner, stock.epoch, dataset_id_for(stock.owner, stock.epoch,
                                                                                      os.urandom(8)), part, now_ms)
                planned += 1
        return planned

    def _upload(self, row: ArchiveRow) -> ArchiveRow:
        items = self._reader.stored(row.id)
        if len(items) != row.readings:  # cannot happen: only a committed archive is ever pruned
            raise LedgerError(f"archive {row.dataset_id}: {row.readings - len(items)} of its ciphertexts are gone")
        client = self.storage()
        note, miners, seed = self._placement(client)
        path = self.dir / f"{row.dataset_id}.manifest.json"
        write_atomic(note_path(path), note.encode(), PRIVATE)  # before any share: the commit names this note
        manifest = client.put(encode_bundle(items), miners, seed, path, owner=self._signer.device_id,
                              dataset_id=row.dataset_id, params=self.params)
        text = manifest.model_dump_json()
        now = self._clock_ms()
        with self._lock:
            self.ledger.store_archive(row.id, text, now)
        return ArchiveRow(row.id, row.owner, row.epoch, row.dataset_id, row.readings, row.bytes, text, now, None, None)

    def _commit(self, row: ArchiveRow) -> bool:
        """Append the archive's `storage.commit` v2 if the contracts accept it; else drop it (planned again)."""
        assert row.manifest is not None
        manifest = Manifest.model_validate_json(row.manifest)
        path = self.dir / f"{row.dataset_id}.manifest.json"
        try:
            note = note_path(path).read_text()
            receipts = load_receipts(receipts_path(path))
        except (OSError, UnicodeDecodeError, StorageError) as exc:
            return self._replan(row, "no_seed_or_receipts", f"its seed note or store receipts are unreadable ({exc})")
        entry = ce.signed(self._signer, ce.STORAGE_COMMIT, commit_for(manifest, self._signer.public_key, note,
                                                                      receipts, self._clock_ms()))
        try:
            with self._lock:
                self.ledger.refresh()
                self._contracts.catch_up(self.ledger)
                reason = self._contracts.runtime.check(entry)
                if reason == OK:  # an honest bridge never appends what its rules refuse
                    self.ledger.commit_archive(row.id, entry)
        except ArchiveConflict as exc:
            return self._replan(row, "conflicts", str(exc))
        if reason != OK:  # the active set or the storage epoch changed since the upload, say
            return self._replan(row, "refused", f"the contracts refuse its commit ({reason})")
        return True

    def _prune(self, row: ArchiveRow) -> int | None:
        """Fetch the archive back and drop the bridge's copy only if it is byte for byte what the bridge holds."""
        assert row.manifest is not None
        local = self._reader.stored(row.id)
        manifest = Manifest.model_validate_json(row.manifest)
        key = load_dataset_key(key_path(self.dir / f"{row.dataset_id}.manifest.json"), row.dataset_id)
        fetched = self.storage().get(manifest, key)
        if len(local) != row.readings or not hmac.compare_digest(fetched, encode_bundle(local)):
            self.stats["verify_failed"] += 1
            log.error("archive %s of %s epoch %d does not come back as the %d ciphertexts the bridge holds: not "
                      "pruned", row.dataset_id, row.owner, row.epoch, row.readings)
            return None
        with self._lock:
            return self.ledger.prune_archive(row.id, self._clock_ms())

    def _replan(self, row: ArchiveRow, counter: str, why: str) -> bool:
        self.stats[counter] += 1
        log.error("archive %s of %s epoch %d: %s; it is planned again under a new id", row.dataset_id, row.owner,
                  row.epoch, why)
        with self._lock:
            self.ledger.drop_archive(row.id)
        return False

    def _placement(self, client: StorageClient) -> tuple[str, list[str], bytes]:
        """(the final checkpoint note on the broker, the ledger's active miners, the note's seed), the note
        checked against the bridge's replica; TransferError when there is none usable yet."""
        deadline = time.monotonic() + 2.0
        while client.final_note is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if client.final_note is None:
            raise TransferError("no final checkpoint on the broker yet: share placement waits for its seed")
        note = client.final_note.decode("utf-8", errors="replace")
        with self._lock:
            self.ledger.refresh()
            self._contracts.catch_up(self.ledger)
            state = self._contracts.state
            miners = active_miners(state)
            final = epoch_final(state, note)
        if isinstance(final, str):
            raise TransferError(f"the checkpoint on the broker is no seed for placement ({final}): it needs the log's "
                                "signature and cosignatures of a majority of the ledger's active miners, in the "
                                "current storage epoch")
        if len(miners) < self.params.n:
            raise TransferError(f"{len(miners)} miner(s) are active on the ledger, an archive needs n={self.params.n}; "
                                "register and bond more (`carechain party register miner`, `carechain bond post`) "
                                "or lower bridge.archive.n")
        return note, miners, final.seed


def note_path(manifest_path: Path) -> Path:
    """Where the final checkpoint note whose seed placed an archive lives: next to its manifest, `NAME.note`."""
    return Path(manifest_path).with_suffix(".note")
