"""A small, reproducible world for the contract tests: parties, devices and signed entries, applied in order.

Not a test module itself (it holds no tests): the other tests/test_contracts_*.py import `World` from it.
"""

from __future__ import annotations

import datetime
from collections import defaultdict

from carechain import envelope
from carechain.entries import ENTRY_REGISTER, ENTRY_REVOKE, Entry, Registration, Revocation, event_entry
from carechain.events import Activity, Purchase, make_payload
from carechain.identity import Identity
from contract_rules import Genesis, Runtime, bonds, builtin_hashes
from contract_rules import transactions as ce
from contract_rules.clock import attested_ms

# Monday 2026-11-16 00:00 UTC: the start of ISO week 2026-W47.
T0 = int(datetime.datetime(2026, 11, 16, tzinfo=datetime.UTC).timestamp() * 1000)
WEEK = "2026-W47"
DAY = 86_400_000
AMOXICILLIN = "70882-114-20"
METFORMIN = "65841-809-01"
FLU_SHOT = "49281-0621-15"
ANALGESIC = "70000-0036-1"  # over the counter
INSURER_FUNDS = 1_000_000
# Each pharmacy's genesis allocation, all of it posted as its bond: ten times the minimum, so that the slashes of
# a test's refused sales do not suspend it (tests of suspension post less).
PHARMACY_BOND = 10 * bonds.MIN_BOND["pharmacy"]
# The world's formulary: the Rx-only drugs allow up to 10 packages a sale, the OTC ones 20.
FORMULARY = (ce.FormularyItem(item=f"ndc:{AMOXICILLIN}", rx_only=True, schedule=0, max_quantity=10),
             ce.FormularyItem(item=f"ndc:{METFORMIN}", rx_only=True, schedule=0, max_quantity=10),
             ce.FormularyItem(item=f"ndc:{FLU_SHOT}", rx_only=False, schedule=0, max_quantity=20),
             ce.FormularyItem(item=f"ndc:{ANALGESIC}", rx_only=False, schedule=0, max_quantity=20))


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


