"""A labelling miner's trial jobs (chain_miner/trial_runner.py): `due` over TrialWorld states, and the runner
driving a real runtime — its entries are really signed, sealed and decided by the trial rules (docs/trials.md).

The runner's `publish` here appends the entry to the world's runtime, as the bridge's study intake appends it to
the ledger; everything else (seed files, escrow sealing and opening, the jobs file) is the runner's own code.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from trial_world import DAY, DESIGN, LOCK_AT, REVEAL_WINDOW, T0, TRIAL, TrialWorld

from carechain import envelope
from carechain.entries import Entry
from carechain.identity import Identity
from carechain.trial_allocation import (
    Design,
    allocation_key,
    arm_of,
    block_of,
    recover_seed,
    released_key,
    seed_commitment,
)
from chain_miner.trial_runner import (
    JOBS_FILE,
    MAX_ATTEMPTS,
    SeedFileError,
    TrialJob,
    TrialRunner,
    due,
    read_seed,
    seed_path,
)
from contract_rules import trial_entries as te
from contract_rules import trials as rules
from contract_rules.bonds import MIN_BOND
from contract_rules.clock import attested_ms
from record_access import trials as client


@dataclass
class Labeller:
    """One labelling miner's runner over the world, fed the entries appended since its last turn."""

    world: TrialWorld
    identity: Identity
    data_dir: Path
    up: bool = True  # False: the broker takes nothing (the runner's publish fails)
    sent: list[tuple[str, str]] = field(default_factory=list)  # (entry type, the rules' verdict)
    seen: int = 0
    runner: TrialRunner = field(init=False)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.runner = TrialRunner(self.data_dir, self.identity, lambda: self.world.state, self.leaves, self.publish)

    def leaves(self) -> list[bytes]:
        return [e.encode() for e in self.world.entries]

    def publish(self, raw: bytes) -> bool:
        if not self.up:
            return False
        entry = Entry.decode(raw)
        self.sent.append((entry.type, self.world.add(entry)))
        return True

    def turn(self) -> list[TrialJob]:
        entries = self.leaves()[self.seen:]
        first, self.seen = self.seen, len(self.world.entries)
        return self.runner.after_cosign(first, entries)

    @property
    def id(self) -> str:
        return self.identity.device_id


@pytest.fixture
def world() -> TrialWorld:
    return TrialWorld(n_patients=8)


def labellers(world: TrialWorld, tmp_path: Path) -> list[Labeller]:
    """The runners of the labellers drawn for the trial (registered here when it is not yet)."""
    if rules.trial_record(world.state, TRIAL) is None:
        assert world.register() == "ok"
    return [Labeller(world, m, tmp_path / m.device_id) for m in world.labellers()]


def turns(runners: list[Labeller]) -> list[list[TrialJob]]:
    return [r.turn() for r in runners if r.up]


def to_lock(world: TrialWorld, runners: list[Labeller], effect: int = -6000) -> dict[str, int]:
    """Register, the sponsor's commit, the labellers commit by themselves; enrol, dispense, measure, lock (as
    TrialWorld.run_to_lock). The world learns the labellers' seeds from their seed files (to know the arms)."""
    assert world.commit(world.sponsor) == "ok"
    turns(runners)
    assert set(world.trial()["commitments"]) == set(rules.committers(world.trial()))
    for r in runners:
        world.seeds[r.id] = read_seed(seed_path(r.data_dir, TRIAL), TRIAL, r.id)
    for i, p in enumerate(world.patients):
        assert world.enroll(p, "f" if i % 2 else "m") == "ok"
        assert world.dispense(p) == "ok"
    arms = world.expected_arms()
    values: dict[str, int] = {}
    world.readings = {}
    for i, p in enumerate(world.patients):
        change = ((i * 7919) % 11 - 5) * 800 + (effect if arms[p.device_id] == "treatment" else 0)
        world.readings[p.device_id] = world.measure(p, 72_000, 72_000 + change)
        values[p.device_id] = change
    assert world.lock() == "ok"
    return values


# -- due: the decision, over the rules' states ------------------------------------------------------------

