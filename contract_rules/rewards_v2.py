"""Per-epoch miner rewards (storage v2): points from ledger evidence, weighted by reputation, split exactly.

A library for `contract_rules.storage_v2` (not a rule module); integer minor units only. Every count comes
from evidence on the ledger, never from an operator's word: cosignatures from `checkpoint.final` entries,
audits from miners' signed answers whose verdicts every miner recomputes, retrievals from signed requests
and answers.

    points = COSIG · cosignatures / final checkpoints of the epoch  (cosigning every one earns COSIG)
           + AUDIT · audits passed
           + RETRIEVAL · retrievals answered

A miner with a failed audit or an unanswered retrieval in the epoch earns 0, whatever else it did: a miner
that cosigns but does not store, or stores but does not serve, is paid nothing. Each miner's weight is its
points times its reputation in ‰ (`rewards.Reputation`: Laplace-smoothed audit pass rate, a new miner starts
at 500), and the pool is split in proportion to weight by the largest-remainder method (remainders, then
miner id), so the payouts sum to the pool exactly; with no weight at all nothing is paid and the pool stays
in "pool:miners" for the next epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from contract_rules.rewards import Reputation

COSIG_POINTS = 100  # for cosigning every final checkpoint of the epoch
AUDIT_POINTS = 100  # per audit passed (one audit per miner per epoch)
RETRIEVAL_POINTS = 10  # per retrieval answered


@dataclass(frozen=True)
class RewardWeights:
    cosig: int = COSIG_POINTS
    audit: int = AUDIT_POINTS
    retrieval: int = RETRIEVAL_POINTS

    def __post_init__(self) -> None:
        if min(self.cosig, self.audit, self.retrieval) < 0:
            raise ValueError("reward points must be non-negative integers")


@dataclass(frozen=True)
class Tally:
    """One miner's evidence in one epoch."""

    cosigs: int = 0
    audits_passed: int = 0
    audits_failed: int = 0
    answered: int = 0
    unanswered: int = 0

    @property
    def disqualified(self) -> bool:
        """A failed audit or an unanswered retrieval: no reward and no cosigning weight this epoch."""
        return self.audits_failed > 0 or self.unanswered > 0

    def points(self, finals: int, weights: RewardWeights = RewardWeights()) -> int:
        """Points for the epoch, given the number of final checkpoints recorded in it."""
        if self.disqualified:
            return 0
        cosig = weights.cosig * min(self.cosigs, finals) // finals if finals else 0
        return cosig + weights.audit * self.audits_passed + weights.retrieval * self.answered


def split(pool: int, tallies: Mapping[str, Tally], reputation: Mapping[str, Reputation], finals: int,
          weights: RewardWeights = RewardWeights()) -> dict[str, int]:
    """Miner id → minor units (non-zero only); sums to `pool`, or is empty when no miner has any weight."""
    if type(pool) is not int or pool < 0:
        raise ValueError(f"a reward pool is a non-negative integer, got {pool!r}")
    weight = {m: t.points(finals, weights) * reputation.get(m, Reputation()).permille
              for m, t in sorted(tallies.items())}
    weight = {m: w for m, w in weight.items() if w}
    total = sum(weight.values())
    if not total or not pool:
        return {}
    shares = {m: divmod(pool * w, total) for m, w in weight.items()}
    payouts = {m: q for m, (q, _) in shares.items()}
    left = pool - sum(payouts.values())
    for m in sorted(shares, key=lambda m: (-shares[m][1], m))[:left]:
        payouts[m] += 1
    return {m: n for m, n in payouts.items() if n}
