"""What `carechain verify study ID` checks, offline, from ledger data alone (docs/market.md, "Verifying a study").

Sans-IO: the caller hands in the log's leaves, its genesis and a checkpoint it has already verified against the
log's key; `verify_study` replays the leaves through the contract rules once and, at the leaves that matter,
re-derives what the rules decided from public data rather than reading it back:

- the study's aggregators: the seed of its `seed_checkpoint` must be final (majority-cosigned by the miners
  active at the post) and `choose_aggregators` over those miners must give exactly the study's aggregators;
- every counted contribution's consent was valid when used (the owner's, unrevoked, unexpired on attested
  time, covering the kind, query type, buyer, price and filter) — re-checked here, so a contract that counted a
  revoked consent is caught, not trusted;
- each aggregator's `study.result` signature under its registered key, and that a majority of the study's
  aggregators signed the same result body, the one the study was decided by;
- the cohort rule recomputed (`carechain.market.cohort` over the consents' `min_cohort`), the stated DP epsilon
  equal to the study's, and without noise the answer's counts equal to the included set;
- every contribution anchored: the checkpoint's root is the Merkle root of the first tree_size leaves, and
  every contribution and result lies within it;
- the audit: the `study.sample` note was final, newer than the decision, and the very note the latest
  `checkpoint.final` recorded then, and `audit_sample` of its seed is the recorded sample; each accepted
  disclosure was by the contribution's owner, of a sampled contribution, within the window; each counted verdict
  by one of the study's aggregators, on a disclosed contribution, within the window, and the outcomes are the
  majority verdicts (at close: "undecided" when disclosed, "unopened" when not) — all re-derived from the
  entries, not read back; a study closed unaudited is reported as such;
- the payments of `study.close`: what each account received equals what the rules owe (every included
  contribution but the forfeited ones), and the supply is conserved.

What it cannot check is whether the aggregators computed the answer from the shares (they hold them; nobody
else can open them), nor whether an auditor's verdict is right (the disclosure is sealed to the aggregators):
both rest on an honest majority of aggregators, as the MPC's privacy does.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from carechain import envelope, merkle
from carechain.checkpoint import Checkpoint
from carechain.entries import (
    CHECKPOINT_FINAL,
    STUDY_AUDIT,
    STUDY_CLOSE,
    STUDY_CONTRIBUTE,
    STUDY_DISCLOSE,
    STUDY_POST,
    STUDY_RESULT,
    STUDY_SAMPLE,
    Entry,
    EntryError,
)
from carechain.market import cohort
from contract_rules import market as rules
from contract_rules import miners as miner_rules
from contract_rules.clock import attested_ms
from contract_rules.replay import decode_leaf
from contract_rules.runtime import OK, CodeBook, Genesis, Runtime, State
from contract_rules.transactions import (
    CheckpointFinal,
    StudyAudit,
    StudyDisclose,
    StudyPost,
    StudyResult,
    StudySample,
    parse,
)

__all__ = ["Finding", "Report", "StudyReport", "verify_study"]


@dataclass(frozen=True)
class Finding:
    """One check: its name, whether it held, and what was found (the input that failed, when it failed)."""

    check: str
    ok: bool
    detail: str


@dataclass
class Report:
    """Every check a verifier ran, in order (the base of each verifier's report): it holds when there were checks
    and all of them held."""

    findings: list[Finding] = field(default_factory=list, kw_only=True)

    @property
    def ok(self) -> bool:
        return bool(self.findings) and all(f.ok for f in self.findings)

    def add(self, check: str, ok: bool, detail: str) -> None:
        self.findings.append(Finding(check, ok, detail))

    def checks(self) -> list[dict[str, Any]]:
        """The findings as JSON objects, for a report's `as_dict`."""
        return [{"check": f.check, "ok": f.ok, "detail": f.detail} for f in self.findings]

    def entries(self, leaves: Iterable[bytes]) -> Iterator[tuple[int, Entry]]:
        """Each leaf as a ledger entry, with its index, in order. At a leaf that is not one, the "replay" check
        fails and the iteration stops: the verifier then reports that alone (no honest log holds such a leaf)."""
        for index, leaf in enumerate(leaves):
            try:
                entry = decode_leaf(leaf)
            except EntryError as exc:
                self.add("replay", False, f"leaf {index} is not a ledger entry: {exc}")
                return
            yield index, entry


@dataclass
class StudyReport(Report):
    """Every check `verify_study` ran on one study, and what the study came to."""

    study_id: str
    state: str | None = None
    answer: dict[str, Any] | None = None
    included: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "study_id": self.study_id, "state": self.state, "answer": self.answer,
                "included": self.included, "checks": self.checks()}


