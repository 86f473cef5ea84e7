"""Storage rules v2: placement checked on the ledger, audits and retrievals from signed evidence, epoch rewards.

Each regression test names the attack it stops; every one of them passed on the v1 rules (operator-typed
counts, owner-chosen miners).
"""

from __future__ import annotations

import pytest

from carechain import envelope
from carechain.entries import Entry
from carechain.storage.attestations import (
    audit_answer,
    challenges_for,
    ledger_holdings,
    request_id,
    retrieval_answer,
    retrieval_request,
    wire_challenges,
)
from carechain.storage.audit import answer_challenge
from carechain.storage.codec import DatasetKey
from carechain.storage.manifest import plan_put
from carechain.storage.placement import place_shares, rank_miners
from contract_rules import miners, replay, storage_v2, storage_v3
from contract_rules import storage as storage_v1
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND, SLASH
from contract_rules.rewards import Reputation
from contract_rules.rewards_v2 import Tally, split
from tests.storage_world import PARAMS, POOL, T0, StorageWorld, ident


@pytest.fixture
def w() -> StorageWorld:
    world = StorageWorld()
    world.bonded_miners()
    _, commit = world.put()
    assert world.add(commit) == "ok"
    return world


def holders(w: StorageWorld, dataset: str = "ds-1") -> list[str]:
    return sorted({m for row in w.state.table("storage_shares").values() if row["dataset"] == dataset
                   for m in row["miners"]})


def test_the_newest_storage_rules_are_v3_and_replay_to_the_same_root(w: StorageWorld) -> None:
    assert w.state.versions["storage"][0][1] == storage_v3.VERSION == 3
    note = w.note()
    m = w.by_id(holders(w)[0])
    assert w.add(w.audit_entry(note, {m.device_id: w.answers(m, note)})) == "ok"
    assert w.record_final() == "ok"
    assert w.settle(1_000) == "ok"
    assert replay(w.genesis, w.log).root() == w.state.root()


# -- placement ------------------------------------------------------------------------------------------

def test_a_commit_placed_by_a_final_seed_on_the_active_miners_is_accepted(w: StorageWorld) -> None:
    record = w.state.table("datasets")["ds-1"]
    assert record["chunk_size"] == 100 and record["pk"] == w.owner.public_key
    rows = w.state.table("storage_shares")
    assert sorted(rows) == ["ds-1|0|1", "ds-1|1|1", "ds-1|2|1"]
    assert all(set(row["miners"]) <= set(miners.active_miners(w.state)) for row in rows.values())


def test_a_commit_with_shares_on_a_miner_that_does_not_exist_is_refused() -> None:
    w = StorageWorld()
    w.bonded_miners()
    made_up = "abcdefghijklmnop"
    _, commit = w.put(place_on=[*miners.active_miners(w.state), made_up, "zzzzzzzzzzzzzzzz"])
    assert w.runtime.check(commit) == "shares_not_at_placement"


def test_a_commit_not_at_the_seeds_placement_is_refused() -> None:
    w = StorageWorld()
    w.bonded_miners()
    note = w.note()
    seed = w.seed(note)
    active = miners.active_miners(w.state)
    # The owner's favourite miners: the four the seed ranks lowest for segment 0, not the four it picks.
    favourites = rank_miners(seed, "ds-1", 0, 1, active)[-4:]
    assert set(favourites) != set(place_shares(seed, "ds-1", 0, 1, active, 4))
    _, commit = w.put(note=note, place_on=favourites)
    assert w.runtime.check(commit) == "shares_not_at_placement"


def test_a_commit_on_miners_that_are_not_active_is_refused() -> None:
    w = StorageWorld()
    for m in w.miners:
        assert w.register("miner", m) == "ok"
    assert w.bond(w.miners[0]) == "ok"
    # Registered but unbonded miners neither make a checkpoint final nor hold shares.
    _, commit = w.put(note=w.note(w.miners[:1]), place_on=w.ids())
    assert w.runtime.check(commit) == "not_enough_active_miners"


