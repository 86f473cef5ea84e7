"""`carechain trial …` and `carechain verify trial` on a real bridge data dir: a sponsor, an investigator, a
bonded pharmacy with its registered terminal, eight patients each with a band that seals her `trial_measure`
reading, five bonded miners. Every person's act goes through the CLI with that person's own key file; the
labelling miners' part (commit, answer the unblinding, reveal), which their runner does by itself in a
deployment, is played here with the same client functions (record_access.trials) and their real keys."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from carechain import envelope, events, reencryption, sealed
from carechain import trial_allocation as alloc
from carechain.entries import Entry, Registration, registration_entry
from carechain.identity import Identity
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import contract_genesis, ledger_path, log_key, operator_key
from contract_rules import transactions as ce
from contract_rules import trials as rules
from contract_rules.bonds import MIN_BOND
from record_access import trials as client
from tests.test_access_cli import out_json, write_final_note
from tests.test_cli import run, text
from tests.test_cli_study import append_bonded_miners, bridge_options

MINERS = [Identity.from_seed(bytes([0x80 + i]) * 32) for i in range(5)]
PATIENTS = [f"p{i}" for i in range(8)]
TRIAL = "hrt-cli"
EPOCH_MS = 60_000
ENROL_S = 600  # enrolment stays open this long after the registration (its close is then attested at once)
EFFECT = -6_000  # milli-bpm, in the treatment arm

PROTOCOL = """\
labellers = 3
max_participants = 40
reveal_window_ms = 600000
investigators = ["{investigator}"]

[design]
arms = ["treatment", "placebo"]
ratio = [1, 1]
block_sizes = [2, 4]
strata = {{ sex = ["f", "m"] }}

[outcome]
kind = "heart_rate"
measure = "resting_heart_rate"
baseline_from_ms = 1767225600000
baseline_to_ms = 1767830400000
followup_from_ms = 1769817600000
followup_to_ms = 1770422400000
direction = "decrease"

