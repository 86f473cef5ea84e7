"""Patient-signed payments: tokens move patient → pharmacy in the sale's own entry, only with her wallet's signature."""

from __future__ import annotations

import pytest
from bonded_world import FLU_SHOT, T0, BondedWorld
from test_contracts_world import DAY

from carechain.events import Purchase, authorize_payment

PRICE = 2_500


@pytest.fixture
def w() -> BondedWorld:
    world = BondedWorld()
    world.standard_parties()
    return world


def _balances(w: BondedWorld) -> tuple[int, int]:
    return w.state.balance(f"patient:{w.alice.device_id}"), w.state.balance(w.pharmacy_account())


def test_a_token_sale_moves_tokens_from_patient_to_pharmacy_with_her_signature(w: BondedWorld) -> None:
    patient, pharmacy = _balances(w)
    assert w.paid_sale(price=PRICE, pay=PRICE) == "ok"
    assert _balances(w) == (patient - PRICE, pharmacy + PRICE)
    assert w.state.table("payment_nonces")  # the authorization is spent


def test_a_sale_signed_by_another_key_moves_nothing(w: BondedWorld) -> None:
    before = _balances(w)
    assert w.paid_sale(price=PRICE, pay=PRICE, wallet=w.bob) == "bad_payment_signature"
    assert w.paid_sale(price=PRICE, pay=PRICE, wallet=w.terminal) == "bad_payment_signature"  # the terminal's own key
    assert _balances(w) == before


def test_a_terminal_cannot_change_the_terms_she_signed(w: BondedWorld) -> None:
    before = _balances(w)
    # She signed for a 25.00 sale; the terminal rings up 90.00 and asks for all of it.
    assert w.paid_sale(price=9_000, pay=9_000, signed_price=PRICE) == "bad_payment_signature"
    assert _balances(w) == before


def test_a_token_sale_without_her_authorization_is_refused(w: BondedWorld) -> None:
    before = _balances(w)
    assert w.sale(FLU_SHOT, patient=w.alice.device_id, rx_only=False, pay="token") == "payment_not_authorized"
    assert w.sale(FLU_SHOT, patient=w.alice.device_id, rx_only=False, pay="insurance") == "payment_not_authorized"
    assert _balances(w) == before


def test_an_authorization_is_spent_once(w: BondedWorld) -> None:
    assert w.paid_sale(price=PRICE, pay=PRICE, nonce=7) == "ok"
    assert w.paid_sale(price=PRICE, pay=PRICE, nonce=7) == "payment_nonce_reused"


def test_payment_amounts_and_methods_are_checked(w: BondedWorld) -> None:
    assert w.paid_sale(price=PRICE, pay=PRICE + 1) == "payment_exceeds_price"
    assert w.paid_sale(price=PRICE, pay=PRICE, method="card") == "payment_with_off_ledger_method"
    assert w.paid_sale(price=10**9, pay=10**9) == "insufficient_funds"
    assert w.paid_sale(price=PRICE, pay=PRICE, patient=w.pharmacy) == "unknown_patient"


def test_a_payment_for_another_patients_sale_is_refused(w: BondedWorld) -> None:
    payment = authorize_payment(w.bob, w.terminal.device_id, f"ndc:{FLU_SHOT}", 1, PRICE, pay_minor=PRICE, nonce=1)
    body = Purchase(item_code=FLU_SHOT, code_system="ndc", rx_only=False, quantity=1, price_minor=PRICE,
                    currency="USD", patient_token=w.alice.device_id, payment_method="token", payment=payment)
    assert w.attest(T0 + DAY) == "ok"
    assert w.add(w.event(w.terminal, "purchase", body, T0 + DAY)) == "payment_other_patient"


def test_a_refused_paid_sale_recorded_by_the_bridge_moves_nothing(w: BondedWorld) -> None:
    sale = w.paid_sale_entry(price=PRICE, pay=PRICE, wallet=w.bob)
    assert w.attest(T0 + DAY) == "ok"
    before = _balances(w)
    assert w.add(w.refusal(sale, "bad_payment_signature")) == "ok"
    assert _balances(w) == before