def test_only_the_drawn_labellers_have_to_commit_once_the_trial_is_registered(world: TrialWorld) -> None:
    assert world.register() == "ok"
    trial = world.trial()
    for m in world.miners:
        expected = [TrialJob("commit", TRIAL)] if m.device_id in trial["labellers"] else []
        assert due(world.state, m.device_id, attested_ms(world.state)) == expected
    assert due(world.state, world.sponsor.device_id, attested_ms(world.state)) == []  # the sponsor's is its client's
    world.commit_all()
    assert all(due(world.state, m.device_id, attested_ms(world.state)) == [] for m in world.miners)


def test_reveals_are_due_after_the_lock_and_recoveries_once_the_window_closes(world: TrialWorld) -> None:
    world.run_to_lock(-6000, n=8)
    first, second, silent = (m.device_id for m in world.labellers())
    now = attested_ms(world.state)
    assert due(world.state, first, now) == [TrialJob("reveal", TRIAL)]
    assert due(world.state, first, None) == []  # without attested time nothing time-bound is due
    assert world.reveal(world.sponsor) == "ok" and world.reveal(world.by_id(first)) == "ok"
    assert world.reveal(world.by_id(second)) == "ok"
    assert due(world.state, first, attested_ms(world.state)) == []
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    now = attested_ms(world.state)
    assert due(world.state, first, now) == [TrialJob("recover", TRIAL, party=silent)]
    assert due(world.state, silent, now) == []  # too late to reveal; the others recover its seed
    assert world.recover(world.by_id(first), world.by_id(silent)) == "ok"
    assert due(world.state, first, now) == []  # its share is given
    assert due(world.state, second, now) == [TrialJob("recover", TRIAL, party=silent)]


def test_an_unblinding_is_answered_by_every_committed_labeller_and_nothing_is_due_once_certified(
        world: TrialWorld) -> None:
    assert world.register() == "ok"
    world.commit_all()
    assert world.enroll(world.patients[0], "f") == "ok"
    u = te.TrialUnblind(trial_id=TRIAL, participant=world.patients[0].device_id, reason="adverse_event", ts=T0)
    assert world.send(world.investigators[0], u) == "ok"
    leaf = world.last_index
    for m in world.labellers():
        assert due(world.state, m.device_id, attested_ms(world.state)) == [
            TrialJob("unblind_key", TRIAL, unblinding=leaf)]
    assert TrialJob("unblind_key", TRIAL, unblinding=leaf).key == f"unblind_key:{TRIAL}:{leaf}"


def test_nothing_is_due_in_a_certified_trial(world: TrialWorld) -> None:
    values = world.run_to_lock(-6000, n=8)
    world.reveal_all()
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    assert world.attest(LOCK_AT + REVEAL_WINDOW + DAY) == "ok"
    assert all(due(world.state, m.device_id, attested_ms(world.state)) == [] for m in world.miners)


def test_trial_deadlines_are_the_enrolment_close_then_the_reveal_window_while_a_seed_is_missing(
        world: TrialWorld) -> None:
    assert rules.deadlines(world.state) == []
    values = world.run_to_lock(-6000, n=8)
    assert rules.deadlines(world.state) == [LOCK_AT + REVEAL_WINDOW]
    world.reveal_all()
    assert rules.deadlines(world.state) == []
    world.disclose_all(values)


def test_an_open_trial_s_deadline_is_its_enrolment_close(world: TrialWorld) -> None:
    assert world.register() == "ok"
    assert rules.deadlines(world.state) == [world.trial()["enrol_closes_ms"]]


# -- the runner over a real runtime -----------------------------------------------------------------------

def test_labellers_commit_reveal_and_the_trial_certifies_with_their_stored_seeds(world: TrialWorld,
                                                                                  tmp_path: Path) -> None:
    runners = labellers(world, tmp_path)
    values = to_lock(world, runners, effect=-20_000)  # far beyond the ±4 bpm spread, whatever the drawn seeds
    for r in runners:
        assert r.sent == [("trial.commit", "ok")]
        path = seed_path(r.data_dir, TRIAL)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((r.data_dir / "trials" / JOBS_FILE).stat().st_mode) == 0o600
        record = json.loads(path.read_text())
        assert set(record) == {"v", "trial_id", "party", "seed"} and record["party"] == r.id
        assert world.trial()["commitments"][r.id]["commitment"] == seed_commitment(
            TRIAL, r.id, bytes.fromhex(record["seed"]))
    assert world.reveal(world.sponsor) == "ok"
    assert [[j.kind for j in jobs] for jobs in turns(runners)] == [["reveal"]] * 3
    assert all(r.sent[-1] == ("trial.reveal", "ok") for r in runners)
    assert set(world.trial()["seeds"]) == set(rules.committers(world.trial()))
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"
    assert world.trial()["certificate"]["result"]["met"] is True
    assert turns(runners) == [[], [], []]  # every job at most once
    assert all(len(r.sent) == 2 for r in runners)


