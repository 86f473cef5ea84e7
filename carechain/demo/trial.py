"""The demo's clinical trial (docs/trials.md): a small randomised, blinded, placebo-controlled trial of resting
heart rate, run on the demo's live ledger while the bridge and the miners run.

A sponsor registers trial hrt-<run> (40 participants, treatment vs placebo 1:1, permuted blocks of 4, stratified
by sex; the primary outcome the change in resting heart rate, expected to decrease; difference in means at
alpha 0.05) with the hash of its protocol document; the rules draw three labelling miners from a final
checkpoint's seed. The sponsor commits a seed (kept 0600 before its commitment is built), and from there the
labellers commit by themselves (chain_miner.trial_runner). An investigator enrols 40 consenting patients (each
signs her consent with her own key), the demo pharmacy's new terminal sells each her kit, and each patient's
heart-rate band seals her `trial_measure` reading (baseline and follow-up, milli-bpm) to her and anchors it — all
BEFORE the lock, while no party knows any arm. One participant is unblinded in an emergency: the investigator's
logged `trial.unblind`, the sponsor's and the labellers' answers (keys of her block only), her arm opened.
Once enrolment closes on attested time the sponsor locks; every committer reveals (the labellers by themselves);
each participant discloses her own reading (opened with her own re-encryption key); the investigator certifies
the result the rules recompute; `verify_trial` checks it all from the log, under a checkpoint the bridge signed.

What each body does with its kit is simulated by `carechain.demo.trial_biology` — the simulator's stand-in for
the kits' physical contents, which reads the committers' kept seeds. Nothing below uses it except to make the
bands' readings and to report the effect it simulated.

Every wait is bounded and names its step; a step that fails is reported in the summary's `error`, never hidden.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain import envelope, events, reencryption, sealed
from carechain.demo.live import POLL_S, LiveScenario
from carechain.demo.records import Party
from carechain.demo.trial_biology import Biology
from carechain.entries import Entry
from carechain.identity import Identity
from carechain.inventory import InventoryDevice
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import register_devices
from contract_rules import Genesis
from contract_rules import transactions as ce
from contract_rules.runtime import State

__all__ = ["PARTICIPANTS", "TrialDemo", "TrialDemoError", "certificate_lines"]

PARTICIPANTS = 40
EFFECT_MILLI_BPM = -6_000  # what the simulated drug does to a resting heart rate: −6 bpm
UNBLINDED = 5  # the participant unblinded in an emergency (an adverse event)
PROTOCOL_DOCUMENT = (
    "HRT-{run}: a randomised, double-blind, placebo-controlled trial of a heart-rate lowering drug.\n"
    "Primary outcome: the change in resting heart rate (milli-bpm) from baseline to follow-up, measured by each\n"
    "participant's own heart-rate band and sealed to her. Allocation 1:1, permuted blocks of 4, stratified by\n"
    "sex. Analysis: difference in means (treatment - placebo), two-sided pooled-variance Student t, alpha 0.05.\n")
DESIGN = {"arms": ["treatment", "placebo"], "ratio": [1, 1], "block_sizes": [4], "strata": {"sex": ["f", "m"]}}
# Enrolment stays open this long after the registration: the labellers commit (after the next cosignature), then
# 40 enrolments, kits, readings and the emergency unblinding go in; the lock waits for it to close.
ENROL_WINDOW_MS = 30_000
REVEAL_WINDOW_MS = 600_000
DAY_MS = 86_400_000
COMMIT_TIMEOUT_S = 60.0  # a cosignature over the registration, then each labeller's commit through the bridge
ANSWER_TIMEOUT_S = 60.0
REVEAL_TIMEOUT_S = 60.0


class TrialDemoError(RuntimeError):
    """A step of the trial demo did not happen as it must; the message says which."""


@dataclass
class _Participant:
    party: Party
    band: Identity
    sex: str


class TrialDemo(LiveScenario):
    """The sponsor, the investigator, the participants and their keys (under `root`/trial), and the scenario.

    `pharmacy` is an admitted (bonded) pharmacy's key; `miner_dirs` the demo miners' data dirs, read only by the
    simulated biology. `effect_milli` is what the simulated drug does (0: a null trial)."""

    error = TrialDemoError

    def __init__(self, root: Path, genesis: Genesis, operator: Identity, log_key: Identity, ledger_file: Path,
                 pharmacy: Identity, miner_dirs: list[Path], *, effect_milli: int = EFFECT_MILLI_BPM,
                 participants: int = PARTICIPANTS, enrol_window_ms: int = ENROL_WINDOW_MS) -> None:
        self.keys = root / "trial"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.genesis, self.operator, self.log_key, self.ledger_file = genesis, operator, log_key, ledger_file
        self.pharmacy, self.miner_dirs, self.effect_milli = pharmacy, miner_dirs, effect_milli
        self.enrol_window_ms = enrol_window_ms
        self.sponsor = Party.in_dir(self.keys, "sponsor", "Cardiora Therapeutics (sponsor)", "sponsor")
        self.investigator = Party.in_dir(self.keys, "investigator", "Dr. Hugo Marchetti, Lyon trial site",
                                         "investigator")
        # New bands and terminal each run: a device keeps one data key per epoch, which this demo does not store.
        self.terminal = Identity.generate()
        self.participants = [_Participant(Party.in_dir(self.keys, f"participant{i:02}", f"trial participant {i}",
                                                       "patient"), Identity.generate(), "fm"[i % 2])
                             for i in range(participants)]

    # -- the scenario ----------------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        """The whole trial's summary, as `run` fills it in: `trial_certificate` (the certified result),
        `trial_verified` (`verify_trial` ok), the unblinding and what verify reported."""
        return {"trial_verified": False, "trial_certificate": None, "participants": len(self.participants)}

    def _run(self, result: dict[str, Any]) -> None:
        from contract_rules.trial_check import verify_trial
        from record_access import trials as client

        now = _now_ms()
        trial_id = f"hrt-{now:x}"[:20]
        result["trial_id"] = trial_id
        document = PROTOCOL_DOCUMENT.format(run=trial_id).encode()
        ledger = Ledger(self.ledger_file)
        try:
            self._register_parties(ledger, now)
            protocol = {"design": DESIGN, "investigators": [self.investigator.id], "labellers": 3,
                        "max_participants": len(self.participants), "reveal_window_ms": REVEAL_WINDOW_MS,
                        "analysis": {"alpha_milli": 50},
                        "outcome": {"kind": "heart_rate", "measure": "resting_heart_rate",
                                    "baseline_from_ms": now - 7 * DAY_MS, "baseline_to_ms": now,
                                    "followup_from_ms": now, "followup_to_ms": now + 30 * DAY_MS,
                                    "direction": "decrease"}}
            self._submit(ledger, "the sponsor's registration of the trial", [client.build_register(
                self.sponsor.identity, trial_id, document, protocol, self._latest_final_note(ledger),
                _now_ms() + self.enrol_window_ms, _now_ms())])
            trial = self._trial(replay_ledger(ledger, self.genesis).state, trial_id)
            result["protocol_hash"], result["labellers"] = trial["protocol_hash"], trial["labellers"]
            seed_file = self.keys / f"sponsor.{trial_id}.seed"
            seed = client.draw_seed()
            client.save_seed(seed_file, trial_id, self.sponsor.id, seed)  # kept before the commitment is built
            state = replay_ledger(ledger, self.genesis).state
            self._submit(ledger, "the sponsor's seed commitment", [client.build_commit(
                self.sponsor.identity, trial, seed, client.committer_keys(state, trial), _now_ms())])
            self._phase("register")
            trial = self._trial(self._wait(
                ledger, "the three labelling miners to commit their seeds (by themselves, after a cosignature)",
                COMMIT_TIMEOUT_S, lambda st: len(self._trial(st, trial_id)["commitments"]) == 4,
                lambda st: f"committed: {sorted(self._trial(st, trial_id)['commitments'])}"), trial_id)
            self._phase("commit")

            self._enrol_and_dispense(ledger, trial_id)
            self._phase("enrol_and_dispense")
            # The bodies: what each kit does (the simulator's omniscience), measured and sealed by each band.
            trial = self._trial(replay_ledger(ledger, self.genesis).state, trial_id)
            biology = Biology.from_kits(trial, seed_file, self.miner_dirs, self.effect_milli)
            self._record_readings(ledger, trial_id, biology)
            self._phase("readings")
            result["unblinding"] = self._emergency_unblinding(ledger, trial_id, seed)
            self._phase("unblinding")

            closes = trial["enrol_closes_ms"]
            while _now_ms() <= closes:
                time.sleep(min(POLL_S, max(0.0, (closes - _now_ms()) / 1000 + 0.05)))
            self._submit(ledger, "the sponsor's database lock", [client.build_lock(self.sponsor.identity, trial_id,
                                                                                   _now_ms())])
            self._submit(ledger, "the sponsor's reveal", [client.build_reveal(self.sponsor.identity, trial_id,
                                                                              client.load_seed(seed_file, trial_id),
                                                                              _now_ms())])
            self._wait(ledger, "the labelling miners to reveal their seeds (by themselves)", REVEAL_TIMEOUT_S,
                       lambda st: len(self._trial(st, trial_id)["seeds"]) == 4,
                       lambda st: f"revealed: {sorted(self._trial(st, trial_id)['seeds'])}")
            self._phase("lock_and_reveal")
            self._disclose(ledger, trial_id)
            self._phase("outcomes")
            state = replay_ledger(ledger, self.genesis).state
            entry, certificate = client.build_certificate(self.investigator.identity, state, trial_id, _now_ms())
            certified = self._submit(ledger, "the certificate", [entry])[0]
            checkpoint = self._checkpoint_covering(ledger, certified)
            leaves = list(ledger.leaves(0, checkpoint.tree_size))
        finally:
            ledger.close()
        report = verify_trial(leaves, self.genesis, trial_id, checkpoint)
        self._phase("certify_and_verify")
        result["trial_certificate"] = certificate
        result["trial_verified"] = report.ok
        result["verify"] = {"checks": {f.check: f.ok for f in report.findings}, "unblinded": report.unblinded}
        result["simulated_effect_milli_bpm"] = self.effect_milli  # the biology's parameter, nothing it computed
        if not report.ok:
            raise TrialDemoError("verify_trial found problems: " + "; ".join(
                f"{f.check}: {f.detail}" for f in report.findings if not f.ok))

    # -- steps -----------------------------------------------------------------------------------------

    def _register_parties(self, ledger: Ledger, now: int) -> None:
        """Sponsor, investigator and participants as parties (once per data dir); the pharmacy's new terminal
        and each participant's new band registered."""
        ledger.refresh()
        state = replay_ledger(ledger, self.genesis).state
        from contract_rules import bonds

        if not bonds.is_admitted(state, self.pharmacy.device_id):
            raise TrialDemoError(f"pharmacy {self.pharmacy.device_id} is not admitted (registered and bonded): it "
                                 "cannot dispense trial kits")
        people = [self.sponsor, self.investigator, *(p.party for p in self.participants)]
        parties = state.table("parties")
        entries = [ce.party_registration_entry(self.operator, p.registration(now)) for p in people
                   if p.id not in parties]
        if entries:
            self._submit(ledger, "the trial parties' registrations", entries)
        devices = [InventoryDevice(name="trial kit terminal", profile="pharmacy_terminal",
                                   owner=self.pharmacy.device_id, site="pharmacy",
                                   public_key=self.terminal.public_key, line=0),
                   *(InventoryDevice(name=f"{p.party.name} band", profile="heart_rate_band", owner=p.party.id,
                                     site="home", public_key=p.band.public_key, line=0) for p in self.participants)]
        register_devices(ledger, self.operator, devices)

    def _enrol_and_dispense(self, ledger: Ledger, trial_id: str) -> None:
        """Each participant signs her consent with her own key; the investigator enrols her; the pharmacy's
        terminal sells her the kit labelled for her slot."""
        from contract_rules.trials import participant_record
        from record_access import trials as client

        trial = self._trial(replay_ledger(ledger, self.genesis).state, trial_id)
        enrolments = [client.build_enroll(self.investigator.identity, trial_id,
                                          client.sign_consent_file(p.party.identity, trial), {"sex": p.sex},
                                          _now_ms()) for p in self.participants]
        self._submit(ledger, "the investigator's enrolments", enrolments)
        state = replay_ledger(ledger, self.genesis).state
        kits = []
        for seq, p in enumerate(self.participants):
            record = participant_record(state, trial_id, p.party.id)
            if record is None:
                raise TrialDemoError(f"{p.party.name} was enrolled but has no slot in trial {trial_id}")
            kits.append(client.build_dispense(self.pharmacy, self.terminal, trial_id, record, seq, _now_ms()))
        self._submit(ledger, "the pharmacy's kit sales", kits)

    def _record_readings(self, ledger: Ledger, trial_id: str, biology: Biology) -> None:
        """Each band measures its wearer (what her kit did to her) and seals the trial_measure reading to her at
        the edge (an epoch key encapsulated to her re-encryption key), anchored with its ciphertext before the
        lock."""
        from contract_rules.trials import participant_record

        state = replay_ledger(ledger, self.genesis).state
        candidates: list[EventCandidate] = []
        for p in self.participants:
            record = participant_record(state, trial_id, p.party.id)
            assert record is not None  # enrolled above
            baseline, followup = biology.resting_heart_rate(p.party.id, record["stratum"], record["position"])
            body = events.TrialMeasure(trial_id=trial_id, measure="resting_heart_rate", baseline=baseline,
                                       followup=followup, unit_scale=1000).model_dump()
            candidates += _sealed(ledger, p.band, p.party, _now_ms(), body)
        ledger.append_events(candidates)

    def _emergency_unblinding(self, ledger: Ledger, trial_id: str, seed: bytes) -> dict[str, Any]:
        """The investigator logs the unblinding of one participant (an adverse event); the sponsor answers with
        its keys of her block, the labellers by themselves; the investigator opens her arm."""
        from record_access import trials as client

        who = self.participants[UNBLINDED % len(self.participants)]
        leaf = self._submit(ledger, "the investigator's emergency unblinding", [client.build_unblind(
            self.investigator.identity, trial_id, who.party.id, "adverse_event", _now_ms())])[0]
        trial = self._trial(replay_ledger(ledger, self.genesis).state, trial_id)
        self._submit(ledger, "the sponsor's answer to the unblinding", [client.answer_unblinding(
            self.sponsor.identity, trial, leaf, seed, self.investigator.identity.public_key, _now_ms())])
        def answered(st: State) -> list[str]:
            return sorted(self._trial(st, trial_id)["unblindings"][str(leaf)]["keys"])

        state = self._wait(ledger, "every committer's answer to the emergency unblinding", ANSWER_TIMEOUT_S,
                           lambda st: len(answered(st)) == 4, lambda st: f"answered: {answered(st)}")
        answers = client.unblind_answers(enumerate(ledger.leaves(leaf, ledger.size), leaf), trial_id, leaf)
        opened = client.open_unblinding(self.investigator.identity, self._trial(state, trial_id), leaf, answers)
        return {"leaf": leaf, "reason": "adverse_event", **opened}

    def _disclose(self, ledger: Ledger, trial_id: str) -> None:
        """Each participant's agent finds her sealed reading anchored before the lock, opens it with her own
        re-encryption key, and discloses it."""
        from record_access import trials as client

        state = replay_ledger(ledger, self.genesis).state
        trial = self._trial(state, trial_id)
        operators = dict(state.operators)
        devices = ledger.devices()
        start = min(devices[p.band.device_id].registered_idx for p in self.participants)
        leaves = list(enumerate(ledger.leaves(start, ledger.size), start))
        outcomes = [client.build_outcome(p.party.identity, trial_id, client.find_reading(
            leaves, ledger.ciphertext, p.party.id, p.party.pre, operators, trial), _now_ms())
            for p in self.participants]
        self._submit(ledger, "the participants' outcome disclosures", outcomes)

    # -- the live ledger -------------------------------------------------------------------------------

    @staticmethod
    def _trial(state: State, trial_id: str) -> dict[str, Any]:
        from contract_rules.trials import trial_record

        record = trial_record(state, trial_id)
        if record is None:
            raise TrialDemoError(f"trial {trial_id} is not on the ledger")
        return record