@dataclass
class _Seen:
    """What the single replay pass captured at the leaves of this study."""

    post_index: int | None = None
    aggregators: str | None = None  # the seed's draw, comma-joined, or why there is none
    consent_problems: dict[int, str] = field(default_factory=dict)  # accepted contribution → why its consent fails
    min_cohort: dict[int, int] = field(default_factory=dict)  # accepted contribution → its consent's min_cohort
    price: dict[int, int] = field(default_factory=dict)  # accepted contribution → its consent's price
    owner: dict[int, str] = field(default_factory=dict)
    results: dict[str, tuple[int, StudyResult]] = field(default_factory=dict)  # aggregator → its first result
    bad_signatures: list[int] = field(default_factory=list)
    close_index: int | None = None
    close_deltas: dict[str, int] = field(default_factory=dict)
    close_supply: tuple[int, int] = (0, 0)
    close_escrow: int = 0  # what "study:<id>" held just before study.close
    close_ms: int | None = None  # the attested time study.close was judged on
    # The seed of the note the latest accepted checkpoint.final recorded (None: none yet), as of the current leaf.
    final_seed: bytes | None = None
    final_candidate: tuple[int, bytes] | None = None  # a checkpoint.final leaf and its note's seed, until judged
    sample: _Sampled | None = None  # the first accepted study.sample, as the verifier re-derives it
    # Each disclose and audit leaf of the study, with the attested time it was judged on; judged after the replay.
    discloses: list[tuple[int, str, StudyDisclose, int | None]] = field(default_factory=list)
    audits: list[tuple[int, str, StudyAudit, int | None]] = field(default_factory=list)


@dataclass(frozen=True)
class _Sampled:
    """A study.sample leaf and what the verifier makes of it from the state just before it."""

    index: int
    problem: str | None  # why its note does not fix the sample, or None
    sample: list[int]
    seed: str
    window_ends_ms: int


def _study_of(entry: Entry) -> tuple[envelope.Sign1, str] | None:
    try:
        msg = envelope.parse(entry.cose)
    except envelope.EnvelopeError:
        return None
    payload = msg.payload
    if not isinstance(payload, dict) or not isinstance(payload.get("study_id"), str):
        return None
    return msg, payload["study_id"]


def _chosen(state: State, post: StudyPost, index: int) -> list[str] | str:
    """The aggregators the post's seed checkpoint gives over the miners active at its leaf, or why none."""
    seed = miner_rules.verify_final_note(state, post.seed_checkpoint, index)
    if isinstance(seed, str):
        return f"the seed checkpoint is not final at leaf {index}: {seed}"
    try:
        return rules.choose_aggregators(seed, miner_rules.active_miners(state), post.aggregators, post.study_id)
    except ValueError as exc:
        return str(exc)


