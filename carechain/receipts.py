"""Receipts: the bridge's signed statement that events are durably anchored (or why they were refused).

A receipt is a COSE_Sign1 by the bridge's log key over
`{v, hi?, ok: [[seq, leaf_index], ...], ts, dev, fin?, okd?: [digest, ...], rej: [[seq | null, reason, detail,
retryable, digest], ...]}`.
Agents delete an event from their outbox only on a verified `ok` entry; an unsigned or wrongly signed
receipt is ignored, so a party able to publish on the receipt topic still cannot make an agent drop data.
A rejection names the SHA-256 `digest` of the exact bytes refused: someone who publishes a forged event
with a seq the agent has pending must not get the agent's genuine event quarantined.

Two optional keys were added to version 1 without a flag day (readers of the first layout ignore keys they
do not know, and nothing they read changed shape):
- `okd`, parallel to `ok`: the SHA-256 of the bytes anchored under each acknowledged seq. An agent deletes
  its event only if the digest is its own, so an event forged under a pending seq (a cloned image, a stolen
  key) cannot get the genuine reading deleted by "its" receipt. A receipt without `okd` (an older bridge)
  is *unbound*: the agent falls back to deleting by seq, and counts it.
- `hi`: the highest seq anchored for the device, on a receipt that refuses an event as `seq_reused`, so an
  agent whose outbox (and seq counter) was lost or restored from a backup can move its counter past it and
  re-sign the refused readings instead of losing them.
- `fin`: the tree size of the latest checkpoint the bridge knows to be final (cosigned by a majority of the
  ledger's active miners) when it sent the receipt: an `ok` leaf index below it is final, one at or above it
  is anchored but not final yet. The agent learns later finality from the final checkpoints the bridge
  publishes (`Outbox.mark_final`).
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
    # SHA-256 of the anchored bytes, one per `ok` entry; None: an unbound receipt (from an older bridge)
    ok_digests: list[bytes] | None = None
    highest_seq: int | None = None  # the device's highest anchored seq (sent with `seq_reused` refusals)
    final_size: int | None = None  # leaves below this tree size were final when the receipt was sent

    def is_final(self, index: int) -> bool:
        """Whether leaf `index` was final (covered by a final checkpoint) when the receipt was sent."""
        return self.final_size is not None and index < self.final_size

    @property
    def bound(self) -> bool:
        """Whether each `ok` entry names the digest of what was anchored (`okd`)."""
        return self.ok_digests is not None

    def acknowledge(self, seq: int, index: int, digest: bytes) -> None:
        self.ok.append((seq, index))
        if self.ok_digests is None:
            self.ok_digests = []
        self.ok_digests.append(digest)

    def acknowledged(self) -> list[tuple[int, int, bytes | None]]:
        """(seq, leaf index, digest or None when unbound) per `ok` entry."""
        digests: list[bytes | None] = list(self.ok_digests) if self.ok_digests is not None else [None] * len(self.ok)
        return [(s, i, d) for (s, i), d in zip(self.ok, digests, strict=True)]

    def split(self, max_items: int = MAX_ITEMS) -> list[Receipt]:
        """Receipts of at most `max_items` entries each, so none outgrows a broker's packet limit.

        A rejection is at most ~300 bytes (detail capped at 200): 512 items stay well under 256 KiB.
        """
        if len(self.ok) + len(self.rejected) <= max_items:
            return [self]
        digests = self.ok_digests
        parts = [Receipt(self.device_id, self.ts, ok=self.ok[i:i + max_items],
                         ok_digests=None if digests is None else digests[i:i + max_items],
                         final_size=self.final_size)
                 for i in range(0, len(self.ok), max_items)]
        parts += [Receipt(self.device_id, self.ts, rejected=self.rejected[i:i + max_items],
                          highest_seq=self.highest_seq, final_size=self.final_size)
                  for i in range(0, len(self.rejected), max_items)]
        return parts

    def seal(self, bridge_key: Identity) -> bytes:
        # Keys in deterministic order (shorter first, then bytewise): v, hi, ok, ts, dev, fin, okd, rej.
        payload: dict[str, object] = {"v": 1}
        if self.highest_seq is not None:
            payload["hi"] = self.highest_seq
        payload["ok"] = [list(p) for p in self.ok]
        payload["ts"] = self.ts
        payload["dev"] = self.device_id
        if self.final_size is not None:
            payload["fin"] = self.final_size
        if self.ok_digests is not None:
            if len(self.ok_digests) != len(self.ok):
                raise ValueError("a bound receipt needs one digest per ok entry")
            payload["okd"] = list(self.ok_digests)
        payload["rej"] = [[r.seq, str(r.reason), r.detail[:200], r.retryable, r.digest] for r in self.rejected]
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
        digests = [bytes(d) for d in p["okd"]] if "okd" in p else None
        if digests is not None and (len(digests) != len(ok) or any(len(d) != 32 for d in digests)):
            raise ReceiptError("receipt `okd` does not hold one SHA-256 digest per ok entry")
        hi = p.get("hi")
        if hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < 0):
            raise ReceiptError("receipt `hi` is not a seq")
        fin = p.get("fin")
        if fin is not None and (not isinstance(fin, int) or isinstance(fin, bool) or fin < 0):
            raise ReceiptError("receipt `fin` is not a tree size")
        return Receipt(p["dev"], int(p["ts"]), ok, rej, digests, hi, fin)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError(f"receipt payload has the wrong shape: {exc}") from None