def test_a_commit_of_shares_a_miner_never_acknowledged_is_refused() -> None:
    # Any key may commit: without receipts it could place made-up roots on miners and have them fail audits.
    w = StorageWorld()
    w.bonded_miners()
    _, commit = w.put()
    payload = ce.parse(ce.StorageCommitV2, envelope.parse(commit.cose).payload)
    assert payload is not None
    seg = payload.segments[0]
    other = w.receipt(seg.shares[1].miner, "ds-1", 0, 1, 1, seg.shares[1].root, seg.share_length)
    for receipt in (None, other):  # missing, or another share's receipt
        shares = [seg.shares[0].model_copy(update={"receipt": receipt}), *seg.shares[1:]]
        forged = payload.model_copy(update={"segments": [seg.model_copy(update={"shares": shares}),
                                                         *payload.segments[1:]]})
        assert w.runtime.check(ce.signed(w.owner, ce.STORAGE_COMMIT, forged)) == "share_not_acknowledged_by_its_miner"
    assert w.runtime.check(commit) == "ok"


def test_a_commit_needs_a_final_seed_checkpoint(w: StorageWorld) -> None:
    _, commit = w.put(dataset="ds-2")
    assert w.runtime.check(commit) == "ok"
    weak = w.note(w.miners[:3])  # 3 of 6 is not a majority
    payload = ce.parse(ce.StorageCommitV2, envelope.parse(commit.cose).payload)
    assert payload is not None
    forged = ce.signed(w.owner, ce.STORAGE_COMMIT, payload.model_copy(update={"seed_checkpoint": weak}))
    assert w.runtime.check(forged) == "seed_checkpoint_not_final"


def test_a_v1_commit_without_a_seed_is_refused_by_v2_rules(w: StorageWorld) -> None:
    plan = plan_put(DatasetKey("ds-old", bytes(32)), w.owner.device_id, b"x" * 500, w.ids(), bytes(32), PARAMS)
    old = ce.signed(w.owner, ce.STORAGE_COMMIT, storage_v1.commit_for(plan.manifest, w.owner.public_key))
    assert w.runtime.check(old) == "commit_needs_a_seed_checkpoint"


# -- audits ---------------------------------------------------------------------------------------------

def test_an_honest_answer_passes_and_is_recomputed_from_the_ledger(w: StorageWorld) -> None:
    note = w.note()
    m = w.by_id(holders(w)[0])
    assert w.add(w.audit_entry(note, {m.device_id: w.answers(m, note)})) == "ok"
    assert miners.count(w.state, 0, "audit_passed", m.device_id) == 1
    assert w.state.table("storage_reputation")[m.device_id] == [1, 0]
    assert w.runtime.check(w.audit_entry(note, {m.device_id: w.answers(m, note)})) == "miner_already_audited"


def test_an_audit_answer_not_signed_by_the_miner_does_not_count(w: StorageWorld) -> None:
    note = w.note()
    m = w.by_id(holders(w)[0])
    seed = w.seed(note)
    size = int(note.split("\n")[1])  # the checkpoint's tree size: its second line
    good = []
    drawn = challenges_for(w.state, seed, m.device_id, as_of=size)
    for c in drawn:
        ref = c.challenge.ref
        good.append(answer_challenge(w.shares[(ref.dataset_id, ref.segment, ref.version, ref.share)],
                                     c.challenge.chunk, c.chunk_size))
    forger = w.stranger  # has every chunk (e.g. the owner), but is not the miner
    forged = audit_answer(forger, 0, seed, wire_challenges(drawn), good)
    assert w.add(w.audit_entry(note, {m.device_id: forged})) == "answer_not_signed_by_the_miner"
    assert miners.count(w.state, 0, "audit_passed", m.device_id) == 0
    # Another registered miner's signature does not count either.
    other = next(x for x in w.miners if x.device_id != m.device_id)
    by_other = audit_answer(other, 0, seed, wire_challenges(drawn), good)
    assert w.runtime.check(w.audit_entry(note, {m.device_id: by_other})) == \
        "answer_not_signed_by_the_miner"


