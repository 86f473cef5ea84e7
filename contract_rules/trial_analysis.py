"""The pre-registered analysis of a two-arm trial (issue 16, docs/trials.md): difference in means, exactly.

Every miner re-executes the trial contract and `carechain verify trial` recomputes its certificate offline, so
the result must come out byte-identical on every machine: no floats anywhere. What is rational (means, sums of
squares, the pooled variance, t²) is computed exactly with `Fraction`; what is not (square roots, Student's t
distribution and its quantile) with `decimal` in a local context of 50 digits, ROUND_HALF_EVEN, using only
+, −, ×, ÷ and square root. The decimal specification requires each of those to be correctly rounded, so any
conforming implementation gives the same digits (fractional powers, ln and exp are avoided: their last digit is
only "almost always" correctly rounded).

The analysis, `difference_in_means`:

- outcomes are integers in the trial's stated unit (e.g. change of resting heart rate in milli-bpm), one list
  for the treatment arm and one for the control arm, at least 2 values each;
- effect = mean(treatment) − mean(control);
- two-sided Student's t-test with pooled variance, i.e. equal variances assumed (scipy's
  `ttest_ind(equal_var=True)`): df = n_t + n_c − 2, s² = (SS_t + SS_c) / df, SE = √(s² (1/n_t + 1/n_c)),
  t = effect / SE, p = P(|T_df| ≥ |t|);
- confidence interval effect ± t_{1−α/2, df} · SE, the (1 − α) interval: 95 % at the default α = 0.05; it
  excludes 0 exactly when p < α;
- `met`: the reported p-value is below α and the reported effect has the pre-registered sign ("decrease":
  negative, "increase": positive). Decided on the reported (rounded) values so a reader can check `met`
  from the certificate alone.

The t distribution: P(|T| ≥ |t|) = I_x(df/2, 1/2) with x = df / (df + t²), the regularized incomplete beta
function, by its continued fraction (modified Lentz, to a relative 1e-30) with the exact prefactor (B(df/2, 1/2)
is rational for even df, rational × π for odd df, so no log-gamma is needed). The quantile is found by
bisection on the distribution function to 1e-25.

Zero pooled variance (every value in each arm the same) is reported rather than refused, as the limit of the
test as the spread goes to 0: when the means differ, t = ±Infinity and p = 0; when they are equal, t = 0 and
p = 1; either way the interval is the single point [effect, effect].

Reported numbers are `Decimal`s with fixed decimals (means, effect and interval 3, t 6, p 8), rounded
half-even; `Result.as_dict()` gives them as fixed-point strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow, localcontext
from fractions import Fraction
from functools import lru_cache
from typing import Literal

__all__ = ["ANALYSIS", "DEFAULT_ALPHA_MILLI", "DIRECTIONS", "Direction", "PooledTTest", "Result",
           "difference_in_means", "pooled_t_test", "student_t_cdf", "student_t_ppf"]

ANALYSIS = "difference_in_means"
Direction = Literal["decrease", "increase"]
DIRECTIONS: tuple[Direction, ...] = ("decrease", "increase")
DEFAULT_ALPHA_MILLI = 50

# Outcome values must fit a signed 64-bit integer: their means and intervals then keep well inside 50 digits.
_VALUE_LIMIT = 2**63

# Exponent limits valid for 32- and 64-bit builds of decimal alike, so underflow happens at the same place.
_CONTEXT = Context(prec=50, rounding=ROUND_HALF_EVEN, Emin=-400_000_000, Emax=400_000_000, capitals=1, clamp=0,
                   flags=[], traps=[InvalidOperation, DivisionByZero, Overflow])
_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863")
_CF_EPSILON = Decimal("1e-30")  # relative convergence of the continued fraction
_CF_TINY = Decimal("1e-200")  # Lentz's guard against a zero denominator
_CF_MAX_TERMS = 100_000
_QUANTILE_TOLERANCE = Decimal("1e-25")
_DIGITS_MEAN = 3
_DIGITS_T = 6
_DIGITS_P = 8


@dataclass(frozen=True)
class PooledTTest:
    """The two-sample pooled-variance t-test at full precision: exact rationals, and 50-digit decimals where
    the value is irrational. `t` is ±Infinity when the pooled variance is 0 and the means differ."""

    n_treatment: int
    n_control: int
    mean_treatment: Fraction
    mean_control: Fraction
    effect: Fraction
    pooled_variance: Fraction
    df: int
    t: Decimal
    p_value: Decimal
    ci_low: Decimal
    ci_high: Decimal
    alpha_milli: int


@dataclass(frozen=True)
class Result:
    """The pre-registered result as the certificate states it: means, effect and interval to 3 decimals (units
    of the input), t to 6, p to 8, and whether the primary endpoint was met."""

    n_treatment: int
    n_control: int
    mean_treatment: Decimal
    mean_control: Decimal
    effect: Decimal
    ci_low: Decimal
    ci_high: Decimal
    t: Decimal
    df: int
    p_value: Decimal
    met: bool

    def as_dict(self) -> dict[str, str | int | bool]:
        """Counts as integers, `met` as a boolean, every decimal as a fixed-point string ("-1.250", "0.00000312";
        t may be "Infinity" or "-Infinity", see the module docstring). Same inputs, same dict, on any machine."""
        return {
            "n_treatment": self.n_treatment, "n_control": self.n_control,
            "mean_treatment": _text(self.mean_treatment), "mean_control": _text(self.mean_control),
            "effect": _text(self.effect), "ci_low": _text(self.ci_low), "ci_high": _text(self.ci_high),
            "t": _text(self.t), "df": self.df, "p_value": _text(self.p_value), "met": self.met,
        }


def difference_in_means(treatment: Sequence[int], control: Sequence[int], *, direction: Direction,
                        alpha_milli: int = DEFAULT_ALPHA_MILLI) -> Result:
    """The pre-registered analysis "difference_in_means": the pooled t-test of `pooled_t_test`, reported with
    fixed decimals, and `met` when p < alpha_milli/1000 and the effect goes the pre-registered `direction`.

    ValueError (saying which input and why) on fewer than 2 values in an arm, a value that is not an integer
    or does not fit 64 bits, an alpha outside 1..999 thousandths, or an unknown direction.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    test = pooled_t_test(treatment, control, alpha_milli=alpha_milli)
    effect = _round_fraction(test.effect, _DIGITS_MEAN)
    p_value = _round_decimal(test.p_value, _DIGITS_P)
    right_way = effect < 0 if direction == "decrease" else effect > 0
    return Result(
        n_treatment=test.n_treatment, n_control=test.n_control,
        mean_treatment=_round_fraction(test.mean_treatment, _DIGITS_MEAN),
        mean_control=_round_fraction(test.mean_control, _DIGITS_MEAN),
        effect=effect,
        ci_low=_round_decimal(test.ci_low, _DIGITS_MEAN), ci_high=_round_decimal(test.ci_high, _DIGITS_MEAN),
        t=_round_decimal(test.t, _DIGITS_T), df=test.df, p_value=p_value,
        met=right_way and p_value < Decimal(alpha_milli).scaleb(-3),
    )


