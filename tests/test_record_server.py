"""The bridge's record server: sealed readings only for the requester of a final, usable access record.

The ledger is a real one built from the access contract's test world (real umbral capsules and key
fragments, sealed boxes, checkpoint notes cosigned by miner keys); the pages are decoded with the
requester's decoder and every reading is checked the way a requester checks it. The last test runs the
whole path through a real broker and bridge, with the test playing the miners that make a checkpoint final.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import pytest
from test_contracts_access import HOUR, AccessWorld
from test_contracts_world import DAY, T0

from carechain import envelope, topics
from carechain.access import parse_signed_records_page, sign_records_request
from carechain.config import BridgeConfig
from carechain.cosignature import Cosigner, cosign
from carechain.credentials import load_mqtt_credentials
from carechain.entries import ENTRY_EVENT, ENTRY_REGISTER, Entry, Registration, event_entry
from carechain.events import make_sealed_payload
from carechain.identity import Identity
from carechain.miner_messages import CosignatureMessage
from carechain.sealed import ciphertext_hash, open_body, seal_body
from chain_bridge.bridge import Bridge
from chain_bridge.broker.acl import miner_user, party_user
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.store import Appended, EventCandidate, Ledger
from chain_bridge.record_server import Answer, RecordServer, Refusal
from contract_rules import transactions as ce
from simulators.mosquitto import mosquitto_binary
from tests.locked_broker import BRIDGE, Conn, login, start_locked_broker, wait_until

if TYPE_CHECKING:
    from tests.conftest import TestBroker

E0 = T0 // HOUR  # the first granted epoch: the request covers [T0, T0 + 3h]
NOW = T0 + 2 * HOUR


@dataclass
class Deployment:
    world: AccessWorld
    ledger: Ledger
    grant: int
    in_scope: list[int]  # leaf indexes of the readings the grant opens
    cts: dict[int, bytes]


def seal(world: AccessWorld, seq: int, ts: int, kind: str, body: dict) -> tuple[Entry, bytes]:
    dev = world.band
    epoch = ts // HOUR
    ct = seal_body(world.data_keys[(dev.device_id, epoch)], seq.to_bytes(12, "big"), dev.device_id, seq, ts, kind,
                   epoch, body)
    cose = envelope.sign(dev, make_sealed_payload(dev.device_id, seq, ts, kind, epoch, ciphertext_hash(ct)))
    return event_entry(cose), ct


def build(path: Path) -> Deployment:
    """Epoch keys for E0-1 .. E0+3, readings in each (heart rate, and one SpO2 the grant does not cover), a
    request and its grant; then the same entries, in order, into a real ledger."""
    w = AccessWorld()
    cts: dict[int, bytes] = {}
    in_scope: list[int] = []
    for epoch in range(E0 - 1, E0 + 4):
        assert w.epoch_key(epoch) == "ok"
        for minute in (1, 30, 59):
            ts = epoch * HOUR + minute * 60_000
            seq = w._seq[w.band.device_id]
            w._seq[w.band.device_id] += 1
            entry, ct = seal(w, seq, ts, "heart_rate", {"bpm": 60 + minute})
            assert w.add(entry) == "ok"
            cts[w.last_index] = ct
            if T0 <= ts <= T0 + 3 * HOUR:
                in_scope.append(w.last_index)
        seq = w._seq[w.band.device_id]
        w._seq[w.band.device_id] += 1
        entry, ct = seal(w, seq, epoch * HOUR + 10 * 60_000, "spo2", {"spo2_pct": 97})
        assert w.add(entry) == "ok"
        cts[w.last_index] = ct
    _, request = w.request()
    result, grant = w.grant(request)
    assert result == "ok"
    ledger = Ledger(path)
    for index, entry in enumerate(w.entries):
        if entry.type == ENTRY_REGISTER:
            reg = Registration.model_validate(envelope.parse(entry.cose).payload)
            got = ledger.append_registrations([(entry, reg)])
        elif entry.type == ENTRY_EVENT:
            p = envelope.parse(entry.cose).payload
            sealed_ct = cts.get(index)
            [appended] = ledger.append_events([EventCandidate(
                p["dev"], p["seq"], entry.encode(), b"", p["kind"], version=p["v"], ct=sealed_ct,
                epoch=p["body"]["epoch"] if sealed_ct is not None else None)])
            assert isinstance(appended, Appended)
            got = [appended.index]
        else:
            got = ledger.append_entries([entry])
        assert got == [index]
    return Deployment(w, ledger, grant, in_scope, cts)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = build(tmp_path / "ledger.db")
    yield d
    d.ledger.close()


def server(d: Deployment, final: int | None = None, now: int = NOW, *, max_packet_bytes: int = 1 << 20,
           requests_per_s: float = 20.0, burst: int = 64) -> RecordServer:
    size = d.ledger.size if final is None else final
    return RecordServer(d.ledger.path, d.world.genesis, lambda: size, d.world.operator, clock_ms=lambda: now,
                        max_packet_bytes=max_packet_bytes, requests_per_s=requests_per_s, burst=burst)


def rs_signer(rs: RecordServer) -> Identity:
    return rs._signer  # the key the server signs its pages with


def fetch_all(rs: RecordServer, requester: Identity, grant: int) -> list[bytes]:
    pages: list[bytes] = []
    while True:
        answer = rs.handle(sign_records_request(requester, grant, len(pages)))
        assert isinstance(answer, Answer), answer
        assert answer.topic == topics.party_inbox(requester.device_id)
        pages += answer.pages
        if parse_signed_records_page(pages[-1], {rs_signer(rs).device_id: rs_signer(rs).public_key}).last:
            return pages


def check_pages(d: Deployment, pages: list[bytes], bridge_keys: dict[str, bytes] | None = None) -> None:
    """What a requester checks: the records in scope, each ciphertext anchored by its signed event and
    opening under its epoch's key to the reading; the granted epochs' keys; the device's registration."""
    decoded = [parse_signed_records_page(p, bridge_keys or dict(d.world.genesis.operators)) for p in pages]
    assert [p.page for p in decoded] == list(range(len(pages)))
    assert [p.last for p in decoded] == [False] * (len(pages) - 1) + [True]
    records = [r for p in decoded for r in p.records]
    assert [r.index for r in records] == d.in_scope
    for r in records:
        assert r.cose == Entry.decode(d.ledger.entry(r.index)).cose and r.ct == d.cts[r.index]
        payload = envelope.parse(r.cose).payload
        assert payload["kind"] == "heart_rate" and ciphertext_hash(r.ct) == payload["body"]["ct"]
        body = open_body(d.world.data_keys[(payload["dev"], payload["body"]["epoch"])], payload["dev"],
                         payload["seq"], payload["ts"], payload["kind"], payload["body"]["epoch"], r.ct)
        assert 60 < body["bpm"] < 120
    epochs = [envelope.parse(c).payload for p in decoded for c in p.epochs]
    assert [(e["kind"], e["body"]["epoch"]) for e in epochs] == [("epoch_key", E0 + i) for i in range(4)]
    [registration] = [r for p in decoded for r in p.registrations]
    reg = envelope.parse(Entry.decode(registration).cose)
    assert reg.kid == d.world.operator.device_id and reg.verify(d.world.operator.public_key)
    assert reg.payload["dev"] == d.world.band.device_id and reg.payload["owner"] == d.world.patient.device_id


