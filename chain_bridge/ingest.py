"""Sans-IO ingest checks: raw MQTT payload + topic + clock + registry → accepted candidate or rejection.

Order matters for cost and for honesty of the reason: cheap structural checks first, then identity
(registered, not revoked, topic matches the signer), then the signature, then time limits. `check`
needs only the registry, so it can run in parallel worker processes; `SeqGuard` (sequence gaps) and
`RateGuard` (events per second) hold per-device state and run in the one sequencer. Nothing here
touches the network or disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from carechain import envelope
from carechain.config import Limits
from carechain.entries import event_entry
from carechain.events import PayloadError, validate_payload
from carechain.receipts import event_digest
from chain_bridge.ledger.store import DeviceRecord, EventCandidate

# Reasons a device can fix by waiting (e.g. its registration is not yet on the ledger); the agent keeps
# such events and resends. Every other reason is permanent: the agent moves the event to quarantine.
RETRYABLE = frozenset({"unregistered", "rate_limited"})


@dataclass(frozen=True)
class Rejection:
    device_id: str | None  # the device the receipt goes to (from the topic), if any
    seq: int | None
    reason: str
    detail: str
    digest: bytes = b""  # SHA-256 of the refused bytes (see carechain.receipts)

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE


@dataclass
class Ingest:
    """Checks one event at a time against the registry and limits; stateless apart from the registry."""

    limits: Limits
    lookup: Callable[[str], DeviceRecord | None]

    def check(self, topic_device: str, raw: bytes, now_ms: int) -> EventCandidate | Rejection:
        verdict = self._check(topic_device, raw, now_ms)
        if isinstance(verdict, Rejection):
            return replace(verdict, digest=event_digest(raw))
        return verdict

    def _check(self, topic_device: str, raw: bytes, now_ms: int) -> EventCandidate | Rejection:
        try:
            msg = envelope.parse(raw, max_bytes=self.limits.max_event_bytes, max_depth=self.limits.max_cbor_depth)
        except envelope.EnvelopeError as exc:
            return Rejection(topic_device, None, exc.reason, exc.detail)
        seq = msg.payload.get("seq") if isinstance(msg.payload, dict) else None
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        if msg.kid != topic_device:
            return Rejection(topic_device, seq, "topic_mismatch", f"signed by kid {msg.kid[:64]!r}, not this topic")
        device = self.lookup(msg.kid)
        if device is None:
            return Rejection(topic_device, seq, "unregistered", f"device {msg.kid} is not registered")
        if device.revoked:
            return Rejection(topic_device, seq, "revoked", f"device revoked at leaf {device.revoked_idx}")
        if not msg.verify(device.public_key):
            return Rejection(topic_device, seq, "bad_signature", "signature does not verify with the registered key")
        try:
            event = validate_payload(msg.payload)
        except PayloadError as exc:
            return Rejection(topic_device, seq, exc.reason, exc.detail)
        if event.dev != msg.kid:
            return Rejection(topic_device, event.seq, "topic_mismatch", "payload dev differs from the signer kid")
        if event.ts > now_ms + self.limits.max_future_skew_s * 1000:
            return Rejection(topic_device, event.seq, "clock_skew",
                             f"device time is {(event.ts - now_ms) / 1000:.0f} s ahead of the bridge")
        if event.ts < now_ms - self.limits.max_age_s * 1000:
            return Rejection(topic_device, event.seq, "too_old",
                             f"event is {(now_ms - event.ts) / 86_400_000:.1f} days old")
        return EventCandidate(event.dev, event.seq, event_entry(raw).encode(), event_digest(raw), event.kind)


@dataclass
class SeqGuard:
    """Sequencer-side seq limit: a device may not jump more than `max_seq_gap` past its highest seq.

    Reordering and gaps below the limit are fine (outboxes resend out of order; quota policies may drop);
    the limit stops a compromised device from exhausting the seq space or hiding a burst.
    """

    max_seq_gap: int
    last_seq: Callable[[str], int | None]  # highest anchored seq, from the store (cached here)
    _highest: dict[str, int] = field(default_factory=dict)

    def check(self, c: EventCandidate) -> Rejection | None:
        if c.device_id not in self._highest:
            last = self.last_seq(c.device_id)
            self._highest[c.device_id] = -1 if last is None else last
        highest = self._highest[c.device_id]
        if c.seq > highest + self.max_seq_gap:
            return Rejection(c.device_id, c.seq, "seq_gap",
                             f"seq {c.seq} jumps more than {self.max_seq_gap} past {highest}", c.digest)
        return None

    def anchored(self, c: EventCandidate) -> None:
        if c.seq > self._highest.get(c.device_id, -1):
            self._highest[c.device_id] = c.seq


@dataclass
class RateGuard:
    """Sequencer-side per-device rate limit: a token bucket of `burst` tokens refilled at `rate` per second.

    Each event admitted takes one token; with none left the event is refused as `rate_limited`, which is
    retryable: the agent keeps it and resends later. Only devices whose signature verified get here, so
    the table holds at most one small entry per registered device. `clock` (monotonic seconds) is
    injected so tests drive time by hand.
    """

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # device → (tokens, at)

    def check(self, c: EventCandidate) -> Rejection | None:
        """Take a token for `c`, or return the `rate_limited` rejection if the device has none left."""
        now = self.clock()
        tokens, at = self._buckets.get(c.device_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[c.device_id] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            return Rejection(c.device_id, c.seq, "rate_limited",
                             f"more than {self.rate:g} events/s (burst {self.burst}); retry in {wait:.2f} s", c.digest)
        self._buckets[c.device_id] = (tokens - 1.0, now)
        return None

    def refund(self, device_id: str) -> None:
        """Give back the token of an event that turned out to be a duplicate (nothing was appended)."""
        if device_id in self._buckets:
            tokens, at = self._buckets[device_id]
            self._buckets[device_id] = (min(float(self.burst), tokens + 1.0), at)
