"""Token ledger: integer minor units, conserved supply, balances moved only by accepted contract effects."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_contracts_world import FLU_SHOT, INSURER_FUNDS, PHARMACY_BOND, World

from contract_rules import replay

SENDERS = ("insurer", "pharmacy", "pharmacy2", "miner")
RECIPIENTS = (*SENDERS, "patient:pt-alice", "patient:pt-bob", "pool:miners")

transfer = st.tuples(st.just("transfer"), st.sampled_from(SENDERS), st.sampled_from(RECIPIENTS),
                     st.integers(1, 3 * INSURER_FUNDS), st.integers(0, 4))
sale = st.tuples(st.just("sale"), st.sampled_from(("pt-alice", "pt-bob")), st.sampled_from(("insurance", "card")),
                 st.integers(0, 2 * INSURER_FUNDS), st.integers(0, 0))
operations = st.lists(st.one_of(transfer, sale), max_size=25)


def account(w: World, name: str) -> str:
    if ":" in name:
        return name
    who = getattr(w, name)
    return f"{'pharmacy' if name.startswith('pharmacy') else name}:{who.device_id}"


def run(w: World, op: tuple) -> str:
    kind, a, b, amount, nonce = op
    if kind == "transfer":
        return w.transfer(getattr(w, a), account(w, b), amount, nonce=nonce)
    return w.sale(FLU_SHOT, rx_only=False, patient=a, pay=b, price=amount)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_supply_is_conserved_and_only_accepted_entries_move_balances(ops: list[tuple]) -> None:
    w = World()
    w.standard_parties()
    w.policy("pt-alice")
    supply = w.state.supply
    for op in ops:
        before = dict(w.state.balances)
        result = run(w, op)
        after = w.state.balances
        assert sum(after.values()) == supply
        assert all(type(v) is int and v > 0 for v in after.values())
        if result != "ok":
            assert after == before, result
        elif op[0] == "transfer":
            src, dst, amount = account(w, op[1]), account(w, op[2]), op[3]
            assert after.get(src, 0) == before.get(src, 0) - amount
            assert after.get(dst, 0) == before.get(dst, 0) + amount
    # A from-scratch replay agrees with the incremental state.
    assert replay(w.genesis, w.entries).root() == w.state.root()


def test_transfer_rules() -> None:
    w = World()
    w.standard_parties()
    pharmacy = w.pharmacy_account()
    assert w.transfer(w.insurer, pharmacy, 700, nonce=100) == "ok"
    assert w.transfer(w.insurer, pharmacy, 700, nonce=100) == "nonce_reused"
    assert w.transfer(w.insurer, w.insurer_account, 5) == "transfer_to_self"
    assert w.transfer(w.pharmacy, "patient:pt-alice", 701) == "insufficient_funds"
    assert w.transfer(w.pharmacy, "patient:pt-alice", 700) == "ok"
    bonded = {f"bond:{p.device_id}": PHARMACY_BOND for p in (w.pharmacy, w.pharmacy2)}
    assert w.state.balances == {w.insurer_account: INSURER_FUNDS - 700, "patient:pt-alice": 700,
                                "pool:miners": 500_000, **bonded}


def test_genesis_supply_is_the_only_supply() -> None:
    w = World()
    assert w.state.supply == INSURER_FUNDS + 500_000 + 2 * PHARMACY_BOND == sum(w.state.balances.values())
