"""The trial's pre-registered analysis (contract_rules.trial_analysis): exact, deterministic, and in agreement
with scipy's pooled t-test and t distribution."""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract_rules.trial_analysis import (
    Result,
    difference_in_means,
    pooled_t_test,
    student_t_cdf,
    student_t_ppf,
)

scipy_stats = pytest.importorskip("scipy.stats", reason="the cross-checks need scipy (the test extra)")

RELATIVE = 1e-9
# scipy warns of its own float cancellation on near-constant arms; the exact side has none, and the checks hold.
SCIPY_CANCELLATION = "ignore:Precision loss occurred in moment calculation"

# Resting heart rate change in milli-bpm: a clear drop in the treatment arm, none in the control arm.
TREATED = [-5200, -4100, -6300, -3900, -5800, -4700, -6100, -5000, -4400, -5600]
UNTREATED = [-300, 400, -800, 1200, 100, -600, 900, -200, 500, -100]


def close(ours: Decimal | float, theirs: float, scale: float | None = None) -> bool:
    """Within 1e-9 of `scale` (default: of scipy's value itself)."""
    scale = abs(theirs) if scale is None else scale
    return abs(float(ours) - theirs) <= RELATIVE * scale + 1e-300


arm = st.lists(st.integers(min_value=-1_000_000, max_value=1_000_000), min_size=2, max_size=40)
narrow_arm = st.lists(st.integers(min_value=-3, max_value=3), min_size=2, max_size=12)


@pytest.mark.filterwarnings(SCIPY_CANCELLATION)
@settings(max_examples=150, deadline=None)
@given(treatment=st.one_of(arm, narrow_arm), control=st.one_of(arm, narrow_arm),
       alpha_milli=st.sampled_from([1, 10, 50, 100, 200]))
def test_pooled_t_test_agrees_with_scipy_to_1e_9(treatment: list[int], control: list[int], alpha_milli: int) -> None:
    test = pooled_t_test(treatment, control, alpha_milli=alpha_milli)
    if test.pooled_variance == 0:
        return  # scipy has no finite answer there; covered by the zero-variance tests below
    theirs = scipy_stats.ttest_ind(treatment, control, equal_var=True)
    ci = theirs.confidence_interval(confidence_level=1 - alpha_milli / 1000)
    assert test.df == theirs.df
    assert close(test.t, theirs.statistic), (test.t, theirs.statistic)
    assert close(test.p_value, theirs.pvalue), (test.p_value, theirs.pvalue)
    # The interval's ends are effect ± half-width: 1e-9 relative to those terms (an end near 0 has no digits of
    # its own to be relative to).
    half_width = (ci.high - ci.low) / 2
    scale = abs(float(test.effect)) + abs(half_width)
    assert close(test.ci_low, ci.low, scale), (test.ci_low, ci.low)
    assert close(test.ci_high, ci.high, scale), (test.ci_high, ci.high)


@pytest.mark.filterwarnings(SCIPY_CANCELLATION)
@settings(max_examples=60, deadline=None)
@given(treatment=arm, control=arm)
def test_reported_result_is_scipy_rounded_to_its_decimals(treatment: list[int], control: list[int]) -> None:
    result = difference_in_means(treatment, control, direction="decrease")
    test = pooled_t_test(treatment, control)
    if test.pooled_variance == 0:
        return
    theirs = scipy_stats.ttest_ind(treatment, control, equal_var=True)
    ci = theirs.confidence_interval(confidence_level=0.95)
    for ours, exact, places in [(result.t, theirs.statistic, 6), (result.p_value, theirs.pvalue, 8),
                                (result.ci_low, ci.low, 3), (result.ci_high, ci.high, 3)]:
        assert ours.as_tuple().exponent == -places
        assert abs(float(ours) - exact) <= 0.5 * 10**-places + 1e-9 * abs(exact), (ours, exact)
    assert result.mean_treatment == Decimal(round(Fraction(sum(treatment), len(treatment)) * 1000)) / 1000
    assert result.effect == Decimal(round(test.effect * 1000)) / 1000


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 18, 30, 38, 60, 120, 500, 2_000, 40_000])
@pytest.mark.parametrize("probability", ["0.0005", "0.005", "0.025", "0.3", "0.5", "0.6", "0.9", "0.975", "0.9995"])
def test_t_quantile_agrees_with_scipy_ppf(df: int, probability: str) -> None:
    theirs = scipy_stats.t.ppf(float(probability), df)
    assert close(student_t_ppf(Decimal(probability), df), theirs)


@settings(max_examples=200, deadline=None)
@given(t=st.decimals(min_value=-60, max_value=60, places=4), df=st.integers(min_value=1, max_value=3_000))
def test_t_distribution_agrees_with_scipy_cdf(t: Decimal, df: int) -> None:
    assert close(student_t_cdf(t, df), scipy_stats.t.cdf(float(t), df))


