"""Economics of storage on miners, paid by the real reward rules: does the storage burden discourage miners?

A deterministic, seeded, discrete-epoch simulation, sans-IO and pure Python. A population of miners with four
strategies holds the k-of-n erasure-coded shares of many segments:

- ``honest``   stores every share in full, answers audits and retrievals, cosigns every final checkpoint;
- ``lazy``     keeps only a fraction of each share's chunks and gambles that audits miss the rest;
- ``selfish``  stores everything and answers audits, but ignores retrievals to save egress bandwidth;
- ``churning`` goes offline and comes back, and sometimes comes back with an empty disk.

What the miners *do* is simulated (storage, churn, audits, retrievals, repair); what they are *paid* is not a
model: each epoch the simulation builds every miner's `contract_rules.rewards_v2.Tally` (cosignatures of the
epoch's final checkpoints, the one ledger audit per miner per epoch with `attestations.AUDIT_CHALLENGES`
challenges, retrievals answered and unanswered), keeps reputations as the ledger does (`rewards.Reputation`),
splits the epoch's pool with `rewards_v2.split`, slashes bonds by `bonds.SLASH` and suspends a miner whose bond
falls below `bonds.MIN_BOND` — the same functions `contract_rules.storage_v2` runs on `storage.settle`. A miner
that fails its audit or leaves a retrieval unanswered earns nothing that epoch (it drops out of the active set),
exactly as on the ledger.

Costs (disk per GB-month, egress per GB, per audit answered) are this module's assumptions; money is in
credits, 1 credit ≈ 1 USD, and `minor_per_credit` minor units make a credit (docs/economics.md).

    python -m simulators.storage_economics            # default parameters, text report
    python -m simulators.storage_economics --json     # the same as JSON
    python -m simulators.storage_economics --sweep    # plus the pool sweep and the break-even point
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from carechain.storage.attestations import AUDIT_CHALLENGES
from carechain.storage.audit import challenges_needed, detection_probability
from carechain.storage.codec import K, N
from carechain.storage.repair import RepairPolicy
from contract_rules.bonds import MIN_BOND, SLASH
from contract_rules.rewards import Reputation
from contract_rules.rewards_v2 import Tally, split

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
    epochs: int = 180                    # one epoch = one day (one `storage.settle`)
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
    # audits and retrievals: the ledger audits each miner once per epoch with the rules' challenge count
    challenges: int = AUDIT_CHALLENGES
    retrieval_rate: float = 0.01         # probability a segment is retrieved in an epoch
    checkpoints_per_epoch: int = 144     # final checkpoints the bridge records per epoch (`checkpoint.final`)
    # repair (carechain.storage.repair.RepairPolicy)
    repair_margin: int = RepairPolicy().threshold_margin  # repair when shares not lost < k + margin
    grace_epochs: int = max(1, round(RepairPolicy().grace / 86400))  # offline longer than this: shares lost
    # strategies
    lazy_kept_fraction: float = 0.9      # a lazy miner keeps this fraction of each share's chunks
    churn_offline_rate: float = 0.02     # per epoch, an online churning miner goes offline
    churn_return_rate: float = 0.5       # per epoch, an offline churning miner comes back
    churn_disk_loss: float = 0.1         # a returning churning miner has lost its disk
    evict_on_proven_loss: bool = False   # repair policy: a proven missing chunk condemns all the miner's shares
    # the pool and the bond (the rules split the pool; this sets its size)
    storage_reward_gb_month: float = 0.008   # pool per epoch = this x stored GB x epoch months (2x disk cost)
    minor_per_credit: int = 100
    bond: int = 2 * MIN_BOND["miner"]        # minor units each miner posts (suspended below MIN_BOND)
    # costs
    storage_cost_gb_month: float = 0.004
    bandwidth_cost_gb: float = 0.005
    audit_cost: float = 0.0005               # per answered ledger audit: the proofs and the ledger record

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
        if self.minor_per_credit < 1 or self.checkpoints_per_epoch < 0 or self.bond < 0:
            raise ValueError("minor_per_credit must be positive, checkpoints_per_epoch and bond non-negative")

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
    def stored_gb(self) -> float:
        return self.segments * self.n * self.share_gb

    @property
    def pool_per_epoch(self) -> int:
        """The epoch's pool in minor units (what `storage.settle` pays out)."""
        return round(self.storage_reward_gb_month * self.stored_gb * self.epoch_months * self.minor_per_credit)

    @property
    def reward_ratio(self) -> float:
        """Pool per stored GB-month over the disk cost per GB-month, the lever the sweep moves."""
        return self.storage_reward_gb_month / self.storage_cost_gb_month

    def with_reward_ratio(self, ratio: float) -> EconomicsParams:
        return replace(self, storage_reward_gb_month=ratio * self.storage_cost_gb_month)


