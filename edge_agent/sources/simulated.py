"""A simulated device of any profile, sans-IO: feed it the time, get `(kind, body)` readings back.

Used by `carechain demo`, the fleet load generator and tests in place of a BLE peripheral or a pharmacy
terminal. Each physiological value is a mean-reverting random walk around a baseline that every simulated
device draws once from its profile's `sampling.simulate` section, and never leaves the limits written
there, so each simulated person has a steady physiology of their own. The same profile and seed always
give the same readings; nothing here reads a clock, sleeps or touches the network.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from carechain.events import Activity, BloodPressure, EventBody, Glucose, HeartRate, Purchase, SpO2, Temperature, Weight
from carechain.profiles import (
    ActivitySim,
    BloodPressureSim,
    CatalogueItem,
    DeviceProfile,
    GlucoseSim,
    HeartRateSim,
    PurchaseSim,
    Signal,
    SpO2Sim,
    TemperatureSim,
    WeightSim,
)
from edge_agent.source import Reading

RxRefFor = Callable[[str, CatalogueItem], str | None]
"""Given (patient_token, item) for an Rx-only sale, the prescription reference to cite, or None."""

_DAY_MS = 86_400_000
_MAX_STEPS = 200_000  # carechain.events.Activity.steps' upper bound
_MAX_ACTIVE_MIN = 1440


class SimulationError(ValueError):
    """A profile cannot be simulated (its `sampling.simulate` section lacks a kind it emits)."""


class _Walk:
    """Mean-reverting random walk around a per-device baseline, kept within the signal's limits."""

    def __init__(self, signal: Signal, rng: random.Random) -> None:
        self._rng = rng
        self._signal = signal
        self.baseline = rng.uniform(*signal.baseline)
        lo, hi = signal.limits
        if signal.spread is not None:  # e.g. body weight: stable within ±spread of this person's own
            lo, hi = max(lo, self.baseline - signal.spread), min(hi, self.baseline + signal.spread)
        self._lo, self._hi = lo, hi
        self.value = self.baseline

    def step(self) -> float:
        pull = self._signal.reversion * (self.baseline - self.value)
        self.value = min(self._hi, max(self._lo, self.value + pull + self._rng.gauss(0.0, self._signal.step)))
        return self.value


class _HeartRate:
    def __init__(self, sim: HeartRateSim, rng: random.Random) -> None:
        self._rng, self._bpm = rng, _Walk(sim.bpm, rng)

    def __call__(self, now_ms: int) -> EventBody:
        bpm = round(self._bpm.step())
        beat_1024 = 60 * 1024 / bpm  # mean RR interval in 1/1024 s, as the Heart Rate Measurement carries it
        rr = [round(beat_1024 * self._rng.uniform(0.96, 1.04)) for _ in range(self._rng.randint(1, 3))]
        return HeartRate(bpm=bpm, sensor_contact=True, rr_intervals_1024=rr)


class _Temperature:
    def __init__(self, sim: TemperatureSim, rng: random.Random) -> None:
        self._site, self._celsius = sim.site, _Walk(sim.celsius, rng)

    def __call__(self, now_ms: int) -> EventBody:
        return Temperature(celsius=round(self._celsius.step(), 1), site=self._site)


class _BloodPressure:
    def __init__(self, sim: BloodPressureSim, rng: random.Random) -> None:
        self._sim = sim
        self._sys, self._dia = _Walk(sim.systolic_mmhg, rng), _Walk(sim.diastolic_mmhg, rng)
        self._pulse = _Walk(sim.pulse_bpm, rng) if sim.pulse_bpm else None

    def __call__(self, now_ms: int) -> EventBody:
        systolic = float(round(self._sys.step()))  # cuffs report whole mmHg
        ceiling = systolic - self._sim.min_pulse_pressure_mmhg
        diastolic = float(round(max(self._sim.diastolic_mmhg.limits[0], min(self._dia.step(), ceiling))))
        diastolic = min(diastolic, systolic - 1)  # rounding must never make them meet
        mean = round(diastolic + (systolic - diastolic) / 3, 1)  # the usual clinical estimate of MAP
        pulse = float(round(self._pulse.step())) if self._pulse else None
        return BloodPressure(
            systolic_mmhg=systolic, diastolic_mmhg=diastolic, mean_mmhg=mean, pulse_bpm=pulse
        )


class _SpO2:
    def __init__(self, sim: SpO2Sim, rng: random.Random) -> None:
        self._spo2 = _Walk(sim.spo2_pct, rng)
        self._pulse = _Walk(sim.pulse_bpm, rng) if sim.pulse_bpm else None

    def __call__(self, now_ms: int) -> EventBody:
        pulse = float(round(self._pulse.step())) if self._pulse else None
        return SpO2(spo2_pct=float(round(self._spo2.step())), pulse_bpm=pulse)


class _Glucose:
    def __init__(self, sim: GlucoseSim, rng: random.Random) -> None:
        self._sample, self._mg_dl = sim.sample, _Walk(sim.mg_dl, rng)
        self._seq = rng.randint(1, 500)  # a meter in use already holds records

    def __call__(self, now_ms: int) -> EventBody:
        seq, self._seq = self._seq, (self._seq + 1) % 65536  # the GATT record sequence number is a uint16
        return Glucose(mg_dl=float(round(self._mg_dl.step())), record_seq=seq, sample=self._sample)


class _Weight:
    def __init__(self, sim: WeightSim, rng: random.Random) -> None:
        self._kg = _Walk(sim.kg, rng)
        self._height_m: float | None = None
        if sim.height_m:
            # Fit the height to the weight (BMI 20-30) so no one weighs 105 kg at 1.55 m by chance.
            lo, hi = sim.height_m
            self._height_m = min(hi, max(lo, (self._kg.baseline / rng.uniform(20, 30)) ** 0.5))

    def __call__(self, now_ms: int) -> EventBody:
        kg = round(self._kg.step(), 1)
        bmi = round(kg / self._height_m**2, 1) if self._height_m else None
        return Weight(kg=kg, bmi=bmi)