def test_a_miner_that_lost_its_shares_fails_is_slashed_and_leaves_the_active_set(w: StorageWorld) -> None:
    note = w.note()
    m = w.by_id(holders(w)[0])
    assert w.bond(m, SLASH["failed_audit"]) == "ok"  # stays admitted after the slash: only the audit counts here
    bond_before = w.state.balance(f"bond:{m.device_id}")
    assert w.add(w.audit_entry(note, {m.device_id: w.answers(m, note, lose=True)})) == "ok"
    assert miners.count(w.state, 0, "audit_failed", m.device_id) == 1
    assert w.state.balance(f"bond:{m.device_id}") == bond_before - SLASH["failed_audit"]
    assert m.device_id not in miners.active_miners(w.state)
    assert w.state.table("storage_reputation")[m.device_id] == [0, 1]
    # It cosigns the epoch's final checkpoints like everyone else, but neither they nor anything else pays.
    assert w.record_final() == "ok"
    assert miners.count(w.state, 0, "cosig", m.device_id) == 0
    assert w.settle(1_000_000) == "ok"
    paid = w.state.table("storage_epochs")["0"]["payouts"]
    assert m.device_id not in paid and len(paid) == len(w.miners) - 1


def test_silence_counts_as_failure_only_when_the_operator_reports_it(w: StorageWorld) -> None:
    note = w.note()
    m = holders(w)[0]
    assert w.register("patient", w.stranger) == "ok"
    assert w.runtime.check(w.audit_entry(note, {m: None}, signer=w.stranger)) == "only_the_operator_reports_silence"
    assert w.runtime.check(w.audit_entry(note, {m: None})) == "ok"


def test_a_made_up_miner_cannot_be_audited_or_paid(w: StorageWorld) -> None:
    note = w.note()
    assert w.runtime.check(w.audit_entry(note, {"abcdefghijklmnop": None})) == "unknown_miner"
    assert w.record_final() == "ok"
    assert w.settle(1_000_000) == "ok"
    paid = w.state.table("storage_epochs")["0"]["payouts"]
    assert paid and set(paid) <= set(miners.registered_miners(w.state))
    assert not [a for a in w.state.balances
                if a.startswith("miner:") and a[6:] not in miners.registered_miners(w.state)]


def test_operator_typed_counts_no_longer_decide_rewards(w: StorageWorld) -> None:
    counts = [{"miner": holders(w)[0], "passed": 1000}]
    v1 = storage_v1.settle(w.state, 0, 1_000_000, counts)
    assert w.runtime.check(ce.signed(w.operator, ce.STORAGE_AUDIT, v1)) == "operator_counts_retired"


def test_an_audit_with_a_seed_from_an_earlier_epoch_is_refused(w: StorageWorld) -> None:
    old = w.note()
    assert w.settle(0) == "ok"
    m = w.by_id(holders(w)[0])
    assert w.runtime.check(w.audit_entry(old, {m.device_id: w.answers(m, old)})) == "seed_checkpoint_before_epoch"
    assert w.runtime.check(w.audit_entry(w.note(), {m.device_id: None}, epoch=0)) == "wrong_epoch"


# -- retrievals -----------------------------------------------------------------------------------------

def _request(w: StorageWorld, share: int = 0, nonce: int = 1) -> tuple[bytes, str, bytes]:
    row = w.state.table("storage_shares")["ds-1|0|1"]
    miner = row["miners"][share]
    return retrieval_request(w.requester, "ds-1", 0, 1, share, miner, nonce, T0), miner, w.shares[("ds-1", 0, 1, share)]


