"""A requester anywhere files evidence against a miner over MQTT: the bridge decides it with the contracts and
appends only what they accept (a real ledger, the real rules, real signatures)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_contracts_world import T0
from test_record_server import Deployment, build

from carechain import access
from chain_bridge.contract_gate import ContractGate
from chain_bridge.evidence_intake import MAX_FAULT_BYTES, EvidenceIntake
from contract_rules import transactions as ce
from contract_rules.replay import replay_leaves


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = build(tmp_path / "ledger.db")
    yield d
    d.ledger.close()


def miner_message(d: Deployment, miner_id: str, cfrag: bytes) -> bytes:
    """What the grant's miner `miner_id` signs: one fragment per granted epoch (here all `cfrag`)."""
    miner = next(m for m in d.world.miners if m.device_id == miner_id)
    record = d.world.runtime.state.table("access")[str(d.grant)]
    dev = d.world.band.device_id
    epochs = sorted({int(k.split(":")[1]) for k in d.world.runtime.state.table("epochs") if k.startswith(dev)})
    proof = access.GrantProof(size=d.ledger.size, path=[], checkpoint=d.world.final_checkpoint())
    assert miner_id in record["miners"]
    return access.sign_capsule_fragments(miner, d.grant, [(dev, epochs[0], cfrag)], proof)


def fault(d: Deployment, message: bytes) -> bytes:
    return ce.access_fault_entry(d.world.doctor, ce.AccessFault(grant_index=d.grant, message=message,
                                                                ts=T0 + 5)).encode()


def test_a_fault_the_rules_accept_is_appended_and_counted_against_the_miner(deployment: Deployment) -> None:
    d = deployment
    liar = d.world.runtime.state.table("access")[str(d.grant)]["miners"][0]
    gate = ContractGate(d.world.genesis, d.world.operator)
    intake = EvidenceIntake()
    intake.submit(fault(d, miner_message(d, liar, os.urandom(120))))
    intake.submit(b"\xff not an entry")
    [index] = intake.drain(d.ledger, gate, threading.Lock())
    assert index == d.ledger.size - 1 and intake.stats["appended"] == 1 and intake.stats["bad_entry"] == 1
    state = replay_leaves(d.world.genesis, d.ledger.leaves()).state
    assert state.table("access_faults") == {liar: 1}

    intake.submit(fault(d, miner_message(d, liar, os.urandom(120))))  # the same miner, another bad message
    size = d.ledger.size
    assert len(intake.drain(d.ledger, gate, threading.Lock())) == 1 and d.ledger.size == size + 1


def test_evidence_the_rules_refuse_never_reaches_the_ledger(deployment: Deployment) -> None:
    d = deployment
    gate = ContractGate(d.world.genesis, d.world.operator)
    intake = EvidenceIntake()
    chosen = d.world.runtime.state.table("access")[str(d.grant)]["miners"]
    good = fault(d, miner_message(d, chosen[1], os.urandom(120)))
    intake.submit(good)
    intake.submit(good)  # the same evidence twice counts once
    size = d.ledger.size
    assert len(intake.drain(d.ledger, gate, threading.Lock())) == 1 and d.ledger.size == size + 1
    refusals = {k: v for k, v in intake.stats.items() if k != "appended"}
    assert sum(refusals.values()) == 1, refusals
    intake.submit(b"\x00" * (MAX_FAULT_BYTES + 1))
    assert intake.stats["too_large"] == 1 and intake.drain(d.ledger, gate, threading.Lock()) == []
    assert d.ledger.size == size + 1
