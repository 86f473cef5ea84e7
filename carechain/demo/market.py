"""The demo's data market (docs/market.md): a researcher asks 22 patients' sealed data two questions, and
learns only the answers.

Runs on the demo's ledger once the bridge and the miners have stopped (nothing else appends meanwhile), through
the real pieces: the patients register with re-encryption keys; each has a heart-rate band and a glucose meter
registered to her, whose readings are sealed to her at the edge and anchored as signed v2 events with their
ciphertexts (as the bridge stores them); each gives a consent (one asks for a cohort of 50, so she is left
out). A researcher, funded by the insurer, posts three studies — the mean resting heart rate, a histogram of
mean glucose, and one filtered to a region where too few patients live — whose aggregators the rules draw
from a final checkpoint the five miners cosigned. Each matching patient's agent opens her own readings and
contributes Shamir shares sealed to the aggregators (record_access.contributing). The study's three
aggregators run as separate `python -m chain_miner.aggregator` processes, an MPyC party each over loopback
TCP; their signed results go on the ledger, the studies are closed and paid (the third unanswered, its
deposit back), and `contract_rules.study_check.verify_study` checks each one from the log alone.

Every wait is bounded; a step that fails is reported in the summary's `error`, never hidden.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from carechain import envelope, events, reencryption, sealed
from carechain.demo.records import Party, miner_dirs
from carechain.entries import CHECKPOINT_FINAL, Entry
from carechain.identity import Identity
from carechain.inventory import InventoryDevice
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import register_devices
from contract_rules import Genesis
from contract_rules import transactions as ce

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
AGGREGATOR_TIMEOUT_S = 60.0
GLUCOSE_BINS = [40, 70, 100, 140, 180, 250, 400]


class MarketDemoError(RuntimeError):
    """A step of the market demo did not happen as it must; the message says which."""


@dataclass
class _Patient:
    party: Party
    band: Identity
    meter: Identity
    attributes: dict[str, str]
    min_cohort: int


def resting_level(patient: int) -> int:
    """Patient `patient`'s resting heart rate, bpm: her band's lowest per-minute reading in the period."""
    return 58 + (patient * 7) % 25


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback TCP ports (bound together, then released for the aggregators to take)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MarketDemo:
    """The patients, the researcher and their keys (under `root`/market), and the market scenario."""

    def __init__(self, root: Path, genesis: Genesis, operator: Identity, log_key: Identity, ledger_file: Path,
                 funder: Identity) -> None:
        keys = root / "market"
        keys.mkdir(parents=True, exist_ok=True)
        self.root, self.genesis, self.operator, self.log_key = root, genesis, operator, log_key
        self.ledger_file, self.funder = ledger_file, funder
        self.researcher = Party.in_dir(keys, "researcher", "Dr. Sara Lind, cardiometabolic cohort study",
                                       "researcher")
        self.patients = []
        for i in range(PATIENTS):
            region = SMALL_REGION if i in SMALL_REGION_PATIENTS else "lyon"
            attributes = {"age_band": ("30-44", "45-64", "65+")[i % 3], "sex": "fm"[i % 2], "region": region}
            self.patients.append(_Patient(
                Party.in_dir(keys, f"patient{i:02}", f"study patient {i}", "patient"),
                # New devices each run: a device keeps one data key per epoch, which this demo does not store,
                # so a second run on a kept data dir must not seal a second key for an epoch already keyed.
                Identity.generate(), Identity.generate(),
                attributes, PICKY_MIN_COHORT if i == PICKY else MIN_COHORT))
        self.miner_keys = {Identity.load(d / "miner.key").device_id: d / "miner.key" for d in miner_dirs(root)}

    # -- the scenario ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Patients, readings, consents, three studies, contributions, MPC, results, payments, verification.
        The summary's `study` section; `study_result`, `study_contributors` and `study_verified` from it."""
        started = time.monotonic()
        result: dict[str, Any] = {"verified": False, "error": None, "patients": PATIENTS,
                                  "researcher": self.researcher.id, "studies": []}
        try:
            self._run(result)
        except Exception as exc:  # reported in the summary, never hidden (the exit status says it failed)
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = round(time.monotonic() - started, 2)
        return result

    def _run(self, result: dict[str, Any]) -> None:
        from contract_rules.market import study_record
        from contract_rules.study_check import verify_study

        now = int(time.time() * 1000)
        run_id = f"{now:x}"[-6:]  # a kept data dir runs the demo again: fresh study ids each time
        ledger = Ledger(self.ledger_file)
        try:
            self._register(ledger, now)
            self._record_readings(ledger, now)
            note = self._latest_final_note(ledger)
            studies = {
                f"rhr-{run_id}": ({"type": "resting_heart_rate", "kind": "heart_rate", "lo": 30, "hi": 200}, {}),
                f"glucose-{run_id}": ({"type": "histogram", "kind": "glucose", "lo": 40, "hi": 400,
                                       "bins": GLUCOSE_BINS}, {}),
                f"rhr-{SMALL_REGION}-{run_id}": ({"type": "resting_heart_rate", "kind": "heart_rate", "lo": 30,
                                                  "hi": 200}, {"region": SMALL_REGION}),
            }
            consents = self._consents_and_posts(ledger, now, note, studies)
            state = replay_ledger(ledger, self.genesis).state
            records: dict[str, dict[str, Any]] = {}
            for sid in studies:
                record = study_record(state, sid)
                if record is None:
                    raise MarketDemoError(f"study {sid} was posted but is not on the ledger")
                records[sid] = record
            self._contribute(ledger, state, consents, records)
            state = replay_ledger(ledger, self.genesis).state
            results = self._aggregate(state, list(studies))
            submit(ledger, self.genesis, [*results, *(ce.study_close_entry(self.researcher.identity, ce.StudyClose(
                study_id=sid, ts=int(time.time() * 1000))) for sid in studies)], clock=self.operator)
            checkpoint = self._checkpoint(ledger)
            leaves = list(ledger.leaves())
            state = replay_ledger(ledger, self.genesis).state
        finally:
            ledger.close()
        from contract_rules.market import CONTRIBUTIONS

        verified, paid = True, 0
        for sid in studies:
            report = verify_study(leaves, self.genesis, sid, checkpoint)
            closed = study_record(state, sid) or {}
            verified = verified and report.ok
            if report.state == "answered":
                paid += sum(state.table(CONTRIBUTIONS)[str(i)]["price_minor"] for i in report.included)
            result["studies"].append({
                "study_id": sid, "query": records[sid]["query"], "filter": dict(studies[sid][1]),
                "state": report.state,
                "answer": report.answer, "contributions": len(closed.get("contributions", [])),
                "included": len(report.included), "aggregators": closed.get("aggregators", []),
                "deposit": closed.get("deposit"), "verified": report.ok,
                "failed": [f"{f.check}: {f.detail}" for f in report.findings if not f.ok]})
        result["verified"] = verified
        result["paid"] = {"patients": paid, "researcher_left": state.balance(f"researcher:{self.researcher.id}")}
        first = result["studies"][0]
        answer = first["answer"] or {}
        if answer.get("n"):
            result["mean_resting_heart_rate"] = round(float(Fraction(answer["sum"], answer["n"])), 1)
        result["contributors"] = first["included"]
        if not verified:
            raise MarketDemoError("verify_study found problems: " + "; ".join(
                p for s in result["studies"] for p in s["failed"]))

    # -- steps -----------------------------------------------------------------------------------------

    def _register(self, ledger: Ledger, now: int) -> None:
        """Patients (with re-encryption keys) and the researcher as parties (once per data dir), the researcher
        funded by the insurer, then each patient's band and meter registered to her."""
        parties = replay_ledger(ledger, self.genesis).state.table("parties")
        people = [self.researcher, *(p.party for p in self.patients)]
        entries = [ce.party_registration_entry(self.operator, p.registration(now)) for p in people
                   if p.id not in parties]
        entries.append(ce.signed(self.funder, ce.TOKEN_TRANSFER, ce.TokenTransfer(
            to=f"researcher:{self.researcher.id}", amount=FUNDING_MINOR, nonce=int.from_bytes(os.urandom(7), "big"),
            memo="research grant: cardiometabolic cohort study")))
        submit(ledger, self.genesis, entries, clock=self.operator)
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
                        {"mg_dl": float(75 + (i * 23 + g * 11) % 140)}) for g in range(GLUCOSE_READINGS)]
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

    @staticmethod
    def _latest_final_note(ledger: Ledger) -> str:
        """The last final checkpoint the bridge recorded (`checkpoint.final`, cosigned by a majority of the
        active miners): its seed draws the studies' aggregators."""
        for index in range(ledger.size - 1, -1, -1):
            entry = Entry.decode(ledger.entry(index))
            if entry.type == CHECKPOINT_FINAL:
                return str(envelope.parse(entry.cose).payload["note"])
        raise MarketDemoError("no final checkpoint on the ledger: the miners never cosigned one")

    def _consents_and_posts(self, ledger: Ledger, now: int, note: str,
                            studies: dict[str, tuple[dict[str, Any], dict[str, str]]]) -> dict[str, int]:
        """Every patient's consent (patient id → its leaf), then the researcher's three studies."""
        entries = [ce.consent_give_entry(p.party.identity, ce.ConsentGive(
            kinds=["heart_rate", "glucose"], queries=["resting_heart_rate", "histogram", "mean"],
            min_cohort=p.min_cohort, price_minor=PRICE_MINOR, buyers=[self.researcher.id],
            expires_ms=now + 30 * 86_400_000, attributes=ce.CohortAttributes(**p.attributes),
            nonce=int.from_bytes(os.urandom(7), "big"), ts=now)) for p in self.patients]
        for sid, (query, wanted) in studies.items():
            entries.append(ce.study_post_entry(self.researcher.identity, ce.StudyPost(
                study_id=sid, query=ce.StudyQuery(**query), from_ms=now - 3_600_000, to_ms=now + 1,
                filter=ce.CohortAttributes(**wanted), price_minor=PRICE_MINOR, max_contributors=MAX_CONTRIBUTORS,
                aggregator_fee_minor=FEE_MINOR, epsilon_milli=0, aggregators=AGGREGATORS, seed_checkpoint=note,
                closes_ms=now + 3_600_000, ts=now)))
        leaves = submit(ledger, self.genesis, entries, clock=self.operator)
        return {p.party.id: leaf for p, leaf in zip(self.patients, leaves, strict=False)}

    def _contribute(self, ledger: Ledger, state: Any, consents: dict[str, int],
                    records: dict[str, dict[str, Any]]) -> None:
        """Each patient's agent, for each study her consent and attributes match: her own readings opened on
        her own machine, the measure, its shares sealed to the study's aggregators."""
        from contract_rules.market import matches_filter
        from record_access.contributing import aggregator_keys, build_contribution, find_own_readings

        # The agents read the ledger from the first registration of a study device on (a kept data dir keeps
        # the devices of earlier runs): every registration and reading of theirs is in it.
        devices = ledger.devices()
        start = min(devices[d.device_id].registered_idx for p in self.patients for d in (p.band, p.meter))
        leaves = [(i, leaf) for i, leaf in enumerate(ledger.leaves(start), start)]
        operators = dict(state.operators)
        entries = []
        for p in self.patients:
            for sid, study in records.items():
                if not matches_filter(p.attributes, study["filter"]):
                    continue
                q = study["query"]
                own = find_own_readings(leaves, ledger.ciphertext, p.party.id, p.party.pre, operators, q["kind"],
                                        study["from_ms"], study["to_ms"])
                if own.problems or not own.readings:
                    raise MarketDemoError(f"{p.party.name}'s agent could not open her {q['kind']} readings: "
                                          f"{[x.to_json() for x in own.problems[:3]]}")
                entries.append(build_contribution(p.party.identity, sid, study, consents[p.party.id],
                                                  aggregator_keys(state, study), own, int(time.time() * 1000)).entry)
        submit(ledger, self.genesis, entries, clock=self.operator)

    def _aggregate(self, state: Any, study_ids: list[str]) -> list[Entry]:
        """Every study's aggregators, one `python -m chain_miner.aggregator` process each (all studies at once,
        each on its own loopback ports); the signed results of each study's first majority, in its order."""
        from chain_miner.aggregator import inputs_from_state

        procs: list[tuple[str, int, subprocess.Popen[bytes], Path]] = []
        with tempfile.TemporaryDirectory(prefix="carechain-study-") as tmp:
            work = Path(tmp)
            ports = _free_ports(AGGREGATORS * len(study_ids))
            try:
                for s, sid in enumerate(study_ids):
                    inputs = inputs_from_state(state, sid)
                    inputs_file = work / f"{s}-inputs.json"
                    inputs_file.write_text(json.dumps(inputs))
                    peers = ",".join(f"127.0.0.1:{port}" for port in ports[s * AGGREGATORS:(s + 1) * AGGREGATORS])
                    for i, agg in enumerate(inputs["study"]["aggregators"]):
                        key = self.miner_keys.get(agg)
                        if key is None:
                            raise MarketDemoError(f"aggregator {agg} of study {sid} is not one of the demo's miners")
                        out = work / f"{s}-{i}-result.json"
                        procs.append((sid, i, subprocess.Popen(
                            [sys.executable, "-m", "chain_miner.aggregator", "--study", sid, "--index", str(i),
                             "--peers", peers, "--key", str(key), "--inputs", str(inputs_file), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))
                deadline = time.monotonic() + AGGREGATOR_TIMEOUT_S
                entries = []
                for sid, i, proc, out in procs:
                    if i >= AGGREGATORS // 2 + 1:
                        # A majority of equal results decides the study; a later result is refused as
                        # study_already_decided. The demo's aggregators all finish, the first majority is posted.
                        proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                        continue
                    try:
                        _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        raise MarketDemoError(f"aggregator {i} of study {sid} did not finish within "
                                              f"{AGGREGATOR_TIMEOUT_S:.0f} s") from None
                    if proc.returncode != 0 or not out.exists():
                        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                        raise MarketDemoError(f"aggregator {i} of study {sid} failed: {tail[0]}")
                    entries.append(Entry.decode(bytes.fromhex(json.loads(out.read_text())["entry"])))
                return entries
            finally:
                for _, _, proc, _ in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()

    def _checkpoint(self, ledger: Ledger) -> Any:
        """A checkpoint of the whole log signed by the log key, verified against it as any outsider would."""
        from carechain.checkpoint import Checkpoint, parse_note
        from carechain.proofs import verify_checkpoint

        latest = ledger.latest_checkpoint()
        if latest is None:
            raise MarketDemoError("the bridge signed no checkpoint")
        origin = Checkpoint.parse(parse_note(latest[1])[0]).origin
        return verify_checkpoint(ledger.issue_checkpoint(self.log_key, origin), self.log_key.public_key)