@dataclass
class StrategyResult:
    """Money and events of one strategy, summed over its miners."""

    miners: int = 0
    suspended: int = 0            # bond slashed below the minimum: out of the active set for good
    revenue: float = 0.0          # payouts of `rewards_v2.split`
    slashed: float = 0.0          # taken from bonds by `bonds.SLASH`
    cost: float = 0.0             # storage + bandwidth + audits
    stored_tb_months: float = 0.0  # assigned share TB x months (what the miner was asked to store)
    audits_passed: int = 0        # ledger audits (one per miner-epoch with shares)
    audits_failed: int = 0
    retrievals_answered: int = 0
    retrievals_ignored: int = 0
    epochs_paid: int = 0          # miner-epochs with a non-zero payout
    epochs_disqualified: int = 0  # miner-epochs with a failed audit or an unanswered retrieval: paid 0
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
    pool_paid: float                 # credits paid out of the pool
    pool_kept: float                 # credits of pools nobody earned (they stay in "pool:miners")
    durability_bound: float

    @property
    def stored_gb(self) -> float:
        return self.params.stored_gb

    @property
    def durability(self) -> float:
        return 1.0 - self.segments_lost / self.params.segments if self.params.segments else 1.0

    @property
    def availability(self) -> float:
        return 1.0 - self.segments_ever_unavailable / self.params.segments if self.params.segments else 1.0

    @property
    def repair_traffic_per_tb_month(self) -> float:
        months = self.params.epochs * self.params.epoch_months
        return self.repair_traffic_gb / (self.stored_gb / GB_PER_TB) / months if self.stored_gb else 0.0

    def ranking(self) -> list[str]:
        """Strategies with miners, most profitable per miner first."""
        present = [s for s in STRATEGIES if self.strategies[s].miners]
        return sorted(present, key=lambda s: -self.strategies[s].profit_per_miner)

    def as_dict(self) -> dict[str, object]:
        return {
            "params": asdict(self.params),
            "pool_per_epoch_minor": self.params.pool_per_epoch,
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
            "pool_paid": self.pool_paid,
            "pool_kept": self.pool_kept,
            "ranking": self.ranking(),
        }


# --- the simulation ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Miner:
    index: int
    strategy: str
    bond: int
    online: bool = True
    suspended: bool = False       # bond below the minimum: not active, no new shares, its shares repaired
    detected: bool = False
    shares: set[int] = field(default_factory=set)   # ids of shares assigned and not declared lost

    @property
    def id(self) -> str:
        return f"m{self.index:04d}"


@dataclass(slots=True)
class _Share:
    segment: int
    holder: int
    assigned_epoch: int
    on_disk: bool = True      # the holder's disk still has the (possibly partial) share
    lost: bool = False        # declared lost by the network: dropped by its holder, to be repaired
    offline_epochs: int = 0
    detected: bool = False


