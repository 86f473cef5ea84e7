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
ledger into it from a `LogSource` (chain_bridge.ledger.log_source): for SQLite, inside one read
transaction on a read-only connection, so a running bridge can keep appending while it is audited, and
the file is never written.

Across cores: the ordered part (leaf hashes, the tree, checkpoints, the registry replay) stays in this
process; each event's own checks (its COSE and payload decode, its Ed25519 signature under the key the
ordered part resolved for it) go to worker processes in chunks, a bounded window of them in flight, and
their results are taken in index order, so the first failure named is the one the sequential audit names.
Incremental: the auditor's state at its last checkpoint (`AuditState`) can be saved to a file and resumed
from, so that a later audit only reads the entries appended since.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from carechain import envelope
from carechain.cbor import bstr_header
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
from carechain.events import EventPayload, PayloadError, validate_payload
from carechain.files import write_atomic
from carechain.identity import device_id_for
from carechain.merkle import EMPTY_ROOT, ProofError, frontier_root, leaf_hash, node_hash, verify_consistency
from carechain.proofs import VerificationError, verify_checkpoint
from carechain.sqlite_store import LEDGER, store_error
from carechain.tiles import consistency_ranges  # the proof's leaf ranges, as the tiles serve them
from chain_bridge.ledger.log_source import LogSource, SqliteLogSource

M = TypeVar("M", bound=BaseModel)
# Entries in a log may be larger than the wire default (limits.max_event_bytes goes up to 1 MiB).
_MAX_ENTRY_COSE = 1 << 20
_OPERATOR_CONTRACT_ENTRIES = frozenset({PARTY_REGISTER, CONTRACT_UPGRADE, SALE_REFUSED, STORAGE_AUDIT})
# The leading bytes of an event leaf as `Entry.encode` and `envelope.sign` lay it out, up to the signer's kid:
# {"t": "event", "cose": bstr(18([bstr({1: -8, 4: kid}), …]))}. Only a hint for the ordered part of a parallel
# audit, which resolves the key from it; the worker decodes the whole leaf strictly and checks the kid again.
_EVENT_LEAF = re.compile(rb"\xa2\x61t\x65event\x64cose(?:\x58.|\x59..|\x5a....)\xd2\x84"
                         rb"((?:[\x40-\x57]|\x58.)\xa2\x01\x27\x04(?:[\x40-\x57]|\x58.)([a-z2-7]{1,64}))\xa0", re.S)
_KID_HEADER = b"\xa2\x01\x27\x04"
STATE_VERSION = 1


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
    resumed_at: int | None = None  # the checkpoint an incremental audit resumed at (entries before it: not read)

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
            "operator_signatures_checked": self.operator_signatures_checked, "resumed_at": self.resumed_at,
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


_COUNTS = ("entries", "events", "registrations", "revocations", "contract_entries", "refused_sales", "checkpoints",
           "consistency_proofs")


