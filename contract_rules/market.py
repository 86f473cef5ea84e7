"""Market rules (v1): consents, studies, contributions, results and payments (docs/market.md).

A patient's `consent.give` is kept in table `consents` under its leaf index; `consent.revoke` ends it. A
researcher's `study.post` locks the deposit (price × max_contributors + fee × aggregators) in
"study:<study_id>" and fixes the study's aggregators: `choose_aggregators` over the active miners, from
the seed of a final checkpoint, so neither the researcher nor the bridge picks who sees the shares. Each
`study.contribute` is checked against its consent on attested time (`contract_rules.clock`): the signer's,
unrevoked, unexpired, covering the kind and the query type, allowing this researcher, asking at most the
study's price, and disclosing the attributes the filter asks for; one per owner, at most max_contributors.

Every aggregator posts a `study.result`; the rules re-check what they can from public data (valid ⊆ the
contributions, the included set is `cohort` of the valid ones, the answer's shape, and without DP noise its
counts). When a majority of the aggregators posted the same result body the study is decided: answered, or
unanswered when nothing was included. Results are refused until every contribution lies under a final
checkpoint recorded on the ledger, so nobody can know the audit seed when contributing.

An answered study is audited. `study.sample` fixes the sample (`audit_sample`) from the seed of the latest final
checkpoint, which must be newer than the decision: exactly one note qualifies at any moment. Each sampled
contributor discloses her opening to the aggregators in a `study.disclose` (the logged access record) within
`AUDIT_WINDOW_MS`; each aggregator posts its `study.audit` verdict, and a majority verdict is the outcome.
`study.close` then pays each included contributor her consent's price — except a sampled one whose outcome is
"mismatch" or who never disclosed ("unopened"): she forfeits it to the researcher — each aggregator in the
majority its fee, and returns the rest. It waits while a sampled contribution has no outcome and the window is
open. An unanswered study, or one still undecided `CLOSE_GRACE_MS` after it closed, returns the whole deposit;
an answered one nobody sampled by then pays every included contributor (no audit was their fault).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from carechain import access as access_core
from carechain.events import SEALED_KINDS
from carechain.market import cohort  # the one cohort rule: aggregators and rules agree by construction
from contract_rules import miners as miner_rules
from contract_rules.clock import attested_ms
from contract_rules.runtime import Accept, Effect, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import (
    CONSENT_GIVE,
    CONSENT_REVOKE,
    STUDY_AUDIT,
    STUDY_CLOSE,
    STUDY_CONTRIBUTE,
    STUDY_DISCLOSE,
    STUDY_POST,
    STUDY_RESULT,
    STUDY_SAMPLE,
    ConsentGive,
    ConsentRevoke,
    StudyAudit,
    StudyClose,
    StudyContribute,
    StudyDisclose,
    StudyPost,
    StudyQuery,
    StudyResult,
    StudySample,
    parse,
)

__all__ = ["AUDIT_DIVISOR", "AUDIT_DOMAIN", "AUDIT_MAX", "AUDIT_WINDOW_MS", "CLOSE_GRACE_MS", "CONSENTS",
           "CONTRIBUTIONS", "FORFEITING_OUTCOMES", "STUDIES", "apply", "audit_sample", "audit_seed", "audit_size",
           "choose_aggregators", "cohort", "consent_problem", "consent_record", "deposit_of", "matches_filter",
           "study_account", "study_hash", "study_record"]

NAME = "market"
VERSION = 1

CONSENTS = "consents"
STUDIES = "studies"
CONTRIBUTIONS = "study_contributions"  # str(leaf index) → the contribution, for aggregators and audits
CLOSE_GRACE_MS = 86_400_000  # a day after closes_ms without a majority result, anyone may refund the study
STUDY_DOMAIN = b"carechain/market/study\x00"
AUDIT_DOMAIN = b"carechain/market/audit\x00"
AUDIT_WINDOW_MS = 86_400_000  # from the sample: a day to disclose, and for the aggregators to judge
AUDIT_MAX = 16  # contributions audited per study at most
AUDIT_DIVISOR = 20  # otherwise one in twenty of the included, at least one
FORFEITING_OUTCOMES = ("mismatch", "unopened")  # a sampled contribution with these outcomes is not paid
# The sealed kind each derived measure is computed from.
DERIVED_KINDS = {"resting_heart_rate": "heart_rate", "time_in_range": "glucose"}


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == CONSENT_GIVE:
        return _give(state, tx)
    if tx.type == CONSENT_REVOKE:
        return _revoke(state, tx)
    if tx.type == STUDY_POST:
        return _post(state, tx)
    if tx.type == STUDY_CONTRIBUTE:
        return _contribute(state, tx)
    if tx.type == STUDY_RESULT:
        return _result(state, tx)
    if tx.type == STUDY_SAMPLE:
        return _sample(state, tx)
    if tx.type == STUDY_DISCLOSE:
        return _disclose(state, tx)
    if tx.type == STUDY_AUDIT:
        return _audit(state, tx)
    if tx.type == STUDY_CLOSE:
        return _close(state, tx)
    return Reject("not_a_market_entry")


# -- public helpers: the one way aggregators, clients and `verify` compute these -----------------------

def study_hash(study_id: str) -> bytes:
    """What the aggregator draw of a study is keyed by: a domain-tagged SHA-256 of its id."""
    return hashlib.sha256(STUDY_DOMAIN + study_id.encode()).digest()


def choose_aggregators(seed: bytes, miners: list[str], n: int, study_id: str) -> list[str]:
    """`n` distinct aggregators for a study: `carechain.access.choose_miners` keyed by `study_hash`.

    Raises ValueError when there are fewer than `n` miners.
    """
    return access_core.choose_miners(seed, miners, n, study_hash(study_id))


def deposit_of(post: StudyPost) -> int:
    """What a study locks: every contributor's price at the maximum, and every aggregator's fee."""
    return post.price_minor * post.max_contributors + post.aggregator_fee_minor * post.aggregators


def audit_size(n: int) -> int:
    """How many of `n` included contributions are audited: one in `AUDIT_DIVISOR` (at least one, at most
    `AUDIT_MAX`); none of none."""
    return 0 if n <= 0 else min(n, AUDIT_MAX, max(1, math.ceil(n / AUDIT_DIVISOR)))


def audit_seed(final_seed: bytes, study_id: str) -> bytes:
    """The seed a study's sample is drawn from: domain-tagged, from a final checkpoint's cosignature seed
    (`miners.FinalNote.seed`, never the checkpoint hash alone) and the study."""
    return hashlib.sha256(AUDIT_DOMAIN + final_seed + study_hash(study_id)).digest()


def audit_sample(seed: bytes, included: list[int]) -> list[int]:
    """The `audit_size(len(included))` included leaf indexes with the smallest SHA-256(seed ‖ index as 8 bytes
    big-endian), ascending: a draw nobody can steer once the seed is fixed, and anyone can recompute."""
    ranked = sorted(set(included), key=lambda i: (hashlib.sha256(seed + i.to_bytes(8, "big")).digest(), i))
    return sorted(ranked[:audit_size(len(included))])


def study_account(study_id: str) -> str:
    return f"study:{study_id}"


def matches_filter(attributes: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a consent's disclosed attributes satisfy a study filter (every attribute it sets, equal)."""
    return all(value is None or attributes.get(name) == value for name, value in wanted.items())


