"""`carechain study post|contribute|status|result|close` and `carechain verify study` on a real bridge data dir:
two patients' bands sealing heart-rate readings, five bonded miners, a researcher; contributions computed from
the patients' own sealed readings, their shares opened with the aggregators' real keys, the results signed by
the aggregators' keys, the study verified offline against a checkpoint signed by the log key."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from carechain import access, envelope, events, market, reencryption, sealed
from carechain.entries import Entry, Registration, registration_entry
from carechain.identity import Identity
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import contract_genesis, ledger_path, log_key, operator_key
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from tests.test_access_cli import out_json, write_final_note
from tests.test_cli import run, text

MINERS = [Identity.from_seed(bytes([0x60 + i]) * 32) for i in range(5)]
BANDS = {"alice": Identity.from_seed(b"\x71" * 32), "bob": Identity.from_seed(b"\x72" * 32)}
EPOCH_MS = 60_000
QUERY = market.Query(type="mean", kind="heart_rate", lo=30, hi=220)
FUNDS, PRICE, FEE = 1_000_000, 100, 10


def bridge_options(tmp: Path, allocations: dict[str, int]) -> list[str]:
    """The CLI options of a bridge data dir in tmp/bridge whose genesis funds `allocations` (its config file)."""
    config = tmp / "carechain.yaml"
    config.write_text("bridge:\n  genesis_allocations:\n" +
                      "".join(f"    '{k}': {v}\n" for k, v in allocations.items()))
    return ["--config", str(config), "--data-dir", str(tmp / "bridge")]


def append_bonded_miners(ledger: Ledger, operator: Identity, miners: list[Identity]) -> None:
    """`miners` registered as miner-<i> (the names `write_final_note` cosigns with) and each bonded; the genesis
    must fund their bonds."""
    ledger.append_entries([ce.party_registration_entry(operator, ce.PartyRegistration(
        role="miner", pk=m.public_key, name=f"miner-{i}", ts=1)) for i, m in enumerate(miners)])
    ledger.append_entries([ce.signed(m, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["miner"], nonce=1, ts=1))
                           for m in miners])


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.bdir = tmp, tmp / "bridge"
        self.epochs: dict[str, int] = {}
        for who in ("alice", "bob", "lab"):
            Identity.generate().save(tmp / f"{who}.key")
        for who in ("alice", "bob"):
            out_json(run("keys", "new", "--pre", tmp / f"{who}.pre", "--json"))
        lab = Identity.load(tmp / "lab.key").device_id
        allocations = {"pool:miners": 1, f"researcher:{lab}": FUNDS,
                       **{f"miner:{m.device_id}": MIN_BOND["miner"] for m in MINERS}}
        self.opts = bridge_options(tmp, allocations)
        self.ids = {who: out_json(run("party", "register", "patient", tmp / f"{who}.key", "--name", who, "--pre-key",
                                      tmp / f"{who}.pre", *self.opts, "--json"))["party_id"]
                    for who in ("alice", "bob")}
        self.ids["lab"] = out_json(run("party", "register", "researcher", tmp / "lab.key", "--name", "lab",
                                       *self.opts, "--json"))["party_id"]
        self.genesis = contract_genesis(self.bdir, allocations)
        ledger = Ledger(ledger_path(self.bdir))
        try:
            op = operator_key(self.bdir)
            append_bonded_miners(ledger, op, MINERS)
            self.bpm = {who: self._seal(ledger, op, who, base) for who, base in (("alice", 60), ("bob", 80))}
            runtime = replay_ledger(ledger, self.genesis)
            assert all(r == "ok" for _, r in runtime.state.results), runtime.state.results
        finally:
            ledger.close()

    def _seal(self, ledger: Ledger, op: Identity, who: str, base: int) -> int:
        """Ten sealed heart-rate readings of `who`'s band in one epoch; their mean bpm."""
        band = BANDS[who]
        reg = Registration(dev=band.device_id, pk=band.public_key, profile="heart_rate_band", owner=self.ids[who],
                           site="home", ts=1)
        ledger.append_registrations([(registration_entry(op, reg), reg)])
        pre = reencryption.PreKey.load(self.tmp / f"{who}.pre")
        epoch = int(time.time() * 1000) // EPOCH_MS - 1
        self.epochs[who] = epoch
        key = os.urandom(32)
        capsule, key_ct = reencryption.encapsulate(pre.public_key, key)
        body = events.EpochKey(epoch=epoch, epoch_ms=EPOCH_MS, owner=self.ids[who], capsule=capsule, key_ct=key_ct)
        cose = envelope.sign(band, events.make_payload(band.device_id, 0, epoch * EPOCH_MS, "epoch_key", body, v=2))
        ledger.append_events([EventCandidate(band.device_id, 0, Entry("event", cose).encode(), kind="epoch_key",
                                             version=2)])
        for seq in range(1, 11):
            ts = epoch * EPOCH_MS + seq * 1000
            ct = sealed.seal_body(key, os.urandom(12), band.device_id, seq, ts, "heart_rate", epoch,
                                  {"bpm": base + seq})
            cose = envelope.sign(band, events.make_sealed_payload(band.device_id, seq, ts, "heart_rate", epoch,
                                                                  sealed.ciphertext_hash(ct)))
            ledger.append_events([EventCandidate(band.device_id, seq, Entry("event", cose).encode(),
                                                 kind="heart_rate", version=2, ct=ct, epoch=epoch)])
        return base + 6  # the mean of base+1 … base+10 (base+5.5), rounded half up

    def cli(self, *args: str | Path) -> dict:
        return out_json(run(*args, *self.opts, "--json"))

    def final_note(self) -> Path:
        """The ledger's checkpoint signed by the bridge's operator key and cosigned by 4 of the 5 miners."""
        return write_final_note(self.bdir, self.tmp / "final.note", MINERS[:4])

    def log_checkpoint(self, name: str = "log.note") -> Path:
        """What the bridge publishes: a checkpoint of the whole ledger signed by its log key."""
        ledger = Ledger(ledger_path(self.bdir))
        try:
            note = ledger.issue_checkpoint(log_key(self.bdir), "carechain.test/log")
        finally:
            ledger.close()
        path = self.tmp / name
        path.write_text(note)
        return path

    def record_final(self) -> str:
        """The bridge's `checkpoint.final` for a final note of the whole ledger (4 of 5 miners cosigned); the
        note."""
        note = self.final_note().read_text()
        ledger = Ledger(ledger_path(self.bdir))
        try:
            submit(ledger, self.genesis, [ce.checkpoint_final_entry(operator_key(self.bdir), note)])
        finally:
            ledger.close()
        return note

    def audit_on_ledger(self, study_id: str) -> list[int]:
        """The audit's ledger side for a decided study: a newer final checkpoint, the sample it fixes, each
        sampled owner's disclosure (a fresh key sealed to each aggregator) and a majority's "match" verdicts; the
        sample. (The aggregators' recomputation itself is `chain_miner.aggregator --audit`'s, tested there.)"""
        note = self.record_final()
        ledger = Ledger(ledger_path(self.bdir))
        try:
            lab = Identity.load(self.tmp / "lab.key")
            now = int(time.time() * 1000)
            submit(ledger, self.genesis, [ce.study_sample_entry(lab, ce.StudySample(
                study_id=study_id, seed_checkpoint=note, ts=now))])
            state = replay_ledger(ledger, self.genesis).state
            study = state.table("studies")[study_id]
            by_id = {m.device_id: m for m in MINERS}
            who_is = {self.ids[who]: who for who in ("alice", "bob")}
            entries = []
            for index in study["audit"]["sample"]:
                who = who_is[state.table("study_contributions")[str(index)]["owner"]]
                key = os.urandom(32)
                sealed_keys = [access.seal_to_miner(by_id[a].public_key, key) for a in study["aggregators"]]
                disclose = ce.StudyDisclose(study_id=study_id, contribution=index, keys=sealed_keys, epochs=[
                    ce.DisclosedEpoch(dev=BANDS[who].device_id, epoch=self.epochs[who])], blob=os.urandom(64), ts=now)
                entries.append(ce.study_disclose_entry(Identity.load(self.tmp / f"{who}.key"), disclose))
                entries += [ce.study_audit_entry(by_id[a], ce.StudyAudit(study_id=study_id, contribution=index,
                                                                         verdict="match", ts=now))
                            for a in study["aggregators"][:2]]
            submit(ledger, self.genesis, entries)
            return list(study["audit"]["sample"])
        finally:
            ledger.close()

    def aggregators_answer(self, study_id: str) -> tuple[list[int], int]:
        """Each aggregator opens its sealed shares; two of them sign the same result (a majority of three).
        The contributions, and the sum the shares reconstruct to (degree-1 Shamir: f(0) = 2·f(1) - f(2), per
        bit of value - lo)."""
        ledger = Ledger(ledger_path(self.bdir))
        try:
            state = replay_ledger(ledger, self.genesis).state
            study = state.table("studies")[study_id]
            by_id = {m.device_id: m for m in MINERS}
            aggs = [by_id[a] for a in study["aggregators"]]
            leaves = list(study["contributions"])
            total = 0
            for index in leaves:
                shares = state.table("study_contributions")[str(index)]["shares"]
                rows = [market.decode_shares(market.open_share(agg, sealed_row), QUERY.width)
                        for agg, sealed_row in zip(aggs, shares, strict=True)]
                bits = []
                for points in zip(*rows, strict=True):
                    assert market.shares_consistent(points, 1)
                    bits.append(market.signed(2 * points[0] - points[1]))
                assert market.is_valid(QUERY, bits)
                total += QUERY.lo + sum(b << i for i, b in enumerate(bits))
            payload = market.result_payload(study_id, valid=leaves, invalid=0, included=leaves,
                                            answer={"sum": total, "n": len(leaves)}, epsilon_milli=0,
                                            ts=int(time.time() * 1000))
            submit(ledger, self.genesis, [market.result_entry(agg, payload) for agg in aggs[:2]])
        finally:
            ledger.close()
        return leaves, total


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    return Deployment(tmp_path)