def test_the_requester_of_a_final_usable_grant_gets_exactly_the_readings_in_scope(deployment: Deployment) -> None:
    rs = server(deployment)
    pages = fetch_all(rs, deployment.world.doctor, deployment.grant)
    assert len(pages) == 1
    check_pages(deployment, pages)
    assert rs.stats["answered"] == 1 and rs.stats["pages"] == 1


def test_nothing_is_served_before_the_grant_is_under_a_final_checkpoint(deployment: Deployment) -> None:
    rs = server(deployment, final=deployment.grant)  # final up to the leaf before the grant
    refusal = rs.handle(sign_records_request(deployment.world.doctor, deployment.grant, 0))
    assert isinstance(refusal, Refusal) and refusal.reason == "not_final"
    assert rs.stats["not_final"] == 1 and rs.stats["answered"] == 0


@pytest.mark.parametrize("who", ["owner", "stranger", "forged", "unregistered"])
def test_only_the_records_requester_is_answered(deployment: Deployment, who: str) -> None:
    w = deployment.world
    rs = server(deployment)
    raw = {
        "owner": lambda: sign_records_request(w.patient, deployment.grant, 0),  # the owner too goes by a record
        "stranger": lambda: sign_records_request(w.other_patient, deployment.grant, 0),
        # the doctor's kid, signed by someone else's key: the registered key decides
        "forged": lambda: envelope.sign(w.other_patient, {"v": 1, "access": deployment.grant, "page": 0},
                                        kid=w.doctor.device_id),
        "unregistered": lambda: sign_records_request(Identity.generate(), deployment.grant, 0),
    }[who]()
    refusal = rs.handle(raw)
    expected = {"owner": "not_requester", "stranger": "not_requester", "forged": "bad_request",
                "unregistered": "unknown_requester"}[who]
    assert isinstance(refusal, Refusal) and refusal.reason == expected, refusal


