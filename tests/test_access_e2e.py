"""Issue 13, item 10: owner-authorized, always-logged access with real processes.

A private mosquitto, one `carechain bridge` (contracts on, final = 3 of 5 cosignatures), five `carechain miner`
processes registered as miners, a patient and a doctor with re-encryption keys, and the patient's heart-rate
band sending sealed protocol-2 readings (tests/access_world.py). One world for the module, the tests in
order; every wait is bounded and nothing asserts on wall-clock time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carechain import envelope
from carechain.access import open_sealed_kfrag, parse_capsule_fragments
from carechain.entries import Entry
from carechain.reencryption import (
    ReencryptionError,
    open_data_key,
    reencrypt,
    verify_cfrag,
    verify_kfrag,
)
from carechain.sealed import open_body
from contract_rules.access import access_record, granted_epochs
from tests.access_world import AccessWorld, Party, json_of, now_ms, scan_for_plaintext, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccessWorld]:
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto (persistent sessions and the miners' topics as in production)")
    w = AccessWorld(tmp_path_factory.mktemp("access-e2e"), broker.config)
    try:
        w.start()
        start = now_ms() - 50 * 60_000  # the last 50 minutes, one reading a minute, then 1 Hz from now on
        w.publish_readings([start + 60_000 * i for i in range(50)])
        w.stream(1.0)
        w.wait_final(w.ledger_size())
        yield w
    finally:
        w.stop()


def opened(world: AccessWorld, access: int, requester: Party) -> dict[str, Any]:
    """`carechain access open`, which must succeed; its JSON summary. (Right after the grant: the bridge
    serves nothing before the grant is final, and `open` asks again until it does.)"""
    done = world.open(access, requester)
    assert done.returncode == 0, f"open {access} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{world.logs()}"
    summary = json_of(done.stdout)
    assert summary["access"] == access
    return summary


def assert_every_reading_verified(world: AccessWorld, access: int, summary: dict[str, Any]) -> None:
    """The open returned exactly the readings the band sealed in the granted range, each decrypted (the CLI
    has checked its anchored hash and device signature: a failed check is a `problem` and exit 1)."""
    record = access_record(world.state(), access)
    assert record is not None
    expected = world.sent_between(record["from_ms"], record["to_ms"])
    assert expected, "the granted range holds no reading: the test proves nothing"
    assert summary["problem_count"] == 0, summary["problems"]
    got = {r["seq"]: r for r in summary["records"]}
    assert sorted(got) == [s.seq for s in expected]
    for s in expected:
        r = got[s.seq]
        assert (r["dev"], r["ts"], r["kind"]) == (world.device.device_id, s.ts, "heart_rate")
        assert {k: r[k] for k in s.body} == s.body


def test_doctor_opens_the_last_hour_through_3_of_5_miners(world: AccessWorld) -> None:
    access = world.grant(world.request(world.doctor, purpose="follow-up"))
    summary = opened(world, access, world.doctor)

    record = access_record(world.state(), access)
    assert record is not None and record["threshold"] == 3 and len(record["miners"]) == 5
    assert not summary["faults"]
    assert 3 <= len(summary["miners"]) <= 5 and set(summary["miners"]) <= set(record["miners"])
    assert_every_reading_verified(world, access, summary)
    # What the miners sent is signed by each of them and names this grant.
    keys = {m.id: m.key.public_key for m in world.miners}
    for f in world.observer.fragments_for(access):  # type: ignore[union-attr]
        assert parse_capsule_fragments(f.raw, keys[f.miner]).access == access


def test_no_capsule_fragment_before_the_grant_is_final(world: AccessWorld) -> None:
    assert world.observer is not None
    stopped = world.miners[2:]
    for m in stopped:
        m.stop()
    access = world.grant(world.request(world.doctor, purpose="second opinion"))
    running = {m.name for m in world.miners[:2]}
    # Both running miners re-executed the grant and cosigned a checkpoint covering it; 2 of 5 is not final.
    wait_for("the 2 running miners to cosign a checkpoint covering the grant",
             lambda: running <= world.observer.cosigners_at_or_after(access + 1),  # type: ignore[union-attr]
             context=world.logs)
    refused = world.open(access, world.doctor, timeout=3)  # the bridge serves no page either
    assert refused.returncode == 1 and "records page" in refused.stdout + refused.stderr
    assert world.observer.final_size() <= access
    assert world.observer.fragments_for(access) == []

    for m in stopped:
        m.start()
    for m in stopped:
        m.wait_ready()
    world.wait_final(access + 1)
    summary = opened(world, access, world.doctor)
    assert_every_reading_verified(world, access, summary)
    assert len(world.observer.miners_released(access)) >= 3


def test_a_garbage_capsule_fragment_is_detected_and_attributed(world: AccessWorld) -> None:
    assert world.observer is not None
    bad = world.miners[4]
    bad.stop()
    bad.start(garbage=True)
    bad.wait_ready()
    try:
        access = world.grant(world.request(world.doctor, purpose="cardiology referral"))
        # All five answer (into the doctor's persistent session), the garbage miner too, before the open runs.
        wait_for("all five miners to send capsule fragments",
                 lambda: len(world.observer.miners_released(access)) == 5,  # type: ignore[union-attr]
                 context=world.logs)
        summary = opened(world, access, world.doctor)
        assert [f["miner"] for f in summary["faults"]] == [bad.id]
        assert bad.id not in summary["miners"] or len(summary["miners"]) == 5
        assert_every_reading_verified(world, access, summary)  # the open goes on with the honest four
        assert len(summary["fault_leaves"]) == 1
        state = world.state()
        assert state.table("access_faults").get(bad.id) == 1
        assert all(state.table("access_faults").get(m.id) is None for m in world.miners[:4])
        entry = Entry.decode(world.entry(summary["fault_leaves"][0]))  # on the ledger: this grant, that miner
        assert entry.type == "access.fault"
        payload = envelope.parse(entry.cose).payload
        assert payload["grant_index"] == access
        assert envelope.parse(payload["message"], max_bytes=1 << 21, max_depth=6).kid == bad.id
        assert world.observer.evidence, "the fault was not published on cc/v1/access/evidence"
    finally:
        bad.stop()
        bad.start()
        bad.wait_ready()


def test_revoked_and_expired_grants_are_refused(world: AccessWorld) -> None:
    assert world.observer is not None
    # The owner revokes a grant with the CLI: the bridge serves its records no more.
    first = world.granted[0]
    revoked_at = world.cli_json("access", "revoke", str(first), "--key", str(world.patient.key_file),
                                "--reason", "episode over")["revoked_at_leaf"]
    world.wait_final(revoked_at + 1)
    refused = world.open(first, world.doctor, timeout=3)
    assert refused.returncode == 1

    # A grant appended with its revocation, and one that expired before any checkpoint covered it; the
    # miners must refuse both. A usable grant after them (miners decide grants in log order) shows when
    # every miner has decided.
    now = now_ms()
    revoked, expired, control = world.append_grants([
        {"revoke": True, "purpose": "revoked"},
        {"grant_ts": now - 60_000, "expires_ms": now - 30_000, "purpose": "expired"},
        {"purpose": "control"}])
    world.wait_final(control + 1)
    wait_for("every miner to release the usable grant",
             lambda: len(world.observer.miners_released(control)) == 5,  # type: ignore[union-attr]
             context=world.logs)
    assert world.observer.fragments_for(revoked) == []
    assert world.observer.fragments_for(expired) == []
    # The usable one opens (first: an open consumes the doctor's queued inbox, other grants' fragments too).
    assert_every_reading_verified(world, control, opened(world, control, world.doctor))
    for access in (revoked, expired):  # the bridge serves neither
        done = world.open(access, world.doctor, timeout=3)
        assert done.returncode == 1 and "records page" in done.stdout + done.stderr, done.stdout


def test_two_miners_fragments_cannot_open_a_record(world: AccessWorld) -> None:
    assert world.observer is not None
    access = world.granted[0]
    state = world.state()
    record = access_record(state, access)
    assert record is not None
    owner, doctor = world.patient.pre, world.doctor.pre
    dev, epoch, capsule, key_ct = granted_epochs(state, record)[-1]
    keys = {m.id: m.key.public_key for m in world.miners}
    # The capsule fragments the miner processes actually sent for this epoch.
    sent: dict[str, Any] = {}
    for f in world.observer.fragments_for(access):
        for frag in parse_capsule_fragments(f.raw, keys[f.miner]).frags:
            if (frag.dev, frag.epoch) == (dev, epoch):
                sent[f.miner] = verify_cfrag(frag.cfrag, capsule, owner.public_key, owner.verifying_key,
                                             doctor.public_key)
    assert len(sent) >= 3
    miners = sorted(sent)
    with pytest.raises(ReencryptionError):
        open_data_key(doctor, owner.public_key, capsule, [sent[m] for m in miners[:2]], key_ct)
    # Two miners pooling their own key fragments (even with the requester's key) get no further.
    pair = [m for m in world.miners if m.id in record["miners"]][:2]
    pooled = []
    for m in pair:
        kfrag = open_sealed_kfrag(m.key, record["kfrags"][record["miners"].index(m.id)])
        verified = verify_kfrag(kfrag, owner.public_key, owner.verifying_key, doctor.public_key)
        pooled.append(verify_cfrag(reencrypt(capsule, verified), capsule, owner.public_key, owner.verifying_key,
                                   doctor.public_key))
    with pytest.raises(ReencryptionError):
        open_data_key(doctor, owner.public_key, capsule, pooled, key_ct)
    # The control: three fragments open the epoch's key, which opens a reading of it.
    data_key = open_data_key(doctor, owner.public_key, capsule, [sent[m] for m in miners[:3]], key_ct)
    reading = next(s for s in world.sent_between(record["from_ms"], record["to_ms"]) if s.epoch == epoch)
    ct = world.ciphertext_of(reading.seq)
    assert open_body(data_key, dev, reading.seq, reading.ts, "heart_rate", epoch, ct) == reading.body


def test_every_access_is_logged_the_owners_own_too(world: AccessWorld, tmp_path: Path) -> None:
    own = world.grant(world.request(world.patient, purpose="my own records"))
    assert_every_reading_verified(world, own, opened(world, own, world.patient))

    fhir = tmp_path / "audit.json"
    log = world.cli_json("access", "log", "--fhir", str(fhir))
    by_index = {a["index"]: a for a in log["accesses"]}
    assert sorted(by_index) == sorted(world.granted) and log["count"] == len(world.granted)
    mine = by_index[own]
    assert mine["requester"] == mine["owner"] == world.patient.id and mine["purpose"] == "my own records"
    for index, a in by_index.items():
        if index != own:
            assert (a["requester"], a["owner"]) == (world.doctor.id, world.patient.id)
    assert by_index[world.granted[0]]["status"] == "revoked"
    assert {"revoked", "expired", "active"} <= {a["status"] for a in by_index.values()}

    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.bundle import Bundle

    bundle = json.loads(fhir.read_text())
    Bundle.model_validate(bundle)
    events = [AuditEvent.model_validate(e["resource"]) for e in bundle["entry"]]
    assert len(events) == len(world.granted)
    own_event = next(e for e in events if e.id == f"carechain-access-{own}")
    requestor = next(a for a in own_event.agent if a.requestor)
    assert requestor.who is not None and requestor.who.identifier is not None
    assert requestor.who.identifier.value == world.patient.id


def test_no_file_of_the_bridge_or_a_miner_holds_a_plain_text_reading(world: AccessWorld, tmp_path: Path) -> None:
    readings = list(world.sent)
    assert len(readings) > 50
    # The field name as a plain-text reading would carry it: CBOR (0x63 = a 3-byte text string), JSON, Python repr.
    # Not the bare 3 bytes "bpm": megabytes of ciphertext and hashes hold them by chance (one in 2^24 positions).
    names = [b"\x63bpm", b'"bpm"', b"'bpm'"]
    needles = [*names, *{s.plaintext for s in readings}]
    data_dirs = [world.bridge_dir, *(m.dir for m in world.miners)]
    assert scan_for_plaintext(data_dirs, needles) == []
    # The scan would see one: the control is a file holding one reading's plaintext.
    (tmp_path / "control.bin").write_bytes(b"\x00" + readings[0].plaintext + b"\x00")
    assert {n for _, n in scan_for_plaintext([tmp_path], needles)} >= {b"\x63bpm", readings[0].plaintext}