def pooled_t_test(treatment: Sequence[int], control: Sequence[int], *,
                  alpha_milli: int = DEFAULT_ALPHA_MILLI) -> PooledTTest:
    """Student's two-sample t-test with pooled variance (equal variances assumed), two-sided, and the (1 − α)
    confidence interval of mean(treatment) − mean(control), α = alpha_milli / 1000, unrounded.

    ValueError on fewer than 2 values in an arm, a value that is not an integer or does not fit 64 bits, or an
    alpha outside 1..999 thousandths.
    """
    if isinstance(alpha_milli, bool) or not isinstance(alpha_milli, int) or not 1 <= alpha_milli <= 999:
        raise ValueError(f"alpha_milli must be an integer from 1 to 999 (thousandths; 50 means alpha = 0.05); "
                         f"got {alpha_milli!r}")
    _check_arm("treatment", treatment)
    _check_arm("control", control)
    n_t, n_c = len(treatment), len(control)
    mean_t, mean_c = Fraction(sum(treatment), n_t), Fraction(sum(control), n_c)
    df = n_t + n_c - 2
    pooled_variance = (_sum_of_squares(treatment) + _sum_of_squares(control)) / df
    effect = mean_t - mean_c
    variance_of_effect = pooled_variance * Fraction(n_t + n_c, n_t * n_c)
    with localcontext(_CONTEXT):
        effect_d = _decimal(effect)
        if variance_of_effect == 0:
            t = Decimal(0) if effect == 0 else Decimal("Infinity").copy_sign(effect_d)
            p_value = Decimal(1) if effect == 0 else Decimal(0)
            ci_low = ci_high = effect_d
        else:
            t_squared = effect * effect / variance_of_effect
            t = _decimal(t_squared).sqrt().copy_sign(effect_d) if effect else Decimal(0)
            p_value = _two_sided_tail(t_squared, df)
            alpha = Decimal(alpha_milli).scaleb(-3)
            half_width = student_t_ppf(1 - alpha / 2, df) * _decimal(variance_of_effect).sqrt()
            ci_low, ci_high = effect_d - half_width, effect_d + half_width
    return PooledTTest(n_treatment=n_t, n_control=n_c, mean_treatment=mean_t, mean_control=mean_c, effect=effect,
                       pooled_variance=pooled_variance, df=df, t=t, p_value=p_value, ci_low=ci_low,
                       ci_high=ci_high, alpha_milli=alpha_milli)


