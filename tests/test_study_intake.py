"""A study end to end from the ledger: the aggregators read the study and its contributions by replaying a real
ledger, compute by MPC in three real processes, and publish their signed `study.result` entries on their own
miner topics of a real broker; the bridge decides each with the contract rules and appends only what they
accept (real crypto, real ledger, real rules, real broker, real bridge)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from test_contracts_market import MarketWorld
from test_contracts_world import T0
from test_market_mpc import run_aggregators

from carechain import envelope, market, topics
from carechain.config import BridgeConfig
from carechain.entries import CLOCK_ATTEST, ENTRY_REGISTER, STUDY_RESULT, Entry, Registration
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.broker.acl import acl_text, aggregator_user, miner_user
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.reader import LedgerReader
from chain_bridge.ledger.store import Ledger
from chain_bridge.study_intake import MAX_RESULT_BYTES, StudyIntake
from chain_miner.aggregator import inputs_from_leaves, publish_entries
from contract_rules import market as rules
from contract_rules import transactions as ce
from contract_rules.replay import replay_leaves

if TYPE_CHECKING:
    from conftest import TestBroker

QUERY = {"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 220}
VALUES = [61, 72, 58, 90]


def study_world() -> tuple[MarketWorld, list[int], int]:
    """Study "hr-1" (a mean, 30..220 bpm) with four honest contributions of VALUES and one consistently
    shared huge field element; the honest leaves and the huge one's."""
    w = MarketWorld()
    assert w.post(query=QUERY, max_contributors=6) == "ok"
    keys = [a.public_key for a in w.aggregators()]
    query = market.Query.model_validate(QUERY)
    vectors = [market.contribution(query, v) for v in VALUES] + [[2**62] + [0] * (query.width - 1)]
    leaves = []
    for patient, vector in zip(w.patients, vectors, strict=False):
        result, consent = w.give(patient, queries=("mean",))
        assert result == "ok"
        rows = market.split_contribution(vector, len(keys))
        shares = [market.seal_share(k, market.encode_shares(row)) for k, row in zip(keys, rows, strict=True)]
        c = ce.StudyContribute(study_id="hr-1", consent=consent, commitment=market.commitment(vector, bytes(16)),
                               shares=shares, leaves=[0, 1], ts=T0)
        assert w.add(ce.study_contribute_entry(patient, c)) == "ok"
        leaves.append(w.last_index)
    assert w.finalize() == "ok"
    return w, leaves[:-1], leaves[-1]


def into_ledger(w: MarketWorld, path: Path) -> Ledger:
    ledger = Ledger(path)
    for index, entry in enumerate(w.entries):
        if entry.type == ENTRY_REGISTER:
            reg = Registration.model_validate(envelope.parse(entry.cose).payload)
            got = ledger.append_registrations([(entry, reg)])
        else:
            got = ledger.append_entries([entry])
        assert got == [index]
    return ledger