class _Activity:
    """Steps and active minutes so far today (UTC), accumulated from a cadence that wanders."""

    def __init__(self, sim: ActivitySim, rng: random.Random) -> None:
        self._cadence, self._active_above = _Walk(sim.steps_per_min, rng), sim.active_above_steps_per_min
        self._day: int | None = None
        self._last_ms = 0
        self._steps = 0.0
        self._active_ms = 0

    def __call__(self, now_ms: int) -> EventBody:
        day = now_ms // _DAY_MS
        if day != self._day:
            # A new day starts from zero; the first reading ever counts from now, later ones from midnight.
            self._last_ms = now_ms if self._day is None else day * _DAY_MS
            self._day, self._steps, self._active_ms = day, 0.0, 0
        elapsed = max(0, now_ms - self._last_ms)  # a clock stepping back adds nothing
        self._last_ms = max(self._last_ms, now_ms)
        cadence = self._cadence.step()
        self._steps += cadence * elapsed / 60_000
        if cadence >= self._active_above:
            self._active_ms += elapsed
        return Activity(
            steps=min(int(self._steps), _MAX_STEPS),
            active_minutes=min(self._active_ms // 60_000, _MAX_ACTIVE_MIN),
        )


class _Purchase:
    def __init__(self, sim: PurchaseSim, rng: random.Random, rx_ref_for: RxRefFor | None) -> None:
        self._sim, self._rng, self._rx_ref_for = sim, rng, rx_ref_for
        self._patients = [f"pt-{rng.getrandbits(64):016x}" for _ in range(sim.patients)]

    def __call__(self, now_ms: int) -> EventBody:
        rng = self._rng
        item = rng.choice(self._sim.catalogue)
        patient = rng.choice(self._patients)
        quantity = rng.randint(1, item.max_quantity)
        payment: Literal["insurance", "card"]
        if item.immunization:
            payment = "insurance"  # covered items are billed to the insurer at sale time
        elif item.rx_only:
            payment = rng.choice(("insurance", "insurance", "card"))
        else:
            payment = "card"
        rx_ref = None
        if item.rx_only:
            synthetic = f"rx-{rng.getrandbits(64):016x}"  # drawn always, so a callback keeps the stream
            rx_ref = self._rx_ref_for(patient, item) if self._rx_ref_for else synthetic
        return Purchase(
            item_code=item.code,
            code_system=item.code_system,
            rx_only=item.rx_only,
            quantity=quantity,
            price_minor=item.price_minor * quantity,
            currency=self._sim.currency,
            patient_token=patient,
            payment_method=payment,
            rx_ref=rx_ref,
        )


class SimulatedDevice:
    """A stand-in for one device of `profile`: call `next_readings(now_ms)` and sign what comes back.

    Each event kind is due every `profile.interval_s(kind)`; the first call emits every kind. After a
    long gap (a paused demo) the schedule moves on rather than emitting a burst of catch-up readings.
    Rx-only purchases cite `rx_ref_for(patient_token, item)` when given, else a synthetic `rx-…`
    reference that no prescription contract will know.
    """

    def __init__(
        self,
        profile: DeviceProfile,
        seed: int | str | random.Random = 0,
        *,
        rx_ref_for: RxRefFor | None = None,
    ) -> None:
        self._profile = profile
        rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        sim = profile.sampling.simulate
        makers: dict[str, Callable[[int], EventBody]] = {}
        for kind in profile.events:
            spec = getattr(sim, kind, None) if sim is not None else None
            if spec is None:
                raise SimulationError(
                    f"profile {profile.name!r} cannot be simulated: add sampling.simulate.{kind} "
                    f"to device_profiles/{profile.name}.yaml"
                )
            makers[kind] = _MAKERS[kind](spec, rng, rx_ref_for)
        self._makers = makers
        self._due: dict[str, int] = {}

    @property
    def profile(self) -> DeviceProfile:
        return self._profile

    def next_due_ms(self) -> int | None:
        """When the next reading is due (ms), or None before the first call (everything is due now)."""
        return min(self._due.values()) if self._due else None

    def next_readings(self, now_ms: int) -> list[Reading]:
        """The readings due at `now_ms` (device time, ms since the epoch), in the profile's event order."""
        readings: list[Reading] = []
        for kind, make in self._makers.items():
            due = self._due.get(kind)
            if due is not None and now_ms < due:
                continue
            readings.append((kind, make(now_ms)))
            interval_ms = max(1, round(self._profile.interval_s(kind) * 1000))
            following = now_ms + interval_ms if due is None else due + interval_ms
            self._due[kind] = following if following > now_ms else now_ms + interval_ms
        return readings


_MAKERS: dict[str, Callable[..., Callable[[int], EventBody]]] = {
    "heart_rate": lambda spec, rng, _rx: _HeartRate(spec, rng),
    "temperature": lambda spec, rng, _rx: _Temperature(spec, rng),
    "blood_pressure": lambda spec, rng, _rx: _BloodPressure(spec, rng),
    "spo2": lambda spec, rng, _rx: _SpO2(spec, rng),
    "glucose": lambda spec, rng, _rx: _Glucose(spec, rng),
    "weight": lambda spec, rng, _rx: _Weight(spec, rng),
    "activity": lambda spec, rng, _rx: _Activity(spec, rng),
    "purchase": lambda spec, rng, rx: _Purchase(spec, rng, rx),
}