@dataclass(slots=True)
class _Epoch:
    """One miner's evidence in the epoch being simulated (what the ledger would hold)."""

    audited: bool = False
    audit_passed: bool = False
    answered: int = 0
    unanswered: int = 0


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
        self.miners = [_Miner(i, s, p.bond) for i, s in enumerate(strategies)]
        self.results = {s: StrategyResult() for s in STRATEGIES}
        for m in self.miners:
            self.results[m.strategy].miners += 1
        self.reputation = {m.id: Reputation() for m in self.miners}
        self.shares: list[_Share] = []
        self.segment_shares: list[list[int]] = [[] for _ in range(p.segments)]
        self.segment_lost = [False] * p.segments
        self.segment_unavailable = [False] * p.segments
        self.repairs = 0
        self.repair_traffic_gb = 0.0
        self.retrievals = 0
        self.retrievals_failed = 0
        self.pool_paid = 0
        self.pool_kept = 0
        self.epoch: dict[int, _Epoch] = {}
        self.missing = 1.0 - p.lazy_kept_fraction
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

    def _serves(self, share: _Share) -> bool:
        """Would the holder hand the full share to a retrieval (or a repairer) right now?"""
        m = self.miners[share.holder]
        return m.online and not m.suspended and share.on_disk and m.strategy not in ("lazy", "selfish")

    def _full_copy(self, share: _Share) -> bool:
        return share.on_disk and self.miners[share.holder].strategy != "lazy"

    def run(self) -> EconomicsResult:
        for epoch in range(1, self.p.epochs + 1):
            self.epoch = {m.index: _Epoch() for m in self.miners}
            self._churn()
            self._storage_costs()
            self._audits(epoch)
            self._retrievals()
            self._settle()
            self._repair(epoch)
            self._account_durability()
        p = self.p
        return EconomicsResult(
            params=p, strategies=self.results,
            segments_lost=sum(self.segment_lost), segments_ever_unavailable=sum(self.segment_unavailable),
            repairs=self.repairs, repair_traffic_gb=self.repair_traffic_gb,
            retrievals=self.retrievals, retrievals_failed=self.retrievals_failed,
            pool_paid=self.pool_paid / p.minor_per_credit, pool_kept=self.pool_kept / p.minor_per_credit,
            durability_bound=durability_lower_bound(p.miners, p.honest, p.n, p.k),
        )

    def _churn(self) -> None:
        p, rng = self.p, self.churn_rng
        for m in self.miners:
            if m.strategy != "churning" or m.suspended:
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
        """The ledger's audit: once per miner per epoch, ``challenges`` chunks drawn over all it holds.

        Shares are equal-sized, so each challenge lands in a given share with probability 1/S (S = shares
        held) and hits a missing chunk there with probability f/S: the share is caught with probability
        1 - (1 - f/S)^c, and a miner missing f of every share with 1 - (1 - f)^c. One caught chunk fails the
        whole audit (`attestations.audit_verdict`); an offline miner's silence fails it too.
        """
        p, rng = self.p, self.audit_rng
        for m in self.miners:
            if not m.shares or m.suspended:
                continue
            res = self.results[m.strategy]
            ev = self.epoch[m.index]
            ev.audited = True
            held = len(m.shares)
            if not m.online:
                for share_id in sorted(m.shares):
                    share = self.shares[share_id]
                    share.offline_epochs += 1
                    if share.offline_epochs > p.grace_epochs:
                        self._declare_lost(share_id)
                res.audits_failed += 1
                continue
            res.cost += p.audit_cost
            caught_any = False
            for share_id in sorted(m.shares):
                share = self.shares[share_id]
                share.offline_epochs = 0
                missing = 1.0 if not share.on_disk else self.missing if m.strategy == "lazy" else 0.0
                if missing and rng.random() < 1.0 - (1.0 - missing / held) ** p.challenges:
                    # A missing chunk (no valid inclusion proof) proves the loss: declared lost at once.
                    caught_any = True
                    if m.strategy == "lazy":
                        res.detections += 1
                        res.detection_epochs_sum += epoch - share.assigned_epoch
                    self._declare_lost(share_id)
            ev.audit_passed = not caught_any
            if caught_any:
                res.audits_failed += 1
                if m.strategy == "lazy" and not m.detected:
                    m.detected = True
                    res.miners_detected += 1
                    res.miner_detection_epochs.append(epoch)
                if p.evict_on_proven_loss:
                    for share_id in list(m.shares):
                        self._declare_lost(share_id)
            else:
                res.audits_passed += 1

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
                if m.suspended:
                    continue
                res = self.results[m.strategy]
                if self._serves(share):
                    answered += 1
                    self.epoch[m.index].answered += 1
                    res.retrievals_answered += 1
                    res.cost += p.bandwidth_cost_gb * gb
                else:  # a signed request filed on the ledger and never answered
                    self.epoch[m.index].unanswered += 1
                    res.retrievals_ignored += 1
            if answered < p.k:
                self.retrievals_failed += 1

    def _settle(self) -> None:
        """`storage.settle`: the rules' tallies, reputations, split and slashes for this epoch."""
        p = self.p
        tallies: dict[str, Tally] = {}
        by_id = {m.id: m for m in self.miners}
        for m in self.miners:
            ev = self.epoch[m.index]
            passed = int(ev.audited and ev.audit_passed)
            failed = int(ev.audited and not ev.audit_passed)
            rep = self.reputation[m.id].add(passed, failed + ev.unanswered)
            self.reputation[m.id] = rep
            if m.suspended:
                continue
            # Cosigning: an online miner cosigns every final checkpoint; a failed audit voids it (out of the set).
            cosigs = p.checkpoints_per_epoch if m.online else 0
            tallies[m.id] = Tally(cosigs=cosigs, audits_passed=passed, audits_failed=failed, answered=ev.answered,
                                  unanswered=ev.unanswered)
        pool = p.pool_per_epoch
        payouts = split(pool, tallies, self.reputation, p.checkpoints_per_epoch)
        paid = sum(payouts.values())
        self.pool_paid += paid
        self.pool_kept += pool - paid
        for mid, tally in tallies.items():
            m = by_id[mid]
            res = self.results[m.strategy]
            res.revenue += payouts.get(mid, 0) / p.minor_per_credit
            res.epochs_paid += int(mid in payouts)
            res.epochs_disqualified += int(tally.disqualified)
            taken = 0
            if tally.audits_failed:
                taken += min(SLASH["failed_audit"], m.bond - taken)
            if tally.unanswered:
                taken += min(SLASH["unanswered_retrieval"], m.bond - taken)
            m.bond -= taken
            res.slashed += taken / p.minor_per_credit
            if m.bond < MIN_BOND["miner"]:
                self._suspend(m)

    def _suspend(self, m: _Miner) -> None:
        m.suspended = True
        self.results[m.strategy].suspended += 1
        for share_id in list(m.shares):
            self._declare_lost(share_id)

    def _repair(self, epoch: int) -> None:
        """carechain.storage.repair's policy: repair when shares not lost < k + margin; if fewer than
        k + 1 are online, do not wait out the grace period of the offline ones; never re-use a past holder;
        targets are active miners (not suspended, no failed audit this epoch)."""
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
            eligible = [m.index for m in self.miners if m.online and not m.suspended and m.index not in past
                        and not (self.epoch[m.index].audited and not self.epoch[m.index].audit_passed)]
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


