"""Prescription rules: no valid Rx, no Rx-only sale; fills, refills, expiry, revocation and the refill race."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_contracts_world import AMOXICILLIN, DAY, METFORMIN, T0, World, ident

from contract_rules import transactions as ce


@pytest.fixture
def w() -> World:
    world = World()
    world.standard_parties()
    return world


def violations(w: World, pharmacy=None) -> int:  # noqa: ANN001
    return w.state.table("violations").get(w.pharmacy_account(pharmacy), 0)


def test_valid_rx_sale_is_accepted_and_uses_a_fill(w: World) -> None:
    rx, result = w.prescribe(quantity=2, refills=0)
    assert result == "ok"
    assert w.sale(rx_ref=rx.rx_ref(), quantity=2) == "ok"
    record = w.state.table("rx")[rx.rx_ref()]
    assert (record["fills"], record["open"], record["sales"]) == (1, 0, [w.last_index])
    assert violations(w) == 0


def test_the_rx_body_stays_off_ledger(w: World) -> None:
    rx, _ = w.prescribe(patient="pt-alice")
    anchor = w.entries[-1].cose  # the formulary names the drug, publicly; the anchor must not link it to her
    assert b"pt-alice" not in anchor and AMOXICILLIN.encode() not in anchor
    assert b"pt-alice" not in b"".join(e.cose for e in w.entries)
    record = w.state.table("rx")[rx.rx_ref()]
    assert "pt-alice" not in repr(record) and AMOXICILLIN not in repr(record)


def test_pharmacy_checks_the_body_it_holds_against_the_anchor(w: World) -> None:
    rx, _ = w.prescribe()
    sig = ce.sign_prescription(w.prescriber, rx)
    anchor = ce.rx_anchor_for(rx, T0)
    assert ce.check_rx_against_anchor(rx, sig, w.prescriber.public_key, anchor) is None
    forged = rx.model_copy(update={"quantity": 200})
    assert ce.check_rx_against_anchor(forged, sig, w.prescriber.public_key, anchor) == "bad_rx_signature"
    other = ce.sign_prescription(w.prescriber, forged)
    assert ce.check_rx_against_anchor(forged, other, w.prescriber.public_key, anchor) == "rx_does_not_match_anchor"


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"rx_ref": None}, "rx_missing"),
    ({"rx_ref": "ab" * 32}, "rx_unknown"),
    ({"patient": "pt-bob"}, "rx_other_patient"),
    ({"item": METFORMIN}, "rx_other_drug"),
    ({"quantity": 3}, "rx_quantity_exceeds_fill"),
    ({"ts": T0 + 31 * DAY}, "rx_expired"),
])
def test_rx_only_sale_without_a_valid_rx_is_rejected_and_counted(w: World, kwargs: dict, reason: str) -> None:
    rx, _ = w.prescribe(quantity=2, expires_ms=T0 + 30 * DAY)
    kwargs = {"rx_ref": rx.rx_ref(), **kwargs}
    assert w.sale(**kwargs) == reason
    assert violations(w) == 1
    assert w.state.table("rx")[rx.rx_ref()]["fills"] == 0  # a rejected sale consumes nothing


def test_otc_sale_needs_no_rx(w: World) -> None:
    assert w.sale("70000-0036-1", rx_only=False, price=899) == "ok"
    assert violations(w) == 0


def test_sales_from_a_device_that_is_not_a_pharmacy_terminal_are_rejected(w: World) -> None:
    w.register_device(w.wearable, "heart_rate_band", "pt-alice")
    rx, _ = w.prescribe()
    assert w.sale(rx_ref=rx.rx_ref(), terminal=w.wearable) == "not_a_pharmacy_terminal"


def test_partial_fills_then_refill_then_exhausted(w: World) -> None:
    rx, _ = w.prescribe(quantity=3, refills=1)
    ref = rx.rx_ref()
    assert w.sale(rx_ref=ref, quantity=1) == "ok"  # fill 1, 2 left open
    assert w.sale(rx_ref=ref, quantity=3) == "rx_quantity_exceeds_fill"  # the open fill has only 2
    assert w.sale(rx_ref=ref, quantity=2) == "ok"  # completes fill 1
    assert w.sale(rx_ref=ref, quantity=3) == "ok"  # the refill
    assert w.sale(rx_ref=ref, quantity=1) == "rx_no_fills_left"
    record = w.state.table("rx")[ref]
    assert (record["fills"], record["open"]) == (2, 0)
    assert violations(w) == 2


def test_revocation_by_the_prescriber_stops_later_sales(w: World) -> None:
    rx, _ = w.prescribe(refills=3)
    ref = rx.rx_ref()
    assert w.sale(rx_ref=ref, quantity=2) == "ok"
    assert w.revoke_rx(ref, w.prescriber2) == "not_the_prescriber"
    assert w.revoke_rx(ref) == "ok"
    assert w.revoke_rx(ref) == "rx_already_revoked"
    assert w.sale(rx_ref=ref, quantity=1) == "rx_revoked"
    assert w.state.table("rx")[ref]["sales"] == [w.last_index - 4]  # the sale before revocation stands


def test_only_registered_prescribers_can_anchor(w: World) -> None:
    rx, result = w.prescribe(prescriber=w.pharmacy)
    assert result == "signer_not_allowed"
    stranger = ident(0x77)
    _, result = w.prescribe(prescriber=stranger, nonce=1)
    assert result == "unknown_signer"
    assert w.sale(rx_ref=rx.rx_ref()) == "rx_unknown"


def test_anchor_rules(w: World) -> None:
    _, first = w.prescribe()
    _, again = w.prescribe()
    assert (first, again) == ("ok", "rx_already_anchored")
    assert w.prescribe(nonce=1, expires_ms=T0)[1] == "rx_expires_before_issue"
    assert w.prescribe(nonce=2, controlled=True, refills=6)[1] == "controlled_too_many_refills"
    assert w.prescribe(nonce=3, controlled=True, refills=5)[1] == "ok"


def test_two_terminals_racing_for_the_last_refill_exactly_one_wins_by_log_order(w: World) -> None:
    rx, _ = w.prescribe(quantity=1, refills=1)
    ref = rx.rx_ref()
    assert w.sale(rx_ref=ref) == "ok"
    # Both terminals sell the last refill at the same instant; the log order decides.
    a = w.sale(rx_ref=ref, terminal=w.terminal2, ts=T0 + 2 * DAY)
    b = w.sale(rx_ref=ref, terminal=w.terminal, ts=T0 + 2 * DAY)
    assert (a, b) == ("ok", "rx_no_fills_left")
    assert violations(w, w.pharmacy2) == 0 and violations(w, w.pharmacy) == 1


def test_a_replayed_sale_leaf_is_not_a_second_fill(w: World) -> None:
    rx, _ = w.prescribe(quantity=1, refills=5)
    assert w.sale(rx_ref=rx.rx_ref()) == "ok"
    assert w.add(w.entries[-1]) == "duplicate_event"
    assert w.state.table("rx")[rx.rx_ref()]["fills"] == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 3), st.lists(st.tuples(st.integers(1, 5), st.booleans()), max_size=15))
def test_never_dispenses_more_than_prescribed_and_every_refusal_is_counted(
        quantity: int, refills: int, sales: list[tuple[int, bool]]) -> None:
    w = World()
    w.standard_parties()
    rx, _ = w.prescribe(quantity=quantity, refills=refills)
    dispensed = refused = 0
    for qty, second in sales:
        result = w.sale(rx_ref=rx.rx_ref(), quantity=qty, terminal=w.terminal2 if second else w.terminal)
        if result == "ok":
            dispensed += qty
        else:
            refused += 1
    record = w.state.table("rx")[rx.rx_ref()]
    assert dispensed <= quantity * (1 + refills)
    assert record["fills"] <= 1 + refills and 0 <= record["open"] < quantity + 1
    assert sum(w.state.table("violations").values()) == refused