def run_study_from_ledger(tmp_path: Path, w: MarketWorld, ledger_path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """What the aggregators read from the ledger, and the three signed result entries they produced."""
    reader = LedgerReader(ledger_path)
    try:
        inputs = inputs_from_leaves(w.genesis, reader.leaves(0, reader.size()), "hr-1")
    finally:
        reader.close()
    for i, key in enumerate(w.aggregators()):
        key.save(tmp_path / f"aggregator{i}.key", overwrite=True)
    results = run_aggregators(tmp_path, inputs)
    return inputs, [bytes.fromhex(r["entry"]) for r in results]


def test_the_aggregators_read_the_study_and_its_sealed_shares_from_the_ledger(tmp_path: Path) -> None:
    w, honest, huge = study_world()
    ledger = into_ledger(w, tmp_path / "ledger.db")
    ledger.close()
    inputs, entries = run_study_from_ledger(tmp_path, w, tmp_path / "ledger.db")
    study = w.study("hr-1")
    assert inputs["study"]["aggregators"] == study["aggregators"] and inputs["study"]["query"] == QUERY
    table = w.state.table(rules.CONTRIBUTIONS)
    assert [c["leaf"] for c in inputs["contributions"]] == [*honest, huge]
    for c in inputs["contributions"]:
        assert c["shares"] == [bytes(s).hex() for s in table[str(c["leaf"])]["shares"]]
        assert c["min_cohort"] == 2
    payloads = [envelope.parse(Entry.decode(e).cose).payload for e in entries]
    assert all(p == payloads[0] for p in payloads)
    assert payloads[0]["valid"] == payloads[0]["included"] == honest and payloads[0]["invalid"] == 1
    assert payloads[0]["answer"] == {"sum": sum(VALUES), "n": len(VALUES)}


def test_results_published_over_the_broker_are_decided_by_the_rules_and_appended(
        tmp_path: Path, broker: TestBroker) -> None:
    w, honest, _ = study_world()
    ledger = into_ledger(w, tmp_path / "bridge" / "ledger.db")
    _, entries = run_study_from_ledger(tmp_path, w, ledger.path)
    aggregators = w.aggregators()
    outsider = next(m for m in w.miners if m.device_id not in w.study("hr-1")["aggregators"])
    forged = ce.study_result_entry(outsider, ce.StudyResult.model_validate(
        {**envelope.parse(Entry.decode(entries[0]).cose).payload}))
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.2)
    bridge = Bridge(cfg, broker.config, Identity.generate(), ledger, client_id=f"bridge-{tmp_path.name}",
                    contracts=ContractGate(w.genesis, w.operator))
    size = ledger.size
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"agg-{os.getpid()}")
    bridge.start()
    try:
        assert bridge.wait_ready(30)
        client.connect(broker.host, broker.port)
        client.loop_start()
        stats = bridge.stats.studies

        def settled(expected: int) -> None:
            deadline = time.monotonic() + 30
            while sum(stats.values()) < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(stats.values()) == expected, dict(stats)

        publish_entries(broker.config, aggregators[0].device_id, entries[0])
        publish = [(topics.miner_study(aggregators[0].device_id), entries[1]),  # another's entry on its topic
                   (topics.miner_study(outsider.device_id), forged.encode()),  # not the study's aggregator
                   (topics.miner_study(aggregators[2].device_id), b"\xff not an entry")]
        for topic, payload in publish:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        publish_entries(broker.config, aggregators[1].device_id, entries[1])
        settled(len(publish) + 2)
        assert stats["appended"] == 2 and stats["not_the_topics_miner"] == 1 and stats["bad_entry"] == 1
        assert stats["not_an_aggregator"] == 1
        publish_entries(broker.config, aggregators[2].device_id, entries[2])
        settled(len(publish) + 3)
        assert stats["study_already_decided"] == 1  # two of three equal results decided it
    finally:
        client.loop_stop()
        client.disconnect()
        bridge.stop()
    # The study's close lies in the past on the bridge's clock: it also attests the time (attest_deadlines).
    appended = [e for e in (Entry.decode(ledger.entry(i)) for i in range(size, ledger.size)) if e.type != CLOCK_ATTEST]
    assert [e.type for e in appended] == [STUDY_RESULT, STUDY_RESULT]
    assert {e.encode() for e in appended} == {entries[0], entries[1]}
    state = replay_leaves(w.genesis, (ledger.entry(i) for i in range(ledger.size))).state
    study = rules.study_record(state, "hr-1")
    assert study is not None and study["state"] == "answered"
    assert study["decided"]["included"] == honest and study["decided"]["invalid"] == 1
    ledger.close()


def test_the_intake_refuses_oversized_messages_and_a_full_queue_without_touching_the_ledger(tmp_path: Path) -> None:
    w, _, _ = study_world()
    ledger = into_ledger(w, tmp_path / "ledger.db")
    intake = StudyIntake()
    miner = w.aggregators()[0].device_id
    intake.submit(miner, b"\x00" * (MAX_RESULT_BYTES + 1))
    for _ in range(70):
        intake.submit(miner, b"\xff")
    assert intake.stats["too_large"] == 1 and intake.stats["dropped"] == 70 - 64
    size = ledger.size
    assert intake.drain(ledger, ContractGate(w.genesis, w.operator), threading.Lock()) == []
    assert intake.stats["bad_entry"] == 64 and ledger.size == size
    ledger.close()


def test_each_miner_and_its_aggregator_may_publish_only_on_its_own_study_topic() -> None:
    a, b = Identity.from_seed(b"\x0a" * 32).device_id, Identity.from_seed(b"\x0b" * 32).device_id
    text = acl_text("carechain-bridge", [], registry_version=1, revoked=0, miner_ids=[a, b])
    sections = {s.split("\n", 2)[1]: s for s in text.split("\n\n")
                if s.startswith(("# witness miner", "# data-market aggregator"))}
    assert f"topic write {topics.miner_study(a)}" in sections[f"user {aggregator_user(a)}"]
    assert topics.miner_study(b) not in sections[f"user {aggregator_user(a)}"]
    # the miner service's login writes its own study topic too (its trial entries as a labeller), never another's
    assert f"topic write {topics.miner_study(a)}" in sections[f"user {miner_user(a)}"]
    assert topics.miner_study(b) not in sections[f"user {miner_user(a)}"]
    assert f"topic read {topics.MINER_STUDY_WILDCARD}" in text.split("\n\n# bridge ingest")[0]
    assert topics.miner_of_topic(topics.miner_study(a)) == (a, "study")
