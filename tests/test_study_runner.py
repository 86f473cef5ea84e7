"""What a miner's study runner decides to do, from the replayed contract state alone (`chain_miner.study_runner.due`),
and the shell's bookkeeping: jobs file, MPC peers from signed hellos, a signed sample sent over the broker hook.

Real rules, real signed entries and final checkpoints (tests/test_contracts_market.py's world); the MPC itself runs
in tests/test_market_live.py.
"""

from __future__ import annotations

import datetime
import json
import logging
import stat
from pathlib import Path

import pytest
from test_contracts_market import MarketWorld
from test_contracts_world import DAY, T0

from carechain import envelope
from carechain.config import BrokerConfig
from carechain.entries import STUDY_SAMPLE, Entry
from carechain.miner_messages import MinerHello, from_miner
from chain_miner.mpc_tls import MpcTls
from chain_miner.study_runner import JOBS_FILE, Job, StudyRunner, due, job_port_offset, note_size
from contract_rules import miners as miner_rules
from contract_rules import transactions as ce
from contract_rules.clock import attested_ms

ANSWER = {"sum": 210, "n": 3}


def record_final(w: MarketWorld) -> str:
    """A `checkpoint.final` covering every leaf so far, cosigned by a majority of the five miners; its note."""
    note = w.final_checkpoint()
    assert w.add(ce.signed(w.operator, ce.CHECKPOINT_FINAL, ce.CheckpointFinal(note=note))) == "ok"
    return note


def jobs(w: MarketWorld, me: str, note: str | None = None) -> list[tuple[str, str]]:
    return [(j.kind, j.study_id) for j in due(w.state, me, attested_ms(w.state), note)]


@pytest.fixture
def w() -> MarketWorld:
    return MarketWorld()


def closed_study(w: MarketWorld) -> list[int]:
    """"hr-1" with three contributions, contributions closed by the attested time; its contribution leaves."""
    leaves = w.open_study_with(3)
    assert w.attest(T0 + 7 * DAY) == "ok"
    return leaves


def test_the_result_is_due_for_each_aggregator_once_contributions_are_closed_and_final(w: MarketWorld) -> None:
    leaves = w.open_study_with(3)
    aggregators = [a.device_id for a in w.aggregators()]
    outsider = next(m.device_id for m in w.miners if m.device_id not in aggregators)
    record_final(w)
    assert jobs(w, aggregators[0]) == []  # still open for contributions by the attested time
    assert w.attest(T0 + 7 * DAY) == "ok"
    assert miner_rules.final_size(w.state) > max(leaves)
    for i, a in enumerate(aggregators):
        [job] = due(w.state, a, attested_ms(w.state), None)
        assert job == Job("result", "hr-1", i, tuple(aggregators))
        assert job.key == "result:hr-1"
    assert jobs(w, outsider) == []
    assert due(w.state, aggregators[0], None, None) == []  # no attested time: nothing time-bound is due


def test_no_result_is_due_while_a_contribution_is_not_final(w: MarketWorld) -> None:
    leaves = w.open_study_with(2)
    record_final(w)  # covers the first two contributions
    patient = w.patients[2]
    result, consent = w.give(patient)
    assert result == "ok" and w.contribute(patient, consent) == "ok"
    assert w.attest(T0 + 7 * DAY) == "ok"
    me = w.aggregators()[0].device_id
    assert miner_rules.final_size(w.state) > max(leaves)
    assert jobs(w, me) == []  # the rules would refuse it: contributions_not_final
    record_final(w)
    assert jobs(w, me) == [("result", "hr-1")]


def test_an_aggregator_that_posted_its_result_has_no_result_due(w: MarketWorld) -> None:
    leaves = closed_study(w)
    record_final(w)
    first, second, _ = w.aggregators()
    assert w.result(first, leaves, leaves, ANSWER) == "ok"
    assert jobs(w, first.device_id) == []
    assert jobs(w, second.device_id) == [("result", "hr-1")]


