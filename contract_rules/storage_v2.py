"""Storage rules (v2): placement on the active miners, audits and retrievals from signed evidence, epochs.

v1 trusted the operator twice: the owner's client named the miners of each share, and the operator typed
each epoch's audit counts. Here every fact is evidence the rules re-check (docs/economics.md, docs/miners.md):

`storage.commit` (v2, the dataset owner's key) carries `seed_checkpoint`, a final checkpoint note
(`miners.final_note`: log-signed, cosigned by a majority of the active miners, not older than the current epoch).
Segments written by this revision must sit exactly where `placement.place_shares(seed, …, active miners, n)` puts
them, so a made-up miner id, a miner that is not active, or a friendly choice is refused; kept segments must match
the ledger, except repaired shares (same root) on the miners `place_shares` picks with the segment's old holders
excluded. Every share the commit places carries its miner's store receipt (`attestations.store_receipt`), so no key
can commit roots a miner never received and make it fail audits. Table `datasets` keeps the v1 record shape plus
"pk", "chunk_size" and each segment's share length; `storage_shares` keeps one row per segment version (see
`carechain.storage.attestations`), which is what audits challenge.

`storage.audit` (v2, operator or any registered party) carries miners' signed `AuditAnswer`s for the
current epoch and the final checkpoint whose seed drew the challenges. The rules derive each miner's
challenges (`attestations.challenges_for`, as of that checkpoint's tree size) and recompute the verdicts;
an answer must bind the digest of exactly those challenges (else the entry is refused: a client that asked
other challenges cannot frame an honest miner).
An answer not signed by the miner rejects the entry; null (no answer) counts as a failed audit only when
the operator files it. A failed audit slashes the bond ("failed_audit") and takes the miner out of
`miners.active_miners` until the epoch is settled. One audit per miner per epoch.

`storage.retrieval` files a requester's signed `RetrievalRequest` for a share on the ledger, with the
miner's signed `RetrievalAnswer` or null; the miner may file its answer later in the same epoch. A request
still unanswered when the epoch is settled counts against the miner ("unanswered_retrieval").

`checkpoint.final` (operator) records a final checkpoint: one cosignature point to each active miner that
cosigned it, in the current epoch. Table `final`, key "last": {"size", "root" (hex), "at"}.

`storage.settle` closes the current epoch and pays `pool` from "pool:miners" by `rewards_v2.split`.
The operator may settle at any time; anyone registered may settle once `EPOCH_MS` of attested time have
passed since the epoch began, with the standard pool (`standard_pool`), so payouts do not depend on the
operator. v1 `storage.audit` entries (operator-typed counts) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from carechain import envelope
from carechain.identity import device_id_for
from carechain.storage.attestations import (
    SHARES_TABLE,
    AttestationError,
    answers_challenges,
    audit_verdict,
    challenges_for,
    ledger_holdings,
    parse_audit_answer,
    parse_retrieval_answer,
    parse_retrieval_request,
    request_id,
    signer_of,
    verify_store_receipt,
)
from carechain.storage.placement import PlacementError, place_shares
from contract_rules import bonds, miners
from contract_rules.clock import attested_ms
from contract_rules.rewards import Reputation
from contract_rules.rewards_v2 import Tally, split
from contract_rules.runtime import Accept, Add, Effect, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import (
    CHECKPOINT_FINAL,
    STORAGE_AUDIT,
    STORAGE_COMMIT,
    STORAGE_RETRIEVAL,
    STORAGE_SETTLE,
    CheckpointFinal,
    StorageAuditV2,
    StorageCommitV2,
    StorageRetrieval,
    StorageSegmentV2,
    StorageSettle,
    StorageShareV2,
    parse,
)

NAME = "storage"
VERSION = 2
POOL = "pool:miners"
EPOCH_MS = 86_400_000  # a storage epoch lasts at least a day of attested time before anyone may settle it
POOL_DIVISOR = 30  # a settlement by anyone pays 1/30 of the pool: about a month of daily epochs
REPUTATION = "storage_reputation"  # miner → [audits passed, audits failed] (as in v1)


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == STORAGE_COMMIT:
        return _commit(state, tx)
    if tx.type == STORAGE_AUDIT:
        return _audit(state, tx)
    if tx.type == STORAGE_RETRIEVAL:
        return _retrieval(state, tx)
    if tx.type == STORAGE_SETTLE:
        return _settle(state, tx)
    if tx.type == CHECKPOINT_FINAL:
        return _checkpoint_final(state, tx)
    return Reject("not_a_storage_entry")


# -- storage.commit ------------------------------------------------------------------------------------

def _commit(state: State, tx: Tx) -> Outcome:
    if tx.payload.get("v") != 2:
        return Reject("commit_needs_a_seed_checkpoint")
    c = parse(StorageCommitV2, tx.payload)
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
    seed = _epoch_seed(state, c.seed_checkpoint, tx.index)
    if isinstance(seed, str):
        return Reject(seed)
    keys = miners.miner_keys(state)
    active = list(keys)
    old = prev["segments"] if prev is not None else []
    rows = state.table(SHARES_TABLE)
    effects: list[Effect] = []
    segments = []
    for i, seg in enumerate(c.segments):
        problem = _segment_problem(seg, i, c, old, seed, active) or _receipt_problem(seg, c, rows, keys)
        if problem is not None:
            return Reject(problem)
        if seg.version != c.revision and prev is not None and prev.get("chunk_size", c.chunk_size) != c.chunk_size:
            return Reject("chunk_size_changed")
        miners_, roots = [s.miner for s in seg.shares], [s.root for s in seg.shares]
        segments.append([seg.version, [[m, r] for m, r in zip(miners_, roots, strict=True)], seg.share_length])
        key = _row_key(c.dataset_id, i, seg.version)
        row = rows.get(key)
        if row is None or row["miners"] != miners_:
            at = tx.index if row is None else row["at"]
            effects.append(Put(SHARES_TABLE, key, {
                "dataset": c.dataset_id, "segment": i, "version": seg.version, "miners": miners_, "roots": roots,
                "length": seg.share_length, "chunk_size": c.chunk_size, "at": at, "dropped_at": None}))
    for i, (version, _shares, *_) in enumerate(old):  # versions this revision replaces or drops
        if i >= len(c.segments) or c.segments[i].version != version:
            row = rows.get(_row_key(c.dataset_id, i, version))
            if row is not None and row["dropped_at"] is None:
                effects.append(Put(SHARES_TABLE, _row_key(c.dataset_id, i, version), {**row, "dropped_at": tx.index}))
    record = {"owner": tx.signer, "pk": c.pk, "revision": c.revision, "k": c.k, "n": c.n, "length": c.length,
              "chunk_size": c.chunk_size, "at": tx.index, "segments": segments}
    return Accept((Put("datasets", c.dataset_id, record), *effects))


def _segment_problem(seg: StorageSegmentV2, i: int, c: StorageCommitV2, old: list[Any], seed: bytes,
                     active: list[str]) -> str | None:
    if seg.index != i:
        return "segments_out_of_order"
    if seg.version > c.revision:
        return "segment_version_after_revision"
    if [s.index for s in seg.shares] != list(range(c.n)):
        return "shares_out_of_order"
    if len({s.miner for s in seg.shares}) != c.n:
        return "two_shares_on_one_miner"
    if seg.version == c.revision:  # written by this revision: placed by the seed on the active miners
        try:
            placed = place_shares(seed, c.dataset_id, i, seg.version, active, c.n)
        except PlacementError:
            return "not_enough_active_miners"
        return None if [s.miner for s in seg.shares] == list(placed) else "shares_not_at_placement"
    if i >= len(old) or old[i][0] != seg.version:
        return "segment_version_not_on_ledger"
    before = old[i][1]
    if len(before) != c.n or [s.root for s in seg.shares] != [r for _, r in before]:
        return "segment_changed_without_new_version"
    if len(old[i]) > 2 and old[i][2] != seg.share_length:
        return "segment_changed_without_new_version"
    return _repair_problem(seg.shares, before, seed, c.dataset_id, i, seg.version, active)


def _receipt_problem(seg: StorageSegmentV2, c: StorageCommitV2, rows: dict[str, Any],
                     keys: dict[str, bytes]) -> str | None:
    """Each share not already acknowledged on the ledger (a new version, a repair, or a segment kept from a v1
    commit, which had no receipts) needs its miner's store receipt, and its miner must be active."""
    row = rows.get(_row_key(c.dataset_id, seg.index, seg.version))
    held = row["miners"] if row is not None and row["dropped_at"] is None else []
    for s in seg.shares:
        if held and held[s.index] == s.miner:
            continue  # acknowledged when it was placed
        pk = keys.get(s.miner)
        if pk is None or s.receipt is None or not verify_store_receipt(
                pk, s.receipt, c.dataset_id, seg.index, seg.version, s.index, s.root, seg.share_length, c.chunk_size):
            return "share_not_acknowledged_by_its_miner"
    return None


