"""The bridge's book of device status reports (outbox depth, battery), for the console and /metrics.

Devices publish a signed status (carechain.device_status) on `cc/v1/dev/{id}/status`, QoS 0. The book accepts
one only from a registered, non-revoked device, signed with its *registered* key, whose topic, payload and
signer name that device, whose time is within bounds and newer than the last one accepted, and that comes
no sooner than `min_interval_ms` after it. Anything else is dropped and counted by reason (`counters`), and
logged at most once per device per `log_every_ms`, so a flood cannot flood the log.

It holds one entry per registered device at most (nothing is kept for an id the registry does not know),
and never touches the ledger: a status is not a reading. paho's thread writes, the console's and the
metrics' threads read (`snapshot`, `counts`); one lock guards the state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from carechain.device_status import (
    DEFAULT_MAX_AGE_MS,
    DEFAULT_MAX_FUTURE_SKEW_MS,
    MAX_STATUS_BYTES,
    StatusError,
    StatusReason,
    parse_status,
)

log = logging.getLogger("carechain.bridge.status")

ACCEPTED = "accepted"
MAX_LOG_KEYS = 4096  # devices (or forged ids) whose last log line time is remembered; more are not logged


class RegisteredKey(Protocol):
    """What the book needs of a registry record (chain_bridge.ledger.store.DeviceRecord has it)."""

    @property
    def public_key(self) -> bytes: ...

    @property
    def revoked(self) -> bool: ...


@dataclass(frozen=True)
class StatusLimits:
    """What a status must satisfy beyond its format; the defaults suit a 30 s reporting interval."""

    max_bytes: int = MAX_STATUS_BYTES
    max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS
    max_age_ms: int = DEFAULT_MAX_AGE_MS
    min_interval_ms: int = 500  # per device, between accepted statuses (bridge receive time)
    log_every_ms: int = 60_000  # per device, between log lines about its refused statuses


@dataclass(frozen=True)
class DeviceStatus:
    """A device's last accepted status, as the console shows it."""

    device_id: str
    outbox_depth: int
    battery_pct: int | None
    reported_ms: int  # when the bridge received it (its clock, not the device's)


@dataclass
class _Last:
    status: DeviceStatus
    device_ts_ms: int


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


class DeviceStatusBook:
    """Accepts device status reports and keeps each registered device's last one.

    `lookup(device_id)` is the bridge's view of the registry (a record with `public_key` and `revoked`, or None);
    `clock_ms` the bridge's wall clock.
    """

    def __init__(self, lookup: Callable[[str], RegisteredKey | None], limits: StatusLimits | None = None,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self.lookup = lookup
        self.limits = limits or StatusLimits()
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._last: dict[str, _Last] = {}
        self._logged_at: dict[str, int] = {}
        # Every reason present from the start: readers copying the counter never see it change size, and
        # /metrics exports a zero rather than nothing.
        self.counters: Counter[str] = Counter({ACCEPTED: 0, **{r.value: 0 for r in StatusReason}})

    def receive(self, device_id_from_topic: str, payload: bytes) -> None:
        """Take one message received on `device_id_from_topic`'s status topic: keep it, or count why not."""
        now = self._clock_ms()
        try:
            self._check(device_id_from_topic, payload, now)
        except StatusError as exc:
            with self._lock:
                self.counters[exc.reason] += 1
                quiet = self._recently_logged(device_id_from_topic, now)
            if not quiet:
                log.info("dropped a status on %.64s's topic: %s (more from it are counted, not logged, for %d s)",
                         device_id_from_topic, exc, self.limits.log_every_ms // 1000)
            return
        with self._lock:
            self.counters[ACCEPTED] += 1

    def _check(self, topic_device: str, payload: bytes, now: int) -> None:
        signed = parse_status(payload, topic_device, max_bytes=self.limits.max_bytes)
        record = self.lookup(topic_device)
        if record is None:
            raise StatusError(StatusReason.UNREGISTERED, "no registration for this device on the ledger")
        if record.revoked:
            raise StatusError(StatusReason.REVOKED, "the device was revoked")
        with self._lock:  # cheap refusals first: a replay or a burst costs no signature check
            last = self._last.get(topic_device)
        if last is not None:
            if signed.report.ts_ms <= last.device_ts_ms:
                raise StatusError(StatusReason.REPLAYED, f"ts {signed.report.ts_ms} is not newer than the last "
                                  f"accepted status's {last.device_ts_ms}")
            if now - last.status.reported_ms < self.limits.min_interval_ms:
                raise StatusError(StatusReason.RATE_LIMITED, f"{now - last.status.reported_ms} ms after the last "
                                  f"accepted status (at least {self.limits.min_interval_ms})")
        report = signed.verified(record.public_key, now, max_future_skew_ms=self.limits.max_future_skew_ms,
                                 max_age_ms=self.limits.max_age_ms)
        status = DeviceStatus(report.device_id, report.outbox, report.battery_pct, now)
        with self._lock:
            current = self._last.get(topic_device)
            # Another thread may have accepted a newer one meanwhile (several paho threads): keep the newest.
            if current is not None and current.device_ts_ms >= report.ts_ms:
                raise StatusError(StatusReason.REPLAYED, "a newer status of this device was accepted meanwhile")
            self._last[topic_device] = _Last(status, report.ts_ms)

    def _recently_logged(self, key: str, now: int) -> bool:
        """With the lock held: whether `key` was logged within `log_every_ms`; if not, note that it is now."""
        at = self._logged_at.get(key)
        if at is not None and now - at < self.limits.log_every_ms:
            return True
        if at is None and len(self._logged_at) >= MAX_LOG_KEYS:
            self._logged_at = {k: t for k, t in self._logged_at.items() if now - t < self.limits.log_every_ms}
            if len(self._logged_at) >= MAX_LOG_KEYS:
                return True  # a flood of distinct ids: counted, not logged
        self._logged_at[key] = now
        return False

    def snapshot(self) -> dict[str, DeviceStatus]:
        """The last accepted status of each device still registered and not revoked, by device id."""
        with self._lock:
            entries = {device: last.status for device, last in self._last.items()}
        gone = [d for d in entries if (record := self.lookup(d)) is None or record.revoked]
        if gone:
            with self._lock:
                for device in gone:
                    self._last.pop(device, None)
        return {d: s for d, s in sorted(entries.items()) if d not in gone}

    def counts(self) -> dict[str, int]:
        """A copy of `counters` (accepted, and refusals by reason) taken under the lock."""
        with self._lock:
            return dict(self.counters)