def decided(w: MarketWorld) -> list[int]:
    leaves = closed_study(w)
    record_final(w)
    first, second, _ = w.aggregators()
    assert w.result(first, leaves, leaves, ANSWER) == "ok"
    assert w.result(second, leaves, leaves, ANSWER) == "ok"
    assert w.study()["state"] == "answered"
    return leaves


def test_the_sample_is_due_only_on_a_final_checkpoint_recorded_after_the_decision(w: MarketWorld) -> None:
    decided(w)
    me = w.aggregators()[2].device_id
    stale = w.final_checkpoint(size=w.study()["decided"]["at"])  # before the decision
    assert jobs(w, me, None) == []
    assert jobs(w, me, stale) == []  # the latest recorded final checkpoint is before the decision
    note = record_final(w)
    assert note_size(note) == miner_rules.final_size(w.state)
    assert jobs(w, me, note) == [("sample", "hr-1")]  # every aggregator, not only the first: the rules take one
    assert jobs(w, w.aggregators()[0].device_id, note) == [("sample", "hr-1")]
    assert jobs(w, me, stale) == []  # only the latest recorded note qualifies
    sample = ce.StudySample(study_id="hr-1", seed_checkpoint=note, ts=T0 + 7 * DAY)
    assert w.add(ce.signed(w.aggregators()[0], ce.STUDY_SAMPLE, sample)) == "ok"
    assert w.study()["audit"] is not None
    assert jobs(w, me, note) == []  # sampled once


def test_the_audit_is_due_when_the_whole_sample_is_disclosed_until_each_aggregator_judged_it(w: MarketWorld) -> None:
    decided(w)
    note = record_final(w)
    assert w.add(ce.signed(w.aggregators()[0], ce.STUDY_SAMPLE,
                           ce.StudySample(study_id="hr-1", seed_checkpoint=note, ts=T0 + 7 * DAY))) == "ok"
    audit = w.study()["audit"]
    me = w.aggregators()[1].device_id
    assert audit["sample"] and jobs(w, me) == []  # nothing disclosed yet
    # The disclosures and verdicts as the rules record them (their own tests check how they get there).
    state = w.state
    study = w.study()
    disclosed = {str(i): 1000 + i for i in audit["sample"]}
    now = attested_ms(state)
    assert now is not None
    with_disclosures = {**study, "audit": {**audit, "disclosed": disclosed}}
    state.tables["studies"]["hr-1"] = with_disclosures
    [job] = due(state, me, now, note)
    assert (job.kind, job.contributions) == ("audit", tuple(audit["sample"]))
    assert job.key == "audit:hr-1:" + ",".join(map(str, audit["sample"]))
    assert due(state, me, audit["window_ends_ms"], note) == []  # the window is over: a verdict would be refused
    judged = {str(i): {me: "match"} for i in audit["sample"]}
    state.tables["studies"]["hr-1"] = {**study, "audit": {**audit, "disclosed": disclosed, "verdicts": judged}}
    assert due(state, me, now, note) == []
    assert [j.kind for j in due(state, w.aggregators()[0].device_id, now, note)] == ["audit"]


def test_the_runner_sends_one_signed_sample_and_remembers_it_across_restarts(w: MarketWorld, tmp_path: Path) -> None:
    decided(w)
    note = record_final(w)
    me = w.aggregators()[0]
    sent: list[tuple[str, bytes]] = []

    def runner() -> StudyRunner:
        return StudyRunner(tmp_path, me, tmp_path / "miner.key", "127.0.0.1:1", BrokerConfig(), lambda: w.state,
                           w.genesis, lambda: None, publish=lambda _b, miner, entry: sent.append((miner, entry)))

    first = runner()
    first.start()
    try:
        # The service hands it the cosigned entries: the checkpoint.final among them is the sample's seed.
        assert [j.kind for j in first.after_cosign([e.encode() for e in w.entries])] == ["sample"]
        assert first.after_cosign([]) == []  # queued already
    finally:
        first.stop()  # after the queued job
    [(miner, raw)] = sent
    entry = Entry.decode(raw)
    assert miner == me.device_id and entry.type == STUDY_SAMPLE
    parsed = envelope.parse(entry.cose)
    assert parsed.kid == me.device_id and parsed.payload["seed_checkpoint"] == note
    assert w.add(entry) == "ok"  # the rules take it as it was sent
    jobs_file = tmp_path / "studies" / JOBS_FILE
    assert stat.S_IMODE(jobs_file.stat().st_mode) == 0o600
    assert json.loads(jobs_file.read_text())["done"] == ["sample:hr-1"]
    again = runner()  # a restart: the note and the done job come back from the jobs file
    assert again.latest_final_note == note and again.done() == {"sample:hr-1"}


