"""`contract_rules.study_check.verify_study`: a study re-checked offline from the log's leaves, its genesis and a
checkpoint — aggregators from the final seed, consents valid when used, majority-signed results under the cohort
rule, commitments anchored, payments conserving the supply. Real signatures and a real Merkle root throughout."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_contracts_market import FEE, PRICE, MarketWorld
from test_contracts_world import T0

from carechain import envelope, merkle
from carechain.checkpoint import Checkpoint
from carechain.entries import Entry
from contract_rules import CodeBook, Genesis
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


def answered_study(w: MarketWorld, n: int = 3) -> list[int]:
    """"hr-1" (a mean) with `n` contributions, a majority result and a close; the contributions' leaves."""
    leaves = w.open_study_with(n)
    answer = {"sum": 70 * n, "n": n}
    for agg in w.aggregators()[:2]:
        assert w.result(agg, leaves, leaves, answer) == "ok"
    assert w.close() == "ok"
    return leaves


def test_an_honestly_run_study_verifies_every_check(world: MarketWorld) -> None:
    leaves = answered_study(world)
    report = check(world)
    assert report.ok, failed(report)
    assert {f.check for f in report.findings} == {"replay", "aggregators", "consents", "result signatures",
                                                  "majority", "cohort", "dp parameters", "answer", "anchored",
                                                  "payments"}
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
    _, late = w.give(w.patients[3])
    assert w.revoke(w.patients[3], late) == "ok"
    assert w.contribute(w.patients[3], late) == "consent_revoked"  # void: on the log, but never counted
    void = w.last_index
    for agg in w.aggregators()[:2]:
        assert w.result(agg, counted, counted, {"sum": 210, "n": 3}) == "ok"
    report = check(w)
    assert report.ok, failed(report)
    assert void not in report.included and report.included == counted


LAX = b"\n\ndef consent_problem(consent, study, owner, now_ms):  # a contract that ignores revocations\n    return None\n"


def test_verify_catches_a_contract_that_counted_a_revoked_consent(world: MarketWorld, tmp_path: Path) -> None:
    """The verifier re-checks each consent itself: a genesis naming lax market code does not fool it."""
    import contract_rules.market as market_module

    lax = load_rule_source(Path(market_module.__file__).read_bytes() + LAX, "lax-market")
    genesis = Genesis(operators=world.genesis.operators, allocations=world.genesis.allocations,
                      contracts={**world.genesis.contracts, "market": lax.code_hash})
    w = MarketWorld.__new__(MarketWorld)
    w.__dict__.update(world.__dict__)
    code = CodeBook.builtin()
    code.add(lax)
    from contract_rules import Runtime

    w.genesis, w.entries = genesis, list(world.entries)
    w.runtime = Runtime(genesis, code)
    for entry in world.entries:
        assert w.runtime.apply(entry) == "ok"
    assert w.post() == "ok"
    contributions = []
    for i, p in enumerate(w.patients[:3]):
        _, consent = w.give(p)
        if i == 0:
            assert w.revoke(p, consent) == "ok"
        assert w.contribute(p, consent) == "ok"  # the lax code accepts even the revoked one
        contributions.append(w.last_index)
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
