"""The contract state's undo journal (what lets a miner judge a checkpoint in O(new entries)) and void
leaves: a refused entry applies only what its Reject carries, Transfers included, and is recorded in `void`."""

from __future__ import annotations

import copy

import pytest
from test_contracts_witness import V1_CONTRACTS, V1World
from test_contracts_world import FLU_SHOT, INSURER_FUNDS, T0, World, ident

from carechain.entries import Entry
from contract_rules import CodeBook
from contract_rules import transactions as ce
from contract_rules.runtime import State, load_rule_source

# A tokens rule that fines instead of refusing quietly: a transfer with memo "fine" is refused, and the
# refusal moves the amount from the signer to "pool:fines" and counts it (what a bond slash looks like).
FINING_TOKENS = b'''
from contract_rules.runtime import Accept, Add, Reject, Transfer
from contract_rules.transactions import TokenTransfer, parse

NAME = "tokens"
VERSION = 1


def apply(state, tx):
    t = parse(TokenTransfer, tx.payload)
    src = f"{tx.role}:{tx.signer}"
    if t.memo == "fine":
        return Reject("fined", (Transfer(src, "pool:fines", t.amount), Add("fines", tx.signer, 1)))
    return Accept((Transfer(src, t.to, t.amount),))
'''


def fining_world() -> World:
    fining = load_rule_source(FINING_TOKENS, "fining_tokens.py")
    code = CodeBook.builtin()
    code.add(fining)
    w = V1World(code, tokens=fining.code_hash)
    w.standard_parties()
    return w


def transfer(w: World, amount: int, memo: str = "", to: str = "pool:miners") -> Entry:
    w._nonce += 1
    return ce.signed(w.insurer, ce.TOKEN_TRANSFER, ce.TokenTransfer(to=to, amount=amount, nonce=w._nonce, memo=memo))


def test_a_refusal_applies_the_transfers_its_reject_carries_and_is_void() -> None:
    w = fining_world()
    index = w.state.size
    assert w.add(transfer(w, 700, memo="fine")) == "fined"
    assert w.state.balance(w.insurer_account) == INSURER_FUNDS - 700
    assert w.state.balance("pool:fines") == 700
    assert w.state.table("fines") == {w.insurer.device_id: 1}
    assert w.state.table("void") == {str(index): {"reason": "fined", "type": ce.TOKEN_TRANSFER,
                                                  "signer": w.insurer.device_id}}
    assert sum(w.state.balances.values()) == w.state.supply


def test_a_fine_the_account_cannot_cover_still_counts_but_moves_nothing() -> None:
    w = fining_world()
    index = w.state.size
    assert w.add(transfer(w, 2 * INSURER_FUNDS, memo="fine")) == "fined"
    assert w.state.balance(w.insurer_account) == INSURER_FUNDS and w.state.balance("pool:fines") == 0
    assert w.state.table("fines") == {w.insurer.device_id: 1}
    assert w.state.table("void")[str(index)]["reason"] == "fined"


def test_an_accepted_entry_that_cannot_pay_is_void_with_no_effects() -> None:
    w = V1World()
    w.standard_parties()
    w.policy("pt-alice")
    before = copy.deepcopy(w.state.tables)
    sale = w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=2 * INSURER_FUNDS)
    index = w.state.size
    assert w.add(sale) == "insufficient_funds"
    assert w.state.tables.pop("void") == {str(index): {"reason": "insufficient_funds", "type": "event",
                                                       "signer": w.terminal.device_id}}
    assert w.state.tables == before  # not even the sale's "seen" mark: nothing of the entry applied


def busy_entries(w: World) -> list[Entry]:
    """Entries touching every kind of state: new and existing parties and devices, balances (one emptied),
    tables that do not exist yet, contract versions, counters, refusals, voids."""
    newcomer, wearable = ident(40), ident(41)
    rx = ce.Prescription(prescriber=w.prescriber.device_id, patient_token="pt-alice", drug_code=FLU_SHOT,
                         code_system="ndc", quantity=1, refills=0, expires_ms=T0 + 90 * 86_400_000,
                         controlled=False, issued_ms=T0, nonce=b"\x07" * 16)
    refused = w.sale_entry(rx_ref=None)
    return [
        ce.signed(w.operator, ce.PARTY_REGISTER, ce.PartyRegistration(role="pharmacy", pk=newcomer.public_key,
                                                                      name="new", ts=T0)),
        transfer(w, 1_000, to=f"pharmacy:{newcomer.device_id}"),
        ce.signed(newcomer, ce.TOKEN_TRANSFER, ce.TokenTransfer(to="pool:miners", amount=1_000, nonce=1)),
        ce.signed(w.prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, T0)),
        w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=4_500),
        w.refusal(refused, "rx_missing"),
        w.sale_entry(rx_ref=None, terminal=w.terminal2),  # void: what a dishonest bridge appends
        transfer(w, 10, to=f"patient:{wearable.device_id}"),
        ce.signed(w.operator, ce.CONTRACT_UPGRADE, ce.ContractUpgrade(
            name="tokens", version=9, code_hash=V1_CONTRACTS["tokens"], from_size=10_000, ts=T0)),
        ce.signed(w.operator, ce.PROTOCOL_CUTOVER, ce.ProtocolCutover(retire_v1_after=10_000, ts=T0)),
        transfer(w, 999_999_999),  # void: insufficient funds
    ]


def test_rollback_restores_the_exact_state_and_replaying_again_agrees() -> None:
    w = V1World()
    w.standard_parties()
    w.policy("pt-alice")
    entries = busy_entries(w)
    state = w.state
    before, root, size = copy.deepcopy(state.snapshot()), state.root(), state.size
    state.journal = []
    results = [w.runtime.apply(e) for e in entries]
    assert results.count("ok") >= 7 and {"rx_missing", "insufficient_funds"} <= set(results)
    assert "void" in state.tables and "protocol" in state.tables and len(state.versions["tokens"]) == 2
    changed = state.root()
    state.rollback()
    assert state.journal == [] and (state.size, state.root()) == (size, root)
    assert state.snapshot() == before
    # The same entries applied again (no journal) reach the state they reached the first time.
    state.journal = None
    assert [w.runtime.apply(e) for e in entries] == results
    assert state.root() == changed


def test_rollback_needs_a_journal() -> None:
    with pytest.raises(RuntimeError, match="journal"):
        V1World().state.rollback()


def test_the_journal_is_not_part_of_the_state() -> None:
    w = V1World()
    w.standard_parties()
    root = w.state.root()
    w.state.journal = [("anything",)]
    assert w.state.root() == root and "journal" not in w.state.snapshot()
    assert isinstance(w.state, State) and w.state == copy.copy(w.state)
