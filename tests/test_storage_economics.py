"""The storage economics simulation (simulators/storage_economics.py): determinism, who profits, detection,
durability and the break-even of the reward level."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from carechain.storage.audit import challenges_needed, detection_probability
from simulators.storage_economics import (
    EconomicsParams,
    break_even,
    durability_lower_bound,
    epochs_to_detect,
    expected_epochs_to_detect,
    honest_break_even_ratio,
    main,
    selfish_break_even_retrieval_ratio,
    simulate,
    sweep_retrieval_ratio,
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


def test_honest_beats_lazy_and_selfish_at_default_parameters(default_result):
    s = default_result.strategies
    for other in ("lazy", "selfish", "churning"):
        assert s["honest"].profit_per_tb_month > s[other].profit_per_tb_month, other
        assert s["honest"].profit_per_miner > s[other].profit_per_miner, other
    assert s["honest"].profit > 0
    assert default_result.ranking()[0] == "honest"


def test_selfish_miners_lose_rewards_for_ignored_retrievals(default_result):
    selfish = default_result.strategies["selfish"]
    assert selfish.retrievals_answered == 0
    assert selfish.retrievals_ignored > 0
    assert selfish.audits_failed == selfish.retrievals_ignored  # each ignored retrieval is a failed audit
    assert selfish.slashed > 0


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


def test_default_audit_catches_a_lazy_miner_in_its_first_epoch(default_result):
    # c = challenges_needed(1 %) = 688 per miner-epoch; a miner missing 10 % cannot survive one audit.
    assert EconomicsParams().challenges == challenges_needed(0.01)
    lazy = default_result.strategies["lazy"]
    assert lazy.miner_detection_epochs == [1] * lazy.miners


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


def test_reward_sweep_exposes_the_break_even():
    points = sweep_reward_ratio(SMALL, (0.5, 0.7, 1.0, 2.0))
    assert points[0].best == "none"  # below cost every strategy loses money: storage does discourage miners
    assert points[-1].best == "honest"
    found = break_even(points)
    assert found is not None and 0.5 < found <= 1.0
    analytic = honest_break_even_ratio(SMALL)
    assert 0.5 < analytic < 1.0
    honest = [pt.profit_per_tb_month["honest"] for pt in points]
    assert honest == sorted(honest)  # more reward, more profit


def test_retrieval_sweep_shows_where_selfish_stops_paying():
    # Without the slash, a selfish miner wins whenever serving costs more than it pays.
    points = sweep_retrieval_ratio(replace(SMALL, slash_epochs=0.0), (0.0, 0.5, 1.5))
    assert points[0].best == "selfish"
    assert points[-1].best == "honest"
    assert break_even(points) == 1.5
    assert selfish_break_even_retrieval_ratio(replace(SMALL, slash_epochs=0.0)) == 1.0


def test_the_slash_for_an_ignored_retrieval_moves_the_selfish_break_even_below_cost():
    points = sweep_retrieval_ratio(SMALL, (0.0, 0.25, 0.5, 0.75, 1.0))
    analytic = selfish_break_even_retrieval_ratio(SMALL)  # 1 - slash per GB / egress per GB = 0.63
    assert 0.5 < analytic < 0.75
    assert points[0].best == "selfish"
    assert break_even(points) == 0.75


def test_command_line_prints_json(capsys):
    assert main(["--json", "--segments", "20", "--epochs", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["segments"] == 20
    assert set(report["strategies"]) == {"honest", "lazy", "selfish", "churning"}
    assert report["analytic"]["challenges_for_1pct_missing_at_99_9"] == challenges_needed(0.01)


def test_command_line_rejects_impossible_parameters(capsys):
    assert main(["--k", "9"]) == 2
    assert "k=9" in capsys.readouterr().err
