"""Sans-IO packing of due events into MQTT messages: one device's events share a batch message.

The send window decides *which* events go (per event, bounded); `Uplink` decides *how*: the due events of
each device are packed greedily into batch messages (carechain.batch) of at most `max_events` events and
`max_bytes` bytes, and a group of one goes as a plain single-event message, which every bridge reads. Events
due together (a backlog drained after an outage, resends) are always packed; nothing waits for that. With
`linger_ms` > 0, a device's last, not yet full group also waits up to that long for fresh events to share
its message (live traffic); `wait_s` tells the send loop when the oldest waiting group is due.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from carechain.batch import encode_batch, pack
from edge_agent.outbox import Pending


def _wire(row: Pending) -> bytes:
    return row.envelope


@dataclass
class Uplink:
    max_events: int
    max_bytes: int
    linger_ms: int = 0
    _lingering: dict[str, tuple[int, list[Pending]]] = field(default_factory=dict)  # device -> (since ms, rows)

    def messages(self, due: Iterable[Pending], now_ms: int) -> list[tuple[str, list[Pending]]]:
        """The messages to publish now, as (device, its rows in order); a device's partial last group may
        be held back (`linger_ms`), and groups held long enough are released."""
        by_device: dict[str, list[Pending]] = {}
        for row in due:
            by_device.setdefault(row.device_id, []).append(row)
        out: list[tuple[str, list[Pending]]] = []
        for device_id, fresh in by_device.items():
            since, held = self._lingering.pop(device_id, (now_ms, []))
            groups = pack(held + fresh, _wire, self.max_events, self.max_bytes)
            last = groups[-1]
            if self.linger_ms > 0 and len(last) < self.max_events:
                if len(held) + len(fresh) - len(last) >= len(held):  # the held rows left in full groups
                    since = now_ms
                if now_ms - since < self.linger_ms:
                    self._lingering[device_id] = (since, groups.pop())
            out += [(device_id, g) for g in groups]
        for device_id, (since, rows) in list(self._lingering.items()):
            if now_ms - since >= self.linger_ms:
                del self._lingering[device_id]
                out.append((device_id, rows))
        return out

    def wait_s(self, now_ms: int, tick_s: float) -> float:
        """How long the send loop may sleep: `tick_s`, or less when a lingering group is due sooner."""
        if not self._lingering:
            return tick_s
        first = min(since for since, _ in self._lingering.values()) + self.linger_ms
        return max(0.0, min(tick_s, (first - now_ms) / 1000))

    def refused(self) -> int:
        """The bridge refused one of our batch messages (`bad_batch`: a bridge with lower limits, or one older
        than batching): halve the events per message, down to 1 (the single-event form every bridge reads).
        The refused events are still in flight and go again, smaller, after the resend timeout."""
        self.max_events = max(1, self.max_events // 2)
        return self.max_events

    def drop(self, device_id: str) -> list[Pending]:
        """The rows of a device held back (its link went down): the caller hands them back to the window."""
        return self._lingering.pop(device_id, (0, []))[1]

    @staticmethod
    def payload(rows: Sequence[Pending]) -> bytes:
        """The message for one device's rows: a single event as it is, several as a batch message."""
        return rows[0].envelope if len(rows) == 1 else encode_batch([r.envelope for r in rows])