def test_mpc_peers_come_from_signed_hellos_and_a_hello_without_mpc_still_verifies(w: MarketWorld) -> None:
    miner = w.miners[0]
    old = MinerHello(miner=miner.device_id, name="carechain.miner/x", public_key=miner.public_key.hex(), ts=1)
    signed_old = old.signed(miner)
    assert "mpc" not in json.loads(signed_old.model_dump_json(exclude_none=True))
    assert from_miner(MinerHello.model_validate_json(signed_old.model_dump_json(exclude={"mpc"})), miner.device_id)
    hello = old.model_copy(update={"mpc": "10.0.0.7:7001"}).signed(miner)
    assert from_miner(hello, miner.device_id)
    moved = hello.model_copy(update={"mpc": "10.6.6.6:7001"})  # somebody else's address under the miner's signature
    assert not from_miner(moved, miner.device_id)
    with pytest.raises(ValueError):
        MinerHello(miner=miner.device_id, name="n", public_key=miner.public_key.hex(), ts=1, mpc="no port")


def test_each_study_computation_listens_on_its_own_port_the_same_on_every_aggregator(w: MarketWorld,
                                                                                      tmp_path: Path) -> None:
    """Parties of two studies never meet on one port: an aggregator still computing one study refuses a
    connection meant for another instead of taking it into the running computation."""
    decided(w)
    aggregators = w.aggregators()
    ids = tuple(a.device_id for a in aggregators)
    result = Job("result", "hr-1", 0, ids, [])
    others = {job_port_offset(Job("result", f"study-{i}", 0, ids, []), 64) for i in range(40)}
    assert len(others) > 20 and all(0 <= o < 64 for o in others)  # studies spread over the ports
    runner = StudyRunner(tmp_path, aggregators[0], tmp_path / "miner.key", "127.0.0.1:7000", BrokerConfig(),
                         lambda: w.state, w.genesis, lambda: None)
    cert = [MpcTls.generate().cert_pem for _ in range(2)]
    runner.on_hello(ids[1], "10.0.0.2:9000", cert[0])
    runner.on_hello(ids[2], "10.0.0.3:65530", cert[1])
    offset = job_port_offset(result, 64)
    mine = runner.tls.cert_pem
    if 65530 + offset > 65_535:
        assert runner._peers(result) is None  # refused with a clear log, never wrapped around
    else:
        assert runner._peers(result) == ([f"127.0.0.1:{7000 + offset}", f"10.0.0.2:{9000 + offset}",
                                          f"10.0.0.3:{65530 + offset}"], [mine, *cert])
    runner.on_hello(ids[2], "10.0.0.3:9100", cert[1])
    assert runner._peers(result) == ([f"127.0.0.1:{7000 + offset}", f"10.0.0.2:{9000 + offset}",
                                      f"10.0.0.3:{9100 + offset}"], [mine, *cert])


