"""The `guards` stage: per-device limits that need state, so they run in the one sequencer.

`SeqGuard` bounds how far a device's seq may jump; `RateGuard` bounds its events per second. Both see only
events whose signature verified (the `check` stage ran first), so their tables hold at most one small
entry per registered device. `UnregisteredReceipts` bounds the receipts the bridge signs for devices it
does not know: one token bucket for all of them, so its memory is constant whatever ids a flood makes up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from carechain.errors import Reason
from carechain.token_bucket import TokenBucket
from chain_bridge.ingest.verdicts import Rejection
from chain_bridge.ledger.store import EventCandidate


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
            return Rejection(c.device_id, c.seq, Reason.SEQ_GAP,
                             f"seq {c.seq} jumps more than {self.max_seq_gap} past {highest}", c.digest)
        return None

    def anchored(self, c: EventCandidate) -> None:
        if c.seq > self._highest.get(c.device_id, -1):
            self._highest[c.device_id] = c.seq


@dataclass
class RateGuard:
    """Sequencer-side per-device rate limit: a token bucket of `burst` tokens refilled at `rate` per second.

    Each event admitted takes one token; with none left the event is refused as `rate_limited`, which is
    retryable: the agent keeps it and resends later. `clock` (monotonic seconds) is injected so tests
    drive time by hand.
    """

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, c: EventCandidate) -> Rejection | None:
        """Take a token for `c`, or return the `rate_limited` rejection if the device has none left."""
        now = self.clock()
        bucket = self._buckets.get(c.device_id)
        if bucket is None:
            bucket = self._buckets[c.device_id] = TokenBucket.full(self.rate, self.burst, now)
        if not bucket.take(now):
            return Rejection(c.device_id, c.seq, Reason.RATE_LIMITED, f"more than {self.rate:g} events/s (burst "
                             f"{self.burst}); retry in {bucket.wait_s():.2f} s", c.digest)
        return None

    def refund(self, device_id: str) -> None:
        """Give back the token of an event that turned out to be a duplicate (nothing was appended)."""
        bucket = self._buckets.get(device_id)
        if bucket is not None:
            bucket.give_back()


UNREGISTERED_RECEIPTS_PER_S = 20.0
UNREGISTERED_RECEIPTS_BURST = 200


@dataclass
class UnregisteredReceipts:
    """One token bucket for every receipt to a device that is not registered (`unregistered`, or refused
    before the registry was consulted under a topic naming no registered device).

    A device whose registration is not on the ledger *yet* still hears why (its first events, then some
    of its resends); a flood from made-up ids costs at most `rate` signatures a second after a `burst`.
    The refusals over the budget are still counted by reason; `suppressed` counts the receipts not sent.
    """

    rate: float = UNREGISTERED_RECEIPTS_PER_S
    burst: int = UNREGISTERED_RECEIPTS_BURST
    clock: Callable[[], float] = time.monotonic
    sent: int = 0
    suppressed: int = 0
    _bucket: TokenBucket | None = None

    def allow(self) -> bool:
        now = self.clock()
        if self._bucket is None:
            self._bucket = TokenBucket.full(self.rate, self.burst, now)
        if not self._bucket.take(now):
            self.suppressed += 1
            return False
        self.sent += 1
        return True
