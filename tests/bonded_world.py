"""The contract test world with patient wallets, funded miners, bonded insurers and consented policies.

Not a test module itself: tests/test_contracts_{bonds,payments,insurance_v3}.py import `BondedWorld` from it.
It is `World` (formulary, attested time, bonded pharmacies) with two patients who hold tokens, a second insurer,
a second miner, and each party's spare funds beyond its bond.
"""

from __future__ import annotations

from test_contracts_world import ANALGESIC, DAY, FLU_SHOT, METFORMIN, PHARMACY_BOND, T0, World, ident

from carechain import envelope
from carechain.entries import Entry
from carechain.events import Purchase, authorize_payment
from carechain.identity import Identity
from contract_rules import Genesis, Runtime
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from contract_rules.clock import attested_ms

PATIENT_FUNDS = 200_000
SPARE_FUNDS = 500_000  # what each pharmacy (beyond its bond), miner and the second insurer hold


class BondedWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.alice, self.bob = ident(20), ident(21)
        self.insurer2 = ident(22)
        self.miner2 = ident(23)
        allocations = {**self.genesis.allocations,
                       self.pharmacy_account(): PHARMACY_BOND + SPARE_FUNDS,
                       self.pharmacy_account(self.pharmacy2): PHARMACY_BOND + SPARE_FUNDS,
                       f"insurer:{self.insurer2.device_id}": SPARE_FUNDS,
                       f"miner:{self.miner.device_id}": SPARE_FUNDS, f"miner:{self.miner2.device_id}": SPARE_FUNDS,
                       f"patient:{self.alice.device_id}": PATIENT_FUNDS, f"patient:{self.bob.device_id}": PATIENT_FUNDS}
        self.genesis = Genesis(operators=self.genesis.operators, allocations=allocations,
                               contracts=self.genesis.contracts)
        self.runtime = Runtime(self.genesis)

    def standard_parties(self) -> None:
        """`World`'s parties, two patients, a second insurer and miner; the first insurer bonded."""
        super().standard_parties()
        results = [self.register_party("patient", self.alice), self.register_party("patient", self.bob),
                   self.register_party("insurer", self.insurer2), self.register_party("miner", self.miner2),
                   self.post_bond(self.insurer, MIN_BOND["insurer"])]
        assert results == ["ok"] * len(results)

    # -- bonds ----------------------------------------------------------------------------------------
    def bond_entry(self, who: Identity, amount: int) -> Entry:
        self._nonce += 1
        return ce.signed(who, ce.BOND_POST, ce.BondPost(amount=amount, nonce=self._nonce, ts=T0))

    def unbond(self, who: Identity, amount: int) -> str:
        self._nonce += 1
        return self.add(ce.signed(who, ce.BOND_UNBOND, ce.BondUnbond(amount=amount, nonce=self._nonce, ts=T0)))

    def withdraw(self, who: Identity) -> str:
        self._nonce += 1
        return self.add(ce.signed(who, ce.BOND_WITHDRAW, ce.BondWithdraw(nonce=self._nonce, ts=T0)))

    # -- policies -------------------------------------------------------------------------------------
    def offer(self, patient: Identity | None = None, *, flu_cap: int = 2_500, wellness: bool = True,
              generic: tuple[str, ...] = (METFORMIN, ANALGESIC)) -> ce.PolicyOffer:
        """Flu shots covered in full up to `flu_cap` each, the `generic` items at 80 % of up to 10.00 each."""
        who = patient or self.alice
        coverage = [ce.CappedCoverage(category="immunization", bp=10_000, caps={f"ndc:{FLU_SHOT}": flu_cap}),
                    ce.CappedCoverage(category="generic", bp=8_000, caps={f"ndc:{code}": 1_000 for code in generic})]
        well = ce.Wellness(min_active_minutes=150, rebate_minor=2_500) if wellness else None
        return ce.PolicyOffer(policy_id=f"pol-{who.device_id}", patient=who.device_id, coverage=coverage,
                              wellness=well, ts=T0)

    def consented(self, offer: ce.PolicyOffer, *, patient: Identity | None = None,
                  insurer: Identity | None = None) -> Entry:
        """The insurer's `policy.register` carrying `patient`'s consent to `offer` (from `insurer`)."""
        signer = insurer or self.insurer
        consent = ce.sign_policy_consent(patient or self.alice, signer.device_id, offer)
        return ce.signed(signer, ce.POLICY_REGISTER, ce.consented_policy(offer, consent))

    # -- sales ----------------------------------------------------------------------------------------
    def paid_sale_entry(self, item: str = FLU_SHOT, *, patient: Identity | None = None, price: int = 2_500,
                        pay: int = 0, claim: int = 0, method: str = "token", wallet: Identity | None = None,
                        nonce: int | None = None, signed_price: int | None = None,
                        terminal: Identity | None = None, ts: int = T0 + DAY) -> Entry:
        """A terminal's sale carrying a payment signed by `wallet` (the patient's key unless forged)."""
        who = patient or self.alice
        term = terminal or self.terminal
        if nonce is None:
            self._nonce += 1
            nonce = self._nonce
        policy = self.state.table("policies").get(who.device_id)
        policy_id = policy["policy_id"] if claim and policy else ""
        payment = authorize_payment(wallet or who, term.device_id, f"ndc:{item}", 1,
                                    price if signed_price is None else signed_price, pay_minor=pay,
                                    claim_minor=claim, policy_id=policy_id, nonce=nonce)
        if wallet is not None:
            payment = payment.model_copy(update={"patient": who.device_id})
        body = Purchase(item_code=item, code_system="ndc", rx_only=False, quantity=1, price_minor=price,
                        currency="USD", patient_token=who.device_id, payment_method=method,
                        payment=payment)
        return self.event(term, "purchase", body, ts)

    def paid_sale(self, item: str = FLU_SHOT, **kwargs: object) -> str:
        """Append a paid sale, attesting its time first as the bridge's gate would."""
        entry = self.paid_sale_entry(item, **kwargs)  # type: ignore[arg-type]
        ts = envelope.parse(entry.cose).payload["ts"]
        now = attested_ms(self.state)
        if now is None or now < ts:
            assert self.attest(ts) == "ok"
        return self.add(entry)


__all__ = ["ANALGESIC", "DAY", "FLU_SHOT", "METFORMIN", "T0", "BondedWorld", "ident"]
