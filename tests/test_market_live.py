"""The data market with real processes: the miners run their studies by themselves (issue 15, items 3, 6, 8).

A private mosquitto, one `carechain bridge` (contracts on), three bonded `carechain miner` processes with
`miner.mpc_listen` set, a researcher and three patients registered on the ledger, two of them wearing a
heart-rate band whose sealed readings are anchored (tests/live_world.py's deployment, one world for the
module). The researcher posts a study, the patients contribute, the bridge attests the time past the study's
close — and from there no test code starts anything: each miner sees in its own replayed contract state that
its study's contributions are closed and final, runs its MPyC party (`python -m chain_miner.aggregator`) with
the other aggregators found through their signed hellos, and sends its signed result over the broker; the
bridge decides the results with the rules and appends them; once a final checkpoint after the decision is
recorded the miners send the `study.sample`, and once the sampled owner disclosed her contribution they run
the audit MPC and send their verdicts. Every wait is bounded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from carechain import envelope, market
from carechain.config import MinerConfig
from carechain.entries import event_entry
from carechain.identity import Identity
from carechain.receipts import event_digest
from carechain.sealed import DEFAULT_EPOCH_MS, epoch_of, split_wire
from chain_bridge.ledger.store import EventCandidate, Ledger
from chain_bridge.registry import ledger_path
from contract_rules import market as rules
from contract_rules import transactions as ce
from contract_rules.clock import attested_ms
from edge_agent.outbox import DataKey
from edge_agent.sealing import RecordOwner, new_epoch_key, reading_body, seal_reading, sign_epoch_key
from simulators.ports import listen_port_ranges
from tests.access_world import Miner, Party, now_ms, wait_for
from tests.live_world import LiveWorld, module_world

pytestmark = pytest.mark.integration

STUDY = "hr-live"
QUERY = {"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 220}
VALUES = [61, 72, 58]
CLOSES_IN_MS = 6_000  # contributions are open this long after the post
BAND_VALUES = [[60, 62, 64, 66, 68, 70], [80, 82, 84, 86, 88, 90]]  # bpm a minute, of the first two contributors


@dataclass
class MarketLive(LiveWorld):
    """LiveWorld with each miner aggregating on its own MPC port, a researcher and three contributing patients."""

    contributors: list[Party] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.researcher = Party.create(self.keys, "researcher")
        self.contributors = [Party.create(self.keys, f"contributor{i}") for i in range(len(VALUES))]
        # below the ephemeral ports: each study computation binds one port of its miner's range later on
        bases = listen_port_ranges(len(self.miners), MinerConfig().mpc_ports)
        self.mpc = {m.id: f"127.0.0.1:{base}" for m, base in zip(self.miners, bases, strict=True)}
        self._nonce = 0
        # Two contributors wear a heart-rate band each: their readings are what the audit recomputes.
        self.bands = [Identity.generate() for _ in BAND_VALUES]

    def register(self) -> None:
        super().register()
        ts = now_ms()
        self.register_parties(
            [ce.PartyRegistration(role="researcher", pk=self.researcher.identity.public_key, name="lab", ts=ts),
             *(ce.PartyRegistration(role="patient", pk=p.identity.public_key, name=f"p{i}", ts=ts,
                                    pre_pk=p.pre.public_key, pre_vk=p.pre.verifying_key)
               for i, p in enumerate(self.contributors))],
            list(zip(self.bands, self.contributors, strict=False)))
        self.prefill_bands()

    def miner_settings(self, miner: Miner) -> dict[str, Any]:
        return {"mpc_listen": self.mpc[miner.id], "mpc_timeout_s": 60}

    def prefill_bands(self) -> None:
        """Each band's sealed readings of the last half hour, one a minute, appended as the bridge's ingest
        would (with their ciphertexts), before the bridge runs."""
        start = now_ms() - 30 * 60_000
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            for band, owner, values in zip(self.bands, self.contributors, BAND_VALUES, strict=False):
                ledger.append_events(sealed_readings(band, owner, [start + 60_000 * i for i in range(len(values))],
                                                     values))
        finally:
            ledger.close()

    def nonce(self) -> int:
        self._nonce += 1
        return self._nonce

    def study(self, study_id: str = STUDY) -> dict[str, Any]:
        record = rules.study_record(self.state(), study_id)
        assert record is not None
        return record


world = module_world(MarketLive, "market-live")


def sealed_readings(band: Identity, owner: Party, timestamps: list[int], values: list[int]) -> list[EventCandidate]:
    """The band's protocol-2 events for one reading per timestamp, sealed with the agent's own code (an
    epoch_key event before the first reading of each epoch), as the bridge's ingest stores them."""
    record_owner = RecordOwner(owner.id, owner.pre.public_key)
    keys: dict[int, DataKey] = {}
    seq = 0
    out = []
    for ts, value in zip(timestamps, values, strict=True):
        epoch = epoch_of(ts, DEFAULT_EPOCH_MS)
        wires = []
        if epoch not in keys:
            keys[epoch] = key = new_epoch_key(band.device_id, epoch, DEFAULT_EPOCH_MS)
            seq += 1
            wires.append(sign_epoch_key(band, key, record_owner, ts)(seq))
        body = reading_body("heart_rate", {"bpm": value, "rr_intervals_1024": [1000, 1001]})
        seq += 1
        wires.append(seal_reading(band, keys[epoch], seq, ts, "heart_rate", body))
        for wire in wires:
            cose, ct = split_wire(wire)
            out.append(EventCandidate(band.device_id, envelope.parse(cose).payload["seq"], event_entry(cose).encode(),
                                      event_digest(cose), "heart_rate" if ct is not None else "epoch_key", version=2,
                                      ct=ct, epoch=epoch if ct is not None else None))
    return out


