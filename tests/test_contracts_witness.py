"""Refused sales on an honest log, the bridge's dry-run check, and miners' re-execution of new leaves
(void leaves from a dishonest bridge included)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_contracts_world import FLU_SHOT, INSURER_FUNDS, T0, World

import contract_rules
from contract_rules import transactions as ce
from contract_rules.replay import ContractWitness, Violation, decode_leaf
from contract_rules.runtime import MissingContractCode, code_hash_of

# The first versions of the rules, which logs from before bonds and the formulary still run: what a miner
# re-executes does not depend on the rule versions, and these tests must not follow every new rule.
V1_CONTRACTS = {name: code_hash_of((Path(contract_rules.__file__).parent / f"{module}.py").read_bytes())
                for name, module in (("tokens", "tokens"), ("prescriptions", "prescriptions"),
                                     ("insurance", "insurance_v2"), ("storage", "storage"), ("access", "access"))}


class V1World(World):
    """The test world on `V1_CONTRACTS`: the parties those rules know (no formulary, bonds or clock)."""

    def __init__(self, code=None, **contracts: str) -> None:  # noqa: ANN001
        super().__init__({**V1_CONTRACTS, **contracts}, code)

    def standard_parties(self) -> None:
        results = [
            self.register_party("prescriber", self.prescriber),
            self.register_party("prescriber", self.prescriber2),
            self.register_party("pharmacy", self.pharmacy),
            self.register_party("pharmacy", self.pharmacy2),
            self.register_party("insurer", self.insurer),
            self.register_party("miner", self.miner),
            self.register_device(self.terminal, "pharmacy_terminal", self.pharmacy.device_id),
            self.register_device(self.terminal2, "pharmacy_terminal", self.pharmacy2.device_id),
        ]
        assert results == ["ok"] * len(results)


@pytest.fixture
def w() -> World:
    world = V1World()
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
    w = V1World()
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


def test_a_violating_sale_is_void_and_the_miner_keeps_cosigning() -> None:
    w = honest_day()
    witness = ContractWitness(w.genesis)
    leaves = [e.encode() for e in w.entries]
    assert witness(0, len(leaves), leaves) is None and witness.voids == []
    size = witness.state.size
    balances, violations = dict(witness.state.balances), dict(witness.state.table("violations"))
    # A dishonest bridge appends an Rx-only sale with no prescription as if it were valid: the miner still
    # cosigns (a bridge must not be able to stall finality), and the sale changes nothing but `void`.
    flu = w.sale_entry(FLU_SHOT, rx_only=False, pay="insurance", price=4500)
    bad = w.sale_entry(rx_ref=None, pay="insurance", price=4500)
    assert witness(size, size + 2, [flu.encode(), bad.encode()]) is None
    assert witness.voids == [Violation(size + 1, "rx_missing", "event: rx_missing")]
    assert witness.state.size == size + 2
    assert witness.state.table("void") == {str(size + 1): {"reason": "rx_missing", "type": "event",
                                                           "signer": w.terminal.device_id}}
    assert witness.state.results[-2:] == [[size, "ok"], [size + 1, "rx_missing"]]
    # What the rule's Reject carries still applies: the refusal counts against the pharmacy.
    counted = w.pharmacy_account(w.pharmacy)
    assert witness.state.table("violations") == {**violations, counted: violations.get(counted, 0) + 1}
    paid = {a: n - balances.get(a, 0) for a, n in witness.state.balances.items() if n != balances.get(a, 0)}
    assert paid == {w.insurer_account: -4500, w.pharmacy_account(): 4500}  # the flu shot only
    # Every replica agrees on the void: a full replay reaches the same root.
    again = ContractWitness(w.genesis)
    assert again(0, size + 2, [*leaves, flu.encode(), bad.encode()]) is None
    assert again.state.root() == witness.state.root() and again.voids == witness.voids
    # The voids are those of the last range only.
    assert witness(size + 2, size + 3, [w.sale_entry(FLU_SHOT, rx_only=False, price=100).encode()]) is None
    assert witness.voids == []


def test_a_miner_flags_leaves_it_cannot_read_and_takes_the_range_back() -> None:
    w = honest_day()
    witness = ContractWitness(w.genesis)
    leaves = [e.encode() for e in w.entries]
    assert witness(0, 5, leaves[:5]) is None
    root = witness.state.root()
    violation = witness(5, 8, [*leaves[5:7], b"\xa1\x61t\x61x"])
    assert violation is not None and (violation.leaf_index, violation.rule) == (7, "bad_leaf")
    assert (witness.state.size, witness.state.root()) == (5, root)  # the two good leaves are undone too
    assert witness.state.journal is None
    assert witness(5, len(leaves), leaves[5:]) is None and witness.state.root() == w.state.root()
    with pytest.raises(ValueError, match="replay the log"):
        witness(3, 4, [w.entries[3].encode()])


def test_contract_code_the_miner_lacks_takes_the_range_back() -> None:
    w = honest_day()
    witness = ContractWitness(w.genesis)
    leaves = [e.encode() for e in w.entries]
    assert witness(0, len(leaves), leaves) is None
    size, root = witness.state.size, witness.state.root()
    upgrade = ce.signed(w.operator, ce.CONTRACT_UPGRADE, ce.ContractUpgrade(
        name="tokens", version=2, code_hash="ab" * 32, from_size=size + 1, ts=T0))
    pay = ce.signed(w.insurer, ce.TOKEN_TRANSFER, ce.TokenTransfer(to="pool:miners", amount=1, nonce=99))
    with pytest.raises(MissingContractCode):
        witness(size, size + 2, [upgrade.encode(), pay.encode()])
    assert (witness.state.size, witness.state.root(), witness.state.journal) == (size, root, None)
