"""`verify_trial`: an outside reviewer's recomputation of a trial from the ledger alone — commitments, reveals or
recovery, allocation and balance, outcomes anchored before the lock, concealment, and the certificate.

The logs are produced by the real runtime from really signed entries (tests/trial_world.py). Where a check must
catch what honest rules would never accept, the log is produced by a miner running altered rule code (pinned by
its hash in the genesis, as a deployed ledger pins code): verification must not trust the rules' records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trial_world import DESIGN, LOCK_AT, REVEAL_WINDOW, TRIAL, TrialWorld, seed_of

from carechain import merkle
from carechain.checkpoint import Checkpoint
from carechain.identity import Identity
from carechain.trial_allocation import Design, allocation_key, block_of
from contract_rules import builtin_hashes, load_rule_source
from contract_rules import trial_entries as te
from contract_rules import trials as rules
from contract_rules.runtime import CodeBook
from contract_rules.trial_check import CHECKS, TrialReport, verify_trial
from record_access import trials as client


def checkpoint_of(leaves: list[bytes]) -> Checkpoint:
    frontier = merkle.extend_frontier(0, (), [merkle.leaf_hash(leaf) for leaf in leaves])
    return Checkpoint("carechain.log/test", len(leaves), merkle.frontier_root(frontier))


def verify(world: TrialWorld, trial_id: str = TRIAL) -> TrialReport:
    leaves = [e.encode() for e in world.entries]
    code = getattr(world, "code", None)
    return verify_trial(leaves, world.genesis, trial_id, checkpoint_of(leaves), code)


def finding(report: TrialReport, check: str) -> tuple[bool, str]:
    found = [f for f in report.findings if f.check == check]
    assert len(found) == 1, report.as_dict()
    return found[0].ok, found[0].detail


def certified(world: TrialWorld, effect: int) -> dict[str, int]:
    values = world.run_to_lock(effect)
    world.reveal_all()
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    return values


def altered_world(old: str, new: str) -> TrialWorld:
    """A world whose trials contract is the builtin source with `old` replaced by `new` (a dishonest miner's)."""
    source = Path(rules.__file__).read_text()
    assert old in source
    module = load_rule_source(source.replace(old, new).encode(), "trials_altered.py")
    code = CodeBook.builtin()
    code.add(module)
    world = TrialWorld(contracts={**builtin_hashes(), "trials": module.code_hash}, code=code)
    world.code = code  # type: ignore[attr-defined]
    return world


def test_an_honest_trial_verifies_and_reproduces_its_certificate_exactly() -> None:
    world = TrialWorld()
    certified(world, -6000)
    report = verify(world)
    assert report.ok, report.as_dict()
    assert [f.check for f in report.findings] == list(CHECKS)
    assert report.state == "certified"
    assert report.certificate is not None and report.recomputed is not None
    assert report.recomputed["result"] == report.certificate["result"] == world.trial()["certificate"]["result"]
    assert report.certificate["result"]["met"] is True
    assert report.recomputed["arms"] == world.expected_arms()
    assert "endpoint met" in finding(report, "analysis")[1]


def test_a_null_effect_trial_verifies_and_does_not_meet_its_endpoint() -> None:
    world = TrialWorld()
    certified(world, 0)
    report = verify(world)
    assert report.ok and report.certificate is not None and report.certificate["result"]["met"] is False
    assert "endpoint not met" in finding(report, "analysis")[1]


def test_a_tampered_reveal_is_detected_even_when_a_dishonest_contract_accepted_it() -> None:
    world = TrialWorld()
    world.run_to_lock(-6000)
    assert world.reveal(world.sponsor, seed=seed_of("sponsor", "tampered")) == "reveal_does_not_match_commitment"
    ok, detail = finding(verify(world), "reveals")
    assert ok and "refused reveals" in detail and "reveal_does_not_match_commitment" in detail

    world = altered_world('if not alloc.check_reveal(r.trial_id, tx.signer, r.seed, '
                          'trial["commitments"][tx.signer]["commitment"]):', "if False:")
    world.run_to_lock(-6000)
    assert world.reveal(world.sponsor, seed=seed_of("sponsor", "tampered")) == "ok"  # the altered rules took it
    ok, detail = finding(verify(world), "reveals")
    assert not ok and f"the reveal of {world.sponsor.device_id} does not match its commitment" in detail


def test_a_certificate_the_outcomes_do_not_give_is_detected() -> None:
    world = altered_world('if c.result.wire() != result:', "if False:")
    values = world.run_to_lock(-6000)
    world.reveal_all()
    world.disclose_all(values)
    claimed = world.certify_entry(values)
    forged = {**claimed.result.wire(), "effect": "-9999.000", "met": True}
    assert world.send(world.sponsor, world.certify_entry(values, result=forged)) == "ok"
    report = verify(world)
    ok, detail = finding(report, "analysis")
    assert not ok and "-9999.000" in detail and not report.ok


def test_an_outcome_read_after_the_lock_is_excluded_and_flagged() -> None:
    world = TrialWorld()
    values = world.run_to_lock(-6000)
    late = world.patients[2]
    reading = world.measure(late, 72_000, 50_000)
    world.reveal_all()
    assert world.outcome(late, reading) == "reading_after_lock"
    del values[late.device_id]
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    report = verify(world)
    assert report.ok, report.as_dict()
    assert report.excluded == [{"participant": late.device_id, "leaf": reading.leaf,
                                "refused_at": report.excluded[0]["refused_at"]}]
    assert f"excluded as read after the lock: ['{late.device_id}']" in finding(report, "outcomes")[1]


def test_an_outcome_naming_an_earlier_leaf_than_its_reading_is_refused() -> None:
    """The runtime records the leaf of every trial_measure, so a reading anchored after the lock cannot be
    passed off under an earlier leaf."""
    world = TrialWorld()
    world.run_to_lock(-6000)
    liar = world.patients[1]
    late = world.measure(liar, 72_000, 40_000)  # after the lock ...
    world.reveal_all()
    assert world.outcome(liar, late, leaf=world.readings[liar.device_id].leaf) == "not_the_anchored_reading"


def unblinded_trial(world: TrialWorld, design: Design, patient_index: int, n: int = 8
                    ) -> tuple[Identity, dict[str, int]]:
    """Register `design`, enrol `n` patients (alternating sex) and log the emergency unblinding of one of them
    (keys answered by every committer); their readings are anchored. The unblinded patient and the outcomes."""
    assert world.register(design=design) == "ok"
    world.commit_all()
    for i, p in enumerate(world.patients[:n]):
        assert world.enroll(p, "f" if i % 2 else "m") == "ok"
    patient, investigator = world.patients[patient_index], world.investigators[0]
    u = te.TrialUnblind(trial_id=TRIAL, participant=patient.device_id, reason="adverse_event", ts=LOCK_AT - 1)
    assert world.send(investigator, u) == "ok"
    leaf = world.last_index
    for c in world.committers():
        assert world.add(client.answer_unblinding(c, world.trial(), leaf, world.seeds[c.device_id],
                                                  investigator.public_key, LOCK_AT - 1)) == "ok"
    values = {}
    world.readings = {}
    for i, p in enumerate(world.patients[:n]):
        world.readings[p.device_id] = world.measure(p, 70_000, 70_000 + (i % 3) * 500)
        values[p.device_id] = (i % 3) * 500
    return patient, values


def certify(world: TrialWorld, values: dict[str, int]) -> None:
    assert world.lock() == "ok"
    world.reveal_all()
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"


def test_emergency_unblinding_is_listed_with_the_block_it_revealed() -> None:
    world = TrialWorld()
    patient, values = unblinded_trial(world, DESIGN, 5)  # position 2 of the women: block 0 (blocks of 4)
    report = verify(world)
    assert report.ok, report.as_dict()
    [before] = report.unblinded
    assert before["participant"] == patient.device_id and "block" not in before and before["blocks"] == [0, 0]
    assert before["revealed"] == [0, 3] and before["revealed_exact"] is False  # one size: the bound is exact too
    certify(world, values)
    report = verify(world)
    assert report.ok, report.as_dict()
    [listed] = report.unblinded
    slot = world.participant(patient)
    assert listed["first"] <= slot["position"] < listed["first"] + listed["size"] and listed["size"] == 4
    assert listed["revealed"] == [0, 3] and listed["revealed_exact"] is True
    women = [p.device_id for p in world.patients[1:8:2]]  # positions 0–3 of the women: her whole block
    assert listed["revealed_participants"] == sorted(women)
    certificate = world.trial()["certificate"]["unblinded"][0]
    assert (certificate["block"], certificate["blocks"], certificate["revealed"]) == (listed["block"], [0, 0], [0, 3])
    detail = finding(report, "concealment")[1]
    assert f"logged emergency unblindings: {patient.device_id}" in detail
    assert f"{world.investigators[0].device_id} may learn the arms of sex=f stratum's positions 0–3" in detail


def test_with_two_block_sizes_every_slot_of_every_candidate_block_is_listed_as_possibly_revealed() -> None:
    world = TrialWorld()
    design = Design(arms=["treatment", "placebo"], ratio=[1, 1], block_sizes=[4, 6], strata={"sex": ["f", "m"]})
    patient, values = unblinded_trial(world, design, 9, n=10)  # position 4 of the women: block 0 (of 6) or 1
    report = verify(world)
    assert report.ok, report.as_dict()
    [before] = report.unblinded
    assert before["blocks"] == [0, 1] and before["revealed"] == [0, 11] and before["revealed_exact"] is False
    certify(world, values)
    report = verify(world)
    assert report.ok, report.as_dict()
    [listed] = report.unblinded
    key = allocation_key(world.seeds, bytes.fromhex(world.trial()["checkpoint_seed"]), TRIAL)
    block0 = block_of(key, design, "sex=f", 0)
    block1 = block_of(key, design, "sex=f", block0.size)
    assert listed["blocks"] == [0, 1] and listed["revealed"] == [0, block0.size + block1.size - 1]
    assert listed["block"] == block_of(key, design, "sex=f", 4).number
    assert listed["revealed_participants"] == sorted(p.device_id for p in world.patients[1:10:2])  # the 5 women
    assert world.trial()["certificate"]["unblinded"][0]["revealed"] == listed["revealed"]


def test_a_seed_on_the_log_before_the_lock_fails_concealment_even_if_refused() -> None:
    world = TrialWorld()
    assert world.register() == "ok"
    world.commit_all()
    assert world.enroll(world.patients[0], "f") == "ok"
    labeller = world.labellers()[0]
    assert world.reveal(labeller) == "not_locked"  # refused, but the seed is now public
    ok, detail = finding(verify(world), "concealment")
    assert not ok and f"a trial.reveal by {labeller.device_id} before the lock (not_locked)" in detail


def test_a_recovered_seed_verifies_and_a_lying_escrow_is_reported_void() -> None:
    world = TrialWorld()
    values = world.run_to_lock(-6000)
    sponsor, silent, *others = world.committers()
    for c in [sponsor, *others]:
        assert world.reveal(c) == "ok"
    world.disclose_all(values)
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    for holder in [sponsor, *others]:
        assert world.recover(holder, silent) == "ok"
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    report = verify(world)
    assert report.ok, report.as_dict()
    assert f"{silent.device_id} recovered from 3 escrow shares" in finding(report, "reveals")[1]

    world = TrialWorld()
    assert world.register() == "ok"
    cheat = world.labellers()[0]
    for c in world.committers():
        assert world.commit(c, escrow_seed=seed_of("other") if c is cheat else None) == "ok"
    assert world.lock() == "ok"
    for c in world.committers():
        if c is not cheat:
            assert world.reveal(c) == "ok"
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    for holder in [c for c in world.committers() if c is not cheat]:
        assert world.recover(holder, cheat) == "ok"
    report = verify(world)
    assert report.state == "void"
    ok, detail = finding(report, "reveals")
    assert ok and f"the escrow of {cheat.device_id} recovers a seed that fails its commitment" in detail


def test_without_a_checkpoint_or_with_altered_leaves_the_trial_is_not_anchored() -> None:
    world = TrialWorld(4)
    values = world.run_to_lock(-6000, n=4)
    assert values
    leaves = [e.encode() for e in world.entries]
    report = verify_trial(leaves, world.genesis, TRIAL)
    assert finding(report, "anchored") == (False, "no checkpoint given: nothing to check the trial's inclusion "
                                                  "against")
    stale = checkpoint_of(leaves[:-1])
    ok, detail = finding(verify_trial(leaves, world.genesis, TRIAL, stale), "anchored")
    assert not ok and "beyond the checkpoint" in detail
    other = Checkpoint("carechain.log/test", len(leaves), bytes(32))
    ok, detail = finding(verify_trial(leaves, world.genesis, TRIAL, other), "anchored")
    assert not ok and "do not hash to the checkpoint's root" in detail


def test_an_unknown_trial_is_reported_not_registered() -> None:
    world = TrialWorld(4)
    report = verify(world, "nope")
    assert not report.ok and report.findings[0].check == "replay"
    with pytest.raises(AssertionError):
        assert report.ok


def test_a_leaf_that_is_not_a_ledger_entry_is_reported_alone() -> None:
    world = TrialWorld()
    certified(world, -6000)
    leaves = [e.encode() for e in world.entries]
    leaves[3] = b"not an entry"
    report = verify_trial(leaves, world.genesis, TRIAL, checkpoint_of(leaves))
    assert [(f.check, f.ok) for f in report.findings] == [("replay", False)], report.as_dict()
    assert "leaf 3 is not a ledger entry" in report.findings[0].detail and not report.ok