def test_a_study_from_post_to_payment_verifies_offline_and_a_tampered_result_does_not(deployment: Deployment
                                                                                      ) -> None:
    d = deployment
    consents = {who: d.cli("consent", "give", "--key", d.tmp / f"{who}.key", "--kinds", "heart_rate",
                           "--queries", "mean", "--min-cohort", "2", "--price", str(PRICE),
                           "--expires", "30d")["consent"] for who in ("alice", "bob")}
    now = int(time.time() * 1000)
    posted = d.cli("study", "post", "hr-1", "--key", d.tmp / "lab.key", "--type", "mean", "--kind", "heart_rate",
                   "--lo", "30", "--hi", "220", "--from", str(now - 3_600_000), "--to", str(now + 3_600_000),
                   "--price", str(PRICE), "--max-contributors", "5", "--fee", str(FEE), "--closes", "7d",
                   "--checkpoint", d.final_note())
    assert posted["deposit"] == 5 * PRICE + 3 * FEE and len(posted["aggregators"].split(",")) == 3
    # Bob revokes his consent: a contribution under it is refused, so it can never be counted.
    d.cli("consent", "revoke", str(consents["bob"]), "--key", d.tmp / "bob.key")
    refused = run("study", "contribute", "hr-1", "--consent", str(consents["bob"]), "--key", d.tmp / "bob.key",
                  "--pre-key", d.tmp / "bob.pre", *d.opts)
    assert refused.exit_code == 1 and "consent_revoked" in text(refused)
    consents["bob"] = d.cli("consent", "give", "--key", d.tmp / "bob.key", "--kinds", "heart_rate", "--queries",
                            "mean", "--min-cohort", "2", "--price", str(PRICE), "--expires", "30d")["consent"]
    for who in ("alice", "bob"):
        opening = d.tmp / f"{who}-opening.json"
        got = d.cli("study", "contribute", "hr-1", "--consent", str(consents[who]), "--key", d.tmp / f"{who}.key",
                    "--pre-key", d.tmp / f"{who}.pre", "--opening", opening)
        assert got["readings"] == 10 and got["problems"] == 0
        kept = json.loads(opening.read_text())
        assert stat.S_IMODE(opening.stat().st_mode) == 0o600
        assert kept["value"] == d.bpm[who]
        assert kept["vector"] == market.contribution(QUERY, d.bpm[who])
        assert market.commitment(kept["vector"], bytes.fromhex(kept["salt"])) == got["commitment"]
    status = d.cli("study", "status", "hr-1")
    assert status["state"] == "open" and status["contributions"] == 2 and status["escrow"] == posted["deposit"]
    undecided = run("study", "result", "hr-1", *d.opts)
    assert undecided.exit_code == 1 and "not decided" in text(undecided)

    d.record_final()  # results wait until the contributions are final
    leaves, total = d.aggregators_answer("hr-1")
    assert total == d.bpm["alice"] + d.bpm["bob"]
    result = d.cli("study", "result", "hr-1")
    assert result["state"] == "answered" and result["answer"] == {"sum": total, "n": 2}
    assert result["mean"] == total / 2 and result["included"] == 2

    unaudited = run("study", "close", "hr-1", "--key", d.tmp / "lab.key", *d.opts)
    assert unaudited.exit_code == 1 and "audit_not_sampled" in text(unaudited)
    sample = d.audit_on_ledger("hr-1")
    assert len(sample) == 1 and set(sample) <= set(leaves)
    closed = d.cli("study", "close", "hr-1", "--key", d.tmp / "lab.key")
    assert closed["escrow"] == 0
    note = d.log_checkpoint()
    verified = out_json(run("verify", "study", "hr-1", "--data-dir", d.bdir, "--config", d.opts[1],
                            "--checkpoint", note, "--json"))
    assert verified["ok"] and verified["included"] == leaves
    assert {c["check"] for c in verified["checks"] if c["ok"]} >= {"aggregators", "consents", "majority", "cohort",
                                                                   "anchored", "payments", "dp parameters",
                                                                   "audit_sample", "audit_outcomes"}
    human = run("verify", "study", "hr-1", "--data-dir", d.bdir, "--config", d.opts[1], "--checkpoint", note)
    assert human.exit_code == 0 and "VERIFIED" in text(human)

    # A copy of the ledger with the published result rewritten (the answer doubled, the signature kept).
    forged_dir = d.tmp / "forged"
    shutil.copytree(d.bdir, forged_dir)
    db = sqlite3.connect(ledger_path(forged_dir))
    index, data = next((i, bytes(b)) for i, b in db.execute("SELECT idx, data FROM entries ORDER BY idx")
                       if Entry.decode(bytes(b)).type == "study.result")
    msg = envelope.parse(Entry.decode(data).cose)
    by_id = {m.device_id: m for m in MINERS}
    forged = envelope.sign(by_id[msg.kid], {**msg.payload, "answer": {"sum": 2 * total, "n": 2}})
    db.execute("UPDATE entries SET data=? WHERE idx=?", (Entry("study.result", forged[:-64] + msg.signature).encode(),
                                                         index))
    db.commit()
    db.close()
    tampered = run("verify", "study", "hr-1", "--data-dir", forged_dir, "--config", d.opts[1], "--checkpoint", note,
                   "--json")
    assert tampered.exit_code == 1
    failed = {c["check"] for c in json.loads(tampered.stdout)["checks"] if not c["ok"]}
    assert "anchored" in failed and ("majority" in failed or "result signatures" in failed)


