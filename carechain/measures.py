"""Derived measures on decrypted readings: the one integer a contributor puts into a study.

Sans-IO and deterministic: readings in (the dicts `carechain.record_check.open_record` returns: `ts`, `kind`
and the body's fields), an integer out, in the unit of the measure. Exact arithmetic (`Fraction`) and one
rounding rule (half up) so that an audit recomputing a measure from the same readings gets the same integer.

The measures, per query type (docs/market.md, "Contributing"):

- `count`, `sum`, `mean`, `histogram`: the *plain value* — the mean of the kind's value field
  (`VALUE_FIELDS`: bpm, mg/dL, °C, %, kg, systolic mmHg, steps) over the readings in the period, rounded;
  a histogram counts it into its bin (`carechain.market.contribution`). `count` does not use the value, but a
  contributor counts only if it has at least one reading.
- `resting_heart_rate` (bpm): readings are grouped into calendar minutes (ts // 60 000) and each minute's mean
  taken; the resting heart rate is the mean of the lowest 5 % of those minute means (at least one minute),
  rounded. Readings the strap flags as without skin contact (`sensor_contact: false`) are left out, and at least
  `RESTING_MIN_MINUTES` minutes are required. Minute means smooth out single spurious beats; the lowest
  5 % of a day is about an hour and ten minutes, i.e. the sleeping and sitting still the clinical definition
  (heart rate at complete rest) points at, without needing a sleep detector.
- `time_in_range` (minutes): the time the glucose level was 70–180 mg/dL inclusive (the international
  consensus target range for CGM data). Each reading stands for the time until the next reading, at most
  `GLUCOSE_MAX_GAP_MS` (15 min: CGMs read every 1–5 min, a longer gap is missing data, not time in range)
  and never past the period's end; the in-range time is summed and floored to whole minutes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from carechain.market import QUERY_TYPES

__all__ = ["DERIVED_KINDS", "GLUCOSE_HIGH_MG_DL", "GLUCOSE_LOW_MG_DL", "GLUCOSE_MAX_GAP_MS", "MINUTE_MS",
           "NoMeasure", "RESTING_FRACTION", "RESTING_MIN_MINUTES", "VALUE_FIELDS", "measure", "plain_value",
           "resting_heart_rate", "round_half_up", "time_in_range"]

VALUE_FIELDS: Mapping[str, str] = {
    "heart_rate": "bpm",
    "glucose": "mg_dl",
    "temperature": "celsius",
    "spo2": "spo2_pct",
    "weight": "kg",
    "blood_pressure": "systolic_mmhg",
    "activity": "steps",
}
DERIVED_KINDS: Mapping[str, str] = {"resting_heart_rate": "heart_rate", "time_in_range": "glucose"}
MINUTE_MS = 60_000
RESTING_FRACTION = Fraction(5, 100)
RESTING_MIN_MINUTES = 10
GLUCOSE_LOW_MG_DL = 70
GLUCOSE_HIGH_MG_DL = 180
GLUCOSE_MAX_GAP_MS = 15 * MINUTE_MS


class NoMeasure(ValueError):
    """The readings do not give this measure (none of the kind, too few minutes, a query it does not apply to)."""


def round_half_up(x: Fraction) -> int:
    """The nearest integer, halves away from minus infinity (not Python's round-half-even)."""
    return int((x + Fraction(1, 2)) // 1)


def _of_kind(readings: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [r for r in readings if r.get("kind") == kind]


def plain_value(readings: Iterable[Mapping[str, Any]], kind: str) -> int:
    """The mean of `kind`'s value field over `readings` (readings of other kinds are ignored), rounded."""
    field = VALUE_FIELDS.get(kind)
    if field is None:
        raise NoMeasure(f"kind {kind!r} has no value field (known: {', '.join(sorted(VALUE_FIELDS))})")
    values = [Fraction(r[field]) for r in _of_kind(readings, kind) if r.get(field) is not None]
    if not values:
        raise NoMeasure(f"no {kind} readings with a {field} in the period")
    return round_half_up(sum(values, Fraction(0)) / len(values))


def resting_heart_rate(readings: Iterable[Mapping[str, Any]]) -> int:
    """The mean of the lowest 5 % of per-minute mean heart rates (module docstring), in bpm, rounded."""
    minutes: dict[int, list[int]] = {}
    for r in _of_kind(readings, "heart_rate"):
        if r.get("sensor_contact") is False:
            continue
        minutes.setdefault(int(r["ts"]) // MINUTE_MS, []).append(int(r["bpm"]))
    if len(minutes) < RESTING_MIN_MINUTES:
        raise NoMeasure(f"a resting heart rate needs heart-rate readings in at least {RESTING_MIN_MINUTES} "
                        f"distinct minutes of the period, found {len(minutes)}")
    means = sorted(Fraction(sum(bpm), len(bpm)) for bpm in minutes.values())
    k = max(1, -(-len(means) * RESTING_FRACTION.numerator // RESTING_FRACTION.denominator))  # ceil(5 % of n)
    return round_half_up(sum(means[:k], Fraction(0)) / k)


def time_in_range(readings: Iterable[Mapping[str, Any]], to_ms: int) -> int:
    """Whole minutes (floored) the glucose level was 70–180 mg/dL, each reading lasting until the next one,
    at most 15 minutes, never past `to_ms` (module docstring)."""
    glucose = sorted(_of_kind(readings, "glucose"), key=lambda r: (int(r["ts"]), str(r.get("dev", "")),
                                                                    int(r.get("seq", 0))))
    if not glucose:
        raise NoMeasure("no glucose readings in the period")
    in_range_ms = 0
    for i, r in enumerate(glucose):
        start = int(r["ts"])
        end = min(start + GLUCOSE_MAX_GAP_MS, to_ms)
        if i + 1 < len(glucose):
            end = min(end, int(glucose[i + 1]["ts"]))
        if GLUCOSE_LOW_MG_DL <= Fraction(r["mg_dl"]) <= GLUCOSE_HIGH_MG_DL and end > start:
            in_range_ms += end - start
    return in_range_ms // MINUTE_MS


def measure(query_type: str, kind: str, readings: Sequence[Mapping[str, Any]], to_ms: int) -> int:
    """A contributor's value for a study query of `query_type` on `kind`, from its readings in the period."""
    if query_type not in QUERY_TYPES:
        raise NoMeasure(f"unknown query type {query_type!r} (known: {', '.join(QUERY_TYPES)})")
    derived_kind = DERIVED_KINDS.get(query_type)
    if derived_kind is not None and derived_kind != kind:
        raise NoMeasure(f"a {query_type} query is over {derived_kind} readings, not {kind}")
    if query_type == "resting_heart_rate":
        return resting_heart_rate(readings)
    if query_type == "time_in_range":
        return time_in_range(readings, to_ms)
    return plain_value(readings, kind)
