"""The demo's trial piece (carechain.demo.trial) on a live deployment (tests/live_world.py): three bonded
`carechain miner` processes that commit, reveal and answer the emergency unblinding by themselves, and a bonded
pharmacy. A trial with a drug that does nothing (effect 0) verifies but does not meet its endpoint, and a pharmacy
that is not admitted stops the demo with a clear error. The demo's own 40-participant trial, whose drug lowers the
resting heart rate by 6 bpm and meets its endpoint, runs and is checked in tests/test_demo_market.py (the whole
`carechain demo`), not again here."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import pytest

from carechain.demo.trial import TrialDemo
from carechain.identity import Identity
from chain_bridge.registry import ledger_path, write_genesis
from contract_rules import Genesis
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from tests.access_world import now_ms
from tests.live_world import LiveWorld, module_world

pytestmark = pytest.mark.integration

ENROL_WINDOW_MS = 12_000  # the demo's 30 s made shorter: the miners commit within a few seconds here (commit to
# unblinding took ~4 s on a loaded 2-core machine; the demo waits the rest out, and a late step fails loudly)


@dataclass
class TrialDemoWorld(LiveWorld):
    """LiveWorld with a bonded pharmacy (funded by the genesis)."""

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
        self.register_parties([ce.PartyRegistration(role="pharmacy", pk=self.pharmacy.public_key,
                                                    name="trial pharmacy", ts=now_ms())])
        self.submit([ce.signed(self.pharmacy, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["pharmacy"], nonce=1,
                                                                        ts=now_ms()))])

    def demo(self, pharmacy: Identity | None = None, **kwargs: int) -> TrialDemo:
        return TrialDemo(self.root, self.genesis, self.operator, self.log_key, ledger_path(self.bridge_dir),
                         pharmacy or self.pharmacy, [m.dir for m in self.miners], enrol_window_ms=ENROL_WINDOW_MS,
                         **kwargs)


world = module_world(TrialDemoWorld, "trial-demo")


def test_a_drug_that_does_nothing_does_not_meet_the_endpoint_and_still_verifies(world: TrialDemoWorld) -> None:
    result = world.demo(effect_milli=0, participants=16).run()
    assert result["error"] is None, (result, world.logs())
    assert result["trial_verified"] is True
    certificate = result["trial_certificate"]
    assert certificate["met"] is False
    assert Decimal(certificate["effect"]) == 0 and Decimal(certificate["p_value"]) == 1
    assert result["simulated_effect_milli_bpm"] == 0
    # The seeds stay where their committers keep them: the miners' are 0600 files in their own data dirs.
    seeds = [seed for m in world.miners for seed in (m.dir / "trials").glob("*.seed")]
    assert len(seeds) == len(world.miners) and all(seed.stat().st_mode & 0o077 == 0 for seed in seeds)


def test_the_demo_reports_a_pharmacy_that_cannot_dispense(world: TrialDemoWorld) -> None:
    result = world.demo(pharmacy=Identity.generate()).run()
    assert result["trial_verified"] is False and "is not admitted" in result["error"]
