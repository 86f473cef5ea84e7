"""Storage rewards: reputation, conservation of the pool, selfish miners lose (issue 7)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from contract_rules.rewards import EpochEvents, Reputation, RewardPolicy, settle_epoch

MINERS = ["honest", "lazy", "selfish"]
events_strategy = st.builds(
    EpochEvents,
    audits=st.lists(st.tuples(st.sampled_from(MINERS), st.booleans()), max_size=40),
    retrievals=st.lists(st.tuples(st.sampled_from(MINERS), st.booleans()), max_size=40),
)


@settings(max_examples=200, deadline=None)
@given(pool=st.integers(0, 10**12), carry=st.integers(0, 10**6), events=events_strategy,
       rep=st.dictionaries(st.sampled_from(MINERS), st.builds(Reputation, st.integers(0, 99), st.integers(0, 99))))
def test_payouts_and_carry_sum_to_the_pool_exactly(pool, carry, events, rep):
    r = settle_epoch(RewardPolicy(pool), events, rep, carry_in=carry)
    assert sum(r.payouts.values()) + r.carry == pool + carry
    assert all(isinstance(v, int) and v >= 0 for v in r.payouts.values())
    assert r == settle_epoch(RewardPolicy(pool), events, rep, carry_in=carry)


def test_an_unanswered_retrieval_is_a_failed_audit_and_earns_nothing():
    ev = EpochEvents(audits=[("honest", True), ("selfish", True)],
                     retrievals=[("honest", True), ("selfish", False), ("selfish", False)])
    r = settle_epoch(RewardPolicy(1000), ev, {})
    assert r.reputation["selfish"] == Reputation(passed=1, failed=2)
    assert r.payouts["honest"] > 4 * r.payouts["selfish"] > 0
    assert r.payouts["honest"] + r.payouts["selfish"] == 1000


def test_reputation_weights_rewards_and_an_idle_epoch_carries_the_pool():
    ev = EpochEvents(audits=[("honest", True), ("lazy", True)])
    r = settle_epoch(RewardPolicy(1001), ev, {"honest": Reputation(98, 0), "lazy": Reputation(49, 49)},
                     miners=MINERS)
    assert r.payouts["honest"] > r.payouts["lazy"] and r.payouts["selfish"] == 0
    assert sum(r.payouts.values()) == 1001
    idle = settle_epoch(RewardPolicy(500), EpochEvents(audits=[("lazy", False)]), {}, carry_in=7)
    assert idle.carry == 507 and idle.payouts == {"lazy": 0}
    assert Reputation().permille == 500 and Reputation(8, 0).permille == 900