def consent_problem(consent: dict[str, Any], study: dict[str, Any], owner: str, now_ms: int) -> str | None:
    """Why `consent` does not allow `owner` to contribute to `study` at `now_ms`, or None if it does."""
    if consent["owner"] != owner:
        return "not_your_consent"
    if consent["revoked_at"] is not None:
        return "consent_revoked"
    if consent["expires_ms"] <= now_ms:
        return "consent_expired"
    query = study["query"]
    if query["kind"] not in consent["kinds"]:
        return "consent_does_not_cover_kind"
    if query["type"] not in consent["queries"]:
        return "consent_does_not_cover_query"
    if consent["buyers"] and study["researcher"] not in consent["buyers"]:
        return "buyer_not_allowed"
    if consent["price_minor"] > study["price_minor"]:
        return "price_below_consent"
    if not matches_filter(consent["attributes"], study["filter"]):
        return "attributes_do_not_match"
    return None


def deadlines(state: State) -> list[int]:
    """The attested times at which some study can move on without a new entry from its parties: an open
    study's close (its aggregators compute) and the end of its grace, an audit window's end. The bridge
    attests the time once the wall clock passes one, so an idle ledger does not stall a study."""
    times: list[int] = []
    for study in state.table(STUDIES).values():
        if study["closed_at"] is not None:
            continue
        if study["state"] == "open":
            times += [study["closes_ms"], study["closes_ms"] + CLOSE_GRACE_MS]
        elif study.get("audit") is not None:
            times.append(study["audit"]["window_ends_ms"])
    return sorted(times)


