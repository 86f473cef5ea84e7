"""The trial contract: registration before enrolment, binding seed commitments with escrow, concealed enrolment
and dispensing, logged emergency unblinding, lock, reveals or recovery from escrow (and the void when the escrow
lies), outcomes anchored before the lock, and a certificate the rules accept only when it is the recomputed one.

Real signatures throughout (parties, the pharmacy terminal, the participants' wearables), a real final
checkpoint for the labeller draw, real sealed readings and sealed escrow shares.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from trial_world import DESIGN, ENROL_CLOSES, LOCK_AT, PROTOCOL_HASH, REVEAL_WINDOW, T0, TRIAL, TrialWorld, seed_of

from carechain import envelope
from carechain.events import PayloadError, TrialMeasure, make_payload, validate_payload
from carechain.trial_allocation import (
    Design,
    allocation_key,
    arm_of,
    block_of,
    released_key,
)
from contract_rules import Genesis, Runtime
from contract_rules import trial_entries as te
from contract_rules import trials as rules
from record_access import trials as client

DAY = 86_400_000


@pytest.fixture
def world() -> TrialWorld:
    return TrialWorld()


# -- registration and commitments ----------------------------------------------------------------------

def test_registration_draws_labellers_from_the_final_checkpoint_and_records_its_seed(world: TrialWorld) -> None:
    assert world.register() == "ok"
    trial = world.trial()
    assert len(trial["labellers"]) == 3 and set(trial["labellers"]) <= {m.device_id for m in world.miners}
    assert rules.committers(trial) == [world.sponsor.device_id, *trial["labellers"]]
    assert rules.threshold(trial) == 3
    assert trial["protocol_hash"] == PROTOCOL_HASH and trial["state"] == "registered"
    assert world.register() == "duplicate_trial"


@pytest.mark.parametrize(("change", "reason"), [
    ({"labellers": 6}, "not_enough_miners"),  # five miners
    ({"note": "not a note"}, "bad_seed_checkpoint"),
    ({"investigators": ["aaaaaaaaaaaaaaaa"]}, "unknown_investigator"),
    # Valid for allocation, but the pre-registered analysis compares a treatment and a control arm.
    ({"design": Design(arms=["a", "b", "c"], ratio=[1, 1, 2], block_sizes=[4], strata={})},
     "analysis_needs_two_arms"),
    # An unblinding of slot 1999 would have 1999 // 2 - 1999 // 256 + 1 = 993 candidate blocks: no answer holds them.
    ({"design": Design(arms=["t", "p"], ratio=[1, 1], block_sizes=[2, 256], strata={}), "max_participants": 2000},
     "unblinding_too_wide"),
])
def test_a_registration_the_rules_cannot_stand_behind_is_refused(world: TrialWorld, change: dict[str, Any],
                                                                 reason: str) -> None:
    assert world.register(**change) == reason


def test_enrolment_needs_the_registration_and_every_commitment(world: TrialWorld) -> None:
    patient = world.patients[0]
    assert world.enroll(patient, "f") == "unknown_trial"  # enrolment before registration is refused
    assert world.register() == "ok"
    assert world.enroll(patient, "f") == "commitments_missing"
    committers = world.committers()
    for c in committers[:-1]:
        assert world.commit(c) == "ok"
    assert world.enroll(patient, "f") == "commitments_missing"
    assert world.commit(committers[-1]) == "ok"
    assert world.enroll(patient, "f") == "ok"
    assert world.participant(patient)["label"] == f"{TRIAL}-0-0000"


def test_commitments_are_binding_a_committer_cannot_choose_its_seed_after_seeing_the_others(
        world: TrialWorld) -> None:
    assert world.register() == "ok"
    labellers = world.labellers()
    for c in labellers:
        assert world.commit(c) == "ok"
    assert world.commit(world.sponsor) == "ok"
    original = world.seeds[world.sponsor.device_id]
    # Having seen the labellers' commitments, the sponsor would like another seed: a second commit is refused ...
    assert world.commit(world.sponsor, seed=seed_of("sponsor", "second try")) == "already_committed"
    world.seeds[world.sponsor.device_id] = original
    assert world.enroll(world.patients[0], "f") == "ok"
    assert world.lock() == "ok"
    # ... and after the lock only the committed seed is accepted as its reveal.
    assert world.reveal(world.sponsor, seed=seed_of("sponsor", "second try")) == "reveal_does_not_match_commitment"
    assert world.reveal(world.sponsor) == "ok"
    assert world.reveal(world.sponsor) == "already_revealed"


def test_a_commit_by_a_party_not_drawn_or_with_the_wrong_escrow_holders_is_refused(world: TrialWorld) -> None:
    assert world.register() == "ok"
    outsider = next(m for m in world.miners if m.device_id not in world.trial()["labellers"])
    assert world.commit(outsider) == "not_a_committer"
    c = te.TrialCommit(trial_id=TRIAL, commitment="ab" * 32, escrow={world.sponsor.device_id: b"\x01" * 80}, ts=T0)
    assert world.send(world.labellers()[0], c) == "escrow_does_not_match_committers"


# -- enrolment, dispensing, withdrawal -----------------------------------------------------------------

def test_enrolment_checks_investigator_consent_stratum_and_time(world: TrialWorld) -> None:
    assert world.register() == "ok"
    world.commit_all()
    alice, bob = world.patients[:2]
    assert world.enroll(alice, "f", investigator=world.patients[3]) == "signer_not_allowed"
    assert world.enroll(alice, "x") == "bad_attributes"
    other_protocol = te.sign_consent(alice, TRIAL, "00" * 32)
    assert world.enroll(alice, "f", consent=other_protocol) == "bad_consent"
    assert world.enroll(alice, "f", consent=te.sign_consent(bob, TRIAL, PROTOCOL_HASH)) == "bad_consent"
    assert world.enroll(alice, "f") == "ok"
    assert world.enroll(alice, "f", investigator=world.investigators[1]) == "already_enrolled"
    assert world.enroll(bob, "f") == "ok"
    assert world.participant(bob)["position"] == 1 and world.participant(bob)["label"] == f"{TRIAL}-0-0001"
    assert world.attest(ENROL_CLOSES) == "ok"
    assert world.enroll(world.patients[2], "m") == "enrolment_closed"


def test_the_pharmacy_dispenses_the_labelled_kit_of_the_participant_once(world: TrialWorld) -> None:
    assert world.register() == "ok"
    world.commit_all()
    alice, bob = world.patients[:2]
    assert world.enroll(alice, "f") == "ok" and world.enroll(bob, "f") == "ok"
    assert world.dispense(alice, label=world.participant(bob)["label"]) == "wrong_kit"
    assert world.dispense(alice, terminal=world.terminal2) == "terminal_not_yours"  # pharmacy2's terminal
    assert world.dispense(world.patients[5], label=f"{TRIAL}-0-0002") == "not_enrolled"
    assert world.dispense(alice) == "ok"
    assert world.participant(alice)["dispensed"] == world.last_index
    assert world.dispense(alice) == "already_dispensed"
    sale = world.kit_sale(alice, world.participant(bob)["label"])
    d = te.TrialDispense(trial_id=TRIAL, participant=bob.device_id, event=sale, ts=T0)
    assert world.send(world.pharmacy, d) == "wrong_patient"


def test_a_withdrawn_participant_is_not_analysed_and_nobody_withdraws_after_the_lock(world: TrialWorld) -> None:
    world.run_to_lock(-6000)
    gone = world.patients[0]
    w = te.TrialWithdraw(trial_id=TRIAL, participant=gone.device_id, reason="moved_away", ts=LOCK_AT)
    assert world.send(gone, w) == "trial_locked"


def test_withdrawal_before_the_lock_excludes_her_outcome(world: TrialWorld) -> None:
    assert world.register() == "ok"
    world.commit_all()
    for i, p in enumerate(world.patients[:8]):
        assert world.enroll(p, "f" if i % 2 else "m") == "ok"
    gone = world.patients[0]
    w = te.TrialWithdraw(trial_id=TRIAL, participant=gone.device_id, reason="moved_away", ts=T0 + DAY)
    assert world.send(world.patients[1], w) == "not_the_participant_or_an_investigator"
    assert world.send(gone, w) == "ok"
    assert world.send(world.investigators[0], w) == "already_withdrawn"
    readings = {p.device_id: world.measure(p, 70_000, 70_000 + 100 * i) for i, p in enumerate(world.patients[:8])}
    assert world.lock() == "ok"
    world.reveal_all()
    assert world.outcome(gone, readings[gone.device_id]) == "withdrawn"
    values = {}
    for i, p in enumerate(world.patients[1:8], start=1):
        assert world.outcome(p, readings[p.device_id]) == "ok"
        values[p.device_id] = 100 * i
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    result = world.trial()["certificate"]["result"]
    assert result["n_treatment"] + result["n_control"] == 7


# -- outcomes and the certificate ----------------------------------------------------------------------

def test_a_real_effect_meets_the_endpoint_and_the_certificate_is_the_recomputed_one(world: TrialWorld) -> None:
    values = world.run_to_lock(-6000)
    assert world.certify_entry(values) is not None
    world.reveal_all()
    world.disclose_all(values)
    claimed = world.certify_entry(values)
    wrong = {**claimed.result.wire(), "effect": "-1.000"}
    assert world.send(world.sponsor, world.certify_entry(values, result=wrong)) == "result_mismatch"
    assert world.send(world.investigators[0], claimed) == "ok"
    cert = world.trial()["certificate"]
    assert cert["result"] == claimed.result.wire() and cert["result"]["met"] is True
    assert cert["allocation"] == {"sex=f": {"treatment": 4, "placebo": 4}, "sex=m": {"treatment": 4, "placebo": 4}}
    assert world.trial()["state"] == "certified"
    assert world.send(world.sponsor, claimed) == "already_certified"


def test_a_null_effect_does_not_meet_the_endpoint(world: TrialWorld) -> None:
    values = world.run_to_lock(0)
    world.reveal_all()
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    result = world.trial()["certificate"]["result"]
    assert result["met"] is False and Decimal(result["p_value"]) >= Decimal("0.05")
    assert Decimal(result["ci_low"]) < 0 < Decimal(result["ci_high"])


def test_allocation_is_balanced_in_every_stratum(world: TrialWorld) -> None:
    world.run_to_lock(0)
    arms = world.expected_arms()
    by_stratum = Counter((world.sex[pid], arm) for pid, arm in arms.items())
    assert by_stratum == {("f", "treatment"): 4, ("f", "placebo"): 4, ("m", "treatment"): 4, ("m", "placebo"): 4}


def test_an_outcome_anchored_after_the_lock_is_refused_and_not_counted(world: TrialWorld) -> None:
    values = world.run_to_lock(-6000)
    late = world.patients[0]
    reading = world.measure(late, 72_000, 60_000)  # anchored after the lock
    world.reveal_all()
    assert world.outcome(late, reading) == "reading_after_lock"
    # Claiming an earlier leaf does not help: the leaf named must be before the lock, and verify checks it is this
    # event (test_trial_check); claiming the lock leaf itself is refused here.
    assert world.outcome(late, reading, leaf=world.trial()["lock"]["at"]) == "reading_after_lock"
    del values[late.device_id]
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    result = world.trial()["certificate"]["result"]
    assert result["n_treatment"] + result["n_control"] == 15


def test_an_outcome_must_open_name_the_trial_and_come_from_her_device(world: TrialWorld) -> None:
    values = world.run_to_lock(-6000)
    alice, bob = world.patients[:2]
    assert world.outcome(alice, world.readings[alice.device_id], ct=world.readings[bob.device_id].ct) \
        == "ciphertext_mismatch"
    assert world.outcome(bob, world.readings[alice.device_id]) == "not_her_device"
    after_lock = world.measure(alice, 1, 2)
    assert world.outcome(alice, after_lock) == "reading_after_lock"
    assert world.outcome(alice, world.readings[alice.device_id]) == "ok"
    assert world.outcome(alice, world.readings[alice.device_id]) == "outcome_already_given"
    assert values


def test_outcomes_wait_for_the_lock_and_certificates_for_every_seed(world: TrialWorld) -> None:
    assert world.register() == "ok"
    world.commit_all()
    alice = world.patients[0]
    assert world.enroll(alice, "f") == "ok"
    reading = world.measure(alice, 72_000, 70_000)
    assert world.outcome(alice, reading) == "not_locked"
    assert world.lock(at=ENROL_CLOSES - 1) == "enrolment_open"
    assert world.lock() == "ok"
    assert world.reveal(world.sponsor) == "ok"
    c = te.TrialCertify(trial_id=TRIAL, result=te.TrialResult(
        n_treatment=0, n_control=0, mean_treatment="0", mean_control="0", effect="0", ci_low="0", ci_high="0",
        t="0", df=0, p_value="1", met=False), allocation={}, ts=LOCK_AT)
    assert world.send(world.sponsor, c) == "seeds_missing"


def test_a_trial_measure_is_sealed_only_and_v1_cannot_carry_it() -> None:
    body = TrialMeasure(trial_id=TRIAL, measure="resting_heart_rate", baseline=1, followup=2, unit_scale=1000)
    with pytest.raises(PayloadError, match="not carried by protocol version 1"):
        make_payload("a" * 16, 0, T0, "trial_measure", body)
    raw = {"v": 1, "dev": "a" * 16, "seq": 0, "ts": T0, "kind": "trial_measure", "body": body.model_dump()}
    with pytest.raises(PayloadError, match="needs protocol version 2"):
        validate_payload(raw)


# -- emergency unblinding ------------------------------------------------------------------------------

def test_emergency_unblinding_is_logged_and_releases_one_block_only(world: TrialWorld) -> None:
    assert world.register() == "ok"
    world.commit_all()
    for i, p in enumerate(world.patients[:8]):
        assert world.enroll(p, "f" if i % 2 else "m") == "ok"
    patient, investigator = world.patients[3], world.investigators[1]
    u = te.TrialUnblind(trial_id=TRIAL, participant=patient.device_id, reason="adverse_event", ts=T0 + 3 * DAY)
    assert world.send(patient, u) == "signer_not_allowed"
    assert world.send(investigator, u) == "ok"
    unblinding = world.last_index
    assert world.send(investigator, u) == "already_unblinded"
    record = world.trial()["unblindings"][str(unblinding)]
    assert record["participant"] == patient.device_id and record["investigator"] == investigator.device_id
    stratum, position = record["stratum"], record["position"]
    number = position // 4
    assert record["blocks"] == [number, number]  # one block size: her block, named by the rules
    # Each committer releases its keys of her block, sealed to the investigator (record_access.trials).
    for c in world.committers():
        k = client.answer_unblinding(c, world.trial(), unblinding, world.seeds[c.device_id],
                                     investigator.public_key, T0 + 3 * DAY)
        assert world.add(k) == "ok"
        assert world.add(k) == "already_answered"
    bogus = te.TrialUnblindKey(trial_id=TRIAL, unblinding=unblinding - 1, sealed=b"\x01" * 60, ts=T0)
    assert world.send(world.sponsor, bogus) == "unknown_unblinding"
    # The investigator opens every committer's answer and learns her arm: the one the full allocation gives.
    answers = client.unblind_answers(enumerate(e.encode() for e in world.entries), TRIAL, unblinding)
    opened = client.open_unblinding(investigator, world.trial(), unblinding, answers)
    checkpoint_seed = bytes.fromhex(world.trial()["checkpoint_seed"])
    full = allocation_key(world.seeds, checkpoint_seed, TRIAL)
    assert opened["arm"] == arm_of(full, DESIGN, stratum, position) and opened["block"] == number
    keys = {p: te.open_unblind_keys(investigator, sealed) for p, sealed in answers.items()}
    key = released_key(TRIAL, checkpoint_seed, stratum, number, {p: k.sizes_key for p, k in keys.items()},
                       {p: k.block_key(number) for p, k in keys.items()})
    assert arm_of(key, DESIGN, stratum, position) == opened["arm"]
    with pytest.raises(ValueError, match="was not released"):
        arm_of(key, DESIGN, stratum, position + 4)  # the next block (blocks of 4) stays concealed
    first_answer = next(envelope.parse(e.cose).payload["sealed"] for e in world.entries
                        if e.type == "trial.unblind_key")
    with pytest.raises(ValueError, match="do not open"):
        te.open_unblind_keys(world.investigators[0], first_answer)  # sealed to the other investigator


def test_with_two_block_sizes_the_unblinding_names_every_candidate_block_and_opens_the_real_one() -> None:
    world = TrialWorld()
    design = Design(arms=["treatment", "placebo"], ratio=[1, 1], block_sizes=[4, 6], strata={"sex": ["f", "m"]})
    assert world.register(design=design) == "ok"
    world.commit_all()
    for i, p in enumerate(world.patients):
        assert world.enroll(p, "f" if i % 2 else "m") == "ok"
    investigator = world.investigators[0]
    full = allocation_key(world.seeds, bytes.fromhex(world.trial()["checkpoint_seed"]), TRIAL)
    for patient, expected in ((world.patients[14], [1, 1]), (world.patients[9], [0, 1]),  # positions 7 and 4
                              (world.patients[0], [0, 0])):
        u = te.TrialUnblind(trial_id=TRIAL, participant=patient.device_id, reason="adverse_event", ts=T0 + DAY)
        assert world.send(investigator, u) == "ok"
        leaf = world.last_index
        record = world.trial()["unblindings"][str(leaf)]
        assert record["blocks"] == expected, record
        for c in world.committers():
            assert world.add(client.answer_unblinding(c, world.trial(), leaf, world.seeds[c.device_id],
                                                      investigator.public_key, T0 + DAY)) == "ok"
        answers = client.unblind_answers(enumerate(e.encode() for e in world.entries), TRIAL, leaf)
        opened = client.open_unblinding(investigator, world.trial(), leaf, answers)
        real = block_of(full, design, record["stratum"], record["position"])
        assert opened["arm"] == arm_of(full, design, record["stratum"], record["position"])
        assert (opened["block"], opened["first"], opened["size"]) == (real.number, real.first, real.size)
        assert expected[0] <= real.number <= expected[1]


# -- missing reveals: recovery from escrow, or the void ------------------------------------------------

def test_a_missing_reveal_is_recovered_from_escrow_and_the_fault_recorded(world: TrialWorld) -> None:
    values = world.run_to_lock(-6000)
    sponsor, *labellers = world.committers()
    silent = labellers[0]
    for c in [sponsor, *labellers[1:]]:
        assert world.reveal(c) == "ok"
    world.disclose_all(values)
    assert world.recover(sponsor, silent) == "reveal_window_open"
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    assert world.reveal(silent) == "reveal_window_over"
    holders = [c for c in world.committers() if c != silent]
    own = te.TrialRecover(trial_id=TRIAL, party=silent.device_id, x=1, y=te.share_bytes(1), ts=LOCK_AT)
    assert world.send(silent, own) == "not_a_holder"
    assert world.recover(holders[0], silent) == "ok"
    first_share = world.last_index
    assert world.recover(holders[0], silent) == "share_already_given"
    assert world.trial()["faults"] == [[first_share, silent.device_id, "trial_reveal_missing"]]
    assert world.recover(holders[1], silent) == "ok"
    assert silent.device_id not in world.trial()["seeds"]  # two shares: below the threshold of three
    assert world.recover(holders[2], silent) == "ok"
    assert world.trial()["seeds"][silent.device_id] == {"seed": world.seeds[silent.device_id].hex(),
                                                         "at": world.last_index, "how": "recovered"}
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    assert world.trial()["certificate"]["result"]["met"] is True


def test_escrow_shares_that_do_not_open_to_the_committed_seed_void_the_trial(world: TrialWorld) -> None:
    assert world.register() == "ok"
    sponsor, *labellers = world.committers()
    cheat = labellers[1]
    for c in world.committers():
        escrow_seed = seed_of("a different seed") if c is cheat else None
        assert world.commit(c, escrow_seed=escrow_seed) == "ok"
    assert world.enroll(world.patients[0], "f") == "ok"
    assert world.lock() == "ok"
    for c in world.committers():
        if c is not cheat:
            assert world.reveal(c) == "ok"
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    for holder in [c for c in world.committers() if c is not cheat][:3]:
        assert world.recover(holder, cheat) == "ok"
    trial = world.trial()
    assert trial["state"] == "void" and trial["void"]["party"] == cheat.device_id
    assert world.recover(world.committers()[-1] if world.committers()[-1] is not cheat else sponsor, cheat) \
        == "trial_void"
    cert = te.TrialCertify(trial_id=TRIAL, result=te.TrialResult(
        n_treatment=0, n_control=0, mean_treatment="0", mean_control="0", effect="0", ci_low="0", ci_high="0",
        t="0", df=0, p_value="1", met=False), allocation={}, ts=LOCK_AT)
    assert world.send(sponsor, cert) == "trial_void"


# -- ledgers from before trials ------------------------------------------------------------------------

def test_a_genesis_without_the_trials_contract_refuses_trial_entries() -> None:
    world = TrialWorld(4)
    contracts = {k: v for k, v in world.genesis.contracts.items() if k != "trials"}
    old = TrialWorld.__new__(TrialWorld)
    old.__dict__.update(world.__dict__)
    old.genesis = Genesis(operators=world.genesis.operators, allocations=world.genesis.allocations,
                          contracts=contracts)
    old.runtime = Runtime(old.genesis)
    replayed = [old.runtime.apply(e) for e in world.entries]
    assert replayed == ["ok"] * len(replayed)  # every entry before trials replays as it did
    old.entries = list(world.entries)
    assert old.register() == "contract_not_in_genesis"


def test_the_candidate_blocks_of_a_slot_are_exactly_one_with_one_block_size() -> None:
    one = Design(arms=["t", "p"], ratio=[1, 1], block_sizes=[4], strata={})
    two = Design(arms=["t", "p"], ratio=[1, 1], block_sizes=[4, 6], strata={})
    assert [te.candidate_blocks(one, p) for p in (0, 3, 4, 99)] == [range(0, 1), range(0, 1), range(1, 2),
                                                                    range(24, 25)]
    assert [te.candidate_blocks(two, p) for p in (0, 4, 7, 99)] == [range(0, 1), range(0, 2), range(1, 2),
                                                                    range(16, 25)]
    # Whatever the seeds, the block that holds a slot is among its candidates.
    for label in range(20):
        key = allocation_key({"s": seed_of("s", str(label))}, seed_of("checkpoint", str(label)), TRIAL)
        for position in range(0, 60, 7):
            assert block_of(key, two, "", position).number in te.candidate_blocks(two, position)
    with pytest.raises(ValueError, match="non-negative integer"):
        te.candidate_blocks(one, -1)