def test_no_computation_runs_in_the_clear_unless_told_for_a_rolling_upgrade(
        w: MarketWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A miner that predates MPC over TLS (its hello carries no certificate) makes the job fail loudly rather
    than run with shares in the clear — unless miner.mpc_plaintext_with_older_peers says so, for a rolling
    upgrade; a certificate that cannot serve is refused either way."""
    decided(w)
    aggregators = w.aggregators()
    ids = tuple(a.device_id for a in aggregators)
    result = Job("result", "hr-1", 0, ids, [])
    runner = StudyRunner(tmp_path, aggregators[0], tmp_path / "miner.key", "127.0.0.1:7000", BrokerConfig(),
                         lambda: w.state, w.genesis, lambda: None)
    runner.on_hello(ids[1], "10.0.0.2:9000", MpcTls.generate().cert_pem)
    runner.on_hello(ids[2], "10.0.0.3:9000", None)
    with caplog.at_level(logging.ERROR, logger="carechain.miner"):
        assert runner._peers(result) is None
    assert f"the hello of aggregator(s) {ids[2]} carries no MPC certificate" in caplog.text
    # during a rolling upgrade, and only when told: in the clear with the older miner, loudly
    runner.plaintext_with_older_peers = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="carechain.miner"):
        found = runner._peers(result)
    assert found is not None and found[1] is None and len(found[0]) == 3
    assert "IN THE CLEAR" in caplog.text and ids[2] in caplog.text
    runner.on_hello(ids[2], "10.0.0.3:9000", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="carechain.miner"):
        assert runner._peers(result) is None  # a broken certificate is no older miner: refused all the same
    assert "does not parse" in caplog.text
    # the miner's own certificate is kept in its data dir, the key 0600, and is the same after a restart
    again = StudyRunner(tmp_path, aggregators[0], tmp_path / "miner.key", "127.0.0.1:7000", BrokerConfig(),
                        lambda: w.state, w.genesis, lambda: None)
    assert again.tls == runner.tls
    assert stat.S_IMODE((tmp_path / "mpc-tls.key").stat().st_mode) == 0o600


def test_a_hello_signs_its_mpc_certificate(w: MarketWorld) -> None:
    miner = w.miners[0]
    cert = MpcTls.generate().cert_pem
    hello = MinerHello(miner=miner.device_id, name="n", public_key=miner.public_key.hex(), ts=1,
                       mpc="10.0.0.7:7001", mpc_cert=cert).signed(miner)
    assert from_miner(MinerHello.model_validate_json(hello.model_dump_json()), miner.device_id)
    swapped = hello.model_copy(update={"mpc_cert": MpcTls.generate().cert_pem})  # a certificate of somebody else's
    assert not from_miner(swapped, miner.device_id)
    stripped = hello.model_copy(update={"mpc_cert": None})
    assert not from_miner(stripped, miner.device_id)


def test_a_long_running_miner_renews_its_mpc_certificate_before_it_ends(w: MarketWorld, tmp_path: Path) -> None:
    me = w.miners[0]
    runner = StudyRunner(tmp_path, me, tmp_path / "miner.key", "127.0.0.1:7000", BrokerConfig(),
                         lambda: w.state, w.genesis, lambda: None)
    first = runner.tls
    assert not runner.renew_tls()  # a fresh certificate is kept
    later = first.expires - datetime.timedelta(days=10)
    assert runner.renew_tls(later)
    assert runner.tls != first and runner.tls.expires - later > datetime.timedelta(days=300)
    assert runner.peers[me.device_id] == ("127.0.0.1:7000", runner.tls.cert_pem)
    assert (tmp_path / "mpc-tls.crt").read_text() == runner.tls.cert_pem  # and kept for the next start


def test_a_miner_that_renewed_its_certificate_announces_it_in_a_new_signed_hello(w: MarketWorld,
                                                                                 tmp_path: Path) -> None:
    from chain_miner.service import WitnessMiner

    me = w.miners[0]
    # any log key: no cosigning here
    miner = WitnessMiner(tmp_path / "miner", BrokerConfig(), w.operator.public_key, me)
    miner.studies = StudyRunner(tmp_path / "miner", me, tmp_path / "miner.key", "127.0.0.1:7000", BrokerConfig(),
                                lambda: w.state, w.genesis, lambda: None)
    old = MpcTls.load_or_create(tmp_path / "old", datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=350))
    miner.studies.tls = old  # one that ends within the renewal window, as after most of a year of running
    miner._study_jobs([])  # what the miner does after each cosignature
    hello = MinerHello.model_validate_json(miner._hello_json)
    assert miner._hello_due.is_set()  # published by the worker at its next turn
    assert hello.mpc_cert == miner.studies.tls.cert_pem != old.cert_pem and from_miner(hello, me.device_id)
    miner._hello_due.clear()
    miner._study_jobs([])  # nothing more to renew: no new hello
    assert not miner._hello_due.is_set()