def post(w: MarketLive, study_id: str, closes_in_ms: int = CLOSES_IN_MS) -> int:
    """The researcher's study (aggregators drawn from the latest final checkpoint); its close (ms), counted from
    the attested time when that is ahead of the wall clock (the other test attests a close itself)."""
    w.wait_final(1)
    assert w.observer is not None
    closes_ms = max(now_ms(), attested_ms(w.state()) or 0) + closes_in_ms
    post = ce.StudyPost(study_id=study_id, query=ce.StudyQuery(**QUERY), from_ms=now_ms() - 86_400_000,
                        to_ms=now_ms(), filter=ce.CohortAttributes(), price_minor=0, max_contributors=5,
                        aggregator_fee_minor=0, epsilon_milli=0, aggregators=3,
                        seed_checkpoint=w.observer.latest_final(), closes_ms=closes_ms, ts=now_ms())
    w.submit([ce.study_post_entry(w.researcher.identity, post)])
    return closes_ms


def attest_after(w: MarketLive, closes_ms: int) -> None:
    """Wait for the close. Nothing else is appended meanwhile: the bridge itself attests the time once its clock
    passes the study's close (`Bridge.attest_deadlines`), or the miners would never start computing."""
    time.sleep(max(0.0, (closes_ms - now_ms()) / 1000) + 0.2)


def give(w: MarketLive, p: Party) -> int:
    """`p`'s consent to mean heart-rate studies in cohorts of at least 2, free; its leaf."""
    consent = ce.ConsentGive(kinds=["heart_rate"], queries=["mean"], min_cohort=2, price_minor=0, buyers=[],
                             expires_ms=now_ms() + 86_400_000, attributes=ce.CohortAttributes(), nonce=w.nonce(),
                             ts=now_ms())
    [index] = w.submit([ce.consent_give_entry(p.identity, consent)])
    return index


def post_and_contribute(w: MarketLive) -> tuple[int, list[int]]:
    """The researcher's study (aggregators drawn from the latest final checkpoint) and one contribution per
    patient, shares sealed to the aggregators; the study's close (ms) and the contribution leaves."""
    closes_ms = post(w, STUDY)
    study = w.study()
    assert sorted(study["aggregators"]) == sorted(m.id for m in w.miners)
    parties = w.state().table("parties")
    keys = [bytes(parties[a]["pk"]) for a in study["aggregators"]]
    query = market.Query.model_validate(QUERY)
    consents = [give(w, p) for p in w.contributors]
    leaves = []
    for p, consent, value in zip(w.contributors, consents, VALUES, strict=True):
        vector = market.contribution(query, value)
        rows = market.split_contribution(vector, len(keys))
        shares = [market.seal_share(k, market.encode_shares(row)) for k, row in zip(keys, rows, strict=True)]
        c = ce.StudyContribute(study_id=STUDY, consent=consent, commitment=market.commitment(vector, bytes(16)),
                               shares=shares, leaves=[0, 1], ts=now_ms())
        [index] = w.submit([ce.study_contribute_entry(p.identity, c)])
        leaves.append(index)
    return closes_ms, leaves


