"""The demo's pharmacy day: parties, prescriptions, policies and a scripted day of sales under the contracts.

Everything goes through the real pieces: party, Rx and policy entries are signed by their parties and
checked against a replay of the ledger before they are appended (chain_bridge.contract_admin); the sales are
purchase events the terminal signs and sends over MQTT like any reading, and the bridge's contract gate
decides each one before appending it. The day shows: Rx sales and a refill accepted, an Rx-only sale without
a prescription refused and counted against the pharmacy (then sold once the prescriber has issued one), a
terminal that rings up a drug the formulary lists as Rx-only as if it were over the counter (refused: the
formulary decides, not the terminal), a flu shot billed to the insurer, an over-the-counter sale, and a
weekly wellness rebate earned from last week's activity of a registered wearable.

Before any sale: an authority (role "authority") signs the formulary; the pharmacy, the insurer and the five
miners post their bonds (contract_rules.bonds: a refused sale slashes the pharmacy's); Alice and Bob are
registered patients with wallet keys, who sign their policies (insurance v3) and every payment or claim the
terminal submits with a sale. Alice's patient token is her party id, so that her wearable (whose registered
owner she is) can disclose its weekly activity summary to her policy (protocol 2 seals the raw activity).
Carol is a plain token who pays by card.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from carechain import envelope
from carechain.entries import SALE_REFUSED, Entry
from carechain.events import Activity, Purchase, authorize_payment
from carechain.identity import Identity
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import contract_genesis, operator_key
from contract_rules import formulary
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND, SLASH
from contract_rules.miners import active_miners

CAROL = "pt-demo-carol"
WELLNESS_POLICY = "demo-alice"  # Alice's policy id: her wearable discloses its weekly summary to it
BOB_POLICY = "demo-bob"
AMOXICILLIN = ("70882-114-20", 1250)  # Rx-only, from device_profiles/pharmacy_terminal.yaml
METFORMIN = ("65841-809-01", 1500)  # Rx-only
FLU_SHOT = ("49281-0621-15", 4500)  # immunization under a standing order
ACETAMINOPHEN = ("70000-0036-1", 899)  # over the counter
# The authority's formulary: item -> (Rx-only, schedule, max packages per fill). Anything else is Rx-only.
FORMULARY = {AMOXICILLIN: (True, 0, 4), METFORMIN: (True, 0, 6), FLU_SHOT: (False, 0, 1), ACETAMINOPHEN: (False, 0, 10)}
INSURER_FUNDS = 1_000_000  # minor units the insurer has to pay claims and rebates with (its bond comes on top)
# The pharmacy bonds the minimum plus room for a few refused sales: each slashes SLASH["refused_sale"], and a
# bond below the minimum suspends the pharmacy (every later sale refused `pharmacy_not_admitted`).
PHARMACY_BOND = MIN_BOND["pharmacy"] + 20 * SLASH["refused_sale"]  # two refusals a run: ten runs on one data dir
REBATE = 2_500
_DAY_MS = 86_400_000
Payment = Literal["card", "insurance"]


def genesis_allocations(insurer: Identity, pharmacy: Identity, miners: Sequence[Identity]) -> dict[str, int]:
    """Opening balances: the insurer's funds, and exactly the bond each bonded party posts before the day."""
    return {f"insurer:{insurer.device_id}": INSURER_FUNDS + MIN_BOND["insurer"],
            f"pharmacy:{pharmacy.device_id}": PHARMACY_BOND,
            **{f"miner:{m.device_id}": MIN_BOND["miner"] for m in miners}}


