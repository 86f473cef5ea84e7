"""Protocol 2 at the edge: the agent seals each health reading under its (device, epoch) data key, anchors
the key's capsule in an epoch_key event ahead of the epoch's first reading, binds receipts to the COSE part
of what it sends, re-seals on `seq_reused`, deletes a spent epoch's key from its disk, and discloses only
weekly active-minute summaries to a wellness policy. Real crypto throughout; the bridge's own check stage
judges what the agent sends."""

from __future__ import annotations

import datetime
import hashlib
import time
from pathlib import Path

import pytest

from carechain import envelope
from carechain.config import AgentConfig, AgentDeviceConfig, Config, ConfigError, Limits
from carechain.events import validate_payload
from carechain.identity import Identity
from carechain.receipts import Receipt, Rejected
from carechain.reencryption import PreKey, owner_decrypt
from carechain.sealed import SealedError, ciphertext_hash, open_body, split_wire
from chain_bridge.ingest.check import Ingest
from chain_bridge.ledger.store import DeviceRecord, EventCandidate
from edge_agent.agent import Agent, AgentDevice
from edge_agent.assembly import assemble_agent
from edge_agent.outbox import Outbox, wire_digest
from edge_agent.sealing import RecordOwner, iso_week

DEV = Identity.from_seed(b"\x31" * 32)
OWNER_ID = Identity.from_seed(b"\x32" * 32)
OWNER_PRE = PreKey.from_seed(b"\x33" * 32)
OWNER = RecordOwner(OWNER_ID.device_id, OWNER_PRE.public_key)
BRIDGE = Identity.from_seed(b"\x34" * 32)
HOUR = 3_600_000
T0 = 1_780_000_000_000 // HOUR * HOUR  # the start of an epoch (one hour)
HR = {"bpm": 71, "rr_intervals_1024": [800, 810]}


def _agent(tmp_path: Path, *, wellness: str | None = None, protocol: int = 2) -> Agent:
    device = AgentDevice(DEV, None, OWNER, wellness)
    return Agent([device], Outbox(tmp_path / "outbox.db"), None, BRIDGE.public_key,  # type: ignore[arg-type]
                 protocol=protocol, epoch_ms=HOUR)


def _rows(agent: Agent) -> list[tuple[int, bytes]]:
    return [(p.seq, p.envelope) for p in agent.outbox.pending_after(0, 10_000)]


def _opened(wire: bytes) -> tuple[dict, bytes | None]:
    cose, ct = split_wire(wire)
    msg = envelope.parse(cose)
    assert msg.verify(DEV.public_key)
    return validate_payload(msg.payload).model_dump(), ct


def _sealed(wire: bytes) -> tuple[dict, bytes]:
    payload, ct = _opened(wire)
    assert ct is not None, "a sealed reading travels with its ciphertext"
    return payload, ct


def _check(wire: bytes, now_ms: int) -> object:
    """The bridge's own check stage on what the agent sends."""
    record = DeviceRecord(DEV.device_id, DEV.public_key, "heart_rate_band", OWNER_ID.device_id, "home", 0, None)
    return Ingest(Limits(), lambda dev: record if dev == DEV.device_id else None).check(DEV.device_id, wire, now_ms)