def test_verify_keeps_its_bundle_usage_and_asks_for_a_study_id(tmp_path: Path) -> None:
    missing = run("verify", "study")
    assert missing.exit_code == 2 and "verify study ID" in text(missing)
    bundle = run("verify", tmp_path / "nope.json")
    assert bundle.exit_code == 2 and "cannot read" in text(bundle)


@pytest.mark.parametrize("command", ["post", "status", "contribute", "close", "result", "disclose"])
def test_every_study_command_has_help_with_an_example(command: str) -> None:
    shown = run("study", command, "--help", columns=200)
    assert shown.exit_code == 0 and f"carechain study {command}" in text(shown)


# -- the audit: sample, `study disclose`, three aggregator processes judge, `study status` shows it ----------------


def _record_final_checkpoint(d: Deployment, name: str) -> str:
    """A final checkpoint of the whole ledger (log-signed, cosigned by 4 of the 5 miners), recorded on it by a
    `checkpoint.final` entry; the note."""
    note = write_final_note(d.bdir, d.tmp / name, MINERS[:4]).read_text()
    ledger = Ledger(ledger_path(d.bdir))
    try:
        submit(ledger, d.genesis, [ce.checkpoint_final_entry(operator_key(d.bdir), note)], clock=operator_key(d.bdir))
    finally:
        ledger.close()
    return note


