"""Attested time: the bridge's `clock.attest` is the time the rules judge on (Rx expiry, sale time skew), and
the bridge's gate attests it, in the same batch, before every gated event once it is a second old."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_contracts_world import ANALGESIC, DAY, PHARMACY_BOND, T0, World

from carechain import envelope
from carechain.entries import CLOCK_ATTEST, ENTRY_EVENT, ENTRY_REGISTER, SALE_REFUSED, Entry, Registration
from carechain.events import HeartRate, WeeklyActivity, make_payload
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.contract_gate import CLOCK_STALE_MS, ContractGate
from chain_bridge.ledger.store import Appended, AppendResult, EventCandidate, Ledger, SaleRefused
from contract_rules import bonds
from contract_rules import transactions as ce
from contract_rules.clock import MAX_SALE_SKEW_MS, attested_ms

EXPIRES = T0 + 30 * DAY


@pytest.fixture
def w() -> World:
    world = World()
    world.standard_parties()
    return world


def violations(w: World) -> int:
    return w.state.table("violations").get(w.pharmacy_account(), 0)


# -- the rules ------------------------------------------------------------------------------------------

def test_only_the_operator_attests_and_attested_time_only_moves_forward(w: World) -> None:
    assert w.add(ce.clock_attest_entry(w.pharmacy, T0)) == "signer_not_allowed"
    assert w.attest(T0) == "ok"
    assert w.state.table("clock")["now"] == {"ms": T0, "at": w.last_index}
    assert w.attest(T0) == "clock_not_later"
    assert w.attest(T0 - 1) == "clock_not_later"
    assert w.attest(T0 + 1) == "ok" and attested_ms(w.state) == T0 + 1


def test_a_sale_before_any_attested_time_is_refused_and_not_held_against_the_pharmacy(w: World) -> None:
    assert w.sale(ANALGESIC, rx_only=False, attest=False) == "no_attested_time"
    assert violations(w) == 0
    assert w.state.table("bonds")[w.pharmacy.device_id]["amount"] == PHARMACY_BOND


def test_a_sale_backdated_25_days_after_its_rx_expired_is_refused(w: World) -> None:
    # Regression: expiry was judged on the sale's own `ts`, so a terminal could backdate a sale into the Rx's life.
    rx, _ = w.prescribe(quantity=1, refills=3, expires_ms=EXPIRES)
    assert w.attest(EXPIRES + 25 * DAY) == "ok"
    assert w.sale(rx_ref=rx.rx_ref(), ts=EXPIRES - DAY, attest=False) == "sale_time_skew"
    assert w.sale(rx_ref=rx.rx_ref(), ts=EXPIRES + 25 * DAY) == "rx_expired"  # and told the truth: expired
    assert violations(w) == 2
    assert w.state.table("bonds")[w.pharmacy.device_id]["amount"] == PHARMACY_BOND - 2 * bonds.SLASH["refused_sale"]
    assert w.state.table("rx")[rx.rx_ref()]["fills"] == 0


def test_rx_expiry_at_the_exact_boundary(w: World) -> None:
    rx, _ = w.prescribe(quantity=1, refills=3, expires_ms=EXPIRES)
    assert w.sale(rx_ref=rx.rx_ref(), ts=EXPIRES - 1) == "ok"  # attested one ms before expiry: still valid
    assert attested_ms(w.state) == EXPIRES - 1
    assert w.sale(rx_ref=rx.rx_ref(), ts=EXPIRES) == "rx_expired"  # attested at expires_ms: expired
    assert attested_ms(w.state) == EXPIRES
    # The sale's own time does not matter, only the attested one: a sale stamped before expiry is expired too.
    assert w.sale(rx_ref=rx.rx_ref(), ts=EXPIRES - 1, attest=False) == "rx_expired"
    assert w.state.table("rx")[rx.rx_ref()]["fills"] == 1


def test_sale_time_skew_at_the_exact_boundary(w: World) -> None:
    now = T0 + DAY
    assert w.attest(now) == "ok"
    for ts in (now - MAX_SALE_SKEW_MS, now + MAX_SALE_SKEW_MS):
        assert w.sale(ANALGESIC, rx_only=False, ts=ts, attest=False) == "ok"
    for ts in (now - MAX_SALE_SKEW_MS - 1, now + MAX_SALE_SKEW_MS + 1):
        assert w.sale(ANALGESIC, rx_only=False, ts=ts, attest=False) == "sale_time_skew"
    assert violations(w) == 2


# -- the bridge's gate ----------------------------------------------------------------------------------

class GatedLedger:
    """A real ledger holding the world's setup entries, and the bridge's contract gate on a clock the test sets."""

    def __init__(self, tmp_path: Path) -> None:
        self.w = World()
        self.w.standard_parties()
        assert self.w.register_device(self.w.wearable, "wearable", self.w.pharmacy.device_id) == "ok"
        self.ledger = Ledger(tmp_path / "ledger.db")
        for entry in self.w.entries:
            if entry.type == ENTRY_REGISTER:
                reg = Registration.model_validate(envelope.parse(entry.cose).payload)
                self.ledger.append_registrations([(entry, reg)])
            else:
                self.ledger.append_entries([entry])
        self.now = T0 + DAY
        self.gate = ContractGate(self.w.genesis, self.w.operator, clock=lambda: self.now)

    def send(self, *events: Entry) -> list[AppendResult]:
        candidates = []
        for e in events:
            payload = envelope.parse(e.cose).payload
            candidates.append(EventCandidate(payload["dev"], payload["seq"], e.encode(), kind=payload["kind"]))
        return self.ledger.append_events(candidates, self.gate)

    def types_from(self, start: int) -> list[str]:
        return [Entry.decode(leaf).type for leaf in self.ledger.leaves(start)]

    def sale(self, ts: int | None = None, **kwargs) -> Entry:  # noqa: ANN003
        return self.w.sale_entry(ANALGESIC, rx_only=False, ts=self.now if ts is None else ts, **kwargs)


@pytest.fixture
def g(tmp_path: Path) -> GatedLedger:
    return GatedLedger(tmp_path)


def test_the_gate_attests_the_time_before_a_sale_in_the_same_batch(g: GatedLedger) -> None:
    start = g.ledger.size
    [result] = g.send(g.sale())
    assert result == Appended(start + 1)
    assert g.types_from(start) == [CLOCK_ATTEST, ENTRY_EVENT]
    assert envelope.parse(Entry.decode(g.ledger.entry(start)).cose).payload == {"v": 1, "ms": g.now}
    # Within a second: no new attestation; at a second: one, again just before the sale.
    g.now += CLOCK_STALE_MS - 1
    g.send(g.sale(), g.sale())
    g.now += 1
    g.send(g.sale())
    assert g.types_from(start) == [CLOCK_ATTEST, ENTRY_EVENT, ENTRY_EVENT, ENTRY_EVENT, CLOCK_ATTEST, ENTRY_EVENT]
    assert attested_ms(g.gate.state) == g.now
    assert replay_ledger(g.ledger, g.w.genesis).state.root() == g.gate.state.root()  # every replica agrees


def test_a_backdated_sale_sent_through_the_bridge_is_recorded_as_refused(g: GatedLedger) -> None:
    rx, _ = g.w.prescribe(quantity=1, expires_ms=EXPIRES)
    g.ledger.append_entries([g.w.entries[-1]])
    g.now = EXPIRES + 25 * DAY
    start = g.ledger.size
    [result] = g.send(g.w.sale_entry(rx_ref=rx.rx_ref(), ts=EXPIRES - DAY))
    assert result == SaleRefused(start + 1, "sale_time_skew")
    assert g.types_from(start) == [CLOCK_ATTEST, SALE_REFUSED]
    state = replay_ledger(g.ledger, g.w.genesis).state
    assert state.root() == g.gate.state.root()
    assert state.table("violations") == {g.w.pharmacy_account(): 1}


def test_a_bridge_clock_that_steps_back_never_attests_backwards(g: GatedLedger) -> None:
    g.send(g.sale())
    first = g.now
    g.now -= 10 * CLOCK_STALE_MS  # e.g. NTP stepped the bridge's clock back
    start = g.ledger.size
    [result] = g.send(g.sale())  # judged on the last attestation, ten seconds ahead: well within the skew
    assert result == Appended(start) and attested_ms(g.gate.state) == first
    g.now = first + CLOCK_STALE_MS  # caught up: attesting resumes
    g.send(g.sale())
    assert attested_ms(g.gate.state) == g.now
    assert g.types_from(start) == [ENTRY_EVENT, CLOCK_ATTEST, ENTRY_EVENT]


def test_readings_get_no_attestation_and_a_refused_event_keeps_its_attestation(g: GatedLedger) -> None:
    start = g.ledger.size
    reading = make_payload(g.w.wearable.device_id, 0, g.now, "heart_rate", HeartRate(bpm=61))
    assert g.send(Entry(ENTRY_EVENT, envelope.sign(g.w.wearable, reading))) == [Appended(start)]
    assert g.types_from(start) == [ENTRY_EVENT]
    start = g.ledger.size
    payload = make_payload(g.w.wearable.device_id, 1, g.now, "weekly_activity",
                           WeeklyActivity(week="2026-W47", active_minutes=200, policy="no-such-policy"), v=2)
    [refused] = g.send(Entry(ENTRY_EVENT, envelope.sign(g.w.wearable, payload)))
    assert refused == SaleRefused(None, "no_policy")
    # The attestation the gate applied before deciding is on the ledger too: gate and ledger stay in step.
    assert g.types_from(start) == [CLOCK_ATTEST]
    assert g.gate.state.size == g.ledger.size
    assert replay_ledger(g.ledger, g.w.genesis).state.root() == g.gate.state.root()