# --- the storage burden and the break-even ----------------------------------------------------------


def storage_burden_per_miner_month(p: EconomicsParams) -> float:
    """What storing costs an honest miner per month: disk for its share of the coded data, the ledger
    audits it answers, and the egress of the retrievals it serves (credits)."""
    months = p.epoch_months
    disk = p.stored_gb / p.miners * p.storage_cost_gb_month
    audits = p.audit_cost / months
    egress = p.retrieval_rate * p.segments * p.k * p.share_gb * p.bandwidth_cost_gb / p.miners / months
    return disk + audits + egress


def honest_break_even_ratio(p: EconomicsParams) -> float:
    """Analytic pool / disk cost at which an honest miner's profit is zero, if every miner were honest.

    Then every miner has the same points and reputation, so the rules split the pool evenly: a miner earns
    pool / miners and pays `storage_burden_per_miner_month`. With cheaters that forfeit their share, honest
    miners earn more, so the simulated break-even is lower than this.
    """
    disk = p.stored_gb / p.miners * p.storage_cost_gb_month
    return storage_burden_per_miner_month(p) / disk


@dataclass(frozen=True)
class SweepPoint:
    value: float
    profit_per_miner_month: dict[str, float]
    best: str                  # most profitable strategy per miner, or "none" if every one loses money

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _point(value: float, result: EconomicsResult) -> SweepPoint:
    months = result.params.epochs * result.params.epoch_months
    profits = {s: result.strategies[s].profit_per_miner / months for s in result.ranking()}
    best = max(profits, key=lambda s: profits[s])
    return SweepPoint(value, profits, best if profits[best] > 0 else "none")


def sweep_reward_ratio(params: EconomicsParams, ratios: Sequence[float]) -> list[SweepPoint]:
    """Vary the pool (per stored GB-month) as a multiple of the disk cost; everything else stays."""
    return [_point(r, simulate(params.with_reward_ratio(r))) for r in ratios]