def _repair_problem(shares: list[StorageShareV2], before: list[list[str]], seed: bytes, dataset: str, segment: int,
                    version: int, active: list[str]) -> str | None:
    """Shares moved to new miners (a repair) must sit where placement puts them, old holders excluded."""
    moved = [s for s, (miner, _) in zip(shares, before, strict=True) if s.miner != miner]
    if not moved:
        return None
    try:
        placed = place_shares(seed, dataset, segment, version, active, len(moved), exclude=[m for m, _ in before])
    except PlacementError:
        return "not_enough_active_miners"
    return None if [s.miner for s in moved] == list(placed) else "repair_not_at_placement"


def _row_key(dataset: str, segment: int, version: int) -> str:
    return f"{dataset}|{segment}|{version}"


def _epoch_seed(state: State, note: str, index: int) -> bytes | str:
    final = epoch_final(state, note, index)
    return final if isinstance(final, str) else final.seed


def epoch_final(state: State, note: str, index: int | None = None) -> miners.FinalNote | str:
    """The final checkpoint of `note`, which must lie in the current epoch (no seed shopping in old ones), or
    why not: what a `storage.commit` or `storage.audit` seeded by `note` needs (`miners.final_note` reasons,
    or "seed_checkpoint_before_epoch")."""
    final = miners.final_note(state, note, index)
    if isinstance(final, str):
        return final
    if final.size < int(state.table("storage").get("epoch_start", 0)):
        return "seed_checkpoint_before_epoch"
    return final


