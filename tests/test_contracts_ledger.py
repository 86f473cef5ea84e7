"""Contracts wired into the ledger and the bridge: a real Ledger, a Bridge fed through `process` (no broker).

The bridge checks every sale against the contracts before appending it: a valid Rx sale is anchored and
receipted, an Rx-only sale without a valid Rx is appended as `sale.refused` and receipted as a rejection
with the contract's reason, and an immunization is billed to the insurer. Any process that replays the
ledger file reaches the same state root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carechain import envelope, topics
from carechain.config import BridgeConfig, BrokerConfig
from carechain.entries import ENTRY_EVENT, SALE_REFUSED, Entry, Registration, registration_entry
from carechain.events import Activity, Purchase, authorize_payment, make_payload
from carechain.identity import Identity
from carechain.receipts import open_receipt
from carechain.reencryption import PreKey
from chain_bridge.bridge import Bridge
from chain_bridge.contract_admin import ContractRefused, replay_ledger, submit
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.integrity import audit_ledger
from chain_bridge.ledger.postgres import PostgresLocation, PostgresLogSource
from chain_bridge.ledger.store import LedgerError
from chain_bridge.registry import GENESIS_FILE, contract_genesis, ledger_path, log_key, operator_key
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from edge_agent.sealing import RecordOwner, new_epoch_key, sign_epoch_key
from tests.conftest import LedgerFactory
from tests.test_contracts_world import AMOXICILLIN, ANALGESIC, DAY, FLU_SHOT, FORMULARY, PHARMACY_BOND, ident

PRESCRIBER, PHARMACY, INSURER, TERMINAL, WEARABLE = ident(2), ident(4), ident(6), ident(7), ident(9)
PATIENT = ident(20)
INSURER_BOND = MIN_BOND["insurer"]
AUTHORITY = ident(11)
INSURER_ACCOUNT = f"insurer:{INSURER.device_id}"
PHARMACY_ACCOUNT = f"pharmacy:{PHARMACY.device_id}"
ALLOCATIONS = {INSURER_ACCOUNT: 1_000_000, PHARMACY_ACCOUNT: PHARMACY_BOND}


class Published:
    """Stands in for the MQTT client: keeps what the bridge publishes."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.messages.append((topic, payload))


