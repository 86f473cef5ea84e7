"""Refused sales on an honest log, the bridge's dry-run check, and miners' re-execution of new leaves."""

from __future__ import annotations

import pytest
from test_contracts_world import FLU_SHOT, INSURER_FUNDS, World

from contract_rules import transactions as ce
from contract_rules.replay import ContractWitness, Violation, decode_leaf


@pytest.fixture
def w() -> World:
    world = World()
    world.standard_parties()
    world.policy("pt-alice")
    return world


def test_check_is_a_dry_run(w: World) -> None:
    root, size = w.state.root(), w.state.size
    assert w.runtime.check(w.sale_entry(rx_ref=None)) == "rx_missing"
    assert w.runtime.check(w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=4500)) == "ok"
    assert w.runtime.check(w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=2 * INSURER_FUNDS)) \
        == "insufficient_funds"
    assert (w.state.root(), w.state.size) == (root, size)


def test_a_refused_sale_is_recorded_and_counted_against_the_pharmacy(w: World) -> None:
    sale = w.sale_entry(rx_ref=None)
    assert w.runtime.check(sale) == "rx_missing"
    assert w.add(w.refusal(sale, "rx_missing")) == "ok"
    assert w.state.table("violations") == {w.pharmacy_account(): 1}
    assert w.add(w.refusal(sale, "rx_missing")) == "duplicate_event"  # counted once
    assert w.add(sale) == "duplicate_event"  # and the refused sale cannot be appended afterwards


def test_a_refusal_must_be_true(w: World) -> None:
    rx, _ = w.prescribe()
    valid = w.sale_entry(rx_ref=rx.rx_ref())
    assert w.add(w.refusal(valid, "rx_missing")) == "refused_a_valid_sale"
    assert w.add(w.refusal(w.sale_entry(rx_ref=None), "rx_expired")) == "refusal_reason_mismatch"
    broke = w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=2 * INSURER_FUNDS)
    assert w.add(w.refusal(broke, "insufficient_funds")) == "ok"
    assert w.state.table("violations") == {}  # only Rx refusals count against the pharmacy
    tampered = bytearray(valid.cose)
    tampered[-1] ^= 1
    forged = ce.signed(w.operator, ce.SALE_REFUSED, ce.SaleRefusal(event=bytes(tampered), reason="rx_missing", ts=0))
    assert w.add(forged) == "refused_sale_not_signed_by_a_registered_device"
    assert w.add(ce.signed(w.pharmacy, ce.SALE_REFUSED, ce.SaleRefusal(event=valid.cose, reason="x", ts=0))) \
        == "signer_not_allowed"


def honest_day() -> World:
    """What an honest bridge appends: only entries `check` accepts, refused sales as `sale.refused`."""
    w = World()
    w.standard_parties()
    w.policy("pt-alice")
    rx, _ = w.prescribe(quantity=1, refills=0)
    for sale in (w.sale_entry(rx_ref=rx.rx_ref(), pay="insurance"),
                 w.sale_entry(rx_ref=rx.rx_ref(), terminal=w.terminal2),  # the race's loser
                 w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=4500)):
        verdict = w.runtime.check(sale)
        w.add(sale if verdict == "ok" else w.refusal(sale, verdict))
    assert all(r == "ok" for _, r in w.state.results)
    return w


def test_a_miner_accepts_an_honest_log_checkpoint_by_checkpoint() -> None:
    w = honest_day()
    leaves = [e.encode() for e in w.entries]
    witness = ContractWitness(w.genesis)
    for old, new in ((0, 5), (5, 5), (5, 11), (11, len(leaves))):
        assert witness(old, new, leaves[old:new]) is None
    assert witness.state.root() == w.state.root()
    assert [decode_leaf(leaf) for leaf in leaves] == w.entries


def test_a_miner_refuses_a_checkpoint_with_a_violating_sale_and_keeps_its_state() -> None:
    w = honest_day()
    witness = ContractWitness(w.genesis)
    leaves = [e.encode() for e in w.entries]
    assert witness(0, len(leaves), leaves) is None
    root, size = witness.state.root(), witness.state.size
    # A dishonest bridge appends an Rx-only sale with no prescription as if it were valid.
    bad = [w.sale_entry(FLU_SHOT, rx_only=False).encode(), w.sale_entry(rx_ref=None).encode()]
    violation = witness(size, size + 2, bad)
    assert violation == Violation(size + 1, "rx_missing", "event: rx_missing")
    assert (witness.state.root(), witness.state.size) == (root, size)
    # The same range without the violating leaf is cosignable.
    assert witness(size, size + 1, bad[:1]) is None


def test_a_miner_flags_leaves_it_cannot_read() -> None:
    w = honest_day()
    witness = ContractWitness(w.genesis)
    violation = witness(0, 1, [b"\xa1\x61t\x61x"])
    assert violation is not None and (violation.leaf_index, violation.rule) == (0, "bad_leaf")
    assert witness.state.size == 0
    with pytest.raises(ValueError, match="replay the log"):
        witness(3, 4, [w.entries[3].encode()])
