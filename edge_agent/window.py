"""Sans-IO send window: which outbox rows to (re)send now, bounded in count and memory.

The uplink may hold at most `size` unacknowledged events. A row that has waited `resend_after_ms`
without a receipt becomes due again (the broker may have dropped it, the bridge may have crashed before
committing); the bridge deduplicates, so resending is always safe.

Rows of a device that cannot send now (its MQTT client is disconnected) are *parked*: skipped without
holding up the other devices, and due again from the oldest one when the device `resume`s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.outbox import Pending

Key = tuple[str, int]


@dataclass
class SendWindow:
    size: int
    resend_after_ms: int
    in_flight: dict[Key, tuple[int, int]] = field(default_factory=dict)  # key -> (sent at ms, row id)
    _cursor: int = 0  # outbox rows with id <= cursor have been sent, are in flight, or are parked
    _parked: dict[str, int] = field(default_factory=dict)  # device -> its oldest skipped row id

    @property
    def room(self) -> int:
        return self.size - len(self.in_flight)

    def _rewind(self, row_id: int) -> None:
        self._cursor = min(self._cursor, row_id - 1)

    def expire(self, now_ms: int) -> int:
        """Forget sends older than the resend timeout so they are picked up again."""
        stale = [(k, rid) for k, (t, rid) in self.in_flight.items() if now_ms - t >= self.resend_after_ms]
        for k, rid in stale:
            del self.in_flight[k]
            self._rewind(rid)
        return len(stale)

    def due(self, fetch: Callable[[int, int], list[Pending]], now_ms: int,
            eligible: Callable[[str], bool] | None = None) -> list[Pending]:
        """Rows to send now: oldest first, skipping those in flight, at most `room` of them.

        A row whose device is not `eligible` is parked instead (see `resume`)."""
        self.expire(now_ms)
        out: list[Pending] = []
        budget = self.room
        while len(out) < budget:
            rows = fetch(self._cursor, max(budget - len(out), 64))
            if not rows:
                break
            for row in rows:
                if len(out) >= budget:
                    break
                self._cursor = row.row_id
                if (row.device_id, row.seq) in self.in_flight:
                    continue
                if eligible is not None and not eligible(row.device_id):
                    self._parked[row.device_id] = min(self._parked.get(row.device_id, row.row_id), row.row_id)
                else:
                    out.append(row)
                    self.in_flight[(row.device_id, row.seq)] = (now_ms, row.row_id)
        return out

    def settled(self, key: Key) -> None:
        self.in_flight.pop(key, None)

    def resume(self, device_id: str) -> None:
        """The device can send again: its parked rows are due from the oldest."""
        row_id = self._parked.pop(device_id, None)
        if row_id is not None:
            self._rewind(row_id)

    def unsent(self, row: Pending) -> None:
        """The transport refused `row` (queue full, disconnected): it is due again at once."""
        self.in_flight.pop((row.device_id, row.seq), None)
        self._rewind(row.row_id)