def test_a_revoked_an_expired_and_a_missing_grant_are_refused(deployment: Deployment) -> None:
    w, d = deployment.world, deployment
    expired = server(d, now=T0 + 8 * DAY)  # the grant expires at T0 + 7 days
    refusal = expired.handle(sign_records_request(w.doctor, d.grant, 0))
    assert isinstance(refusal, Refusal) and refusal.reason == "expired"
    missing = server(d).handle(sign_records_request(w.doctor, d.grant - 1, 0))  # the request leaf, not a grant
    assert isinstance(missing, Refusal) and missing.reason == "no_access_record"
    revoke = ce.signed(w.patient, ce.ACCESS_REVOKE, ce.AccessRevoke(grant_index=d.grant, reason="done",
                                                                     ts=T0 + 2 * HOUR))
    assert w.add(revoke) == "ok"
    d.ledger.append_entries([revoke])
    refusal = server(d).handle(sign_records_request(w.doctor, d.grant, 0))
    assert isinstance(refusal, Refusal) and refusal.reason == "revoked"


def test_pages_stay_under_the_broker_packet_limit_and_cover_everything(deployment: Deployment) -> None:
    rs = server(deployment, max_packet_bytes=2048)
    pages = fetch_all(rs, deployment.world.doctor, deployment.grant)
    assert len(pages) > 2
    assert all(len(p) <= 2048 - 64 for p in pages)
    check_pages(deployment, pages)
    beyond = rs.handle(sign_records_request(deployment.world.doctor, deployment.grant, len(pages)))
    assert isinstance(beyond, Refusal) and beyond.reason == "no_such_page"


def test_requests_are_rate_limited_per_requester(deployment: Deployment) -> None:
    rs = server(deployment, requests_per_s=0.001, burst=2)
    w = deployment.world
    results = [rs.handle(sign_records_request(w.doctor, deployment.grant, 0)) for _ in range(3)]
    assert [type(r) for r in results] == [Answer, Answer, Refusal]
    assert isinstance(results[2], Refusal) and results[2].reason == "rate_limited"
    # another requester has its own bucket (and is refused for its own reason)
    other = rs.handle(sign_records_request(w.other_patient, deployment.grant, 0))
    assert isinstance(other, Refusal) and other.reason == "not_requester"
    assert rs.stats["rate_limited"] == 1


# -- through a broker ------------------------------------------------------------------------------------

