"""Five `carechain miner` processes witness a running bridge on a real mosquitto: events flow, every miner
re-executes the contracts and cosigns, and the bridge publishes a final checkpoint at 3-of-5."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from carechain import envelope, topics
from carechain.config import BridgeConfig
from carechain.cosignature import Cosigner
from carechain.entries import Registration, registration_entry
from carechain.events import make_payload
from carechain.identity import Identity
from carechain.proofs import verify_checkpoint
from carechain.transport import connect_client
from chain_bridge.bridge import Bridge
from chain_bridge.finality import FinalityPolicy, is_final_note
from chain_bridge.ledger.store import Ledger
from contract_rules import builtin_hashes
from simulators.miners import CosignatureWatch, MinerProcess, clear_retained
from tests.test_miners_integration import wait_for
from tests.test_pipeline import register

pytestmark = pytest.mark.integration
N_MINERS, THRESHOLD = 5, 3
OPERATOR = Identity.from_seed(b"\x21" * 32)


def write_genesis(path: Path) -> Path:
    """The contracts genesis as the bridge writes it: the operator who signs registrations, the code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"operators": {OPERATOR.device_id: OPERATOR.public_key.hex()}, "allocations": {},
                                "contracts": builtin_hashes()}))
    return path


@pytest.fixture
def fleet(tmp_path: Path, broker) -> Iterator[tuple[Bridge, list[MinerProcess], CosignatureWatch]]:  # type: ignore[no-untyped-def]
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto")
    log_key = Identity.generate()
    genesis = write_genesis(tmp_path / "bridge" / "contracts" / "genesis.json")
    miners = [MinerProcess(tmp_path / f"miner{i}", broker.config, log_key.public_key, "--genesis", str(genesis))
              for i in range(N_MINERS)]
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.3,
                       miners=[m.registered for m in miners], finality_threshold=THRESHOLD)
    bridge = Bridge(cfg, broker.config, log_key, Ledger(tmp_path / "bridge" / "ledger.db"),
                    client_id=f"bridge-{tmp_path.name}")
    watch = CosignatureWatch(broker.config, f"watch-{tmp_path.name}")
    try:
        bridge.start()
        assert bridge.wait_ready(30) and watch.connected.wait(30)
        for m in miners:
            m.start()
        for m in miners:
            assert m.wait_ready()["public_key"] == m.key.public_key.hex()
        yield bridge, miners, watch
    finally:
        for m in miners:
            m.stop()
        bridge.stop()
        bridge.ledger.close()
        watch.stop()
        clear_retained(broker.config, f"clear-{tmp_path.name}",
                       [topics.CHECKPOINT, topics.FINAL_CHECKPOINT] +
                       [t(m.key.device_id) for m in miners for t in (topics.miner_cosignature, topics.miner_evidence)])


def send_events(client: mqtt.Client, devices: list[Identity], seqs: range) -> None:
    now = int(time.time() * 1000)
    for seq in seqs:
        for d in devices:
            payload = envelope.sign(d, make_payload(d.device_id, seq, now, "heart_rate", {"bpm": 60 + seq % 40}))
            client.publish(topics.events(d.device_id), payload, qos=1).wait_for_publish(10)


def test_five_miner_processes_cosign_and_the_bridge_publishes_a_final_checkpoint(
        fleet: tuple[Bridge, list[MinerProcess], CosignatureWatch], broker, tmp_path: Path,  # type: ignore[no-untyped-def]
        request: pytest.FixtureRequest) -> None:
    bridge, miners, watch = fleet
    devices = [Identity.generate() for _ in range(3)]
    with bridge.ledger_lock:
        register(bridge.ledger, devices, OPERATOR)
    ready = threading.Event()
    device_client = connect_client(broker.config, f"devices-{tmp_path.name}", connected=ready)
    request.addfinalizer(lambda: (device_client.disconnect(), device_client.loop_stop()))
    assert ready.wait(30)
    send_events(device_client, devices, range(10))
    total = len(devices) * 11  # a registration and 10 events each
    wait_for("every event to be anchored", lambda: bridge.ledger.size == total)
    wait_for("the last checkpoint to become final", lambda: total in watch.final_sizes())
    wait_for("every miner to cosign the last checkpoint", lambda: len(watch.miners_at(total)) == N_MINERS)

    final = next(note for _, size, note in watch.finals if size == total)
    assert verify_checkpoint(final, bridge.log_key.public_key).tree_size == total
    policy = FinalityPolicy(tuple(Cosigner(m.name, m.key.public_key) for m in miners), THRESHOLD)
    assert is_final_note(final, policy)
    assert bridge.stats.final_checkpoints >= 1

    # A miner restarted from its data dir replays the tree it cosigned into the contracts, then goes on.
    restarted = miners[0]
    assert restarted.stop() is not None
    assert (restarted.data_dir / "contracts.snapshot").exists()  # written at stop: the restart replays nothing
    send_events(device_client, devices, range(10, 15))
    grown = total + len(devices) * 5
    restarted.start()
    restarted.wait_ready()
    wait_for("the restarted miner to cosign the grown log", lambda: restarted.name in watch.miners_at(grown))
    wait_for("the grown log to become final", lambda: grown in watch.final_sizes())
    for m in miners:
        stats = m.stop()
        assert stats is not None and int(stats.get("cosigned", 0)) >= 1, m.stderr()[-2000:]
        assert not any(k.startswith("refused_violation") for k in stats), stats
        assert "re-executed" in m.stderr()
        assert "never connected" not in m.stderr()  # it did, then disconnected at its stop