def _before(seen: _Seen, state: State, index: int, entry: Entry, study_id: str) -> None:
    """Capture what a study leaf is judged on, from the state just before it."""
    if entry.type == CHECKPOINT_FINAL:
        _final_candidate(seen, state, index, entry)
        return
    found = _study_of(entry)
    if found is None or found[1] != study_id:
        return
    msg, _ = found
    if entry.type == STUDY_POST and seen.post_index is None:
        post = parse(StudyPost, msg.payload)
        if post is not None:
            seen.post_index = index
            chosen = _chosen(state, post, index)
            seen.aggregators = chosen if isinstance(chosen, str) else ",".join(chosen)
    elif entry.type == STUDY_CONTRIBUTE:
        study = rules.study_record(state, study_id)
        consent_index = msg.payload.get("consent")
        consent = rules.consent_record(state, consent_index) if isinstance(consent_index, int) else None
        now = attested_ms(state)
        if study is None:
            return
        if consent is None:
            seen.consent_problems[index] = "unknown_consent"
        elif now is None:
            seen.consent_problems[index] = "no_attested_time"
        else:
            problem = rules.consent_problem(consent, study, msg.kid, now)
            if problem is not None:
                seen.consent_problems[index] = problem
            seen.min_cohort[index] = int(consent["min_cohort"])
            seen.price[index] = int(consent["price_minor"])
        seen.owner[index] = msg.kid
    elif entry.type == STUDY_RESULT:
        study = rules.study_record(state, study_id)
        result = parse(StudyResult, msg.payload)
        if study is None or result is None or msg.kid not in study["aggregators"]:
            return
        pk = state.table("parties").get(msg.kid, {}).get("pk")
        if pk is None or not msg.verify(bytes(pk)):
            seen.bad_signatures.append(index)
            return
        seen.results.setdefault(msg.kid, (index, result))
    elif entry.type == STUDY_SAMPLE:
        _sample_candidate(seen, state, index, msg.payload, study_id)
    elif entry.type == STUDY_DISCLOSE:
        disclose = parse(StudyDisclose, msg.payload)
        if disclose is not None:
            seen.discloses.append((index, msg.kid, disclose, attested_ms(state)))
    elif entry.type == STUDY_AUDIT:
        audit = parse(StudyAudit, msg.payload)
        if audit is not None:
            seen.audits.append((index, msg.kid, audit, attested_ms(state)))
    elif entry.type == STUDY_CLOSE and seen.close_index is None:
        seen.close_index = index
        seen.close_ms = attested_ms(state)
        seen.close_deltas = dict(state.balances)
        seen.close_supply = (sum(state.balances.values()), 0)
        seen.close_escrow = state.balance(rules.study_account(study_id))


def _final_candidate(seen: _Seen, state: State, index: int, entry: Entry) -> None:
    """Remember a checkpoint.final leaf's note seed; it becomes the recorded one if the rules accept the leaf."""
    try:
        record = parse(CheckpointFinal, envelope.parse(entry.cose).payload)
    except envelope.EnvelopeError:
        return
    final = None if record is None else miner_rules.final_note(state, record.note, index)
    if final is not None and not isinstance(final, str):
        seen.final_candidate = (index, final.seed)


def _sample_candidate(seen: _Seen, state: State, index: int, payload: Any, study_id: str) -> None:  # noqa: ANN401
    """Re-derive the sample a study.sample leaf fixes; kept if the rules accept the leaf and none came before."""
    sample = parse(StudySample, payload)
    study = rules.study_record(state, study_id)
    now = attested_ms(state)
    if seen.sample is not None or sample is None or study is None or study["decided"] is None or now is None:
        return
    final = miner_rules.final_note(state, sample.seed_checkpoint, index)
    if isinstance(final, str):
        seen.sample = _Sampled(index, f"its note is not final at leaf {index}: {final}", [], "", 0)
        return
    seed = rules.audit_seed(final.seed, study_id)
    problem = None
    if final.size <= study["decided"]["at"]:
        problem = f"its note (size {final.size}) is not newer than the decision at leaf {study['decided']['at']}"
    elif final.size != miner_rules.final_size(state) or final.seed != seen.final_seed:
        problem = (f"its note (size {final.size}) is not the one the latest checkpoint.final recorded "
                   f"(size {miner_rules.final_size(state)}) at leaf {index}")
    seen.sample = _Sampled(index, problem, rules.audit_sample(seed, study["decided"]["included"]), seed.hex(),
                           now + rules.AUDIT_WINDOW_MS)


