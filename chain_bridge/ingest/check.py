"""The `check` stage, sans-IO: raw payload + topic device + clock + registry → candidate or rejection.

Order matters for cost and for honesty of the reason: cheap structural checks first (parse), then identity
(registered, not revoked, topic matches the signer), then the signature (verify), then the payload and
time limits (validate). `Ingest.check` needs only the registry, so it can run in parallel worker
processes; the guards that hold per-device state run in the one sequencer. Nothing here touches the
network or disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from carechain import envelope
from carechain.config import Limits
from carechain.entries import event_entry
from carechain.errors import Reason
from carechain.events import PayloadError, validate_payload
from carechain.receipts import event_digest
from chain_bridge.ingest.verdicts import Rejection, Verdict
from chain_bridge.ledger.store import DeviceRecord, EventCandidate


@dataclass
class Ingest:
    """Checks one event at a time against the registry and limits; stateless apart from the registry."""

    limits: Limits
    lookup: Callable[[str], DeviceRecord | None]

    def check(self, topic_device: str, raw: bytes, now_ms: int) -> Verdict:
        verdict = self._check(topic_device, raw, now_ms)
        if isinstance(verdict, Rejection):
            return replace(verdict, digest=event_digest(raw))
        return verdict

    def _check(self, topic_device: str, raw: bytes, now_ms: int) -> Verdict:
        try:
            msg = envelope.parse(raw, max_bytes=self.limits.max_event_bytes, max_depth=self.limits.max_cbor_depth)
        except envelope.EnvelopeError as exc:
            return Rejection(topic_device, None, exc.reason, exc.detail)
        seq = msg.payload.get("seq") if isinstance(msg.payload, dict) else None
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        if msg.kid != topic_device:
            return Rejection(topic_device, seq, Reason.TOPIC_MISMATCH,
                             f"signed by kid {msg.kid[:64]!r}, not this topic")
        device = self.lookup(msg.kid)
        if device is None:
            return Rejection(topic_device, seq, Reason.UNREGISTERED, f"device {msg.kid} is not registered")
        if device.revoked:
            return Rejection(topic_device, seq, Reason.REVOKED, f"device revoked at leaf {device.revoked_idx}")
        if not msg.verify(device.public_key):
            return Rejection(topic_device, seq, Reason.BAD_SIGNATURE,
                             "signature does not verify with the registered key")
        try:
            event = validate_payload(msg.payload)
        except PayloadError as exc:
            return Rejection(topic_device, seq, exc.reason, exc.detail)
        if event.dev != msg.kid:
            return Rejection(topic_device, event.seq, Reason.TOPIC_MISMATCH, "payload dev differs from the signer kid")
        if event.ts > now_ms + self.limits.max_future_skew_s * 1000:
            return Rejection(topic_device, event.seq, Reason.CLOCK_SKEW,
                             f"device time is {(event.ts - now_ms) / 1000:.0f} s ahead of the bridge")
        if event.ts < now_ms - self.limits.max_age_s * 1000:
            return Rejection(topic_device, event.seq, Reason.TOO_OLD,
                             f"event is {(now_ms - event.ts) / 86_400_000:.1f} days old")
        return EventCandidate(event.dev, event.seq, event_entry(raw).encode(), event_digest(raw), event.kind)
