"""Full audit of a ledger store, as an auditor would do it: `carechain verify --full`.

`LogAuditor` is sans-IO: it is fed the stored entries in index order and each stored checkpoint when the
log reaches its size, and raises `AuditFailure` at the first thing that is wrong. It re-derives every leaf
hash from the stored bytes and every tree head from those hashes, checks each checkpoint's signature with
the log key and its root against the re-derived root, checks a consistency proof between consecutive
checkpoints with the offline verifier (`carechain.merkle.verify_consistency`), and re-verifies each
event's COSE signature with the key registered for its device at that point of the log (registrations and
revocations are log entries too, replayed as it goes). Contract entries (contract_rules) must be
well-formed COSE and, where an operator signs them, carry a trusted operator's signature; whether the
contracts accept them is for the contract replay (`carechain balance`, the miners), not this audit.

Memory stays bounded whatever the log's length: the tree is kept as its O(log n) "frontier" (the roots of
the complete subtrees the leaves so far form), plus the few nodes the next consistency proof needs; only
the device registry grows, with the number of devices. `audit_ledger` is the thin shell that streams a
SQLite ledger into it, inside one read transaction on a read-only connection, so a running bridge can
keep appending while it is audited, and the file is never written.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from carechain import envelope
from carechain.entries import (
    CONTRACT_ENTRY_TYPES,
    CONTRACT_UPGRADE,
    ENTRY_EVENT,
    ENTRY_REGISTER,
    ENTRY_REVOKE,
    PARTY_REGISTER,
    SALE_REFUSED,
    STORAGE_AUDIT,
    Entry,
    EntryError,
    Registration,
    Revocation,
)
from carechain.events import PayloadError, validate_payload
from carechain.identity import device_id_for
from carechain.merkle import EMPTY_ROOT, ProofError, frontier_root, leaf_hash, node_hash, verify_consistency
from carechain.proofs import VerificationError, verify_checkpoint
from carechain.sqlite_store import LEDGER, check_store, store_error
from carechain.tiles import consistency_ranges  # the proof's leaf ranges, as the tiles serve them

M = TypeVar("M", bound=BaseModel)
# Entries in a log may be larger than the wire default (limits.max_event_bytes goes up to 1 MiB).
_MAX_ENTRY_COSE = 1 << 20
_OPERATOR_CONTRACT_ENTRIES = frozenset({PARTY_REGISTER, CONTRACT_UPGRADE, SALE_REFUSED, STORAGE_AUDIT})


class AuditFailure(Exception):
    """The first problem found: `where` is e.g. "leaf 17" or "checkpoint at tree size 40"."""

    def __init__(self, where: str, problem: str, index: int | None = None) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem
        self.index = index


@dataclass
class AuditReport:
    entries: int = 0
    events: int = 0
    registrations: int = 0
    revocations: int = 0
    contract_entries: int = 0
    refused_sales: int = 0  # sale.refused entries (among contract_entries); each holds its sale's events row
    checkpoints: int = 0
    consistency_proofs: int = 0
    origin: str | None = None
    root: bytes = EMPTY_ROOT
    last_checkpoint_size: int | None = None
    operator_signatures_checked: bool = False

    @property
    def uncovered(self) -> int:
        """Entries after the last checkpoint: hashed and checked, but no signed tree head covers them yet."""
        return self.entries - (self.last_checkpoint_size or 0)

    def as_dict(self) -> dict[str, object]:
        return {
            "entries": self.entries, "events": self.events, "registrations": self.registrations,
            "revocations": self.revocations, "contract_entries": self.contract_entries,
            "refused_sales": self.refused_sales, "checkpoints": self.checkpoints,
            "consistency_proofs": self.consistency_proofs, "origin": self.origin, "root_hash": self.root.hex(),
            "last_checkpoint_size": self.last_checkpoint_size, "uncovered_entries": self.uncovered,
            "operator_signatures_checked": self.operator_signatures_checked,
        }


@dataclass
class _Device:
    public_key: bytes
    registered_idx: int
    revoked_idx: int | None = None


@dataclass
class _Pending:
    """What the consistency proof from checkpoint (size, root) to the next one needs."""

    size: int
    root: bytes
    left: dict[tuple[int, int], bytes]  # the frontier at `size`: complete subtrees (start, width) → hash
    wanted: set[tuple[int, int]] = field(default_factory=set)  # complete subtrees beyond `size`
    found: dict[tuple[int, int], bytes] = field(default_factory=dict)


class LogAuditor:
    """Feed `entry` for indexes 0, 1, 2, … and `checkpoint` whenever `size` equals a checkpoint's size."""

    def __init__(self, log_public_key: bytes, *, operator_keys: dict[str, bytes] | None = None,
                 event_index: Callable[[str, int], int | None] | None = None) -> None:
        """`operator_keys` (kid → public key) are trusted for registrations; None: their signers are not
        checked. `event_index` looks an event up in the store's (device, seq) index, to check it too."""
        self.log_public_key = log_public_key
        self.operator_keys = operator_keys
        self.event_index = event_index
        self.report = AuditReport(operator_signatures_checked=operator_keys is not None)
        self.devices: dict[str, _Device] = {}
        self._frontier: list[tuple[int, int, bytes]] = []  # (start, width, hash), widths strictly decreasing
        self._pending: _Pending | None = None

    @property
    def size(self) -> int:
        return self.report.entries

    # -- entries -------------------------------------------------------------------------------------

    def entry(self, index: int, entry_type: str, stored_hash: bytes, data: bytes) -> None:
        """Check the entry stored at `index` (its type and leaf hash as the store has them, and its bytes)."""
        if index != self.size:
            raise AuditFailure(f"leaf {self.size}", f"{_missing(self.size, index)} from the store (the next "
                                                    f"stored is {index})", self.size)
        where = f"leaf {index}"
        h = leaf_hash(data)
        if h != stored_hash:
            raise AuditFailure(where, "the stored entry bytes do not hash to the stored leaf hash: the entry "
                                      "(or its hash) was altered after it was appended", index)
        try:
            entry = Entry.decode(data)
            msg = envelope.parse(entry.cose, max_bytes=_MAX_ENTRY_COSE)
        except (EntryError, envelope.EnvelopeError) as exc:
            raise AuditFailure(where, f"not a well-formed carechain entry: {exc}", index) from None
        if entry.type != entry_type:
            raise AuditFailure(where, f"stored as type {entry_type!r} but the leaf says {entry.type!r}", index)
        if entry.type == ENTRY_EVENT:
            self._event(index, msg)
        elif entry.type == ENTRY_REGISTER:
            self._registration(index, msg)
        elif entry.type == ENTRY_REVOKE:
            self._revocation(index, msg)
        else:
            self._contract_entry(index, entry.type, msg)
        self._append_leaf(h)

    def _event(self, index: int, msg: envelope.Sign1) -> None:
        where = f"leaf {index}"
        try:
            event = validate_payload(msg.payload)
        except PayloadError as exc:
            raise AuditFailure(where, f"event payload is not valid ({exc})", index) from None
        if event.dev != msg.kid:
            raise AuditFailure(where, f"event payload dev {event.dev!r} differs from its signer kid {msg.kid!r}",
                               index)
        device = self.devices.get(event.dev)
        if device is None:
            raise AuditFailure(where, f"event from device {event.dev}, which no earlier entry registers", index)
        if device.revoked_idx is not None:
            raise AuditFailure(where, f"event from device {event.dev} after its revocation at leaf "
                                      f"{device.revoked_idx}", index)
        if not msg.verify(device.public_key):
            raise AuditFailure(where, f"the event's signature does not verify with the key registered for "
                                      f"{event.dev} at leaf {device.registered_idx}", index)
        if self.event_index is not None:
            stored = self.event_index(event.dev, event.seq)
            if stored != index:
                found = "has no row for it" if stored is None else f"points to leaf {stored}"
                raise AuditFailure(where, f"the events index ({event.dev}, seq {event.seq}) {found}", index)
        self.report.events += 1

    def _operator_entry(self, index: int, msg: envelope.Sign1, model: type[M], what: str) -> M:
        """A registration or revocation: a valid payload, signed by a trusted operator key (when known)."""
        where = f"leaf {index}"
        try:
            payload = model.model_validate(msg.payload)
        except ValidationError as exc:
            raise AuditFailure(where, f"{what} payload is not valid ({exc.errors()[0]['msg']})", index) from None
        if self.operator_keys is not None:
            key = self.operator_keys.get(msg.kid)
            if key is None:
                raise AuditFailure(where, f"{what} signed by {msg.kid}, which is not a trusted operator key", index)
            if not msg.verify(key):
                raise AuditFailure(where, f"{what} signature does not verify with operator key {msg.kid}", index)
        return payload

    def _registration(self, index: int, msg: envelope.Sign1) -> None:
        where = f"leaf {index}"
        reg = self._operator_entry(index, msg, Registration, "registration")
        if device_id_for(reg.pk) != reg.dev:
            raise AuditFailure(where, f"registration binds device id {reg.dev} to a key whose id is "
                                      f"{device_id_for(reg.pk)}", index)
        if reg.dev in self.devices:
            raise AuditFailure(where, f"device {reg.dev} was already registered at leaf "
                                      f"{self.devices[reg.dev].registered_idx}", index)
        self.devices[reg.dev] = _Device(reg.pk, index)
        self.report.registrations += 1

    def _revocation(self, index: int, msg: envelope.Sign1) -> None:
        where = f"leaf {index}"
        rev = self._operator_entry(index, msg, Revocation, "revocation")
        device = self.devices.get(rev.dev)
        if device is None:
            raise AuditFailure(where, f"revokes device {rev.dev}, which no earlier entry registers", index)
        if device.revoked_idx is not None:
            raise AuditFailure(where, f"device {rev.dev} was already revoked at leaf {device.revoked_idx}", index)
        device.revoked_idx = index
        self.report.revocations += 1

    def _contract_entry(self, index: int, entry_type: str, msg: envelope.Sign1) -> None:
        assert entry_type in CONTRACT_ENTRY_TYPES
        if entry_type in _OPERATOR_CONTRACT_ENTRIES and self.operator_keys is not None:
            key = self.operator_keys.get(msg.kid)
            if key is None or not msg.verify(key):
                raise AuditFailure(f"leaf {index}", f"{entry_type} is not signed by a trusted operator key "
                                                    f"(kid {msg.kid})", index)
        if entry_type == SALE_REFUSED:
            self._refused_sale(index, msg)
        self.report.contract_entries += 1

    def _refused_sale(self, index: int, msg: envelope.Sign1) -> None:
        """The wrapped sale must be a well-formed event whose (device, seq) index row points here."""
        where = f"leaf {index}"
        wrapped = msg.payload.get("event") if isinstance(msg.payload, dict) else None
        try:
            event = validate_payload(envelope.parse(wrapped if isinstance(wrapped, bytes) else b"").payload)
        except (envelope.EnvelopeError, PayloadError) as exc:
            raise AuditFailure(where, f"sale.refused does not wrap a well-formed sale ({exc})", index) from None
        if self.event_index is not None and self.event_index(event.dev, event.seq) != index:
            raise AuditFailure(where, f"the events index ({event.dev}, seq {event.seq}) does not point to this "
                                      "refused sale", index)
        self.report.refused_sales += 1

    # -- the tree ------------------------------------------------------------------------------------

    def _append_leaf(self, h: bytes) -> None:
        # carechain.merkle.extend_frontier, plus each node's position: the consistency proof to the next
        # checkpoint is assembled from the complete subtrees made on the way (see `_keep`).
        node = (self.size, 1, h)
        self._keep(node)
        while self._frontier and self._frontier[-1][1] == node[1]:
            start, width, left = self._frontier.pop()
            node = (start, width * 2, node_hash(left, node[2]))
            self._keep(node)
        self._frontier.append(node)
        self.report.entries += 1

    def _keep(self, node: tuple[int, int, bytes]) -> None:
        p = self._pending
        if p is not None and (node[0], node[1]) in p.wanted:
            p.found[(node[0], node[1])] = node[2]

    def _root(self) -> bytes:
        return frontier_root([h for _start, _width, h in self._frontier])

    def _right_edge(self, start: int) -> bytes:
        """MTH of leaves [start, size): the frontier nodes from `start` on, folded right to left."""
        return frontier_root([h for node_start, _width, h in self._frontier if node_start >= start])

    # -- checkpoints ---------------------------------------------------------------------------------

    def checkpoint(self, tree_size: int, stored_root: bytes, note: str, next_size: int | None = None) -> None:
        """Check the checkpoint stored for `tree_size`, now that the log holds exactly that many entries.

        `next_size` is the next checkpoint's size, if any: the consistency proof to it is assembled while
        the entries in between stream past.
        """
        where = f"checkpoint at tree size {tree_size}"
        if tree_size != self.size:
            raise AuditFailure(where, f"the store holds only {self.size} entries: "
                                      f"{_missing(self.size, tree_size)}", self.size)
        try:
            cp = verify_checkpoint(note, self.log_public_key)
        except VerificationError as exc:
            raise AuditFailure(where, f"its signature does not verify with the log key ({exc})") from None
        r = self.report
        if r.origin is None:
            r.origin = cp.origin
        elif cp.origin != r.origin:
            raise AuditFailure(where, f"origin {cp.origin!r} differs from the log's {r.origin!r}")
        if cp.tree_size != tree_size:
            raise AuditFailure(where, f"the signed note is for tree size {cp.tree_size}")
        if cp.root_hash != stored_root:
            raise AuditFailure(where, "the stored root hash differs from the signed note's root")
        root = self._root()
        if cp.root_hash != root:
            raise AuditFailure(where, f"the signed root {cp.root_hash.hex()} is not the root {root.hex()} of "
                                      f"the {tree_size} stored entries: the stored log differs from what was signed")
        p = self._pending
        if p is not None:
            proof = []
            for start, end in consistency_ranges(p.size, tree_size):
                width = end - start
                if end <= p.size:
                    proof.append(p.left[(start, width)])
                elif (start, width) in p.found:
                    proof.append(p.found[(start, width)])
                else:  # the right edge of the new tree: not a complete subtree
                    proof.append(self._right_edge(start))
            try:
                verify_consistency(p.size, tree_size, p.root, cp.root_hash, proof)
            except ProofError as exc:
                raise AuditFailure(where, f"not consistent with the checkpoint at tree size {p.size}: {exc}") from None
            r.consistency_proofs += 1
        r.checkpoints += 1
        r.last_checkpoint_size = tree_size
        self._pending = None
        if next_size is not None:
            wanted = {(s, e - s) for s, e in consistency_ranges(tree_size, next_size)
                      if s >= tree_size and (e - s) & (e - s - 1) == 0}
            self._pending = _Pending(tree_size, cp.root_hash, {(s, w): h for s, w, h in self._frontier}, wanted)

    def finish(self) -> AuditReport:
        self.report.root = self._root()
        return self.report


