"""The storage economics simulation (simulators/storage_economics.py), paid by the real reward rules:
determinism, who profits, detection, durability, the storage burden and the break-even of the pool."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from carechain.storage.attestations import AUDIT_CHALLENGES
from carechain.storage.audit import challenges_needed, detection_probability
from contract_rules.bonds import MIN_BOND, SLASH
from contract_rules.rewards_v2 import Tally, split
from simulators.storage_economics import (
    EconomicsParams,
    break_even,
    durability_lower_bound,
    epochs_to_detect,
    expected_epochs_to_detect,
    honest_break_even_ratio,
    main,
    simulate,
    storage_burden_per_miner_month,
    sweep_reward_ratio,
)

# Smaller than the defaults so the whole file runs in a few seconds; same shape (k=4 of n=8, 40 miners).
SMALL = EconomicsParams(segments=150, epochs=90)


@pytest.fixture(scope="module")
def default_result():
    return simulate(EconomicsParams())


def test_same_seed_gives_identical_results():
    assert simulate(SMALL).as_dict() == simulate(SMALL).as_dict()


def test_another_seed_gives_other_results():
    assert simulate(SMALL).as_dict() != simulate(replace(SMALL, seed=SMALL.seed + 1)).as_dict()


def test_honest_beats_lazy_selfish_and_churning_at_default_parameters(default_result):
    s = default_result.strategies
    for other in ("lazy", "selfish", "churning"):
        assert s["honest"].profit_per_miner > s[other].profit_per_miner, other
    assert s["honest"].profit > 0 and s["honest"].slashed == 0
    assert default_result.ranking()[0] == "honest"


def test_the_pool_is_split_by_the_rules_evenly_among_equal_honest_miners():
    # Only honest miners, no retrievals: every miner has the same tally and reputation each epoch, so
    # rewards_v2.split gives each pool / miners (the largest remainders by id), and nothing stays unpaid.
    p = EconomicsParams(honest=16, lazy=0, selfish=0, churning=0, segments=40, epochs=10, retrieval_rate=0.0)
    result = simulate(p)
    honest = result.strategies["honest"]
    assert honest.revenue == pytest.approx(p.epochs * p.pool_per_epoch / p.minor_per_credit)
    assert result.pool_kept == 0 and honest.epochs_disqualified == 0
    even = split(p.pool_per_epoch, {f"m{i}": Tally(cosigs=1, audits_passed=1) for i in range(16)}, {}, finals=1)
    assert max(even.values()) - min(even.values()) <= 1


def test_selfish_miners_are_disqualified_for_ignored_retrievals_and_slashed(default_result):
    selfish = default_result.strategies["selfish"]
    assert selfish.retrievals_answered == 0 and selfish.retrievals_ignored > 0
    assert selfish.epochs_disqualified > 0
    assert selfish.slashed >= SLASH["unanswered_retrieval"] / EconomicsParams().minor_per_credit
    assert selfish.profit < 0


def test_a_miner_slashed_below_the_minimum_bond_is_suspended(default_result):
    p, lazy = EconomicsParams(), default_result.strategies["lazy"]
    # Slashes (failed audits, unanswered retrievals) take the bond below the minimum: the miner is suspended,
    # having lost more than bond - MIN_BOND and never more than its bond.
    assert p.bond == 2 * MIN_BOND["miner"]
    assert lazy.suspended == lazy.miners
    assert lazy.miners * (p.bond - MIN_BOND["miner"]) < lazy.slashed * p.minor_per_credit <= lazy.miners * p.bond


def test_lazy_miners_are_detected_within_the_expected_number_of_epochs():
    # A gambler keeping 98 % of its chunks against a weak audit (c = 10) is caught with p = 1 - 0.98^10 = 0.18
    # per epoch: 5.5 epochs on average, and within epochs_to_detect(0.999) = 35 with 99.9 % probability.
    missing, challenges = 0.02, 10
    params = EconomicsParams(honest=30, lazy=30, selfish=0, churning=0, segments=120, epochs=60,
                             challenges=challenges, lazy_kept_fraction=1 - missing, retrieval_rate=0.0)
    first = []
    for seed in range(4):
        lazy = simulate(replace(params, seed=seed)).strategies["lazy"]
        assert lazy.miners_detected == lazy.miners
        first += lazy.miner_detection_epochs
    expected = expected_epochs_to_detect(missing, challenges)
    assert expected == pytest.approx(1 / detection_probability(missing, challenges))
    assert max(first) <= epochs_to_detect(missing, challenges)
    assert sum(first) / len(first) == pytest.approx(expected, rel=0.2)


def test_the_default_audit_is_the_ledgers(default_result):
    # The rules audit each miner once per epoch with AUDIT_CHALLENGES chunks (one answer fits in an entry),
    # far fewer than the off-ledger daily schedule: a miner missing 10 % is caught with p = 1 - 0.9^8 = 0.57.
    assert EconomicsParams().challenges == AUDIT_CHALLENGES < challenges_needed(0.01)
    lazy = default_result.strategies["lazy"]
    assert lazy.miners_detected == lazy.miners
    assert max(lazy.miner_detection_epochs) <= epochs_to_detect(0.1, AUDIT_CHALLENGES)


def test_durability_with_honest_majority_stays_above_the_bound(default_result):
    assert default_result.durability >= default_result.durability_bound
    harsh = EconomicsParams(honest=13, lazy=3, selfish=2, churning=6, segments=150, epochs=90,
                            churn_offline_rate=0.1, churn_disk_loss=0.5, lazy_kept_fraction=0.999)
    result = simulate(harsh)
    assert result.durability_bound == pytest.approx(durability_lower_bound(24, 13, 8, 4))
    assert result.durability >= result.durability_bound


def test_durability_bound_is_the_hypergeometric_tail():
    assert durability_lower_bound(40, 40, 8, 4) == 1.0
    assert durability_lower_bound(40, 3, 8, 4) == 0.0
    assert durability_lower_bound(40, 24, 8, 4) == pytest.approx(
        sum(math.comb(24, i) * math.comb(16, 8 - i) for i in range(4, 9)) / math.comb(40, 8))


def test_the_storage_burden_is_disk_audits_and_egress():
    p = EconomicsParams()
    disk = p.stored_gb / p.miners * p.storage_cost_gb_month
    assert storage_burden_per_miner_month(p) > disk
    assert storage_burden_per_miner_month(replace(p, audit_cost=0.0, retrieval_rate=0.0)) == pytest.approx(disk)
    assert honest_break_even_ratio(p) == pytest.approx(storage_burden_per_miner_month(p) / disk)


def test_pool_sweep_exposes_where_honest_storage_stops_paying():
    points = sweep_reward_ratio(SMALL, (0.5, 0.8, 1.5, 3.0))
    assert points[0].best == "none"  # below cost every strategy loses money: storage does discourage miners
    assert points[-1].best == "honest"
    found = break_even(points)
    assert found is not None and 0.8 < found <= 1.5
    assert 1.0 < honest_break_even_ratio(SMALL) < 1.5
    honest = [pt.profit_per_miner_month["honest"] for pt in points]
    assert honest == sorted(honest)  # a bigger pool, more profit


def test_command_line_prints_json(capsys):
    assert main(["--json", "--segments", "20", "--epochs", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["segments"] == 20
    assert set(report["strategies"]) == {"honest", "lazy", "selfish", "churning"}
    assert report["analytic"]["challenges_for_1pct_missing_at_99_9"] == challenges_needed(0.01)
    assert report["pool_per_epoch_minor"] == EconomicsParams(segments=20, epochs=5).pool_per_epoch


def test_command_line_rejects_impossible_parameters(capsys):
    assert main(["--k", "9"]) == 2
    assert "k=9" in capsys.readouterr().err