def test_the_miners_compute_the_study_by_themselves_once_its_contributions_are_closed_and_final(
        world: MarketLive) -> None:
    w = world
    closes_ms, leaves = post_and_contribute(w)
    assert w.study()["results"] == {}
    attest_after(w, closes_ms)

    wait_for("the miners to compute the study and the bridge to append a majority of results",
             lambda: w.study()["state"] != "open", context=w.logs)
    study = w.study()
    assert study["state"] == "answered", study
    assert study["decided"]["included"] == leaves
    assert study["decided"]["answer"] == {"sum": sum(VALUES), "n": len(VALUES)}  # no noise: the plain mean's sum
    assert set(study["decided"]["aggregators"]) <= set(study["aggregators"])
    for m in w.miners:  # each ran its own party, found the others through their signed hellos
        wait_for(f"miner {m.id} to log its result", lambda m=m: f"result of study {STUDY} computed and sent"  # type: ignore[misc]
                 in m.process.output(), context=w.logs)
        w.wait_job_done(m, "studies", f"result:{STUDY}")

    # Answered, but not audited: nobody may close (and pay) it yet. The miners draw its audit sample once a
    # final checkpoint after the decision is recorded (the next test follows the audit through).
    close = ce.study_close_entry(w.researcher.identity, ce.StudyClose(study_id=STUDY, ts=now_ms()))
    assert w.check(close) in ("audit_not_sampled", "audit_pending")  # pending: the sample just landed


def test_sampled_contributions_are_disclosed_audited_by_the_miners_and_the_study_closes_verified(
        world: MarketLive) -> None:
    """Contributions computed by the owners' CLI from their own sealed readings → the miners compute the result
    and sample it → the sampled owner discloses (`carechain study disclose`) → the miners run the audit MPC by
    themselves and post their verdicts (a majority "match") → `carechain study close` pays → `carechain verify
    study` checks it all from the ledger."""
    w = world
    study_id = "hr-audit"
    # The CLI's contributions take a few seconds each (more on a busy machine): the study stays open long enough,
    # and once they are in the operator attests its close (the other test leaves that to the bridge).
    closes_ms = post(w, study_id, closes_in_ms=30_000)
    owners = w.contributors[:len(BAND_VALUES)]
    for p in owners:
        done = w.cli_json("study", "contribute", study_id, "--consent", str(give(w, p)), "--key", str(p.key_file),
                          "--pre-key", str(p.pre_file))
        assert done["readings"] == len(BAND_VALUES[0]) and done["problems"] == 0, done
    w.submit([ce.clock_attest_entry(w.operator, closes_ms + 1)])
    wait_for("the miners to compute the study", lambda: w.study(study_id)["state"] != "open", context=w.logs)
    study = w.study(study_id)
    assert study["state"] == "answered", study
    means = [sum(v) // len(v) for v in BAND_VALUES]  # what each owner's agent computed: the plain mean
    assert study["decided"]["answer"]["n"] == 2
    assert abs(study["decided"]["answer"]["sum"] - sum(means)) <= 2, (study["decided"]["answer"], means)
    wait_for("the miners to send the audit sample", lambda: w.study(study_id)["audit"] is not None, context=w.logs)
    [sampled] = w.study(study_id)["audit"]["sample"]
    owner_id = w.state().table(rules.CONTRIBUTIONS)[str(sampled)]["owner"]
    owner = next(p for p in owners if p.id == owner_id)
    disclosed = w.cli_json("study", "disclose", study_id, "--key", str(owner.key_file), "--pre-key",
                           str(owner.pre_file))
    assert disclosed["contribution"] == sampled

    wait_for("the miners to audit the disclosed contribution",
             lambda: str(sampled) in w.study(study_id)["audit"]["outcome"], context=w.logs)
    audit = w.study(study_id)["audit"]
    assert audit["outcome"] == {str(sampled): "match"}, audit
    assert len(audit["verdicts"][str(sampled)]) >= 2  # a majority of the three aggregators

    closed = w.cli_json("study", "close", study_id, "--key", str(w.researcher.key_file))
    assert closed["state"] == "answered"
    study = w.study(study_id)
    assert study["closed_at"] is not None and study["audit"]["forfeited"] == []
    w.wait_final(study["closed_at"] + 1)  # the ledger's latest checkpoint covers the close
    report = w.cli_json("verify", "study", study_id, "--data-dir", str(w.bridge_dir))
    assert report["ok"], report
