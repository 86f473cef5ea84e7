"""Storage facts on the ledger (issue 7): share roots committed by the owner, audits settled into rewards."""

from __future__ import annotations

import os
from pathlib import Path

from carechain.entries import Entry
from carechain.identity import Identity
from carechain.storage.codec import DatasetKey, StorageParams
from carechain.storage.manifest import plan_put, plan_update
from contract_rules import Genesis, Runtime, builtin_hashes, replay
from contract_rules import storage as sc
from contract_rules import transactions as ce
from contract_rules.rewards import EpochEvents, RewardPolicy, settle_epoch
from contract_rules.runtime import OK, code_hash_of

PARAMS = StorageParams(segment_size=1000, k=4, n=8, chunk_size=100)
MINERS = [f"miner-{i}" for i in range(10)]
SEED = bytes([7]) * 32
POOL = 100_000


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


OPERATOR, OWNER, STRANGER = ident(1), ident(20), ident(21)


def v1_contracts() -> dict[str, str]:
    """The newest contracts, but storage pinned at v1: deployed logs keep running the code they pinned."""
    return {**builtin_hashes(), "storage": code_hash_of(Path(sc.__file__).read_bytes())}


def genesis(contracts: dict[str, str] | None = None) -> Genesis:
    return Genesis(operators={OPERATOR.device_id: OPERATOR.public_key}, allocations={"pool:miners": POOL},
                   contracts=v1_contracts() if contracts is None else contracts)


def commit_entry(who: Identity, manifest, pk: bytes | None = None) -> Entry:  # noqa: ANN001
    return ce.signed(who, ce.STORAGE_COMMIT, sc.commit_for(manifest, pk or who.public_key, ts=1))


def put_manifest():  # noqa: ANN201
    key = DatasetKey("ds-ledger", bytes(32))
    data = os.urandom(2500)
    return key, data, plan_put(key, OWNER.device_id, data, MINERS, SEED, PARAMS).manifest


COUNTS = [
    {"miner": "miner-1", "passed": 16, "failed": 0, "answered": 3, "unanswered": 0},
    {"miner": "miner-0", "passed": 16, "failed": 0, "answered": 0, "unanswered": 0},
    {"miner": "miner-2", "passed": 10, "failed": 6, "answered": 0, "unanswered": 0},
    {"miner": "miner-3", "passed": 16, "failed": 0, "answered": 0, "unanswered": 5},  # selfish
]


def audit_entry(runtime: Runtime, epoch: int, pool: int = 1000, **changes) -> Entry:  # noqa: ANN003
    payload = sc.settle(runtime.state, epoch, pool, COUNTS, ts=2)
    if changes:
        payload = payload.model_copy(update=changes)
    return ce.signed(OPERATOR, ce.STORAGE_AUDIT, payload)


def test_storage_is_a_builtin_contract() -> None:
    assert "storage" in builtin_hashes()
    assert Runtime(genesis()).state.versions["storage"][0][1] == sc.VERSION


def test_commit_then_replay_shows_the_roots_in_state() -> None:
    key, data, m = put_manifest()
    rt = Runtime(genesis())
    entries = [commit_entry(OWNER, m)]
    assert rt.apply(entries[0]) == OK
    record = rt.state.table("datasets")["ds-ledger"]
    assert record["owner"] == OWNER.device_id and record["revision"] == 1 and (record["k"], record["n"]) == (4, 8)
    assert [s[0] for s in record["segments"]] == [1, 1, 1]
    assert record["segments"][1][1] == [[sh.miner, sh.root] for sh in m.segments[1].shares]
    assert len(record["segments"][0][1]) == 8
    # An update: the changed segment's new version and roots replace the old ones; only the owner may commit.
    new = bytearray(data)
    new[1200] ^= 1
    m2 = plan_update(m, key, bytes(new), MINERS, SEED).manifest
    assert rt.check(commit_entry(STRANGER, m2)) == "not_the_dataset_owner"
    assert rt.check(commit_entry(OWNER, m)) == "revision_not_newer"
    assert rt.check(commit_entry(OWNER, m2, pk=STRANGER.public_key)) == "unknown_signer"
    entries.append(commit_entry(OWNER, m2))
    assert rt.apply(entries[1]) == OK
    state = replay(genesis(), entries)
    assert [s[0] for s in state.table("datasets")["ds-ledger"]["segments"]] == [1, 2, 1]
    assert state.root() == rt.state.root()


