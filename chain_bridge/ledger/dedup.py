"""Deduplication, the ingest spine's `sequence` stage: has this (device, seq) been anchored already?

Agents resend until a receipt names an event, so the same bytes arrive again and again; the log must hold
each (device, seq) once and answer a resend with the original leaf index. `Dedup` is that decision, kept
apart from the SQL that stores events: it looks up the committed index through `EventIndex` (the ledger's
`events` table, read inside the append transaction, so another process's commit is seen) and remembers
the events of the batch being appended, which the index does not hold yet. A faster or shared index (a
cache, another store) plugs in as another `EventIndex`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Anchored:
    """Where a (device, seq) already sits: its leaf index and that leaf's hash."""

    index: int
    leaf_hash: bytes


@dataclass(frozen=True)
class Duplicate:
    """The same (device, seq) with the same bytes is anchored at `index`: re-acknowledge, append nothing."""

    index: int


@dataclass(frozen=True)
class Conflict:
    """The (device, seq) is anchored at `index` with *other* bytes (a reused seq, or a recorded refusal)."""

    index: int


class EventIndex(Protocol):
    """The committed (device, seq) → leaf map."""

    def __call__(self, device_id: str, seq: int) -> Anchored | None: ...


@dataclass
class Dedup:
    """One batch's dedup decisions against `index` plus the events accepted earlier in the same batch."""

    index: EventIndex
    _batch: dict[tuple[str, int], Anchored] = field(default_factory=dict)

    def check(self, device_id: str, seq: int, leaf_hash: bytes) -> Duplicate | Conflict | None:
        """None for an event never seen: it may be appended (then `remember` it)."""
        key = (device_id, seq)
        prior = self._batch.get(key) or self.index(device_id, seq)
        if prior is None:
            return None
        return Duplicate(prior.index) if prior.leaf_hash == leaf_hash else Conflict(prior.index)

    def remember(self, device_id: str, seq: int, anchored: Anchored) -> None:
        self._batch[(device_id, seq)] = anchored