@dataclass
class AuditState:
    """An audit as of a verified checkpoint, to resume from: the signed note, the tree as its frontier, the
    device registry and the counts so far, and the keys it was checked with. Nothing in it is trusted on
    load: the note is verified again with the log key and the frontier must give its root."""

    log_key: bytes
    operator_keys: dict[str, bytes] | None
    note: str
    tree_size: int
    frontier: list[tuple[int, int, bytes]]
    devices: dict[str, tuple[bytes, int, int | None]]  # id → (public key, registered leaf, revoked leaf)
    counts: dict[str, int]

    def encode(self) -> bytes:
        operators = self.operator_keys
        raw = {
            "version": STATE_VERSION, "log_key": self.log_key.hex(), "note": self.note, "tree_size": self.tree_size,
            "operator_keys": None if operators is None else {k: v.hex() for k, v in operators.items()},
            "frontier": [[s, w, h.hex()] for s, w, h in self.frontier],
            "devices": {d: [pk.hex(), reg, rev] for d, (pk, reg, rev) in self.devices.items()},
            "counts": self.counts,
        }
        return json.dumps({**raw, "digest": _digest(raw)}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> AuditState:
        """Raises AuditFailure("state", …) for anything that is not a state of this version."""
        try:
            raw = json.loads(data)
            if raw.get("version") != STATE_VERSION:
                raise AuditFailure("state", f"format version {raw.get('version')!r} is not {STATE_VERSION}: "
                                            "audit the log without it to write a new one")
            if raw.pop("digest", None) != _digest(raw):  # the registry is not covered by the signed note
                raise AuditFailure("state", "its digest does not match its contents: the file is damaged; audit "
                                            "the log without it")
            ops = raw["operator_keys"]
            counts = {k: int(raw["counts"][k]) for k in _COUNTS}
            return cls(bytes.fromhex(raw["log_key"]),
                       None if ops is None else {str(k): bytes.fromhex(v) for k, v in ops.items()},
                       str(raw["note"]), int(raw["tree_size"]),
                       [(int(s), int(w), bytes.fromhex(h)) for s, w, h in raw["frontier"]],
                       {str(d): (bytes.fromhex(pk), int(reg), None if rev is None else int(rev))
                        for d, (pk, reg, rev) in raw["devices"].items()}, counts)
        except AuditFailure:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuditFailure("state", f"not a readable audit state ({type(exc).__name__}: {exc}): the file is "
                                        "damaged; audit the log without it") from None

    def save(self, path: Path) -> None:
        write_atomic(path, self.encode())  # mode 0600: it names every device of the log

    @classmethod
    def load(cls, path: Path) -> AuditState:
        try:
            return cls.decode(Path(path).read_bytes())
        except OSError as exc:
            raise AuditFailure("state", f"cannot read {path}: {exc.strerror}") from None


def _digest(raw: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def _is_frontier(frontier: list[tuple[int, int, bytes]], size: int) -> bool:
    """One complete subtree per set bit of `size`, largest first, side by side from leaf 0."""
    start = 0
    for (s, w, h), bit in zip(frontier, [1 << b for b in reversed(range(size.bit_length())) if size >> b & 1],
                              strict=False):
        if s != start or w != bit or len(h) != 32:
            return False
        start += w
    return start == size and len(frontier) == size.bit_count()


# (device, seq) pairs → the leaf the store's events index gives each (pairs without a row are left out).
EventIndexes = Callable[[Sequence[tuple[str, int]]], dict[tuple[str, int], int]]
INDEX_BATCH = 1024  # events index checks per query: one round trip per batch, not per event (PostgreSQL)


class LogAuditor:
    """Feed `entry` for indexes 0, 1, 2, … and `checkpoint` whenever `size` equals a checkpoint's size."""

    def __init__(self, log_public_key: bytes, *, operator_keys: dict[str, bytes] | None = None,
                 event_indexes: EventIndexes | None = None) -> None:
        """`operator_keys` (kid → public key) are trusted for registrations; None: their signers are not
        checked. `event_indexes` looks events up in the store's (device, seq) index, to check it too: the
        checks are held back and made INDEX_BATCH at a time, one query each (`flush_index_checks`)."""
        self.log_public_key = log_public_key
        self.operator_keys = operator_keys
        self.event_indexes = event_indexes
        self._index_checks: list[tuple[int, str, int]] = []  # (leaf, device, seq) not looked up yet
        self.report = AuditReport(operator_signatures_checked=operator_keys is not None)
        self.devices: dict[str, _Device] = {}
        self._frontier: list[tuple[int, int, bytes]] = []  # (start, width, hash), widths strictly decreasing
        self._pending: _Pending | None = None
        # At the last checkpoint verified: its note, the frontier and the report then (see `state`).
        self._saved: tuple[str, tuple[tuple[int, int, bytes], ...], AuditReport] | None = None

    @property
    def size(self) -> int:
        return self.report.entries

    # -- entries -------------------------------------------------------------------------------------

    def entry(self, index: int, entry_type: str, stored_hash: bytes, data: bytes) -> None:
        """Check the entry stored at `index` (its type and leaf hash as the store has them, and its bytes)."""
        h = self._leaf(index, stored_hash, data)
        entry, msg = _parse_entry(index, data)
        if entry.type != entry_type:
            raise AuditFailure(f"leaf {index}", f"stored as type {entry_type!r} but the leaf says {entry.type!r}",
                               index)
        if entry.type == ENTRY_EVENT:
            device, problem = self._device_for(msg.kid)
            event = _check_event(index, msg, device.public_key if device else None,
                                 device.registered_idx if device else None, problem)
            self.check_event_index(index, event.dev, event.seq)
            self.report.events += 1
        elif entry.type == ENTRY_REGISTER:
            self._registration(index, msg)
        elif entry.type == ENTRY_REVOKE:
            self._revocation(index, msg)
        else:
            self._contract_entry(index, entry.type, msg)
        self._append_leaf(h)

    def defer_event(self, index: int, entry_type: str, stored_hash: bytes, data: bytes) -> EventJob | None:
        """`entry`, except that an event laid out as `envelope.sign` writes it is returned as a job for
        `verify_events` (its decode and signature: the expensive, stateless part), with the key the
        registry gives its signer *now*; the caller passes each result to `check_event_index`, in order.
        Anything else is checked here and now (None)."""
        h = self._leaf(index, stored_hash, data)
        kid = _event_kid(data) if entry_type == ENTRY_EVENT else None
        if kid is None:
            self.entry(index, entry_type, stored_hash, data)
            return None
        device, problem = self._device_for(kid)
        self._append_leaf(h)
        self.report.events += 1  # counted now, so a checkpoint's state is exact; a failure stops the audit
        return EventJob(index, data, kid, device.public_key if device else None,
                        device.registered_idx if device else None, problem)

    def _leaf(self, index: int, stored_hash: bytes, data: bytes) -> bytes:
        if index != self.size:
            raise AuditFailure(f"leaf {self.size}", f"{_missing(self.size, index)} from the store (the next "
                                                    f"stored is {index})", self.size)
        h = leaf_hash(data)
        if h != stored_hash:
            raise AuditFailure(f"leaf {index}", "the stored entry bytes do not hash to the stored leaf hash: the "
                                                "entry (or its hash) was altered after it was appended", index)
        return h

    def _device_for(self, kid: str) -> tuple[_Device | None, str | None]:
        """The device an event signed by `kid` comes from, at this point of the log, and why it may not sign."""
        device = self.devices.get(kid)
        if device is None:
            return None, f"event from device {kid}, which no earlier entry registers"
        if device.revoked_idx is not None:
            return device, f"event from device {kid} after its revocation at leaf {device.revoked_idx}"
        return device, None

    def check_event_index(self, index: int, device_id: str, seq: int) -> None:
        """The store's (device, seq) index must point at the event's leaf: checked with the next batch."""
        if self.event_indexes is not None:
            self._index_checks.append((index, device_id, seq))
            if len(self._index_checks) >= INDEX_BATCH:
                self.flush_index_checks()

    def flush_index_checks(self) -> None:
        """Look the checks held back up in one query; raise for the first (in leaf order) that fails. A caller
        that meets a failure flushes first: a held-back check belongs to an earlier leaf."""
        checks, self._index_checks = self._index_checks, []
        if not checks or self.event_indexes is None:
            return
        stored = self.event_indexes([(device_id, seq) for _index, device_id, seq in checks])
        for index, device_id, seq in checks:
            found = stored.get((device_id, seq))
            if found != index:
                what = "has no row for it" if found is None else f"points to leaf {found}"
                raise AuditFailure(f"leaf {index}", f"the events index ({device_id}, seq {seq}) {what}", index)

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
        if self.event_indexes is not None and self.event_indexes([(event.dev, event.seq)]).get(
                (event.dev, event.seq)) != index:
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

    @property
    def root(self) -> bytes:
        """The root of the entries fed so far."""
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
        root = self.root
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
        self._saved = (note, tuple(self._frontier), replace(r))
        self.expect_next(next_size)

    def expect_next(self, next_size: int | None) -> None:
        """At a verified checkpoint: assemble the consistency proof to the one at `next_size` as leaves come."""
        self._pending = None
        if next_size is not None:
            size, root = self.size, self.root
            wanted = {(s, e - s) for s, e in consistency_ranges(size, next_size)
                      if s >= size and (e - s) & (e - s - 1) == 0}
            self._pending = _Pending(size, root, {(s, w): h for s, w, h in self._frontier}, wanted)

    def finish(self) -> AuditReport:
        self.flush_index_checks()
        self.report.root = self.root
        return self.report

    # -- incremental audits --------------------------------------------------------------------------

    def state(self) -> AuditState | None:
        """What a later audit needs to resume at the last checkpoint verified (None: none was)."""
        if self._saved is None:
            return None
        note, frontier, report = self._saved
        size = report.entries
        devices = {d: (dev.public_key, dev.registered_idx,
                       dev.revoked_idx if dev.revoked_idx is not None and dev.revoked_idx < size else None)
                   for d, dev in self.devices.items() if dev.registered_idx < size}
        counts = {name: getattr(report, name) for name in _COUNTS}
        return AuditState(self.log_public_key, self.operator_keys, note, size, list(frontier), devices, counts)

    @classmethod
    def resume(cls, state: AuditState, log_public_key: bytes, *, operator_keys: dict[str, bytes] | None = None,
               event_indexes: EventIndexes | None = None) -> LogAuditor:
        """An auditor at the checkpoint `state` was saved at, once its note and frontier are checked again."""
        if state.log_key != log_public_key:
            raise AuditFailure("state", "it was saved for another log key: audit this log without it")
        if state.operator_keys != operator_keys:
            raise AuditFailure("state", "it was saved with other trusted operator keys (--operator-key): resume "
                                        "with the same ones, or audit the log without it")
        try:
            cp = verify_checkpoint(state.note, log_public_key)
        except VerificationError as exc:
            raise AuditFailure("state", f"its checkpoint's signature does not verify with the log key ({exc})"
                               ) from None
        if (cp.tree_size != state.tree_size or state.counts["entries"] != state.tree_size
                or not _is_frontier(state.frontier, state.tree_size)):
            raise AuditFailure("state", f"its tree (size {state.tree_size}) is not that of its checkpoint "
                                        f"(size {cp.tree_size}): the file is damaged")
        auditor = cls(log_public_key, operator_keys=operator_keys, event_indexes=event_indexes)
        auditor._frontier = list(state.frontier)
        if auditor.root != cp.root_hash:
            raise AuditFailure("state", f"its frontier does not give the signed root of its checkpoint at tree "
                                        f"size {cp.tree_size}: the file is damaged")
        auditor.report = AuditReport(origin=cp.origin, last_checkpoint_size=cp.tree_size,
                                     operator_signatures_checked=operator_keys is not None, resumed_at=cp.tree_size)
        for name, value in state.counts.items():
            setattr(auditor.report, name, value)
        auditor.devices = {d: _Device(pk, reg, rev) for d, (pk, reg, rev) in state.devices.items()}
        auditor._saved = (state.note, tuple(auditor._frontier), replace(auditor.report))
        return auditor


def _missing(first: int, end: int) -> str:
    return f"entry {first} is missing" if end == first + 1 else f"entries {first}..{end - 1} are missing"


def _parse_entry(index: int, data: bytes) -> tuple[Entry, envelope.Sign1]:
    try:
        entry = Entry.decode(data)
        return entry, envelope.parse(entry.cose, max_bytes=_MAX_ENTRY_COSE)
    except (EntryError, envelope.EnvelopeError) as exc:
        raise AuditFailure(f"leaf {index}", f"not a well-formed carechain entry: {exc}", index) from None


def _check_event(index: int, msg: envelope.Sign1, public_key: bytes | None, registered_idx: int | None,
                 problem: str | None) -> EventPayload:
    """An event's own checks, in the order the audit names them, with its signer's key as registered at
    `registered_idx` (None: not registered); `problem`: why its device may not sign."""
    where = f"leaf {index}"
    try:
        event = validate_payload(msg.payload)
    except PayloadError as exc:
        raise AuditFailure(where, f"event payload is not valid ({exc})", index) from None
    if event.dev != msg.kid:
        raise AuditFailure(where, f"event payload dev {event.dev!r} differs from its signer kid {msg.kid!r}", index)
    if problem is not None or public_key is None:
        raise AuditFailure(where, problem or f"event from device {event.dev}, which no earlier entry registers",
                           index)
    if not msg.verify(public_key):
        raise AuditFailure(where, f"the event's signature does not verify with the key registered for "
                                  f"{event.dev} at leaf {registered_idx}", index)
    return event


def _event_kid(data: bytes) -> str | None:
    """The signer kid of an event leaf laid out exactly as `sign` writes it, else None (see _EVENT_LEAF)."""
    m = _EVENT_LEAF.match(data)
    if m is None:
        return None
    kid = m[2]
    protected = _KID_HEADER + bstr_header(len(kid)) + kid
    return kid.decode("ascii") if m[1] == bstr_header(len(protected)) + protected else None


@dataclass(frozen=True)
class EventJob:
    """An event leaf's own checks, for a worker: its bytes, and its signer's device as the registry had it
    at that leaf (`problem` says why it may not sign: unregistered, revoked)."""

    index: int
    data: bytes
    kid: str
    public_key: bytes | None
    registered_idx: int | None
    problem: str | None


# (index, device id, seq) of each event that passed; then (index, problem) of the first that did not, if any.
EventResults = tuple[list[tuple[int, str, int]], tuple[int, str] | None]


def verify_events(jobs: list[EventJob]) -> EventResults:
    """Check events in order (in a worker process) and stop at the first that fails."""
    done: list[tuple[int, str, int]] = []
    for job in jobs:
        try:
            _entry, msg = _parse_entry(job.index, job.data)
            if msg.kid != job.kid:  # cannot happen when _EVENT_LEAF matched; never trust a hint
                raise AuditFailure(f"leaf {job.index}", f"signer kid {msg.kid!r} is not the kid its header shows",
                                   job.index)
            event = _check_event(job.index, msg, job.public_key, job.registered_idx, job.problem)
        except AuditFailure as exc:
            return done, (job.index, exc.problem)
        done.append((job.index, event.dev, event.seq))
    return done, None


# -- the shell: a log source in, worker processes, the state file -------------------------------------

DEFAULT_CHUNK = 2048  # events per job sent to a worker: large enough that pickling is small beside verifying


def audit_ledger(source: Path | LogSource, log_public_key: bytes, *, operator_keys: dict[str, bytes] | None = None,
                 on_progress: Callable[[int, int], None] | None = None, workers: int = 0,
                 state_file: Path | None = None, chunk: int = DEFAULT_CHUNK) -> AuditReport:
    """Audit a ledger: the SQLite file at `source`, or any `LogSource`; raises AuditFailure (first problem) or
    StoreError (an unreadable SQLite file).

    `workers`: processes that check event signatures (0: all in this process). `state_file`: resume from
    the state saved there, if it exists, and save the state at the last checkpoint there after a successful
    audit. `on_progress(done, total)` is called every few thousand entries.
    """
    if not isinstance(source, (str, Path)):
        return _audit(source, log_public_key, operator_keys, on_progress, workers, state_file, chunk)
    path = Path(source)
    if not path.exists():
        raise AuditFailure("store", f"no ledger at {path}")
    try:
        with SqliteLogSource(path) as log:
            return _audit(log, log_public_key, operator_keys, on_progress, workers, state_file, chunk)
    except sqlite3.DatabaseError as exc:
        raise store_error(path, LEDGER, exc) from None


class _EventVerifier:
    """Events' own checks on `workers` processes, a bounded window of chunks in flight, results applied in
    index order. Without workers, or for a log too short to fill a chunk, they run in this process."""

    def __init__(self, workers: int, chunk: int, on_verified: Callable[[int, str, int], None]) -> None:
        self._workers = workers
        self._chunk_size = chunk
        self._on_verified = on_verified
        self._chunk: list[EventJob] = []
        self._in_flight: deque[Future[EventResults]] = deque()
        self._pool: ProcessPoolExecutor | None = None

    def add(self, job: EventJob) -> None:
        self._chunk.append(job)
        if len(self._chunk) >= self._chunk_size:
            self._submit()

    def _submit(self) -> None:
        if self._pool is None:
            # forkserver: a worker never inherits this process's threads (a progress bar's) or connections;
            # the server imports this module once, so each worker starts without importing it again.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._pool = ProcessPoolExecutor(self._workers, mp_context=context, initializer=_exit_with,
                                             initargs=(os.getpid(),))
        self._in_flight.append(self._pool.submit(verify_events, self._chunk))
        self._chunk = []
        while len(self._in_flight) > 2 * self._workers:  # bounded memory: wait for the oldest
            self._apply(self._in_flight.popleft().result())

    def _apply(self, results: EventResults) -> None:
        done, failure = results
        try:
            for index, device_id, seq in done:
                self._on_verified(index, device_id, seq)
            if failure is not None:
                raise AuditFailure(f"leaf {failure[0]}", failure[1], failure[0])
        except AuditFailure:
            # The first failure: later chunks' results must not be taken for it, nor waited for.
            for future in self._in_flight:
                future.cancel()
            self._in_flight.clear()
            self._chunk = []
            raise

    def drain(self) -> None:
        """Apply every result still pending, in order; raises the first failure among them."""
        chunk, self._chunk = self._chunk, []
        if self._pool is not None and chunk:
            self._in_flight.append(self._pool.submit(verify_events, chunk))
            chunk = []
        while self._in_flight:
            self._apply(self._in_flight.popleft().result())
        if chunk:
            self._apply(verify_events(chunk))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _exit_with(auditor_pid: int) -> None:
    """In a worker: exit once the auditing process is gone. A worker killed with it is fine, but one whose
    auditor was killed alone (SIGTERM, SIGKILL) would otherwise wait on its task queue forever."""
    def watch() -> None:
        while True:
            time.sleep(1)
            try:
                os.kill(auditor_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-auditor", daemon=True).start()


def _audit(log: LogSource, log_public_key: bytes, operator_keys: dict[str, bytes] | None,
           on_progress: Callable[[int, int], None] | None, workers: int, state_file: Path | None,
           chunk: int) -> AuditReport:
    total = log.size()
    if state_file is not None and Path(state_file).exists():
        state = AuditState.load(state_file)
        auditor = LogAuditor.resume(state, log_public_key, operator_keys=operator_keys,
                                    event_indexes=log.event_indexes)
        checkpoints = _resumed_checkpoints(log, state, auditor, total)
    else:
        auditor = LogAuditor(log_public_key, operator_keys=operator_keys, event_indexes=log.event_indexes)
        checkpoints = log.checkpoints(0)
    verifier = _EventVerifier(workers, chunk, auditor.check_event_index) if workers > 0 else None
    try:
        _stream(log, auditor, checkpoints, verifier, on_progress, total)
    except AuditFailure as failure:
        # An earlier leaf's failure is the first one: still in a worker, or an index check held back.
        first = failure
        try:
            if verifier is not None:
                verifier.drain()
        except AuditFailure as earlier:
            first = earlier
        try:
            auditor.flush_index_checks()
        except AuditFailure as earlier:
            first = earlier
        if first is failure:
            raise
        raise first from None
    finally:
        if verifier is not None:
            verifier.close()
    report = auditor.finish()
    _check_registry_table(log, auditor)
    indexed = log.count_events()
    if indexed != report.events + report.refused_sales:
        raise AuditFailure("events index", f"has {indexed} rows but the log holds {report.events} events and "
                                           f"{report.refused_sales} refused sales")
    if state_file is not None:
        saved = auditor.state()
        if saved is not None:
            saved.save(Path(state_file))
    return report


def _stream(log: LogSource, auditor: LogAuditor, checkpoints: Iterator[tuple[int, bytes, str]],
            verifier: _EventVerifier | None, on_progress: Callable[[int, int], None] | None, total: int) -> None:
    """Feed the entries from the auditor's size on, and each checkpoint when the log reaches its size."""
    cp = next(checkpoints, None)

    def checkpoints_at_size() -> None:
        nonlocal cp
        while cp is not None and cp[0] <= auditor.size:
            following = next(checkpoints, None)
            auditor.checkpoint(cp[0], cp[1], cp[2], following[0] if following else None)
            cp = following

    checkpoints_at_size()
    for n, (idx, entry_type, stored_hash, data) in enumerate(log.entries(auditor.size), 1):
        if verifier is None:
            auditor.entry(idx, entry_type, stored_hash, data)
        elif job := auditor.defer_event(idx, entry_type, stored_hash, data):
            verifier.add(job)
        if cp is not None and cp[0] == auditor.size:  # (a failure here first waits for the leaves before it)
            checkpoints_at_size()
        if on_progress is not None and n % 4096 == 0:
            on_progress(auditor.size, total)
    if verifier is not None:
        verifier.drain()
    if cp is not None:  # a checkpoint beyond the stored entries: the log was truncated
        auditor.checkpoint(cp[0], cp[1], cp[2])
    if on_progress is not None:
        on_progress(auditor.size, total)


def _resumed_checkpoints(log: LogSource, state: AuditState, auditor: LogAuditor, total: int
                         ) -> Iterator[tuple[int, bytes, str]]:
    """The log's checkpoints after the one `state` was saved at, once the log is shown to still hold it."""
    size = state.tree_size
    again = "audit it without --state"
    if total < size:
        raise AuditFailure("state", f"it was saved at tree size {size} but the log holds only {total} entries: it "
                                    f"is another log, or this one lost entries; {again}")
    checkpoints = log.checkpoints(size)
    first = next(checkpoints, None)
    if first is None or first[0] != size:
        raise AuditFailure("state", f"the log has no checkpoint at tree size {size}, where the state was saved: "
                                    f"it is another log, or this one was rewritten; {again}")
    if first[1] != auditor.root:
        raise AuditFailure("state", f"the log's checkpoint at tree size {size} has another root than the one the "
                                    f"state was saved at: it is another log, or this one was rewritten; {again}")
    following = next(checkpoints, None)
    auditor.expect_next(following[0] if following else None)
    return chain([following] if following else [], checkpoints)


def _check_registry_table(log: LogSource, auditor: LogAuditor) -> None:
    """The bridge trusts its `devices` table for every event: it must say what the log's entries say."""
    rows = log.devices()
    for device_id, public_key, registered_idx, revoked_idx in rows:
        d = auditor.devices.get(device_id)
        if d is None:
            raise AuditFailure("devices table", f"device {device_id} has a row but no registration in the log")
        if (public_key, registered_idx, revoked_idx) != (d.public_key, d.registered_idx, d.revoked_idx):
            raise AuditFailure("devices table", f"the row for {device_id} (registered at {registered_idx}, "
                                                f"revoked at {revoked_idx}) differs from the log (registered "
                                                f"at leaf {d.registered_idx}, revoked at {d.revoked_idx}, or "
                                                "another public key)")
    if len(rows) != len(auditor.devices):
        raise AuditFailure("devices table", f"has {len(rows)} rows but the log registers "
                                            f"{len(auditor.devices)} devices")