def test_an_answered_retrieval_counts_for_the_miner(w: StorageWorld) -> None:
    request, miner, share = _request(w)
    root = w.state.table("storage_shares")["ds-1|0|1"]["roots"][0]
    answer = retrieval_answer(w.by_id(miner), request, root, share)
    entry = ce.storage_retrieval_entry(w.requester, ce.StorageRetrieval(request=request, answer=answer))
    assert w.add(entry) == "ok"
    assert miners.count(w.state, 0, "answered", miner) == 1
    assert w.runtime.check(entry) == "retrieval_already_answered"
    forged = retrieval_answer(w.stranger, request, root, share)
    request2, _, _ = _request(w, share=0, nonce=2)
    bad = ce.storage_retrieval_entry(w.requester, ce.StorageRetrieval(request=request2, answer=forged))
    assert w.runtime.check(bad) == "answer_not_signed_by_the_miner"


def test_an_unanswered_retrieval_costs_the_reward_and_the_bond(w: StorageWorld) -> None:
    request, miner, _ = _request(w)
    assert w.add(ce.storage_retrieval_entry(w.requester, ce.StorageRetrieval(request=request))) == "ok"
    assert w.record_final() == "ok"
    bond = w.state.balance(f"bond:{miner}")
    assert w.settle(1_000_000) == "ok"
    assert miner not in w.state.table("storage_epochs")["0"]["payouts"]
    assert w.state.balance(f"bond:{miner}") == bond - SLASH["unanswered_retrieval"]
    assert w.state.table("storage_reputation")[miner][1] == 1


def test_the_miner_may_file_its_answer_before_the_epoch_is_settled(w: StorageWorld) -> None:
    request, miner, share = _request(w)
    assert w.add(ce.storage_retrieval_entry(w.requester, ce.StorageRetrieval(request=request))) == "ok"
    root = w.state.table("storage_shares")["ds-1|0|1"]["roots"][0]
    answer = retrieval_answer(w.by_id(miner), request, root, share)
    assert w.add(ce.storage_retrieval_entry(w.by_id(miner),
                                            ce.StorageRetrieval(request=request, answer=answer))) == "ok"
    assert w.record_final() == "ok"
    assert w.settle(1_000_000) == "ok"
    assert w.state.table("storage_epochs")["0"]["payouts"][miner] > 0
    assert request_id(request) in w.state.table("retrievals")


def test_a_retrieval_of_a_share_the_miner_does_not_hold_is_refused(w: StorageWorld) -> None:
    row = w.state.table("storage_shares")["ds-1|0|1"]
    not_holder = next(m for m in w.ids() if m not in row["miners"])
    request = retrieval_request(w.requester, "ds-1", 0, 1, 0, not_holder, 1, T0)
    entry = ce.storage_retrieval_entry(w.requester, ce.StorageRetrieval(request=request))
    assert w.runtime.check(entry) == "miner_does_not_hold_the_share"


# -- rewards --------------------------------------------------------------------------------------------

def test_rewards_are_weighted_by_reputation_beyond_any_tie_break() -> None:
    equal = {"a": Tally(cosigs=10), "b": Tally(cosigs=10)}
    paid = split(1_000_000, equal, {"a": Reputation(9, 0), "b": Reputation(0, 9)}, finals=10)
    # a: 100 points x 909 permille, b: 100 x 90: a gets ten times b, not an even split broken by a remainder.
    assert paid == {"a": 909_910, "b": 90_090}
    assert sum(paid.values()) == 1_000_000
    assert split(1_000_000, equal, {}, finals=10) == {"a": 500_000, "b": 500_000}


def test_a_disqualified_miner_earns_nothing_whatever_else_it_did() -> None:
    tallies = {"a": Tally(cosigs=10, audits_passed=1), "b": Tally(cosigs=10, audits_passed=1, audits_failed=1),
               "c": Tally(cosigs=10, answered=5, unanswered=1)}
    assert split(999, tallies, {}, finals=10) == {"a": 999}
    assert split(999, {"a": Tally()}, {}, finals=0) == {}