def verify_study(leaves: Sequence[bytes], genesis: Genesis, study_id: str, checkpoint: Checkpoint | None = None,
                 code: CodeBook | None = None) -> StudyReport:
    """Check study `study_id` from the log's `leaves` (all of them, in order) and its `genesis`.

    `checkpoint` is a tree head the caller verified against the log's key: the leaves must hash to its root,
    and every leaf of the study must lie within it. Without one the anchoring check fails (nothing to anchor to).
    `code` holds contract code beyond the builtin modules, when the genesis or an upgrade names some.
    """
    report = StudyReport(study_id)
    runtime = Runtime(genesis, code)
    seen = _Seen()
    results: dict[int, str] = {}
    for index, entry in report.entries(leaves):
        _before(seen, runtime.state, index, entry, study_id)
        results[index] = runtime.apply(entry)
        if seen.final_candidate is not None:
            if seen.final_candidate[0] == index and results[index] == OK:
                seen.final_seed = seen.final_candidate[1]
            seen.final_candidate = None
        if seen.sample is not None and seen.sample.index == index and results[index] != OK:
            seen.sample = None  # refused by the rules: a later sample leaf may be the one
        if index == seen.close_index:
            after = runtime.state.balances
            before = seen.close_deltas
            seen.close_deltas = {a: after.get(a, 0) - before.get(a, 0) for a in set(before) | set(after)
                                 if after.get(a, 0) != before.get(a, 0)}
            seen.close_supply = (seen.close_supply[0], sum(after.values()))
    if report.findings:  # a leaf that is not a ledger entry
        return report
    state = runtime.state
    study = rules.study_record(state, study_id)
    if study is None or seen.post_index is None:
        report.add("replay", False, f"no accepted study.post for study {study_id!r} in {len(leaves)} leaves")
        return report
    report.state, report.answer = study["state"], (study["decided"] or {}).get("answer")
    report.add("replay", True, f"{len(leaves)} leaves replayed; study posted at leaf {study['at']}, "
                               f"{len(study['contributions'])} contributions accepted, state {study['state']}")
    _aggregator_findings(report, seen, study)
    counted = _consent_findings(report, seen, study)
    _result_findings(report, seen, study, counted, results)
    _anchor_findings(report, leaves, checkpoint, study, seen)
    forfeited = _audit_findings(report, seen, study)
    _payment_findings(report, seen, study, state, forfeited)
    return report


def _aggregator_findings(report: StudyReport, seen: _Seen, study: dict[str, Any]) -> None:
    expected = ",".join(study["aggregators"])
    if seen.aggregators == expected:
        report.add("aggregators", True, f"{len(study['aggregators'])} aggregators drawn from the final seed "
                                        f"checkpoint over the active miners: {expected}")
    else:
        report.add("aggregators", False, f"the study names {expected}, but its seed checkpoint gives "
                                         f"{seen.aggregators}")


def _consent_findings(report: StudyReport, seen: _Seen, study: dict[str, Any]) -> set[int]:
    contributions = list(study["contributions"])
    bad = {i: seen.consent_problems[i] for i in contributions if i in seen.consent_problems}
    owners = Counter(seen.owner.get(i) for i in contributions)
    twice = sorted(o for o, n in owners.items() if n > 1 and o is not None)
    if bad:
        report.add("consents", False, "contributions counted under a consent that did not allow them: " +
                   ", ".join(f"leaf {i} ({why})" for i, why in sorted(bad.items())))
    elif twice:
        report.add("consents", False, f"owners contributed more than once: {', '.join(twice)}")
    else:
        report.add("consents", True, f"all {len(contributions)} contributions used a consent valid on attested "
                                     "time (owner's, unrevoked, unexpired, covering kind, query, buyer, price, filter)")
    return {i for i in contributions if i not in bad}


