"""`contract_rules.study_check.verify_study`: a study re-checked offline from the log's leaves, its genesis and a
checkpoint — aggregators from the final seed, consents valid when used, majority-signed results under the cohort
rule, commitments anchored, the audit sample recomputed from the latest final checkpoint and its outcomes from the
verdicts, payments conserving the supply. Real signatures and a real Merkle root throughout."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_contracts_market import FEE, PRICE, MarketWorld
from test_contracts_world import T0

from carechain import envelope, merkle
from carechain.checkpoint import Checkpoint
from carechain.entries import Entry
from contract_rules import CodeBook, Genesis
from contract_rules import market as rules
from contract_rules import miners as miner_rules
from contract_rules.runtime import load_rule_source
from contract_rules.study_check import StudyReport, verify_study


@pytest.fixture
def world() -> MarketWorld:
    return MarketWorld()


def leaves_of(w: MarketWorld) -> list[bytes]:
    return [e.encode() for e in w.entries]


def checkpoint_of(leaves: list[bytes]) -> Checkpoint:
    frontier = merkle.extend_frontier(0, (), [merkle.leaf_hash(leaf) for leaf in leaves])
    return Checkpoint("carechain.log/test", len(leaves), merkle.frontier_root(frontier))


def check(w: MarketWorld, leaves: list[bytes] | None = None, study_id: str = "hr-1",
          genesis: Genesis | None = None, code: CodeBook | None = None) -> StudyReport:
    honest = leaves_of(w)
    return verify_study(honest if leaves is None else leaves, genesis or w.genesis, study_id,
                        checkpoint_of(honest), code)


def failed(report: StudyReport) -> dict[str, str]:
    return {f.check: f.detail for f in report.findings if not f.ok}


def answered_study(w: MarketWorld, n: int = 3, verdicts: dict[int, str] | None = None) -> list[int]:
    """"hr-1" (a mean) with `n` contributions, a majority result, an audit and a close; the contributions'
    leaves."""
    leaves = w.answered(n)
    w.audit(verdicts=verdicts)
    assert w.close() == "ok"
    return leaves


def test_an_honestly_run_study_verifies_every_check(world: MarketWorld) -> None:
    leaves = answered_study(world)
    report = check(world)
    assert report.ok, failed(report)
    assert {f.check for f in report.findings} == {"replay", "aggregators", "consents", "result signatures",
                                                  "majority", "cohort", "dp parameters", "answer", "anchored",
                                                  "audit_sample", "audit_outcomes", "payments"}
    assert report.state == "answered" and report.included == leaves and report.answer == {"sum": 210, "n": 3}
    assert str(3 * PRICE + 2 * FEE) in next(f.detail for f in report.findings if f.check == "payments")


def test_a_tampered_published_result_fails_verify_study(world: MarketWorld) -> None:
    answered_study(world)
    leaves = leaves_of(world)
    index = next(i for i, e in enumerate(world.entries) if e.type == "study.result")
    msg = envelope.parse(world.entries[index].cose)
    # The answer doubled, the aggregator's original signature kept: what rewriting the published result gives.
    forged = envelope.sign(world.miner_by_id(msg.kid), {**msg.payload, "answer": {"sum": 420, "n": 3}})
    tampered = Entry("study.result", forged[:-64] + msg.signature).encode()
    leaves[index] = tampered
    report = check(world, leaves)
    assert not report.ok
    problems = failed(report)
    assert "anchored" in problems  # the altered log no longer hashes to the checkpoint's root
    assert "majority" in problems or "result signatures" in problems


def test_a_result_resigned_by_its_aggregator_still_breaks_the_anchor_and_the_majority(world: MarketWorld) -> None:
    answered_study(world)
    leaves = leaves_of(world)
    index = next(i for i, e in enumerate(world.entries) if e.type == "study.result")
    msg = envelope.parse(world.entries[index].cose)
    leaves[index] = Entry("study.result", envelope.sign(world.miner_by_id(msg.kid),
                                                        {**msg.payload, "answer": {"sum": 1, "n": 3}})).encode()
    problems = failed(check(world, leaves))
    assert "anchored" in problems and "majority" in problems


def test_a_contribution_under_a_revoked_consent_is_never_counted(world: MarketWorld) -> None:
    w = world
    assert w.post() == "ok"
    counted = []
    for p in w.patients[:3]:
        _, consent = w.give(p)
        assert w.contribute(p, consent) == "ok"
        counted.append(w.last_index)
    assert w.finalize() == "ok"
    _, late = w.give(w.patients[3])
    assert w.revoke(w.patients[3], late) == "ok"
    assert w.contribute(w.patients[3], late) == "consent_revoked"  # void: on the log, but never counted
    void = w.last_index
    for agg in w.aggregators()[:2]:
        assert w.result(agg, counted, counted, {"sum": 210, "n": 3}) == "ok"
    report = check(w)
    assert report.ok, failed(report)
    assert void not in report.included and report.included == counted


LAX = (b"\n\ndef consent_problem(consent, study, owner, now_ms):  # a contract that ignores revocations\n"
       b"    return None\n")


def lax_world(world: MarketWorld, patch: bytes) -> tuple[MarketWorld, CodeBook]:
    """`world`'s entries replayed under a genesis whose market code is ours with `patch` appended (a contract
    that breaks one rule); the world and the code book that holds that code."""
    import contract_rules.market as market_module
    from contract_rules import Runtime

    lax = load_rule_source(Path(market_module.__file__).read_bytes() + patch, "lax-market")
    genesis = Genesis(operators=world.genesis.operators, allocations=world.genesis.allocations,
                      contracts={**world.genesis.contracts, "market": lax.code_hash})
    w = MarketWorld.__new__(MarketWorld)
    w.__dict__.update(world.__dict__)
    code = CodeBook.builtin()
    code.add(lax)
    w.genesis, w.entries = genesis, list(world.entries)
    w.runtime = Runtime(genesis, code)
    for entry in world.entries:
        assert w.runtime.apply(entry) == "ok"
    return w, code


def test_verify_catches_a_contract_that_counted_a_revoked_consent(world: MarketWorld) -> None:
    """The verifier re-checks each consent itself: a genesis naming lax market code does not fool it."""
    w, code = lax_world(world, LAX)
    genesis = w.genesis
    assert w.post() == "ok"
    contributions = []
    for i, p in enumerate(w.patients[:3]):
        _, consent = w.give(p)
        if i == 0:
            assert w.revoke(p, consent) == "ok"
        assert w.contribute(p, consent) == "ok"  # the lax code accepts even the revoked one
        contributions.append(w.last_index)
    assert w.finalize() == "ok"
    for agg in w.aggregators()[:2]:
        assert w.result(agg, contributions, contributions, {"sum": 210, "n": 3}) == "ok"
    leaves = leaves_of(w)
    report = verify_study(leaves, genesis, "hr-1", checkpoint_of(leaves), code)
    problems = failed(report)
    assert "consents" in problems and f"leaf {contributions[0]} (consent_revoked)" in problems["consents"]
    assert "cohort" in problems  # the valid set names a contribution that may not count


def test_aggregators_not_drawn_from_the_seed_or_missing_checkpoint_fail(world: MarketWorld) -> None:
    answered_study(world)
    leaves = leaves_of(world)
    no_checkpoint = verify_study(leaves, world.genesis, "hr-1", None)
    assert "anchored" in failed(no_checkpoint)
    short = checkpoint_of(leaves[:-3])
    beyond = verify_study(leaves, world.genesis, "hr-1", short)
    assert "anchored" in failed(beyond)  # the results and the close lie past an older checkpoint
    assert not verify_study(leaves, world.genesis, "nope", checkpoint_of(leaves)).ok


def test_a_study_without_majority_after_the_grace_is_refunded_in_full(world: MarketWorld) -> None:
    w = world
    w.open_study_with(3)
    assert w.result(w.aggregators()[0], [], [], None) == "ok"
    assert w.attest(T0 + 9 * 86_400_000) == "ok"
    assert w.close() == "ok"
    report = check(w)
    assert report.ok, failed(report)
    assert report.state == "unanswered" and report.included == []


# -- audits ---------------------------------------------------------------------------------------------

def test_a_mismatch_found_by_the_audit_verifies_with_its_forfeit_unpaid(world: MarketWorld) -> None:
    w = world
    leaves = w.answered(3)
    assert w.finalize() == "ok" and w.sample() == "ok"
    [sampled] = w.study()["audit"]["sample"]
    assert w.disclose(sampled) == "ok"
    for agg in w.aggregators():
        verdict = "mismatch" if agg != w.aggregators()[2] else "match"
        assert w.verdict(agg, sampled, verdict, "" if verdict == "match" else "value_mismatch") == "ok"
    assert w.close() == "ok"
    report = check(w)
    assert report.ok, failed(report)
    details = {f.check: f.detail for f in report.findings}
    assert f"[{sampled}]" in details["audit_sample"] and "'mismatch'" in details["audit_outcomes"]
    assert f"forfeited contributions unpaid: [{sampled}]" in details["payments"]
    assert str(2 * PRICE + 2 * FEE) in details["payments"] and report.included == leaves


def test_a_study_closed_without_an_audit_after_the_grace_is_reported_plainly(world: MarketWorld) -> None:
    w = world
    w.answered(3)
    assert w.attest(w.study()["closes_ms"] + rules.CLOSE_GRACE_MS) == "ok"
    assert w.close() == "ok"
    report = check(w)
    assert report.ok, failed(report)
    detail = next(f.detail for f in report.findings if f.check == "audit_sample")
    assert "closed without an audit" in detail and "every included contribution was paid" in detail
    assert "audit_outcomes" not in {f.check for f in report.findings}


def test_a_sample_from_another_signing_of_the_latest_checkpoint_is_refused(world: MarketWorld) -> None:
    """The same checkpoint with another set of cosignatures has another seed: only the note `checkpoint.final`
    recorded fixes the sample, so a sampler cannot shop among signings for a draw it likes."""
    w = world
    w.answered(3)
    assert w.finalize() == "ok"
    size = miner_rules.final_size(w.state)
    other = w.final_checkpoint(cosigners=w.miners[:4], size=size)  # recorded with three cosignatures
    # storage v3 records the recorded note's seed, so the rules refuse another signing of it
    assert w.sample(note=other) == "not_the_latest_final_checkpoint"
    assert w.sample() == "ok"
    assert check(w).ok


LATE_VERDICTS = b"""

