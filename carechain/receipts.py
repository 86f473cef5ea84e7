"""Receipts: the bridge's signed statement that events are durably anchored (or why they were refused).

A receipt is a COSE_Sign1 by the bridge's log key over
`{v, dev, ts, ok: [[seq, leaf_index], ...], rej: [[seq | null, reason, detail, retryable, digest], ...]}`.
Agents delete an event from their outbox only on a verified `ok` entry; an unsigned or wrongly signed
receipt is ignored, so a party able to publish on the receipt topic still cannot make an agent drop data.
A rejection names the SHA-256 `digest` of the exact bytes refused: someone who publishes a forged event
with a seq the agent has pending must not get the agent's genuine event quarantined.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from carechain import envelope
from carechain.errors import FixedReasonError
from carechain.identity import Identity

MAX_ITEMS = 512  # ok + rejected entries per receipt (see Receipt.split)


@dataclass(frozen=True)
class Rejected:
    seq: int | None
    reason: str
    detail: str
    retryable: bool
    digest: bytes = b""


@dataclass
class Receipt:
    device_id: str
    ts: int
    ok: list[tuple[int, int]] = field(default_factory=list)  # (seq, leaf_index)
    rejected: list[Rejected] = field(default_factory=list)

    def split(self, max_items: int = MAX_ITEMS) -> list[Receipt]:
        """Receipts of at most `max_items` entries each, so none outgrows a broker's packet limit.

        A rejection is at most ~300 bytes (detail capped at 200): 512 items stay well under 256 KiB.
        """
        if len(self.ok) + len(self.rejected) <= max_items:
            return [self]
        parts = [Receipt(self.device_id, self.ts, ok=self.ok[i:i + max_items])
                 for i in range(0, len(self.ok), max_items)]
        parts += [Receipt(self.device_id, self.ts, rejected=self.rejected[i:i + max_items])
                  for i in range(0, len(self.rejected), max_items)]
        return parts

    def seal(self, bridge_key: Identity) -> bytes:
        # Keys in deterministic order (shorter first, then bytewise): v, ok, ts, dev, rej.
        payload = {
            "v": 1,
            "ok": [list(p) for p in self.ok],
            "ts": self.ts,
            "dev": self.device_id,
            "rej": [[r.seq, str(r.reason), r.detail[:200], r.retryable, r.digest] for r in self.rejected],
        }
        return envelope.sign(bridge_key, payload, presorted=True)


def event_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


class ReceiptError(FixedReasonError):
    """A receipt that is not from the bridge, not for this device, or not a receipt at all."""

    REASON = "bad_receipt"


def open_receipt(data: bytes, bridge_public_key: bytes, expected_device: str) -> Receipt:
    """Verify and decode a receipt; raises ReceiptError if it is not from the bridge or not for us."""
    try:
        msg = envelope.parse(data, max_bytes=1 << 20)
    except envelope.EnvelopeError as exc:
        raise ReceiptError(f"malformed receipt: {exc}") from None
    if not msg.verify(bridge_public_key):
        raise ReceiptError("receipt signature does not verify with the bridge key")
    p = msg.payload
    try:
        if p["v"] != 1 or p["dev"] != expected_device:
            raise ReceiptError(f"receipt for {p['dev']!r}, expected {expected_device!r}")
        ok = [(int(s), int(i)) for s, i in p["ok"]]
        rej = [Rejected(s, str(r), str(d), bool(t), bytes(h)) for s, r, d, t, h in p["rej"]]
        return Receipt(p["dev"], int(p["ts"]), ok, rej)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError(f"receipt payload has the wrong shape: {exc}") from None