def test_the_first_reading_of_an_epoch_follows_its_epoch_key_and_is_sealed_to_the_owner(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert agent.record(DEV.device_id, [("heart_rate", HR)], T0 + 5) == [0, 1]  # epoch_key, then the reading
    agent.record(DEV.device_id, [("heart_rate", {"bpm": 72})], T0 + 1000)
    (s0, key_wire), (s1, reading), (s2, second) = _rows(agent)
    announced, ct0 = _opened(key_wire)
    assert (s0, announced["kind"], announced["v"], ct0) == (0, "epoch_key", 2, None)
    body = announced["body"]
    assert (body["epoch"], body["epoch_ms"], body["owner"]) == (T0 // HOUR, HOUR, OWNER_ID.device_id)
    data_key = owner_decrypt(OWNER_PRE, body["capsule"], body["key_ct"])
    assert agent.outbox.data_key(DEV.device_id, T0 // HOUR).data_key == data_key  # type: ignore[union-attr]

    payload, ct = _sealed(reading)
    assert payload["kind"] == "heart_rate" and payload["body"] == {"epoch": T0 // HOUR, "ct": ciphertext_hash(ct)}
    assert open_body(data_key, DEV.device_id, s1, T0 + 5, "heart_rate", T0 // HOUR, ct) == HR
    assert b"bpm" not in reading and b"bpm" not in second  # no reading leaves the device in clear
    assert ct[:12] != _sealed(second)[1][:12]  # a fresh nonce per reading
    assert agent.stats.epoch_keys == 1

    for seq, wire in ((s0, key_wire), (s1, reading)):
        verdict = _check(wire, T0 + 2000)
        assert isinstance(verdict, EventCandidate), verdict
        assert verdict.seq == seq and verdict.digest == wire_digest(wire)  # the bridge digests the COSE part


def test_a_restart_within_the_epoch_reuses_the_stored_key_and_a_new_epoch_announces_a_new_one(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.record(DEV.device_id, [("heart_rate", HR)], T0 + 5)
    agent.outbox.close()
    again = _agent(tmp_path)  # a restart: the key comes from the outbox database, not a second event
    assert again.record(DEV.device_id, [("heart_rate", HR)], T0 + 60_000) == [2]
    assert again.record(DEV.device_id, [("spo2", {"spo2_pct": 97.0})], T0 + HOUR + 1) == [3, 4]
    kinds = [_opened(w)[0]["kind"] for _, w in _rows(again)]
    assert kinds == ["epoch_key", "heart_rate", "heart_rate", "epoch_key", "spo2"]
    assert again.stats.epoch_keys == 1
    assert again.outbox.data_keys() == [(DEV.device_id, T0 // HOUR), (DEV.device_id, T0 // HOUR + 1)]


def test_purchases_stay_clear_under_protocol_2(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    sale = {"item_code": "0002-1433-80", "code_system": "ndc", "rx_only": False, "quantity": 1, "price_minor": 450,
            "currency": "EUR", "patient_token": "tok-1", "payment_method": "card"}
    agent.record(DEV.device_id, [("purchase", sale)], T0)
    [(_, wire)] = _rows(agent)
    payload, ct = _opened(wire)
    assert wire[:1] == b"\xd2" and ct is None  # a plain COSE_Sign1, readable by the contracts
    assert payload["v"] == 2 and payload["body"]["patient_token"] == "tok-1"
    assert agent.outbox.data_keys() == []  # no health reading, no key


def test_an_ok_receipt_deletes_only_when_it_names_the_cose_part_of_what_was_sent(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.record(DEV.device_id, [("heart_rate", HR), ("heart_rate", {"bpm": 90})], T0)
    rows = _rows(agent)
    receipt = Receipt(DEV.device_id, T0)
    receipt.acknowledge(0, 10, hashlib.sha256(split_wire(rows[0][1])[0]).digest())
    receipt.acknowledge(1, 11, wire_digest(rows[1][1]))
    receipt.acknowledge(2, 12, hashlib.sha256(rows[2][1]).digest())  # the whole wire: not what is anchored
    agent._apply_receipt(DEV.device_id, receipt)
    assert agent.stats.acked == 2 and agent.stats.receipt_mismatches == 1
    assert agent.outbox.depth() == 0 and agent.outbox.quarantined() == 1


def test_a_seq_reused_refusal_re_seals_the_reading_under_the_new_seq(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.record(DEV.device_id, [("heart_rate", HR)], T0 + 7)
    _, old = _rows(agent)[1]
    refusal = Receipt(DEV.device_id, T0, rejected=[Rejected(1, "seq_reused", "x", False, wire_digest(old))],
                      highest_seq=40)
    agent._apply_receipt(DEV.device_id, refusal)
    assert agent.stats.resigned == 1
    (_, key_wire), (seq, new) = _rows(agent)
    assert seq == 41
    payload, ct = _sealed(new)
    key = agent.outbox.data_key(DEV.device_id, T0 // HOUR).data_key  # type: ignore[union-attr]
    assert payload["seq"] == 41 and payload["body"]["ct"] == ciphertext_hash(ct)
    assert open_body(key, DEV.device_id, 41, T0 + 7, "heart_rate", T0 // HOUR, ct) == HR
    with pytest.raises(SealedError):  # the old ciphertext is bound to the old seq
        open_body(key, DEV.device_id, 41, T0 + 7, "heart_rate", T0 // HOUR, _sealed(old)[1])
    assert isinstance(_check(new, T0 + 1000), EventCandidate)


def _ack_all(agent: Agent) -> None:
    receipt = Receipt(DEV.device_id, 0)
    for seq, wire in _rows(agent):
        receipt.acknowledge(seq, seq, wire_digest(wire))
    agent._apply_receipt(DEV.device_id, receipt)


def _disk_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.glob("outbox.db*"))


def test_a_spent_epochs_key_is_deleted_from_the_disk_once_its_events_are_receipted(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.record(DEV.device_id, [("heart_rate", HR)], T0)
    key = agent.outbox.data_key(DEV.device_id, T0 // HOUR).data_key  # type: ignore[union-attr]
    assert key in _disk_bytes(tmp_path)
    agent.forget_spent_keys(T0 + HOUR + 1, force=True)
    assert agent.outbox.data_keys() != []  # the epoch is over, but its events still wait for a receipt
    _ack_all(agent)
    agent.forget_spent_keys(T0 + HOUR - 1, force=True)
    assert agent.outbox.data_keys() != []  # receipted, but the epoch is not over: readings still come
    agent.record(DEV.device_id, [("heart_rate", HR)], T0 + HOUR + 5)  # a new epoch: a new key, the old one goes
    assert agent.outbox.data_keys() == [(DEV.device_id, T0 // HOUR + 1)] and agent.stats.keys_forgotten == 1
    assert agent.stats.epoch_keys == 2
    assert key not in _disk_bytes(tmp_path)  # overwritten, not left in the page beside the new key or in the WAL


def _monday(week_offset: int) -> int:
    monday = datetime.datetime(2026, 3, 2, 12, tzinfo=datetime.UTC) + datetime.timedelta(weeks=week_offset)
    return int(monday.timestamp() * 1000)


def test_a_wellness_device_discloses_one_summary_per_completed_week(tmp_path: Path) -> None:
    agent = _agent(tmp_path, wellness="wellness-2026")
    day = 86_400_000
    for d, minutes in enumerate([30, 45, 0, 60]):
        agent.record(DEV.device_id, [("activity", {"steps": 5000, "active_minutes": minutes})], _monday(0) + d * day)
    assert agent.stats.weekly_summaries == 0  # the week is not over
    agent.outbox.close()
    agent = _agent(tmp_path, wellness="wellness-2026")  # the tally survives a restart
    agent.record(DEV.device_id, [("heart_rate", HR)], _monday(1))
    agent.record(DEV.device_id, [("activity", {"steps": 10, "active_minutes": 5})], _monday(1) + day)
    summaries = [p for p in (_opened(w)[0] for _, w in _rows(agent)) if p["kind"] == "weekly_activity"]
    assert [s["body"] for s in summaries] == [{"week": iso_week(_monday(0)), "active_minutes": 135,
                                               "policy": "wellness-2026"}]
    assert iso_week(_monday(0)) == "2026-W10" and summaries[0]["v"] == 2
    assert agent.stats.weekly_summaries == 1
    assert isinstance(_check(next(w for _, w in _rows(agent) if _opened(w)[0]["kind"] == "weekly_activity"),
                             _monday(1) + day), EventCandidate)


def test_protocol_1_signs_readings_in_clear_as_before(tmp_path: Path) -> None:
    agent = _agent(tmp_path, protocol=1)
    agent.record(DEV.device_id, [("heart_rate", HR)], T0)
    [(_, wire)] = _rows(agent)
    payload, ct = _opened(wire)
    assert payload["v"] == 1 and payload["body"]["bpm"] == 71 and ct is None
    assert agent.outbox.data_keys() == []
    with pytest.raises(ValueError, match="wellness policy"):
        _agent(tmp_path / "w", wellness="p", protocol=1)


def test_protocol_2_config_names_a_health_device_without_its_owner(tmp_path: Path) -> None:
    key = tmp_path / "hr.key"
    Identity.generate().save(key)
    device = {"key_file": str(key), "profile": "heart_rate_band"}
    bridge = BRIDGE.public_key.hex()
    cfg = Config(agent=AgentConfig.model_validate({"data_dir": str(tmp_path / "a"), "bridge_public_key": bridge,
                                                   "devices": [device]}))
    assert cfg.agent.protocol == 2 and cfg.agent.epoch_ms == HOUR
    with pytest.raises(ConfigError, match=r"heart_rate_band.*owner_pre_key"):
        assemble_agent(cfg)
    with pytest.raises(ValueError, match="go together"):
        AgentDeviceConfig.model_validate({**device, "owner": OWNER_ID.device_id})
    with pytest.raises(ValueError, match="needs protocol 2"):
        AgentConfig.model_validate({"protocol": 1, "devices": [{**device, "wellness_policy": "w"}]})
    owned = {**device, "owner": OWNER_ID.device_id, "owner_pre_key": OWNER_PRE.public_key.hex(),
             "wellness_policy": "wellness-2026"}
    cfg = Config(agent=AgentConfig.model_validate({"data_dir": str(tmp_path / "a"), "bridge_public_key": bridge,
                                                   "devices": [owned], "epoch_minutes": 15}))
    assembled = assemble_agent(cfg)
    try:
        agent = assembled.agent
        dev = next(iter(agent.devices.values()))
        assert agent.protocol == 2 and agent.epoch_ms == 15 * 60_000
        assert dev.owner == OWNER and dev.wellness_policy == "wellness-2026"
    finally:
        assembled.close()


def test_a_late_reading_of_a_spent_epoch_is_sealed_under_the_current_key_not_a_second_epoch_key(
        tmp_path: Path) -> None:
    """A second epoch_key for an epoch whose key is anchored would be refused: the reading would be lost."""
    agent = _agent(tmp_path)
    agent.record(DEV.device_id, [("heart_rate", HR)], T0)
    _ack_all(agent)
    agent.forget_spent_keys(T0 + HOUR + 1, force=True)
    assert agent.outbox.data_keys() == [] and agent.outbox.epoch_spent(DEV.device_id, T0 // HOUR)
    before = {seq for seq, _ in _rows(agent)}
    agent.record(DEV.device_id, [("heart_rate", HR)], T0 + 10)  # synced late from the band's memory
    new = [_opened(wire)[0] for seq, wire in _rows(agent) if seq not in before]
    current = int(time.time() * 1000) // HOUR
    assert [p["kind"] for p in new] == ["epoch_key", "heart_rate"]
    assert new[0]["body"]["epoch"] == current != T0 // HOUR and new[1]["body"]["epoch"] == current
    assert new[1]["ts"] == T0 + 10 and agent.stats.sealed_late == 1


def test_an_epoch_key_refused_because_its_epoch_is_anchored_re_keys_under_the_next_key_epoch(tmp_path: Path) -> None:
    """A lost or restored outbox makes a second key for an anchored epoch: the agent retires it, never quarantines
    its readings, and seals from then on under the next key epoch it can announce."""
    agent = _agent(tmp_path)
    now = int(time.time() * 1000)
    agent.record(DEV.device_id, [("heart_rate", HR)], now)  # seq 0: epoch_key, seq 1: the reading
    epoch = now // HOUR
    refusal = Receipt(DEV.device_id, now, rejected=[Rejected(0, "contract:epoch_key_exists", "x", False, b"")])
    agent._apply_receipt(DEV.device_id, refusal)
    assert agent.stats.rekeyed == 1 and agent.outbox.quarantined() == 0
    assert agent.outbox.epoch_spent(DEV.device_id, epoch) and agent.outbox.data_key(DEV.device_id, epoch) is None
    before = {seq for seq, _ in _rows(agent)}
    agent.record(DEV.device_id, [("heart_rate", HR)], now + 1)
    new = [_opened(wire)[0] for seq, wire in _rows(agent) if seq not in before]
    assert [(p["kind"], p["body"]["epoch"]) for p in new] == [("epoch_key", epoch + 1), ("heart_rate", epoch + 1)]
