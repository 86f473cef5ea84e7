"""The FHIR R4 export's mappings (record_access.fhir): every resource type validated with fhir.resources.R4B,
LOINC + UCUM from the device profile, Provenance that verifies offline and fails on any tampering, and a
bundle that round-trips (JSON → Bundle → JSON, equal)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from carechain import envelope
from carechain.checkpoint import Checkpoint, sign_note
from carechain.entries import event_entry
from carechain.identity import Identity
from carechain.merkle import leaf_hash
from carechain.merkle_tree import MerkleTree
from carechain.profiles import load_profiles
from contract_rules.transactions import patient_commitment
from record_access.audit_log import AccessLogEntry
from record_access.fhir import (
    PROOF_URL,
    InclusionProof,
    OpenedReading,
    OwnerRecords,
    RegisteredDevice,
    Sale,
    build_bundle,
    owner_prescriptions,
    sale_of_leaf,
    verify_bundle,
)
from record_access.fhir.claims import money
from record_access.fhir.common import PARTY_SYSTEM

T0 = 1_765_000_000_000  # fixed instants: the test does not depend on the clock or the time zone
OWNER = Identity.generate()
LOG = Identity.generate()
ORIGIN = "carechain.test/log"
PROFILES = load_profiles()


def _signed_event(dev: Identity, seq: int, ts: int, kind: str) -> bytes:
    return envelope.sign(dev, {"v": 2, "dev": dev.device_id, "seq": seq, "ts": ts, "kind": kind,
                               "body": {"ct": bytes(32), "epoch": 0}})


def _world(readings: list[tuple[Identity, str, int, dict[str, Any]]]) -> tuple[OwnerRecords, list[bytes]]:
    """Readings signed by their devices, appended to a Merkle log (between filler leaves), under a checkpoint
    signed by LOG; the records an export gets from opening them."""
    leaves: list[bytes] = [b"filler-0"]
    opened, devices = [], {}
    for seq, (dev, profile, ts, values) in enumerate(readings, start=1):
        kind = next(m.event for m in PROFILES[profile].fhir)
        cose = _signed_event(dev, seq, ts, kind)
        leaves.append(event_entry(cose).encode())
        opened.append(OpenedReading(len(leaves) - 1, cose, {"index": len(leaves) - 1, "dev": dev.device_id,
                                                            "seq": seq, "ts": ts, "kind": kind, **values}))
        devices[dev.device_id] = RegisteredDevice(dev.device_id, dev.public_key, profile, OWNER.device_id)
        leaves.append(f"filler-{seq}".encode())
    tree = MerkleTree(leaf_hash(leaf) for leaf in leaves)
    size = tree.size
    note = sign_note(Checkpoint(ORIGIN, size, tree.root()).body(), ORIGIN, LOG.public_key, LOG.sign)
    proofs = {r.leaf_index: InclusionProof(r.leaf_index, size, tree.root(), tree.inclusion_proof(r.leaf_index, size),
                                           leaves[r.leaf_index], note, LOG.public_key) for r in opened}
    return OwnerRecords(owner=OWNER.device_id, owner_name="Alice", devices=devices, profiles=PROFILES,
                        readings=opened, proofs=proofs), leaves


BAND, CUFF = Identity.generate(), Identity.generate()
READINGS: list[tuple[Identity, str, int, dict[str, Any]]] = [
    (BAND, "heart_rate_band", T0 + 1000, {"bpm": 72, "rr_intervals_1024": [1000, 1010]}),
    (CUFF, "blood_pressure_cuff", T0 + 2500, {"systolic_mmhg": 121.5, "diastolic_mmhg": 79.0, "pulse_bpm": 64.0})]


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_observations_carry_loinc_and_ucum_from_the_profile_and_the_values_read() -> None:
    records, _ = _world(READINGS)
    bundle, summary = build_bundle(records, ["observations"], T0 + 10_000)
    Bundle.model_validate(bundle)
    obs = _resources(bundle, "Observation")
    by_code = {o["code"]["coding"][0]["code"]: o for o in obs}
    heart = [o for o in obs if o["code"]["coding"][0]["code"] == "8867-4"]
    band = next(o for o in heart if o["identifier"][0]["value"] == f"{BAND.device_id}/1")
    assert band["valueQuantity"] == {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org",
                                     "code": "/min"}
    assert band["category"][0]["coding"][0]["code"] == "vital-signs"
    assert "http://hl7.org/fhir/StructureDefinition/vitalsigns" in band["meta"]["profile"]
    assert band["effectiveDateTime"].startswith("2025-12-06T05:46:41")  # T0 + 1 s, UTC
    panel = by_code["85354-9"]
    components = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in panel["component"]}
    assert components["8480-6"]["value"] == 121.5 and components["8480-6"]["code"] == "mm[Hg]"
    assert components["8462-4"]["value"] == 79.0 and "8478-0" not in components  # no mean: no component
    # The cuff's reading gives two Observations (panel and pulse), both under one Provenance.
    assert summary.counts["Observation"] == 3 and summary.counts["Provenance"] == 2
    assert summary.counts["Device"] == 2 and summary.unmapped_readings == 0
    devices = {d["identifier"][0]["value"]: d for d in _resources(bundle, "Device")}
    assert devices[BAND.device_id]["identifier"][1]["value"] == BAND.public_key.hex()


def test_every_provenance_verifies_offline_against_the_trusted_log_key() -> None:
    records, _ = _world(READINGS)
    bundle, _ = build_bundle(records, ["observations"], T0 + 10_000)
    good, bad = verify_bundle(bundle, LOG.public_key)
    assert bad == [] and len(good) == 2
    assert {(v.device_id, v.seq) for v in good} == {(BAND.device_id, 1), (CUFF.device_id, 2)}
    prov = _resources(bundle, "Provenance")[0]
    sig = prov["signature"][0]
    assert sig["sigFormat"] == "application/cose" and base64.b64decode(sig["data"]) == records.readings[0].cose
    assert [e["url"] for e in prov["extension"]] == [PROOF_URL]
    # Another log's key: nothing verifies.
    good, bad = verify_bundle(bundle, Identity.generate().public_key)
    assert good == [] and len(bad) == 2 and all("trusted log key" in why for _, why in bad)


def _tamper(bundle: dict[str, Any], change: Any) -> list[tuple[str, str]]:
    copied = copy.deepcopy(bundle)
    change(copied)
    good, bad = verify_bundle(copied, LOG.public_key)
    assert len(good) == 1, "only the tampered Provenance may fail"
    return bad


def _first(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    return _resources(bundle, kind)[0]


def _proof_part(prov: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in prov["extension"][0]["extension"] if e["url"] == name)


@pytest.mark.parametrize("what,change,expect", [
    ("a value moved in time", lambda b: _first(b, "Observation").update(effectiveDateTime="2025-12-06T06:00:00Z"),
     "time"),
    ("another event's signature", lambda b: _first(b, "Provenance")["signature"][0].update(
        data=_resources(b, "Provenance")[1]["signature"][0]["data"]), "not the COSE_Sign1"),
    ("a forged device key", lambda b: _first(b, "Device")["identifier"][1].update(
        value=Identity.generate().public_key.hex()), "not the Device"),
    ("a flipped audit path hash", lambda b: _proof_part(_first(b, "Provenance"), "inclusionPath").update(
        valueBase64Binary=base64.b64encode(bytes(32)).decode()), "inclusion"),
    ("a different leaf index", lambda b: _proof_part(_first(b, "Provenance"), "leafIndex").update(
        valueString="3"), "inclusion"),
    ("a missing checkpoint", lambda b: _first(b, "Provenance")["extension"][0]["extension"].pop(-2),
     "checkpoint"),
])
def test_a_tampered_provenance_fails_and_says_why(what: str, change: Any, expect: str) -> None:
    records, _ = _world(READINGS)
    bundle, _ = build_bundle(records, ["observations"], T0 + 10_000)
    bad = _tamper(bundle, change)
    assert len(bad) == 1 and expect in bad[0][1], (what, bad)


def test_the_bundle_round_trips_json_to_model_to_json() -> None:
    records, _ = _world(READINGS)
    bundle, _ = build_bundle(_with_ledger_records(records), list(("observations", "medications", "claims",
                                                                  "audit", "consents")), T0 + 10_000)
    text = json.dumps(bundle)
    again = json.loads(Bundle.model_validate_json(text).model_dump_json())
    assert again == bundle
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert kinds == {"Patient", "Device", "Observation", "Provenance", "MedicationRequest", "MedicationDispense",
                     "Claim", "AuditEvent", "Consent"}
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(bundle["entry"])


RX_REF = "ab" * 32
PHARMACY, TERMINAL, INSURER, PRESCRIBER = "pharmacypartyid1", "terminaldevice01", "insurerpartyid01", "doctorpartyid001"


def _with_ledger_records(records: OwnerRecords) -> OwnerRecords:
    owner = OWNER.device_id
    rx = {"prescriber": PRESCRIBER, "patient_c": patient_commitment(RX_REF, owner), "drug_c": "cd" * 32,
          "quantity": 1, "refills": 2, "expires_ms": T0 + 86_400_000, "controlled": False, "at": 3,
          "revoked_at": None, "fills": 1, "open": 0, "sales": [7]}
    other = {**rx, "patient_c": patient_commitment("ef" * 32, "someone-else")}
    fill = Sale(7, T0 + 5000, TERMINAL, "0002-8215-01", "ndc", 1, 1250, "EUR", owner, RX_REF, owner)
    flu = Sale(9, T0 + 6000, TERMINAL, "49281-0421-50", "ndc", 1, 2400, "EUR", owner, None, owner)
    claim = {"policy_id": "P-1", "patient": owner, "item": "ndc:49281-0421-50", "category": "immunization",
             "price": 2400, "insurer_share": 2160, "patient_paid": 240, "copay": 240}
    consent = {"kinds": ["heart_rate"], "queries": ["mean"], "min_cohort": 5, "price_minor": 100, "buyers": [],
               "expires_ms": T0 + 86_400_000, "attributes": {}, "ts": T0, "owner": owner, "at": 11,
               "revoked_at": None}
    access = AccessLogEntry(index=12, requester=owner, requester_role="patient", requester_name="Alice", owner=owner,
                            owner_name="Alice", devices=(), kinds=(), from_ms=T0, to_ms=T0 + 3_600_000,
                            purpose="fhir export", ts=T0 + 1, expires_ms=T0 + 3_600_000, threshold=3,
                            miners=("m1", "m2", "m3"), revoked_at=None)
    prescriptions = owner_prescriptions({RX_REF: rx, "ef" * 32: other}, [owner])
    assert list(prescriptions) == [RX_REF]
    return OwnerRecords(**{**records.__dict__, "prescriptions": prescriptions, "sales": {7: fill, 9: flu},
                           "claims": {9: claim}, "insurer": INSURER, "terminal_owners": {TERMINAL: PHARMACY},
                           "consents": {11: consent}, "accesses": [access]})


def test_prescriptions_fills_claims_consents_and_accesses_map_to_valid_r4_resources() -> None:
    records = _with_ledger_records(OwnerRecords(owner=OWNER.device_id))
    bundle, summary = build_bundle(records, ["medications", "claims", "audit", "consents"], T0 + 10_000)
    assert summary.counts == {"Patient": 1, "MedicationRequest": 1, "MedicationDispense": 2, "Claim": 1,
                              "AuditEvent": 1, "Consent": 1}
    request = _first(bundle, "MedicationRequest")
    assert request["status"] == "active" and request["dispenseRequest"]["numberOfRepeatsAllowed"] == 2
    assert request["medicationCodeableConcept"]["coding"][0] == {"system": "http://hl7.org/fhir/sid/ndc",
                                                                 "code": "0002-8215-01"}
    assert request["requester"]["identifier"] == {"system": PARTY_SYSTEM, "value": PRESCRIBER}
    dispenses = _resources(bundle, "MedicationDispense")
    filled = next(d for d in dispenses if "authorizingPrescription" in d)
    request_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is request or
                       e["resource"]["resourceType"] == "MedicationRequest")
    assert filled["authorizingPrescription"][0]["reference"] == request_url
    claim = _first(bundle, "Claim")
    assert claim["total"] == {"value": 21.6, "currency": "EUR"} and claim["item"][0]["net"]["value"] == 24.0
    assert claim["insurer"]["identifier"]["value"] == INSURER and claim["provider"]["identifier"]["value"] == PHARMACY
    assert _first(bundle, "AuditEvent")["type"]["code"] == "110106"
    consent = _first(bundle, "Consent")
    assert consent["status"] == "active" and consent["scope"]["coding"][0]["code"] == "research"
    assert consent["provision"]["code"][0]["coding"][0]["code"] == "heart_rate"


def test_money_keeps_minor_units_exact() -> None:
    assert money(2160, "EUR") == {"value": 21.6, "currency": "EUR"}
    assert money(5, "USD")["value"] == 0.05 and money(1200, "JPY") == {"value": 1200, "currency": "JPY"}


def test_an_unknown_section_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown section"):
        build_bundle(OwnerRecords(owner=OWNER.device_id), ["observations", "labs"], T0)


def test_a_sale_is_read_from_its_signed_ledger_leaf_and_other_leaves_are_not_sales() -> None:
    terminal = Identity.generate()
    body = {"item_code": "0002-8215-01", "code_system": "ndc", "rx_only": True, "quantity": 2, "price_minor": 1250,
            "currency": "EUR", "patient_token": OWNER.device_id, "payment_method": "card", "rx_ref": RX_REF}
    cose = envelope.sign(terminal, {"v": 1, "dev": terminal.device_id, "seq": 4, "ts": T0, "kind": "purchase",
                                    "body": body})
    sale = sale_of_leaf(7, event_entry(cose).encode())
    assert sale == Sale(7, T0, terminal.device_id, "0002-8215-01", "ndc", 2, 1250, "EUR", OWNER.device_id, RX_REF,
                        None)
    assert sale_of_leaf(8, event_entry(_signed_event(BAND, 1, T0, "heart_rate")).encode()) is None
    assert sale_of_leaf(9, b"not an entry") is None