# -- storage.audit -------------------------------------------------------------------------------------

def _audit(state: State, tx: Tx) -> Outcome:
    if tx.payload.get("v") != 2:
        return Reject("operator_counts_retired")
    a = parse(StorageAuditV2, tx.payload)
    if a is None:
        return Reject("bad_payload")
    epoch = miners.current_epoch(state)
    if a.epoch != epoch:
        return Reject("wrong_epoch")
    final = epoch_final(state, a.seed_checkpoint, tx.index)
    if isinstance(final, str):
        return Reject(final)
    holdings = ledger_holdings(state, final.size)
    parties = state.table("parties")
    reputation = state.table(REPUTATION)
    effects: list[Effect] = []
    for miner in sorted(a.answers):
        party = parties.get(miner)
        if party is None or party["role"] != "miner":
            return Reject("unknown_miner")
        if miners.count(state, epoch, "audit_passed", miner) or miners.count(state, epoch, "audit_failed", miner):
            return Reject("miner_already_audited")
        held = holdings.get(miner)
        if not held:
            return Reject("miner_holds_no_shares")
        data = a.answers[miner]
        if data is None:
            if tx.role != "operator":
                return Reject("only_the_operator_reports_silence")
            passed, reason = False, "no answer"
        else:
            try:
                answer = parse_audit_answer(data, party["pk"])
            except AttestationError as exc:
                signed = exc.reason not in ("bad_signature", "not_signed_by_the_miner")
                return Reject("bad_audit_answer" if signed else "answer_not_signed_by_the_miner")
            if answer.epoch != epoch or answer.seed != final.seed:
                return Reject("answer_for_another_audit")
            challenges = challenges_for(held, final.seed, miner)
            if not answers_challenges(challenges, answer):  # asked other challenges: evidence of nothing
                return Reject("answer_to_other_challenges")
            verdict = audit_verdict(challenges, answer)
            passed, reason = verdict.passed, verdict.reason
        p, f = reputation.get(miner, [0, 0])
        effects += [Add(miners.COUNTS, miners.count_key(epoch, "audit_passed" if passed else "audit_failed", miner), 1),
                    Put(REPUTATION, miner, [p + 1, f] if passed else [p, f + 1]),
                    Put("storage_audits", f"{epoch}:{miner}", {"passed": passed, "reason": reason, "at": tx.index,
                                                               "seed_size": final.size})]
        if not passed:
            effects += bonds.slash(state, miner, "failed_audit", tx.index)
    return Accept(tuple(effects))


# -- storage.retrieval ---------------------------------------------------------------------------------