def test_a_dishonest_bridge_appending_an_rx_sale_without_prescription_gets_void_evidence_and_is_cosigned_on(
        fleet: tuple[Bridge, list[MinerProcess], CosignatureWatch], broker, tmp_path: Path,  # type: ignore[no-untyped-def]
        request: pytest.FixtureRequest) -> None:
    """The fleet's bridge runs without its contract gate: it anchors whatever a terminal sends. The miners
    re-execute the contracts: the violating sale is *void* (it changes no contract state), so they cosign on
    past it (the log keeps finalizing), and each publishes signed `void` evidence that an auditor
    re-executing the contracts confirms."""
    from carechain.events import Purchase
    from carechain.evidence import Evidence, EvidenceKind, verify_evidence
    from contract_rules import ContractWitness
    from contract_rules import transactions as ce
    from contract_rules.genesis import read_genesis

    bridge, miners, watch = fleet
    pharmacy, terminal, band = Identity.generate(), Identity.generate(), Identity.generate()
    now = int(time.time() * 1000)
    with bridge.ledger_lock:
        bridge.ledger.append_entries([ce.signed(OPERATOR, ce.PARTY_REGISTER, ce.PartyRegistration(
            role="pharmacy", pk=pharmacy.public_key, name="Main St", ts=now))])
        items = []
        for dev, profile, owner in ((terminal, "pharmacy_terminal", pharmacy.device_id),
                                    (band, "heart_rate_band", "patient:t")):
            reg = Registration(dev=dev.device_id, pk=dev.public_key, profile=profile, owner=owner, site="s", ts=now)
            items.append((registration_entry(OPERATOR, reg), reg))
        bridge.ledger.append_registrations(items)
    evidence: list[Evidence] = []
    ready = threading.Event()
    client = connect_client(broker.config, f"devices-{tmp_path.name}", connected=ready,
                            subscriptions=[(topics.MINER_EVIDENCE_WILDCARD, 1)],
                            on_message=lambda _c, _u, m: evidence.append(Evidence.model_validate_json(m.payload)))
    request.addfinalizer(lambda: (client.disconnect(), client.loop_stop()))
    assert ready.wait(30)

    send_events(client, [band], range(5))
    honest = 3 + 5
    names = {m.name for m in miners}  # a shared broker may hold other tests' retained messages
    wait_for("every miner to cosign the honest prefix", lambda: watch.miners_at(honest) >= names)

    sale = Purchase(item_code="70882-114-20", code_system="ndc", rx_only=True, quantity=1, price_minor=1250,
                    currency="USD", patient_token="pt-x", payment_method="card", rx_ref=None)
    payload = envelope.sign(terminal, make_payload(terminal.device_id, 0, now, "purchase", sale.model_dump()))
    client.publish(topics.events(terminal.device_id), payload, qos=1).wait_for_publish(10)
    wait_for("the violating sale to be anchored", lambda: bridge.ledger.size == honest + 1)
    wait_for("every miner to publish evidence", lambda: {e.miner for e in evidence} >= names)
    evidence = [e for e in evidence if e.miner in names]
    send_events(client, [band], range(5, 8))  # the log grows on past the void sale
    wait_for("every miner to cosign a checkpoint past the void sale",
             lambda: any(size >= honest + 4 and watch.miners_at(size) >= names for size in list(watch.checkpoints)))

    keys = {m.key.public_key.hex() for m in miners}
    for ev in evidence:
        assert ev.kind == EvidenceKind.VOID and ev.violation_leaf == honest
        assert ev.miner_key in keys and ev.signed_by(bytes.fromhex(ev.miner_key))
    auditor = ContractWitness(read_genesis(tmp_path / "bridge" / "contracts" / "genesis.json"))
    old = verify_checkpoint(evidence[0].old_checkpoint or "", bridge.log_key.public_key).tree_size
    auditor(0, old, list(bridge.ledger.leaves(0, old)))  # the auditor's own replay up to the evidence's range
    assert "void: leaf" in verify_evidence(evidence[0], bridge.log_key.public_key, auditor)
    for m in miners:
        stats = m.stop()
        assert stats is not None and int(stats.get("void_evidence", 0)) >= 1, stats