def test_a_sampled_contributor_discloses_and_the_aggregators_audit_it(deployment: Deployment, tmp_path: Path
                                                                      ) -> None:
    from chain_bridge.ledger.reader import LedgerReader
    from chain_miner.aggregator import audit_inputs_from_leaves
    from contract_rules.miners import final_size
    from tests.test_market_mpc import run_aggregators

    d = deployment
    now = int(time.time() * 1000)
    d.cli("study", "post", "hr-a", "--key", d.tmp / "lab.key", "--type", "mean", "--kind", "heart_rate", "--lo", "30",
          "--hi", "220", "--from", str(now - 3_600_000), "--to", str(now + 3_600_000), "--price", str(PRICE),
          "--max-contributors", "5", "--fee", str(FEE), "--closes", "7d", "--checkpoint", d.final_note())
    for who in ("alice", "bob"):
        consent = d.cli("consent", "give", "--key", d.tmp / f"{who}.key", "--kinds", "heart_rate", "--queries",
                        "mean", "--min-cohort", "2", "--price", str(PRICE), "--expires", "30d")["consent"]
        got = d.cli("study", "contribute", "hr-a", "--consent", str(consent), "--key", d.tmp / f"{who}.key",
                    "--pre-key", d.tmp / f"{who}.pre")
        kept = d.tmp / f"{who}.hr-a.opening.json"  # kept by default, beside her key, 0600
        assert got["opening"] == str(kept) and stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert json.loads(kept.read_text())["contribution"] == got["contribution"]
    early = run("study", "disclose", "hr-a", "--key", d.tmp / "alice.key", "--pre-key", d.tmp / "alice.pre", *d.opts)
    assert early.exit_code == 1 and "no audit sample yet" in text(early)
    ledger = Ledger(ledger_path(d.bdir))
    try:
        state = replay_ledger(ledger, d.genesis).state
    finally:
        ledger.close()
    if final_size(state) <= max(state.table("studies")["hr-a"]["contributions"]):
        _record_final_checkpoint(d, "final-contributions.note")  # results need final contributions
    d.aggregators_answer("hr-a")
    note = _record_final_checkpoint(d, "final-sample.note")
    ledger = Ledger(ledger_path(d.bdir))
    try:
        submit(ledger, d.genesis, [ce.study_sample_entry(Identity.load(d.tmp / "lab.key"), ce.StudySample(
            study_id="hr-a", seed_checkpoint=note, ts=int(time.time() * 1000)))], clock=operator_key(d.bdir))
        state = replay_ledger(ledger, d.genesis).state
    finally:
        ledger.close()
    status = d.cli("study", "status", "hr-a")
    sample = status["audit"]["sample"]
    assert len(sample) == 1 and status["audit"]["disclosed"] == [] and status["audit"]["outcome"] == {}
    owners = {state.table("study_contributions")[str(i)]["owner"]: i for i in state.table("studies")["hr-a"]
              ["contributions"]}
    sampled = next(who for who in ("alice", "bob") if owners[d.ids[who]] == sample[0])
    unsampled = "bob" if sampled == "alice" else "alice"
    refused = run("study", "disclose", "hr-a", "--key", d.tmp / f"{unsampled}.key", "--pre-key",
                  d.tmp / f"{unsampled}.pre", *d.opts)
    assert refused.exit_code == 1 and "not in study hr-a's audit sample" in text(refused)
    disclosed = d.cli("study", "disclose", "hr-a", "--key", d.tmp / f"{sampled}.key", "--pre-key",
                      d.tmp / f"{sampled}.pre")
    assert disclosed["contribution"] == sample[0] and disclosed["readings"] == 10 and disclosed["epochs"] == 1
    assert d.cli("study", "status", "hr-a")["audit"]["disclosed"] == sample

    # The aggregators' audit, from the ledger alone: three real MPC parties, in the study's order.
    reader = LedgerReader(ledger_path(d.bdir))
    try:
        inputs = audit_inputs_from_leaves(d.genesis, reader.leaves(0, reader.size()), "hr-a")
    finally:
        reader.close()
    assert [c["leaf"] for c in inputs["contributions"]] == sample
    by_id = {m.device_id: m for m in MINERS}
    for i, agg in enumerate(inputs["study"]["aggregators"]):
        by_id[agg].save(tmp_path / f"aggregator{i}.key", overwrite=True)
    outputs = run_aggregators(tmp_path, inputs, audit=True)
    assert all(o["verdicts"] == [{"contribution": sample[0], "verdict": "match", "reason": ""}] for o in outputs)
    ledger = Ledger(ledger_path(d.bdir))
    try:
        submit(ledger, d.genesis, [Entry.decode(bytes.fromhex(o["entries"][0])) for o in outputs[:2]],
               clock=operator_key(d.bdir))
    finally:
        ledger.close()
    audit = d.cli("study", "status", "hr-a")["audit"]
    assert audit["outcome"] == {str(sample[0]): "match"} and len(audit["verdicts"][str(sample[0])]) == 2
    human = run("study", "status", "hr-a", *d.opts)
    assert human.exit_code == 0 and f"{sample[0]}:match" in text(human)
