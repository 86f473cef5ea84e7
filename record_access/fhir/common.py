"""What every FHIR mapping of the export shares: code systems, stable full URLs, the Patient, FHIR instants.

Resources are plain dicts in FHIR R4 JSON (validated with `fhir.resources.R4B` when the bundle is built), so
that the mappings stay pure and the validator is the one a FHIR server would apply.
"""

from __future__ import annotations

import uuid
from typing import Any

from record_access.audit_log import PARTY_SYSTEM, iso

__all__ = ["DEVICE_KEY_SYSTEM", "DEVICE_SYSTEM", "EVENT_SYSTEM", "LEDGER_LEAF_SYSTEM", "LOINC", "PARTY_SYSTEM",
           "UCUM", "full_url", "iso", "party_reference", "patient", "patient_reference", "reference", "resource_id"]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DEVICE_SYSTEM = "urn:carechain:device"  # device_id: the fingerprint of the device's Ed25519 key
DEVICE_KEY_SYSTEM = "urn:carechain:device-public-key"  # hex of the registered Ed25519 public key
EVENT_SYSTEM = "urn:carechain:event"  # "<device_id>/<seq>": the event's identity on the wire and the ledger
LEDGER_LEAF_SYSTEM = "urn:carechain:leaf"  # a ledger leaf index
_NAMESPACE = uuid.UUID("6f1c2f0e-4a3b-5c6d-8e9f-0a1b2c3d4e5f")  # carechain FHIR export (fixed: ids are stable)


def full_url(resource_type: str, key: str) -> str:
    """A stable `urn:uuid:` for one resource: the same record exports under the same URL every time."""
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{resource_type}/{key}')}"


def reference(resource_type: str, key: str, display: str | None = None) -> dict[str, Any]:
    """A reference to a resource of this bundle, by its full URL."""
    ref: dict[str, Any] = {"reference": full_url(resource_type, key)}
    if display:
        ref["display"] = display
    return ref


def party_reference(party_id: str, display: str | None = None, resource_type: str | None = None) -> dict[str, Any]:
    """A logical reference to a ledger party (not a resource of the bundle): its party id."""
    ref: dict[str, Any] = {"identifier": {"system": PARTY_SYSTEM, "value": party_id}}
    if resource_type:
        ref["type"] = resource_type
    if display:
        ref["display"] = display
    return ref


def patient(party_id: str, name: str = "") -> dict[str, Any]:
    """The record owner as a Patient: only her party id (and registered name) — the ledger holds no more."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": resource_id(party_id),
                                "identifier": [{"system": PARTY_SYSTEM, "value": party_id}]}
    if name:
        resource["name"] = [{"text": name}]
    return resource


def patient_reference(party_id: str) -> dict[str, Any]:
    """A reference to the owner's Patient resource of this bundle."""
    return reference("Patient", party_id)


def resource_id(key: str) -> str:
    """A FHIR id ([A-Za-z0-9.-]{1,64}) from a carechain key."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in key)[:64]