def test_ledger_rewards_follow_reputation_earned_in_audits(w: StorageWorld) -> None:
    note = w.note()
    failing, passing = (w.by_id(m) for m in holders(w)[:2])
    assert w.bond(failing, SLASH["failed_audit"]) == "ok"  # enough to stay admitted after the slash
    audit = {failing.device_id: w.answers(failing, note, lose=True), passing.device_id: w.answers(passing, note)}
    assert w.add(w.audit_entry(note, audit)) == "ok"
    assert w.settle(0) == "ok"  # epoch 0 closed: both are active again, with different reputations
    for _ in range(3):
        assert w.record_final() == "ok"  # everyone cosigns every final checkpoint
    assert w.settle(1_000_000) == "ok"
    paid = w.state.table("storage_epochs")["1"]["payouts"]
    # Reputation 1/3 against 2/3 (Laplace): the failing miner gets half of what the passing one gets.
    assert paid[passing.device_id] == pytest.approx(2 * paid[failing.device_id], abs=2)
    assert paid[passing.device_id] - paid[failing.device_id] > 100_000
    assert sum(paid.values()) == 1_000_000
    assert w.state.balance("pool:miners") == POOL - 1_000_000 + SLASH["failed_audit"]


def test_checkpoint_final_counts_cosignatures_of_active_miners_once(w: StorageWorld) -> None:
    cosigners = w.miners[:4]
    assert w.record_final(cosigners) == "ok"
    assert [miners.count(w.state, 0, "cosig", m.device_id) for m in w.miners] == [1, 1, 1, 1, 0, 0]
    stale = w.note(cosigners, size=w.state.table("final")["last"]["size"])
    assert w.runtime.check(ce.checkpoint_final_entry(w.operator, stale)) == "checkpoint_not_newer"
    assert w.runtime.check(ce.checkpoint_final_entry(w.operator, w.note(w.miners[:2]))) == "seed_checkpoint_not_final"
    assert w.state.table("final")["last"]["at"] == w.state.size - 1


def test_v3_records_the_seed_of_exactly_the_recorded_note(w: StorageWorld) -> None:
    """The same checkpoint with fewer cosignature lines has another seed: v3 keeps the recorded note's."""
    note = w.note(w.miners[:5])
    assert w.add(ce.checkpoint_final_entry(w.operator, note)) == "ok"
    last = w.state.table("final")["last"]
    recorded = miners.final_note(w.state, note)
    assert not isinstance(recorded, str) and last["seed"] == recorded.seed.hex()
    fewer = miners.final_note(w.state, w.note(w.miners[:4], size=last["size"]))
    assert not isinstance(fewer, str) and fewer.seed.hex() != last["seed"]
    assert set(last) == {"size", "root", "seed", "at"}


def test_anyone_may_settle_a_day_old_epoch_with_the_standard_pool(w: StorageWorld) -> None:
    assert w.register("patient", w.stranger) == "ok"
    assert w.attest(T0) == "ok"
    assert w.settle(0) == "ok"  # the operator may settle at any time; epoch 1 starts at T0
    assert w.record_final() == "ok"
    standard = storage_v2.standard_pool(w.state)
    assert w.settle(standard, signer=w.stranger) == "epoch_not_over"
    assert w.attest(T0 + storage_v2.EPOCH_MS) == "ok"
    assert w.settle(standard + 1, signer=w.stranger) == "not_the_standard_pool"
    assert w.settle(standard, signer=w.stranger) == "ok"
    assert sum(w.state.table("storage_epochs")["1"]["payouts"].values()) == standard
    assert w.settle(POOL * 2) == "pool_exceeds_balance"


