"""`carechain export fhir` with real processes (issue 18): a bridge, five miners, the patient's band sealing
heart-rate readings (tests/access_world.py), the CLI run as a subprocess.

The owner's export is an access of her own on the access log; its Observations carry the band profile's LOINC
code and UCUM unit and exactly the values the band sent; every Provenance verifies offline against the log key
(and a tampered one does not); the bundle round-trips through fhir.resources' R4B Bundle. A doctor exports
under the owner's grant; a caller without a grant gets no Observations and a message saying what to do.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from tests.access_world import AccessWorld, Party, json_of, now_ms

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
READINGS = 30


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccessWorld]:
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto (persistent sessions and the miners' topics as in production)")
    w = AccessWorld(tmp_path_factory.mktemp("fhir-e2e"), broker.config)
    try:
        w.start()
        start = now_ms() - READINGS * MINUTE_MS  # one reading a minute, then 1 Hz from now on
        w.period = (start, start + READINGS * MINUTE_MS)  # type: ignore[attr-defined]
        w.publish_readings([start + MINUTE_MS * i for i in range(READINGS)])
        w.stream(1.0)
        w.wait_final(w.ledger_size())
        yield w
    finally:
        w.stop()


def export(world: AccessWorld, party: Party, out: Path, *args: str) -> Any:
    since, until = world.period  # type: ignore[attr-defined]
    return world.cli("export", "fhir", "--key", str(party.key_file), "--pre-key", str(party.pre_file),
                     "--since", str(since), "--until", str(until), "--out", str(out), "--timeout", "60", *args,
                     timeout=180)


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def assert_observations_are_what_the_band_sent(world: AccessWorld, bundle: dict[str, Any]) -> None:
    since, until = world.period  # type: ignore[attr-defined]
    sent = {s.seq: s for s in world.sent_between(since, until - 1)}
    assert len(sent) == READINGS, "the period holds other readings than the published ones: the test proves nothing"
    observations = resources(bundle, "Observation")
    got = {int(o["identifier"][0]["value"].split("/")[1]): o for o in observations}
    assert sorted(got) == sorted(sent)
    for seq, o in got.items():
        assert o["code"]["coding"][0] == {"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}
        assert o["valueQuantity"] == {"value": sent[seq].body["bpm"], "unit": "/min",
                                      "system": "http://unitsofmeasure.org", "code": "/min"}
        assert o["identifier"][0]["value"].startswith(world.device.device_id)
    [device] = resources(bundle, "Device")
    assert device["identifier"][0]["value"] == world.device.device_id
    assert device["identifier"][1]["value"] == world.device.public_key.hex()
    assert len(resources(bundle, "Provenance")) == READINGS


def test_the_owners_export_is_logged_verified_and_round_trips(world: AccessWorld, tmp_path: Path) -> None:
    before = world.cli_json("access", "log", "--owner", world.patient.id)["accesses"]
    out = tmp_path / "alice.fhir.json"
    done = export(world, world.patient, out, "--json")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{world.logs()}"
    summary = json_of(done.stdout)
    assert summary["readings_not_yet_checkpointed"] == 0 and summary["readings_unmapped"] == 0
    assert out.stat().st_mode & 0o777 == 0o600

    # Exporting is an access: the owner's own, on the access log (and so in the bundle's AuditEvents).
    after = world.cli_json("access", "log", "--owner", world.patient.id)["accesses"]
    new = [a for a in after if a["index"] not in {b["index"] for b in before}]
    assert len(new) == 1 and new[0]["requester"] == new[0]["owner"] == world.patient.id
    assert new[0]["purpose"] == "FHIR export"
    text = out.read_text()
    bundle = json.loads(text)
    assert f"carechain-access-{new[0]['index']}" in {a["id"] for a in resources(bundle, "AuditEvent")}
    assert_observations_are_what_the_band_sent(world, bundle)

    # The bundle round-trips: JSON → fhir.resources R4B Bundle → JSON, equal.
    assert json.loads(Bundle.model_validate_json(text).model_dump_json()) == bundle

    # Anyone can check every Provenance offline with the log's public key; a tampered one fails, named.
    log_key = world.log_public_key.hex()
    verified = world.cli_json("export", "fhir", "--verify", str(out), "--log-key", log_key)
    assert verified["verified"] == READINGS and verified["failed"] == [] and verified["log_key_pinned"]
    prov = resources(bundle, "Provenance")[0]
    other = resources(bundle, "Provenance")[1]["signature"][0]["data"]
    assert base64.b64decode(other) != base64.b64decode(prov["signature"][0]["data"])
    prov["signature"][0]["data"] = other
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(bundle))
    refused = world.cli("export", "fhir", "--verify", str(tampered), "--log-key", log_key)
    assert refused.returncode == 1 and prov["id"] in refused.stderr and "COSE_Sign1" in refused.stderr
    wrong_log = world.cli("export", "fhir", "--verify", str(out), "--log-key", world.operator.public_key.hex())
    assert wrong_log.returncode == 1 and f"0 Provenance verified, {READINGS} failed" in wrong_log.stdout


def test_a_doctor_exports_under_the_owners_grant(world: AccessWorld, tmp_path: Path) -> None:
    access = world.grant(world.request(world.doctor, last="1h", purpose="referral letter"))
    out = tmp_path / "referral.fhir.json"
    done = export(world, world.doctor, out, "--owner", world.patient.id, "--kinds", "observations,audit")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{world.logs()}"
    bundle = json.loads(out.read_text())
    assert_observations_are_what_the_band_sent(world, bundle)
    audits = {a["id"] for a in resources(bundle, "AuditEvent")}
    assert f"carechain-access-{access}" in audits
    assert not resources(bundle, "Consent") and not resources(bundle, "Claim")  # sections not asked for


def test_a_caller_without_a_grant_gets_no_observations(world: AccessWorld, tmp_path: Path) -> None:
    stranger = world.miners[0].id  # an owner who never granted the doctor anything
    out = tmp_path / "nothing.json"
    done = export(world, world.doctor, out, "--owner", stranger)
    assert done.returncode == 1 and not out.exists()
    message = " ".join((done.stdout + done.stderr).split())
    assert f"no active access record grants you ({world.doctor.id}) {stranger}'s readings" in message
    assert "carechain access request" in message
