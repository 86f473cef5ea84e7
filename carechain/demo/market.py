"""The demo's data market (docs/market.md): a researcher asks 22 patients' sealed data three questions, learns
only the answers, and the miners audit a sample of the contributions.

Runs on the demo's live ledger while the bridge and the five miners run, through the real pieces: the patients
register with re-encryption keys; each has a heart-rate band and a glucose meter registered to her, whose
readings are sealed to her at the edge and anchored as signed v2 events with their ciphertexts (as the bridge
stores them); each gives a consent (one asks for a cohort of 50, so she is left out). A researcher, funded by
the insurer, posts three studies — the mean resting heart rate, a histogram of mean glucose with differential
privacy (epsilon 1: the answer carries discrete-Laplace noise drawn inside the MPC), and one filtered to a
region where too few patients live — whose aggregators the rules draw from a final checkpoint the five miners
cosigned. Each matching patient's agent opens her own readings and contributes Shamir shares sealed to the
aggregators (record_access.contributing), keeping the opening of her commitment in a 0600 file beside her key.
Entries go in as `carechain` commands append them while a bridge runs (`contract_admin.submit`).

From there the demo starts nothing: the bridge attests the time once a study closes, the miners run each
study's MPC by themselves once its contributions are final (chain_miner.study_runner), the bridge appends
their signed results, and once a final checkpoint after the decision is recorded the miners post the audit
sample. Each sampled patient discloses her contribution to the aggregators (`build_disclosure` with her own
keys: the logged access of the audit), the miners recompute it in an audit MPC and post their verdicts; then
every study is closed and paid (the third unanswered, its deposit back) and
`contract_rules.study_check.verify_study` checks each one from the log alone, under a checkpoint the bridge
signed.

Every wait is bounded and names its step; a step that fails is reported in the summary's `error`, never hidden.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from carechain import envelope, events, reencryption, sealed
from carechain.config import MinerConfig
from carechain.demo.live import LiveScenario
from carechain.demo.records import Party
from carechain.entries import Entry
from carechain.identity import Identity
from carechain.inventory import InventoryDevice
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import register_devices
from contract_rules import Genesis
from contract_rules import transactions as ce
from contract_rules.runtime import State

__all__ = ["PATIENTS", "MarketDemo", "MarketDemoError", "resting_level"]

PATIENTS = 22
PICKY = 0  # this patient asks for a cohort of at least PICKY_MIN_COHORT: larger than any study's, so left out
PICKY_MIN_COHORT = 50
MIN_COHORT = 5
SMALL_REGION = "annecy"  # three patients live there: too few for their minimum cohort of 5
SMALL_REGION_PATIENTS = (19, 20, 21)
PRICE_MINOR = 100  # what each patient asks, and the studies pay, per use
FEE_MINOR = 500  # per aggregator
MAX_CONTRIBUTORS = 30
AGGREGATORS = 3
FUNDING_MINOR = 3 * (PRICE_MINOR * MAX_CONTRIBUTORS + FEE_MINOR * AGGREGATORS)
MINUTE_MS = 60_000
HR_MINUTES = 15  # one heart-rate reading a minute (a resting heart rate needs 10 distinct minutes)
GLUCOSE_READINGS = 4
GLUCOSE_BINS = [40, 70, 100, 140, 180, 250, 400]
GLUCOSE_EPSILON_MILLI = 1000  # the histogram's differential privacy: epsilon 1, noise on every bin
# The first study takes contributions this long after it is posted: the agents opened their readings before, so
# contributing takes a second or two, and the aggregators cannot start before a final checkpoint covers the
# contributions (the bridge records one at most every 10 s), which is then most likely recorded.
CONTRIBUTIONS_OPEN_MS = 14_000
DECIDE_TIMEOUT_S = 120.0  # a final checkpoint over the contributions, then each miner's MPC runs, one at a time
SAMPLE_TIMEOUT_S = 60.0  # a final checkpoint recorded after the decision (one per 10 s at most), then the sample
AUDIT_TIMEOUT_S = 90.0  # the disclosures checkpointed and cosigned, then the audit MPC runs


class MarketDemoError(RuntimeError):
    """A step of the market demo did not happen as it must; the message says which."""


@dataclass
class _Patient:
    party: Party
    key_name: str  # her key file's name under market/ (her opening files go beside it)
    band: Identity
    meter: Identity
    attributes: dict[str, str]
    min_cohort: int


def resting_level(patient: int) -> int:
    """Patient `patient`'s resting heart rate, bpm: her band's lowest per-minute reading in the period."""
    return 58 + (patient * 7) % 25


def glucose_level(patient: int, reading: int) -> float:
    """Patient `patient`'s `reading`-th glucose reading of the period, mg/dL."""
    return float(75 + (patient * 23 + reading * 11) % 140)