def _retrieval(state: State, tx: Tx) -> Outcome:
    r = parse(StorageRetrieval, tx.payload)
    if r is None:
        return Reject("bad_payload")
    requester_key = _requester_key(state, r.request)
    if requester_key is None:
        return Reject("unknown_requester")
    try:
        req = parse_retrieval_request(r.request, requester_key)
    except AttestationError:
        return Reject("bad_retrieval_request")
    if tx.signer not in (req.requester, req.miner):
        return Reject("not_the_requester_or_the_miner")
    if req.requester == req.miner:
        return Reject("requester_is_the_miner")
    row = state.table(SHARES_TABLE).get(_row_key(req.dataset, req.segment, req.version))
    if row is None or row["dropped_at"] is not None or req.share >= len(row["miners"]):
        return Reject("not_a_share_on_the_ledger")
    if row["miners"][req.share] != req.miner:
        return Reject("miner_does_not_hold_the_share")
    if r.answer is not None:
        try:
            answer = parse_retrieval_answer(r.answer, state.table("parties")[req.miner]["pk"])
        except AttestationError:
            return Reject("answer_not_signed_by_the_miner")
        if answer.request != request_id(r.request):
            return Reject("answer_for_another_request")
        if answer.root != row["roots"][req.share]:
            return Reject("answer_for_another_share")
    elif tx.signer == req.miner:
        return Reject("miner_must_file_an_answer")
    epoch = miners.current_epoch(state)
    rid = request_id(r.request)
    answered = miners.count_key(epoch, "answered", req.miner)
    filed = state.table("retrievals").get(rid)
    if filed is not None:
        if filed["answered"]:
            return Reject("retrieval_already_answered")
        if r.answer is None:
            return Reject("retrieval_already_filed")
        if filed["epoch"] != epoch:
            return Reject("retrieval_epoch_closed")
        return Accept((Put("retrievals", rid, {**filed, "answered": True, "answered_at": tx.index}),
                       Add(miners.COUNTS, answered, 1)))
    once = f"{epoch}|{req.requester}|{req.dataset}|{req.segment}|{req.version}|{req.share}"
    if once in state.table("retrieval_keys"):
        return Reject("retrieval_already_filed")  # one request per share per requester per epoch: no farming
    record = {"epoch": epoch, "miner": req.miner, "requester": req.requester, "at": tx.index,
              "answered": r.answer is not None, "answered_at": tx.index if r.answer is not None else None}
    effects: list[Effect] = [Put("retrievals", rid, record), Put("retrieval_keys", once, rid)]
    if r.answer is not None:
        effects.append(Add(miners.COUNTS, answered, 1))
    else:
        pending = state.table("storage_pending").get(str(epoch), [])
        effects.append(Put("storage_pending", str(epoch), [*pending, rid]))
    return Accept(tuple(effects))


def _requester_key(state: State, request: bytes) -> bytes | None:
    """The key a request must verify with: its signer's registered key, or the key of the dataset's owner."""
    try:
        kid = signer_of(request)
        payload = envelope.parse(request).payload
    except (AttestationError, envelope.EnvelopeError):
        return None
    party = state.table("parties").get(kid)
    if party is not None:
        return bytes(party["pk"])
    name = payload.get("dataset") if isinstance(payload, dict) else None
    dataset = state.table("datasets").get(name) if isinstance(name, str) else None
    if isinstance(dataset, dict) and dataset["owner"] == kid and "pk" in dataset:
        return bytes(dataset["pk"])
    return None


# -- checkpoint.final ----------------------------------------------------------------------------------

def _checkpoint_final(state: State, tx: Tx) -> Outcome:
    c = parse(CheckpointFinal, tx.payload)
    if c is None:
        return Reject("bad_payload")
    final = miners.final_note(state, c.note, tx.index)
    if isinstance(final, str):
        return Reject(final)
    last = state.table("final").get("last")
    if last is not None and final.size <= last["size"]:
        return Reject("checkpoint_not_newer")
    epoch = miners.current_epoch(state)
    effects: list[Effect] = [Put("final", "last", {"size": final.size, "root": final.root.hex(), "at": tx.index}),
                             Add(miners.COUNTS, _finals_key(epoch), 1)]
    effects += [Add(miners.COUNTS, miners.count_key(epoch, "cosig", m), 1) for m in final.cosigners]
    return Accept(tuple(effects))


def _finals_key(epoch: int) -> str:
    return f"{epoch}:finals"


# -- storage.settle ------------------------------------------------------------------------------------

def standard_pool(state: State) -> int:
    """The pool a settlement by anyone but the operator must pay: 1/POOL_DIVISOR of "pool:miners"."""
    return state.balance(POOL) // POOL_DIVISOR