def _result_findings(report: StudyReport, seen: _Seen, study: dict[str, Any], counted: set[int],
                     results: dict[int, str]) -> None:
    aggregators = study["aggregators"]
    majority = len(aggregators) // 2 + 1
    if seen.bad_signatures:
        report.add("result signatures", False, "study.result leaves not signed by their aggregator's registered "
                   f"key: {', '.join(map(str, seen.bad_signatures))}")
    else:
        report.add("result signatures", True, f"{len(seen.results)} aggregators' results carry valid signatures")
    bodies: dict[str, list[str]] = {}
    for miner, (index, result) in seen.results.items():
        if results.get(index) == OK:
            bodies.setdefault(hashlib.sha256(result.result_body()).hexdigest(), []).append(miner)
    agreed = [(digest, miners) for digest, miners in bodies.items() if len(miners) >= majority]
    decided = study["decided"]
    if not agreed:
        if decided is not None:
            report.add("majority", False, "the study is decided, but no majority of its aggregators signed one result")
        elif study["state"] == "open" and study["closed_at"] is None:
            report.add("majority", False, f"no majority result yet ({len(seen.results)} of {len(aggregators)} "
                                          f"aggregators posted; {majority} must agree)")
        else:
            report.add("majority", True, "no majority result: the study closed unanswered and was refunded")
        return
    digest, miners = agreed[0]
    if decided is None or decided["digest"] != digest or sorted(decided["aggregators"]) != sorted(miners):
        report.add("majority", False, f"aggregators {', '.join(sorted(miners))} agree on result {digest[:16]}…, "
                                      "but the study records another decision")
        return
    report.add("majority", True, f"{len(miners)} of {len(aggregators)} aggregators signed result {digest[:16]}…")
    result = seen.results[miners[0]][1]
    report.included = list(result.included)
    problems = []
    if not set(result.valid) <= counted:
        problems.append(f"valid set names contributions not counted: {sorted(set(result.valid) - counted)}")
    expected = cohort([(i, seen.min_cohort[i]) for i in result.valid if i in seen.min_cohort])
    if result.included != expected:
        problems.append(f"included {result.included} is not the cohort rule's {expected}")
    if result.invalid > len(study["contributions"]) - len(result.valid):
        problems.append(f"{result.invalid} invalid reported, more than the contributions left")
    if problems:
        report.add("cohort", False, "; ".join(problems))
    else:
        report.add("cohort", True, f"{len(result.valid)} valid, {result.invalid} invalid, {len(expected)} included "
                                   "by the cohort rule (consents' min_cohort)")
    if result.noise.epsilon_milli != study["epsilon_milli"]:
        report.add("dp parameters", False, f"the result states epsilon_milli {result.noise.epsilon_milli}, the "
                                           f"study {study['epsilon_milli']}")
    else:
        report.add("dp parameters", True, f"epsilon_milli {study['epsilon_milli']} as the study states"
                   + (" (no noise)" if study["epsilon_milli"] == 0 else ""))
    problem = _answer_problem(result, study)
    report.add("answer", problem is None, problem or "the answer has the query's shape"
               + (" and counts equal to the included set" if study["epsilon_milli"] == 0 else ""))


def _answer_problem(result: StudyResult, study: dict[str, Any]) -> str | None:
    query, n, exact, answer = study["query"], len(result.included), study["epsilon_milli"] == 0, result.answer
    if answer is None:
        return "no answer although contributions were included" if n else None
    if not n:
        return "an answer with nobody included"
    keys = {"count": {"count"}, "sum": {"sum"}, "histogram": {"histogram"}}.get(query["type"], {"sum", "n"})
    if set(answer) != keys:
        return f"a {query['type']} answer has {sorted(keys)}, not {sorted(answer)}"
    if exact and query["type"] == "count" and answer["count"] != n:
        return f"count {answer['count']} but {n} included"
    if exact and "n" in keys and answer["n"] != n:
        return f"n {answer['n']} but {n} included"
    counts = answer.get("histogram")
    if isinstance(counts, list):
        if len(counts) != len(query["bins"]) - 1:
            return f"{len(counts)} histogram counts for {len(query['bins']) - 1} bins"
        if exact and (sum(counts) != n or min(counts) < 0):
            return f"histogram counts {counts} do not sum to the {n} included"
    return None