def _sealed(ledger: Ledger, device: Identity, owner: Party, ts: int, body: dict[str, Any]) -> list[EventCandidate]:
    """A device's epoch key (its data key encapsulated to `owner`) and one sealed trial_measure reading."""
    last = ledger.last_seq(device.device_id)
    seq = 0 if last is None else last + 1
    epoch = sealed.epoch_of(ts, sealed.DEFAULT_EPOCH_MS)
    key = os.urandom(sealed.DATA_KEY_SIZE)
    capsule, key_ct = reencryption.encapsulate(owner.pre.public_key, key)
    ek = events.EpochKey(epoch=epoch, epoch_ms=sealed.DEFAULT_EPOCH_MS, owner=owner.id, capsule=capsule,
                         key_ct=key_ct)
    cose = envelope.sign(device, events.make_payload(device.device_id, seq, epoch * sealed.DEFAULT_EPOCH_MS,
                                                     "epoch_key", ek, v=events.PROTOCOL_V2))
    ct = sealed.seal_body(key, os.urandom(sealed.NONCE_SIZE), device.device_id, seq + 1, ts, "trial_measure", epoch,
                          body)
    reading = envelope.sign(device, events.make_sealed_payload(device.device_id, seq + 1, ts, "trial_measure", epoch,
                                                               sealed.ciphertext_hash(ct)))
    return [EventCandidate(device.device_id, seq, Entry("event", cose).encode(), kind="epoch_key",
                           version=events.PROTOCOL_V2),
            EventCandidate(device.device_id, seq + 1, Entry("event", reading).encode(), kind="trial_measure",
                           version=events.PROTOCOL_V2, ct=ct, epoch=epoch)]