def study_record(state: State, study_id: str) -> dict[str, Any] | None:
    record: dict[str, Any] | None = state.table(STUDIES).get(study_id)
    return record


def consent_record(state: State, index: int) -> dict[str, Any] | None:
    record: dict[str, Any] | None = state.table(CONSENTS).get(str(index))
    return record


# -- consents -------------------------------------------------------------------------------------------

def _give(state: State, tx: Tx) -> Outcome:
    c = parse(ConsentGive, tx.payload)
    if c is None:
        return Reject("bad_payload")
    if len(set(c.kinds)) != len(c.kinds) or not set(c.kinds) <= SEALED_KINDS:
        return Reject("bad_kinds")
    if len(set(c.queries)) != len(c.queries):
        return Reject("duplicate_queries")
    parties = state.table("parties")
    if len(set(c.buyers)) != len(c.buyers):
        return Reject("duplicate_buyers")
    if any(b not in parties or parties[b]["role"] != "researcher" for b in c.buyers):
        return Reject("unknown_buyer")
    now = attested_ms(state)
    if c.expires_ms <= max(c.ts, now or 0):
        return Reject("consent_expired")
    record = {**c.model_dump(exclude={"v", "nonce"}), "owner": tx.signer, "at": tx.index, "revoked_at": None}
    return Accept((Put(CONSENTS, str(tx.index), record),))


def _revoke(state: State, tx: Tx) -> Outcome:
    r = parse(ConsentRevoke, tx.payload)
    if r is None:
        return Reject("bad_payload")
    record = consent_record(state, r.consent)
    if record is None:
        return Reject("unknown_consent")
    if record["owner"] != tx.signer:
        return Reject("not_the_owner")
    if record["revoked_at"] is not None:
        return Reject("consent_already_revoked")
    return Accept((Put(CONSENTS, str(r.consent), {**record, "revoked_at": tx.index}),))


# -- studies --------------------------------------------------------------------------------------------

def _query_problem(q: StudyQuery) -> str | None:
    if q.kind not in SEALED_KINDS:
        return "bad_kind"
    if q.type in DERIVED_KINDS and DERIVED_KINDS[q.type] != q.kind:
        return "measure_needs_other_kind"
    if q.lo > q.hi:
        return "bad_bounds"
    if (q.type == "histogram") != (q.bins is not None):
        return "bins_only_for_histograms"
    if q.bins is not None and any(a >= b for a, b in zip(q.bins, q.bins[1:], strict=False)):
        return "bins_not_ascending"
    return None


def _post(state: State, tx: Tx) -> Outcome:
    p = parse(StudyPost, tx.payload)
    if p is None:
        return Reject("bad_payload")
    if p.study_id in state.table(STUDIES):
        return Reject("duplicate_study")
    problem = _query_problem(p.query)
    if problem is not None:
        return Reject(problem)
    if p.from_ms > p.to_ms:
        return Reject("bad_time_range")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if p.closes_ms <= now:
        return Reject("study_already_closed")
    seed = miner_rules.verify_final_note(state, p.seed_checkpoint, tx.index)
    if isinstance(seed, str):
        return Reject(seed)
    try:
        chosen = choose_aggregators(seed, miner_rules.active_miners(state), p.aggregators, p.study_id)
    except ValueError:
        return Reject("not_enough_miners")
    deposit = deposit_of(p)
    researcher = f"researcher:{tx.signer}"
    if state.balance(researcher) < deposit:
        return Reject("insufficient_funds")
    record = {**p.model_dump(exclude={"v", "seed_checkpoint", "aggregators"}), "researcher": tx.signer,
              "aggregators": chosen, "deposit": deposit, "seed": seed, "contributions": [], "owners": [],
              "results": {}, "decided": None, "audit": None, "state": "open", "closed_at": None, "at": tx.index}
    effects: list[Effect] = [Put(STUDIES, p.study_id, record)]
    if deposit:
        effects.insert(0, Transfer(researcher, study_account(p.study_id), deposit, f"study deposit {p.study_id}"))
    return Accept(tuple(effects))