def _settle(state: State, tx: Tx) -> Outcome:
    s = parse(StorageSettle, tx.payload)
    if s is None:
        return Reject("bad_payload")
    epoch = miners.current_epoch(state)
    if s.epoch != epoch:
        return Reject("wrong_epoch")
    if s.pool > state.balance(POOL):
        return Reject("pool_exceeds_balance")
    meta = state.table("storage")
    now = attested_ms(state)
    if tx.role != "operator":
        started = meta.get("epoch_start_ms")
        if now is None or started is None or now < started + EPOCH_MS:
            return Reject("epoch_not_over")
        if s.pool != standard_pool(state):
            return Reject("not_the_standard_pool")
    result = epoch_result(state, s.pool)
    effects: list[Effect] = [Transfer(POOL, f"miner:{m}", n, f"storage epoch {epoch}")
                             for m, n in result["payouts"].items()]
    reputation = state.table(REPUTATION)
    for miner, (count, evidence) in sorted(result["unanswered"].items()):
        p, f = reputation.get(miner, [0, 0])
        effects += [Put(REPUTATION, miner, [p, f + count]),
                    *bonds.slash(state, miner, "unanswered_retrieval", evidence)]
    effects += [Put("storage_epochs", str(epoch), {"at": tx.index, "pool": s.pool, "payouts": result["payouts"],
                                                   "points": result["points"]}),
                Put("storage", "epoch", epoch + 1), Put("storage", "epoch_start", tx.index + 1),
                Put("storage", "epoch_start_ms", now)]
    return Accept(tuple(effects))


def tallies(state: State) -> tuple[dict[str, Tally], dict[str, tuple[int, int]], int]:
    """The current epoch's evidence: miner → Tally, miner → (unanswered retrievals, first one's leaf index),
    and the number of final checkpoints recorded. Only registered miners appear."""
    epoch = miners.current_epoch(state)
    retrievals = state.table("retrievals")
    unanswered: dict[str, tuple[int, int]] = {}
    for rid in state.table("storage_pending").get(str(epoch), []):
        filed = retrievals[rid]
        if not filed["answered"]:
            n, first = unanswered.get(filed["miner"], (0, filed["at"]))
            unanswered[filed["miner"]] = (n + 1, first)
    out = {}
    for m in miners.registered_miners(state):
        out[m] = Tally(cosigs=miners.count(state, epoch, "cosig", m),
                       audits_passed=miners.count(state, epoch, "audit_passed", m),
                       audits_failed=miners.count(state, epoch, "audit_failed", m),
                       answered=miners.count(state, epoch, "answered", m),
                       unanswered=unanswered.get(m, (0, 0))[0])
    return out, unanswered, int(state.table(miners.COUNTS).get(_finals_key(epoch), 0))


def epoch_result(state: State, pool: int) -> dict[str, Any]:
    """What settling the current epoch with `pool` pays: {"payouts": {miner: n}, "points": {miner: p},
    "unanswered": {miner: (count, evidence index)}}. Miners that are not admitted (bond) earn nothing."""
    tally, unanswered, finals = tallies(state)
    eligible = {m: t for m, t in tally.items() if bonds.is_admitted(state, m)}
    reputation = {m: Reputation(p, f) for m, (p, f) in state.table(REPUTATION).items()}
    for m, (count, _) in unanswered.items():
        reputation[m] = reputation.get(m, Reputation()).add(0, count)
    payouts = split(pool, eligible, reputation, finals)
    points = {m: t.points(finals) for m, t in eligible.items() if t.points(finals)}
    return {"payouts": payouts, "points": points, "unanswered": unanswered}


def commit_for(manifest: Any, pk: bytes, seed_checkpoint: str, receipts: Mapping[tuple[int, int, int], bytes],
               ts: int = 0) -> StorageCommitV2:
    """The `storage.commit` v2 payload for a `carechain.storage.manifest.Manifest` placed by `seed_checkpoint`.

    `receipts`: (segment, version, share) → the holder's store receipt, for every share not yet on the ledger
    as it is (shares the ledger already holds on the same miner need none).
    """
    segments = [StorageSegmentV2(index=s.index, version=s.version, share_length=s.shares[0].length,
                                 shares=[StorageShareV2(index=sh.index, miner=sh.miner, root=sh.root,
                                                        receipt=receipts.get((s.index, s.version, sh.index)))
                                         for sh in s.shares])
                for s in manifest.segments]
    return StorageCommitV2(pk=pk, dataset_id=manifest.dataset_id, revision=manifest.revision, k=manifest.k,
                           n=manifest.n, length=manifest.length, chunk_size=manifest.chunk_size, segments=segments,
                           seed_checkpoint=seed_checkpoint, ts=ts)