def certificate_lines(summary: dict[str, Any]) -> list[str]:
    """The trial's certificate as the demo prints it (from `TrialDemo.run()`'s summary), in bpm."""
    c = summary.get("trial_certificate")
    if c is None:
        return [f"trial {summary.get('trial_id')}: no certificate ({summary.get('error')})"]

    def bpm(milli: str) -> str:  # the certificate is in milli-bpm
        return f"{float(milli) / 1000:+.2f} bpm"

    u = summary.get("unblinding") or {}
    return [f"trial {summary['trial_id']}: {c['n_treatment']} treated, {c['n_control']} on placebo; change in resting "
            f"heart rate {bpm(c['mean_treatment'])} vs {bpm(c['mean_control'])}",
            f"  effect {bpm(c['effect'])} (95 % CI {bpm(c['ci_low'])} to {bpm(c['ci_high'])}), t {c['t']}, "
            f"df {c['df']}, p {c['p_value']}: endpoint {'MET' if c['met'] else 'NOT met'}",
            f"  emergency unblinding: {u.get('participant')} ({u.get('arm')}, block {u.get('block')} of "
            f"{u.get('stratum')}), logged at leaf {u.get('leaf')}",
            f"  verified from the log alone: {summary.get('trial_verified')}"]


def _now_ms() -> int:
    return int(time.time() * 1000)
