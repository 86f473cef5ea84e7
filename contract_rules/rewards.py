"""Per-epoch storage accounting: reputation from audits, rewards for passed audits and answered retrievals.

Integer minor units only (docs/contracts.md). Each epoch has a reward pool. A miner earns points for
each passed audit and each answered retrieval, weighted by its reputation at the start of the epoch; the
pool is split in proportion to points by the largest-remainder method (ties by miner id), so the payouts
sum to the pool exactly. An unanswered retrieval earns nothing and counts as a failed audit: a selfish
miner that stores data but refuses to serve it loses both reward and reputation. With no points at all the
pool is carried over to the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PERMILLE = 1000


@dataclass(frozen=True)
class Reputation:
    passed: int = 0
    failed: int = 0

    @property
    def permille(self) -> int:
        """Laplace-smoothed pass rate in ‰ ((passed + 1) / (audits + 2)): a new miner starts at 500."""
        return (self.passed + 1) * PERMILLE // (self.passed + self.failed + 2)

    def add(self, passed: int, failed: int) -> Reputation:
        return Reputation(self.passed + passed, self.failed + failed)


@dataclass(frozen=True)
class RewardPolicy:
    pool: int  # minor units paid out per epoch
    audit_points: int = 1
    retrieval_points: int = 4  # serving data is the point of storing it

    def __post_init__(self) -> None:
        if self.pool < 0 or self.audit_points < 0 or self.retrieval_points < 0:
            raise ValueError("reward pool and points must be non-negative integers")


@dataclass
class EpochEvents:
    """What happened in one epoch, as recorded on the ledger."""

    audits: list[tuple[str, bool]] = field(default_factory=list)  # (miner, passed)
    retrievals: list[tuple[str, bool]] = field(default_factory=list)  # (miner, answered)


@dataclass(frozen=True)
class EpochResult:
    payouts: dict[str, int]
    carry: int
    reputation: dict[str, Reputation]


def settle_epoch(
    policy: RewardPolicy, events: EpochEvents, reputation: Mapping[str, Reputation], carry_in: int = 0,
    miners: Iterable[str] = (),
) -> EpochResult:
    """Pay out `policy.pool + carry_in` for `events` and update reputations (deterministic)."""
    if carry_in < 0:
        raise ValueError(f"carry_in must be non-negative, got {carry_in}")
    known = set(miners)
    passed: dict[str, int] = {}
    failed: dict[str, int] = {}
    points: dict[str, int] = {}
    for m, ok in events.audits:
        known.add(m)
        if ok:
            passed[m] = passed.get(m, 0) + 1
            points[m] = points.get(m, 0) + policy.audit_points
        else:
            failed[m] = failed.get(m, 0) + 1
    for m, answered in events.retrievals:
        known.add(m)
        if answered:
            points[m] = points.get(m, 0) + policy.retrieval_points
        else:  # the selfish miner: an unanswered retrieval is a failed audit
            failed[m] = failed.get(m, 0) + 1
    before = dict(reputation)
    weights = {m: p * before.get(m, Reputation()).permille for m, p in points.items() if p}
    total_pool = policy.pool + carry_in
    total_weight = sum(weights.values())
    payouts = dict.fromkeys(sorted(known), 0)
    if total_weight == 0:
        carry = total_pool
    else:
        carry = 0
        shares = {m: divmod(total_pool * w, total_weight) for m, w in weights.items()}
        for m, (q, _) in shares.items():
            payouts[m] = q
        left = total_pool - sum(q for q, _ in shares.values())
        for m in sorted(shares, key=lambda m: (-shares[m][1], m))[:left]:
            payouts[m] += 1
    after = dict(before)
    for m in known:
        after[m] = before.get(m, Reputation()).add(passed.get(m, 0), failed.get(m, 0))
    return EpochResult(payouts=payouts, carry=carry, reputation=after)
