"""The owner's agent in a study (record_access.contributing): from her anchored sealed readings to a signed
`study.contribute` entry, with real sealing, real re-encryption capsules and real sealed shares.

The world: a contract replica with the owner, another patient and the study's aggregators registered; the
owner's heart-rate strap and glucose meter, and a strap of the other patient that claims to seal to the owner
(its epoch keys name her and are encrypted to her key) — registered to the other patient, so never hers.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from carechain import envelope, events, market, measures, reencryption, sealed
from carechain.entries import Entry, Registration, Revocation, registration_entry, revocation_entry
from carechain.identity import Identity
from contract_rules import transactions as ce
from contract_rules.genesis import new_genesis
from contract_rules.runtime import OK, Runtime
from record_access.contributing import (
    ContributionError,
    aggregator_keys,
    build_contribution,
    contribution_vector,
    find_own_readings,
    save_opening,
)

OPERATOR = Identity.from_seed(b"\x01" * 32)
OWNER, OWNER_PRE = Identity.from_seed(b"\x02" * 32), reencryption.PreKey.from_seed(b"\x12" * 32)
OTHER, OTHER_PRE = Identity.from_seed(b"\x03" * 32), reencryption.PreKey.from_seed(b"\x13" * 32)
STRAP, METER, FOREIGN = (Identity.from_seed(bytes([b]) * 32) for b in (0x04, 0x05, 0x06))
AGGREGATORS = [Identity.from_seed(bytes([0x20 + i]) * 32) for i in range(3)]
OPERATORS = {OPERATOR.device_id: OPERATOR.public_key}
MINUTE = 60_000
EPOCH_MS = 3_600_000
T0 = 1_765_000_000_000 // EPOCH_MS * EPOCH_MS  # an epoch boundary
FROM_MS, TO_MS = T0 + 10 * MINUTE, T0 + 50 * MINUTE  # the study's period: [from, to)


@dataclass
class World:
    runtime: Runtime = field(default_factory=lambda: Runtime(new_genesis([OPERATOR.public_key], {})))
    leaves: list[bytes] = field(default_factory=list)
    cts: dict[int, bytes] = field(default_factory=dict)
    keys: dict[tuple[str, int], bytes] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)
    plain: list[dict[str, Any]] = field(default_factory=list)  # every reading sealed, with its leaf index

    def append(self, entry: Entry, contract_may_refuse: bool = False) -> int:
        """Apply and log `entry`; a leaf the contracts refuse is still logged when `contract_may_refuse` (a
        dishonest bridge can sequence anything: the agent must not rely on the rules having run)."""
        result = self.runtime.apply(entry)
        assert result == OK or contract_may_refuse, result
        self.leaves.append(entry.encode())
        return len(self.leaves) - 1

    def register(self, device: Identity, owner: Identity, profile: str) -> None:
        self.append(registration_entry(OPERATOR, Registration(dev=device.device_id, pk=device.public_key,
                                                              profile=profile, owner=owner.device_id, site="home",
                                                              ts=T0)))

    def _seq(self, device: Identity) -> int:
        seq = self.seqs.get(device.device_id, 0)
        self.seqs[device.device_id] = seq + 1
        return seq

    def seal(self, device: Identity, kind: str, ts: int, body: dict[str, Any], owner_pre: reencryption.PreKey
             = OWNER_PRE, owner: Identity = OWNER, contract_may_refuse: bool = False) -> int:
        """One sealed reading (after its epoch's epoch_key event, the first time the epoch is used)."""
        epoch = sealed.epoch_of(ts, EPOCH_MS)
        key = self.keys.get((device.device_id, epoch))
        if key is None:
            key = self.keys[(device.device_id, epoch)] = os.urandom(sealed.DATA_KEY_SIZE)
            capsule, key_ct = reencryption.encapsulate(owner_pre.public_key, key)
            ek = events.EpochKey(epoch=epoch, epoch_ms=EPOCH_MS, owner=owner.device_id, capsule=capsule,
                                 key_ct=key_ct)
            self.append(Entry("event", envelope.sign(device, events.make_payload(
                device.device_id, self._seq(device), epoch * EPOCH_MS, "epoch_key", ek, v=events.PROTOCOL_V2))),
                contract_may_refuse)
        seq = self._seq(device)
        ct = sealed.seal_body(key, os.urandom(sealed.NONCE_SIZE), device.device_id, seq, ts, kind, epoch, body)
        cose = envelope.sign(device, events.make_sealed_payload(device.device_id, seq, ts, kind, epoch,
                                                                sealed.ciphertext_hash(ct)))
        index = self.append(Entry("event", cose), contract_may_refuse)
        self.cts[index] = ct
        self.plain.append({"index": index, "dev": device.device_id, "kind": kind, "ts": ts, **body})
        return index

    def indexed(self) -> list[tuple[int, bytes]]:
        return list(enumerate(self.leaves))

    def find(self, kind: str, from_ms: int = FROM_MS, to_ms: int = TO_MS) -> Any:
        return find_own_readings(self.indexed(), self.cts.get, OWNER.device_id, OWNER_PRE, OPERATORS, kind,
                                 from_ms, to_ms)

    def expected(self, kind: str, devices: set[str], from_ms: int = FROM_MS, to_ms: int = TO_MS
                 ) -> list[dict[str, Any]]:
        return [r for r in self.plain if r["kind"] == kind and r["dev"] in devices and from_ms <= r["ts"] < to_ms]


def sealed_world() -> World:
    world = World()
    for who, pre in ((OWNER, OWNER_PRE), (OTHER, OTHER_PRE)):
        world.append(ce.party_registration_entry(OPERATOR, ce.PartyRegistration(
            role="patient", pk=who.public_key, name="patient", ts=T0, pre_pk=pre.public_key,
            pre_vk=pre.verifying_key)))
    for i, agg in enumerate(AGGREGATORS):
        world.append(ce.party_registration_entry(OPERATOR, ce.PartyRegistration(
            role="miner", pk=agg.public_key, name=f"miner-{i}", ts=T0)))
    world.register(STRAP, OWNER, "heart_rate_band")
    world.register(METER, OWNER, "glucose_meter")
    world.register(FOREIGN, OTHER, "heart_rate_band")
    for minute in range(0, 60):  # one reading a minute, before, in and after the period
        ts = T0 + minute * MINUTE
        world.seal(STRAP, "heart_rate", ts + 5_000, {"bpm": 55 + (minute * 7) % 40})
        world.seal(FOREIGN, "heart_rate", ts + 9_000, {"bpm": 200}, contract_may_refuse=True)  # claims her
        if minute % 5 == 0:
            world.seal(METER, "glucose", ts, {"mg_dl": 60.0 + minute * 3})
    return world


def study(query: dict[str, Any]) -> dict[str, Any]:
    return {"researcher": "r", "query": query, "from_ms": FROM_MS, "to_ms": TO_MS, "state": "open",
            "aggregators": [a.device_id for a in AGGREGATORS], "contributions": []}


def reconstruct(shares: list[bytes], width: int) -> list[int]:
    """The vector back from the first t+1 aggregators' opened shares (Lagrange at 0 over MPyC's field)."""
    p, t = market.FIELD_MODULUS, market.threshold_for(len(shares))
    rows = [market.decode_shares(market.open_share(agg, s), width)
            for agg, s in zip(AGGREGATORS, shares, strict=True)][: t + 1]
    xs = list(range(1, t + 2))
    out = []
    for j in range(width):
        acc = 0
        for i, xi in enumerate(xs):
            lag = 1
            for xk in xs:
                if xk != xi:
                    lag = lag * xk * pow(xk - xi, -1, p) % p
            acc = (acc + rows[i][j] * lag) % p
        out.append(acc if acc < p // 2 else acc - p)
    return out


@pytest.fixture(scope="module")
def world() -> World:
    return sealed_world()


def test_finds_exactly_her_readings_of_the_kind_in_the_period(world: World):
    own = world.find("heart_rate")
    expected = world.expected("heart_rate", {STRAP.device_id})
    assert own.problems == []
    assert own.leaves == [r["index"] for r in expected] and len(expected) == 40
    assert [(r["index"], r["bpm"], r["ts"]) for r in own.readings] == [(r["index"], r["bpm"], r["ts"])
                                                                      for r in expected]


def test_readings_of_a_device_registered_to_someone_else_are_never_used(world: World):
    own = world.find("heart_rate", 0, 2**62)
    foreign = {r["index"] for r in world.plain if r["dev"] == FOREIGN.device_id}
    assert foreign and not foreign & set(own.leaves)
    assert all(r["bpm"] != 200 for r in own.readings)


def test_readings_outside_the_period_are_not_used(world: World):
    own = world.find("glucose")
    assert [r["ts"] for r in own.readings] == [T0 + m * MINUTE for m in range(10, 50, 5)]
    assert own.leaves == [r["index"] for r in world.expected("glucose", {METER.device_id})]


@pytest.mark.parametrize("ending", ["revoked", "re-registered"])
def test_a_device_stops_counting_from_its_revocation_or_registration_to_another_owner(ending: str):
    world = sealed_world()
    before = world.find("heart_rate").leaves
    if ending == "revoked":
        world.append(revocation_entry(OPERATOR, Revocation(dev=STRAP.device_id, reason="lost", ts=T0)))
    else:  # the rules refuse a second registration; the agent does not rely on them having run
        world.append(registration_entry(OPERATOR, Registration(
            dev=STRAP.device_id, pk=STRAP.public_key, profile="heart_rate_band", owner=OTHER.device_id, site="x",
            ts=T0)), contract_may_refuse=True)
    late = world.seal(STRAP, "heart_rate", TO_MS - 1_000, {"bpm": 61}, contract_may_refuse=True)
    after = world.find("heart_rate")
    assert late not in after.leaves and after.leaves == before and after.problems == []


def test_a_swapped_ciphertext_is_reported_and_not_used():
    world = sealed_world()
    own = world.find("heart_rate").leaves
    a, b = own[0], own[1]
    world.cts[a], world.cts[b] = world.cts[b], world.cts[a]
    del world.cts[own[2]]
    found = world.find("heart_rate")
    assert {p.index: p.reason.split(":")[0] for p in found.problems} == {
        a: "ciphertext_mismatch", b: "ciphertext_mismatch", own[2]: "no_ciphertext"}
    assert found.leaves == own[3:]


@pytest.mark.parametrize("query", [
    {"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 220},
    {"type": "resting_heart_rate", "kind": "heart_rate", "lo": 30, "hi": 120},
    {"type": "histogram", "kind": "heart_rate", "lo": 30, "hi": 220, "bins": [30, 60, 70, 80, 220]},
    {"type": "time_in_range", "kind": "glucose", "lo": 0, "hi": 1440},
    {"type": "count", "kind": "glucose", "lo": 0, "hi": 1},
])
def test_contribution_from_real_ciphertexts_matches_the_plain_computation(world: World, query: dict[str, Any],
                                                                          tmp_path: Path):
    record = study(query)
    own = world.find(query["kind"])
    devices = {STRAP.device_id} if query["kind"] == "heart_rate" else {METER.device_id}
    plain_readings = world.expected(query["kind"], devices)
    value = measures.measure(query["type"], query["kind"], plain_readings, TO_MS)
    contribution = build_contribution(OWNER, "hr-1", record, consent=3, own=own, ts=T0 + 3_600_000,
                                      aggregators=aggregator_keys(world.runtime.state, record))
    vector = market.contribution(market.Query.model_validate(query), value)
    assert contribution.value == value and contribution.vector == vector
    assert contribution.leaves == [r["index"] for r in plain_readings]
    # the entry: hers, signed, with one sealed share per aggregator that together give back the vector
    msg = envelope.parse(contribution.entry.cose)
    assert contribution.entry.type == ce.STUDY_CONTRIBUTE and msg.verify(OWNER.public_key)
    payload = ce.StudyContribute.model_validate(msg.payload)
    assert (payload.study_id, payload.consent, payload.leaves) == ("hr-1", 3, contribution.leaves)
    assert payload.commitment == market.commitment(vector, contribution.salt)
    assert reconstruct(payload.shares, len(vector)) == vector
    # what an audit opens stays with her, and only with her
    path = tmp_path / "hr-1.opening.json"
    save_opening(path, contribution)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f'"salt": "{contribution.salt.hex()}"' in path.read_text()


def test_the_measures_on_this_world(world: World):
    glucose = world.find("glucose").readings
    # readings at minutes 10, 15, …, 45 of 60 + 3·minute mg/dL: 90 … 180 in range (7 × 5 min), 195 not
    assert measures.time_in_range(glucose, TO_MS) == 35
    hr = world.find("heart_rate").readings
    lowest_two = sorted(r["bpm"] for r in hr)[:2]  # 40 minutes → the lowest 2 minute means
    assert measures.resting_heart_rate(hr) == measures.round_half_up(Fraction(sum(lowest_two), 2))


def test_values_outside_the_bounds_are_clipped_so_an_honest_input_is_valid():
    q = {"type": "histogram", "kind": "heart_rate", "lo": 30, "hi": 220, "bins": [60, 70, 80]}
    assert contribution_vector(q, 45) == [1, 0] and contribution_vector(q, 250) == [0, 1]
    # a value is input as the bits of value - lo, least significant first: 120 - 30 = 90 in k = 7 bits
    assert contribution_vector({"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 120},
                               150) == [0, 1, 0, 1, 1, 0, 1]


def test_no_contribution_to_a_decided_study(world: World):
    record = {**study({"type": "count", "kind": "glucose", "lo": 0, "hi": 1}), "state": "answered"}
    with pytest.raises(ContributionError, match="is answered"):
        build_contribution(OWNER, "s", record, consent=3, own=world.find("glucose"), ts=T0,
                           aggregators=aggregator_keys(world.runtime.state, record))


def test_no_readings_no_contribution(world: World):
    record = study({"type": "mean", "kind": "spo2", "lo": 50, "hi": 100})
    with pytest.raises(ContributionError, match="nothing to contribute: no spo2 readings"):
        build_contribution(OWNER, "s", record, consent=3, own=world.find("spo2"), ts=T0,
                           aggregators=aggregator_keys(world.runtime.state, record))