class Pharmacy:
    """A bridge data dir with parties, a terminal and a wearable registered, and a bridge with contracts."""

    def __init__(self, data_dir: Path, ledgers: LedgerFactory) -> None:
        self.dir = data_dir
        self.ledgers = ledgers
        self.genesis = contract_genesis(data_dir, ALLOCATIONS)
        self.ledger = ledgers(ledger_path(data_dir))
        self.operator = operator_key(data_dir)
        self.now = int(time.time() * 1000)
        self.seq: dict[str, int] = {}
        self.payments = 0
        submit(self.ledger, self.genesis, [
            ce.signed(self.operator, ce.PARTY_REGISTER, ce.PartyRegistration(role=role, pk=who.public_key, name=role,
                                                                             ts=self.now))
            for role, who in (("prescriber", PRESCRIBER), ("pharmacy", PHARMACY), ("insurer", INSURER),
                              ("authority", AUTHORITY))])
        submit(self.ledger, self.genesis, [  # the world's formulary; the pharmacy bonds all it was allotted
            ce.formulary_set_entry(AUTHORITY, ce.FormularySet(items=list(FORMULARY), ts=self.now)),
            ce.signed(PHARMACY, ce.BOND_POST, ce.BondPost(amount=PHARMACY_BOND, nonce=1, ts=self.now))])
        regs = [Registration(dev=d.device_id, pk=d.public_key, profile=p, owner=o, site="s", ts=self.now)
                for d, p, o in ((TERMINAL, "pharmacy_terminal", PHARMACY.device_id), (WEARABLE, "wearable", "pt-a"))]
        self.ledger.append_registrations([(registration_entry(self.operator, r), r) for r in regs])
        self.bridge = self.start_bridge()

    def start_bridge(self) -> Bridge:
        bridge = Bridge(BridgeConfig(data_dir=self.dir), BrokerConfig(), log_key(self.dir), self.ledger,
                        contracts=ContractGate(self.genesis, self.operator, clock=lambda: self.now))
        bridge._client = Published()  # type: ignore[assignment]
        return bridge

    def prescribe(self, refills: int = 0) -> ce.Prescription:
        rx = ce.Prescription(prescriber=PRESCRIBER.device_id, patient_token="pt-a", drug_code=AMOXICILLIN,
                             code_system="ndc", quantity=1, refills=refills, expires_ms=self.now + 30 * DAY,
                             controlled=False, issued_ms=self.now, nonce=os.urandom(16))
        submit(self.ledger, self.genesis, [ce.signed(PRESCRIBER, ce.RX_ANCHOR, ce.rx_anchor_for(rx, self.now))])
        return rx

    def policy(self) -> None:
        """Insurance v3: the insurer bonds, the patient registers and consents to flu shots covered up to 100.00."""
        coverage = [ce.CappedCoverage(category="immunization", bp=10_000, caps={f"ndc:{FLU_SHOT}": 10_000})]
        offer = ce.PolicyOffer(policy_id="p1", patient=PATIENT.device_id, coverage=coverage, ts=self.now)
        consent = ce.sign_policy_consent(PATIENT, INSURER.device_id, offer)
        submit(self.ledger, self.genesis, [
            ce.signed(self.operator, ce.PARTY_REGISTER, ce.PartyRegistration(role="patient", pk=PATIENT.public_key,
                                                                             name="patient", ts=self.now)),
            ce.signed(INSURER, ce.BOND_POST, ce.BondPost(amount=INSURER_BOND, nonce=1, ts=self.now)),
            ce.signed(INSURER, ce.POLICY_REGISTER, ce.consented_policy(offer, consent))])

    def signed_event(self, dev: Identity, kind: str, body: object) -> bytes:
        seq = self.seq.get(dev.device_id, 0)
        self.seq[dev.device_id] = seq + 1
        return envelope.sign(dev, make_payload(dev.device_id, seq, self.now, kind, body))

    def sale(self, item: str = AMOXICILLIN, *, rx_ref: str | None = None, rx_only: bool = True,
             pay: str = "card", price: int = 1250) -> bytes:
        """A terminal's sale; an insurance sale is the registered patient's, claiming the whole price with her
        signature (insurance v3)."""
        patient, payment = "pt-a", None
        if pay == "insurance":
            self.payments += 1
            patient = PATIENT.device_id
            payment = authorize_payment(PATIENT, TERMINAL.device_id, f"ndc:{item}", 1, price, pay_minor=0,
                                        claim_minor=price, policy_id="p1", nonce=self.payments)
        return self.signed_event(TERMINAL, "purchase", Purchase(
            item_code=item, code_system="ndc", rx_only=rx_only, quantity=1, price_minor=price, currency="USD",
            patient_token=patient, payment_method=pay, rx_ref=rx_ref, payment=payment))

    def send(self, *events: bytes, dev: Identity = TERMINAL) -> list:  # noqa: ANN201 - receipts
        client = self.bridge._client
        client.messages.clear()
        self.bridge.process([(topics.events(dev.device_id), e) for e in events])
        return [open_receipt(p, self.bridge.log_key.public_key, dev.device_id)
                for t, p in client.messages if t == topics.receipts(dev.device_id)]


@pytest.fixture
def pharmacy(tmp_path: Path, ledger_factory: LedgerFactory) -> Pharmacy:
    return Pharmacy(tmp_path, ledger_factory)


def test_genesis_is_written_once_with_the_operator_and_log_keys_and_builtin_code(tmp_path: Path) -> None:
    first = contract_genesis(tmp_path, {"insurer:x": 5})
    assert (tmp_path / GENESIS_FILE).exists()
    assert first.operators == {key.device_id: key.public_key for key in (operator_key(tmp_path), log_key(tmp_path))}
    assert contract_genesis(tmp_path, {"insurer:x": 999}) == first  # fixed once written
    (tmp_path / GENESIS_FILE).write_text("{")
    with pytest.raises(ValueError, match="genesis"):
        contract_genesis(tmp_path)


def test_a_valid_rx_sale_is_anchored_and_receipted(pharmacy: Pharmacy) -> None:
    rx = pharmacy.prescribe()
    [receipt] = pharmacy.send(pharmacy.sale(rx_ref=rx.rx_ref()))
    assert receipt.rejected == [] and len(receipt.ok) == 1
    seq, index = receipt.ok[0]
    assert Entry.decode(pharmacy.ledger.entry(index)).type == ENTRY_EVENT
    state = pharmacy.bridge.contracts.state
    assert state.results[-1] == [index, "ok"] and state.table("rx")[rx.rx_ref()]["sales"] == [index]
    assert pharmacy.bridge.stats.anchored == 1


