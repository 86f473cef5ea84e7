"""The formulary decides which sales need an Rx (never the terminal), schedules and quantity limits; a refused
sale counts against the pharmacy and slashes its bond; only an admitted pharmacy's terminal may sell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_contracts_world import AMOXICILLIN, ANALGESIC, DAY, PHARMACY_BOND, T0, World, ident

from contract_rules import bonds
from contract_rules import transactions as ce

OXYCODONE = "59011-410-10"  # Schedule II
HEROIN = "99999-000-01"  # Schedule I
SLASHED = bonds.SLASH["refused_sale"]


@pytest.fixture
def w() -> World:
    world = World()
    world.standard_parties()
    return world


def violations(w: World) -> int:
    return w.state.table("violations").get(w.pharmacy_account(), 0)


def bond_left(w: World) -> int:
    record = w.state.table("bonds")[w.pharmacy.device_id]
    assert record["amount"] == w.state.balance(bonds.bond_account(w.pharmacy.device_id))
    return int(record["amount"])


def item(code: str, *, rx_only: bool, schedule: int = 0, max_quantity: int = 10) -> ce.FormularyItem:
    return ce.FormularyItem(item=f"ndc:{code}", rx_only=rx_only, schedule=schedule, max_quantity=max_quantity)


def test_an_authority_sets_formulary_items_and_nobody_else_can(w: World) -> None:
    record = w.state.table("formulary")[f"ndc:{AMOXICILLIN}"]
    assert record == {"rx_only": True, "schedule": 0, "max_quantity": 10, "authority": w.authority.device_id,
                      "at": record["at"]}
    otc = item("11111-111-11", rx_only=False)
    assert w.set_formulary(otc, authority=w.pharmacy) == "signer_not_allowed"
    assert w.set_formulary(otc, authority=ident(0x70)) == "unknown_signer"
    assert w.set_formulary(otc, otc) == "formulary_item_repeated"
    assert w.set_formulary(item("11111-111-11", rx_only=False, schedule=4)) == "controlled_item_not_rx_only"
    assert "ndc:11111-111-11" not in w.state.table("formulary")


def test_amoxicillin_sold_as_non_rx_is_refused_because_the_formulary_says_rx_only(w: World) -> None:
    # Regression: the rules used to trust the terminal's `rx_only` flag, so this sale went through.
    assert w.sale(AMOXICILLIN, rx_only=False) == "rx_missing"
    assert violations(w) == 1
    assert bond_left(w) == PHARMACY_BOND - SLASHED
    assert w.state.balance("pool:miners") == 500_000 + SLASHED
    assert w.state.table("bonds")[w.pharmacy.device_id]["offences"] == [[w.last_index, "refused_sale"]]


def test_an_item_not_on_the_formulary_is_rx_only(w: World) -> None:
    assert w.sale("12345-678-90", rx_only=False) == "rx_missing"
    assert violations(w) == 1


def test_the_terminal_flag_can_only_make_a_sale_stricter(w: World) -> None:
    assert w.sale(ANALGESIC, rx_only=False) == "ok"
    assert w.sale(ANALGESIC, rx_only=True) == "rx_missing"  # the terminal asked for an Rx: it must have one
    assert violations(w) == 1


def test_a_sale_above_the_formularys_quantity_per_fill_is_refused(w: World) -> None:
    assert w.sale(ANALGESIC, rx_only=False, quantity=21) == "formulary_quantity_exceeded"
    assert w.sale(ANALGESIC, rx_only=False, quantity=20) == "ok"
    rx, _ = w.prescribe(quantity=12, refills=0)
    assert w.sale(rx_ref=rx.rx_ref(), quantity=11) == "formulary_quantity_exceeded"  # the Rx allows 12
    assert w.sale(rx_ref=rx.rx_ref(), quantity=10) == "ok"
    assert violations(w) == 2


def test_an_authority_can_reclassify_an_item_from_the_next_entry_on(w: World) -> None:
    assert w.sale(ANALGESIC, rx_only=False) == "ok"
    assert w.set_formulary(item(ANALGESIC, rx_only=True)) == "ok"
    assert w.sale(ANALGESIC, rx_only=False) == "rx_missing"


def test_schedules_decide_what_a_controlled_drug_needs(w: World) -> None:
    assert w.set_formulary(item(OXYCODONE, rx_only=True, schedule=2), item(HEROIN, rx_only=True, schedule=1)) == "ok"
    plain, _ = w.prescribe(drug=OXYCODONE, quantity=1, refills=0, nonce=1)
    assert w.sale(OXYCODONE, rx_ref=plain.rx_ref()) == "rx_not_controlled"
    controlled, _ = w.prescribe(drug=OXYCODONE, quantity=1, refills=2, controlled=True, nonce=2)
    assert w.sale(OXYCODONE, rx_ref=controlled.rx_ref()) == "ok"
    assert w.sale(OXYCODONE, rx_ref=controlled.rx_ref()) == "schedule_ii_no_refills"
    schedule_i, _ = w.prescribe(drug=HEROIN, quantity=1, refills=0, controlled=True, nonce=3)
    assert w.sale(HEROIN, rx_ref=schedule_i.rx_ref()) == "schedule_i_not_dispensable"
    assert violations(w) == 3


@pytest.mark.parametrize("owner", ["patient", "insurer", "unregistered"])
def test_a_terminal_whose_owner_is_not_a_registered_pharmacy_cannot_sell(owner: str) -> None:
    w = World()
    w.standard_parties()
    shop, terminal = ident(0x41), ident(0x42)
    if owner != "unregistered":
        assert w.register_party(owner, shop) == "ok"
    assert w.register_device(terminal, "pharmacy_terminal", shop.device_id) == "ok"
    rx, _ = w.prescribe()
    assert w.sale(rx_ref=rx.rx_ref(), terminal=terminal) == "terminal_owner_not_a_pharmacy"
    assert w.sale(ANALGESIC, rx_only=False, terminal=terminal) == "terminal_owner_not_a_pharmacy"
    # Nobody's count or bond moves: the refusal is the registrar's mistake, not a pharmacy's sale.
    assert w.state.table("violations") == {} and w.state.table("offences") == {}
    assert w.state.table("rx")[rx.rx_ref()]["fills"] == 0


def test_a_registered_pharmacy_without_a_bond_is_not_admitted() -> None:
    w = World()
    w.standard_parties()
    shop, terminal = ident(0x43), ident(0x44)
    assert w.register_party("pharmacy", shop) == "ok"
    assert w.register_device(terminal, "pharmacy_terminal", shop.device_id) == "ok"
    assert w.sale(ANALGESIC, rx_only=False, terminal=terminal) == "pharmacy_not_admitted"
    assert w.transfer(w.insurer, f"pharmacy:{shop.device_id}", bonds.MIN_BOND["pharmacy"]) == "ok"
    assert w.post_bond(shop, bonds.MIN_BOND["pharmacy"]) == "ok"
    assert w.sale(ANALGESIC, rx_only=False, terminal=terminal) == "ok"


def test_slashes_below_the_minimum_bond_suspend_the_pharmacy() -> None:
    w = World()
    w.standard_parties()
    shop, terminal = ident(0x45), ident(0x46)
    minimum = bonds.MIN_BOND["pharmacy"]
    assert w.register_party("pharmacy", shop) == "ok"
    assert w.register_device(terminal, "pharmacy_terminal", shop.device_id) == "ok"
    assert w.transfer(w.insurer, f"pharmacy:{shop.device_id}", minimum) == "ok"
    assert w.post_bond(shop, minimum) == "ok"
    assert w.sale(AMOXICILLIN, rx_only=False, terminal=terminal) == "rx_missing"
    record = w.state.table("bonds")[shop.device_id]
    assert (record["amount"], record["suspended_at"]) == (minimum - SLASHED, w.last_index)
    assert w.sale(ANALGESIC, rx_only=False, terminal=terminal) == "pharmacy_not_admitted"


def test_a_refusal_the_bridge_records_carries_the_same_count_and_slash(w: World) -> None:
    """An honest bridge appends `sale.refused` in place of the sale: every replica applies the same slash."""
    assert w.attest(T0 + DAY) == "ok"
    sale = w.sale_entry(AMOXICILLIN, rx_only=False)
    assert w.add(w.refusal(sale, "rx_other_drug")) == "refusal_reason_mismatch"
    assert w.add(w.refusal(sale, "rx_missing")) == "ok"
    assert violations(w) == 1 and bond_left(w) == PHARMACY_BOND - SLASHED
    assert w.state.table("bonds")[w.pharmacy.device_id]["offences"] == [[w.last_index, "refused_sale"]]
    assert w.add(w.refusal(sale, "rx_missing")) == "duplicate_event"
    assert violations(w) == 1 and bond_left(w) == PHARMACY_BOND - SLASHED


def test_formulary_cli_sets_and_shows_what_the_rules_read(tmp_path: Path) -> None:
    from tests.test_cli import run, text

    authority, stranger = ident(0x50), ident(0x51)
    authority.save(tmp_path / "authority.key")
    stranger.save(tmp_path / "stranger.key")
    opts = ["--data-dir", str(tmp_path / "bridge")]
    registered = run("party", "register", "authority", tmp_path / "authority.key", "--name", "Board", *opts, "--json")
    assert registered.exit_code == 0, text(registered)
    assert json.loads(registered.stdout)["account"] == f"authority:{authority.device_id}"
    items = tmp_path / "formulary.json"
    items.write_text(json.dumps({"items": [
        {"item": f"ndc:{AMOXICILLIN}", "rx_only": True, "schedule": 0, "max_quantity": 10},
        {"item": f"ndc:{ANALGESIC}", "rx_only": False, "schedule": 0, "max_quantity": 20}]}))
    set_ = run("formulary", "set", items, "--key", tmp_path / "authority.key", *opts, "--json")
    assert set_.exit_code == 0, text(set_)
    assert json.loads(set_.stdout)["items"] == 2
    refused = run("formulary", "set", items, "--key", tmp_path / "stranger.key", *opts)
    assert refused.exit_code == 1 and "unknown_signer" in text(refused) and "nothing appended" in text(refused)
    shown = run("formulary", "show", *opts, "--json")
    assert shown.exit_code == 0, text(shown)
    listed = json.loads(shown.stdout)["items"]
    assert listed[f"ndc:{ANALGESIC}"]["rx_only"] is False and listed[f"ndc:{AMOXICILLIN}"]["max_quantity"] == 10
    unlisted = json.loads(run("formulary", "show", "ndc:12345-678-90", *opts, "--json").stdout)
    assert (unlisted["listed"], unlisted["rx_only"]) == (False, True)
    items.write_text(json.dumps({"items": [{"item": "ndc:1", "rx_only": "maybe", "schedule": 0, "max_quantity": 1}]}))
    bad = run("formulary", "set", items, "--key", tmp_path / "authority.key", *opts)
    assert bad.exit_code == 2 and "rx_only" in text(bad)