def _window_problem(state, audit):  # a contract that counts verdicts after the window
    return None
"""

PAYS_MISMATCHES = b"""

FORFEITING_OUTCOMES = ("unopened",)  # a contract that pays a contribution found not to match
"""


def audited(w: MarketWorld, study_id: str = "hr-1") -> int:
    """Decide "hr-1", record a final checkpoint and sample it; the sampled contribution."""
    leaves = w.open_study_with(3)
    for agg in w.aggregators()[:2]:
        assert w.result(agg, leaves, leaves, {"sum": 210, "n": 3}) == "ok"
    assert w.finalize() == "ok" and w.sample() == "ok"
    [sampled] = w.study()["audit"]["sample"]
    return int(sampled)


def test_verify_recomputes_the_sample_and_catches_a_contract_that_recorded_another(world: MarketWorld) -> None:
    """A genesis naming market code that audits anyone but the seeded draw: the recorded sample is forged."""
    w, code = lax_world(world, b"""

_honest_sample = audit_sample


def audit_sample(seed, included):  # a contract that audits anyone but the seeded draw
    drawn = _honest_sample(seed, included)
    return [i for i in sorted(included) if i not in drawn][:len(drawn)]
""")
    forged = audited(w)
    honest = rules.audit_sample(bytes.fromhex(w.study()["audit"]["seed"]), w.study()["contributions"])
    assert [forged] != honest
    leaves = leaves_of(w)
    report = verify_study(leaves, w.genesis, "hr-1", checkpoint_of(leaves), code)
    assert f"gives {honest}, the study records [{forged}]" in failed(report)["audit_sample"]


def test_verify_counts_only_verdicts_posted_within_the_window(world: MarketWorld) -> None:
    w, code = lax_world(world, LATE_VERDICTS)
    sampled = audited(w)
    assert w.disclose(sampled) == "ok"
    first, second, _ = w.aggregators()
    assert w.verdict(first, sampled, "mismatch", "value_mismatch") == "ok"
    assert w.attest(w.study()["audit"]["window_ends_ms"]) == "ok"
    assert w.verdict(second, sampled, "mismatch", "value_mismatch") == "ok"  # late: the lax code counts it
    assert w.close() == "ok"
    assert w.study()["audit"]["forfeited"] == [sampled]
    leaves = leaves_of(w)
    problems = failed(verify_study(leaves, w.genesis, "hr-1", checkpoint_of(leaves), code))
    assert "'undecided'" in problems["audit_outcomes"]  # one verdict in time: undecided, and paid
    assert "payments" in problems


def test_verify_catches_a_forfeited_contribution_that_was_paid(world: MarketWorld) -> None:
    w, code = lax_world(world, PAYS_MISMATCHES)
    sampled = audited(w)
    assert w.disclose(sampled) == "ok"
    for agg in w.aggregators()[:2]:
        assert w.verdict(agg, sampled, "mismatch", "value_mismatch") == "ok"
    assert w.close() == "ok"
    leaves = leaves_of(w)
    problems = failed(verify_study(leaves, w.genesis, "hr-1", checkpoint_of(leaves), code))
    assert f"forfeited should be [{sampled}]" in problems["audit_outcomes"]
    assert "payments" in problems


def test_a_verdict_removed_from_the_log_fails_verify(world: MarketWorld) -> None:
    answered_study(world)
    leaves = leaves_of(world)
    index = next(i for i, e in enumerate(world.entries) if e.type == "study.audit")
    report = check(world, leaves[:index] + leaves[index + 1:])
    assert not report.ok
    problems = failed(report)
    assert "anchored" in problems  # the log no longer hashes to the checkpoint's root
    assert report.state == "answered"
