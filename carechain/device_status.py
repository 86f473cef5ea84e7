"""Device status reports: a device's signed word on its outbox depth and battery, for the operator's console.

Wire form: a COSE_Sign1 (carechain.envelope, the same format and key as the device's events, `kid` = device id)
over the deterministic CBOR map

    {"v": 1, "msg": "dev.status", "dev": device_id, "ts": ms, "outbox": int, "battery": 0..100 (optional)}

published QoS 0, not retained, on `cc/v1/dev/{device_id}/status` (carechain.topics.status). The `msg` marker
keeps the two kinds of message apart both ways: an event payload has no `msg` (its model forbids extra keys,
so a status is refused as an event with `bad_payload`), and a payload without the marker is refused here as
`not_status`. A status is never a reading and never goes on the ledger: it only tells the bridge's console
how far behind a device is and how much charge it has left.

Sans-IO: `sign_status` builds one; `parse_status` checks size, envelope, fields and that the topic, payload
`dev` and `kid` name one device, and `SignedStatus.verified` checks the signature with the key the caller
looked up (the registered one) and the time against the caller's clock. Every refusal is a `StatusError`
whose `reason` is one of `StatusReason`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from carechain import envelope
from carechain.envelope import EnvelopeError, Sign1
from carechain.errors import ProtocolError
from carechain.identity import Identity

__all__ = ["MAX_STATUS_BYTES", "STATUS_MARKER", "STATUS_VERSION", "SignedStatus", "StatusError", "StatusReason",
           "StatusReport", "parse_status", "sign_status"]

STATUS_VERSION = 1
STATUS_MARKER = "dev.status"  # the value of `msg`: what makes these bytes a status and not an event
MAX_STATUS_BYTES = 512  # a status is ~170 bytes; anything much larger is not one
MAX_OUTBOX = 2**32 - 1  # far above any outbox quota; bounds what a console has to display
MAX_TS = 2**63 - 1
DEFAULT_MAX_FUTURE_SKEW_MS = 300_000  # as the events' `limits.max_future_skew_s` default
DEFAULT_MAX_AGE_MS = 900_000  # a status is sent at once: one older than this is a replay or a stuck clock
_REQUIRED = frozenset({"v", "msg", "dev", "ts", "outbox"})
_OPTIONAL = frozenset({"battery"})


class StatusReason(enum.StrEnum):
    """Why a status report was refused: a stable code for counters and logs (statuses are never receipted)."""

    TOO_LARGE = "too_large"  # more than MAX_STATUS_BYTES
    MALFORMED = "malformed"  # not a deterministic COSE_Sign1 (the envelope's own reasons are folded in here)
    NOT_STATUS = "not_status"  # a signed payload without the status marker: an event, or something else
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_STATUS = "bad_status"  # a missing, unknown or out-of-range field
    TOPIC_MISMATCH = "topic_mismatch"  # topic, payload `dev` and `kid` do not name one device
    UNREGISTERED = "unregistered"
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad_signature"  # does not verify with the device's registered key
    CLOCK_SKEW = "clock_skew"  # `ts` too far ahead of the receiver's clock
    TOO_OLD = "too_old"  # `ts` too far behind it
    REPLAYED = "replayed"  # `ts` not newer than the device's last accepted status
    RATE_LIMITED = "rate_limited"  # sooner after the device's last accepted status than the receiver allows


class StatusError(ProtocolError):
    """A status report that cannot be accepted; `reason` is a `StatusReason`."""

    def __init__(self, reason: StatusReason, detail: str) -> None:
        super().__init__(reason.value, detail, retryable=False)


@dataclass(frozen=True)
class StatusReport:
    """What a device says about itself: events waiting in its outbox, and its battery level if it has one."""

    device_id: str
    ts_ms: int  # the device's (agent's) clock
    outbox: int
    battery_pct: int | None = None

    def to_wire(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"v": STATUS_VERSION, "msg": STATUS_MARKER, "dev": self.device_id,
                                   "ts": self.ts_ms, "outbox": self.outbox}
        if self.battery_pct is not None:
            payload["battery"] = self.battery_pct
        return payload


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # type(): True is not a count


def sign_status(identity: Identity, ts_ms: int, outbox: int, battery_pct: int | None = None) -> bytes:
    """The signed status of `identity`'s device; a ValueError for a value outside the protocol's ranges."""
    if not _is_int(ts_ms, 0, MAX_TS):
        raise ValueError(f"status ts {ts_ms!r} is not milliseconds since the Unix epoch")
    if not _is_int(outbox, 0, MAX_OUTBOX):
        raise ValueError(f"outbox depth {outbox!r} is not an integer 0..{MAX_OUTBOX}")
    if battery_pct is not None and not _is_int(battery_pct, 0, 100):
        raise ValueError(f"battery level {battery_pct!r} is not an integer percentage 0..100")
    report = StatusReport(identity.device_id, ts_ms, outbox, battery_pct)
    return envelope.sign(identity, report.to_wire())


@dataclass(frozen=True)
class SignedStatus:
    """A well-formed status whose signature and time are not checked yet (`verified` does both)."""

    report: StatusReport
    sign1: Sign1

    def verified(self, public_key: bytes, now_ms: int, *, max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS,
                 max_age_ms: int = DEFAULT_MAX_AGE_MS) -> StatusReport:
        """The report, once the signature verifies with `public_key` (the device's *registered* key) and its
        `ts` lies within [now - max_age_ms, now + max_future_skew_ms]."""
        if not self.sign1.verify(public_key):
            raise StatusError(StatusReason.BAD_SIGNATURE,
                              f"status of {self.report.device_id} does not verify with its registered key")
        ahead = self.report.ts_ms - now_ms
        if ahead > max_future_skew_ms:
            raise StatusError(StatusReason.CLOCK_SKEW, f"status ts is {ahead} ms ahead of the receiver's clock "
                              f"(at most {max_future_skew_ms}); check the agent host's time (NTP)")
        if -ahead > max_age_ms:
            raise StatusError(StatusReason.TOO_OLD, f"status ts is {-ahead} ms old (at most {max_age_ms})")
        return self.report


def parse_status(data: bytes, topic_device: str, *, max_bytes: int = MAX_STATUS_BYTES) -> SignedStatus:
    """Check untrusted bytes received on `topic_device`'s status topic: size, envelope, fields, and that the
    topic, the payload's `dev` and the signer's `kid` are one device. The signature is checked by `verified`."""
    if len(data) > max_bytes:
        raise StatusError(StatusReason.TOO_LARGE, f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        sign1 = envelope.parse(data, max_bytes=max_bytes, max_depth=2)
    except EnvelopeError as exc:
        raise StatusError(StatusReason.MALFORMED, f"{exc.reason}: {exc.detail}") from None
    report = _report(sign1.payload)
    if sign1.kid != topic_device or report.device_id != topic_device:
        raise StatusError(StatusReason.TOPIC_MISMATCH, f"topic names {topic_device[:64]!r}, payload "
                          f"{report.device_id!r}, signer (kid) {sign1.kid!r}")
    return SignedStatus(report, sign1)


def _report(payload: object) -> StatusReport:
    if not isinstance(payload, dict) or payload.get("msg") != STATUS_MARKER:
        raise StatusError(StatusReason.NOT_STATUS, f"payload is not a status report (no \"msg\": "
                          f"{STATUS_MARKER!r}); events go on the event topic")
    if not _is_int(payload.get("v"), STATUS_VERSION, STATUS_VERSION):
        raise StatusError(StatusReason.UNSUPPORTED_VERSION, f"status version {payload.get('v')!r:.40} is not "
                          f"supported (only {STATUS_VERSION})")
    keys = set(payload)
    if not keys.issuperset(_REQUIRED) or keys - _REQUIRED - _OPTIONAL:
        missing, unknown = sorted(_REQUIRED - keys), sorted(map(str, keys - _REQUIRED - _OPTIONAL))
        raise StatusError(StatusReason.BAD_STATUS, f"fields missing {missing}, unknown {unknown}"[:200])
    dev, ts, outbox, battery = payload["dev"], payload["ts"], payload["outbox"], payload.get("battery")
    if not isinstance(dev, str) or not _is_device_id(dev):
        raise StatusError(StatusReason.BAD_STATUS, "dev must be a device id (1-64 lowercase base32 characters)")
    if not _is_int(ts, 0, MAX_TS):
        raise StatusError(StatusReason.BAD_STATUS, "ts must be an integer of milliseconds since the Unix epoch")
    if not _is_int(outbox, 0, MAX_OUTBOX):
        raise StatusError(StatusReason.BAD_STATUS, f"outbox must be an integer 0..{MAX_OUTBOX}")
    if "battery" in payload and not _is_int(battery, 0, 100):
        raise StatusError(StatusReason.BAD_STATUS, "battery must be an integer percentage 0..100")
    return StatusReport(dev, ts, outbox, battery)


def _is_device_id(text: str) -> bool:
    """Whether `text` has the form of a device id (as the envelope's `kid` and the topics require)."""
    return 1 <= len(text) <= 64 and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in text)