class World:
    def __init__(self, contracts: dict[str, str] | None = None, code=None) -> None:  # noqa: ANN001
        self.operator = ident(1)
        self.prescriber, self.prescriber2 = ident(2), ident(3)
        self.pharmacy, self.pharmacy2 = ident(4), ident(5)
        self.insurer = ident(6)
        self.terminal, self.terminal2 = ident(7), ident(8)
        self.wearable = ident(9)
        self.miner = ident(10)
        self.authority = ident(11)
        self.genesis = Genesis(
            operators={self.operator.device_id: self.operator.public_key},
            allocations={self.insurer_account: INSURER_FUNDS, "pool:miners": 500_000,
                         self.pharmacy_account(): PHARMACY_BOND, self.pharmacy_account(self.pharmacy2): PHARMACY_BOND},
            contracts=contracts or builtin_hashes(),
        )
        self.runtime = Runtime(self.genesis, code)
        self.entries: list[Entry] = []
        self._seq: dict[str, int] = defaultdict(int)
        self._nonce = 0

    # -- accounts -----------------------------------------------------------------------------------
    @property
    def insurer_account(self) -> str:
        return f"insurer:{self.insurer.device_id}"

    def pharmacy_account(self, pharmacy: Identity | None = None) -> str:
        return f"pharmacy:{(pharmacy or self.pharmacy).device_id}"

    @property
    def state(self):  # noqa: ANN201
        return self.runtime.state

    # -- appending ----------------------------------------------------------------------------------
    def add(self, entry: Entry) -> str:
        self.entries.append(entry)
        return self.runtime.apply(entry)

    @property
    def last_index(self) -> int:
        return len(self.entries) - 1

    def register_party(self, role: str, who: Identity, name: str = "x") -> str:
        reg = ce.PartyRegistration(role=role, pk=who.public_key, name=name, ts=T0)
        return self.add(ce.signed(self.operator, ce.PARTY_REGISTER, reg))

    def register_device(self, dev: Identity, profile: str, owner: str) -> str:
        reg = Registration(dev=dev.device_id, pk=dev.public_key, profile=profile, owner=owner, site="s", ts=T0)
        return self.add(Entry(ENTRY_REGISTER, envelope.sign(self.operator, reg.model_dump())))

    def revoke_device(self, dev: Identity) -> str:
        rev = Revocation(dev=dev.device_id, reason="lost", ts=T0)
        return self.add(Entry(ENTRY_REVOKE, envelope.sign(self.operator, rev.model_dump())))

    def standard_parties(self) -> None:
        """Prescriber, two bonded pharmacies with a terminal each, an insurer, a miner, and an authority that
        sets the world's formulary: all must be accepted."""
        results = [
            self.register_party("prescriber", self.prescriber),
            self.register_party("prescriber", self.prescriber2),
            self.register_party("pharmacy", self.pharmacy),
            self.register_party("pharmacy", self.pharmacy2),
            self.register_party("insurer", self.insurer),
            self.register_party("miner", self.miner),
            self.register_party("authority", self.authority),
            self.register_device(self.terminal, "pharmacy_terminal", self.pharmacy.device_id),
            self.register_device(self.terminal2, "pharmacy_terminal", self.pharmacy2.device_id),
            self.set_formulary(*FORMULARY),
            self.post_bond(self.pharmacy, PHARMACY_BOND),
            self.post_bond(self.pharmacy2, PHARMACY_BOND),
        ]
        assert results == ["ok"] * len(results)

    def set_formulary(self, *items: ce.FormularyItem, authority: Identity | None = None) -> str:
        return self.add(ce.formulary_set_entry(authority or self.authority, ce.FormularySet(items=list(items), ts=T0)))

    def post_bond(self, who: Identity, amount: int) -> str:
        self._nonce += 1
        return self.add(ce.signed(who, ce.BOND_POST, ce.BondPost(amount=amount, nonce=self._nonce, ts=T0)))

    def attest(self, ms: int) -> str:
        """The bridge's `clock.attest`: the time time-based rules judge on from the next entry."""
        return self.add(ce.clock_attest_entry(self.operator, ms))

    def event(self, dev: Identity, kind: str, body, ts: int) -> Entry:  # noqa: ANN001
        seq = self._seq[dev.device_id]
        self._seq[dev.device_id] += 1
        return event_entry(envelope.sign(dev, make_payload(dev.device_id, seq, ts, kind, body)))

    def sale_entry(self, item: str = AMOXICILLIN, *, patient: str = "pt-alice", quantity: int = 1,
                   rx_ref: str | None = None, rx_only: bool = True, price: int = 1250, pay: str = "card",
                   terminal: Identity | None = None, ts: int = T0 + DAY) -> Entry:
        """A terminal's signed sale, not yet appended."""
        body = Purchase(item_code=item, code_system="ndc", rx_only=rx_only, quantity=quantity, price_minor=price,
                        currency="USD", patient_token=patient, payment_method=pay, rx_ref=rx_ref)
        return self.event(terminal or self.terminal, "purchase", body, ts)

    def sale(self, item: str = AMOXICILLIN, *, attest: bool = True, **kwargs) -> str:  # noqa: ANN003
        """Append a sale; with `attest`, first attest its `ts` as the time if the clock is behind it, as the
        bridge's gate would (a sale's own time then agrees with the attested time)."""
        entry = self.sale_entry(item, **kwargs)
        ts = envelope.parse(entry.cose).payload["ts"]
        now = attested_ms(self.state)
        if attest and (now is None or now < ts):
            assert self.attest(ts) == "ok"
        return self.add(entry)

    def refusal(self, sale: Entry, reason: str) -> Entry:
        """What an honest bridge appends instead of a sale the contracts refuse."""
        return ce.signed(self.operator, ce.SALE_REFUSED, ce.SaleRefusal(event=sale.cose, reason=reason, ts=T0))

    def activity(self, minutes: int, ts: int, dev: Identity | None = None) -> str:
        return self.add(self.event(dev or self.wearable, "activity", Activity(steps=100, active_minutes=minutes), ts))

    def prescribe(self, *, patient: str = "pt-alice", drug: str = AMOXICILLIN, quantity: int = 2, refills: int = 1,
                  expires_ms: int = T0 + 30 * DAY, controlled: bool = False, prescriber: Identity | None = None,
                  nonce: int = 0) -> tuple[ce.Prescription, str]:
        who = prescriber or self.prescriber
        rx = ce.Prescription(prescriber=who.device_id, patient_token=patient, drug_code=drug, code_system="ndc",
                             quantity=quantity, refills=refills, expires_ms=expires_ms, controlled=controlled,
                             issued_ms=T0, nonce=nonce.to_bytes(16, "big"))
        return rx, self.add(ce.signed(who, ce.RX_ANCHOR, ce.rx_anchor_for(rx, T0)))

    def revoke_rx(self, rx_ref: str, who: Identity | None = None) -> str:
        rev = ce.RxRevoke(rx_ref=rx_ref, reason="adverse reaction", ts=T0 + DAY)
        return self.add(ce.signed(who or self.prescriber, ce.RX_REVOKE, rev))

    def policy(self, patient: str = "pt-alice", *, wellness: bool = True) -> str:
        coverage = [ce.CoverageRule(category="immunization", bp=10_000, items=[f"ndc:{FLU_SHOT}"]),
                    ce.CoverageRule(category="generic", bp=8_000, items=[f"ndc:{AMOXICILLIN}", f"ndc:{METFORMIN}"])]
        well = ce.Wellness(min_active_minutes=150, rebate_minor=2_500) if wellness else None
        reg = ce.PolicyRegistration(policy_id=f"pol-{patient}", patient_token=patient, coverage=coverage,
                                    wellness=well, ts=T0)
        return self.add(ce.signed(self.insurer, ce.POLICY_REGISTER, reg))

    def settle(self, patient: str = "pt-alice", week: str = WEEK, ts: int = T0 + 8 * DAY) -> str:
        return self.add(ce.signed(self.insurer, ce.WELLNESS_SETTLE,
                                  ce.WellnessSettle(patient_token=patient, week=week, ts=ts)))

    def transfer(self, sender: Identity, to: str, amount: int, nonce: int | None = None) -> str:
        if nonce is None:
            self._nonce += 1
            nonce = self._nonce
        return self.add(ce.signed(sender, ce.TOKEN_TRANSFER, ce.TokenTransfer(to=to, amount=amount, nonce=nonce)))