def _contribute(state: State, tx: Tx) -> Outcome:
    c = parse(StudyContribute, tx.payload)
    if c is None:
        return Reject("bad_payload")
    study = study_record(state, c.study_id)
    if study is None:
        return Reject("unknown_study")
    if study["state"] != "open":
        return Reject("study_not_open")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if now >= study["closes_ms"]:
        return Reject("study_closed")
    if len(c.shares) != len(study["aggregators"]):
        return Reject("shares_do_not_match_aggregators")
    if len(set(c.leaves)) != len(c.leaves) or any(leaf >= tx.index for leaf in c.leaves):
        return Reject("bad_leaves")
    consent = consent_record(state, c.consent)
    if consent is None:
        return Reject("unknown_consent")
    problem = consent_problem(consent, study, tx.signer, now)
    if problem is not None:
        return Reject(problem)
    if tx.signer in study["owners"]:
        return Reject("already_contributed")
    if len(study["contributions"]) >= study["max_contributors"]:
        return Reject("study_full")
    contribution = {**c.model_dump(exclude={"v"}), "owner": tx.signer, "min_cohort": consent["min_cohort"],
                    "price_minor": consent["price_minor"], "at": tx.index}
    updated = {**study, "contributions": [*study["contributions"], tx.index],
               "owners": [*study["owners"], tx.signer]}
    return Accept((Put(STUDIES, c.study_id, updated), Put(CONTRIBUTIONS, str(tx.index), contribution)))


def _answer_problem(r: StudyResult, study: dict[str, Any]) -> str | None:
    """Why the answer does not fit the study's query (its shape; without noise also its counts)."""
    query, n, exact = study["query"], len(r.included), study["epsilon_milli"] == 0
    if r.answer is None:
        return "missing_answer" if n else None
    if not n:
        return "answer_without_cohort"
    answer = r.answer
    if query["type"] == "count":
        if set(answer) != {"count"} or not isinstance(answer["count"], int):
            return "bad_answer_shape"
        return "count_does_not_match_included" if exact and answer["count"] != n else None
    if query["type"] == "sum":
        return None if set(answer) == {"sum"} and isinstance(answer["sum"], int) else "bad_answer_shape"
    if query["type"] == "histogram":
        counts = answer.get("histogram")
        if set(answer) != {"histogram"} or not isinstance(counts, list) or len(counts) != len(query["bins"]) - 1:
            return "bad_answer_shape"
        return "histogram_does_not_match_included" if exact and (sum(counts) != n or min(counts) < 0) else None
    # mean and the derived measures: a sum over n
    if set(answer) != {"sum", "n"} or not isinstance(answer["sum"], int) or not isinstance(answer["n"], int):
        return "bad_answer_shape"
    return "n_does_not_match_included" if exact and answer["n"] != n else None


def _result(state: State, tx: Tx) -> Outcome:
    r = parse(StudyResult, tx.payload)
    if r is None:
        return Reject("bad_payload")
    study = study_record(state, r.study_id)
    if study is None:
        return Reject("unknown_study")
    if tx.signer not in study["aggregators"]:
        return Reject("not_an_aggregator")
    if study["state"] != "open":
        return Reject("study_already_decided")
    if tx.signer in study["results"]:
        return Reject("result_already_posted")
    if study["contributions"] and miner_rules.final_size(state) <= max(study["contributions"]):
        return Reject("contributions_not_final")  # aggregators compute over final contributions only
    contributions = set(study["contributions"])
    if r.valid != sorted(set(r.valid)) or not set(r.valid) <= contributions:
        return Reject("bad_valid_set")
    if r.invalid > len(contributions) - len(r.valid):
        return Reject("bad_invalid_count")
    table = state.table(CONTRIBUTIONS)
    if r.included != cohort([(i, table[str(i)]["min_cohort"]) for i in r.valid]):
        return Reject("included_not_by_cohort_rule")
    if r.noise.epsilon_milli != study["epsilon_milli"]:
        return Reject("noise_does_not_match_study")
    problem = _answer_problem(r, study)
    if problem is not None:
        return Reject(problem)
    digest = hashlib.sha256(r.result_body()).hexdigest()
    results = {**study["results"], tx.signer: {"digest": digest, "at": tx.index}}
    updated: dict[str, Any] = {**study, "results": results}
    agreeing = sorted(m for m, posted in results.items() if posted["digest"] == digest)
    if len(agreeing) >= len(study["aggregators"]) // 2 + 1:
        updated["decided"] = {**r.model_dump(exclude={"v", "ts", "study_id"}), "digest": digest,
                              "aggregators": agreeing, "at": tx.index}
        updated["state"] = "unanswered" if r.answer is None else "answered"
    return Accept((Put(STUDIES, r.study_id, updated),))


