"""The one token bucket: `burst` tokens, refilled at `rate` per second, one taken per admitted thing.

Sans-IO: the caller passes the time (monotonic seconds), so the per-device event rate, the budget for
receipts to unregistered ids and the per-requester proof-request limit all run on one implementation
that tests drive by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: int  # capacity
    tokens: float
    at: float  # when `tokens` was last brought up to date

    @classmethod
    def full(cls, rate: float, burst: int, now: float) -> TokenBucket:
        return cls(rate, burst, float(burst), now)

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now

    def take(self, now: float) -> bool:
        """Take a token if there is one (True), else leave the bucket as it is (False)."""
        self.refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait_s(self) -> float:
        """Seconds until the next token, as of the last refill."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def give_back(self) -> None:
        """Return a token taken for something that turned out to cost nothing (e.g. a duplicate)."""
        self.tokens = min(float(self.burst), self.tokens + 1.0)
