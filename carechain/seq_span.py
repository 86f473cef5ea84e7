"""When to read a device's rows for a set of seqs as one key range rather than one lookup per seq.

The bridge's dedup index and the agent's outbox are both SQLite tables keyed (device_id, seq), read for a
batch's seqs at a time. SQLite plans a row-value `IN (VALUES ...)` as a scan of the whole index, so each reads
one range of the primary key when the seqs are dense (a batch message's are consecutive), else one row per seq.
"""

from __future__ import annotations

from collections.abc import Collection


def dense_span(seqs: Collection[int]) -> tuple[int, int] | None:
    """(lowest, highest) of `seqs` when one range read over them costs less than a lookup per seq, else None."""
    if not seqs:
        return None
    low, high = min(seqs), max(seqs)
    return (low, high) if high - low < 4 * len(seqs) else None