def test_t_distribution_matches_closed_forms_to_25_digits() -> None:
    # df = 2: F(t) = 1/2 + t / (2 √(2 + t²)), and its inverse t = (2p − 1) / √(2p(1 − p)).
    with localcontext() as ctx:
        ctx.prec = 60
        for t in ["-35.5", "-2.5", "0.01", "1", "4.303"]:
            exact = Decimal("0.5") + Decimal(t) / (2 * (2 + Decimal(t) ** 2).sqrt())
            assert abs(student_t_cdf(Decimal(t), 2) - exact) < Decimal("1e-30")
        for p in ["0.001", "0.2", "0.975", "0.9995"]:
            exact = (2 * Decimal(p) - 1) / (2 * Decimal(p) * (1 - Decimal(p))).sqrt()
            assert abs(student_t_ppf(Decimal(p), 2) - exact) < Decimal("1e-25")
        # df = 1 (Cauchy): F(t) = 1/2 + atan(t) / π.
        pi = _decimal_pi()
        for t in ["-40", "-0.3", "2", "636.6"]:
            exact = Decimal("0.5") + _decimal_atan(Decimal(t)) / pi
            assert abs(student_t_cdf(Decimal(t), 1) - exact) < Decimal("1e-30")


def test_a_null_dataset_does_not_meet_the_endpoint() -> None:
    rng = random.Random(16)
    both = [rng.randint(-8000, 8000) for _ in range(40)]
    result = difference_in_means(both[:20], both[20:], direction="decrease")
    assert result.p_value > Decimal("0.05") and not result.met
    assert result.ci_low < 0 < result.ci_high
    # The same values in both arms: no effect at all.
    same = difference_in_means(UNTREATED, list(reversed(UNTREATED)), direction="decrease")
    assert (same.effect, same.t, same.p_value, same.met) == (Decimal("0.000"), Decimal("0E-6"), Decimal("1.00000000"),
                                                             False)


def test_a_clear_effect_in_the_registered_direction_meets_the_endpoint() -> None:
    result = difference_in_means(TREATED, UNTREATED, direction="decrease")
    assert result.met
    assert result.effect == Decimal("-5220.000") and result.ci_high < 0
    # The same data against the opposite pre-registered direction: significant, but not the endpoint.
    assert not difference_in_means(TREATED, UNTREATED, direction="increase").met
    assert difference_in_means(UNTREATED, TREATED, direction="increase").met


def test_met_follows_the_registered_alpha() -> None:
    treatment, control = [0, 100, 200, 300, 400], [250, 350, 450, 550, 650]
    result = difference_in_means(treatment, control, direction="decrease")
    assert Decimal("0.01") < result.p_value < Decimal("0.05")
    assert result.met
    assert not difference_in_means(treatment, control, direction="decrease", alpha_milli=10).met
    # The interval is the (1 − alpha) one: it excludes 0 exactly when the test rejects.
    wide = pooled_t_test(treatment, control, alpha_milli=10)
    assert wide.ci_low < 0 < wide.ci_high


def test_as_dict_is_byte_identical_and_pinned() -> None:
    expected = {"n_treatment": 10, "n_control": 10, "mean_treatment": "-5110.000", "mean_control": "110.000",
                "effect": "-5220.000", "ci_low": "-5919.537", "ci_high": "-4520.463", "t": "-15.677254", "df": 18,
                "p_value": "0.00000000", "met": True}
    first = difference_in_means(TREATED, UNTREATED, direction="decrease").as_dict()
    assert first == expected
    encoded = json.dumps(first, sort_keys=True)
    shuffled_t, shuffled_c = TREATED[:], UNTREATED[:]
    random.Random(3).shuffle(shuffled_t)
    random.Random(4).shuffle(shuffled_c)
    for treatment, control in [(TREATED, UNTREATED), (shuffled_t, shuffled_c), (tuple(TREATED), tuple(UNTREATED))]:
        again = difference_in_means(treatment, control, direction="decrease").as_dict()
        assert json.dumps(again, sort_keys=True) == encoded
    assert all(isinstance(v, str) for k, v in first.items() if k not in ("n_treatment", "n_control", "df", "met"))


def test_a_moderate_p_value_is_pinned_to_all_its_digits() -> None:
    result = difference_in_means([0, 100, 200, 300, 400], [250, 350, 450, 550, 650], direction="decrease")
    theirs = scipy_stats.ttest_ind([0, 100, 200, 300, 400], [250, 350, 450, 550, 650], equal_var=True)
    # s² = 25000, SE = √(25000 · 2/5) = 100, t = −2.5; the interval is −250 ± t(0.975, 8) · 100 = ± 230.6004.
    assert result.as_dict() == {
        "n_treatment": 5, "n_control": 5, "mean_treatment": "200.000", "mean_control": "450.000",
        "effect": "-250.000", "ci_low": "-480.600", "ci_high": "-19.400", "t": "-2.500000", "df": 8,
        "p_value": f"{theirs.pvalue:.8f}", "met": True}


