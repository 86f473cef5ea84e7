"""Storage rules (v1): datasets' share Merkle roots, and per-epoch audit results, reputation and rewards.

`storage.commit` (any key; the first commit of a dataset id binds it to its signer) records, per segment,
its version and each share's miner and Merkle root, so audits and retrievals are checked against roots on
the ledger rather than the owner's word. Table `datasets`: dataset id → {owner, revision, k, n, length, at,
segments: [[version, [[miner, root], …]], …]}.

`storage.audit` (operator) records one epoch's counts per miner. The rule re-runs
`contract_rules.rewards.settle_epoch` over them, with the reputations and the carry on the ledger,
and accepts the entry only if its `payouts` and `carry` are exactly that result; the payouts are transfers
from "pool:miners" to "miner:<id>" (so the supply is conserved, and an underfunded pool rejects the entry
as `insufficient_funds`). Tables: `storage_reputation` miner → [passed, failed] (an unanswered retrieval
counts as failed); `storage_epochs` epoch → {at, pool, carry, payouts}; `storage` "last_epoch", "carry".
"""

from __future__ import annotations

from typing import Any

from carechain.identity import device_id_for
from contract_rules.rewards import EpochEvents, EpochResult, Reputation, RewardPolicy, settle_epoch
from contract_rules.runtime import Accept, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import (
    STORAGE_AUDIT,
    STORAGE_COMMIT,
    MinerEpoch,
    StorageAudit,
    StorageCommit,
    StorageSegment,
    StorageShare,
    parse,
)

NAME = "storage"
VERSION = 1
POOL = "pool:miners"
AUDIT_POINTS = 1
RETRIEVAL_POINTS = 4


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == STORAGE_COMMIT:
        return _commit(state, tx)
    if tx.type == STORAGE_AUDIT:
        return _audit(state, tx)
    return Reject("not_a_storage_entry")


def _commit(state: State, tx: Tx) -> Outcome:
    c = parse(StorageCommit, tx.payload)
    if c is None:
        return Reject("bad_payload")
    if device_id_for(c.pk) != tx.signer:
        return Reject("pk_is_not_the_signer")
    if not 1 <= c.k <= c.n:
        return Reject("bad_k_of_n")
    prev = state.table("datasets").get(c.dataset_id)
    if prev is not None:
        if prev["owner"] != tx.signer:
            return Reject("not_the_dataset_owner")
        if c.revision <= prev["revision"]:
            return Reject("revision_not_newer")
    segments = []
    for i, seg in enumerate(c.segments):
        if seg.index != i:
            return Reject("segments_out_of_order")
        if seg.version > c.revision:
            return Reject("segment_version_after_revision")
        if [s.index for s in seg.shares] != list(range(c.n)):
            return Reject("shares_out_of_order")
        if len({s.miner for s in seg.shares}) != c.n:
            return Reject("two_shares_on_one_miner")
        segments.append([seg.version, [[s.miner, s.root] for s in seg.shares]])
    record = {"owner": tx.signer, "revision": c.revision, "k": c.k, "n": c.n, "length": c.length, "at": tx.index,
              "segments": segments}
    return Accept((Put("datasets", c.dataset_id, record),))


def _audit(state: State, tx: Tx) -> Outcome:
    a = parse(StorageAudit, tx.payload)
    if a is None:
        return Reject("bad_payload")
    meta = state.table("storage")
    last = meta.get("last_epoch")
    if last is not None and a.epoch <= last:
        return Reject("epoch_not_newer")
    ids = [m.miner for m in a.miners]
    if ids != sorted(set(ids)):
        return Reject("miners_not_sorted_unique")
    result = _settle(state, a.pool, a.miners)
    expected = {m: n for m, n in sorted(result.payouts.items()) if n}
    if dict(sorted(a.payouts.items())) != expected:
        return Reject("payouts_mismatch")
    if a.carry != result.carry:
        return Reject("carry_mismatch")
    effects: list[Transfer | Put] = [Transfer(POOL, f"miner:{m}", n, f"storage epoch {a.epoch}")
                                     for m, n in expected.items()]
    for m in ids:
        r = result.reputation[m]
        effects.append(Put("storage_reputation", m, [r.passed, r.failed]))
    effects += [Put("storage_epochs", str(a.epoch), {"at": tx.index, "pool": a.pool, "carry": result.carry,
                                                     "payouts": expected}),
                Put("storage", "last_epoch", a.epoch), Put("storage", "carry", result.carry)]
    return Accept(tuple(effects))


def _settle(state: State, pool: int, miners: list[MinerEpoch]) -> EpochResult:
    events = EpochEvents()
    for m in miners:
        events.audits += [(m.miner, True)] * m.passed + [(m.miner, False)] * m.failed
        events.retrievals += [(m.miner, True)] * m.answered + [(m.miner, False)] * m.unanswered
    reputation = {m: Reputation(p, f) for m, (p, f) in state.table("storage_reputation").items()}
    return settle_epoch(RewardPolicy(pool, AUDIT_POINTS, RETRIEVAL_POINTS), events, reputation,
                        carry_in=state.table("storage").get("carry", 0), miners=[m.miner for m in miners])


def settle(state: State, epoch: int, pool: int, counts: list[dict[str, Any]], ts: int = 0) -> StorageAudit:
    """The `storage.audit` payload for `counts` against `state` (what the operator signs next).

    `counts`: [{miner, passed, failed, answered, unanswered}, …] in any order.
    """
    miners = sorted((MinerEpoch.model_validate(c) for c in counts), key=lambda m: m.miner)
    StorageAudit(epoch=epoch, pool=pool, miners=miners, payouts={}, carry=0, ts=ts)  # validates the inputs
    result = _settle(state, pool, miners)
    return StorageAudit(epoch=epoch, pool=pool, miners=miners, carry=result.carry, ts=ts,
                        payouts={m: n for m, n in sorted(result.payouts.items()) if n})


def commit_for(manifest: Any, pk: bytes, ts: int = 0) -> StorageCommit:
    """The `storage.commit` payload for a `carechain.storage.manifest.Manifest` (its current segments)."""
    segments = [StorageSegment(index=s.index, version=s.version,
                               shares=[StorageShare(index=sh.index, miner=sh.miner, root=sh.root) for sh in s.shares])
                for s in manifest.segments]
    return StorageCommit(pk=pk, dataset_id=manifest.dataset_id, revision=manifest.revision, k=manifest.k,
                         n=manifest.n, length=manifest.length, segments=segments, ts=ts)
