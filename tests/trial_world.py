"""The trial test world: a sponsor, two investigators, bonded miners that can be drawn as labellers, a bonded
pharmacy with its terminal, and patients each with a registered wearable that signs sealed `trial_measure` readings.

Not a test module itself: tests/test_contracts_trials.py and tests/test_trial_check.py import `TrialWorld`. Every
secret (seeds, escrow coefficients, data keys) is derived from a label so runs are reproducible; every entry is
really signed and goes through the real runtime.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from test_contracts_world import DAY, T0, World, ident

from carechain import envelope, sealed
from carechain.checkpoint import Checkpoint, sign_note
from carechain.cosignature import Cosigner, add_cosignature, cosign
from carechain.entries import Entry, event_entry
from carechain.events import Purchase, TrialMeasure, make_payload, make_sealed_payload
from carechain.identity import Identity
from carechain.trial_allocation import (
    FIELD_PRIME,
    Design,
    allocation,
    allocation_key,
    escrow_shares,
    seed_commitment,
)
from contract_rules import Genesis, Runtime
from contract_rules import trial_entries as te
from contract_rules import trials as rules
from contract_rules.bonds import MIN_BOND
from contract_rules.runtime import CodeBook
from contract_rules.trial_analysis import difference_in_means

N_MINERS = 5
TRIAL = "hrt-1"
PROTOCOL_HASH = hashlib.sha256(b"the hrt-1 protocol document").hexdigest()
DESIGN = Design(arms=["treatment", "placebo"], ratio=[1, 1], block_sizes=[4], strata={"sex": ["f", "m"]})
ENROL_CLOSES = T0 + 10 * DAY
LOCK_AT = T0 + 40 * DAY
REVEAL_WINDOW = 2 * DAY
EPOCH_MS = 3_600_000
SCALE = 1000  # milli-bpm


def seed_of(party: str, label: str = "") -> bytes:
    return hashlib.sha256(f"trial seed {party} {label}".encode()).digest()


@dataclass
class Reading:
    """A participant's sealed `trial_measure` reading as anchored: its leaf, envelope, ciphertext and data key."""

    leaf: int
    event: bytes
    ct: bytes
    key: bytes