def test_zero_pooled_variance_reports_the_limit_of_the_test() -> None:
    apart = difference_in_means([-500, -500, -500], [700, 700], direction="decrease")
    assert apart.as_dict() == {"n_treatment": 3, "n_control": 2, "mean_treatment": "-500.000",
                               "mean_control": "700.000", "effect": "-1200.000", "ci_low": "-1200.000",
                               "ci_high": "-1200.000", "t": "-Infinity", "df": 3, "p_value": "0.00000000",
                               "met": True}
    assert difference_in_means([5, 5], [1, 1], direction="increase").t == Decimal("Infinity")
    equal = difference_in_means([42, 42], [42, 42, 42], direction="increase")
    assert (equal.t, equal.p_value, equal.ci_low, equal.ci_high, equal.met) == (
        Decimal("0E-6"), Decimal("1.00000000"), Decimal("0.000"), Decimal("0.000"), False)


def test_a_negative_value_that_rounds_to_zero_prints_without_a_sign() -> None:
    # mean and effect −1/2001 of a unit: "0.000", not "-0.000".
    small_effect = difference_in_means([-1] + [0] * 2000, [0, 0], direction="decrease").as_dict()
    assert (small_effect["mean_treatment"], small_effect["effect"]) == ("0.000", "0.000")
    assert not small_effect["met"]  # a zero reported effect has no direction
    # t ≈ −4.3e-10 (effect −0.25 against a spread of 10⁹): "0.000000".
    huge_spread = pooled_t_test([0, 10**9, -10**9, -1], [0, 10**9, -10**9, 0])
    assert Decimal("-1e-9") < huge_spread.t < 0
    assert difference_in_means([0, 10**9, -10**9, -1], [0, 10**9, -10**9, 0],
                               direction="decrease").as_dict()["t"] == "0.000000"


@pytest.mark.parametrize(("treatment", "control", "kwargs", "message"), [
    ([1], [1, 2], {}, "the treatment arm has 1 outcome value(s); the t-test needs at least 2 per arm"),
    ([1, 2], [], {}, "the control arm has 0 outcome value(s)"),
    ([1, 2.5], [1, 2], {}, "treatment[1] is 2.5 (float); outcome values are integers"),
    ([1, 2], [True, 2], {}, "control[0] is True (bool)"),
    ([1, 2], ["3", 2], {}, "control[0] is '3' (str)"),
    ([1, 2**63], [1, 2], {}, "does not fit a signed 64-bit integer"),
    ([1, 2], [1, 2], {"alpha_milli": 0}, "alpha_milli must be an integer from 1 to 999"),
    ([1, 2], [1, 2], {"alpha_milli": 1000}, "alpha_milli must be an integer from 1 to 999"),
    ([1, 2], [1, 2], {"direction": "down"}, "direction must be one of decrease, increase; got 'down'"),
])
def test_invalid_inputs_are_refused_with_a_clear_message(treatment: list[object], control: list[object],
                                                         kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"direction": "decrease", **kwargs}
    with pytest.raises(ValueError) as caught:
        difference_in_means(treatment, control, **arguments)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_the_t_distribution_refuses_impossible_arguments() -> None:
    with pytest.raises(ValueError, match="degrees of freedom must be a positive integer"):
        student_t_cdf(Decimal(1), 0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        student_t_ppf(Decimal(1), 5)
    with pytest.raises(ValueError, match="finite"):
        student_t_cdf(Decimal("Infinity"), 5)


def test_result_type_is_the_reported_form() -> None:
    result = difference_in_means(TREATED, UNTREATED, direction="decrease")
    assert isinstance(result, Result)
    assert all(isinstance(getattr(result, name), Decimal)
               for name in ("mean_treatment", "mean_control", "effect", "ci_low", "ci_high", "t", "p_value"))
    assert math.isclose(float(result.p_value), 0.0, abs_tol=1e-8)


def _decimal_pi() -> Decimal:
    """π to the current precision (the `decimal` documentation's recipe)."""
    with localcontext() as ctx:
        ctx.prec += 2
        three = Decimal(3)
        last, t, s, n, na, d, da = Decimal(0), three, three, 1, 0, 0, 24
        while s != last:
            last = s
            n, na = n + na, na + 8
            d, da = d + da, da + 32
            t = (t * n) / d
            s += t
    return +s


def _decimal_atan(x: Decimal) -> Decimal:
    """atan by halving the angle until the Taylor series converges fast, at the current precision."""
    with localcontext() as ctx:
        ctx.prec += 5
        halvings = 0
        while abs(x) > Decimal("0.1"):
            x = x / (1 + (1 + x * x).sqrt())
            halvings += 1
        total, power, k = Decimal(0), x, 0
        while True:
            term = power / (2 * k + 1) * (-1 if k % 2 else 1)
            if abs(term) < Decimal(10) ** -(ctx.prec + 2):
                break
            total += term
            power *= x * x
            k += 1
        result = total * (1 << halvings)
    return +result
