"""Finality from the ledger: the bridge counts the active miners the contracts compute, records final checkpoints
as `checkpoint.final` entries at a bounded cadence, and readers of the log (`rx verify`, receipts) say what is final.

Real keys, a real ledger file, the real contract gate and rules; the bridge is driven without a broker
(`_client` stays None except where a test records what it would publish).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carechain import envelope, topics
from carechain.checkpoint import parse_note
from carechain.cli import app
from carechain.config import BridgeConfig, BrokerConfig, MinerKey
from carechain.cosignature import cosign
from carechain.entries import CHECKPOINT_FINAL, Entry
from carechain.identity import Identity
from carechain.miner_messages import CosignatureMessage
from carechain.receipts import open_receipt
from chain_bridge.bridge import Bridge
from chain_bridge.contract_admin import RxFile, replay_ledger, submit
from chain_bridge.contract_gate import ContractGate
from chain_bridge.finality import miner_cosigner
from chain_bridge.registry import contract_genesis, ledger_path, log_key, operator_key
from contract_rules import transactions as ce
from contract_rules.bonds import MIN_BOND
from contract_rules.miners import final_size
from tests.conftest import LedgerFactory

FUNDS = 100_000
T0 = 1_767_225_600_000


class World:
    """A bridge data dir with three registered, bonded miners, a fourth funded but not yet bonded, a prescriber."""

    def __init__(self, root: Path, ledgers: LedgerFactory) -> None:
        self.dir = root
        self.ledgers = ledgers
        self.miners = [Identity.generate() for _ in range(4)]
        self.prescriber = Identity.generate()
        self.genesis = contract_genesis(root, {f"miner:{m.device_id}": FUNDS for m in self.miners})
        self.operator, self.log = operator_key(root), log_key(root)
        self.ledger = ledgers(ledger_path(root))
        self.nonce = 0
        regs = [ce.party_registration_entry(self.operator, ce.PartyRegistration(
            role="miner", pk=m.public_key, name=f"miner {i}", ts=T0)) for i, m in enumerate(self.miners)]
        regs.append(ce.party_registration_entry(self.operator, ce.PartyRegistration(
            role="prescriber", pk=self.prescriber.public_key, name="Dr. F", ts=T0)))
        submit(self.ledger, self.genesis, regs + [self.bond(m) for m in self.miners[:3]])

    def bond(self, miner: Identity) -> Entry:
        self.nonce += 1
        return ce.signed(miner, ce.BOND_POST, ce.BondPost(amount=MIN_BOND["miner"], nonce=self.nonce, ts=T0))

    def bridge(self, **cfg: Any) -> Bridge:
        gate = ContractGate(self.genesis, self.operator)
        return Bridge(BridgeConfig(data_dir=self.dir, contracts=True, **cfg), BrokerConfig(), self.log, self.ledger,
                      contracts=gate)

    def cosignature(self, miner: Identity, note: str) -> bytes:
        body, _ = parse_note(note)
        cosigner = miner_cosigner(miner.device_id, miner.public_key)
        line = cosign(body, cosigner, miner.sign, 1_767_225_600).line()
        size = int(body.split("\n")[1])
        msg = CosignatureMessage(miner=cosigner.name, public_key=miner.public_key.hex(), tree_size=size,
                                 checkpoint=note, cosignature=line)
        return msg.signed(miner).model_dump_json().encode()

    def state(self) -> Any:
        return replay_ledger(self.ledger, self.genesis).state


@pytest.fixture
def w(tmp_path: Path, ledger_factory: LedgerFactory) -> Any:
    world = World(tmp_path / "bridge", ledger_factory)
    yield world
    world.ledger.close()


def _size(note: str) -> int:
    return int(parse_note(note)[0].split("\n")[1])


def test_a_majority_of_the_ledgers_active_miners_makes_a_checkpoint_final_not_the_config(w: World) -> None:
    outsider = Identity.generate()  # listed in bridge.miners, never registered on the ledger
    bridge = w.bridge(miners=[MinerKey(name=f"carechain.miner/{outsider.device_id}",
                                       public_key=outsider.public_key.hex())], finality_threshold=1)
    assert bridge.finality is not None and bridge.finality.policy is not None
    assert sorted(c.name for c in bridge.finality.policy.cosigners) == sorted(
        f"carechain.miner/{m.device_id}" for m in w.miners[:3])  # the bonded three, not the config's key
    assert bridge.finality.policy.threshold == 2
    note = bridge.maybe_checkpoint()
    assert note is not None
    # The config's threshold of 1 no longer decides; miner 3 is registered but not bonded: not active.
    bridge._on_cosignature(w.cosignature(outsider, note), outsider.device_id)
    bridge._on_cosignature(w.cosignature(w.miners[3], note), w.miners[3].device_id)
    bridge._on_cosignature(w.cosignature(w.miners[0], note), w.miners[0].device_id)
    assert bridge.final_size() == -1
    bridge._on_cosignature(w.cosignature(w.miners[1], note), w.miners[1].device_id)
    assert bridge.final_size() == _size(note) == w.ledger.size


def test_the_miner_set_follows_the_ledger_as_miners_bond(w: World) -> None:
    bridge = w.bridge()
    submit(w.ledger, w.genesis, [w.bond(w.miners[3])])  # appended by another process (a CLI)
    bridge.miner_refresh_s = 0.0
    bridge.refresh_miners()
    assert bridge.finality is not None and bridge.finality.policy is not None
    assert len(bridge.finality.policy.cosigners) == 4 and bridge.finality.policy.threshold == 3
    note = bridge.maybe_checkpoint()
    assert note is not None
    for miner in w.miners[:2]:
        bridge._on_cosignature(w.cosignature(miner, note), miner.device_id)
    assert bridge.final_size() == -1  # 2 of 4 is no majority
    bridge._on_cosignature(w.cosignature(w.miners[3], note), w.miners[3].device_id)  # the newly bonded miner counts
    assert bridge.final_size() == _size(note)


def test_a_final_checkpoint_is_recorded_once_checked_by_the_rules_and_an_idle_log_stops_growing(w: World) -> None:
    bridge = w.bridge()
    note = bridge.maybe_checkpoint()
    assert note is not None
    assert bridge.record_final() is None  # nothing final yet
    for miner in w.miners[:2]:
        bridge._on_cosignature(w.cosignature(miner, note), miner.device_id)
    index = bridge.record_final()
    assert index == _size(note)  # the record is the next leaf
    entry = Entry.decode(w.ledger.entry(index))
    assert entry.type == CHECKPOINT_FINAL
    state = w.state()
    assert [result for i, result in state.results if i == index] == ["ok"]
    assert final_size(state) == _size(note)
    recorded = envelope.parse(entry.cose).payload["note"]
    assert parse_note(recorded)[0] == parse_note(note)[0]  # the log's note, with the cosignatures that made it final
    assert bridge.record_final() is None  # at most one per `final_record_every_s`
    # The checkpoint that covers only the record becomes final too, and is not recorded again.
    bridge.final_record_every_s = 0.0
    again = bridge.maybe_checkpoint()
    assert again is not None and _size(again) == index + 1
    for miner in w.miners[:2]:
        bridge._on_cosignature(w.cosignature(miner, again), miner.device_id)
    assert bridge.final_size() == index + 1
    assert bridge.record_final() is None
    assert w.ledger.size == index + 1
    assert bridge.stats.final_recorded == 1


def test_a_recorded_note_without_a_majority_is_not_taken_as_final(w: World) -> None:
    bridge = w.bridge()
    note = bridge.maybe_checkpoint()
    assert note is not None
    for miner in w.miners[:2]:
        bridge._on_cosignature(w.cosignature(miner, note), miner.device_id)
    assert bridge.record_final() is not None
    # A dishonest operator records a larger checkpoint that only one of the three active miners cosigned.
    later = bridge.maybe_checkpoint()
    assert later is not None
    body, _ = parse_note(later)
    one = cosign(body, miner_cosigner(w.miners[0].device_id, w.miners[0].public_key), w.miners[0].sign, 1).line()
    w.ledger.append_entries([ce.signed(w.operator, ce.CHECKPOINT_FINAL, ce.CheckpointFinal(note=later + one))])
    state = w.state()
    assert [result for i, result in state.results if i == w.ledger.size - 1] != ["ok"]  # void on every replica
    assert final_size(state) == _size(note)  # the earlier, genuinely final one


class _Published:
    """Stands in for the paho client: what the bridge publishes, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.messages.append((topic, payload))