class TrialWorld(World):

    def __init__(self, n_patients: int = 16, contracts: dict[str, str] | None = None,
                 code: CodeBook | None = None) -> None:
        super().__init__(contracts, code)
        self.miners = [ident(30 + i) for i in range(N_MINERS)]
        self.sponsor = ident(60)
        self.investigators = [ident(61), ident(62)]
        self.patients = [ident(70 + i) for i in range(n_patients)]
        self.devices = [ident(130 + i) for i in range(n_patients)]
        self.genesis = Genesis(operators=self.genesis.operators, contracts=self.genesis.contracts,
                               allocations={**self.genesis.allocations,
                                            **{f"miner:{m.device_id}": MIN_BOND["miner"] for m in self.miners}})
        self.runtime = Runtime(self.genesis, code)
        self.standard_parties()
        results = [*(self.register_party("miner", m) for m in self.miners),
                   *(self.post_bond(m, MIN_BOND["miner"]) for m in self.miners),
                   self.register_party("sponsor", self.sponsor),
                   *(self.register_party("investigator", i) for i in self.investigators),
                   *(self.register_party("patient", p) for p in self.patients),
                   *(self.register_device(d, "heart_rate_band", p.device_id)
                     for d, p in zip(self.devices, self.patients, strict=True)),
                   self.attest(T0)]
        assert results == ["ok"] * len(results), results
        self.seeds: dict[str, bytes] = {}
        self.sex: dict[str, str] = {}

    def final_checkpoint(self) -> str:
        """A checkpoint of this log signed by the bridge's key (a genesis operator) and cosigned by three miners."""
        body = Checkpoint("carechain.log/test", len(self.entries), b"\x07" * 32).body()
        note = sign_note(body, "carechain.log/test", self.operator.public_key, self.operator.sign)
        for m in self.miners[:3]:
            note = add_cosignature(note, cosign(body, Cosigner(f"carechain.miner/{m.device_id}", m.public_key),
                                                m.sign, T0))
        return note

    # -- parties --------------------------------------------------------------------------------------
    def by_id(self, party: str) -> Identity:
        everyone = [*self.miners, self.sponsor, *self.investigators, *self.patients]
        return next(p for p in everyone if p.device_id == party)

    def trial(self, trial_id: str = TRIAL) -> dict[str, Any]:
        record = rules.trial_record(self.state, trial_id)
        assert record is not None
        return record

    def committers(self, trial_id: str = TRIAL) -> list[Identity]:
        return [self.by_id(c) for c in rules.committers(self.trial(trial_id))]

    def labellers(self, trial_id: str = TRIAL) -> list[Identity]:
        return self.committers(trial_id)[1:]

    def participant(self, who: Identity, trial_id: str = TRIAL) -> dict[str, Any]:
        record = rules.participant_record(self.state, trial_id, who.device_id)
        assert record is not None
        return record

    # -- entries --------------------------------------------------------------------------------------
    def send(self, who: Identity, payload: Any) -> str:  # noqa: ANN401
        return self.add(te.trial_entry(who, payload))

    def register(self, trial_id: str = TRIAL, *, design: Design = DESIGN, labellers: int = 3,
                 direction: str = "decrease", max_participants: int = 100, note: str | None = None,
                 sponsor: Identity | None = None, investigators: list[str] | None = None) -> str:
        outcome = te.TrialOutcomeSpec(kind="heart_rate", measure="resting_heart_rate", baseline_from_ms=T0,
                                      baseline_to_ms=T0 + 7 * DAY, followup_from_ms=T0 + 30 * DAY,
                                      followup_to_ms=T0 + 37 * DAY, direction=direction)
        reg = te.TrialRegister(trial_id=trial_id, protocol_hash=PROTOCOL_HASH, design=design, outcome=outcome,
                               analysis=te.TrialAnalysis(alpha_milli=50),
                               investigators=investigators or [i.device_id for i in self.investigators],
                               labellers=labellers, seed_checkpoint=note or self.final_checkpoint(),
                               enrol_closes_ms=ENROL_CLOSES, max_participants=max_participants,
                               reveal_window_ms=REVEAL_WINDOW, ts=T0)
        return self.send(sponsor or self.sponsor, reg)

    def commit(self, who: Identity, trial_id: str = TRIAL, *, seed: bytes | None = None,
               escrow_seed: bytes | None = None) -> str:
        """`who`'s commitment to its seed, with escrow shares of `escrow_seed` (default: the same seed)."""
        seed = seed if seed is not None else seed_of(who.device_id, trial_id)
        self.seeds[who.device_id] = seed
        trial = self.trial(trial_id)
        holders = rules.escrow_holders(trial, who.device_id)
        t = rules.threshold(trial)
        coefficients = [int.from_bytes(hashlib.sha512(seed + bytes([i])).digest(), "big") % FIELD_PRIME
                        for i in range(t - 1)]
        shares = escrow_shares(escrow_seed or seed, holders, t, coefficients)
        escrow = {h: te.seal_share(self.by_id(h).public_key, y) for h, y in shares.items()}
        c = te.TrialCommit(trial_id=trial_id, commitment=seed_commitment(trial_id, who.device_id, seed),
                           escrow=escrow, ts=T0)
        return self.send(who, c)

    def commit_all(self, trial_id: str = TRIAL) -> None:
        assert [self.commit(c, trial_id) for c in self.committers(trial_id)] == ["ok"] * len(self.committers())

    def enroll(self, who: Identity, sex: str, trial_id: str = TRIAL, *, investigator: Identity | None = None,
               consent: bytes | None = None) -> str:
        self.sex[who.device_id] = sex
        e = te.TrialEnroll(trial_id=trial_id, participant=who.device_id, attributes={"sex": sex},
                           consent=consent or te.sign_consent(who, trial_id, PROTOCOL_HASH), ts=T0 + DAY)
        return self.send(investigator or self.investigators[0], e)

    def kit_sale(self, who: Identity, label: str, *, terminal: Identity | None = None) -> bytes:
        """The terminal's signed sale of kit `label` to `who` (its COSE_Sign1)."""
        term = terminal or self.terminal
        seq = self._seq[term.device_id]
        self._seq[term.device_id] += 1
        body = Purchase(item_code=label, code_system=te.KIT_SYSTEM, rx_only=False, quantity=1, price_minor=0,
                        currency="USD", patient_token=who.device_id, payment_method="cash")
        return envelope.sign(term, make_payload(term.device_id, seq, T0 + 2 * DAY, "purchase", body))

    def dispense(self, who: Identity, trial_id: str = TRIAL, *, label: str | None = None,
                 pharmacy: Identity | None = None, terminal: Identity | None = None) -> str:
        sale = self.kit_sale(who, label or self.participant(who, trial_id)["label"], terminal=terminal)
        d = te.TrialDispense(trial_id=trial_id, participant=who.device_id, event=sale, ts=T0 + 2 * DAY)
        return self.send(pharmacy or self.pharmacy, d)

    def measure(self, who: Identity, baseline: int, followup: int, *, trial_id: str = TRIAL,
                measure: str = "resting_heart_rate", ts: int = T0 + 38 * DAY) -> Reading:
        """Anchor `who`'s device-signed sealed trial_measure reading; what she later discloses."""
        dev = self.devices[self.patients.index(who)]
        seq = self._seq[dev.device_id]
        self._seq[dev.device_id] += 1
        epoch = sealed.epoch_of(ts, EPOCH_MS)
        key = hashlib.sha256(b"data key" + dev.device_id.encode() + epoch.to_bytes(8, "big")).digest()
        nonce = hashlib.sha256(b"nonce" + dev.device_id.encode() + seq.to_bytes(8, "big")).digest()[:12]
        body = TrialMeasure(trial_id=trial_id, measure=measure, baseline=baseline, followup=followup,
                            unit_scale=SCALE).model_dump()
        ct = sealed.seal_body(key, nonce, dev.device_id, seq, ts, "trial_measure", epoch, body)
        cose = envelope.sign(dev, make_sealed_payload(dev.device_id, seq, ts, "trial_measure", epoch,
                                                      sealed.ciphertext_hash(ct)))
        assert self.add(event_entry(cose)) == "ok"
        return Reading(self.last_index, cose, ct, key)

    def outcome(self, who: Identity, reading: Reading, trial_id: str = TRIAL, *, ct: bytes | None = None,
                leaf: int | None = None) -> str:
        o = te.TrialOutcome(trial_id=trial_id, leaf=reading.leaf if leaf is None else leaf, event=reading.event,
                            ct=ct or reading.ct, key=reading.key, ts=LOCK_AT + DAY)
        return self.send(who, o)

    def lock(self, trial_id: str = TRIAL, *, at: int = LOCK_AT) -> str:
        assert self.attest(at) == "ok"
        return self.send(self.sponsor, te.TrialLock(trial_id=trial_id, ts=at))

    def reveal(self, who: Identity, trial_id: str = TRIAL, *, seed: bytes | None = None) -> str:
        r = te.TrialReveal(trial_id=trial_id, seed=seed or self.seeds[who.device_id], ts=LOCK_AT)
        return self.send(who, r)

    def recover(self, holder: Identity, party: Identity, trial_id: str = TRIAL) -> str:
        """`holder` opens its escrow share of `party`'s seed from the commit entry and posts it."""
        trial = self.trial(trial_id)
        commit = next(envelope.parse(e.cose).payload for e in self.entries
                      if e.type == "trial.commit" and envelope.parse(e.cose).kid == party.device_id
                      and envelope.parse(e.cose).payload["trial_id"] == trial_id)
        y = te.open_share(holder, commit["escrow"][holder.device_id])
        x = rules.escrow_holders(trial, party.device_id).index(holder.device_id) + 1
        r = te.TrialRecover(trial_id=trial_id, party=party.device_id, x=x, y=te.share_bytes(y), ts=LOCK_AT)
        return self.send(holder, r)

    # -- the independent recomputation a test compares the contract against ------------------------------
    def expected_arms(self, trial_id: str = TRIAL) -> dict[str, str]:
        """Participant → arm, from the seeds this world drew and the trial's checkpoint seed."""
        trial = self.trial(trial_id)
        key = allocation_key(self.seeds, bytes.fromhex(trial["checkpoint_seed"]), trial_id)
        design = Design.model_validate(trial["design"])
        arms: dict[str, str] = {}
        for stratum, n in trial["strata_counts"].items():
            sequence = allocation(key, design, stratum, n)
            for pid in trial["participants"]:
                p = self.participant(self.by_id(pid), trial_id)
                if p["stratum"] == stratum:
                    arms[pid] = sequence[p["position"]]
        return arms

    def certify_entry(self, values: dict[str, int], trial_id: str = TRIAL, *, direction: str = "decrease",
                      result: dict[str, Any] | None = None) -> te.TrialCertify:
        """The certificate a client computes from the arms and the analysed outcomes `values` (participant →
        followup − baseline)."""
        arms = self.expected_arms(trial_id)
        treatment = [v for pid, v in values.items() if arms[pid] == "treatment"]
        control = [v for pid, v in values.items() if arms[pid] == "placebo"]
        computed = difference_in_means(treatment, control, direction=direction).as_dict()  # type: ignore[arg-type]
        summary: dict[str, dict[str, int]] = {}
        trial = self.trial(trial_id)
        for pid in trial["participants"]:
            stratum = self.participant(self.by_id(pid), trial_id)["stratum"]
            counts = summary.setdefault(stratum, {arm: 0 for arm in trial["design"]["arms"]})
            counts[arms[pid]] += 1
        return te.TrialCertify(trial_id=trial_id, result=te.TrialResult(**(result or computed)),
                               allocation=summary, ts=LOCK_AT + 3 * DAY)

    def run_to_lock(self, effect: int, n: int | None = None) -> dict[str, int]:
        """Register, commit, enrol and dispense to the first `n` patients (alternating sex), anchor each one's
        measure (treatment: change `effect` milli-bpm on top of a spread; placebo: the spread only) and lock.
        Returns participant → followup − baseline."""
        assert self.register() == "ok"
        self.commit_all()
        patients = self.patients[:n or len(self.patients)]
        for i, p in enumerate(patients):
            assert self.enroll(p, "f" if i % 2 else "m") == "ok"
            assert self.dispense(p) == "ok"
        # The arms are unknown to every party until the reveals; the test world knows them from the seeds.
        arms = self.expected_arms()
        values: dict[str, int] = {}
        self.readings: dict[str, Reading] = {}
        for i, p in enumerate(patients):
            spread = ((i * 7919) % 11 - 5) * 800
            change = spread + (effect if arms[p.device_id] == "treatment" else 0)
            baseline = 72_000 + i * 100
            self.readings[p.device_id] = self.measure(p, baseline, baseline + change)
            values[p.device_id] = change
        assert self.lock() == "ok"
        return values

    def reveal_all(self) -> None:
        assert [self.reveal(c) for c in self.committers()] == ["ok"] * len(self.committers())

    def disclose_all(self, values: dict[str, int]) -> None:
        for pid in values:
            assert self.outcome(self.by_id(pid), self.readings[pid]) == "ok"


__all__ = ["DAY", "DESIGN", "ENROL_CLOSES", "LOCK_AT", "PROTOCOL_HASH", "REVEAL_WINDOW", "T0", "TRIAL",
           "Reading", "TrialWorld", "Entry", "seed_of"]
