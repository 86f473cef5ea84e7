"""Economics of storage on miners: does the storage burden discourage miners? (issue 7, item 6)

A deterministic, seeded, discrete-epoch simulation, sans-IO and pure Python. A population of miners
with four strategies holds the k-of-n erasure-coded shares of many segments:

- ``honest``   stores every share in full, answers audits and retrievals;
- ``lazy``     keeps only a fraction of each share's leaves and gambles that audits miss the rest;
- ``selfish``  stores everything and answers audits, but ignores retrievals to save egress bandwidth;
- ``churning`` goes offline and comes back, and sometimes comes back with an empty disk.

Each epoch every miner answers ``challenges`` checkpoint-seeded random chunks drawn over all the chunks
it holds (a miner missing a fraction f of them is caught with the analytic probability 1 - (1 - f)^c, as in
``carechain.storage.audit``), some segments are retrieved (an unanswered retrieval counts as a failed
audit), a failed audit is slashed and lowers the miner's reputation, a share is declared lost at once on
proof of a missing chunk and after a grace period when its miner is merely offline, and a segment whose
shares not declared lost fall below k + margin is repaired from k retrievable shares (the policy of
``carechain.storage.repair``). Miners are paid per passed audit (the storage price for the share over the epoch)
and per answered retrieval (per GB served) and pay for disk (per GB-month), egress (per GB) and audits.

Defaults (k, n, challenges per miner-epoch, grace, repair margin) and the detection formula come from
``carechain.storage``; rewards, penalties, reputation and costs are this module's own parameterised model
(see docs/storage-economics.md).

    python -m simulators.storage_economics            # default parameters, text report
    python -m simulators.storage_economics --json     # the same as JSON
    python -m simulators.storage_economics --sweep    # plus reward-level sweeps and break-even points
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from carechain.storage.audit import AuditSchedule, challenges_needed, detection_probability
from carechain.storage.codec import K, N
from carechain.storage.repair import RepairPolicy

STRATEGIES = ("honest", "lazy", "selfish", "churning")
GB_PER_TB = 1000.0


# --- analytic model ---------------------------------------------------------------------------------


def expected_epochs_to_detect(missing_fraction: float, challenges: int) -> float:
    """Mean number of epochs until a miner missing ``missing_fraction`` of its chunks fails an audit."""
    per_epoch = detection_probability(missing_fraction, challenges)
    return math.inf if per_epoch == 0.0 else 1.0 / per_epoch


def epochs_to_detect(missing_fraction: float, challenges: int, confidence: float = 0.999) -> int:
    """Epochs within which a miner missing ``missing_fraction`` of its chunks is caught with ``confidence``."""
    miss = 1.0 - detection_probability(missing_fraction, challenges)
    if miss == 0.0:
        return 1
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(miss)))


def durability_lower_bound(miners: int, honest: int, n: int, k: int) -> float:
    """Probability that a segment placed on n distinct, uniformly chosen miners gets >= k honest ones.

    Honest miners never lose a share and never fail an audit, so their shares of a segment are never
    declared lost and repair only adds shares: a segment that starts with k honest holders can never
    become unrecoverable. This is therefore a lower bound on the fraction of segments that survive.
    """
    total = math.comb(miners, n)
    good = sum(math.comb(honest, i) * math.comb(miners - honest, n - i) for i in range(k, n + 1))
    return good / total


# --- parameters and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class EconomicsParams:
    """Every knob of the simulation. Money is in credits, calibrated so 1 credit ~ 1 USD of hardware."""

    seed: int = 7
    epochs: int = 180                    # one epoch = one day
    epoch_days: float = 1.0
    # population
    honest: int = 24
    lazy: int = 4
    selfish: int = 4
    churning: int = 8
    # data: placement groups of segment_gb, each erasure-coded k-of-n (one share per distinct miner)
    segments: int = 400
    segment_gb: float = 10.0
    k: int = K
    n: int = N
    # audits and retrievals
    challenges: int = AuditSchedule().challenges_per_miner_epoch  # random chunks per miner per epoch
    retrieval_rate: float = 0.01         # probability a segment is retrieved in an epoch
    # repair (carechain.storage.repair.RepairPolicy)
    repair_margin: int = RepairPolicy().threshold_margin  # repair when shares not lost < k + margin
    grace_epochs: int = max(1, round(RepairPolicy().grace / 86400))  # offline longer than this: shares lost
    # strategies
    lazy_kept_fraction: float = 0.9      # a lazy miner keeps this fraction of each share's chunks
    churn_offline_rate: float = 0.02     # per epoch, an online churning miner goes offline
    churn_return_rate: float = 0.5       # per epoch, an offline churning miner comes back
    churn_disk_loss: float = 0.1         # a returning churning miner has lost its disk
    # rewards, penalties, reputation
    storage_reward_gb_month: float = 0.008   # paid through passed audits
    retrieval_reward_gb: float = 0.010       # paid per GB served to a retrieval
    slash_epochs: float = 7.0                # a failed audit forfeits this many epochs of the share's reward
    reputation_alpha: float = 0.1            # EWMA weight of an epoch's pass ratio
    eviction_reputation: float = 0.5         # below this a miner is evicted (shares moved, no new ones)
    evict_on_proven_loss: bool = False       # a miner caught missing a chunk is evicted at once
    # costs
    storage_cost_gb_month: float = 0.004
    bandwidth_cost_gb: float = 0.005
    audit_cost: float = 0.0005               # per answered miner-epoch audit: ~1 MB of proofs + ledger record

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.n:
            raise ValueError(f"need 0 < k <= n, got k={self.k} n={self.n}")
        if not 0 <= self.repair_margin <= self.n - self.k:
            raise ValueError(f"repair margin must be in [0, n - k], got {self.repair_margin}")
        if self.challenges < 1:
            raise ValueError(f"need at least one challenge per audit, got {self.challenges}")
        if self.miners < self.n:
            raise ValueError(f"need at least n={self.n} miners to place distinct shares, got {self.miners}")
        if not 0.0 <= self.lazy_kept_fraction <= 1.0:
            raise ValueError(f"lazy kept fraction must be in [0, 1], got {self.lazy_kept_fraction}")

    @property
    def miners(self) -> int:
        return self.honest + self.lazy + self.selfish + self.churning

    @property
    def share_gb(self) -> float:
        return self.segment_gb / self.k

    @property
    def epoch_months(self) -> float:
        return self.epoch_days / 30.0

    @property
    def reward_ratio(self) -> float:
        """Storage reward over storage cost, the lever the sweep moves."""
        return self.storage_reward_gb_month / self.storage_cost_gb_month

    def with_reward_ratio(self, ratio: float) -> EconomicsParams:
        return replace(self, storage_reward_gb_month=ratio * self.storage_cost_gb_month)


@dataclass
class StrategyResult:
    """Money and events of one strategy, summed over its miners."""

    miners: int = 0
    evicted: int = 0
    revenue: float = 0.0          # audit rewards + retrieval rewards
    slashed: float = 0.0
    cost: float = 0.0             # storage + bandwidth + audits
    stored_tb_months: float = 0.0  # assigned share TB x months (what the miner was paid to store)
    audits_passed: int = 0
    audits_failed: int = 0
    retrievals_answered: int = 0
    retrievals_ignored: int = 0
    detections: int = 0           # lazy shares caught missing chunks by an audit
    detection_epochs_sum: int = 0  # epochs from assignment to the failed audit, summed over detections
    miners_detected: int = 0      # lazy miners caught at least once
    miner_detection_epochs: list[int] = field(default_factory=list)  # epoch each lazy miner was first caught

    @property
    def profit(self) -> float:
        return self.revenue - self.slashed - self.cost

    @property
    def profit_per_miner(self) -> float:
        return self.profit / self.miners if self.miners else 0.0

    @property
    def profit_per_tb_month(self) -> float:
        return self.profit / self.stored_tb_months if self.stored_tb_months else 0.0

    @property
    def mean_epochs_to_detection(self) -> float | None:
        """Per share: epochs from assignment until an audit caught it."""
        return self.detection_epochs_sum / self.detections if self.detections else None

    @property
    def mean_epochs_to_miner_detection(self) -> float | None:
        """Per miner: epochs until its first failed audit."""
        det = self.miner_detection_epochs
        return sum(det) / len(det) if det else None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        out.update(profit=self.profit, profit_per_miner=self.profit_per_miner,
                   profit_per_tb_month=self.profit_per_tb_month,
                   revenue_per_tb_month=self.revenue / self.stored_tb_months if self.stored_tb_months else 0.0,
                   cost_per_tb_month=(self.cost + self.slashed) / self.stored_tb_months
                   if self.stored_tb_months else 0.0,
                   mean_epochs_to_detection=self.mean_epochs_to_detection,
                   mean_epochs_to_miner_detection=self.mean_epochs_to_miner_detection)
        return out


@dataclass
class EconomicsResult:
    params: EconomicsParams
    strategies: dict[str, StrategyResult]
    segments_lost: int               # fewer than k full shares anywhere: permanently unrecoverable
    segments_ever_unavailable: int   # at some epoch end fewer than k shares were retrievable
    repairs: int
    repair_traffic_gb: float
    retrievals: int
    retrievals_failed: int
    stored_gb: float                 # n x share size x segments (the coded data)
    durability_bound: float

    @property
    def durability(self) -> float:
        return 1.0 - self.segments_lost / self.params.segments

    @property
    def availability(self) -> float:
        return 1.0 - self.segments_ever_unavailable / self.params.segments

    @property
    def repair_traffic_per_tb_month(self) -> float:
        months = self.params.epochs * self.params.epoch_months
        return self.repair_traffic_gb / (self.stored_gb / GB_PER_TB) / months

    def ranking(self) -> list[str]:
        """Strategies with miners, most profitable per TB-month first."""
        present = [s for s in STRATEGIES if self.strategies[s].miners]
        return sorted(present, key=lambda s: -self.strategies[s].profit_per_tb_month)

    def as_dict(self) -> dict[str, object]:
        return {
            "params": asdict(self.params),
            "strategies": {name: r.as_dict() for name, r in self.strategies.items()},
            "segments": self.params.segments,
            "segments_lost": self.segments_lost,
            "segments_ever_unavailable": self.segments_ever_unavailable,
            "durability": self.durability,
            "availability": self.availability,
            "durability_lower_bound": self.durability_bound,
            "repairs": self.repairs,
            "repair_traffic_gb": self.repair_traffic_gb,
            "repair_traffic_gb_per_tb_month": self.repair_traffic_per_tb_month,
            "retrievals": self.retrievals,
            "retrievals_failed": self.retrievals_failed,
            "ranking": self.ranking(),
        }


# --- the simulation ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Miner:
    index: int
    strategy: str
    online: bool = True
    evicted: bool = False
    reputation: float = 1.0
    detected: bool = False
    shares: set[int] = field(default_factory=set)   # ids of shares assigned and not declared lost


@dataclass(slots=True)
class _Share:
    segment: int
    holder: int
    assigned_epoch: int
    on_disk: bool = True      # the holder's disk still has the (possibly partial) share
    lost: bool = False        # declared lost by the network: dropped by its holder, to be repaired
    offline_epochs: int = 0
    detected: bool = False


class _Simulation:
    def __init__(self, p: EconomicsParams) -> None:
        self.p = p
        # Independent streams, so changing e.g. the retrieval rate does not reshuffle placement.
        self.placement_rng = random.Random(f"{p.seed}:placement")
        self.churn_rng = random.Random(f"{p.seed}:churn")
        self.audit_rng = random.Random(f"{p.seed}:audit")
        self.retrieval_rng = random.Random(f"{p.seed}:retrieval")
        strategies = (["honest"] * p.honest + ["lazy"] * p.lazy + ["selfish"] * p.selfish
                      + ["churning"] * p.churning)
        self.miners = [_Miner(i, s) for i, s in enumerate(strategies)]
        self.results = {s: StrategyResult() for s in STRATEGIES}
        for m in self.miners:
            self.results[m.strategy].miners += 1
        self.shares: list[_Share] = []
        self.segment_shares: list[list[int]] = [[] for _ in range(p.segments)]
        self.segment_lost = [False] * p.segments
        self.segment_unavailable = [False] * p.segments
        self.repairs = 0
        self.repair_traffic_gb = 0.0
        self.retrievals = 0
        self.retrievals_failed = 0
        # per-epoch tallies for the reputation update
        self.passed = [0] * len(self.miners)
        self.failed = [0] * len(self.miners)
        self.missing = 1.0 - p.lazy_kept_fraction
        share_gb = p.share_gb
        self.audit_reward = p.storage_reward_gb_month * share_gb * p.epoch_months
        self.slash = p.storage_reward_gb_month * share_gb * p.epoch_days * p.slash_epochs / 30.0
        for seg in range(p.segments):
            for holder in self.placement_rng.sample(range(len(self.miners)), p.n):
                self._assign(seg, holder, epoch=0)

    def _assign(self, segment: int, holder: int, epoch: int) -> None:
        share_id = len(self.shares)
        self.shares.append(_Share(segment, holder, epoch))
        self.segment_shares[segment].append(share_id)
        self.miners[holder].shares.add(share_id)

    def _declare_lost(self, share_id: int) -> None:
        share = self.shares[share_id]
        share.lost = True
        self.miners[share.holder].shares.discard(share_id)

    def _fail(self, miner: _Miner) -> None:
        self.failed[miner.index] += 1
        res = self.results[miner.strategy]
        res.audits_failed += 1
        res.slashed += self.slash

    def _serves(self, share: _Share) -> bool:
        """Would the holder hand the full share to a retrieval (or a repairer) right now?"""
        m = self.miners[share.holder]
        return m.online and share.on_disk and m.strategy not in ("lazy", "selfish")

    def _full_copy(self, share: _Share) -> bool:
        return share.on_disk and self.miners[share.holder].strategy != "lazy"

    def run(self) -> EconomicsResult:
        for epoch in range(1, self.p.epochs + 1):
            self._churn()
            self._storage_costs()
            self._audits(epoch)
            self._retrievals()
            self._reputation()
            self._repair(epoch)
            self._account_durability()
        p = self.p
        return EconomicsResult(
            params=p, strategies=self.results,
            segments_lost=sum(self.segment_lost), segments_ever_unavailable=sum(self.segment_unavailable),
            repairs=self.repairs, repair_traffic_gb=self.repair_traffic_gb,
            retrievals=self.retrievals, retrievals_failed=self.retrievals_failed,
            stored_gb=p.segments * p.n * p.share_gb,
            durability_bound=durability_lower_bound(p.miners, p.honest, p.n, p.k),
        )

    def _churn(self) -> None:
        p, rng = self.p, self.churn_rng
        for m in self.miners:
            if m.strategy != "churning" or m.evicted:
                continue
            if m.online:
                m.online = rng.random() >= p.churn_offline_rate
            elif rng.random() < p.churn_return_rate:
                m.online = True
                if rng.random() < p.churn_disk_loss:
                    for share_id in m.shares:
                        self.shares[share_id].on_disk = False

    def _storage_costs(self) -> None:
        p = self.p
        per_share_month = p.share_gb * p.epoch_months
        for m in self.miners:
            if not m.shares:
                continue
            res = self.results[m.strategy]
            res.stored_tb_months += len(m.shares) * per_share_month / GB_PER_TB
            on_disk = sum(1 for s in m.shares if self.shares[s].on_disk)
            kept = p.lazy_kept_fraction if m.strategy == "lazy" else 1.0
            res.cost += on_disk * kept * per_share_month * p.storage_cost_gb_month

    def _audits(self, epoch: int) -> None:
        """One audit per miner per epoch: ``challenges`` chunks drawn uniformly over all the chunks it holds.

        Shares are equal-sized, so each challenge lands in a given share with probability 1/S (S = shares
        held) and hits a missing chunk there with probability f/S: the share is caught with probability
        1 - (1 - f/S)^c, and a miner missing f of every share with 1 - (1 - f)^c, as in the analytic model.
        """
        p, rng = self.p, self.audit_rng
        for m in self.miners:
            if not m.shares:
                continue
            res = self.results[m.strategy]
            held = len(m.shares)
            if not m.online:
                # Unanswered: every share fails this epoch, but may come back; the grace period applies.
                for share_id in sorted(m.shares):
                    share = self.shares[share_id]
                    share.offline_epochs += 1
                    self._fail(m)
                    if share.offline_epochs > p.grace_epochs:
                        self._declare_lost(share_id)
                continue
            res.cost += p.audit_cost
            caught_any = False
            for share_id in sorted(m.shares):
                share = self.shares[share_id]
                share.offline_epochs = 0
                missing = 1.0 if not share.on_disk else self.missing if m.strategy == "lazy" else 0.0
                if missing and rng.random() < 1.0 - (1.0 - missing / held) ** p.challenges:
                    # A missing chunk (no valid inclusion proof) proves the loss: declared lost at once.
                    self._fail(m)
                    caught_any = True
                    if m.strategy == "lazy":
                        res.detections += 1
                        res.detection_epochs_sum += epoch - share.assigned_epoch
                    self._declare_lost(share_id)
                    continue
                self.passed[m.index] += 1
                res.audits_passed += 1
                res.revenue += self.audit_reward
            if caught_any and m.strategy == "lazy" and not m.detected:
                m.detected = True
                res.miners_detected += 1
                res.miner_detection_epochs.append(epoch)
            if caught_any and p.evict_on_proven_loss:
                self._evict(m)

    def _evict(self, m: _Miner) -> None:
        if m.evicted:
            return
        m.evicted = True
        self.results[m.strategy].evicted += 1
        for share_id in list(m.shares):
            self._declare_lost(share_id)

    def _retrievals(self) -> None:
        p, rng = self.p, self.retrieval_rng
        gb = p.share_gb
        for seg in range(p.segments):
            if rng.random() >= p.retrieval_rate or self.segment_lost[seg]:
                continue
            self.retrievals += 1
            candidates = [s for s in self.segment_shares[seg] if not self.shares[s].lost]
            rng.shuffle(candidates)
            answered = 0
            for share_id in candidates:
                if answered == p.k:
                    break
                share = self.shares[share_id]
                m = self.miners[share.holder]
                res = self.results[m.strategy]
                if self._serves(share):
                    answered += 1
                    self.passed[m.index] += 1
                    res.retrievals_answered += 1
                    res.revenue += p.retrieval_reward_gb * gb
                    res.cost += p.bandwidth_cost_gb * gb
                else:
                    res.retrievals_ignored += 1
                    self._fail(m)
            if answered < p.k:
                self.retrievals_failed += 1

    def _reputation(self) -> None:
        p = self.p
        for m in self.miners:
            events = self.passed[m.index] + self.failed[m.index]
            if events:
                ratio = self.passed[m.index] / events
                m.reputation = (1.0 - p.reputation_alpha) * m.reputation + p.reputation_alpha * ratio
                if m.reputation < p.eviction_reputation:
                    self._evict(m)
            self.passed[m.index] = self.failed[m.index] = 0

    def _repair(self, epoch: int) -> None:
        """carechain.storage.repair's policy: repair when shares not lost < k + margin; if fewer than
        k + 1 are online, do not wait out the grace period of the offline ones; never re-use a past holder."""
        p = self.p
        for seg in range(p.segments):
            if self.segment_lost[seg]:
                continue
            live = [s for s in self.segment_shares[seg] if not self.shares[s].lost]
            online = [s for s in live if self.miners[self.shares[s].holder].online]
            suspects = [s for s in live if s not in online]
            if len(online) < p.k + 1:
                keep = online  # suspects are replaced too, but only once the repair can run
            elif len(live) >= p.k + p.repair_margin:
                continue
            else:
                keep = live
            if len(keep) == p.n:
                continue
            if sum(1 for s in keep if self._serves(self.shares[s])) < p.k:
                continue  # cannot decode now; try again next epoch
            past = {self.shares[s].holder for s in self.segment_shares[seg]}
            eligible = [m.index for m in self.miners if m.online and not m.evicted and m.index not in past]
            missing = min(p.n - len(keep), len(eligible))
            if missing <= 0:
                continue
            if keep is online:
                for s in suspects:
                    self._declare_lost(s)
            for holder in self.placement_rng.sample(eligible, missing):
                self._assign(seg, holder, epoch)
            self.repairs += 1
            self.repair_traffic_gb += (p.k + missing) * p.share_gb  # download k shares, upload the new ones

    def _account_durability(self) -> None:
        p = self.p
        for seg in range(p.segments):
            if self.segment_lost[seg]:
                continue
            live = [self.shares[s] for s in self.segment_shares[seg] if not self.shares[s].lost]
            if sum(1 for s in live if self._full_copy(s)) < p.k:
                self.segment_lost[seg] = True
                self.segment_unavailable[seg] = True
            elif sum(1 for s in live if self._serves(s)) < p.k:
                self.segment_unavailable[seg] = True


def simulate(params: EconomicsParams | None = None) -> EconomicsResult:
    """Run the simulation; the same parameters (seed included) always give the same result."""
    return _Simulation(params or EconomicsParams()).run()


# --- sweeps -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    value: float
    profit_per_tb_month: dict[str, float]
    best: str                  # most profitable strategy per TB-month, or "none" if every one loses money

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _point(value: float, result: EconomicsResult) -> SweepPoint:
    profits = {s: result.strategies[s].profit_per_tb_month for s in result.ranking()}
    best = max(profits, key=lambda s: profits[s])
    return SweepPoint(value, profits, best if profits[best] > 0 else "none")


def sweep_reward_ratio(params: EconomicsParams, ratios: Sequence[float]) -> list[SweepPoint]:
    """Vary the storage reward as a multiple of the storage cost; everything else stays."""
    return [_point(r, simulate(params.with_reward_ratio(r))) for r in ratios]


def sweep_retrieval_ratio(params: EconomicsParams, ratios: Sequence[float]) -> list[SweepPoint]:
    """Vary the retrieval reward as a multiple of the egress bandwidth cost."""
    return [_point(r, simulate(replace(params, retrieval_reward_gb=r * params.bandwidth_cost_gb))) for r in ratios]


def break_even(points: Sequence[SweepPoint], strategy: str = "honest") -> float | None:
    """Smallest swept value from which ``strategy`` is the most profitable (and profitable) onwards."""
    answer = None
    for point in reversed(points):
        if point.best != strategy:
            break
        answer = point.value
    return answer


def honest_break_even_ratio(p: EconomicsParams) -> float:
    """Analytic storage reward / storage cost at which an honest miner's profit is zero.

    Per GB-month an honest miner earns the storage reward, pays the storage cost and the audits, and makes
    the retrieval margin on the retrievals it serves (each of a segment's retrievals reads k of its n shares).
    """
    shares_per_miner = p.segments * p.n / p.miners
    audits_per_gb_month = 1.0 / p.epoch_months / (shares_per_miner * p.share_gb)
    retrievals_per_share_month = p.retrieval_rate / p.epoch_months * p.k / p.n
    retrieval_margin = retrievals_per_share_month * (p.retrieval_reward_gb - p.bandwidth_cost_gb)
    needed = p.storage_cost_gb_month + p.audit_cost * audits_per_gb_month - retrieval_margin
    return needed / p.storage_cost_gb_month


def selfish_break_even_retrieval_ratio(p: EconomicsParams) -> float:
    """Analytic retrieval reward / egress cost below which ignoring retrievals pays.

    Serving a GB earns the retrieval reward and costs the egress; ignoring it costs the slash of a failed
    audit (``slash_epochs`` of the share's storage reward). Honest serving wins while reward - egress > -slash.
    """
    slash_per_gb = p.storage_reward_gb_month * p.epoch_days * p.slash_epochs / 30.0
    return max(0.0, (p.bandwidth_cost_gb - slash_per_gb) / p.bandwidth_cost_gb)


DEFAULT_REWARD_RATIOS = (0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
DEFAULT_RETRIEVAL_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


# --- command line -----------------------------------------------------------------------------------


def _format(result: EconomicsResult) -> str:
    p = result.params
    lines = [
        f"miners {p.miners} (honest {p.honest}, lazy {p.lazy}, selfish {p.selfish}, churning {p.churning}); "
        f"{p.segments} segments of {p.segment_gb:g} GB, k={p.k} of n={p.n}; {p.epochs} epochs of {p.epoch_days:g} d; "
        f"seed {p.seed}",
        f"{'strategy':<9} {'miners':>6} {'evicted':>7} {'revenue':>9} {'slashed':>8} {'cost':>8} {'profit':>9} "
        f"{'profit/miner':>12} {'profit/TB-mo':>12} {'audits ok/fail':>15} {'retr ok/ign':>12}",
    ]
    for name in STRATEGIES:
        r = result.strategies[name]
        if not r.miners:
            continue
        lines.append(
            f"{name:<9} {r.miners:>6} {r.evicted:>7} {r.revenue:>9.2f} {r.slashed:>8.2f} {r.cost:>8.2f} "
            f"{r.profit:>9.2f} {r.profit_per_miner:>12.3f} {r.profit_per_tb_month:>12.3f} "
            f"{f'{r.audits_passed}/{r.audits_failed}':>15} {f'{r.retrievals_answered}/{r.retrievals_ignored}':>12}")
    lazy = result.strategies["lazy"]
    if lazy.detections:
        expected = expected_epochs_to_detect(1 - p.lazy_kept_fraction, p.challenges)
        lines.append(f"lazy miners first caught after {lazy.mean_epochs_to_miner_detection:.2f} epochs on average "
                     f"(analytic {expected:.2f}); lazy shares caught: {lazy.detections}, "
                     f"{lazy.mean_epochs_to_detection:.2f} epochs after assignment on average")
    lines += [
        f"durability {result.durability:.4f} (lost {result.segments_lost}/{p.segments}; honest-only lower bound "
        f"{result.durability_bound:.4f}); ever unavailable {result.segments_ever_unavailable}",
        f"repairs {result.repairs}, repair traffic {result.repair_traffic_gb:.1f} GB "
        f"({result.repair_traffic_per_tb_month:.1f} GB per stored TB-month); "
        f"retrievals {result.retrievals}, failed {result.retrievals_failed}",
        f"ranking by profit/TB-month: {' > '.join(result.ranking())}",
    ]
    return "\n".join(lines)


def _format_sweep(title: str, points: Sequence[SweepPoint]) -> str:
    names = [s for s in STRATEGIES if s in points[0].profit_per_tb_month]
    lines = [title, f"{'ratio':>6} " + " ".join(f"{s:>9}" for s in names) + "  best"]
    for pt in points:
        lines.append(f"{pt.value:>6.2f} " + " ".join(f"{pt.profit_per_tb_month[s]:>9.3f}" for s in names)
                     + f"  {pt.best}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.storage_economics", description=__doc__.split("\n")[0])
    defaults = EconomicsParams()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"(default {value})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default {value})")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep storage reward/cost and retrieval reward/egress cost and report break-evens")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fields = asdict(EconomicsParams())
    try:
        params = EconomicsParams(**{name: getattr(args, name) for name in fields})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = simulate(params)
    report: dict[str, object] = result.as_dict()
    report["analytic"] = {
        "lazy_detection_per_audit": detection_probability(1 - params.lazy_kept_fraction, params.challenges),
        "lazy_expected_epochs_to_detect": expected_epochs_to_detect(1 - params.lazy_kept_fraction, params.challenges),
        "challenges_for_1pct_missing_at_99_9": challenges_needed(0.01),
        "honest_break_even_reward_ratio": honest_break_even_ratio(params),
        "selfish_break_even_retrieval_ratio": selfish_break_even_retrieval_ratio(params),
    }
    text = [_format(result)]
    if args.sweep:
        rewards = sweep_reward_ratio(params, DEFAULT_REWARD_RATIOS)
        retrievals = sweep_retrieval_ratio(params, DEFAULT_RETRIEVAL_RATIOS)
        report["reward_sweep"] = [pt.as_dict() for pt in rewards]
        report["reward_break_even"] = break_even(rewards)
        report["retrieval_sweep"] = [pt.as_dict() for pt in retrievals]
        report["retrieval_break_even"] = break_even(retrievals)
        text += [
            "",
            _format_sweep("profit per TB-month vs storage reward / storage cost", rewards),
            f"honest is the most profitable strategy from reward/cost {break_even(rewards)} "
            f"(analytic honest break-even {honest_break_even_ratio(params):.3f})",
            "",
            _format_sweep("profit per TB-month vs retrieval reward / egress cost", retrievals),
            f"honest is the most profitable strategy from retrieval reward/egress cost {break_even(retrievals)} "
            f"(analytic selfish break-even {selfish_break_even_retrieval_ratio(params):.3f})",
        ]
    print(json.dumps(report, indent=2) if args.json else "\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