def _close(state: State, tx: Tx) -> Outcome:
    c = parse(StudyClose, tx.payload)
    if c is None:
        return Reject("bad_payload")
    study = study_record(state, c.study_id)
    if study is None:
        return Reject("unknown_study")
    if study["closed_at"] is not None:
        return Reject("study_already_closed")
    now = attested_ms(state)
    final_state = study["state"]
    if final_state == "open":
        if now is None or now < study["closes_ms"] + CLOSE_GRACE_MS:
            return Reject("study_not_decided")
        final_state = "unanswered"  # no majority in time: nobody is paid, the researcher gets it all back
    audit = study.get("audit")
    forfeited: list[int] = []
    if final_state == "answered":
        if audit is None:
            if now is None or now < study["closes_ms"] + CLOSE_GRACE_MS:
                return Reject("audit_not_sampled")
            # Nobody sampled it by the grace: no audit happened, which is not the contributors' fault.
        else:
            outcome = dict(audit["outcome"])
            pending = [i for i in audit["sample"] if str(i) not in outcome]
            if pending and (now is None or now < audit["window_ends_ms"]):
                return Reject("audit_pending")
            for index in pending:  # the window is over: disclosed but no majority, or never disclosed
                outcome[str(index)] = "undecided" if str(index) in audit["disclosed"] else "unopened"
            forfeited = sorted(i for i in audit["sample"] if outcome[str(i)] in FORFEITING_OUTCOMES)
            audit = {**audit, "outcome": outcome, "forfeited": forfeited}
    account, study_id = study_account(c.study_id), c.study_id
    remaining = state.balance(account)
    effects: list[Effect] = []
    if final_state == "answered":
        contributions = state.table(CONTRIBUTIONS)
        for index in study["decided"]["included"]:
            contribution = contributions[str(index)]
            if contribution["price_minor"] and index not in forfeited:  # a forfeit stays in the refund
                effects.append(Transfer(account, f"patient:{contribution['owner']}", contribution["price_minor"],
                                        f"study {study_id} contribution {index}"))
                remaining -= contribution["price_minor"]
        if study["aggregator_fee_minor"]:
            for miner in study["decided"]["aggregators"]:
                effects.append(Transfer(account, f"miner:{miner}", study["aggregator_fee_minor"],
                                        f"study {study_id} aggregator"))
                remaining -= study["aggregator_fee_minor"]
    if remaining:
        effects.append(Transfer(account, f"researcher:{study['researcher']}", remaining, f"study {study_id} refund"))
    effects.append(Put(STUDIES, study_id, {**study, "state": final_state, "audit": audit, "closed_at": tx.index}))
    return Accept(tuple(effects))


# -- audits ---------------------------------------------------------------------------------------------