def test_each_escrow_share_opens_to_a_share_of_the_labellers_seed(world: TrialWorld, tmp_path: Path) -> None:
    """The escrow a labeller sealed recovers its seed with any threshold of holders (the sponsor's included)."""
    runners = labellers(world, tmp_path)
    assert world.commit(world.sponsor) == "ok"
    turns(runners)
    trial = world.trial()
    r = runners[0]
    commit = next(envelope.parse(e.cose).payload for e in world.entries
                  if e.type == "trial.commit" and envelope.parse(e.cose).kid == r.id)
    holders = rules.escrow_holders(trial, r.id)
    points = {i + 1: te.open_share(world.by_id(h), commit["escrow"][h]) for i, h in enumerate(holders)}
    t = rules.threshold(trial)
    assert recover_seed(dict(list(points.items())[:t]), t) == read_seed(seed_path(r.data_dir, TRIAL), TRIAL)
    assert recover_seed(dict(list(points.items())[-t:]), t) == read_seed(seed_path(r.data_dir, TRIAL), TRIAL)


def test_a_labeller_that_stays_silent_is_recovered_by_the_others_from_escrow(world: TrialWorld,
                                                                            tmp_path: Path) -> None:
    runners = labellers(world, tmp_path)
    values = to_lock(world, runners)
    silent = runners[2]
    silent.up = False
    assert world.reveal(world.sponsor) == "ok"
    turns(runners)
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    jobs = turns(runners)
    assert jobs == [[TrialJob("recover", TRIAL, party=silent.id)]] * 2
    assert silent.id not in world.trial()["seeds"]  # the threshold is a majority of the four committers: 3
    # The sponsor's share comes from its client: opened from the silent labeller's accepted commit on the log.
    commit = client.commit_payload(enumerate(e.encode() for e in world.entries), world.trial(), silent.id)
    assert world.add(client.build_recover(world.sponsor, world.trial(), silent.id, commit, LOCK_AT + 3 * DAY)) \
        == "ok"
    trial = world.trial()
    assert trial["seeds"][silent.id]["how"] == "recovered"
    assert bytes.fromhex(trial["seeds"][silent.id]["seed"]) == world.seeds[silent.id]
    assert trial["faults"][0][1:] == [silent.id, rules.REVEAL_MISSING]
    # the silent labeller's bond pays for it, once (contract_rules.penalties), and its miner is suspended
    bond = world.state.table("bonds")[silent.id]
    assert bond["amount"] == MIN_BOND["miner"] - rules.REVEAL_MISSING_SLASH
    assert [o for _, o in bond["offences"]] == [rules.REVEAL_MISSING] and bond["suspended_at"] is not None
    with pytest.raises(client.TrialClientError, match="already recovered"):
        client.build_recover(world.sponsor, trial, silent.id, commit, LOCK_AT + 3 * DAY)
    world.disclose_all(values)
    assert world.send(world.sponsor, world.certify_entry(values)) == "ok"


def test_a_recovery_reads_the_commit_from_the_cosigned_tree_when_the_jobs_file_was_lost(world: TrialWorld,
                                                                                        tmp_path: Path) -> None:
    runners = labellers(world, tmp_path)
    to_lock(world, runners)
    silent, holder = runners[2], runners[0]
    silent.up = False
    (holder.data_dir / "trials" / JOBS_FILE).write_text("{damaged")
    holder.restart()  # forgets the kept escrow shares (and its done jobs: the rules refuse repeats)
    assert world.reveal(world.sponsor) == "ok"
    turns(runners)
    assert world.attest(LOCK_AT + REVEAL_WINDOW) == "ok"
    assert holder.turn() == [TrialJob("recover", TRIAL, party=silent.id)]
    assert holder.sent[-1] == ("trial.recover", "ok")