def test_an_audit_pays_exactly_the_settle_epoch_split_from_the_pool() -> None:
    rt = Runtime(genesis())
    entry = audit_entry(rt, epoch=1)
    assert rt.apply(entry) == OK
    events = EpochEvents()
    for c in COUNTS:
        events.audits += [(c["miner"], True)] * c["passed"] + [(c["miner"], False)] * c["failed"]
        events.retrievals += [(c["miner"], True)] * c["answered"] + [(c["miner"], False)] * c["unanswered"]
    expected = settle_epoch(RewardPolicy(1000, 1, 4), events, {})
    paid = {m: rt.state.balance(f"miner:{m}") for m in expected.payouts}
    assert paid == expected.payouts and sum(paid.values()) == 1000 and expected.carry == 0
    assert paid["miner-1"] > paid["miner-0"] > paid["miner-2"]  # retrievals pay; failures cost reputation
    assert rt.state.balance("pool:miners") == POOL - 1000
    assert sum(rt.state.balances.values()) == rt.state.supply == POOL  # conservation
    # Reputation is kept in contract state; unanswered retrievals count as failed audits.
    rep = rt.state.table("storage_reputation")
    assert rep["miner-3"] == [16, 5] and rep["miner-2"] == [10, 6]
    # The next epoch settles against the recorded reputation (so the split differs), and must be newer.
    assert rt.check(audit_entry(rt, epoch=1)) == "epoch_not_newer"
    second = audit_entry(rt, epoch=2)
    assert second != entry and rt.apply(second) == OK
    assert sum(rt.state.balances.values()) == POOL


def test_a_tampered_payout_or_a_non_operator_is_rejected() -> None:
    rt = Runtime(genesis())
    honest = sc.settle(rt.state, 1, 1000, COUNTS)
    shifted = dict(honest.payouts)
    shifted["miner-3"] += 1
    shifted["miner-1"] -= 1
    assert rt.check(audit_entry(rt, 1, payouts=shifted)) == "payouts_mismatch"
    assert rt.check(audit_entry(rt, 1, payouts={**honest.payouts, "miner-9": 1})) == "payouts_mismatch"
    assert rt.check(audit_entry(rt, 1, carry=5)) == "carry_mismatch"
    not_operator = ce.signed(OWNER, ce.STORAGE_AUDIT, honest)
    assert rt.check(not_operator) == "unknown_signer"
    assert rt.check(audit_entry(rt, 1, pool=POOL + 1)) == "insufficient_funds"
    assert rt.state.size == 0 and rt.state.balance("pool:miners") == POOL


def test_an_epoch_without_points_carries_its_pool_over() -> None:
    rt = Runtime(genesis())
    idle = ce.signed(OPERATOR, ce.STORAGE_AUDIT, sc.settle(rt.state, 1, 700, [{"miner": "miner-0", "failed": 2}]))
    assert rt.apply(idle) == OK
    assert rt.state.table("storage")["carry"] == 700 and rt.state.balance("pool:miners") == POOL
    assert rt.apply(audit_entry(rt, 2, pool=300)) == OK
    assert POOL - rt.state.balance("pool:miners") == 1000


def test_two_replays_agree_on_the_state_root() -> None:
    _, _, m = put_manifest()
    rt = Runtime(genesis())
    log = [commit_entry(OWNER, m)]
    for entry in log:
        rt.apply(entry)
    for epoch in (1, 2, 3):
        log.append(audit_entry(rt, epoch))
        assert rt.apply(log[-1]) == OK
    a, b = replay(genesis(), log), replay(genesis(), list(log))
    assert a.root() == b.root() == rt.state.root()
    assert a.results == [[i, OK] for i in range(len(log))]


def test_a_genesis_without_the_storage_contract_rejects_storage_entries() -> None:
    old = {k: v for k, v in builtin_hashes().items() if k != "storage"}
    rt = Runtime(genesis(old))
    _, _, m = put_manifest()
    assert rt.apply(commit_entry(OWNER, m)) == "contract_not_in_genesis"


def test_store_commit_and_settle_from_the_command_line(tmp_path) -> None:  # noqa: ANN001
    import json

    from tests.test_cli import run, text

    _, _, m = put_manifest()
    manifest = tmp_path / "data.manifest.json"
    manifest.write_text(m.model_dump_json())
    OWNER.save(tmp_path / "owner.key")
    note = tmp_path / "final.note"
    note.write_text("not a checkpoint note\n")
    opts = ["--data-dir", str(tmp_path / "bridge")]
    # Storage v2: a commit must name the final checkpoint whose seed placed it, on the active miners.
    refused = run("store", "commit", manifest, "--key", tmp_path / "owner.key", "--seed-checkpoint", note, *opts)
    assert refused.exit_code == 1 and "bad_seed_checkpoint" in text(refused)
    result = run("store", "settle", "--epoch", "0", "--pool", "1000", *opts, "--json")
    assert result.exit_code == 0, text(result)
    out = json.loads(result.stdout)
    assert out["paid"] == 0 and out["payouts"] == {}  # no evidence on the ledger: nobody is paid
    again = run("store", "settle", "--epoch", "0", "--pool", "1000", *opts)
    assert again.exit_code == 1 and "wrong_epoch" in text(again)