class PharmacyDay:
    """Parties and their keys (in `keys_dir`), the contract genesis and the entries of the day.

    `alice` is her wallet key (her party key; her party id is her patient token); `miners` are the five
    miners' keys, which post their bonds here so that they are active (contract_rules.miners).
    """

    def __init__(self, bridge_dir: Path, keys_dir: Path, ledger_file: Path, alice: Identity,
                 miners: Sequence[Identity]) -> None:
        self.alice_key = alice
        self.alice = alice.device_id  # her party id, also her patient token
        self.bob_key = Identity.load_or_create(keys_dir / "bob.key")
        self.bob = self.bob_key.device_id
        self.prescriber = Identity.load_or_create(keys_dir / "prescriber.key")
        self.pharmacy = Identity.load_or_create(keys_dir / "pharmacy.key")
        self.insurer = Identity.load_or_create(keys_dir / "insurer.key")
        self.authority = Identity.load_or_create(keys_dir / "authority.key")
        self.miners = list(miners)
        self.insurer_account = f"insurer:{self.insurer.device_id}"
        self.pharmacy_account = f"pharmacy:{self.pharmacy.device_id}"
        self.genesis = contract_genesis(bridge_dir, genesis_allocations(self.insurer, self.pharmacy, self.miners))
        self.operator = operator_key(bridge_dir)
        self.ledger_file = ledger_file
        self.terminal = ""  # the pharmacy terminal's device id: payments are signed for it (set by the caller)

    # -- set-up, before the terminal and the wearable send anything ------------------------------------

    def set_up(self, now_ms: int) -> None:
        """Register the parties, post the bonds, set the formulary, sign the policies (idempotent across demo
        runs on the same data dir). Alice and the miners are registered already (carechain.demo.records)."""
        ledger = Ledger(self.ledger_file)
        try:
            state = replay_ledger(ledger, self.genesis).state
            if state.table("policies").get(self.alice) is not None:
                return
            parties = [ce.signed(self.operator, ce.PARTY_REGISTER, ce.PartyRegistration(
                role=role, pk=who.public_key, name=name, ts=now_ms))
                for role, who, name in (("prescriber", self.prescriber, "Dr. Demo"),
                                        ("pharmacy", self.pharmacy, "Demo Pharmacy"),
                                        ("insurer", self.insurer, "Demo Health Insurance"),
                                        ("authority", self.authority, "Demo Drug Authority"),
                                        ("patient", self.bob_key, "Bob"))]
            bonds = [ce.signed(who, ce.BOND_POST, ce.BondPost(amount=amount, nonce=1, ts=now_ms))
                     for who, amount in ((self.pharmacy, PHARMACY_BOND), (self.insurer, MIN_BOND["insurer"]),
                                         *((m, MIN_BOND["miner"]) for m in self.miners))]
            items = [ce.FormularyItem(item=f"ndc:{code}", rx_only=rx_only, schedule=schedule, max_quantity=most)
                     for (code, _), (rx_only, schedule, most) in FORMULARY.items()]
            formulary_set = ce.formulary_set_entry(self.authority, ce.FormularySet(items=items, ts=now_ms))
            policies = [self._policy(who, policy_id, now_ms)
                        for who, policy_id in ((self.alice_key, WELLNESS_POLICY), (self.bob_key, BOB_POLICY))]
            submit(ledger, self.genesis, [*parties, *bonds, formulary_set, *policies])
        finally:
            ledger.close()

    def _policy(self, patient: Identity, policy_id: str, now_ms: int) -> Entry:
        """The insurer's policy for `patient`, with her consent signature (a policy binds her only so)."""
        flu = ce.CappedCoverage(category="immunization", bp=10_000, caps={f"ndc:{FLU_SHOT[0]}": FLU_SHOT[1]})
        generics = ce.CappedCoverage(category="generic", bp=8_000, caps={f"ndc:{METFORMIN[0]}": METFORMIN[1]})
        wellness = ce.Wellness(min_active_minutes=150, rebate_minor=REBATE) if patient is self.alice_key else None
        offer = ce.PolicyOffer(policy_id=policy_id, patient=patient.device_id, coverage=[flu, generics],
                               wellness=wellness, ts=now_ms)
        consent = ce.sign_policy_consent(patient, self.insurer.device_id, offer)
        return ce.signed(self.insurer, ce.POLICY_REGISTER, ce.consented_policy(offer, consent))

    def _sale(self, item: tuple[str, int], patient: Identity | str, *, rx_only: bool, payment: Payment,
              rx_ref: str | None, claim_bp: int = 0, policy_id: str = "") -> Purchase:
        """A sale line; billed to insurance, it carries the patient's wallet signature over the claim."""
        code, price = item
        token = patient if isinstance(patient, str) else patient.device_id
        authorization = None
        if payment == "insurance":
            assert isinstance(patient, Identity), "an insurance claim needs the patient's wallet key"
            authorization = authorize_payment(patient, self.terminal, f"ndc:{code}", 1, price, pay_minor=0,
                                              claim_minor=price * claim_bp // 10_000, policy_id=policy_id,
                                              nonce=int.from_bytes(os.urandom(7), "big"))
        return Purchase(item_code=code, code_system="ndc", rx_only=rx_only, quantity=1, price_minor=price,
                        currency="USD", patient_token=token, payment_method=payment, rx_ref=rx_ref,
                        payment=authorization)

    def prescribe(self, patient: str, item: tuple[str, int], refills: int, now_ms: int) -> str:
        """The prescriber issues an Rx (body off-ledger) and anchors its hash; returns its rx_ref."""
        rx = ce.Prescription(prescriber=self.prescriber.device_id, patient_token=patient, drug_code=item[0],
                             code_system="ndc", quantity=1, refills=refills, expires_ms=now_ms + 90 * _DAY_MS,
                             controlled=False, issued_ms=now_ms, nonce=os.urandom(16))
        ledger = Ledger(self.ledger_file)
        try:
            submit(ledger, self.genesis, [ce.signed(self.prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, now_ms))])
        finally:
            ledger.close()
        return rx.rx_ref()

    # -- the day ---------------------------------------------------------------------------------------

    def morning_sales(self, now_ms: int) -> list[Purchase]:
        """Sales before Bob's doctor calls in his prescription: one of them is refused."""
        amoxicillin = self.prescribe(self.alice, AMOXICILLIN, refills=1, now_ms=now_ms)
        return [
            self._sale(AMOXICILLIN, self.alice, rx_only=True, payment="card", rx_ref=amoxicillin),
            self._sale(METFORMIN, self.bob_key, rx_only=True, payment="insurance", rx_ref=None,  # no Rx: refused
                       claim_bp=8_000, policy_id=BOB_POLICY),
            self._sale(FLU_SHOT, self.alice_key, rx_only=False, payment="insurance", rx_ref=None,  # 100 % insurer
                       claim_bp=10_000, policy_id=WELLNESS_POLICY),
            self._sale(ACETAMINOPHEN, CAROL, rx_only=False, payment="card", rx_ref=None),
            # The terminal rings amoxicillin up as over the counter: the formulary says Rx-only, so it is refused.
            self._sale(AMOXICILLIN, CAROL, rx_only=False, payment="card", rx_ref=None),
            self._sale(AMOXICILLIN, self.alice, rx_only=True, payment="card", rx_ref=amoxicillin),  # the refill
        ]

    def afternoon_sales(self, now_ms: int) -> list[Purchase]:
        metformin = self.prescribe(self.bob, METFORMIN, refills=0, now_ms=now_ms)
        return [self._sale(METFORMIN, self.bob_key, rx_only=True, payment="insurance", rx_ref=metformin,
                           claim_bp=8_000, policy_id=BOB_POLICY)]  # 80 % billed, the rest paid at the counter

    @staticmethod
    def last_week() -> str:
        year, week, _ = (datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=7)).isocalendar()
        return f"{year}-W{week:02d}"

    @classmethod
    def last_week_activity(cls) -> list[tuple[int, Activity]]:
        """Alice's wearable's daily totals for last week (ts, body): 7 × 25 = 175 active minutes ≥ 150."""
        year, week = (int(part) for part in cls.last_week().split("-W"))
        monday = datetime.date.fromisocalendar(year, week, 1)
        start = int(datetime.datetime.combine(monday, datetime.time(20), datetime.UTC).timestamp() * 1000)
        return [(start + d * _DAY_MS, Activity(steps=6_000 + 250 * d, active_minutes=25)) for d in range(7)]

    def settle_wellness(self, now_ms: int) -> None:
        """The insurer settles Alice's last week (once: a later demo run on the same data dir finds it settled)."""
        ledger = Ledger(self.ledger_file)
        try:
            if f"{self.alice}:{self.last_week()}" in replay_ledger(ledger, self.genesis).state.table("wellness"):
                return
            submit(ledger, self.genesis, [ce.signed(self.insurer, ce.WELLNESS_SETTLE, ce.WellnessSettle(
                patient_token=self.alice, week=self.last_week(), ts=now_ms))])
        finally:
            ledger.close()

    def summary(self) -> dict[str, Any]:
        ledger = Ledger(self.ledger_file)
        try:
            state = replay_ledger(ledger, self.genesis).state
            refusals = [leaf for leaf in ledger.leaves() if Entry.decode(leaf).type == SALE_REFUSED]
        finally:
            ledger.close()
        refused = [envelope.parse(Entry.decode(ledger_leaf).cose).payload for ledger_leaf in refusals]
        return {
            "balances": dict(sorted(state.balances.items())),
            "genesis_total": sum(self.genesis.allocations.values()),
            "bonds": {party: record["amount"] for party, record in sorted(state.table("bonds").items())},
            "pharmacy_violations": state.table("violations").get(self.pharmacy_account, 0),
            "formulary_refusals": sum(_sold_as_non_rx(state, r["event"]) for r in refused),
            "active_miners": active_miners(state),
            "claims": list(state.table("claims").values()),
            "insurer_account": self.insurer_account, "pharmacy_account": self.pharmacy_account,
            "alice_account": f"patient:{self.alice}",
            "state_root": state.root().hex(),
        }


def _sold_as_non_rx(state: Any, event: bytes) -> bool:
    """Whether a refused sale was rung up as not Rx-only although the formulary lists its item as Rx-only."""
    body = envelope.parse(event).payload["body"]
    return not body["rx_only"] and bool(
        formulary.terms_of(state, f"{body['code_system']}:{body['item_code']}")["rx_only"])