def test_a_restarted_labeller_reuses_its_stored_seed_and_never_draws_a_second(world: TrialWorld,
                                                                              tmp_path: Path) -> None:
    r = labellers(world, tmp_path)[0]
    r.up = False  # the seed is stored, the commit never leaves
    assert r.turn() == []
    path = seed_path(r.data_dir, TRIAL)
    stored = path.read_bytes()
    assert r.runner.stats["jobs_failed"] == 1
    r.up = True
    r.restart()
    assert r.turn() == [TrialJob("commit", TRIAL)]
    assert path.read_bytes() == stored
    seed = read_seed(path, TRIAL, r.id)
    assert world.trial()["commitments"][r.id]["commitment"] == seed_commitment(TRIAL, r.id, seed)


def test_a_job_that_keeps_failing_is_given_up_after_max_attempts(world: TrialWorld, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    r = labellers(world, tmp_path)[0]
    r.up = False
    for _ in range(MAX_ATTEMPTS + 2):
        r.turn()
    assert r.runner.stats["jobs_failed"] == MAX_ATTEMPTS
    assert "giving up on it" in caplog.text
    jobs = json.loads((r.data_dir / "trials" / JOBS_FILE).read_text())
    assert jobs["failed"] == {f"commit:{TRIAL}": MAX_ATTEMPTS} and jobs["done"] == []


def test_a_seed_file_that_does_not_match_the_commitment_is_never_revealed(world: TrialWorld, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    runners = labellers(world, tmp_path)
    to_lock(world, runners)
    r = runners[0]
    path = seed_path(r.data_dir, TRIAL)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "seed": "00" * 32}))
    assert r.turn() == []
    assert r.runner.stats["seed_does_not_match"] == 1 and "does not match" in caplog.text
    assert r.id not in world.trial()["seeds"]


def test_seed_files_of_another_trial_or_party_or_damaged_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.seed"
    with pytest.raises(SeedFileError, match="no seed file"):
        read_seed(path, "t")
    path.write_text(json.dumps({"v": 1, "trial_id": "other", "party": "p", "seed": "11" * 32}))
    with pytest.raises(SeedFileError, match="not of trial 't'"):
        read_seed(path, "t")
    with pytest.raises(SeedFileError, match="for 'q'"):
        read_seed(path, "other", "q")
    path.write_text(json.dumps({"v": 1, "trial_id": "t", "party": "p", "seed": "11" * 31}))
    with pytest.raises(SeedFileError, match="32 bytes"):
        read_seed(path, "t")
    path.write_text("not json")
    with pytest.raises(SeedFileError, match="unreadable"):
        read_seed(path, "t")


def unblind(world: TrialWorld, runners: list[Labeller], patient: Identity, investigator: Identity) -> dict[str, Any]:
    """Log `patient`'s emergency unblinding; the labellers answer by themselves, the sponsor with its client; the
    investigator opens every answer (record_access.trials.open_unblinding)."""
    u = te.TrialUnblind(trial_id=TRIAL, participant=patient.device_id, reason="adverse_event", ts=T0 + 3 * DAY)
    assert world.send(investigator, u) == "ok"
    leaf = world.last_index
    assert turns(runners) == [[TrialJob("unblind_key", TRIAL, unblinding=leaf)]] * 3
    assert all(r.sent[-1] == ("trial.unblind_key", "ok") for r in runners)
    sponsor_seed = world.seeds[world.sponsor.device_id]  # the sponsor's answer is its client's (not a miner's)
    assert world.add(client.answer_unblinding(world.sponsor, world.trial(), leaf, sponsor_seed,
                                              investigator.public_key, T0 + 3 * DAY)) == "ok"
    answers = client.unblind_answers(enumerate(e.encode() for e in world.entries), TRIAL, leaf)
    assert set(answers) == set(rules.committers(world.trial()))
    assert turns(runners) == [[], [], []]
    return {"leaf": leaf, **client.open_unblinding(investigator, world.trial(), leaf, answers)}


def enrolled_labellers(world: TrialWorld, tmp_path: Path) -> list[Labeller]:
    runners = labellers(world, tmp_path)
    assert world.commit(world.sponsor) == "ok"
    turns(runners)
    for r in runners:
        world.seeds[r.id] = read_seed(seed_path(r.data_dir, TRIAL), TRIAL, r.id)
    for i, p in enumerate(world.patients):
        assert world.enroll(p, "f" if i % 2 else "m") == "ok"
    return runners