def test_a_requester_gets_its_pages_on_its_inbox_once_the_bridge_saw_the_grant_become_final(
        tmp_path: Path, broker: TestBroker) -> None:
    d = build(tmp_path / "bridge" / "ledger.db")
    w = d.world
    cosigners = w.miners[:3]
    # Finality: a majority (3) of the world's five bonded miners on the ledger, not the bridge's config.
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.2)
    gate = ContractGate(w.genesis, w.operator)
    log = Identity.generate()
    bridge = Bridge(cfg, broker.config, log, d.ledger, client_id=f"bridge-{tmp_path.name}", contracts=gate)
    assert bridge.records is not None
    bridge.records._clock_ms = lambda: NOW  # the world's grant lives in November 2026
    pages: list[bytes] = []
    got_page = threading.Event()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"rs-{tmp_path.name}")

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.CHECKPOINT and msg.payload:  # play the miners: cosign what the bridge issued
            note = msg.payload.decode()
            body = note.split("\n\n")[0] + "\n"
            for m in cosigners:
                name = f"carechain.miner/{m.device_id}"
                line = cosign(body, Cosigner(name, m.public_key), m.sign, int(time.time()))
                c.publish(topics.miner_cosignature(m.device_id), CosignatureMessage(
                    miner=name, public_key=m.public_key.hex(), tree_size=int(body.split("\n")[1]),
                    checkpoint=note, cosignature=line.line()).signed(m).model_dump_json().encode(), qos=1)
        elif msg.topic == topics.party_inbox(w.doctor.device_id):
            pages.append(bytes(msg.payload))
            got_page.set()

    try:
        bridge.start()
        assert bridge.wait_ready(30)
        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.subscribe([(topics.party_inbox(w.doctor.device_id), 1)])
        client.loop_start()
        time.sleep(0.3)
        client.publish(topics.ACCESS_RECORDS, sign_records_request(w.doctor, d.grant, 0), qos=1)
        deadline = time.monotonic() + 5
        while bridge.records.stats["not_final"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.records.stats["not_final"] == 1 and not pages  # no final checkpoint yet: nothing
        client.subscribe([(topics.CHECKPOINT, 1)])
        deadline = time.monotonic() + 20
        while bridge.final_size() <= d.grant and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.final_size() > d.grant
        client.publish(topics.ACCESS_RECORDS, sign_records_request(w.doctor, d.grant, 0), qos=1)
        assert got_page.wait(20)
    finally:
        client.loop_stop()
        client.disconnect()
        bridge.stop()
    check_pages(d, pages, {log.device_id: log.public_key})  # signed by the bridge's log key
    assert bridge.records.stats["answered"] == 1
    d.ledger.close()


# -- the broker ACL for parties ----------------------------------------------------------------------------

@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_a_party_login_reads_only_its_own_inbox_and_writes_only_access_topics(tmp_path: Path) -> None:
    w = AccessWorld()
    ledger = Ledger(tmp_path / "bridge" / "ledger.db")
    for entry in w.entries:
        if entry.type == ce.PARTY_REGISTER:
            ledger.append_entries([entry])
    ledger.close()
    miner = w.miners[0]
    locked = start_locked_broker(tmp_path, [], add_miners=[miner.device_id])
    try:
        files = locked.access.party_credentials
        assert set(files) == {w.patient.device_id, w.doctor.device_id, w.other_patient.device_id}  # not miners
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in files.values())

        def party(who: Identity) -> Conn:
            creds = load_mqtt_credentials(files[who.device_id])
            assert creds.username == party_user(who.device_id)
            conn = login(locked.port, creds.username, creds.password)
            assert conn.accepted
            return conn

        doctor, patient = party(w.doctor), party(w.patient)
        bridge, miner_conn = locked.login(BRIDGE), locked.login(miner_user(miner.device_id))
        try:
            doctor.subscribe(topics.party_inbox(w.doctor.device_id), topics.party_inbox(w.patient.device_id),
                             topics.ACCESS_RECORDS)
            bridge.subscribe(topics.ACCESS_RECORDS, topics.ACCESS_EVIDENCE, topics.events(w.band.device_id))
            patient.subscribe(topics.party_inbox(w.patient.device_id))
            # the doctor may not publish a device's events; it may ask the bridge for pages
            doctor.publish(topics.events(w.band.device_id), b"forged event")
            doctor.publish(topics.ACCESS_RECORDS, b"page request")
            assert wait_until(lambda: bridge.got(topics.ACCESS_RECORDS, b"page request"))
            assert not bridge.got(topics.events(w.band.device_id))
            # the bridge and the miners write to inboxes; only the named party reads its own
            bridge.publish(topics.party_inbox(w.patient.device_id), b"page for the patient")
            miner_conn.publish(topics.party_inbox(w.doctor.device_id), b"fragments for the doctor")
            assert wait_until(lambda: doctor.got(topics.party_inbox(w.doctor.device_id)))
            assert wait_until(lambda: patient.got(topics.party_inbox(w.patient.device_id)))
            assert not doctor.got(topics.party_inbox(w.patient.device_id))  # subscribed, never delivered
            assert not doctor.got(topics.ACCESS_RECORDS)  # its own request: it may not read that topic
            # a party may send a request to an owner's inbox and file evidence
            doctor.publish(topics.party_inbox(w.patient.device_id), b"access request")
            doctor.publish(topics.ACCESS_EVIDENCE, b"evidence")
            assert wait_until(lambda: patient.got(topics.party_inbox(w.patient.device_id), b"access request"))
            assert wait_until(lambda: bridge.got(topics.ACCESS_EVIDENCE, b"evidence"))
        finally:
            for conn in (doctor, patient, bridge, miner_conn):
                conn.close()
    finally:
        locked.close()
