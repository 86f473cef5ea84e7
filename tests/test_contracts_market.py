"""The market contract: consents, studies with escrowed deposits and seeded aggregators, contributions checked
on attested time, majority results under the cohort rule once the contributions are final, audits of a sample
drawn from the latest final checkpoint's seed, and payments that conserve the supply.

Real crypto throughout: signed entries, a C2SP checkpoint note signed by the bridge's key and cosigned by bonded
miners, shares sealed to the aggregators' keys.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from test_contracts_access import AccessWorld
from test_contracts_world import DAY, T0, World, ident

from carechain import envelope
from carechain.access import seal_to_miner
from carechain.identity import Identity
from contract_rules import Genesis, Runtime
from contract_rules import market as rules
from contract_rules import miners as miner_rules
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND

N_MINERS = 5
FUNDS = 1_000_000
PRICE, FEE, MAX = 100, 50, 4


class MarketWorld(World):
    """Five bonded miners, two funded researchers, six patients, and the clock attested at T0."""

    final_checkpoint = AccessWorld.final_checkpoint

    def __init__(self) -> None:
        super().__init__()
        self.miners = [ident(30 + i) for i in range(N_MINERS)]
        self.researcher, self.researcher2 = ident(40), ident(41)
        self.patients = [ident(50 + i) for i in range(6)]
        self.genesis = Genesis(operators=self.genesis.operators, contracts=self.genesis.contracts,
                               allocations={**self.genesis.allocations,
                                            **{f"miner:{m.device_id}": MIN_BOND["miner"] for m in self.miners},
                                            f"researcher:{self.researcher.device_id}": FUNDS,
                                            f"researcher:{self.researcher2.device_id}": FUNDS})
        self.runtime = Runtime(self.genesis)
        results = [*(self.register_party("miner", m) for m in self.miners),
                   *(self.post_bond(m, MIN_BOND["miner"]) for m in self.miners),
                   self.register_party("researcher", self.researcher),
                   self.register_party("researcher", self.researcher2),
                   *(self.register_party("patient", p) for p in self.patients),
                   self.attest(T0)]
        assert results == ["ok"] * len(results)

    def supply(self) -> int:
        return sum(self.state.balances.values())

    def give(self, who: Identity, *, kinds: tuple[str, ...] = ("heart_rate",),
             queries: tuple[str, ...] = ("count", "mean", "histogram"), min_cohort: int = 2, price: int = PRICE,
             buyers: tuple[str, ...] = (), expires_ms: int = T0 + 30 * DAY, **attributes: str) -> tuple[str, int]:
        self._nonce += 1
        consent = ce.ConsentGive(kinds=list(kinds), queries=list(queries), min_cohort=min_cohort, price_minor=price,
                                 buyers=list(buyers), expires_ms=expires_ms,
                                 attributes=ce.CohortAttributes(**attributes), nonce=self._nonce, ts=T0)
        return self.add(ce.consent_give_entry(who, consent)), self.last_index

    def revoke(self, who: Identity, consent: int) -> str:
        return self.add(ce.consent_revoke_entry(who, ce.ConsentRevoke(consent=consent, ts=T0)))

    def post(self, study_id: str = "hr-1", *, query: dict[str, Any] | None = None, note: str | None = None,
             aggregators: int = 3, researcher: Identity | None = None, price: int = PRICE, fee: int = FEE,
             max_contributors: int = MAX, epsilon_milli: int = 0, closes_ms: int = T0 + 7 * DAY,
             **filter_: str) -> str:
        q = query or {"type": "mean", "kind": "heart_rate", "lo": 30, "hi": 220}
        post = ce.StudyPost(study_id=study_id, query=ce.StudyQuery(**q), from_ms=T0 - 7 * DAY, to_ms=T0,
                            filter=ce.CohortAttributes(**filter_), price_minor=price,
                            max_contributors=max_contributors, aggregator_fee_minor=fee,
                            epsilon_milli=epsilon_milli, aggregators=aggregators,
                            seed_checkpoint=note or self.final_checkpoint(), closes_ms=closes_ms, ts=T0)
        return self.add(ce.study_post_entry(researcher or self.researcher, post))

    def study(self, study_id: str = "hr-1") -> dict[str, Any]:
        record = rules.study_record(self.state, study_id)
        assert record is not None
        return record

    def miner_by_id(self, miner_id: str) -> Identity:
        return next(m for m in self.miners if m.device_id == miner_id)

    def contribute(self, who: Identity, consent: int, study_id: str = "hr-1", *, shares: int | None = None) -> str:
        study = rules.study_record(self.state, study_id)
        keys = [self.miner_by_id(a).public_key for a in study["aggregators"]] if study else \
            [m.public_key for m in self.miners[:3]]
        keys = keys if shares is None else (keys * 2)[:shares]
        sealed = [seal_to_miner(key, b"\x82\x01\x02") for key in keys]
        c = ce.StudyContribute(study_id=study_id, consent=consent, commitment="ab" * 32, shares=sealed,
                               leaves=[0, 1], ts=T0)
        return self.add(ce.study_contribute_entry(who, c))

    def result(self, aggregator: Identity, valid: list[int], included: list[int], answer: dict | None,  # type: ignore[type-arg]
               *, invalid: int = 0, study_id: str = "hr-1", epsilon_milli: int = 0) -> str:
        r = ce.StudyResult(study_id=study_id, valid=valid, invalid=invalid, included=included, answer=answer,
                           noise=ce.StudyNoise(epsilon_milli=epsilon_milli), ts=T0 + 8 * DAY)
        return self.add(ce.study_result_entry(aggregator, r))

    def close(self, study_id: str = "hr-1", who: Identity | None = None) -> str:
        return self.add(ce.study_close_entry(who or self.researcher2, ce.StudyClose(study_id=study_id, ts=T0)))

    def aggregators(self, study_id: str = "hr-1") -> list[Identity]:
        return [self.miner_by_id(a) for a in self.study(study_id)["aggregators"]]

    def finalize(self, cosigners: list[Identity] | None = None) -> str:
        """The bridge's `checkpoint.final`: records a final checkpoint covering every entry so far."""
        return self.add(ce.checkpoint_final_entry(self.operator, self.final_checkpoint(cosigners)))

    def latest_final_note(self) -> str:
        """The note the last accepted `checkpoint.final` recorded: the one a sample must use."""
        for entry in reversed(self.entries):
            if entry.type == ce.CHECKPOINT_FINAL:
                return str(envelope.parse(entry.cose).payload["note"])
        raise AssertionError("no checkpoint.final recorded")

    def sample(self, study_id: str = "hr-1", *, note: str | None = None, who: Identity | None = None) -> str:
        s = ce.StudySample(study_id=study_id, seed_checkpoint=note or self.latest_final_note(), ts=T0)
        return self.add(ce.study_sample_entry(who or self.researcher2, s))

    def owner_of(self, contribution: int) -> Identity:
        owner = self.state.table(rules.CONTRIBUTIONS)[str(contribution)]["owner"]
        return next(p for p in self.patients if p.device_id == owner)

    def disclose(self, contribution: int, study_id: str = "hr-1", *, who: Identity | None = None,
                 keys: int | None = None, epochs: list[tuple[str, int]] | None = None) -> str:
        """The owner's opening: a fresh key sealed to each aggregator, the opening sealed under it."""
        owner = who or self.owner_of(contribution)
        key = os.urandom(32)
        aggregators = [a.public_key for a in self.aggregators(study_id)]
        sealed = [seal_to_miner(pk, key) for pk in (aggregators * 2)[:keys or len(aggregators)]]
        nonce = os.urandom(12)
        blob = nonce + ChaCha20Poly1305(key).encrypt(nonce, b"the opening", study_id.encode())
        listed = epochs or [(owner.device_id, 7)]
        d = ce.StudyDisclose(study_id=study_id, contribution=contribution,
                             epochs=[ce.DisclosedEpoch(dev=dev, epoch=e) for dev, e in listed], keys=sealed,
                             blob=blob, ts=T0)
        return self.add(ce.study_disclose_entry(owner, d))

    def verdict(self, aggregator: Identity, contribution: int, verdict: str = "match", reason: str = "",
                study_id: str = "hr-1") -> str:
        a = ce.StudyAudit(study_id=study_id, contribution=contribution, verdict=verdict,
                          reason=reason, ts=T0)
        return self.add(ce.study_audit_entry(aggregator, a))

    def audit(self, study_id: str = "hr-1", verdicts: dict[int, str] | None = None) -> list[int]:
        """Record a final checkpoint, sample, have every sampled owner disclose and a majority of the
        aggregators post the same verdict (`verdicts`, default "match") on each; the sample."""
        assert self.finalize() == "ok"
        assert self.sample(study_id) == "ok"
        sample: list[int] = self.study(study_id)["audit"]["sample"]
        majority = self.aggregators(study_id)[:len(self.study(study_id)["aggregators"]) // 2 + 1]
        for index in sample:
            assert self.disclose(index, study_id) == "ok"
            verdict = (verdicts or {}).get(index, "match")
            for agg in majority:
                reason = "" if verdict == "match" else "value_mismatch"
                assert self.verdict(agg, index, verdict, reason, study_id) == "ok"
        return sample

    def open_study_with(self, n: int, **consent: Any) -> list[int]:  # noqa: ANN401
        """Post "hr-1" and have the first `n` patients contribute under fresh consents, then record a final
        checkpoint covering them (results need final contributions); their leaf indexes."""
        assert self.post() == "ok"
        leaves = []
        for p in self.patients[:n]:
            result, index = self.give(p, **consent)
            assert result == "ok"
            assert self.contribute(p, index) == "ok"
            leaves.append(self.last_index)
        assert self.finalize() == "ok"
        return leaves

    def answered(self, n: int = 3, **consent: Any) -> list[int]:  # noqa: ANN401
        """`open_study_with(n)` decided by a majority of equal results (a mean of 70 each); the leaves."""
        leaves = self.open_study_with(n, **consent)
        for agg in self.aggregators()[:2]:
            assert self.result(agg, leaves, leaves, {"sum": 70 * n, "n": n}) == "ok"
        assert self.study()["state"] == "answered"
        return leaves


@pytest.fixture
def world() -> MarketWorld:
    return MarketWorld()


# -- the cohort rule ------------------------------------------------------------------------------------

def test_cohort_takes_the_longest_prefix_by_minimum_that_meets_its_own_largest_minimum() -> None:
    assert rules.cohort([]) == []
    assert rules.cohort([(7, 2)]) == []  # one contributor never meets a minimum of two
    assert rules.cohort([(1, 2), (2, 2)]) == [1, 2]
    assert rules.cohort([(1, 3), (2, 3)]) == []
    assert rules.cohort([(5, 2), (6, 3), (7, 3), (8, 10)]) == [5, 6, 7]
    # A large minimum early in leaf order does not block the others, and one that is met exactly is included.
    assert rules.cohort([(1, 4), (2, 2), (3, 2), (4, 3)]) == [1, 2, 3, 4]
    # A gap: the prefix of three fails (needs 5) but the prefix of five meets it.
    assert rules.cohort([(1, 2), (2, 2), (3, 5), (4, 5), (5, 5)]) == [1, 2, 3, 4, 5]
    assert rules.cohort([(1, 2), (2, 2), (3, 5), (4, 5)]) == [1, 2]
    # The input order does not matter.
    assert rules.cohort([(8, 10), (6, 3), (5, 2), (7, 3)]) == [5, 6, 7]


# -- consents -------------------------------------------------------------------------------------------

def test_a_consent_is_kept_under_its_leaf_index_and_only_its_owner_revokes_it(world: MarketWorld) -> None:
    alice, bob = world.patients[:2]
    result, index = world.give(alice, age_band="30-44", sex="f")
    assert result == "ok"
    record = rules.consent_record(world.state, index)
    assert record is not None and record["owner"] == alice.device_id and record["revoked_at"] is None
    assert record["attributes"] == {"age_band": "30-44", "sex": "f", "region": None}
    assert world.revoke(bob, index) == "not_the_owner"
    assert world.revoke(alice, index + 100) == "unknown_consent"
    assert world.revoke(alice, index) == "ok"
    assert rules.consent_record(world.state, index)["revoked_at"] == world.last_index  # type: ignore[index]
    assert world.revoke(alice, index) == "consent_already_revoked"


def test_a_consent_must_name_sealed_kinds_registered_researchers_and_a_future_expiry(world: MarketWorld) -> None:
    alice = world.patients[0]
    assert world.give(alice, kinds=("purchase",))[0] == "bad_kinds"
    assert world.give(alice, kinds=("glucose", "glucose"))[0] == "bad_kinds"
    assert world.give(alice, buyers=(world.miners[0].device_id,))[0] == "unknown_buyer"
    assert world.give(alice, expires_ms=T0)[0] == "consent_expired"
    assert world.give(alice, queries=("count", "count"))[0] == "duplicate_queries"
    assert world.give(alice, buyers=(world.researcher.device_id,))[0] == "ok"
    # Only patients give consents.
    consent = ce.ConsentGive(kinds=["glucose"], queries=["count"], min_cohort=2, price_minor=0,
                             expires_ms=T0 + DAY, nonce=99, ts=T0)
    assert world.add(ce.consent_give_entry(world.researcher, consent)) == "signer_not_allowed"


# -- studies --------------------------------------------------------------------------------------------

def test_posting_a_study_escrows_its_deposit_and_draws_its_aggregators_from_the_final_seed(
        world: MarketWorld) -> None:
    supply = world.supply()
    note = world.final_checkpoint()
    assert world.post(note=note, aggregators=3) == "ok"
    deposit = PRICE * MAX + FEE * 3
    assert world.state.balance("study:hr-1") == deposit
    assert world.state.balance(f"researcher:{world.researcher.device_id}") == FUNDS - deposit
    assert world.supply() == supply
    seed = miner_rules.verify_final_note(world.state, note)
    assert isinstance(seed, bytes)
    expected = rules.choose_aggregators(seed, miner_rules.active_miners(world.state), 3, "hr-1")
    study = world.study()
    assert study["aggregators"] == expected and len(set(expected)) == 3 and study["state"] == "open"
    assert study["deposit"] == deposit and study["researcher"] == world.researcher.device_id
    # Another study id draws from the same seed independently; the same id cannot be posted twice.
    assert world.post(note=note) == "duplicate_study"


def test_a_study_needs_a_final_checkpoint_enough_miners_funds_and_a_sound_query(world: MarketWorld) -> None:
    two_cosigners = world.final_checkpoint(cosigners=world.miners[:2])
    assert world.post("a", note=two_cosigners) == "seed_checkpoint_not_final"
    assert world.post("b", note=world.final_checkpoint(signer=ident(99))) == "seed_checkpoint_not_signed_by_the_bridge"
    assert world.post("c", aggregators=6) == "not_enough_miners"
    assert world.post("d", price=FUNDS) == "insufficient_funds"
    assert world.post("e", query={"type": "histogram", "kind": "heart_rate", "lo": 30, "hi": 220}) == \
        "bins_only_for_histograms"
    assert world.post("f", query={"type": "histogram", "kind": "heart_rate", "lo": 30, "hi": 220,
                                  "bins": [30, 60, 60, 220]}) == "bins_not_ascending"
    assert world.post("g", query={"type": "time_in_range", "kind": "heart_rate", "lo": 0, "hi": 1440}) == \
        "measure_needs_other_kind"
    assert world.post("h", query={"type": "sum", "kind": "heart_rate", "lo": 220, "hi": 30}) == "bad_bounds"
    assert world.post("i", closes_ms=T0) == "study_already_closed"
    assert world.post("j", query={"type": "histogram", "kind": "heart_rate", "lo": 30, "hi": 220,
                                  "bins": [30, 60, 100, 220]}) == "ok"
    assert world.state.balance(f"researcher:{world.researcher.device_id}") == FUNDS - (PRICE * MAX + FEE * 3)


# -- contributions --------------------------------------------------------------------------------------

def test_a_contribution_needs_the_signers_own_live_consent_covering_the_study(world: MarketWorld) -> None:
    assert world.post(region="north", sex="f") == "ok"
    alice, bob = world.patients[:2]
    cases = {
        "consent_does_not_cover_kind": world.give(alice, kinds=("glucose",), region="north", sex="f")[1],
        "consent_does_not_cover_query": world.give(alice, queries=("count",), region="north", sex="f")[1],
        "buyer_not_allowed": world.give(alice, buyers=(world.researcher2.device_id,), region="north", sex="f")[1],
        "price_below_consent": world.give(alice, price=PRICE + 1, region="north", sex="f")[1],
        "attributes_do_not_match": world.give(alice, region="south", sex="f")[1],
    }
    undisclosed = world.give(alice, region="north")[1]  # the filter asks for sex; the consent does not say
    for reason, consent in cases.items():
        assert world.contribute(alice, consent) == reason
    assert world.contribute(alice, undisclosed) == "attributes_do_not_match"
    good = world.give(alice, buyers=(world.researcher.device_id,), price=PRICE, region="north", sex="f")[1]
    assert world.contribute(bob, good) == "not_your_consent"
    assert world.contribute(alice, good + 1000) == "unknown_consent"
    assert world.contribute(alice, good, shares=4) == "shares_do_not_match_aggregators"
    revoked = world.give(alice, region="north", sex="f")[1]
    assert world.revoke(alice, revoked) == "ok"
    assert world.contribute(alice, revoked) == "consent_revoked"
    expiring = world.give(alice, expires_ms=T0 + DAY, region="north", sex="f")[1]
    assert world.attest(T0 + DAY) == "ok"  # attested time, not the contribution's own ts, judges expiry
    assert world.contribute(alice, expiring) == "consent_expired"
    assert world.contribute(alice, good) == "ok"
    contribution = world.state.table(rules.CONTRIBUTIONS)[str(world.last_index)]
    assert contribution["owner"] == alice.device_id and contribution["min_cohort"] == 2
    assert world.study()["contributions"] == [world.last_index]


def test_one_contribution_per_owner_at_most_max_contributors_and_only_before_the_close(world: MarketWorld) -> None:
    assert world.post(max_contributors=2) == "ok"
    a, b, c = world.patients[:3]
    consents = {p.device_id: world.give(p)[1] for p in (a, b, c)}
    assert world.contribute(a, consents[a.device_id]) == "ok"
    second = world.give(a)[1]
    assert world.contribute(a, second) == "already_contributed"
    assert world.contribute(b, consents[b.device_id]) == "ok"
    assert world.contribute(c, consents[c.device_id]) == "study_full"
    assert world.post("late", closes_ms=T0 + DAY) == "ok"
    assert world.attest(T0 + DAY) == "ok"
    assert world.contribute(c, consents[c.device_id], "late") == "study_closed"
    assert world.contribute(c, consents[c.device_id], "none") == "unknown_study"


# -- results --------------------------------------------------------------------------------------------

def test_a_majority_of_equal_results_decides_the_study(world: MarketWorld) -> None:
    leaves = world.open_study_with(3)
    first, second, third = world.aggregators()
    answer = {"sum": 210, "n": 3}
    assert world.result(world.patients[0], leaves, leaves, answer) == "signer_not_allowed"
    outsider = next(m for m in world.miners if m.device_id not in world.study()["aggregators"])
    assert world.result(outsider, leaves, leaves, answer) == "not_an_aggregator"
    assert world.result(first, leaves, leaves, answer) == "ok"
    assert world.study()["state"] == "open"  # one of three is no majority
    assert world.result(first, leaves, leaves, answer) == "result_already_posted"
    assert world.result(second, leaves, leaves, {"sum": 211, "n": 3}) == "ok"  # disagrees: still open
    assert world.study()["state"] == "open"
    assert world.result(third, leaves, leaves, answer) == "ok"
    study = world.study()
    assert study["state"] == "answered"
    assert study["decided"]["answer"] == answer and study["decided"]["included"] == leaves
    assert study["decided"]["aggregators"] == sorted([first.device_id, third.device_id])
    assert world.result(second, leaves, leaves, answer) == "study_already_decided"


def test_results_are_checked_against_the_cohort_rule_and_the_query(world: MarketWorld) -> None:
    leaves = world.open_study_with(3, min_cohort=3)
    agg = world.aggregators()[0]
    two = leaves[:2]  # two valid contributors, each asking for a cohort of three
    assert world.result(agg, two, two, {"sum": 1, "n": 2}, invalid=1) == "included_not_by_cohort_rule"
    assert world.result(agg, two, [], {"sum": 1, "n": 2}, invalid=1) == "answer_without_cohort"
    assert world.result(agg, leaves, leaves, None) == "missing_answer"
    assert world.result(agg, leaves, leaves, {"sum": 1, "n": 2}) == "n_does_not_match_included"
    assert world.result(agg, leaves, leaves, {"count": 3}) == "bad_answer_shape"
    assert world.result(agg, [*leaves, 5], [*leaves, 5], {"sum": 1, "n": 4}) == "bad_valid_set"
    assert world.result(agg, two, [], None, invalid=2) == "bad_invalid_count"
    assert world.result(agg, leaves, leaves, {"sum": 1, "n": 3}, epsilon_milli=500) == "noise_does_not_match_study"
    assert world.result(agg, two, [], None, invalid=1) == "ok"


# -- payments -------------------------------------------------------------------------------------------

def test_closing_an_answered_study_pays_contributors_and_majority_aggregators_and_conserves_supply(
        world: MarketWorld) -> None:
    supply = world.supply()
    leaves = world.open_study_with(2, price=60)
    cheap_owner = world.patients[2]
    cheap = world.give(cheap_owner, price=10)[1]
    assert world.contribute(cheap_owner, cheap) == "ok"
    leaves.append(world.last_index)
    assert world.finalize() == "ok"
    first, second, third = world.aggregators()
    assert world.close() == "study_not_decided"
    answer = {"sum": 200, "n": 3}
    assert [world.result(a, leaves, leaves, answer) for a in (first, second)] == ["ok", "ok"]
    assert world.result(third, leaves, leaves, answer) == "study_already_decided"
    before = {p.device_id: world.state.balance(f"patient:{p.device_id}") for p in world.patients}
    researcher = world.state.balance(f"researcher:{world.researcher.device_id}")
    miners = {m.device_id: world.state.balance(f"miner:{m.device_id}") for m in world.miners}
    assert world.close() == "audit_not_sampled"
    assert world.audit() and world.close() == "ok"  # every sampled contribution matched
    assert world.supply() == supply
    assert world.state.balance("study:hr-1") == 0
    paid = {p.device_id: world.state.balance(f"patient:{p.device_id}") - before[p.device_id] for p in world.patients}
    assert paid == {**{p.device_id: 0 for p in world.patients}, world.patients[0].device_id: 60,
                    world.patients[1].device_id: 60, cheap_owner.device_id: 10}
    fees = {m: world.state.balance(f"miner:{m}") - miners[m] for m in miners}
    assert fees == {**{m: 0 for m in miners}, first.device_id: FEE, second.device_id: FEE}
    deposit = PRICE * MAX + FEE * 3
    refund = world.state.balance(f"researcher:{world.researcher.device_id}") - researcher
    assert refund == deposit - 130 - 2 * FEE
    assert world.study()["closed_at"] == world.last_index
    assert world.close() == "study_already_closed"


def test_an_unanswered_study_refunds_the_whole_deposit(world: MarketWorld) -> None:
    leaves = world.open_study_with(2, min_cohort=3)
    researcher = world.state.balance(f"researcher:{world.researcher.device_id}")
    for agg in world.aggregators()[:2]:
        assert world.result(agg, leaves, [], None) == "ok"
    assert world.study()["state"] == "unanswered"
    supply = world.supply()
    assert world.close() == "ok"
    assert world.supply() == supply
    assert world.state.balance(f"researcher:{world.researcher.device_id}") == researcher + PRICE * MAX + FEE * 3
    assert all(world.state.balance(f"patient:{p.device_id}") == 0 for p in world.patients)


def test_a_study_without_a_majority_is_refunded_only_after_its_close_and_the_grace(world: MarketWorld) -> None:
    world.open_study_with(2)
    closes = world.study()["closes_ms"]
    assert world.attest(closes + rules.CLOSE_GRACE_MS - 1) == "ok"
    assert world.close() == "study_not_decided"
    assert world.attest(closes + rules.CLOSE_GRACE_MS) == "ok"
    start = world.state.balance(f"researcher:{world.researcher.device_id}")
    assert world.close() == "ok"
    assert world.study()["state"] == "unanswered"
    assert world.state.balance(f"researcher:{world.researcher.device_id}") == start + PRICE * MAX + FEE * 3
    agg = world.aggregators()[0]
    assert world.result(agg, [], [], None) == "study_already_decided"


def test_count_and_histogram_answers_must_have_the_query_shape_and_without_noise_its_counts(
        world: MarketWorld) -> None:
    bins = [30, 60, 100, 220]
    assert world.post("hist", query={"type": "histogram", "kind": "heart_rate", "lo": 30, "hi": 220,
                                     "bins": bins}) == "ok"
    assert world.post("cnt", query={"type": "count", "kind": "heart_rate", "lo": 0, "hi": 1}) == "ok"
    leaves: dict[str, list[int]] = {"hist": [], "cnt": []}
    for p in world.patients[:2]:
        consent = world.give(p)[1]
        for study_id in leaves:
            assert world.contribute(p, consent, study_id) == "ok"
            leaves[study_id].append(world.last_index)
    assert world.finalize() == "ok"
    agg = world.aggregators("hist")[0]
    hist = leaves["hist"]
    assert world.result(agg, hist, hist, {"histogram": [1, 1]}, study_id="hist") == "bad_answer_shape"
    assert world.result(agg, hist, hist, {"histogram": [1, 0, 0]}, study_id="hist") == \
        "histogram_does_not_match_included"
    assert world.result(agg, hist, hist, {"histogram": [1, 0, 1]}, study_id="hist") == "ok"
    agg = world.aggregators("cnt")[0]
    cnt = leaves["cnt"]
    assert world.result(agg, cnt, cnt, {"count": 3}, study_id="cnt") == "count_does_not_match_included"
    assert world.result(agg, cnt, cnt, {"sum": 2}, study_id="cnt") == "bad_answer_shape"
    assert world.result(agg, cnt, cnt, {"count": 2}, study_id="cnt") == "ok"
    # Only researchers post studies.
    post = ce.StudyPost(study_id="x", query=ce.StudyQuery(type="count", kind="glucose", lo=0, hi=1),
                        from_ms=T0, to_ms=T0, price_minor=0, max_contributors=1, aggregator_fee_minor=0,
                        epsilon_milli=0, aggregators=3, seed_checkpoint=world.final_checkpoint(),
                        closes_ms=T0 + DAY, ts=T0)
    assert world.add(ce.study_post_entry(world.patients[0], post)) == "signer_not_allowed"


def test_results_wait_until_every_contribution_is_under_a_recorded_final_checkpoint(world: MarketWorld) -> None:
    assert world.post() == "ok"
    leaves = []
    for p in world.patients[:2]:
        assert world.contribute(p, world.give(p)[1]) == "ok"
        leaves.append(world.last_index)
    agg = world.aggregators()[0]
    answer = {"sum": 140, "n": 2}
    assert world.result(agg, leaves, leaves, answer) == "contributions_not_final"
    short = world.final_checkpoint(size=leaves[-1])  # covers the first contribution, not the last
    assert world.add(ce.checkpoint_final_entry(world.operator, short)) == "ok"
    assert miner_rules.final_size(world.state) == leaves[-1]
    assert world.result(agg, leaves, leaves, answer) == "contributions_not_final"
    assert world.finalize() == "ok"
    assert world.result(agg, leaves, leaves, answer) == "ok"
    # A study nobody contributed to has nothing to wait for.
    assert world.post("empty") == "ok"
    assert world.result(world.aggregators("empty")[0], [], [], None, study_id="empty") == "ok"


# -- audits ---------------------------------------------------------------------------------------------

def test_the_audit_sample_size_and_draw_are_a_pure_function_of_seed_and_included() -> None:
    assert [rules.audit_size(n) for n in (0, 1, 3, 20, 21, 40, 41, 320, 321, 100_000)] == \
        [0, 1, 1, 1, 2, 2, 3, 16, 16, 16]
    seed = rules.audit_seed(b"\x01" * 32, "hr-1")
    assert seed == rules.audit_seed(b"\x01" * 32, "hr-1") != rules.audit_seed(b"\x01" * 32, "hr-2")
    assert seed != rules.audit_seed(b"\x02" * 32, "hr-1")
    included = list(range(100, 500, 3))  # 134 included: 7 audited
    sample = rules.audit_sample(seed, included)
    assert sample == rules.audit_sample(seed, list(reversed(included))) == sorted(sample)
    assert len(sample) == 7 and set(sample) <= set(included)
    import hashlib
    ranked = sorted(included, key=lambda i: hashlib.sha256(seed + i.to_bytes(8, "big")).digest())
    assert sample == sorted(ranked[:7])  # the smallest hashes, returned ascending
    assert rules.audit_sample(rules.audit_seed(b"\x02" * 32, "hr-1"), included) != sample
    assert rules.audit_sample(seed, []) == []


def test_a_sample_is_drawn_from_the_latest_final_checkpoint_recorded_after_the_decision(world: MarketWorld) -> None:
    leaves = world.open_study_with(3)
    assert world.sample() == "study_not_answered"  # nothing decided: nothing to audit
    before = world.final_checkpoint()
    for agg in world.aggregators()[:2]:
        assert world.result(agg, leaves, leaves, {"sum": 210, "n": 3}) == "ok"
    decided_at = world.study()["decided"]["at"]
    # The latest recorded final checkpoint predates the decision: its seed was known to the aggregators.
    assert world.sample() == "checkpoint_before_decision"
    assert world.sample(note=before) == "checkpoint_before_decision"
    assert world.finalize() == "ok"
    older = world.latest_final_note()
    assert world.finalize() == "ok"
    assert world.sample(note=older) == "not_the_latest_final_checkpoint"  # no choosing among final notes
    assert world.sample(note=world.final_checkpoint(cosigners=world.miners[:2])) == "seed_checkpoint_not_final"
    assert world.sample(note=world.final_checkpoint(size=len(world.entries) + 5)) == \
        "seed_checkpoint_from_the_future"
    assert world.sample("nope") == "unknown_study"
    note = world.latest_final_note()
    assert world.sample(note=note, who=world.patients[5]) == "ok"  # anyone may post it: the rules fix the draw
    final = miner_rules.final_note(world.state, note)
    assert not isinstance(final, str) and final.size > decided_at
    audit = world.study()["audit"]
    seed = rules.audit_seed(final.seed, "hr-1")
    assert audit == {"seed": seed.hex(), "size": final.size, "sample": rules.audit_sample(seed, leaves),
                     "at": world.last_index, "window_ends_ms": T0 + rules.AUDIT_WINDOW_MS, "disclosed": {},
                     "verdicts": {}, "outcome": {}}
    assert len(audit["sample"]) == 1 and audit["sample"][0] in leaves
    assert world.sample(note=note) == "already_sampled"
    replica = Runtime(world.genesis)  # anyone replaying the log gets the same draw
    assert [replica.apply(e) for e in world.entries][-2] == "ok"
    assert rules.study_record(replica.state, "hr-1")["audit"] == audit  # type: ignore[index]


def test_only_a_sampled_contributor_discloses_her_own_contribution_once_within_the_window(world: MarketWorld) -> None:
    leaves = world.answered(3)
    assert world.disclose(leaves[0]) == "not_sampled"
    assert world.finalize() == "ok" and world.sample() == "ok"
    [sampled] = world.study()["audit"]["sample"]
    unsampled = next(i for i in leaves if i != sampled)
    other = world.owner_of(unsampled)
    assert world.disclose(unsampled) == "not_in_sample"
    assert world.disclose(sampled, who=other) == "not_the_contributor"
    assert world.disclose(sampled, keys=4) == "keys_do_not_match_aggregators"
    owner = world.owner_of(sampled).device_id
    assert world.disclose(sampled, epochs=[(owner, 7), (owner, 7)]) == "duplicate_epochs"
    assert world.disclose(sampled, epochs=[(owner, 7), (owner, 8)]) == "ok"
    assert world.study()["audit"]["disclosed"] == {str(sampled): world.last_index}
    assert world.disclose(sampled) == "already_disclosed"
    # A second study, sampled, whose owner waits past the window.
    assert world.post("late") == "ok"
    for p in world.patients[3:5]:
        assert world.contribute(p, world.give(p)[1], "late") == "ok"
    late = world.study("late")["contributions"]
    assert world.finalize() == "ok"
    for agg in world.aggregators("late")[:2]:
        assert world.result(agg, late, late, {"sum": 140, "n": 2}, study_id="late") == "ok"
    assert world.finalize() == "ok" and world.sample("late") == "ok"
    [late_sampled] = world.study("late")["audit"]["sample"]
    assert world.attest(world.study("late")["audit"]["window_ends_ms"]) == "ok"
    assert world.disclose(late_sampled, "late") == "audit_window_over"


def test_a_majority_of_the_aggregators_verdicts_is_the_outcome(world: MarketWorld) -> None:
    world.answered(3)
    assert world.finalize() == "ok" and world.sample() == "ok"
    [sampled] = world.study()["audit"]["sample"]
    first, second, third = world.aggregators()
    assert world.verdict(first, sampled) == "not_disclosed"
    assert world.disclose(sampled) == "ok"
    outsider = next(m for m in world.miners if m.device_id not in world.study()["aggregators"])
    assert world.verdict(outsider, sampled) == "not_an_aggregator"
    assert world.verdict(first, sampled + 1) == "not_in_sample"
    assert world.verdict(first, sampled, "match", "value_mismatch") == "bad_reason"
    assert world.verdict(first, sampled, "mismatch") == "bad_reason"
    assert world.verdict(first, sampled, "match") == "ok"
    assert world.verdict(first, sampled, "mismatch", "value_mismatch") == "verdict_already_posted"
    assert world.verdict(second, sampled, "mismatch", "commitment_mismatch") == "ok"
    assert world.study()["audit"]["outcome"] == {}  # one each of three: no majority yet
    assert world.close() == "audit_pending"
    assert world.verdict(third, sampled, "mismatch", "value_mismatch") == "ok"
    audit = world.study()["audit"]
    assert audit["outcome"] == {str(sampled): "mismatch"}
    assert audit["verdicts"] == {str(sampled): {first.device_id: "match", second.device_id: "mismatch",
                                                third.device_id: "mismatch"}}


def test_a_mismatch_forfeits_the_contributors_price_to_the_researcher_and_conserves_the_supply(
        world: MarketWorld) -> None:
    w = world
    supply = w.supply()
    leaves = w.answered(3)
    assert w.finalize() == "ok" and w.sample() == "ok"
    [sampled] = w.study()["audit"]["sample"]
    assert w.disclose(sampled) == "ok"
    for agg in w.aggregators()[:2]:
        assert w.verdict(agg, sampled, "mismatch", "value_mismatch") == "ok"
    before = {p.device_id: w.state.balance(f"patient:{p.device_id}") for p in w.patients}
    researcher = w.state.balance(f"researcher:{w.researcher.device_id}")
    assert w.close() == "ok"
    assert w.supply() == supply and w.state.balance("study:hr-1") == 0
    paid = {p.device_id: w.state.balance(f"patient:{p.device_id}") - before[p.device_id] for p in w.patients}
    cheat = w.owner_of(sampled).device_id
    assert paid[cheat] == 0
    assert all(paid[w.owner_of(i).device_id] == PRICE for i in leaves if i != sampled)
    deposit = PRICE * MAX + FEE * 3
    assert w.state.balance(f"researcher:{w.researcher.device_id}") - researcher == deposit - 2 * PRICE - 2 * FEE
    audit = w.study()["audit"]
    assert audit["forfeited"] == [sampled] and audit["outcome"] == {str(sampled): "mismatch"}


def test_an_unopened_sample_forfeits_once_the_window_is_over_and_close_waits_for_it(world: MarketWorld) -> None:
    supply = world.supply()
    leaves = world.answered(3)
    assert world.finalize() == "ok" and world.sample() == "ok"
    [sampled] = world.study()["audit"]["sample"]
    ends = world.study()["audit"]["window_ends_ms"]
    assert world.close() == "audit_pending"
    assert world.attest(ends - 1) == "ok"
    assert world.close() == "audit_pending"
    assert world.attest(ends) == "ok"
    researcher = world.state.balance(f"researcher:{world.researcher.device_id}")
    assert world.close() == "ok"
    assert world.supply() == supply
    audit = world.study()["audit"]
    assert audit["outcome"] == {str(sampled): "unopened"} and audit["forfeited"] == [sampled]
    assert world.state.balance(f"patient:{world.owner_of(sampled).device_id}") == 0
    assert all(world.state.balance(f"patient:{world.owner_of(i).device_id}") == PRICE for i in leaves if i != sampled)
    assert world.state.balance(f"researcher:{world.researcher.device_id}") - researcher == \
        PRICE * MAX + FEE * 3 - 2 * PRICE - 2 * FEE


def test_a_disclosed_contribution_without_a_majority_verdict_is_undecided_and_paid(world: MarketWorld) -> None:
    leaves = world.answered(3)
    assert world.finalize() == "ok" and world.sample() == "ok"
    [sampled] = world.study()["audit"]["sample"]
    assert world.disclose(sampled) == "ok"
    first = world.aggregators()[0]
    assert world.verdict(first, sampled, "mismatch", "value_mismatch") == "ok"  # one of three: no majority
    ends = world.study()["audit"]["window_ends_ms"]
    assert world.close() == "audit_pending"
    assert world.attest(ends) == "ok"
    assert world.verdict(world.aggregators()[1], sampled, "mismatch", "value_mismatch") == "audit_window_over"
    assert world.close() == "ok"
    audit = world.study()["audit"]
    assert audit["outcome"] == {str(sampled): "undecided"} and audit["forfeited"] == []
    assert all(world.state.balance(f"patient:{world.owner_of(i).device_id}") == PRICE for i in leaves)


def test_an_answered_study_nobody_sampled_pays_everyone_after_the_grace(world: MarketWorld) -> None:
    leaves = world.answered(3)
    closes = world.study()["closes_ms"]
    assert world.close() == "audit_not_sampled"
    assert world.attest(closes + rules.CLOSE_GRACE_MS - 1) == "ok"
    assert world.close() == "audit_not_sampled"
    assert world.attest(closes + rules.CLOSE_GRACE_MS) == "ok"
    assert world.close() == "ok"
    assert world.study()["audit"] is None and world.study()["state"] == "answered"
    assert all(world.state.balance(f"patient:{world.owner_of(i).device_id}") == PRICE for i in leaves)
    assert world.finalize() == "ok" and world.sample() == "study_already_closed"
