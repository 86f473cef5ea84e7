"""Each device's status report to the bridge: its outbox depth and battery level, signed with its own key.

A device reports when its link comes up, every `interval_s` while it is up, and once more when the agent
stops cleanly (carechain.device_status). Reports are QoS 0 and never queued: a device that is offline skips
its report, and the next one after reconnecting says how much waits in the outbox then. A report costs one
outbox count and one signature on the agent's event loop, at most once per `MIN_SPACING_S` per device, and
never fails the agent: a failure is counted and logged, and the events flow on.

`StatusReporter` decides when and builds the bytes (no network); `run` is its timer, and the agent hands it
a `publish(device_id, topic, payload) -> bool` that puts one QoS 0 message on that device's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from carechain import topics
from carechain.device_status import sign_status
from carechain.identity import Identity

log = logging.getLogger("carechain.agent.status")

# The bridge refuses a device's status sooner than 0.5 s after its last one; a link that flaps, or a stop
# right after a tick, must not trip that.
MIN_SPACING_S = 1.0
# The outbox's depth: one number for the agent (every device reports it), or one per device.
OutboxDepth = Callable[[], int | Mapping[str, int]]
Publish = Callable[[str, str, bytes], bool]


@dataclass
class StatusStats:
    sent: int = 0
    offline: int = 0  # reports skipped because the device's link was down (statuses are never queued)
    failed: int = 0  # reports not built or not handed to the client (outbox unreadable, client refused)


class StatusReporter:
    """When each device reports, and what it says. `battery_of(device_id)` is the level the device's source
    last read (None when it has no battery service); `clock_ms` stamps reports, `monotonic` spaces them."""

    def __init__(self, identities: Mapping[str, Identity], outbox_depth: OutboxDepth,
                 battery_of: Callable[[str], int | None], *, interval_s: float = 30.0,
                 clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if interval_s < MIN_SPACING_S:
            raise ValueError(f"status interval {interval_s} s is below the minimum of {MIN_SPACING_S} s")
        self.identities = dict(identities)
        self.outbox_depth = outbox_depth
        self.battery_of = battery_of
        self.interval_s = interval_s
        self.stats = StatusStats()
        self._clock_ms = clock_ms
        self._monotonic = monotonic
        self._sent_at: dict[str, float] = {}
        self._last_ts: dict[str, int] = {}
        self._link_up: set[str] = set()

    def messages(self, device_ids: Iterable[str]) -> list[tuple[str, str, bytes]]:
        """(device id, topic, signed status) for each of `device_ids` not reported within MIN_SPACING_S."""
        now = self._monotonic()
        due = [d for d in device_ids
               if d in self.identities and now - self._sent_at.get(d, -MIN_SPACING_S) >= MIN_SPACING_S]
        if not due:
            return []
        depth = self.outbox_depth()
        out = []
        for device_id in due:
            waiting = depth if isinstance(depth, int) else depth.get(device_id, 0)
            # Strictly increasing per device even if the wall clock steps back: the bridge keeps the newest.
            ts = max(self._clock_ms(), self._last_ts.get(device_id, -1) + 1)
            payload = sign_status(self.identities[device_id], ts, waiting, self._battery(device_id))
            self._last_ts[device_id] = ts
            self._sent_at[device_id] = now
            out.append((device_id, topics.status(device_id), payload))
        return out

    def _battery(self, device_id: str) -> int | None:
        level = self.battery_of(device_id)
        return level if isinstance(level, int) and 0 <= level <= 100 else None

    def report(self, device_ids: Iterable[str], connected: Collection[str], publish: Publish) -> int:
        """Publish the due reports of `device_ids` that are `connected` (the others are skipped, not queued);
        how many were handed to their clients. Never raises: a failure is counted and logged."""
        wanted = list(device_ids)
        online = [d for d in wanted if d in connected]
        self.stats.offline += len(wanted) - len(online)
        try:
            messages = self.messages(online)
            sent = sum(1 for device_id, topic, payload in messages if publish(device_id, topic, payload))
        except Exception:  # an unreadable outbox must not stop the events: the next report tries again
            self.stats.failed += 1
            log.exception("could not build or publish the devices' status reports; trying again at the next one")
            return 0
        self.stats.failed += len(messages) - sent  # the client refused them (its link just dropped)
        self.stats.sent += sent
        return sent

    def link_up(self, device_id: str) -> None:
        """`device_id`'s link came up: it reports at `run`'s next turn (within MIN_SPACING_S), together with the
        others that came up meanwhile. One outbox query serves them all: a fleet of 1,000 devices reconnecting
        at once costs one, not 1,000 (each scans the outbox)."""
        self._link_up.add(device_id)

    async def run(self, stop: asyncio.Event, connected: Callable[[], Collection[str]], publish: Publish) -> None:
        """Report every connected device every `interval_s`, and devices whose link came up (`link_up`) within
        MIN_SPACING_S, until `stop` (the stop report is the agent's call to `report`)."""
        next_all = self._monotonic() + self.interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=MIN_SPACING_S)
            if stop.is_set():
                break
            if self._monotonic() >= next_all:
                next_all = self._monotonic() + self.interval_s
                self._link_up.clear()
                self.report(self.identities, connected(), publish)
            elif self._link_up:
                came_up, self._link_up = self._link_up, set()
                self.report(came_up, connected(), publish)