def test_labellers_answer_an_emergency_unblinding_with_keys_that_open_her_block_only(world: TrialWorld,
                                                                                   tmp_path: Path) -> None:
    runners = enrolled_labellers(world, tmp_path)
    patient, investigator = world.patients[5], world.investigators[1]
    opened = unblind(world, runners, patient, investigator)
    record = world.trial()["unblindings"][str(opened["leaf"])]
    stratum, position = record["stratum"], record["position"]
    block = position // DESIGN.block_sizes[0]
    assert record["blocks"] == [block, block] and opened["candidate_blocks"] == [block, block]  # one block size
    full = allocation_key(world.seeds, bytes.fromhex(world.trial()["checkpoint_seed"]), TRIAL)
    assert opened["arm"] == arm_of(full, DESIGN, stratum, position) and opened["block"] == block
    # What the investigator holds opens her block and no other.
    keys = {envelope.parse(e.cose).kid: te.open_unblind_keys(investigator, envelope.parse(e.cose).payload["sealed"])
            for e in world.entries if e.type == "trial.unblind_key"}
    assert all(k.blocks() == range(block, block + 1) for k in keys.values())
    released = released_key(TRIAL, bytes.fromhex(world.trial()["checkpoint_seed"]), stratum, block,
                            {p: k.sizes_key for p, k in keys.items()}, {p: k.block_key(block) for p, k in keys.items()})
    with pytest.raises(ValueError, match="was not released"):
        arm_of(released, DESIGN, stratum, position + DESIGN.block_sizes[0])


def test_with_two_block_sizes_labellers_release_every_candidate_block_and_the_investigator_finds_hers(
        tmp_path: Path) -> None:
    world = TrialWorld(n_patients=16)
    design = Design(arms=["treatment", "placebo"], ratio=[1, 1], block_sizes=[4, 6], strata={"sex": ["f", "m"]})
    assert world.register(design=design) == "ok"
    runners = enrolled_labellers(world, tmp_path)
    patient = world.patients[10]  # the 6th man: position 5, in block 0 (a block of 6) or block 1 (after one of 4)
    opened = unblind(world, runners, patient, world.investigators[0])
    record = world.trial()["unblindings"][str(opened["leaf"])]
    assert record["position"] == 5 and record["blocks"] == [0, 1] == opened["candidate_blocks"]
    full = allocation_key(world.seeds, bytes.fromhex(world.trial()["checkpoint_seed"]), TRIAL)
    real = block_of(full, design, record["stratum"], 5)
    assert opened["arm"] == arm_of(full, design, record["stratum"], 5)
    assert (opened["block"], opened["first"], opened["size"]) == (real.number, real.first, real.size)
    # Every committer released both candidate blocks' keys: the answers are a miner's and the sponsor's alike.
    keys = [te.open_unblind_keys(world.investigators[0], envelope.parse(e.cose).payload["sealed"])
            for e in world.entries if e.type == "trial.unblind_key"]
    assert len(keys) == 4 and all(k.blocks() == range(0, 2) for k in keys)
    with pytest.raises(ValueError, match="not among the released blocks 0–1"):
        keys[0].block_key(2)


def test_an_investigator_refuses_answers_for_other_blocks_than_the_candidates(world: TrialWorld,
                                                                              tmp_path: Path) -> None:
    runners = enrolled_labellers(world, tmp_path)
    investigator = world.investigators[0]
    u = te.TrialUnblind(trial_id=TRIAL, participant=world.patients[4].device_id, reason="adverse_event", ts=T0)
    assert world.send(investigator, u) == "ok"
    leaf = world.last_index
    turns(runners)
    record = world.trial()["unblindings"][str(leaf)]
    wrong = te.UnblindKeys(stratum=record["stratum"], first_block=record["blocks"][0] + 1,
                           sizes_key=b"\x01" * 32, block_keys=[b"\x02" * 32])
    sealed = te.seal_unblind_keys(investigator.public_key, wrong)
    assert world.send(world.sponsor, te.TrialUnblindKey(trial_id=TRIAL, unblinding=leaf, sealed=sealed, ts=T0)) == "ok"
    answers = client.unblind_answers(enumerate(e.encode() for e in world.entries), TRIAL, leaf)
    with pytest.raises(client.TrialClientError, match=f"committers \\['{world.sponsor.device_id}'\\] released keys "
                                                      "of other blocks"):
        client.open_unblinding(investigator, world.trial(), leaf, answers)