def test_an_rx_only_sale_without_a_valid_rx_is_refused_recorded_and_counted(pharmacy: Pharmacy) -> None:
    sale = pharmacy.sale(rx_ref=None)
    [receipt] = pharmacy.send(sale)
    assert receipt.ok == []
    [rej] = receipt.rejected
    assert (rej.seq, rej.reason, rej.retryable) == (0, "contract:rx_missing", False)
    index = pharmacy.ledger.event_index(TERMINAL.device_id, 0)
    entry = Entry.decode(pharmacy.ledger.entry(index))
    assert entry.type == SALE_REFUSED
    assert envelope.parse(entry.cose).payload["event"] == sale  # the terminal's bytes, wrapped as signed
    state = pharmacy.bridge.contracts.state
    assert state.results[-1] == [index, "ok"]  # the contracts accept the refusal: an honest log
    assert state.table("violations") == {PHARMACY_ACCOUNT: 1}
    assert pharmacy.bridge.stats.rejected["contract:rx_missing"] == 1
    # A resend gets the same answer and appends nothing; the refusal counted once.
    size = pharmacy.ledger.size
    [again] = pharmacy.send(sale)
    assert [r.reason for r in again.rejected] == ["contract:rx_missing"] and pharmacy.ledger.size == size
    # Another unknown Rx, then a revoked one.
    assert pharmacy.send(pharmacy.sale(rx_ref="ab" * 32))[0].rejected[0].reason == "contract:rx_unknown"
    rx = pharmacy.prescribe()
    submit(pharmacy.ledger, pharmacy.genesis, [ce.signed(PRESCRIBER, ce.RX_REVOKE, ce.RxRevoke(
        rx_ref=rx.rx_ref(), reason="allergy", ts=pharmacy.now))])
    assert pharmacy.send(pharmacy.sale(rx_ref=rx.rx_ref()))[0].rejected[0].reason == "contract:rx_revoked"
    assert pharmacy.bridge.contracts.state.table("violations") == {PHARMACY_ACCOUNT: 3}
    pharmacy.bridge.maybe_checkpoint()
    location = pharmacy.ledgers.location(ledger_path(pharmacy.dir))
    source = PostgresLogSource(location) if isinstance(location, PostgresLocation) else ledger_path(pharmacy.dir)
    report = audit_ledger(source, log_key(pharmacy.dir).public_key,
                          operator_keys={pharmacy.operator.device_id: pharmacy.operator.public_key})
    # parties, formulary, bond, anchor, revoke, refusals, and the one clock.attest before the first sale
    assert report.refused_sales == 3 and report.contract_entries == 4 + 1 + 1 + 1 + 1 + 3 + 1


def test_the_last_fill_goes_to_one_sale_in_a_batch(pharmacy: Pharmacy) -> None:
    rx = pharmacy.prescribe(refills=0)
    [receipt] = pharmacy.send(pharmacy.sale(rx_ref=rx.rx_ref()), pharmacy.sale(rx_ref=rx.rx_ref()))
    assert len(receipt.ok) == 1 and [r.reason for r in receipt.rejected] == ["contract:rx_no_fills_left"]


def test_an_immunization_is_billed_to_the_insurer(pharmacy: Pharmacy) -> None:
    pharmacy.policy()
    [receipt] = pharmacy.send(pharmacy.sale(FLU_SHOT, rx_only=False, pay="insurance", price=3_000))
    assert len(receipt.ok) == 1
    state = pharmacy.bridge.contracts.state
    assert state.balance(INSURER_ACCOUNT) == 1_000_000 - INSURER_BOND - 3_000
    assert state.balance(PHARMACY_ACCOUNT) == 3_000
    # An uncovered item on insurance is refused as the contracts say.
    [refused] = pharmacy.send(pharmacy.sale(ANALGESIC, rx_only=False, pay="insurance"))
    assert refused.rejected[0].reason == "contract:not_covered"


def test_non_sale_batches_pass_no_contract_decision_and_the_gate_takes_them_in_after_their_receipts(
        pharmacy: Pharmacy, monkeypatch: pytest.MonkeyPatch) -> None:
    gates: list[object] = []
    append = pharmacy.ledger.append_events
    monkeypatch.setattr(pharmacy.ledger, "append_events",
                        lambda candidates, gate=None: gates.append(gate) or append(candidates, gate))
    pharmacy.send(*(pharmacy.signed_event(WEARABLE, "activity", Activity(steps=10, active_minutes=m))
                    for m in (10, 20)), dev=WEARABLE)
    assert gates == [None]  # appended without asking the contracts
    assert pharmacy.bridge.contracts.state.size == pharmacy.ledger.size  # then taken in
    pharmacy.send(pharmacy.sale(FLU_SHOT, rx_only=False))
    assert gates[-1] is pharmacy.bridge.contracts
    state = pharmacy.bridge.contracts.state
    assert state.size == pharmacy.ledger.size and {r for _, r in state.results} == {"ok"}