def _sample(state: State, tx: Tx) -> Outcome:
    s = parse(StudySample, tx.payload)
    if s is None:
        return Reject("bad_payload")
    study = study_record(state, s.study_id)
    if study is None:
        return Reject("unknown_study")
    if study["closed_at"] is not None:
        return Reject("study_already_closed")
    if study["state"] != "answered":
        return Reject("study_not_answered")
    if study.get("audit") is not None:
        return Reject("already_sampled")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    final = miner_rules.final_note(state, s.seed_checkpoint, tx.index)
    if isinstance(final, str):
        return Reject(final)
    if final.size <= study["decided"]["at"]:
        return Reject("checkpoint_before_decision")  # its seed could have been known when the result was signed
    if final.size != miner_rules.final_size(state) or not _is_the_recorded_note(state, final):
        return Reject("not_the_latest_final_checkpoint")
    seed = audit_seed(final.seed, s.study_id)
    audit = {"seed": seed.hex(), "size": final.size, "sample": audit_sample(seed, study["decided"]["included"]),
             "at": tx.index, "window_ends_ms": now + AUDIT_WINDOW_MS, "disclosed": {}, "verdicts": {}, "outcome": {}}
    return Accept((Put(STUDIES, s.study_id, {**study, "audit": audit}),))


def _is_the_recorded_note(state: State, final: miner_rules.FinalNote) -> bool:
    """Whether `final` is the very note `checkpoint.final` recorded, when the record keeps its seed: the same
    checkpoint with other signature lines (fewer cosignatures, or lines by unknown keys) has another seed."""
    last = state.table("final").get("last") or {}
    recorded = last.get("seed")
    return recorded is None or recorded == final.seed.hex()


def _audited(state: State, study_id: str, contribution: int) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """The study and its audit, when `contribution` is in its open sample; otherwise the reason."""
    study = study_record(state, study_id)
    if study is None:
        return "unknown_study"
    if study["closed_at"] is not None:
        return "study_already_closed"
    audit = study.get("audit")
    if audit is None:
        return "not_sampled"
    if contribution not in audit["sample"]:
        return "not_in_sample"
    return study, audit


def _window_problem(state: State, audit: dict[str, Any]) -> str | None:
    now = attested_ms(state)
    if now is None:
        return "no_attested_time"
    return "audit_window_over" if now >= audit["window_ends_ms"] else None


def _disclose(state: State, tx: Tx) -> Outcome:
    d = parse(StudyDisclose, tx.payload)
    if d is None:
        return Reject("bad_payload")
    found = _audited(state, d.study_id, d.contribution)
    if isinstance(found, str):
        return Reject(found)
    study, audit = found
    if state.table(CONTRIBUTIONS)[str(d.contribution)]["owner"] != tx.signer:
        return Reject("not_the_contributor")
    if str(d.contribution) in audit["disclosed"]:
        return Reject("already_disclosed")
    problem = _window_problem(state, audit)
    if problem is not None:
        return Reject(problem)
    if len(d.keys) != len(study["aggregators"]):
        return Reject("keys_do_not_match_aggregators")
    if len({(e.dev, e.epoch) for e in d.epochs}) != len(d.epochs):
        return Reject("duplicate_epochs")
    audit = {**audit, "disclosed": {**audit["disclosed"], str(d.contribution): tx.index}}
    return Accept((Put(STUDIES, d.study_id, {**study, "audit": audit}),))


def _audit(state: State, tx: Tx) -> Outcome:
    a = parse(StudyAudit, tx.payload)
    if a is None:
        return Reject("bad_payload")
    if (a.verdict == "match") != (a.reason == ""):
        return Reject("bad_reason")  # a mismatch names what failed; a match has nothing to name
    found = _audited(state, a.study_id, a.contribution)
    if isinstance(found, str):
        return Reject(found)
    study, audit = found
    if tx.signer not in study["aggregators"]:
        return Reject("not_an_aggregator")
    key = str(a.contribution)
    if key not in audit["disclosed"]:
        return Reject("not_disclosed")
    verdicts = audit["verdicts"].get(key, {})
    if tx.signer in verdicts:
        return Reject("verdict_already_posted")
    problem = _window_problem(state, audit)
    if problem is not None:
        return Reject(problem)
    verdicts = {**verdicts, tx.signer: a.verdict}
    audit = {**audit, "verdicts": {**audit["verdicts"], key: verdicts}}
    if sum(v == a.verdict for v in verdicts.values()) >= len(study["aggregators"]) // 2 + 1:
        audit["outcome"] = {**audit["outcome"], key: a.verdict}  # two verdicts cannot both reach a majority
    return Accept((Put(STUDIES, a.study_id, {**study, "audit": audit}),))
