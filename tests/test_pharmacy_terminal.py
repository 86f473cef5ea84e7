"""The pharmacy terminal simulator: every sale line arrives in the log signed by the terminal's own key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from carechain import envelope
from carechain.entries import Entry
from carechain.events import validate_payload
from carechain.identity import Identity
from simulators.pharmacy_terminal import ring_up
from tests.test_pipeline import register

pytestmark = pytest.mark.integration


def test_every_sale_is_anchored_exactly_as_rung_up(tmp_path: Path, broker, running_bridge) -> None:
    bridge = running_bridge
    terminal = Identity.generate()
    register(bridge.ledger, [terminal])
    summary = asyncio.run(ring_up(terminal, broker.config, bridge.log_key.public_key, tmp_path / "t", 15))
    assert summary["receipted"] == 15 and summary["pending"] == 0 and summary["quarantined"] == 0
    anchored = []
    for seq in range(15):
        cose = Entry.decode(bridge.ledger.entry(bridge.ledger.event_index(terminal.device_id, seq))).cose
        msg = envelope.parse(cose)
        assert msg.verify(terminal.public_key)  # the terminal's own key, not the bridge's
        event = validate_payload(msg.payload)
        assert event.kind == "purchase"
        anchored.append({k: v for k, v in event.body.items() if v is not None})
    assert anchored == summary["sales"]
    assert all(line["rx_ref"] for line in anchored if line["rx_only"])
    assert {line["code_system"] for line in anchored} <= {"ndc", "rxnorm", "gtin"}


def test_wallet_sales_carry_the_patients_signed_payment(tmp_path: Path, broker, running_bridge) -> None:
    from carechain.events import payment_message
    from carechain.identity import verify_signature

    bridge = running_bridge
    terminal = Identity.generate()
    wallets = [Identity.generate(), Identity.generate()]
    register(bridge.ledger, [terminal])
    summary = asyncio.run(ring_up(terminal, broker.config, bridge.log_key.public_key, tmp_path / "t", 6,
                                  wallets=wallets))
    assert summary["receipted"] == 6 and summary["quarantined"] == 0
    by_id = {w.device_id: w for w in wallets}
    for seq in range(6):
        cose = Entry.decode(bridge.ledger.entry(bridge.ledger.event_index(terminal.device_id, seq))).cose
        body = validate_payload(envelope.parse(cose).payload).body
        payment = body["payment"]
        wallet = by_id[payment["patient"]]
        assert body["patient_token"] == wallet.device_id == wallets[seq % 2].device_id
        assert body["payment_method"] in ("token", "insurance")
        message = payment_message(terminal.device_id, f"{body['code_system']}:{body['item_code']}", body["quantity"],
                                  body["price_minor"], payment["pay_minor"], payment["claim_minor"], "",
                                  payment["nonce"])
        assert verify_signature(wallet.public_key, message, payment["sig"])  # her key, over exactly this sale
        assert payment["sig"].hex() == summary["sales"][seq]["payment"]["sig"]


def test_a_wallet_payment_is_what_the_contracts_accept() -> None:
    """The terminal's claim is the capped share insurance v3 computes: the sale is accepted as rung up."""
    from bonded_world import FLU_SHOT, T0, BondedWorld
    from test_contracts_world import DAY

    from carechain.events import Purchase
    from simulators.pharmacy_terminal import pay_with_wallet

    w = BondedWorld()
    w.standard_parties()
    assert w.add(w.consented(w.offer(flu_cap=2_500))) == "ok"
    policy = w.state.table("policies")[w.alice.device_id]
    pharmacy, insurer = w.state.balance(w.pharmacy_account()), w.state.balance(w.insurer_account)
    sale = Purchase(item_code=FLU_SHOT, code_system="ndc", rx_only=False, quantity=2, price_minor=900_000,
                    currency="USD", patient_token="pt-anyone", payment_method="insurance")
    paid = pay_with_wallet(sale, w.terminal.device_id, w.alice, policy, nonce=1)
    assert paid.payment is not None and paid.payment.claim_minor == 5_000  # 2 × the 25.00 cap, not 9,000.00
    assert w.attest(T0 + DAY) == "ok"
    assert w.add(w.event(w.terminal, "purchase", paid, T0 + DAY)) == "ok"
    assert w.state.balance(w.insurer_account) == insurer - 5_000
    assert w.state.balance(w.pharmacy_account()) == pharmacy + 5_000
    card = sale.model_copy(update={"payment_method": "card", "price_minor": 3_000})
    tokens = pay_with_wallet(card, w.terminal.device_id, w.alice, nonce=2)
    assert tokens.payment_method == "token" and tokens.payment is not None and tokens.payment.pay_minor == 3_000
    assert w.add(w.event(w.terminal, "purchase", tokens, T0 + DAY)) == "ok"
    assert w.state.balance(w.pharmacy_account()) == pharmacy + 8_000