def student_t_cdf(t: Decimal, df: int) -> Decimal:
    """P(T ≤ t) for Student's t distribution with `df` degrees of freedom, to about 30 significant digits (for
    t < 0 the tail is computed directly, so a tiny probability keeps its relative precision)."""
    _check_df(df)
    if not t.is_finite():
        raise ValueError(f"t must be a finite decimal; got {t}")
    with localcontext(_CONTEXT):
        if t == 0:
            return Decimal("0.5")
        one_tail = _two_sided_tail(Fraction(t) ** 2, df) / 2
        return one_tail if t < 0 else 1 - one_tail


@lru_cache(maxsize=256)
def student_t_ppf(probability: Decimal, df: int) -> Decimal:
    """The t with P(T ≤ t) = `probability` for Student's t distribution with `df` degrees of freedom: bisection
    on the distribution function until the bracket is narrower than 1e-25 (or cannot narrow at 50 digits)."""
    _check_df(df)
    if not probability.is_finite() or not 0 < probability < 1:
        raise ValueError(f"probability must be strictly between 0 and 1; got {probability}")
    with localcontext(_CONTEXT):
        if probability == Decimal("0.5"):
            return Decimal(0)
        upper = probability > Decimal("0.5")
        two_sided = 2 * (1 - probability if upper else probability)  # P(|T| ≥ q) at the q sought

        def beyond(q: Decimal) -> bool:  # is the q sought beyond q?
            return _two_sided_tail(Fraction(q) ** 2, df) > two_sided

        low, high = Decimal(0), Decimal(1)
        while beyond(high):
            low, high = high, 2 * high
        while high - low > _QUANTILE_TOLERANCE:
            middle = (low + high) / 2
            if middle in (low, high):
                break
            if beyond(middle):
                low = middle
            else:
                high = middle
        q = (low + high) / 2
        return q if upper else -q


def _check_arm(arm: str, values: Sequence[int]) -> None:
    if len(values) < 2:
        raise ValueError(f"the {arm} arm has {len(values)} outcome value(s); the t-test needs at least 2 per arm")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{arm}[{i}] is {v!r} ({type(v).__name__}); outcome values are integers in the "
                             f"trial's stated unit (e.g. milli-bpm)")
        if not -_VALUE_LIMIT <= v < _VALUE_LIMIT:
            raise ValueError(f"{arm}[{i}] = {v} does not fit a signed 64-bit integer; state the outcome in a "
                             f"coarser unit")