def test_a_restarted_bridge_and_another_process_reach_the_same_state_root(pharmacy: Pharmacy) -> None:
    pharmacy.policy()
    rx = pharmacy.prescribe()
    pharmacy.send(pharmacy.sale(rx_ref=rx.rx_ref()), pharmacy.sale(rx_ref=None),
                  pharmacy.sale(FLU_SHOT, rx_only=False, pay="insurance", price=3_000))
    root = pharmacy.bridge.contracts.state.root()
    assert pharmacy.start_bridge().contracts.state.root() == root  # replayed on start
    assert replay_ledger(pharmacy.ledger, pharmacy.genesis).state.root() == root
    script = ("import json, sys; from pathlib import Path; from carechain.config import BridgeConfig; "
              "from chain_bridge.ledger.store import open_ledger; from chain_bridge.registry import contract_genesis; "
              "from chain_bridge.contract_admin import replay_ledger; d = Path(sys.argv[1]); "
              "cfg = BridgeConfig(data_dir=d, store=json.loads(sys.argv[2])); "
              "print(replay_ledger(open_ledger(cfg), contract_genesis(d)).state.root().hex())")
    store = json.dumps(pharmacy.ledgers.store_config(ledger_path(pharmacy.dir)))
    roots = {subprocess.run([sys.executable, "-c", script, str(pharmacy.dir), store], capture_output=True,
                            text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
             for seed in ("1", "2")}
    assert roots == {root.hex()}


def test_entries_the_contracts_refuse_are_not_appended(pharmacy: Pharmacy) -> None:
    size = pharmacy.ledger.size
    stranger = Identity.generate()
    with pytest.raises(ContractRefused, match="unknown_signer"):
        submit(pharmacy.ledger, pharmacy.genesis, [ce.signed(stranger, ce.RX_REVOKE, ce.RxRevoke(
            rx_ref="ab" * 32, reason="x", ts=1))])
    with pytest.raises(LedgerError, match="only contract entries"):
        pharmacy.ledger.append_entries([Entry(ENTRY_EVENT, b"x")])
    assert pharmacy.ledger.size == size
    assert json.loads((pharmacy.dir / GENESIS_FILE).read_text())["allocations"] == ALLOCATIONS


def test_a_second_epoch_key_for_one_epoch_is_refused_without_a_leaf(pharmacy: Pharmacy) -> None:
    """A leaf the miners' rules reject would stop them cosigning: the gate decides epoch_key events too."""
    alice, alice_pre, band = ident(0x51), PreKey.from_seed(b"\x52" * 32), ident(0x53)
    submit(pharmacy.ledger, pharmacy.genesis, [ce.party_registration_entry(pharmacy.operator, ce.PartyRegistration(
        role="patient", pk=alice.public_key, name="Alice", ts=pharmacy.now, pre_pk=alice_pre.public_key,
        pre_vk=alice_pre.verifying_key))])
    reg = Registration(dev=band.device_id, pk=band.public_key, profile="heart_rate_band", owner=alice.device_id,
                       site="s", ts=pharmacy.now)
    pharmacy.ledger.append_registrations([(registration_entry(pharmacy.operator, reg), reg)])
    owner = RecordOwner(alice.device_id, alice_pre.public_key)
    first, again = (sign_epoch_key(band, new_epoch_key(band.device_id, 7, 3_600_000), owner, pharmacy.now)
                    for _ in range(2))
    [ok] = pharmacy.send(first(0), dev=band)
    assert ok.rejected == [] and len(ok.ok) == 1
    size = pharmacy.ledger.size
    [refused] = pharmacy.send(again(1), dev=band)
    assert [r.reason for r in refused.rejected] == ["contract:epoch_key_exists"]
    assert pharmacy.ledger.size == size  # nothing appended


def test_entries_another_process_appends_are_checkpointed_on_an_idle_log(pharmacy: Pharmacy) -> None:
    """`carechain access grant` appends through its own connection: the bridge must still checkpoint it."""
    before = pharmacy.bridge.maybe_checkpoint()
    assert before is not None and pharmacy.bridge.maybe_checkpoint() is None  # nothing new
    other = pharmacy.ledgers(ledger_path(pharmacy.dir))
    try:
        [index] = submit(other, pharmacy.genesis, [ce.signed(pharmacy.operator, ce.PARTY_REGISTER, ce.PartyRegistration(
            role="doctor", pk=ident(0x54).public_key, name="Dr", ts=pharmacy.now))])
    finally:
        other.close()
    note = pharmacy.bridge.maybe_checkpoint()
    assert note is not None and pharmacy.bridge.ledger.size == index + 1
    assert f"\n{index + 1}\n" in note  # the checkpoint covers the other process's entry