def break_even(points: Sequence[SweepPoint], strategy: str = "honest") -> float | None:
    """Smallest swept value from which ``strategy`` is the most profitable (and profitable) onwards."""
    answer = None
    for point in reversed(points):
        if point.best != strategy:
            break
        answer = point.value
    return answer


DEFAULT_REWARD_RATIOS = (0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)


# --- command line -----------------------------------------------------------------------------------


def _format(result: EconomicsResult) -> str:
    p = result.params
    months = p.epochs * p.epoch_months
    lines = [
        f"miners {p.miners} (honest {p.honest}, lazy {p.lazy}, selfish {p.selfish}, churning {p.churning}); "
        f"{p.segments} segments of {p.segment_gb:g} GB, k={p.k} of n={p.n}; {p.epochs} epochs of {p.epoch_days:g} d; "
        f"pool {p.pool_per_epoch} minor/epoch; seed {p.seed}",
        f"{'strategy':<9} {'miners':>6} {'susp.':>5} {'revenue':>9} {'slashed':>8} {'cost':>8} {'profit':>9} "
        f"{'profit/miner-mo':>15} {'audits ok/fail':>15} {'retr ok/ign':>12} {'paid/disq.':>11}",
    ]
    for name in STRATEGIES:
        r = result.strategies[name]
        if not r.miners:
            continue
        lines.append(
            f"{name:<9} {r.miners:>6} {r.suspended:>5} {r.revenue:>9.2f} {r.slashed:>8.2f} {r.cost:>8.2f} "
            f"{r.profit:>9.2f} {r.profit_per_miner / months:>15.3f} "
            f"{f'{r.audits_passed}/{r.audits_failed}':>15} {f'{r.retrievals_answered}/{r.retrievals_ignored}':>12} "
            f"{f'{r.epochs_paid}/{r.epochs_disqualified}':>11}")
    lazy = result.strategies["lazy"]
    if lazy.detections:
        expected = expected_epochs_to_detect(1 - p.lazy_kept_fraction, p.challenges)
        lines.append(f"lazy miners first caught after {lazy.mean_epochs_to_miner_detection:.2f} epochs on average "
                     f"(analytic {expected:.2f}); lazy shares caught: {lazy.detections}")
    lines += [
        f"durability {result.durability:.4f} (lost {result.segments_lost}/{p.segments}; honest-only lower bound "
        f"{result.durability_bound:.4f}); ever unavailable {result.segments_ever_unavailable}",
        f"repairs {result.repairs}, repair traffic {result.repair_traffic_gb:.1f} GB "
        f"({result.repair_traffic_per_tb_month:.1f} GB per stored TB-month); "
        f"retrievals {result.retrievals}, failed {result.retrievals_failed}",
        f"pool paid {result.pool_paid:.2f}, unearned (kept in pool:miners) {result.pool_kept:.2f}; "
        f"storage burden {storage_burden_per_miner_month(p):.3f} per miner-month",
        f"ranking by profit per miner: {' > '.join(result.ranking())}",
    ]
    return "\n".join(lines)


def _format_sweep(title: str, points: Sequence[SweepPoint]) -> str:
    names = [s for s in STRATEGIES if s in points[0].profit_per_miner_month]
    lines = [title, f"{'ratio':>6} " + " ".join(f"{s:>9}" for s in names) + "  best"]
    for pt in points:
        lines.append(f"{pt.value:>6.2f} " + " ".join(f"{pt.profit_per_miner_month[s]:>9.3f}" for s in names)
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
    parser.add_argument("--sweep", action="store_true", help="also sweep the pool and report the break-even")
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
        "storage_burden_per_miner_month": storage_burden_per_miner_month(params),
        "honest_break_even_reward_ratio": honest_break_even_ratio(params),
    }
    text = [_format(result)]
    if args.sweep:
        rewards = sweep_reward_ratio(params, DEFAULT_REWARD_RATIOS)
        report["reward_sweep"] = [pt.as_dict() for pt in rewards]
        report["reward_break_even"] = break_even(rewards)
        text += [
            "",
            _format_sweep("profit per miner-month vs pool / disk cost", rewards),
            f"honest is the most profitable strategy from pool/cost {break_even(rewards)} "
            f"(analytic all-honest break-even {honest_break_even_ratio(params):.3f})",
        ]
    print(json.dumps(report, indent=2) if args.json else "\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
