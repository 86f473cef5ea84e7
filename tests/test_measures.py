"""Derived measures (carechain.measures): the integer a contributor's readings give, by query type."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from carechain.measures import (
    GLUCOSE_MAX_GAP_MS,
    MINUTE_MS,
    NoMeasure,
    measure,
    plain_value,
    resting_heart_rate,
    round_half_up,
    time_in_range,
)

T0 = 1_765_000_000_000 // MINUTE_MS * MINUTE_MS


def hr(ts: int, bpm: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "heart_rate", "ts": ts, "bpm": bpm, **extra}


def glucose(ts: int, mg_dl: float) -> dict[str, Any]:
    return {"kind": "glucose", "ts": ts, "mg_dl": mg_dl}


def test_round_half_up_rounds_halves_up_not_to_even():
    assert [round_half_up(Fraction(n, 2)) for n in (-3, -1, 1, 3, 5)] == [-1, 0, 1, 2, 3]
    assert round_half_up(Fraction(7, 3)) == 2


def test_plain_value_is_the_rounded_mean_of_the_kinds_field_ignoring_other_kinds():
    readings = [hr(T0, 60), hr(T0 + 1, 61), glucose(T0, 500.0)]
    assert plain_value(readings, "heart_rate") == 61  # 60.5 rounds up
    assert plain_value([glucose(T0, 99.5), glucose(T0 + 1, 100.25)], "glucose") == 100  # 99.875


def test_plain_value_without_readings_of_the_kind_is_no_measure():
    with pytest.raises(NoMeasure, match="no glucose readings"):
        plain_value([hr(T0, 60)], "glucose")
    with pytest.raises(NoMeasure, match="no value field"):
        plain_value([hr(T0, 60)], "epoch_key")


def test_resting_heart_rate_is_the_mean_of_the_lowest_5_percent_of_minute_means():
    # 40 minutes: minute m has two readings averaging 100 + m, except minutes 7 and 30 (means 50.5 and 55);
    # 5 % of 40 minutes = 2 minutes: (50.5 + 55) / 2 = 52.75 → 53.
    pairs = {7: (50, 51), 30: (54, 56)}
    readings = []
    for m in range(40):
        first, second = pairs.get(m, (100 + m, 100 + m))
        readings += [hr(T0 + m * MINUTE_MS, first), hr(T0 + m * MINUTE_MS + 30_000, second)]
    assert resting_heart_rate(readings) == 53


def test_resting_heart_rate_leaves_out_readings_without_skin_contact():
    readings = [hr(T0 + m * MINUTE_MS, 70) for m in range(10)]
    assert resting_heart_rate(readings + [hr(T0 + 5, 30, sensor_contact=False)]) == 70
    assert resting_heart_rate(readings + [hr(T0 + 5, 30, sensor_contact=True)]) == 50  # minute 0: (70+30)/2


def test_resting_heart_rate_needs_ten_distinct_minutes():
    nine = [hr(T0 + m * MINUTE_MS + s * 1000, 70) for m in range(9) for s in range(60)]
    with pytest.raises(NoMeasure, match="at least 10 distinct minutes"):
        resting_heart_rate(nine)
    assert resting_heart_rate(nine + [hr(T0 + 9 * MINUTE_MS, 64)]) == 64


def test_time_in_range_counts_minutes_70_to_180_inclusive_until_the_next_reading():
    five = 5 * MINUTE_MS
    readings = [glucose(T0, 69.9), glucose(T0 + five, 70.0), glucose(T0 + 2 * five, 180.0),
                glucose(T0 + 3 * five, 180.1), glucose(T0 + 4 * five, 120.0)]
    # in range: [5, 10) and [10, 15) and the last one's 15-minute cap [20, 35) = 25 minutes
    assert time_in_range(readings, to_ms=T0 + 86_400_000) == 25
    # the period's end cuts the last reading short
    assert time_in_range(readings, to_ms=T0 + 4 * five + 90_000) == 11  # 10 min + 1.5 min floored


def test_time_in_range_does_not_bridge_gaps_longer_than_15_minutes():
    readings = [glucose(T0, 100.0), glucose(T0 + 3 * 3_600_000, 100.0)]
    assert time_in_range(readings, to_ms=T0 + 86_400_000) == 2 * GLUCOSE_MAX_GAP_MS // MINUTE_MS


def test_time_in_range_merges_devices_in_time_order():
    readings = [glucose(T0 + 10 * MINUTE_MS, 300.0), glucose(T0, 100.0)]
    assert time_in_range(readings, to_ms=T0 + 86_400_000) == 10


def test_measure_dispatches_by_query_type_and_refuses_the_wrong_kind():
    readings = [glucose(T0 + m * 5 * MINUTE_MS, 100.0) for m in range(3)]
    assert measure("time_in_range", "glucose", readings, T0 + 86_400_000) == 25
    assert measure("mean", "glucose", readings, T0) == 100
    with pytest.raises(NoMeasure, match="over heart_rate readings"):
        measure("resting_heart_rate", "glucose", readings, T0)
    with pytest.raises(NoMeasure, match="unknown query type"):
        measure("median", "glucose", readings, T0)
