"""The `check` stage, sans-IO: raw payload + topic device + clock + registry → candidate or rejection.

Order matters for cost and for honesty of the reason: cheap structural checks first (parse), then identity
(registered, not revoked, topic matches the signer), then the signature (verify), then the payload and
time limits (validate), then the ciphertext a sealed (v2) reading carries beside its envelope: it must
be there and hash to the `ct` the device signed, and a clear event must carry none. `Ingest.check` needs
only the registry, so it can run in parallel worker processes; the guards that hold per-device state,
and the v1 cutover (which depends on the leaf index), run in the one sequencer. Nothing here touches the
network or disk.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from carechain import envelope
from carechain.config import Limits
from carechain.entries import event_entry
from carechain.errors import Reason
from carechain.events import SEALED_KINDS, PayloadError, validate_payload
from carechain.receipts import event_digest
from carechain.sealed import ciphertext_hash, split_wire
from chain_bridge.ingest.verdicts import Rejection, Verdict
from chain_bridge.ledger.store import DeviceRecord, EventCandidate

_SEALED_WIRE_FIRST_BYTE = b"\xa2"  # a CBOR map of two entries: {"ct": ..., "ev": ...}


@dataclass
class Ingest:
    """Checks one event at a time against the registry and limits; stateless apart from the registry."""

    limits: Limits
    lookup: Callable[[str], DeviceRecord | None]

    def check(self, topic_device: str, raw: bytes, now_ms: int) -> Verdict:
        """The verdict on one wire message; a rejection carries the digest of the COSE part (what the agent
        digests too), or of the whole message when no COSE part could be split off."""
        if len(raw) > self.limits.max_event_bytes:  # the whole wire message, ciphertext included
            return Rejection(topic_device, None, Reason.TOO_LARGE,
                             f"{len(raw)} bytes exceeds the limit of {self.limits.max_event_bytes}",
                             event_digest(raw))
        cose, ct = raw, None
        if raw[:1] == _SEALED_WIRE_FIRST_BYTE:  # anything else is parsed as a COSE_Sign1, with its reasons
            try:
                cose, ct = split_wire(raw)
            except envelope.EnvelopeError as exc:
                return Rejection(topic_device, None, exc.reason, exc.detail, event_digest(raw))
        verdict = self._check(topic_device, cose, ct, now_ms)
        if isinstance(verdict, Rejection):
            return replace(verdict, digest=event_digest(cose))
        return verdict

    def _check(self, topic_device: str, raw: bytes, ct: bytes | None, now_ms: int) -> Verdict:
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
        sealed = event.v >= 2 and event.kind in SEALED_KINDS
        epoch: int | None = None
        if sealed:
            body: Any = msg.payload["body"]  # validated: {"epoch": int, "ct": 32 bytes}
            if ct is None:
                return Rejection(topic_device, event.seq, Reason.CIPHERTEXT_MISSING,
                                 f"a v2 {event.kind} reading came without its ciphertext")
            if not hmac.compare_digest(ciphertext_hash(ct), body["ct"]):
                return Rejection(topic_device, event.seq, Reason.CIPHERTEXT_MISMATCH,
                                 "the ciphertext does not hash to the signed `ct`")
            epoch = body["epoch"]
        elif ct is not None:
            return Rejection(topic_device, event.seq, Reason.CIPHERTEXT_MISMATCH,
                             f"a clear v{event.v} {event.kind} event carries no ciphertext, yet one came with it")
        return EventCandidate(event.dev, event.seq, event_entry(raw).encode(), event_digest(raw), event.kind,
                              version=event.v, ct=ct, epoch=epoch, ts=event.ts)