def anchoring_problem(leaves: Sequence[bytes], checkpoint: Checkpoint | None, needed: Iterable[int],
                      what: str) -> str | None:
    """Why the `needed` leaf indexes are not shown anchored by `checkpoint` over `leaves`, or None: the leaves
    must hash to its root at its size, and every needed index lie below it. `what` names them in the message."""
    if checkpoint is None:
        return f"no checkpoint given: nothing to check {what}'s inclusion against"
    if checkpoint.tree_size > len(leaves):
        return f"the checkpoint covers {checkpoint.tree_size} leaves, only {len(leaves)} given"
    frontier = merkle.extend_frontier(0, (), [merkle.leaf_hash(leaf) for leaf in leaves[:checkpoint.tree_size]])
    if merkle.frontier_root(frontier) != checkpoint.root_hash:
        return (f"the leaves do not hash to the checkpoint's root at size {checkpoint.tree_size}: the log was "
                "altered or is another log")
    outside = sorted(i for i in needed if i >= checkpoint.tree_size)
    if outside:
        return (f"leaves {outside} lie beyond the checkpoint (size {checkpoint.tree_size}): not yet anchored; "
                "verify against a newer checkpoint")
    return None


def _anchor_findings(report: StudyReport, leaves: Sequence[bytes], checkpoint: Checkpoint | None,
                     study: dict[str, Any], seen: _Seen) -> None:
    needed = [study["at"], *study["contributions"], *(i for i, _ in seen.results.values()),
              *([] if seen.sample is None else [seen.sample.index]), *(i for i, *_ in seen.discloses),
              *(i for i, *_ in seen.audits), *([] if seen.close_index is None else [seen.close_index])]
    problem = anchoring_problem(leaves, checkpoint, needed, "the contributions")
    if problem is not None or checkpoint is None:
        report.add("anchored", False, problem or "no checkpoint given")
        return
    report.add("anchored", True, f"the post, {len(study['contributions'])} commitments, the results, the audit "
                                 f"and the close are included in the checkpoint of size {checkpoint.tree_size}")


def _payment_findings(report: StudyReport, seen: _Seen, study: dict[str, Any], state: State,
                      forfeited: list[int]) -> None:
    if study["closed_at"] is None:
        report.add("payments", True, f"not closed yet: the deposit {study['deposit']} stays in escrow "
                                     f"({state.balance(rules.study_account(report.study_id))} held)")
        return
    account = rules.study_account(report.study_id)
    expected: dict[str, int] = Counter()
    if study["state"] == "answered":
        for index in study["decided"]["included"]:
            if index not in forfeited:
                expected[f"patient:{seen.owner[index]}"] += seen.price[index]
        for miner in study["decided"]["aggregators"]:
            expected[f"miner:{miner}"] += study["aggregator_fee_minor"]
    paid = sum(expected.values())
    expected[f"researcher:{study['researcher']}"] += seen.close_escrow - paid
    expected[account] -= seen.close_escrow
    wanted = {a: v for a, v in expected.items() if v}
    supply_before, supply_after = seen.close_supply
    if seen.close_deltas != wanted:
        report.add("payments", False, f"study.close moved {dict(sorted(seen.close_deltas.items()))}, the rules owe "
                                      f"{dict(sorted(wanted.items()))}")
    elif supply_before != supply_after:
        report.add("payments", False, f"the supply changed at study.close: {supply_before} → {supply_after}")
    else:
        kept = f" ({len(forfeited)} forfeited contributions unpaid: {forfeited})" if forfeited else ""
        report.add("payments", True, f"deposit {study['deposit']}: {paid} paid to contributors and aggregators"
                                     f"{kept}, {seen.close_escrow - paid} refunded; supply conserved")