[analysis]
alpha_milli = 50
"""


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.bdir = tmp, tmp / "bridge"
        for who in ("sponsor", "investigator", "pharmacy", "terminal", "anyone", *PATIENTS):
            Identity.generate().save(tmp / f"{who}.key")
        for who in PATIENTS:
            out_json(run("keys", "new", "--pre", tmp / f"{who}.pre", "--json"))
        pharmacy = Identity.load(tmp / "pharmacy.key")
        allocations = {"pool:miners": 1, f"pharmacy:{pharmacy.device_id}": MIN_BOND["pharmacy"],
                       **{f"miner:{m.device_id}": MIN_BOND["miner"] for m in MINERS}}
        self.opts = bridge_options(tmp, allocations)
        self.ids: dict[str, str] = {}
        for who, role in (("sponsor", "sponsor"), ("investigator", "investigator"), ("pharmacy", "pharmacy"),
                          ("anyone", "researcher")):
            self.ids[who] = self.cli("party", "register", role, tmp / f"{who}.key", "--name", who)["party_id"]
        for who in PATIENTS:
            self.ids[who] = self.cli("party", "register", "patient", tmp / f"{who}.key", "--name", who,
                                     "--pre-key", tmp / f"{who}.pre")["party_id"]
        self.genesis = contract_genesis(self.bdir, allocations)
        self.bands = {who: Identity.generate() for who in PATIENTS}
        terminal = Identity.load(tmp / "terminal.key")
        ledger = Ledger(ledger_path(self.bdir))
        try:
            op = operator_key(self.bdir)
            append_bonded_miners(ledger, op, MINERS)
            ledger.append_entries([ce.signed(pharmacy, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["pharmacy"],
                                                                                  nonce=1, ts=1))])
            regs = [Registration(dev=terminal.device_id, pk=terminal.public_key, profile="pharmacy_terminal",
                                 owner=self.ids["pharmacy"], site="pharmacy", ts=1),
                    *(Registration(dev=band.device_id, pk=band.public_key, profile="heart_rate_band",
                                   owner=self.ids[who], site="home", ts=1) for who, band in self.bands.items())]
            ledger.append_registrations([(registration_entry(op, r), r) for r in regs])
            runtime = replay_ledger(ledger, self.genesis)
            assert all(r == "ok" for _, r in runtime.state.results), runtime.state.results
        finally:
            ledger.close()
        write_final_note(self.bdir, tmp / "final.note", MINERS[:4])
        note = (tmp / "final.note").read_text()
        self.submit([ce.checkpoint_final_entry(operator_key(self.bdir), note)])
        (tmp / "protocol.toml").write_text(PROTOCOL.format(investigator=self.ids["investigator"]))
        (tmp / "protocol.txt").write_text("HRT-CLI: a randomised, placebo-controlled trial of resting heart rate.\n")

    def cli(self, *args: str | Path) -> dict:
        return out_json(run(*args, *self.opts, "--json"))

    def key(self, who: str) -> Path:
        return self.tmp / f"{who}.key"

    def log_checkpoint(self) -> None:
        """What the bridge publishes: a checkpoint of the whole ledger signed by its log key (the latest one)."""
        ledger = Ledger(ledger_path(self.bdir))
        try:
            ledger.issue_checkpoint(log_key(self.bdir), "carechain.test/log")
        finally:
            ledger.close()

    def submit(self, entries: list[Entry]) -> list[int]:
        ledger = Ledger(ledger_path(self.bdir))
        try:
            return submit(ledger, self.genesis, entries, clock=operator_key(self.bdir))
        finally:
            ledger.close()

    def state(self):  # noqa: ANN201 - a contract State
        ledger = Ledger(ledger_path(self.bdir))
        try:
            return replay_ledger(ledger, self.genesis).state
        finally:
            ledger.close()

    def trial(self) -> dict:
        record = rules.trial_record(self.state(), TRIAL)
        assert record is not None
        return record

    def labellers(self) -> list[Identity]:
        by_id = {m.device_id: m for m in MINERS}
        return [by_id[m] for m in self.trial()["labellers"]]

    def measure(self, who: str, baseline: int, followup: int) -> None:
        """Her band's sealed trial_measure reading (and the epoch key sealing its data key to her), anchored."""
        band, pre = self.bands[who], reencryption.PreKey.load(self.tmp / f"{who}.pre")
        now = int(time.time() * 1000)
        epoch = now // EPOCH_MS
        key = os.urandom(32)
        capsule, key_ct = reencryption.encapsulate(pre.public_key, key)
        ek = events.EpochKey(epoch=epoch, epoch_ms=EPOCH_MS, owner=self.ids[who], capsule=capsule, key_ct=key_ct)
        cose = envelope.sign(band, events.make_payload(band.device_id, 0, epoch * EPOCH_MS, "epoch_key", ek, v=2))
        body = events.TrialMeasure(trial_id=TRIAL, measure="resting_heart_rate", baseline=baseline,
                                   followup=followup, unit_scale=1000).model_dump()
        ct = sealed.seal_body(key, os.urandom(12), band.device_id, 1, now, "trial_measure", epoch, body)
        reading = envelope.sign(band, events.make_sealed_payload(band.device_id, 1, now, "trial_measure", epoch,
                                                                 sealed.ciphertext_hash(ct)))
        ledger = Ledger(ledger_path(self.bdir))
        try:
            ledger.append_events([
                EventCandidate(band.device_id, 0, Entry("event", cose).encode(), kind="epoch_key", version=2),
                EventCandidate(band.device_id, 1, Entry("event", reading).encode(), kind="trial_measure", version=2,
                               ct=ct, epoch=epoch)])
        finally:
            ledger.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    return Deployment(tmp_path)


