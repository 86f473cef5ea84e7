"""A dishonest bridge appends a sale its contracts refuse; five bonded `carechain miner` processes keep the log
alive: the sale is void (no contract state changes but the slash it proves), every miner publishes signed void
evidence, the pharmacy's bond is slashed citing the leaf, and later checkpoints still become final — finality
counted from the ledger's active (registered, bonded) miners, not from the bridge's config."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from carechain import envelope, topics
from carechain.config import BridgeConfig
from carechain.entries import ENTRY_EVENT, Entry, Registration, registration_entry
from carechain.events import Purchase, make_payload
from carechain.evidence import Evidence, EvidenceKind
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.bridge import Bridge
from chain_bridge.contract_admin import replay_ledger
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.store import EventCandidate, Ledger
from contract_rules import builtin_hashes
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND, SLASH
from contract_rules.genesis import read_genesis
from simulators.miners import CosignatureWatch, MinerProcess, clear_retained
from tests.test_miner_cli import send_events
from tests.test_miners_integration import wait_for

pytestmark = pytest.mark.integration
N_MINERS = 5
OPERATOR = Identity.from_seed(b"\x31" * 32)
PHARMACY_BOND = 10 * MIN_BOND["pharmacy"]


class DishonestGate(ContractGate):
    """An operator who patched the gate out: every event is appended, whatever the contracts say. Its own state
    still follows the rules (a refused leaf is void there too), as every miner's does."""

    def admit(self, index: int, candidate: EventCandidate) -> Entry | str | None:
        self.runtime.apply(Entry(ENTRY_EVENT, Entry.decode(candidate.leaf).cose))
        return None


def test_a_void_sale_is_evidenced_slashed_and_the_log_keeps_finalizing(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    log_key = Identity.generate()
    pharmacy, terminal, band = Identity.generate(), Identity.generate(), Identity.generate()
    genesis_path = tmp_path / "bridge" / "contracts" / "genesis.json"
    genesis_path.parent.mkdir(parents=True)
    miners: list[MinerProcess] = []
    for i in range(N_MINERS):
        miners.append(MinerProcess(tmp_path / f"miner{i}", broker.config, log_key.public_key,
                                   "--genesis", str(genesis_path)))
    allocations = {f"miner:{m.key.device_id}": MIN_BOND["miner"] for m in miners}
    allocations[f"pharmacy:{pharmacy.device_id}"] = PHARMACY_BOND
    genesis_path.write_text(json.dumps({"operators": {OPERATOR.device_id: OPERATOR.public_key.hex()},
                                        "allocations": allocations, "contracts": builtin_hashes()}))
    genesis = read_genesis(genesis_path)

    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    now = int(time.time() * 1000)
    setup = [ce.signed(OPERATOR, ce.PARTY_REGISTER, ce.PartyRegistration(role="miner", pk=m.key.public_key,
                                                                         name=f"m{i}", ts=now))
             for i, m in enumerate(miners)]
    setup += [ce.signed(m.key, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["miner"], nonce=1, ts=now)) for m in miners]
    setup += [ce.signed(OPERATOR, ce.PARTY_REGISTER, ce.PartyRegistration(role="pharmacy", pk=pharmacy.public_key,
                                                                         name="Main St", ts=now)),
              ce.signed(pharmacy, ce.BOND_POST, ce.BondPost(amount=PHARMACY_BOND, nonce=1, ts=now)),
              ce.clock_attest_entry(OPERATOR, now)]
    ledger.append_entries(setup)
    regs = [Registration(dev=terminal.device_id, pk=terminal.public_key, profile="pharmacy_terminal",
                         owner=pharmacy.device_id, site="s", ts=now),
            Registration(dev=band.device_id, pk=band.public_key, profile="heart_rate_band", owner="pt", site="s",
                         ts=now)]
    ledger.append_registrations([(registration_entry(OPERATOR, r), r) for r in regs])
    honest = ledger.size
    state = replay_ledger(ledger, genesis).state
    assert all(r == "ok" for _, r in state.results), state.results

    # The bridge's config names no miner: the ledger's five bonded miners decide finality.
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3)
    bridge = Bridge(cfg, broker.config, log_key, ledger, client_id=f"bridge-{tmp_path.name}",
                    contracts=DishonestGate(genesis, OPERATOR))
    watch = CosignatureWatch(broker.config, f"watch-{tmp_path.name}")
    evidence: list[Evidence] = []
    ready = threading.Event()
    client = connect_client(broker.config, f"devices-{tmp_path.name}", connected=ready,
                            subscriptions=[(topics.MINER_EVIDENCE_WILDCARD, 1)],
                            on_message=lambda _c, _u, m: evidence.append(Evidence.model_validate_json(m.payload))
                            if m.payload else None)
    try:
        bridge.start()
        assert bridge.wait_ready(30) and watch.connected.wait(30) and ready.wait(30)
        for m in miners:
            m.start()
        for m in miners:
            m.wait_ready()
        names = {m.name for m in miners}
        wait_for("the honest prefix to become final", lambda: any(s >= honest for s in watch.final_sizes()))

        sale = Purchase(item_code="70882-114-20", code_system="ndc", rx_only=True, quantity=1, price_minor=1250,
                        currency="USD", patient_token="pt-x", payment_method="card", rx_ref=None)
        payload = envelope.sign(terminal, make_payload(terminal.device_id, 0, int(time.time() * 1000), "purchase",
                                                       sale.model_dump(exclude_none=True)))
        client.publish(topics.events(terminal.device_id), payload, qos=1).wait_for_publish(10)
        wait_for("the refused sale to be anchored anyway", lambda: ledger.size == honest + 1)
        void_leaf = honest
        wait_for("every miner to publish void evidence",
                 lambda: {e.miner for e in evidence if e.kind == EvidenceKind.VOID} >= names)
        send_events(client, [band], range(4))  # the log grows on past the void sale
        wait_for("a checkpoint past the void sale to become final",
                 lambda: any(s > void_leaf + 1 for s in watch.final_sizes()))
    finally:
        for m in miners:
            m.stop()
        bridge.stop()
        watch.stop()
        client.disconnect()
        client.loop_stop()
        clear_retained(broker.config, f"clear-{tmp_path.name}",
                       [topics.CHECKPOINT, topics.FINAL_CHECKPOINT] +
                       [t(m.key.device_id) for m in miners for t in (topics.miner_cosignature, topics.miner_evidence,
                                                                     topics.miner_hello)])

    for ev in (e for e in evidence if e.miner in names and e.kind == EvidenceKind.VOID):
        assert ev.violation_leaf == void_leaf and ev.signed_by(bytes.fromhex(ev.miner_key))
    state = replay_ledger(ledger, genesis).state
    ledger.close()
    assert state.table("void")[str(void_leaf)]["reason"] == "rx_missing"
    assert state.table("rx") == {}  # void: the sale changed nothing the rules keep...
    record = state.table("bonds")[pharmacy.device_id]
    assert [void_leaf, "refused_sale"] in record["offences"]  # ...but the slash it proves, citing its leaf
    assert state.balance(f"bond:{pharmacy.device_id}") == PHARMACY_BOND - SLASH["refused_sale"]
    assert state.balance("pool:miners") == SLASH["refused_sale"]