def _check_df(df: int) -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer; got {df!r}")


def _sum_of_squares(values: Sequence[int]) -> Fraction:
    """Σ (v − mean)², exactly: (n Σv² − (Σv)²) / n in integers (no cancellation to fear in exact arithmetic)."""
    n, total = len(values), sum(values)
    return Fraction(n * sum(v * v for v in values) - total * total, n)


def _decimal(x: Fraction) -> Decimal:
    """`x` rounded to the current context (one rounding: numerator and denominator convert exactly)."""
    return Decimal(x.numerator) / Decimal(x.denominator)


def _two_sided_tail(t_squared: Fraction, df: int) -> Decimal:
    """P(|T_df| ≥ √t_squared) = I_x(df/2, 1/2), x = df / (df + t²). x and 1 − x are each formed from the exact
    rational, so neither loses digits to cancellation."""
    if t_squared == 0:
        return Decimal(1)
    total = df * t_squared.denominator + t_squared.numerator
    x = Decimal(df * t_squared.denominator) / total
    one_minus_x = Decimal(t_squared.numerator) / total
    a, b = Decimal(df) / 2, Decimal("0.5")
    # x^a (1 − x)^b / B(a, b), with a = df/2 and b = 1/2 taken as halves: powers and square roots only.
    front = _power_of_halves(x, df) * one_minus_x.sqrt() / _beta_half(df)
    if front == 0:  # beyond the exponent range: the tail is 0 to every digit we keep
        return Decimal(0)
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1 - front * _beta_continued_fraction(b, a, one_minus_x) / b


def _power_of_halves(x: Decimal, halves: int) -> Decimal:
    """x^(halves/2) by square-and-multiply and one square root (each step correctly rounded)."""
    result, base, n = Decimal(1), x, halves // 2
    while n:
        if n & 1:
            result *= base
        base *= base
        n >>= 1
    return result * x.sqrt() if halves % 2 else result


@lru_cache(maxsize=64)
def _beta_half(df: int) -> Decimal:
    """B(df/2, 1/2): 2 for df = 2 and π for df = 1, times df'/(df'+1) for each step df' → df' + 2 below df."""
    with localcontext(_CONTEXT) as ctx:
        ctx.prec += 10  # guard digits for the running product
        value = _PI if df % 2 else Decimal(2)
        for d in range(2 - df % 2, df - 1, 2):
            value = value * d / (d + 1)
    with localcontext(_CONTEXT):
        return +value


def _beta_continued_fraction(a: Decimal, b: Decimal, x: Decimal) -> Decimal:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf), by the modified Lentz method; it
    converges fast for x < (a + 1) / (a + b + 2), where the caller uses it."""
    qab, qap, qam = a + b, a + 1, a - 1
    c = Decimal(1)
    d = 1 / _nonzero(1 - qab * x / qap)
    h = d
    for m in range(1, _CF_MAX_TERMS + 1):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 / _nonzero(1 + even * d)
        c = _nonzero(1 + even / c)
        h *= d * c
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 / _nonzero(1 + odd * d)
        c = _nonzero(1 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1) < _CF_EPSILON:
            return h
    raise ArithmeticError(f"the incomplete beta continued fraction did not converge in {_CF_MAX_TERMS} terms "
                          f"(a={a}, b={b}, x={x})")


def _nonzero(v: Decimal) -> Decimal:
    return _CF_TINY if abs(v) < _CF_TINY else v


def _round_fraction(x: Fraction, places: int) -> Decimal:
    """`x` rounded half-even to `places` decimals, exactly (a single rounding of the rational)."""
    return Decimal(round(x * 10**places)).scaleb(-places, context=_CONTEXT)


def _round_decimal(x: Decimal, places: int) -> Decimal:
    if x.is_infinite():
        return x
    rounded = x.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN, context=_CONTEXT)
    return rounded.copy_abs() if rounded.is_zero() else rounded  # never "-0.000"


def _text(x: Decimal) -> str:
    return format(x, "f")