def _missing(first: int, end: int) -> str:
    return f"entry {first} is missing" if end == first + 1 else f"entries {first}..{end - 1} are missing"


# -- the SQLite shell ---------------------------------------------------------------------------------


def audit_ledger(path: Path, log_public_key: bytes, *, operator_keys: dict[str, bytes] | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> AuditReport:
    """Audit the ledger file at `path`; raises AuditFailure (first problem) or StoreError (unreadable file).

    `on_progress(done, total)` is called every few thousand entries.
    """
    path = Path(path)
    if not path.exists():
        raise AuditFailure("store", f"no ledger at {path}")
    check_store(path, LEDGER)
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=30)
    try:
        # A tampered row may hold text where bytes belong, or bytes that are not UTF-8: read, never fail here.
        db.text_factory = lambda b: b.decode("utf-8", "replace")
        db.execute("BEGIN")  # one snapshot for the whole audit, even while a bridge appends
        return _audit(db, log_public_key, operator_keys, on_progress)
    except sqlite3.DatabaseError as exc:
        raise store_error(path, LEDGER, exc) from None
    finally:
        db.close()


def _audit(db: sqlite3.Connection, log_public_key: bytes, operator_keys: dict[str, bytes] | None,
           on_progress: Callable[[int, int], None] | None) -> AuditReport:
    def event_index(device_id: str, seq: int) -> int | None:
        row = db.execute("SELECT idx FROM events WHERE device_id=? AND seq=?", (device_id, seq)).fetchone()
        return row[0] if row else None

    auditor = LogAuditor(log_public_key, operator_keys=operator_keys, event_index=event_index)
    total = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    checkpoints = db.execute("SELECT tree_size, COALESCE(CAST(root_hash AS BLOB), x''), "
                             "COALESCE(CAST(note AS TEXT), '') FROM checkpoints ORDER BY tree_size")
    cp = checkpoints.fetchone()

    def checkpoints_at_size() -> None:
        nonlocal cp
        while cp is not None and cp[0] <= auditor.size:
            following = checkpoints.fetchone()
            auditor.checkpoint(cp[0], bytes(cp[1]), cp[2], following[0] if following else None)
            cp = following

    checkpoints_at_size()
    rows = db.execute("SELECT idx, CAST(type AS TEXT), COALESCE(CAST(leaf_hash AS BLOB), x''), "
                      "COALESCE(CAST(data AS BLOB), x'') FROM entries ORDER BY idx")
    while batch := rows.fetchmany(1024):
        for idx, entry_type, stored_hash, data in batch:
            auditor.entry(idx, entry_type, bytes(stored_hash), bytes(data))
            if cp is not None and cp[0] == auditor.size:
                checkpoints_at_size()
        if on_progress is not None:
            on_progress(auditor.size, total)
    if cp is not None:  # a checkpoint beyond the stored entries: the log was truncated
        auditor.checkpoint(cp[0], bytes(cp[1]), cp[2])
    report = auditor.finish()
    _check_registry_table(db, auditor)
    (indexed,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
    if indexed != report.events + report.refused_sales:
        raise AuditFailure("events index", f"has {indexed} rows but the log holds {report.events} events and "
                                           f"{report.refused_sales} refused sales")
    return report


def _check_registry_table(db: sqlite3.Connection, auditor: LogAuditor) -> None:
    """The bridge trusts its `devices` table for every event: it must say what the log's entries say."""
    rows = db.execute("SELECT device_id, COALESCE(CAST(public_key AS BLOB), x''), registered_idx, revoked_idx "
                      "FROM devices").fetchall()
    for device_id, public_key, registered_idx, revoked_idx in rows:
        d = auditor.devices.get(device_id)
        if d is None:
            raise AuditFailure("devices table", f"device {device_id} has a row but no registration in the log")
        if (bytes(public_key), registered_idx, revoked_idx) != (d.public_key, d.registered_idx, d.revoked_idx):
            raise AuditFailure("devices table", f"the row for {device_id} (registered at {registered_idx}, "
                                                f"revoked at {revoked_idx}) differs from the log (registered "
                                                f"at leaf {d.registered_idx}, revoked at {d.revoked_idx}, or "
                                                "another public key)")
    if len(rows) != len(auditor.devices):
        raise AuditFailure("devices table", f"has {len(rows)} rows but the log registers "
                                            f"{len(auditor.devices)} devices")
