"""Simulated devices: readings always validate, look physiological, keep their schedule, repeat by seed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carechain.events import (
    Activity,
    BloodPressure,
    Glucose,
    HeartRate,
    Purchase,
    SpO2,
    Temperature,
    Weight,
    make_payload,
    validate_payload,
)
from carechain.identity import Identity
from carechain.profiles import CatalogueItem, DeviceProfile, load_profiles
from edge_agent.sources.simulated import SimulatedDevice, SimulationError

PROFILES = load_profiles()
DEV = Identity.from_seed(b"\x07" * 32).device_id
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
DAY_MS = 86_400_000


def run(device: SimulatedDevice, steps: int, start_ms: int = T0) -> list[tuple[int, str, object]]:
    """Drive `device` at its own schedule: (time, kind, body) for `steps` due times."""
    out: list[tuple[int, str, object]] = []
    now = start_ms
    for _ in range(steps):
        out += [(now, kind, body) for kind, body in device.next_readings(now)]
        due = device.next_due_ms()
        assert due is not None and due > now
        now = due
    return out


def bodies(name: str, kind: str, steps: int = 300, seed: int = 1) -> list:
    return [body for _, k, body in run(SimulatedDevice(PROFILES[name], seed), steps) if k == kind]


# -- every reading validates ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(PROFILES)),
    seed=st.integers(min_value=0, max_value=2**64),
    start_ms=st.integers(min_value=0, max_value=4_000_000_000_000),
    gaps_ms=st.lists(st.integers(min_value=0, max_value=3 * DAY_MS), min_size=1, max_size=150),
)
def test_readings_always_validate_as_wire_payloads(
    name: str, seed: int, start_ms: int, gaps_ms: list[int]
) -> None:
    profile = PROFILES[name]
    device = SimulatedDevice(profile, seed)
    now, seq = start_ms, 0
    for gap in gaps_ms:
        for kind, body in device.next_readings(now):
            assert kind in profile.events
            payload = make_payload(DEV, seq, now, kind, body)
            assert validate_payload(payload).parsed_body() == body
            seq += 1
        now += gap


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(PROFILES)), seed=st.integers(min_value=0, max_value=2**32))
def test_long_runs_on_schedule_stay_valid(name: str, seed: int) -> None:
    for now, kind, body in run(SimulatedDevice(PROFILES[name], seed), 400):
        make_payload(DEV, 0, now, kind, body)


# -- determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_same_seed_gives_the_same_readings(name: str) -> None:
    def dump(seed: int | random.Random) -> list:
        return [(t, k, b.model_dump()) for t, k, b in run(SimulatedDevice(PROFILES[name], seed), 50)]

    assert dump(42) == dump(42) == dump(random.Random(42))
    assert dump(42) != dump(43)


# -- schedule -------------------------------------------------------------------------------------------


def test_first_call_emits_every_kind_then_each_kind_on_its_own_interval() -> None:
    band = SimulatedDevice(PROFILES["heart_rate_band"], 3)
    assert band.next_due_ms() is None
    assert [k for k, _ in band.next_readings(T0)] == ["heart_rate", "activity"]
    assert band.next_due_ms() == T0 + 5_000
    assert band.next_readings(T0 + 4_999) == []
    assert [k for k, _ in band.next_readings(T0 + 5_000)] == ["heart_rate"]
    kinds = [k for t in range(T0 + 10_000, T0 + 60_001, 5_000) for k, _ in band.next_readings(t)]
    assert kinds.count("heart_rate") == 11 and kinds.count("activity") == 1


def test_a_long_pause_does_not_burst_catch_up_readings() -> None:
    thermometer = SimulatedDevice(PROFILES["thermometer"], 3)
    thermometer.next_readings(T0)
    assert len(thermometer.next_readings(T0 + 3_600_000)) == 1  # an hour late: one reading, not sixty
    assert thermometer.next_due_ms() == T0 + 3_660_000


# -- plausible physiology -------------------------------------------------------------------------------


def test_heart_rate_and_rr_intervals_agree() -> None:
    readings: list[HeartRate] = bodies("heart_rate_band", "heart_rate")
    assert all(55 <= r.bpm <= 95 and r.sensor_contact for r in readings)
    for r in readings:
        beat = 60 * 1024 / r.bpm
        assert 1 <= len(r.rr_intervals_1024) <= 3
        assert all(abs(rr - beat) <= 0.05 * beat for rr in r.rr_intervals_1024)
    assert len({r.bpm for r in readings}) > 5  # it does wander


def test_activity_accumulates_through_the_day_and_resets_at_midnight() -> None:
    device = SimulatedDevice(PROFILES["heart_rate_band"], 5)
    midnight = (T0 // DAY_MS + 1) * DAY_MS
    start = midnight - 3_600_000
    series = [(t, b) for t, k, b in run(device, 6000, start) if k == "activity"]
    before = [b for t, b in series if t < midnight]
    after = [b for t, b in series if t >= midnight]
    for day in (before, after):
        assert all(isinstance(b, Activity) for b in day)
        assert [b.steps for b in day] == sorted(b.steps for b in day)
        assert [b.active_minutes for b in day] == sorted(b.active_minutes for b in day)
    assert before[-1].steps > 0 and after[0].steps <= 120  # a new day starts from (almost) zero
    assert after[0].steps < before[-1].steps


def test_temperature_stays_in_the_normal_range() -> None:
    readings: list[Temperature] = bodies("thermometer", "temperature")
    assert all(36.1 <= r.celsius <= 37.8 and r.site == "tympanum" for r in readings)


def test_blood_pressure_is_plausible_with_the_usual_mean() -> None:
    readings: list[BloodPressure] = bodies("blood_pressure_cuff", "blood_pressure")
    for r in readings:
        assert 100 <= r.systolic_mmhg <= 145 and 60 <= r.diastolic_mmhg <= 95
        assert r.systolic_mmhg - r.diastolic_mmhg >= 25
        assert r.mean_mmhg == round(r.diastolic_mmhg + (r.systolic_mmhg - r.diastolic_mmhg) / 3, 1)
        assert r.pulse_bpm is not None and 55 <= r.pulse_bpm <= 95


def test_spo2_stays_between_92_and_100() -> None:
    readings: list[SpO2] = bodies("pulse_oximeter", "spo2")
    assert all(92 <= r.spo2_pct <= 100 for r in readings)


def test_glucose_records_are_numbered_consecutively() -> None:
    readings: list[Glucose] = bodies("glucose_meter", "glucose")
    assert all(70 <= r.mg_dl <= 180 for r in readings)
    seqs = [r.record_seq for r in readings]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_weight_is_stable_and_bmi_matches_one_height() -> None:
    readings: list[Weight] = bodies("scale", "weight")
    kgs = [r.kg for r in readings]
    assert max(kgs) - min(kgs) <= 0.7  # ±0.3 kg around the person's own weight, plus rounding
    heights = {round((r.kg / r.bmi) ** 0.5, 2) for r in readings if r.bmi}
    assert max(heights) - min(heights) <= 0.01
    assert all(17 <= (r.bmi or 0) <= 33 for r in readings)


def test_pharmacy_purchases_follow_the_catalogue() -> None:
    sim = PROFILES["pharmacy_terminal"].sampling.simulate
    assert sim is not None and sim.purchase is not None
    catalogue = {item.code: item for item in sim.purchase.catalogue}
    sales: list[Purchase] = bodies("pharmacy_terminal", "purchase", 400)
    assert {s.item_code for s in sales} == set(catalogue)
    assert 1 < len({s.patient_token for s in sales}) <= sim.purchase.patients
    for s in sales:
        item = catalogue[s.item_code]
        assert s.price_minor == item.price_minor * s.quantity and s.currency == "USD"
        assert s.patient_token.startswith("pt-")
        assert (s.rx_ref is not None) == item.rx_only
        assert (
            s.payment_method == "insurance"
            if item.immunization
            else s.payment_method in ("card", "insurance")
        )


def test_rx_refs_come_from_the_callback_when_given() -> None:
    asked: list[tuple[str, str]] = []

    def rx_ref_for(patient: str, item: CatalogueItem) -> str | None:
        asked.append((patient, item.code))
        return f"rx:{patient}:{item.code}"

    device = SimulatedDevice(PROFILES["pharmacy_terminal"], 9, rx_ref_for=rx_ref_for)
    sales = [b for _, _, b in run(device, 100)]
    rx_sales = [s for s in sales if isinstance(s, Purchase) and s.rx_only]
    assert rx_sales and [s.rx_ref for s in rx_sales] == [f"rx:{p}:{c}" for p, c in asked]
    # the callback does not change what is sold to whom
    plain = [b for _, _, b in run(SimulatedDevice(PROFILES["pharmacy_terminal"], 9), 100)]
    assert [(s.item_code, s.patient_token) for s in sales] == [(s.item_code, s.patient_token) for s in plain]


def test_profile_without_a_simulation_section_is_refused() -> None:
    data = PROFILES["thermometer"].model_dump()
    data["sampling"]["simulate"] = None
    profile = DeviceProfile.model_validate(data)
    with pytest.raises(
        SimulationError, match="add sampling.simulate.temperature to device_profiles/thermometer"
    ):
        SimulatedDevice(profile, 1)