def _audit_findings(report: StudyReport, seen: _Seen, study: dict[str, Any]) -> list[int]:
    """Checks "audit_sample" and "audit_outcomes" of an answered study; the contributions that forfeit, as the
    verifier derives them (what the payments check holds study.close to)."""
    if study["state"] != "answered" or study["decided"] is None:
        return []
    recorded = study.get("audit")
    sampled = seen.sample
    if sampled is None:
        if recorded is not None:
            report.add("audit_sample", False, "the study records an audit sample, but no study.sample leaf fixes one")
        elif study["closed_at"] is None:
            report.add("audit_sample", True, "not sampled yet: the study cannot close before it is (or the grace)")
        elif seen.close_ms is None or seen.close_ms < study["closes_ms"] + rules.CLOSE_GRACE_MS:
            report.add("audit_sample", False, f"closed at leaf {study['closed_at']} without an audit before the grace "
                                              "ended")
        else:
            report.add("audit_sample", True, "closed without an audit: nobody sampled the study before closes_ms "
                                             "plus the grace, so every included contribution was paid")
        return []
    if sampled.problem is not None:
        report.add("audit_sample", False, f"study.sample at leaf {sampled.index}: {sampled.problem}")
        return []
    if recorded is None or recorded["sample"] != sampled.sample or recorded["seed"] != sampled.seed:
        got = None if recorded is None else recorded["sample"]
        report.add("audit_sample", False, f"the note sampled at leaf {sampled.index} gives {sampled.sample}, the "
                                          f"study records {got}")
        return []
    report.add("audit_sample", True, f"{len(sampled.sample)} of {len(study['decided']['included'])} included "
                                     f"contributions sampled at leaf {sampled.index} from the latest final "
                                     f"checkpoint's seed: {sampled.sample}")
    return _outcome_findings(report, seen, study, sampled)


def _outcome_findings(report: StudyReport, seen: _Seen, study: dict[str, Any], sampled: _Sampled) -> list[int]:
    problems: list[str] = []
    disclosed: dict[int, int] = {}
    closed_at = study["closed_at"] if study["closed_at"] is not None else 2**63  # leaves after it never count
    for index, signer, d, now in seen.discloses:
        accepted = (sampled.index < index < closed_at and d.contribution in sampled.sample
                    and d.contribution not in disclosed and signer == seen.owner.get(d.contribution)
                    and now is not None and now < sampled.window_ends_ms
                    and len(d.keys) == len(study["aggregators"])
                    and len({(e.dev, e.epoch) for e in d.epochs}) == len(d.epochs))
        if accepted:  # what the rules must accept: the owner's first, of a sampled contribution, in the window
            disclosed[d.contribution] = index
    majority = len(study["aggregators"]) // 2 + 1
    verdicts: dict[int, dict[str, str]] = {}
    for index, signer, a, now in seen.audits:
        on = disclosed.get(a.contribution)
        counts = (on is not None and on < index < closed_at and signer in study["aggregators"]
                  and signer not in verdicts.get(a.contribution, {}) and (a.verdict == "match") == (a.reason == "")
                  and now is not None and now < sampled.window_ends_ms)
        if not counts:
            continue  # not an aggregator's first verdict on a disclosed contribution within the window
        verdicts.setdefault(a.contribution, {})[signer] = a.verdict
    expected: dict[str, str] = {}
    for i in sampled.sample:
        tally = Counter(verdicts.get(i, {}).values())
        winner = next((v for v, n in tally.items() if n >= majority), None)
        if winner is not None:
            expected[str(i)] = winner
        elif study["closed_at"] is not None:
            expected[str(i)] = "undecided" if i in disclosed else "unopened"
    forfeited = sorted(i for i in sampled.sample if expected.get(str(i)) in rules.FORFEITING_OUTCOMES)
    audit = study["audit"]
    if audit["outcome"] != expected:
        problems.append(f"the outcomes by majority of the aggregators' verdicts are {expected}, the study records "
                        f"{audit['outcome']}")
    if study["closed_at"] is not None and audit.get("forfeited") != forfeited:
        problems.append(f"forfeited should be {forfeited}, the study records {audit.get('forfeited')}")
    if {str(i): at for i, at in disclosed.items()} != audit["disclosed"]:
        problems.append(f"accepted disclosures are {disclosed}, the study records {audit['disclosed']}")
    if problems:
        report.add("audit_outcomes", False, "; ".join(problems))
    else:
        report.add("audit_outcomes", True, f"{len(disclosed)} of {len(sampled.sample)} sampled contributions "
                                           f"disclosed by their owners in the window; outcomes {expected} by a "
                                           f"majority of {majority} aggregators' verdicts; forfeited {forfeited}")
    return forfeited
