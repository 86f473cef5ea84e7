"""The demo's trial piece (carechain.demo.trial) on a live deployment: a private mosquitto, one `carechain
bridge` (contracts on), three bonded `carechain miner` processes that commit, reveal and answer the emergency
unblinding by themselves, and a bonded pharmacy. A trial whose simulated drug lowers the resting heart rate by
6 bpm meets its endpoint and verifies; the same trial with a drug that does nothing (effect 0) verifies too but
does not meet it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest

from carechain.identity import Identity
from chain_bridge.registry import ledger_path, write_genesis
from contract_rules import Genesis
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from tests.access_world import AccessWorld, now_ms, wait_for

pytestmark = pytest.mark.integration

ENROL_WINDOW_MS = 25_000  # the demo's 40 s made shorter: the miners commit within a few seconds here


@dataclass
class TrialDemoWorld(AccessWorld):
    """AccessWorld with three bonded miners (final = 2 of 3) and a bonded pharmacy (funded by the genesis)."""

    n_miners: int = 3
    threshold: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pharmacy = Identity.generate()
        # Nothing is on the ledger yet: the genesis may still gain the pharmacy's bond.
        self.genesis = Genesis(operators=self.genesis.operators, contracts=self.genesis.contracts,
                               allocations={**self.genesis.allocations,
                                            f"pharmacy:{self.pharmacy.device_id}": MIN_BOND["pharmacy"]})
        write_genesis(self.genesis_file, self.genesis)

    def register(self) -> None:
        super().register()
        from chain_bridge.contract_admin import submit
        from chain_bridge.ledger.store import Ledger

        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            submit(ledger, self.genesis, [
                ce.party_registration_entry(self.operator, ce.PartyRegistration(
                    role="pharmacy", pk=self.pharmacy.public_key, name="trial pharmacy", ts=now_ms())),
                ce.signed(self.pharmacy, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["pharmacy"], nonce=1,
                                                                   ts=now_ms()))])
        finally:
            ledger.close()

    def start(self, before_processes=None) -> None:  # noqa: ANN001
        from carechain import topics
        from simulators.miners import clear_retained

        clear_retained(self.broker, f"trial-demo-clear-{id(self)}",
                       [topics.CHECKPOINT, topics.FINAL_CHECKPOINT, *(topics.miner_hello(m.id) for m in self.miners)])
        super().start(before_processes)

    def demo(self, **kwargs):  # noqa: ANN003, ANN201
        from carechain.demo.trial import TrialDemo

        return TrialDemo(self.root, self.genesis, self.operator, self.log_key, ledger_path(self.bridge_dir),
                         self.pharmacy, [m.dir for m in self.miners], enrol_window_ms=ENROL_WINDOW_MS, **kwargs)


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrialDemoWorld]:  # noqa: ANN001
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto (retained hellos and the miners' topics as in production)")
    w = TrialDemoWorld(tmp_path_factory.mktemp("trial-demo"), broker.config)
    try:
        w.start()
        from chain_bridge.ledger.store import Ledger

        def final_recorded() -> bool:
            ledger = Ledger(ledger_path(w.bridge_dir))
            try:
                return any(t == "checkpoint.final" for t in _types(ledger))
            finally:
                ledger.close()

        w.stream(1.0)  # the band's readings grow the log: the miners cosign, the bridge records a final checkpoint
        wait_for("a final checkpoint on the ledger (the trial's labellers are drawn from its seed)", final_recorded)
        yield w
    finally:
        w.stop()


def _types(ledger) -> list[str]:  # noqa: ANN001
    from carechain.entries import Entry

    return [Entry.decode(ledger.entry(i)).type for i in range(ledger.refresh())]


def test_the_trial_piece_meets_its_endpoint_and_verifies_with_one_logged_unblinding(world: TrialDemoWorld) -> None:
    result = world.demo().run()
    assert result["error"] is None, (result, world.logs())
    assert result["trial_verified"] is True
    certificate = result["trial_certificate"]
    assert certificate["met"] is True
    assert certificate["n_treatment"] == certificate["n_control"] == 20
    # The simulated drug lowers the change by exactly 6 bpm (twins' noise is matched within each block).
    assert Decimal(certificate["effect"]) == Decimal("-6000.000")
    assert Decimal(certificate["p_value"]) < Decimal("0.05")
    assert result["simulated_effect_milli_bpm"] == -6000
    unblinding = result["unblinding"]
    assert unblinding["arm"] in ("treatment", "placebo") and unblinding["size"] == 4
    assert [u["participant"] for u in result["verify"]["unblinded"]] == [unblinding["participant"]]
    assert all(result["verify"]["checks"].values()), result["verify"]
    from carechain.demo.trial import certificate_lines

    printed = "\n".join(certificate_lines(result))
    assert "effect -6.00 bpm" in printed and "endpoint MET" in printed
    assert "verified from the log alone: True" in printed
    assert set(result["phases"]) >= {"register", "commit", "enrol_and_dispense", "readings", "unblinding",
                                     "lock_and_reveal", "outcomes", "certify_and_verify"}
    # The seeds stay where their committers keep them: the miners' are 0600 files in their own data dirs.
    for m in world.miners:
        for seed in (m.dir / "trials").glob("*.seed"):
            assert seed.stat().st_mode & 0o077 == 0


def test_a_drug_that_does_nothing_does_not_meet_the_endpoint_and_still_verifies(world: TrialDemoWorld) -> None:
    result = world.demo(effect_milli=0, participants=16).run()
    assert result["error"] is None, (result, world.logs())
    assert result["trial_verified"] is True
    certificate = result["trial_certificate"]
    assert certificate["met"] is False
    assert Decimal(certificate["effect"]) == 0 and Decimal(certificate["p_value"]) == 1


def test_the_demo_reports_a_pharmacy_that_cannot_dispense(world: TrialDemoWorld) -> None:
    from carechain.demo.trial import TrialDemo

    unbonded = Identity.generate()
    result = TrialDemo(world.root, world.genesis, world.operator, world.log_key, ledger_path(world.bridge_dir),
                       unbonded, [m.dir for m in world.miners]).run()
    assert result["trial_verified"] is False and "is not admitted" in result["error"]