def test_bonds_below_the_minimum_earn_nothing(w: StorageWorld) -> None:
    lone = ident(60)
    assert w.register("miner", lone) == "ok"  # registered, never bonded: cannot cosign into a final note
    assert w.record_final([*w.miners, lone]) == "ok"
    assert miners.count(w.state, 0, "cosig", lone.device_id) == 0
    assert w.settle(1_000) == "ok"
    assert lone.device_id not in w.state.table("storage_epochs")["0"]["payouts"]
    assert MIN_BOND["miner"] > 0


def test_an_update_replaces_rows_and_a_repair_must_go_where_placement_puts_it(w: StorageWorld) -> None:
    manifest = ce.parse(ce.StorageCommitV2, envelope.parse(w.log[-1].cose).payload)
    assert manifest is not None
    note = w.note()
    seed = w.seed(note)
    active = miners.active_miners(w.state)
    seg = manifest.segments[1]
    before = [s.miner for s in seg.shares]
    target = place_shares(seed, "ds-1", 1, 1, active, 1, exclude=before)[0]
    wrong = next(m for m in active if m not in before and m != target)  # 6 active miners, 4 holders

    def with_share0_on(miner: str) -> Entry:
        moved = seg.shares[0]
        receipt = w.receipt(miner, "ds-1", 1, 1, 0, moved.root, seg.share_length)
        shares = [moved.model_copy(update={"miner": miner, "receipt": receipt}), *seg.shares[1:]]
        segments = [*manifest.segments[:1], seg.model_copy(update={"shares": shares}), *manifest.segments[2:]]
        return ce.signed(w.owner, ce.STORAGE_COMMIT, manifest.model_copy(update={
            "revision": 2, "segments": segments, "seed_checkpoint": note}))

    assert w.runtime.check(with_share0_on(wrong)) == "repair_not_at_placement"
    assert w.add(with_share0_on(target)) == "ok"
    row = w.state.table("storage_shares")["ds-1|1|1"]
    assert row["miners"][0] == target and row["dropped_at"] is None
    # A new version of segment 2 at revision 3 drops the old row; audits seeded later no longer challenge it.
    seg2 = manifest.segments[2]
    placed = place_shares(seed, "ds-1", 2, 3, active, 4)
    new2 = seg2.model_copy(update={"version": 3, "shares": [
        s.model_copy(update={"miner": m, "root": "ab" * 32,
                             "receipt": w.receipt(m, "ds-1", 2, 3, s.index, "ab" * 32, seg2.share_length)})
        for s, m in zip(seg2.shares, placed, strict=True)]})
    current = ce.parse(ce.StorageCommitV2, envelope.parse(w.log[-1].cose).payload)
    assert current is not None
    update = ce.signed(w.owner, ce.STORAGE_COMMIT, current.model_copy(update={
        "revision": 3, "segments": [*current.segments[:2], new2], "seed_checkpoint": note}))
    assert w.add(update) == "ok"
    rows = w.state.table("storage_shares")
    assert rows["ds-1|2|1"]["dropped_at"] == w.state.size - 1 and rows["ds-1|2|3"]["miners"] == list(placed)
    later = ledger_holdings(w.state, w.state.size)
    assert all(h.ref.version == 3 for m in later for h in later[m] if h.ref.segment == 2)


def test_the_dataset_owner_key_may_file_a_retrieval(w: StorageWorld) -> None:
    row = w.state.table("storage_shares")["ds-1|0|1"]
    request = retrieval_request(w.owner, "ds-1", 0, 1, 0, row["miners"][0], 7, T0)
    entry = ce.storage_retrieval_entry(w.owner, ce.StorageRetrieval(request=request, pk=w.owner.public_key))
    assert w.add(entry) == "ok"
    stranger = retrieval_request(w.stranger, "ds-1", 0, 1, 0, row["miners"][0], 7, T0)
    entry = ce.storage_retrieval_entry(w.stranger, ce.StorageRetrieval(request=stranger, pk=w.stranger.public_key))
    assert w.runtime.check(entry) == "unknown_requester"