@dataclass
class _Study:
    """A posted study as the demo follows it: its query and filter, and the contributions it made to it."""

    query: dict[str, Any]
    filter: dict[str, str]
    epsilon_milli: int = 0
    contributions: dict[int, _Patient] = field(default_factory=dict)  # leaf → the patient who made it


class MarketDemo(LiveScenario):
    """The patients, the researcher and their keys (under `root`/market), and the market scenario."""

    error = MarketDemoError

    def __init__(self, root: Path, genesis: Genesis, operator: Identity, log_key: Identity, ledger_file: Path,
                 funder: Identity) -> None:
        self.keys = root / "market"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.root, self.genesis, self.operator, self.log_key = root, genesis, operator, log_key
        self.ledger_file, self.funder = ledger_file, funder
        self.researcher = Party.in_dir(self.keys, "researcher", "Dr. Sara Lind, cardiometabolic cohort study",
                                       "researcher")
        self.patients = []
        for i in range(PATIENTS):
            region = SMALL_REGION if i in SMALL_REGION_PATIENTS else "lyon"
            attributes = {"age_band": ("30-44", "45-64", "65+")[i % 3], "sex": "fm"[i % 2], "region": region}
            self.patients.append(_Patient(
                Party.in_dir(self.keys, f"patient{i:02}", f"study patient {i}", "patient"), f"patient{i:02}",
                # New devices each run: a device keeps one data key per epoch, which this demo does not store,
                # so a second run on a kept data dir must not seal a second key for an epoch already keyed.
                Identity.generate(), Identity.generate(),
                attributes, PICKY_MIN_COHORT if i == PICKY else MIN_COHORT))

    # -- the scenario ----------------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        """The summary's `study` section (`study_result`, `study_contributors` and `study_verified` come from
        it), as `run` fills it in: patients, readings, consents, three studies, contributions; the miners'
        results and audit sample; disclosures; the miners' verdicts; payments; verification."""
        return {"verified": False, "patients": PATIENTS, "researcher": self.researcher.id, "studies": []}

    def _run(self, result: dict[str, Any]) -> None:
        from contract_rules.market import CONTRIBUTIONS, study_record
        from contract_rules.study_check import verify_study

        now = _now_ms()
        run_id = _run_id(now)  # a kept data dir runs the demo again: fresh study ids each time
        heart_rate = {"type": "resting_heart_rate", "kind": "heart_rate", "lo": 30, "hi": 200}
        studies = {
            f"rhr-{run_id}": _Study(heart_rate, {}),
            f"glucose-{run_id}": _Study({"type": "histogram", "kind": "glucose", "lo": 40, "hi": 400,
                                         "bins": GLUCOSE_BINS}, {}, GLUCOSE_EPSILON_MILLI),
            f"rhr-{SMALL_REGION}-{run_id}": _Study(heart_rate, {"region": SMALL_REGION}),
        }
        ledger = Ledger(self.ledger_file)
        try:
            self._register(ledger, now)
            self._record_readings(ledger, now)
            period = (now - 3_600_000, now + 1)
            own = self._open_own_readings(ledger, period)
            consents = self._consents_and_posts(ledger, now, period, self._latest_final_note(ledger), studies)
            self._phase("set_up")
            self._contribute(ledger, consents, studies, own)
            self._phase("contribute")

            state = self._wait(ledger, "the miners to compute every study (a final checkpoint over the "
                               "contributions, then each study's MPC) and the bridge to append a majority of results",
                               DECIDE_TIMEOUT_S, lambda st: all(_study(st, sid)["state"] != "open" for sid in studies),
                               lambda st: _progress(st, studies, "results"))
            self._phase("results")
            answered = [sid for sid in studies if _study(state, sid)["state"] == "answered"]
            state = self._wait(ledger, "the miners to post the audit sample of every answered study (after a final "
                               "checkpoint recorded past the decision)", SAMPLE_TIMEOUT_S,
                               lambda st: all(_study(st, sid)["audit"] is not None for sid in answered),
                               lambda st: _progress(st, answered, "audit"))
            self._phase("sample")
            # Every study's MPC runs on its own ports (study_runner.job_port_offset): the audits may overlap.
            self._disclose(ledger, state, {sid: studies[sid] for sid in answered})
            state = self._wait(ledger, "the aggregators' audit verdicts on every disclosed contribution",
                               AUDIT_TIMEOUT_S, lambda st: all(_audited(_study(st, sid)) for sid in answered),
                               lambda st: _progress(st, answered, "verdicts"))
            self._phase("disclose_and_audit")

            closes = self._submit(ledger, "the researcher's study closes", [ce.study_close_entry(
                self.researcher.identity, ce.StudyClose(study_id=sid, ts=_now_ms())) for sid in studies])
            checkpoint = self._checkpoint_covering(ledger, max(closes))
            leaves = list(ledger.leaves(0, checkpoint.tree_size))
            state = replay_ledger(ledger, self.genesis).state
        finally:
            ledger.close()

        verified, paid = True, 0
        for sid, asked in studies.items():
            report = verify_study(leaves, self.genesis, sid, checkpoint)
            closed = study_record(state, sid) or {}
            decided = closed.get("decided") or {}
            audit = closed.get("audit")
            verified = verified and report.ok
            if report.state == "answered":
                paid += sum(state.table(CONTRIBUTIONS)[str(i)]["price_minor"] for i in report.included
                            if i not in (audit or {}).get("forfeited", []))
            result["studies"].append({
                "study_id": sid, "query": closed.get("query"), "filter": dict(asked.filter), "state": report.state,
                "answer": report.answer, "contributions": len(closed.get("contributions", [])),
                "included": len(report.included), "aggregators": closed.get("aggregators", []),
                "deposit": closed.get("deposit"), "verified": report.ok,
                "epsilon": closed.get("epsilon_milli", 0) / 1000,  # as the study states it
                "result_epsilon": (decided.get("noise") or {}).get("epsilon_milli", 0) / 1000,  # as the result does
                "audit": None if audit is None else {"sample": audit["sample"], "outcomes": audit["outcome"],
                                                     "forfeited": audit.get("forfeited", [])},
                "failed": [f"{f.check}: {f.detail}" for f in report.findings if not f.ok]})
        self._phase("close_and_verify")
        result["verified"] = verified
        result["paid"] = {"patients": paid, "researcher_left": state.balance(f"researcher:{self.researcher.id}")}
        first = result["studies"][0]
        answer = first["answer"] or {}
        if answer.get("n"):
            result["mean_resting_heart_rate"] = round(float(Fraction(answer["sum"], answer["n"])), 1)
        result["contributors"] = first["included"]
        result["epsilon"] = result["studies"][1]["epsilon"]  # the glucose histogram's
        result["audited"] = sum(len(s["audit"]["sample"]) for s in result["studies"] if s["audit"])
        if not verified:
            raise MarketDemoError("verify_study found problems: " + "; ".join(
                p for s in result["studies"] for p in s["failed"]))

    # -- steps -----------------------------------------------------------------------------------------

    def _register(self, ledger: Ledger, now: int) -> None:
        """Patients (with re-encryption keys) and the researcher as parties (once per data dir), the researcher
        funded by the insurer, then each patient's band and meter registered to her."""
        ledger.refresh()
        parties = replay_ledger(ledger, self.genesis).state.table("parties")
        people = [self.researcher, *(p.party for p in self.patients)]
        entries = [ce.party_registration_entry(self.operator, p.registration(now)) for p in people
                   if p.id not in parties]
        entries.append(ce.signed(self.funder, ce.TOKEN_TRANSFER, ce.TokenTransfer(
            to=f"researcher:{self.researcher.id}", amount=FUNDING_MINOR, nonce=int.from_bytes(os.urandom(7), "big"),
            memo="research grant: cardiometabolic cohort study")))
        self._submit(ledger, "the study parties' registrations and the research grant", entries)
        known = ledger.devices()
        devices = [InventoryDevice(name=f"{p.party.name} {profile}", profile=profile, owner=p.party.id,
                                   site="home", public_key=dev.public_key, line=0)
                   for p in self.patients for profile, dev in (("heart_rate_band", p.band), ("glucose_meter", p.meter))
                   if dev.device_id not in known]
        if devices:
            register_devices(ledger, self.operator, devices)

    def _record_readings(self, ledger: Ledger, now: int) -> None:
        """Each patient's last quarter hour: sealed to her at the edge (one epoch key per device and epoch, the
        data key encapsulated to her re-encryption key), anchored with its ciphertext as the bridge does."""
        candidates: list[EventCandidate] = []
        for i, p in enumerate(self.patients):
            base = resting_level(i)  # minute 0 reads exactly this; the others more
            hr = [(now - (HR_MINUTES - m) * MINUTE_MS, "heart_rate", {"bpm": base + (m * 5) % 17})
                  for m in range(HR_MINUTES)]
            glucose = [(now - (GLUCOSE_READINGS - g) * 3 * MINUTE_MS, "glucose",
                        {"mg_dl": glucose_level(i, g)}) for g in range(GLUCOSE_READINGS)]
            candidates += self._sealed(ledger, p.band, p.party, hr)
            candidates += self._sealed(ledger, p.meter, p.party, glucose)
        ledger.append_events(candidates)

    @staticmethod
    def _sealed(ledger: Ledger, device: Identity, owner: Party,
                readings: list[tuple[int, str, dict[str, Any]]]) -> list[EventCandidate]:
        last = ledger.last_seq(device.device_id)
        seq = 0 if last is None else last + 1
        keys: dict[int, bytes] = {}
        out = []
        for ts, kind, body in readings:
            epoch = sealed.epoch_of(ts, sealed.DEFAULT_EPOCH_MS)
            key = keys.get(epoch)
            if key is None:
                key = keys[epoch] = os.urandom(sealed.DATA_KEY_SIZE)
                capsule, key_ct = reencryption.encapsulate(owner.pre.public_key, key)
                ek = events.EpochKey(epoch=epoch, epoch_ms=sealed.DEFAULT_EPOCH_MS, owner=owner.id, capsule=capsule,
                                     key_ct=key_ct)
                cose = envelope.sign(device, events.make_payload(device.device_id, seq, epoch * sealed.DEFAULT_EPOCH_MS,
                                                                 "epoch_key", ek, v=events.PROTOCOL_V2))
                out.append(EventCandidate(device.device_id, seq, Entry("event", cose).encode(), kind="epoch_key",
                                          version=events.PROTOCOL_V2))
                seq += 1
            ct = sealed.seal_body(key, os.urandom(sealed.NONCE_SIZE), device.device_id, seq, ts, kind, epoch, body)
            cose = envelope.sign(device, events.make_sealed_payload(device.device_id, seq, ts, kind, epoch,
                                                                    sealed.ciphertext_hash(ct)))
            out.append(EventCandidate(device.device_id, seq, Entry("event", cose).encode(), kind=kind,
                                      version=events.PROTOCOL_V2, ct=ct, epoch=epoch))
            seq += 1
        return out

    def _open_own_readings(self, ledger: Ledger, period: tuple[int, int]) -> dict[tuple[int, str], Any]:
        """Each patient's agent opens her own heart-rate and glucose readings of the period on her own machine
        (before the studies are posted: it is what takes time, and the studies can then close soon after).
        (patient, kind) → `OwnReadings`."""
        from record_access.contributing import find_own_readings

        leaves = self._study_leaves(ledger)
        operators = dict(replay_ledger(ledger, self.genesis).state.operators)
        own = {}
        for i, p in enumerate(self.patients):
            for kind in ("heart_rate", "glucose"):
                found = find_own_readings(leaves, ledger.ciphertext, p.party.id, p.party.pre, operators, kind,
                                          *period)
                if found.problems or not found.readings:
                    raise MarketDemoError(f"{p.party.name}'s agent could not open her {kind} readings: "
                                          f"{[x.to_json() for x in found.problems[:3]]}")
                own[i, kind] = found
        return own

    def _study_leaves(self, ledger: Ledger) -> list[tuple[int, bytes]]:
        """The ledger's leaves from the first registration of this run's study devices on (a kept data dir
        keeps the devices of earlier runs): every registration and reading of theirs is in them."""
        ledger.refresh()
        devices = ledger.devices()
        start = min(devices[d.device_id].registered_idx for p in self.patients for d in (p.band, p.meter))
        return list(enumerate(ledger.leaves(start, ledger.size), start))

    def _consents_and_posts(self, ledger: Ledger, now: int, period: tuple[int, int], note: str,
                            studies: dict[str, _Study]) -> dict[str, int]:
        """Every patient's consent (patient id → its leaf), then the researcher's three studies, which take
        contributions for CONTRIBUTIONS_OPEN_MS."""
        entries = [ce.consent_give_entry(p.party.identity, ce.ConsentGive(
            kinds=["heart_rate", "glucose"], queries=["resting_heart_rate", "histogram", "mean"],
            min_cohort=p.min_cohort, price_minor=PRICE_MINOR, buyers=[self.researcher.id],
            expires_ms=now + 30 * 86_400_000, attributes=ce.CohortAttributes(**p.attributes),
            nonce=int.from_bytes(os.urandom(7), "big"), ts=now)) for p in self.patients]
        posted = _now_ms()
        for sid, study in studies.items():
            entries.append(ce.study_post_entry(self.researcher.identity, ce.StudyPost(
                study_id=sid, query=ce.StudyQuery(**study.query), from_ms=period[0], to_ms=period[1],
                filter=ce.CohortAttributes(**study.filter), price_minor=PRICE_MINOR,
                max_contributors=MAX_CONTRIBUTORS, aggregator_fee_minor=FEE_MINOR,
                epsilon_milli=study.epsilon_milli, aggregators=AGGREGATORS, seed_checkpoint=note,
                closes_ms=posted + CONTRIBUTIONS_OPEN_MS, ts=posted)))
        leaves = self._submit(ledger, "the consents and the study posts", entries)
        return {p.party.id: leaf for p, leaf in zip(self.patients, leaves, strict=False)}

    def _opening_file(self, patient: _Patient, study_id: str) -> Path:
        """Where her agent keeps the opening of her commitment (0600), beside her key, as `carechain study
        contribute` does: a sampled contribution is disclosed from it."""
        return self.keys / f"{patient.key_name}.{study_id}.opening.json"

    def _contribute(self, ledger: Ledger, consents: dict[str, int], studies: dict[str, _Study],
                    own: dict[tuple[int, str], Any]) -> None:
        """Each patient's agent, for each study her consent and attributes match: the measure of her opened
        readings, its shares sealed to the study's aggregators, the opening kept; all appended before the
        studies close."""
        from contract_rules.market import matches_filter, study_record
        from record_access.contributing import aggregator_keys, build_contribution, save_opening

        state = replay_ledger(ledger, self.genesis).state
        made = []
        for i, p in enumerate(self.patients):
            for sid in studies:
                study = study_record(state, sid)
                if study is None:
                    raise MarketDemoError(f"study {sid} was posted but is not on the ledger")
                if not matches_filter(p.attributes, study["filter"]):
                    continue
                built = build_contribution(p.party.identity, sid, study, consents[p.party.id],
                                           aggregator_keys(state, study), own[i, study["query"]["kind"]], _now_ms())
                save_opening(self._opening_file(p, sid), built)  # kept before the entry is anchored
                made.append((p, sid, built))
        closes = min(_study(state, sid)["closes_ms"] for sid in studies)
        try:
            leaves = self._submit(ledger, "the contributions", [built.entry for _, _, built in made])
        except MarketDemoError as exc:
            if _now_ms() < closes:
                raise
            raise MarketDemoError(f"{exc} ({_now_ms() - closes} ms after the studies closed: contributing took "
                                  f"longer than CONTRIBUTIONS_OPEN_MS)") from None
        for (p, sid, built), leaf in zip(made, leaves, strict=True):
            save_opening(self._opening_file(p, sid), built, leaf)
            studies[sid].contributions[leaf] = p

    def _disclose(self, ledger: Ledger, state: State, studies: dict[str, _Study]) -> None:
        """Each sampled patient opens her contribution to the study's aggregators, and to them only, with her
        own keys: her commitment's salt, the data keys of the epochs of her cited readings and their
        ciphertexts, sealed to each aggregator (the `study.disclose` entry is the logged access)."""
        from contract_rules.market import CONTRIBUTIONS, study_record
        from record_access.contributing import aggregator_keys, build_disclosure, find_cited_data

        leaves = self._study_leaves(ledger)
        table = state.table(CONTRIBUTIONS)
        entries = []
        for sid, asked in studies.items():
            study = study_record(state, sid)
            assert study is not None and study["audit"] is not None  # waited for
            for index in study["audit"]["sample"]:
                patient = asked.contributions.get(index)
                if patient is None:
                    raise MarketDemoError(f"study {sid} sampled contribution {index}, which no demo patient made")
                opening = json.loads(self._opening_file(patient, sid).read_text())
                data_keys, cts = find_cited_data(leaves, ledger.ciphertext, patient.party.id, patient.party.pre,
                                                 dict(state.operators), study, table[str(index)]["leaves"])
                entries.append(build_disclosure(patient.party.identity, sid, study, index, opening,
                                                aggregator_keys(state, study), data_keys, cts, _now_ms()))
        self._submit(ledger, "the sampled patients' disclosures", entries)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _study(state: State, study_id: str) -> dict[str, Any]:
    from contract_rules.market import study_record

    record = study_record(state, study_id)
    if record is None:
        raise MarketDemoError(f"study {study_id} is not on the ledger")
    return record