def test_a_trial_from_registration_to_certificate_through_the_cli_verifies(deployment: Deployment) -> None:
    d = deployment
    registered = d.cli("trial", "register", TRIAL, "--key", d.key("sponsor"), "--protocol", d.tmp / "protocol.toml",
                       "--document", d.tmp / "protocol.txt", "--enrol-closes", f"{ENROL_S}s",
                       "--checkpoint", d.tmp / "final.note")
    assert registered["protocol_hash"] == client.protocol_hash((d.tmp / "protocol.txt").read_bytes())
    assert len(registered["labellers"].split(",")) == 3

    # Enrolment waits for every commitment.
    alice_consent = d.cli("trial", "consent", TRIAL, "--key", d.key("p0"), "--out", d.tmp / "p0.consent.json")
    assert alice_consent["participant"] == d.ids["p0"]
    early = run("trial", "enroll", TRIAL, "--key", d.key("investigator"), "--consent", d.tmp / "p0.consent.json",
                "--attr", "sex=f", *d.opts)
    assert early.exit_code == 1 and "commitments_missing" in text(early)

    committed = d.cli("trial", "commit", TRIAL, "--key", d.key("sponsor"))
    seed_file = Path(committed["seed_file"])
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    again = run("trial", "commit", TRIAL, "--key", d.key("sponsor"), *d.opts)
    assert again.exit_code == 1 and "commits once" in text(again)
    trial = d.trial()
    keys = client.committer_keys(d.state(), trial)
    seeds = {d.ids["sponsor"]: client.load_seed(seed_file, TRIAL)}
    for m in d.labellers():
        seeds[m.device_id] = os.urandom(32)
        d.submit([client.build_commit(m, trial, seeds[m.device_id], keys, int(time.time() * 1000))])

    # A consent signed by someone else, or to another protocol, is refused before anything is appended.
    forged = json.loads((d.tmp / "p0.consent.json").read_text())
    forged["participant"] = d.ids["p1"]
    (d.tmp / "forged.json").write_text(json.dumps(forged))
    refused = run("trial", "enroll", TRIAL, "--key", d.key("investigator"), "--consent", d.tmp / "forged.json",
                  "--attr", "sex=f", *d.opts)
    assert refused.exit_code == 1 and "not " + d.ids["p1"] in text(refused)

    labels = {}
    for i, who in enumerate(PATIENTS):
        if who != "p0":
            d.cli("trial", "consent", TRIAL, "--key", d.key(who), "--out", d.tmp / f"{who}.consent.json")
        enrolled = d.cli("trial", "enroll", TRIAL, "--key", d.key("investigator"), "--consent",
                         d.tmp / f"{who}.consent.json", "--attr", f"sex={'fm'[i % 2]}")
        labels[who] = enrolled["kit"]
        dispensed = d.cli("trial", "dispense", TRIAL, d.ids[who], "--key", d.key("pharmacy"), "--terminal-key",
                          d.key("terminal"))
        assert dispensed["kit"] == enrolled["kit"] == alloc.kit_label(
            TRIAL, alloc.Design.model_validate(trial["design"]), f"sex={'fm'[i % 2]}", i // 2)
    twice = run("trial", "dispense", TRIAL, d.ids["p0"], "--key", d.key("pharmacy"), "--terminal-key",
                d.key("terminal"), *d.opts)
    assert twice.exit_code == 1 and "already_dispensed" in text(twice)

    # The simulated biology of this test: the arms from every seed (no party holds them all before the lock).
    trial = d.trial()
    key = alloc.allocation_key(seeds, bytes.fromhex(trial["checkpoint_seed"]), TRIAL)
    design = alloc.Design.model_validate(trial["design"])
    arms = {}
    for who in PATIENTS:
        p = rules.participant_record(d.state(), TRIAL, d.ids[who])
        arms[who] = alloc.arm_of(key, design, p["stratum"], p["position"])
    for i, who in enumerate(PATIENTS):
        spread = (i * 7919 % 11 - 5) * 700
        d.measure(who, 72_000 + 100 * i, 72_000 + 100 * i + spread + (EFFECT if arms[who] == "treatment" else 0))

    # An emergency unblinding: logged; every committer answers with its keys of her block; the investigator
    # opens her arm, and only hers.
    # An emergency unblinding: logged; every committer answers with its keys of every block that may hold her
    # slot (blocks of 2 or 4: her position 3 lies in block 0 or 1); the investigator finds her block and her arm.
    unblinded = d.cli("trial", "unblind", TRIAL, d.ids["p6"], "--key", d.key("investigator"), "--reason",
                      "adverse_event")
    assert d.trial()["unblindings"][str(unblinded["unblinding"])]["blocks"] == [0, 1]
    waiting = run("trial", "unblind", TRIAL, d.ids["p6"], "--key", d.key("investigator"), "--open", *d.opts)
    assert waiting.exit_code == 1 and "have not answered" in text(waiting)
    d.cli("trial", "answer", TRIAL, str(unblinded["unblinding"]), "--key", d.key("sponsor"))
    trial = d.trial()
    investigator_pk = Identity.load(d.key("investigator")).public_key
    d.submit([client.answer_unblinding(m, trial, unblinded["unblinding"], seeds[m.device_id], investigator_pk,
                                       int(time.time() * 1000)) for m in d.labellers()])
    opened = d.cli("trial", "unblind", TRIAL, d.ids["p6"], "--key", d.key("investigator"), "--open")
    real = alloc.block_of(key, design, "sex=f", 3)
    assert opened["arm"] == arms["p6"] and opened["candidate_blocks"] == [0, 1]
    assert (opened["block"], opened["first"], opened["size"]) == (real.number, real.first, real.size)

    withdrawn = d.cli("trial", "withdraw", TRIAL, d.ids["p7"], "--key", d.key("p7"), "--reason", "moved_away")
    assert withdrawn["reason"] == "moved_away"

    too_early = run("trial", "lock", TRIAL, "--key", d.key("sponsor"), *d.opts)
    assert too_early.exit_code == 1 and "enrolment_open" in text(too_early)
    # The bridge attests the time past the close once its clock gets there; the test does not wait for that.
    d.submit([ce.clock_attest_entry(operator_key(d.bdir), d.trial()["enrol_closes_ms"] + 1)])
    d.cli("trial", "lock", TRIAL, "--key", d.key("sponsor"))
    revealed = d.cli("trial", "reveal", TRIAL, "--key", d.key("sponsor"))
    assert revealed["seeds"] == "1 of 4"
    # A labeller's seed is recovered from escrow only once the reveal window closed without its reveal.
    silent = d.labellers()[0].device_id
    early_share = run("trial", "recover", TRIAL, silent, "--key", d.key("sponsor"), *d.opts)
    assert early_share.exit_code == 1 and "reveal_window_open" in text(early_share)
    own = run("trial", "recover", TRIAL, d.ids["sponsor"], "--key", d.key("sponsor"), *d.opts)
    assert own.exit_code == 1 and "already revealed" in text(own)
    d.submit([client.build_reveal(m, TRIAL, seeds[m.device_id], int(time.time() * 1000)) for m in d.labellers()])

    not_yet = run("trial", "certify", TRIAL, "--key", d.key("anyone"), *d.opts)
    assert not_yet.exit_code == 1 and "too_few_outcomes" in text(not_yet)
    for i, who in enumerate(PATIENTS[:7]):
        disclosed = d.cli("trial", "outcome", TRIAL, "--key", d.key(who), "--pre-key", d.tmp / f"{who}.pre")
        assert disclosed["change"] == (i * 7919 % 11 - 5) * 700 + (EFFECT if arms[who] == "treatment" else 0)
    gone = run("trial", "outcome", TRIAL, "--key", d.key("p7"), "--pre-key", d.tmp / "p7.pre", *d.opts)
    assert gone.exit_code == 1 and "withdrawn" in text(gone)

    certified = d.cli("trial", "certify", TRIAL, "--key", d.key("anyone"))["result"]
    treated = [who for who in PATIENTS[:7] if arms[who] == "treatment"]
    assert certified["n_treatment"] == len(treated) and certified["n_control"] == 7 - len(treated)
    status = d.cli("trial", "status", TRIAL)
    assert status["state"] == "certified" and status["enrolled"] == 8 and status["withdrawn"] == 1
    assert status["unblinded"] == [d.ids["p6"]] and status["certificate"] == certified

    d.log_checkpoint()  # what the bridge signs each second the log grew: verify checks the trial under it
    verified = d.cli("trial", "verify", TRIAL)
    assert verified["ok"], verified["checks"]
    [listed] = verified["unblinded"]
    assert listed["participant"] == d.ids["p6"] and listed["blocks"] == [0, 1] and listed["revealed_exact"]
    assert listed["revealed"] == [0, real.first + real.size - 1 if real.number == 1 else
                                  real.size + alloc.block_of(key, design, "sex=f", real.size).size - 1]
    assert out_json(run("verify", "trial", TRIAL, *d.opts, "--json"))["checks"] == verified["checks"]
    plain = run("verify", "trial", TRIAL, *d.opts)
    assert plain.exit_code == 0 and f"VERIFIED trial {TRIAL}" in text(plain)


def test_trial_commands_fail_clearly_on_bad_input(deployment: Deployment) -> None:
    d = deployment
    missing = run("trial", "status", "nope", *d.opts)
    assert missing.exit_code == 1 and "no trial 'nope'" in text(missing)
    (d.tmp / "bad.toml").write_text("[design]\narms = [\"a\"]\n")
    bad = run("trial", "register", TRIAL, "--key", d.key("sponsor"), "--protocol", d.tmp / "bad.toml",
              "--document", d.tmp / "protocol.txt", "--enrol-closes", "1d", "--checkpoint", d.tmp / "final.note",
              *d.opts)
    assert bad.exit_code == 1 and "lacks outcome, investigators" in text(bad)
    (d.tmp / "broken.toml").write_text("design = [")
    broken = run("trial", "register", TRIAL, "--key", d.key("sponsor"), "--protocol", d.tmp / "broken.toml",
                 "--document", d.tmp / "protocol.txt", "--enrol-closes", "1d", "--checkpoint", d.tmp / "final.note",
                 *d.opts)
    assert broken.exit_code == 2 and "not a valid TOML protocol file" in text(broken)
    nothing = run("verify", "trial", *d.opts)
    assert nothing.exit_code == 2 and "carechain verify trial ID" in text(nothing)
    for command in ("register", "commit", "consent", "enroll", "dispense", "withdraw", "unblind", "answer", "lock",
                    "reveal", "recover", "outcome", "certify", "status", "verify"):
        helped = run("trial", command, "--help", columns=200)
        assert helped.exit_code == 0 and "carechain trial" in text(helped), command


def test_a_kept_seed_is_never_replaced_and_reads_as_the_miners_keep_theirs(tmp_path: Path) -> None:
    path = tmp_path / "sponsor.hrt-1.seed"
    seed = client.draw_seed()
    client.save_seed(path, "hrt-1", "sponsor", seed)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and client.load_seed(path, "hrt-1") == seed
    client.save_seed(path, "hrt-1", "sponsor", seed)  # the same seed again: a restart, nothing changes
    with pytest.raises(client.TrialClientError, match="already holds a different seed"):
        client.save_seed(path, "hrt-1", "sponsor", client.draw_seed())
    with pytest.raises(client.TrialClientError, match="holds the seed of trial 'hrt-1', not of 'hrt-2'"):
        client.load_seed(path, "hrt-2")
    miner_file = tmp_path / "miner.seed"  # chain_miner.trial_runner's format
    miner_file.write_text(json.dumps({"v": 1, "trial_id": "hrt-1", "party": "m", "seed": seed.hex()}))
    assert client.load_seed(miner_file, "hrt-1") == seed
