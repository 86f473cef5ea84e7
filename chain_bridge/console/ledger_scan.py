"""The console's incremental reading of the ledger: metadata of new entries only, never a whole-log rescan.

A `LedgerScan` holds its own read-only connection (it never takes the writer lock, never sees a batch mid-append)
and remembers the last leaf it read; each `advance()` reads at most `SCAN_BATCH` new leaves and folds their
metadata into counters and bounded lists. What it keeps is what the console may show: entry types, event kinds,
refusal reasons, who asked for or granted access and its scope, consent terms, checkpoint cosigners, storage
counts. It never keeps a reading, a ciphertext or a payload body, and a record owner only as a pseudonym.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from carechain import envelope
from carechain.checkpoint import NoteError, parse_note
from carechain.entries import (
    ACCESS_FAULT,
    ACCESS_GRANT,
    ACCESS_REQUEST,
    ACCESS_REVOKE,
    CHECKPOINT_FINAL,
    CONSENT_GIVE,
    CONSENT_REVOKE,
    ENTRY_EVENT,
    PARTY_REGISTER,
    SALE_REFUSED,
    STORAGE_AUDIT,
    STORAGE_COMMIT,
    STORAGE_RETRIEVAL,
    STORAGE_SETTLE,
    Entry,
    EntryError,
)
from carechain.identity import device_id_for
from chain_bridge.console.pseudonyms import Pseudonyms
from chain_bridge.ledger.sql import Database, StoreLocation

log = logging.getLogger("carechain.bridge.console")

SCAN_BATCH = 20_000  # leaves read per advance: a large log is caught up over several refreshes, never in one
KEEP_ACCESS = 5_000  # newest access-log rows kept in memory (the page shows them 100 at a time)
KEEP_CONSENTS = 5_000
KEEP_FINALS = 50
# Roles whose party ids the console may show; any other party (a patient, an unknown key) is shown as a pseudonym.
NAMED_ROLES = frozenset({"doctor", "researcher", "pharmacy", "insurer", "miner", "prescriber", "authority",
                         "investigator", "sponsor"})


@dataclass(frozen=True)
class AccessRow:
    """One access-log entry as the privacy officer sees it: ledger metadata, the owner as a pseudonym."""

    index: int
    appended_ms: int
    action: str  # requested, granted, revoked, fault
    who: str  # the requester (a doctor or researcher), or a pseudonym
    owner: str  # pseudonym ("—" when the entry does not name one)
    scope: str


@dataclass(frozen=True)
class ConsentRow:
    index: int
    appended_ms: int
    owner: str  # pseudonym
    kinds: str
    queries: str
    min_cohort: int
    expires_ms: int
    revoked_at: int | None = None


@dataclass(frozen=True)
class FinalRecord:
    """A `checkpoint.final` on the ledger: a checkpoint a majority of the active miners cosigned."""

    index: int
    appended_ms: int
    tree_size: int
    cosigners: tuple[str, ...]


@dataclass
class StorageTally:
    commits: int = 0
    datasets: int = 0
    repairs: int = 0  # commits of a later revision (a repaired or updated dataset)
    segments: int = 0
    shares: int = 0
    audits: int = 0
    retrievals: int = 0
    settles: int = 0


@dataclass
class ScanTotals:
    """Everything counted from leaf 0 up to `scanned`."""

    scanned: int = 0
    last_appended_ms: int | None = None
    types: Counter[str] = field(default_factory=Counter)
    event_kinds: Counter[str] = field(default_factory=Counter)
    sale_refusals: Counter[str] = field(default_factory=Counter)
    undecodable: int = 0
    storage: StorageTally = field(default_factory=StorageTally)


class LedgerScan:
    """Reads new leaves of the ledger at `location` and keeps their metadata (thread-safe)."""

    def __init__(self, location: StoreLocation, pseudonyms: Pseudonyms) -> None:
        self.location = location
        self.pseudonyms = pseudonyms
        self._db: Database = location.connect_read_only()
        self._lock = threading.RLock()  # re-entrant: a page holds it (`locked`) and queries under it
        self.totals = ScanTotals()
        self.roles: dict[str, str] = {}  # party id → registered role
        self.access: deque[AccessRow] = deque(maxlen=KEEP_ACCESS)
        self.consents: dict[int, ConsentRow] = {}
        self._consent_order: deque[int] = deque()
        self.finals: deque[FinalRecord] = deque(maxlen=KEEP_FINALS)
        self._datasets: set[str] = set()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the scan still: a page reads its counters and lists while the sampler thread may be advancing."""
        with self._lock:
            yield

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """A read-only query on the scan's connection (the pages' small lookups: devices, checkpoints)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def advance(self, limit: int = SCAN_BATCH) -> int:
        """Read up to `limit` leaves after the last one read; how many were read."""
        with self._lock:
            start = self.totals.scanned
            rows = self._db.execute("SELECT idx, type, data, appended_ms FROM entries WHERE idx >= ? AND idx < ? "
                                    "ORDER BY idx", (start, start + limit)).fetchall()
            for idx, kind, data, appended_ms in rows:
                if idx != self.totals.scanned:
                    break  # a gap: a transaction still committing below it; read again next time
                self._fold(int(idx), str(kind), bytes(data), int(appended_ms))
                self.totals.scanned += 1
                self.totals.last_appended_ms = int(appended_ms)
            return self.totals.scanned - start

    def display_party(self, party: str) -> str:
        """A party id as the console shows it: named roles by id, anyone else (a patient) by pseudonym."""
        return party if self.roles.get(party) in NAMED_ROLES else self.pseudonyms.of(party)

    # -- folding one leaf ----------------------------------------------------------------------------

    def _fold(self, idx: int, kind: str, data: bytes, appended_ms: int) -> None:
        totals = self.totals
        totals.types[kind] += 1
        try:
            signed = envelope.parse(Entry.decode(data).cose)
        except (EntryError, envelope.EnvelopeError, ValueError):
            totals.undecodable += 1
            return
        payload = signed.payload if isinstance(signed.payload, dict) else {}
        if kind == ENTRY_EVENT:
            event_kind = payload.get("kind")
            totals.event_kinds[event_kind if isinstance(event_kind, str) else "?"] += 1
        elif kind == SALE_REFUSED:
            reason = payload.get("reason")
            totals.sale_refusals[reason if isinstance(reason, str) else "?"] += 1
        elif kind == PARTY_REGISTER:
            pk, role = payload.get("pk"), payload.get("role")
            if isinstance(pk, bytes) and len(pk) == 32 and isinstance(role, str):
                self.roles.setdefault(device_id_for(pk), role)
        elif kind in (ACCESS_REQUEST, ACCESS_GRANT, ACCESS_REVOKE, ACCESS_FAULT):
            self.access.append(self._access_row(idx, kind, signed.kid, payload, appended_ms))
        elif kind == CONSENT_GIVE:
            self._consent_given(idx, signed.kid, payload, appended_ms)
        elif kind == CONSENT_REVOKE:
            self._consent_revoked(payload, idx)
        elif kind == CHECKPOINT_FINAL:
            self._final(idx, payload, appended_ms)
        elif kind in (STORAGE_COMMIT, STORAGE_AUDIT, STORAGE_RETRIEVAL, STORAGE_SETTLE):
            self._storage(kind, payload)
        # rx.anchor, rx.revoke and the other types are counted by type only.

    def _access_row(self, idx: int, kind: str, signer: str, payload: dict[str, Any], appended_ms: int) -> AccessRow:
        if kind == ACCESS_REQUEST:
            owner = payload.get("owner")
            devices, kinds = payload.get("devices"), payload.get("kinds")
            span_min = max(_int(payload.get("to_ms")) - _int(payload.get("from_ms")), 0) // 60_000
            named_kinds = [k for k in kinds if isinstance(k, str)] if isinstance(kinds, list) else []
            scope = ", ".join((f"{len(devices)} device(s)" if isinstance(devices, list) and devices else "all devices",
                               ", ".join(named_kinds) or "all kinds", f"{span_min} min"))
            return AccessRow(idx, appended_ms, "requested", self.display_party(signer),
                             self.pseudonyms.of(owner) if isinstance(owner, str) else "—", scope)
        if kind == ACCESS_GRANT:
            requester = payload.get("requester")
            miners = payload.get("miners")
            scope = f"{_int(payload.get('threshold'))}-of-{len(miners) if isinstance(miners, list) else 0} miners"
            return AccessRow(idx, appended_ms, "granted",
                             self.display_party(requester) if isinstance(requester, str) else "—",
                             self.pseudonyms.of(signer), scope)
        if kind == ACCESS_REVOKE:
            return AccessRow(idx, appended_ms, "revoked", "—", self.pseudonyms.of(signer),
                             f"grant at leaf {_int(payload.get('grant_index'))}")
        return AccessRow(idx, appended_ms, "fault reported", self.display_party(signer), "—",
                         f"grant at leaf {_int(payload.get('grant_index'))}")

    def _consent_given(self, idx: int, signer: str, payload: dict[str, Any], appended_ms: int) -> None:
        kinds, queries = payload.get("kinds"), payload.get("queries")
        self.consents[idx] = ConsentRow(
            idx, appended_ms, self.pseudonyms.of(signer),
            ", ".join(k for k in kinds if isinstance(k, str)) if isinstance(kinds, list) else "",
            ", ".join(q for q in queries if isinstance(q, str)) if isinstance(queries, list) else "",
            _int(payload.get("min_cohort")), _int(payload.get("expires_ms")))
        self._consent_order.append(idx)
        while len(self._consent_order) > KEEP_CONSENTS:
            self.consents.pop(self._consent_order.popleft(), None)

    def _consent_revoked(self, payload: dict[str, Any], idx: int) -> None:
        given = self.consents.get(_int(payload.get("consent"), -1))
        if given is not None:
            self.consents[given.index] = ConsentRow(**{**given.__dict__, "revoked_at": idx})

    def _final(self, idx: int, payload: dict[str, Any], appended_ms: int) -> None:
        note = payload.get("note")
        if not isinstance(note, str):
            return
        try:
            body, signatures = parse_note(note)
        except NoteError:
            return
        lines = body.split("\n")
        size = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else 0
        # The first signature is the log key's; the others are the miners' cosignatures.
        self.finals.append(FinalRecord(idx, appended_ms, size, tuple(s.name for s in signatures[1:])))

    def _storage(self, kind: str, payload: dict[str, Any]) -> None:
        tally = self.totals.storage
        if kind == STORAGE_COMMIT:
            tally.commits += 1
            dataset = payload.get("dataset_id")
            if isinstance(dataset, str) and dataset not in self._datasets:
                self._datasets.add(dataset)
                tally.datasets += 1
            if _int(payload.get("revision"), 1) > 1:
                tally.repairs += 1
            segments = payload.get("segments")
            if isinstance(segments, list):
                tally.segments += len(segments)
                tally.shares += sum(len(s.get("shares") or []) for s in segments if isinstance(s, dict))
        elif kind == STORAGE_AUDIT:
            tally.audits += 1
        elif kind == STORAGE_RETRIEVAL:
            tally.retrievals += 1
        else:
            tally.settles += 1


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


__all__ = ["AccessRow", "ConsentRow", "FinalRecord", "LedgerScan", "ScanTotals", "StorageTally"]