def _audited(study: dict[str, Any]) -> bool:
    """Every sampled contribution of the study has its majority verdict."""
    audit = study["audit"]
    return audit is not None and all(str(i) in audit["outcome"] for i in audit["sample"])


def _progress(state: State, study_ids: Any, what: str) -> str:
    """Where each study stands, for a timeout's message: what the miners have done, and what they wait for."""
    from contract_rules import miners
    from contract_rules.clock import attested_ms

    rows = []
    for sid in study_ids:
        s = _study(state, sid)
        audit = s["audit"] or {}
        if what == "results":
            rows.append(f"{sid} {s['state']}, results from {sorted(s['results']) or 'nobody'} of {s['aggregators']}, "
                        f"contributions up to leaf {max(s['contributions'], default=None)}")
        elif what == "audit":
            rows.append(f"{sid} {s['state']} decided at leaf {(s['decided'] or {}).get('at')}, "
                        f"sample {audit.get('sample')}")
        else:
            rows.append(f"{sid} sample {audit.get('sample')}, disclosed {sorted(audit.get('disclosed', {}))}, "
                        f"verdicts {audit.get('verdicts')}, outcome {audit.get('outcome')}")
    return (f"final size {miners.final_size(state)}, attested time {attested_ms(state)}, ledger size {state.size}; "
            + "; ".join(rows) + " (the miners' logs say why)")


def _run_id(now_ms: int) -> str:
    """This run's suffix for its study ids, chosen so that no two of its study computations (results, audits) share
    a port offset (chain_miner.study_runner.job_port_offset): the parties of two studies that met on one port would
    fail both, and the demo runs its studies at once."""
    from chain_miner.study_runner import Job, job_port_offset

    ports = MinerConfig().mpc_ports  # the demo's miners keep the default
    for bump in range(4096):
        run_id = f"{now_ms + bump:x}"[-6:]
        ids = (f"rhr-{run_id}", f"glucose-{run_id}", f"rhr-{SMALL_REGION}-{run_id}")
        offsets = [job_port_offset(Job(kind, sid, 0, ()), ports) for sid in ids for kind in ("result", "audit")]
        if len(set(offsets)) == len(offsets):
            return run_id
    raise RuntimeError(f"no study ids with distinct MPC ports among {ports} (miner.mpc_ports)")