def test_devices_hear_on_their_receipt_topic_when_their_leaves_become_final(w: World) -> None:
    bridge = w.bridge()
    published = _Published()
    bridge._client = published  # type: ignore[assignment]
    early, late = Identity.generate().device_id, Identity.generate().device_id
    bridge._awaiting_final.update({early: w.ledger.size - 1, late: w.ledger.size + 5})
    note = bridge.maybe_checkpoint()
    assert note is not None
    for miner in w.miners[:2]:
        bridge._on_cosignature(w.cosignature(miner, note), miner.device_id)
    receipts = [(t, p) for t, p in published.messages if t.endswith("/rcpt")]
    assert [t for t, _ in receipts] == [topics.receipts(early)]
    receipt = open_receipt(receipts[0][1], w.log.public_key, early)
    assert receipt.ok == [] and receipt.final_size == _size(note) and receipt.is_final(_size(note) - 1)
    assert bridge._awaiting_final == {late: w.ledger.size + 5}


def test_rx_verify_says_final_once_a_recorded_final_checkpoint_covers_the_anchor(w: World) -> None:
    if w.ledgers.backend != "sqlite":
        pytest.skip("`carechain rx verify` opens the ledger by its file until carechain/cli/proofs.py uses "
                    "open_bridge_ledger")
    rx = ce.Prescription(prescriber=w.prescriber.device_id, patient_token="pt-f", drug_code="70882-114-20",
                         code_system="ndc", quantity=1, refills=0, expires_ms=T0 + 10**12, controlled=False,
                         issued_ms=T0, nonce=b"\x01" * 16)
    submit(w.ledger, w.genesis, [ce.signed(w.prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, T0))])
    rx_file = w.dir.parent / "rx.json"
    RxFile(rx, ce.sign_prescription(w.prescriber, rx), w.prescriber.public_key).write(rx_file)

    def verify() -> dict[str, Any]:
        result = CliRunner().invoke(app, ["rx", "verify", str(rx_file), "--data-dir", str(w.dir), "--json"])
        assert result.exit_code == 0, result.output
        out: dict[str, Any] = json.loads(result.output)
        return out

    before = verify()
    assert before["anchored"] and before["final"] is False and before["final_tree_size"] == 0
    bridge = w.bridge()
    note = bridge.maybe_checkpoint()
    assert note is not None
    for miner in w.miners[:2]:
        bridge._on_cosignature(w.cosignature(miner, note), miner.device_id)
    assert bridge.record_final() is not None
    after = verify()
    assert after["final"] is True and after["final_tree_size"] == _size(note) > after["anchor_leaf"]
