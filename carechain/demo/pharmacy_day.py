"""The demo's pharmacy day: parties, prescriptions, policies and a scripted day of sales under the contracts.

Everything goes through the real pieces: party, Rx and policy entries are signed by their parties and
checked against a replay of the ledger before they are appended (chain_bridge.contract_admin); the sales are
purchase events the terminal signs and sends over MQTT like any reading, and the bridge's contract gate
decides each one before appending it. The day shows: Rx sales and a refill accepted, an Rx-only sale without
a prescription refused and counted against the pharmacy (then sold once the prescriber has issued one), a
flu shot billed to the insurer, an over-the-counter sale, and a weekly wellness rebate earned from last
week's activity of a registered wearable.

Alice is a registered patient (carechain.demo.records): her patient token is her party id, so that her
wearable (whose registered owner she is) can disclose its weekly activity summary to her policy
(protocol 2 seals the raw activity; contract_rules.insurance_v2). Bob and Carol are plain tokens.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from carechain.events import Activity, Purchase
from carechain.identity import Identity
from chain_bridge.contract_admin import replay_ledger, submit
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import contract_genesis, operator_key
from contract_rules import transactions as ce

BOB, CAROL = "pt-demo-bob", "pt-demo-carol"
WELLNESS_POLICY = "demo-alice"  # Alice's policy id: her wearable discloses its weekly summary to it
AMOXICILLIN = ("70882-114-20", 1250)  # Rx-only, from device_profiles/pharmacy_terminal.yaml
METFORMIN = ("65841-809-01", 1500)  # Rx-only
FLU_SHOT = ("49281-0621-15", 4500)  # immunization under a standing order
ACETAMINOPHEN = ("70000-0036-1", 899)  # over the counter
INSURER_FUNDS = 1_000_000  # minor units allocated to the insurer at genesis
REBATE = 2_500
_DAY_MS = 86_400_000


def _sale(item: tuple[str, int], patient: str, *, rx_only: bool, payment: str, rx_ref: str | None) -> Purchase:
    code, price = item
    return Purchase(item_code=code, code_system="ndc", rx_only=rx_only, quantity=1, price_minor=price,
                    currency="USD", patient_token=patient, payment_method=payment, rx_ref=rx_ref)


class PharmacyDay:
    """Parties and their keys (in `keys_dir`), the contract genesis and the entries of the day."""

    def __init__(self, bridge_dir: Path, keys_dir: Path, ledger_file: Path, alice: str) -> None:
        self.alice = alice  # her party id, also her patient token
        self.prescriber = Identity.load_or_create(keys_dir / "prescriber.key")
        self.pharmacy = Identity.load_or_create(keys_dir / "pharmacy.key")
        self.insurer = Identity.load_or_create(keys_dir / "insurer.key")
        self.insurer_account = f"insurer:{self.insurer.device_id}"
        self.pharmacy_account = f"pharmacy:{self.pharmacy.device_id}"
        self.genesis = contract_genesis(bridge_dir, {self.insurer_account: INSURER_FUNDS})
        self.operator = operator_key(bridge_dir)
        self.ledger_file = ledger_file

    # -- set-up, before the terminal and the wearable send anything ------------------------------------

    def set_up(self, now_ms: int) -> None:
        """Register the parties and the policies (idempotent across demo runs on the same data dir)."""
        ledger = Ledger(self.ledger_file)
        try:
            state = replay_ledger(ledger, self.genesis).state
            if state.table("policies").get(self.alice) is not None:
                return
            parties = [ce.signed(self.operator, ce.PARTY_REGISTER, ce.PartyRegistration(
                role=role, pk=who.public_key, name=name, ts=now_ms))
                for role, who, name in (("prescriber", self.prescriber, "Dr. Demo"),
                                        ("pharmacy", self.pharmacy, "Demo Pharmacy"),
                                        ("insurer", self.insurer, "Demo Health Insurance"))]
            flu = ce.CoverageRule(category="immunization", bp=10_000, items=[f"ndc:{FLU_SHOT[0]}"])
            generics = ce.CoverageRule(category="generic", bp=8_000, items=[f"ndc:{METFORMIN[0]}"])
            policies = [ce.signed(self.insurer, ce.POLICY_REGISTER, ce.PolicyRegistration(
                policy_id=policy_id, patient_token=patient, coverage=[flu, generics],
                wellness=ce.Wellness(min_active_minutes=150, rebate_minor=REBATE) if patient == self.alice else None,
                ts=now_ms)) for patient, policy_id in ((self.alice, WELLNESS_POLICY), (BOB, "demo-bob"))]
            submit(ledger, self.genesis, parties + policies)
        finally:
            ledger.close()

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
            _sale(AMOXICILLIN, self.alice, rx_only=True, payment="card", rx_ref=amoxicillin),
            _sale(METFORMIN, BOB, rx_only=True, payment="insurance", rx_ref=None),  # no Rx: refused
            _sale(FLU_SHOT, self.alice, rx_only=False, payment="insurance", rx_ref=None),  # billed 100 % to insurer
            _sale(ACETAMINOPHEN, CAROL, rx_only=False, payment="card", rx_ref=None),
            _sale(AMOXICILLIN, self.alice, rx_only=True, payment="card", rx_ref=amoxicillin),  # the refill
        ]

    def afternoon_sales(self, now_ms: int) -> list[Purchase]:
        metformin = self.prescribe(BOB, METFORMIN, refills=0, now_ms=now_ms)
        return [_sale(METFORMIN, BOB, rx_only=True, payment="insurance", rx_ref=metformin)]  # 80 % billed

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
        finally:
            ledger.close()
        return {
            "balances": dict(sorted(state.balances.items())),
            "pharmacy_violations": state.table("violations").get(self.pharmacy_account, 0),
            "claims": list(state.table("claims").values()),
            "insurer_account": self.insurer_account, "pharmacy_account": self.pharmacy_account,
            "alice_account": f"patient:{self.alice}",
            "state_root": state.root().hex(),
        }
